"""Convolutions: plain, grouped, depthwise, separable and transposed."""

import dataclasses
import math

import keras
from keras import ops

from keras_bnp.rules.base import Block
from keras_bnp.rules.base import Rule
from keras_bnp.rules.base import channel_axis
from keras_bnp.rules.base import trainable


class ConvRule(Rule):
    """`Conv1D`/`2D`/`3D`, any `groups`, either data format: the kernel
    `(*spatial, in // groups, out)`; statistics over batch and space."""

    layer_types = (keras.layers.Conv1D, keras.layers.Conv2D,
                   keras.layers.Conv3D)

    def blocks(self, layer):
        weights = trainable(layer)
        kernel = weights["kernel"]
        return [Block(
            layer, kernel, weights.get("bias"),
            kernel.shape[-2] * layer.groups, groups=layer.groups,
            channel_axis=channel_axis(layer))]


class DepthwiseRule(Rule):
    """`DepthwiseConv1D`/`2D`, either data format: the kernel `(*spatial,
    in, depth_multiplier)`, whose output channel `c * depth_multiplier + m`
    reads input channel `c` only, is the grouped convolution with `groups
    = in` (one input channel per group); statistics over batch and
    space."""

    layer_types = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

    def blocks(self, layer):
        weights = trainable(layer)
        return [_depthwise_block(layer, weights["kernel"],
                                 weights.get("bias"))]


@dataclasses.dataclass(frozen=True, eq=False)
class _PartBlock(Block):
    """A block whose features are part `part` of a tuple record."""

    part: int = 0

    def features(self, record):
        return record[self.part], self.channel_axis


class SeparableRule(Rule):
    """`SeparableConv1D`/`2D`, either data format: two blocks.

    "depthwise": the depthwise kernel on the layer's input, by the rule
    without bias (its own output has no bias; see docs/layer_rules.md).
    "pointwise": the pointwise kernel `(1[, 1], in * depth_multiplier,
    filters)` and the layer's bias on the depthwise output, which `record`
    keeps by computing the layer's output in its two steps.
    """

    layer_types = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
    kernel_names = ("depthwise_kernel", "pointwise_kernel")

    def blocks(self, layer):
        weights = trainable(layer)
        pointwise = weights["pointwise_kernel"]
        return [
            _depthwise_block(layer, weights["depthwise_kernel"], None,
                             _PartBlock, name="depthwise", part=0),
            _PartBlock(layer, pointwise, weights.get("bias"),
                       pointwise.shape[-2], name="pointwise",
                       channel_axis=channel_axis(layer), part=1),
        ]

    def record(self, layer, call, args, kwargs, records):
        """Calls the layer as its depthwise then pointwise convolution (the
        two steps of TensorFlow's `separable_conv2d`), appending `(input,
        depthwise output)`. A subclass that overrides `call` is called
        as it is, with the depthwise output computed beside it."""
        inputs = args[0] if args else kwargs["inputs"]
        depthwise = ops.depthwise_conv(
            inputs, layer.depthwise_kernel, strides=layer.strides,
            padding=layer.padding, dilation_rate=layer.dilation_rate,
            data_format=layer.data_format)
        records.append((inputs, depthwise))
        if _overrides_call(layer):
            return call(*args, **kwargs)
        axis = channel_axis(layer) % len(depthwise.shape)
        kernel = ops.reshape(layer.pointwise_kernel,
                             layer.pointwise_kernel.shape[-2:])
        outputs = ops.moveaxis(
            ops.tensordot(depthwise, kernel, [[axis], [0]]), -1, axis)
        if layer.use_bias:
            shape = [1] * len(outputs.shape)
            shape[axis] = layer.filters
            outputs = ops.add(outputs, ops.reshape(layer.bias, shape))
        if layer.activation is not None:
            return layer.activation(outputs)
        return outputs

    def scaled_variables(self, layer):
        """The pointwise kernel and the bias: the output is linear in
        them jointly."""
        weights = trainable(layer)
        return [weights[name] for name in ("pointwise_kernel", "bias")
                if name in weights]


class ConvTransposeRule(Rule):
    """`Conv1DTranspose`/`2D`/`3D`, either data format: the kernel
    `(*spatial, out, in)`, its last two axes swapped into the canonical
    layout; statistics per input channel over batch and space. With
    strides `s`, each kernel entry reaches `1 / prod(s)` of the output
    positions, so the gradients are centred on `mean / prod(s)`: exact in
    the interior for `strides=1` only (see `docs/layer_rules.md`)."""

    layer_types = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                   keras.layers.Conv3DTranspose)

    def blocks(self, layer):
        weights = trainable(layer)
        kernel = weights["kernel"]
        rank = len(kernel.shape)
        return [Block(
            layer, kernel, weights.get("bias"), kernel.shape[-1],
            channel_axis=channel_axis(layer),
            permutation=(*range(rank - 2), rank - 1, rank - 2),
            mean_scale=1.0 / math.prod(layer.strides))]


def _depthwise_block(layer, kernel, bias, block_class=Block, **fields):
    """The `block_class` of a depthwise kernel `(*spatial, in,
    multiplier)`: the grouped layout `(*spatial, 1, in * multiplier)` with
    `groups = in`, whose unit `c * multiplier + m` is Keras' output channel
    of input channel `c`."""
    *spatial, channels, multiplier = kernel.shape
    return block_class(
        layer, kernel, bias, channels, groups=channels,
        channel_axis=channel_axis(layer),
        canonical_shape=(*spatial, 1, channels * multiplier), **fields)


def _overrides_call(layer):
    """Whether `layer`'s class replaces the `call` of Keras' separable
    convolutions (`SeparableConv1D` and `2D` share their base's)."""
    return type(layer).call is not keras.layers.SeparableConv2D.call
