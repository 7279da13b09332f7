"""Per-layer rules: what BNP preconditions in each kind of layer.

A `Rule` turns a built layer into `Block`s, one per preconditioned kernel
(the block-per-layer-kind design of kfac-jax). A block names:
- the tensor whose per-channel statistics it keeps (`Block.features`: by
  default the layer's input, pooled over every axis but the channel axis);
- how its kernel's gradient lays out as the canonical `(*spatial,
  features // groups, units)` that `preconditioner.precondition` takes,
  and back (`Block.gather`, `Block.scatter`);
- the bias its centring moves into, if any.

Adding a layer kind is one `Rule` subclass in `RULES` and one NumPy
reference test. The derivations are in `docs/layer_rules.md`.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import ops


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """One preconditioned kernel of a layer, and the bias its centring
    moves into (`None`: the kernel gets the rule without bias, and a bias,
    if the layer has one, is left to the inner optimizer).

    `permutation` orders the kernel's axes as `(*spatial, fan-in, units)`
    and `canonical_shape` reshapes them to `(*spatial, features // groups,
    units)`; the bias reshapes to `(units,)`. `features(record)` gives,
    from what `Rule.record` kept of one call, the tensor and its channel
    axis whose statistics the block keeps.
    """

    layer: keras.layers.Layer
    kernel: keras.Variable
    bias: keras.Variable | None
    features_count: int
    name: str = ""
    groups: int = 1
    channel_axis: int = -1
    permutation: tuple | None = None
    canonical_shape: tuple | None = None

    @property
    def variables(self):
        """The variables whose gradients `gather` reads and `scatter`
        writes."""
        return (self.kernel,) if self.bias is None else (
            self.kernel, self.bias)

    @property
    def label(self):
        """The layer's name, and the block's when the layer has several."""
        return f"{self.layer.name}/{self.name}" if self.name else (
            self.layer.name)

    def features(self, record):
        """`(tensor, channel_axis)`: of one call, the values whose
        statistics this block keeps."""
        return record, self.channel_axis

    def gather(self, grads):
        """`(grad_kernel, grad_bias)` in the canonical layout, from the
        gradients of `variables` (`grad_bias` is `None` without bias)."""
        grad_kernel = grads[0]
        if self.permutation is not None:
            grad_kernel = tf.transpose(grad_kernel, self.permutation)
        if self.canonical_shape is not None:
            grad_kernel = tf.reshape(grad_kernel, self.canonical_shape)
        grad_bias = None
        if self.bias is not None and grads[1] is not None:
            grad_bias = tf.reshape(grads[1], (-1,))
        return grad_kernel, grad_bias

    def scatter(self, grad_kernel, grad_bias):
        """The gradients of `variables` from the canonical ones."""
        if self.permutation is not None:
            shape = [self.kernel.shape[axis] for axis in self.permutation]
            grad_kernel = tf.transpose(tf.reshape(grad_kernel, shape),
                                       np.argsort(self.permutation))
        grad_kernel = tf.reshape(grad_kernel, self.kernel.shape)
        if self.bias is None:
            return [grad_kernel]
        return [grad_kernel, None if grad_bias is None else tf.reshape(
            grad_bias, self.bias.shape)]


class Rule:
    """How BNP preconditions one kind of layer.

    `layer_types`: the layer classes (and their subclasses) it handles.
    `kernel_names`: the trainable weights the layer must have for its
    blocks (a frozen or quantized kernel is not trainable).
    `scaled`: whether `scale_to_unit_variance` scales this kind's output by
    scaling its kernel and bias (a linear layer's output is linear in
    them).
    """

    layer_types = ()
    scaled = True
    kernel_names = ("kernel",)

    def blocks(self, layer):
        """The `Block`s of a built layer with a trainable kernel."""
        raise NotImplementedError

    def record(self, layer, call, args, kwargs, records):
        """Calls the layer, appending to `records` what its blocks'
        `features` need of this call: the first positional input."""
        records.append(args[0] if args else kwargs["inputs"])
        return call(*args, **kwargs)

    def scaled_variables(self, layer):
        """The variables `scale_to_unit_variance` multiplies to scale the
        layer's output."""
        weights = _trainable(layer)
        return [weights[name] for name in ("kernel", "bias")
                if name in weights]


class DenseRule(Rule):
    """`Dense`: the kernel `(in, units)` on the input's last axis."""

    layer_types = (keras.layers.Dense,)

    def blocks(self, layer):
        weights = _trainable(layer)
        kernel = weights["kernel"]
        return [Block(layer, kernel, weights.get("bias"), kernel.shape[0])]


class ConvRule(Rule):
    """`Conv1D`/`2D`/`3D`, any `groups`, either data format: the kernel
    `(*spatial, in // groups, out)`; statistics over batch and space."""

    layer_types = (keras.layers.Conv1D, keras.layers.Conv2D,
                   keras.layers.Conv3D)

    def blocks(self, layer):
        weights = _trainable(layer)
        kernel = weights["kernel"]
        return [Block(
            layer, kernel, weights.get("bias"),
            kernel.shape[-2] * layer.groups, groups=layer.groups,
            channel_axis=_channel_axis(layer))]


class DepthwiseRule(Rule):
    """`DepthwiseConv1D`/`2D`, either data format: the kernel `(*spatial,
    in, depth_multiplier)`, whose output channel `c * depth_multiplier + m`
    reads input channel `c` only, is the grouped convolution with `groups
    = in` (one input channel per group); statistics over batch and
    space."""

    layer_types = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

    def blocks(self, layer):
        weights = _trainable(layer)
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
        weights = _trainable(layer)
        pointwise = weights["pointwise_kernel"]
        return [
            _depthwise_block(layer, weights["depthwise_kernel"], None,
                             _PartBlock, name="depthwise", part=0),
            _PartBlock(layer, pointwise, weights.get("bias"),
                       pointwise.shape[-2], name="pointwise",
                       channel_axis=_channel_axis(layer), part=1),
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
        axis = _channel_axis(layer) % len(depthwise.shape)
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
        weights = _trainable(layer)
        return [weights[name] for name in ("pointwise_kernel", "bias")
                if name in weights]


RULES = (DenseRule(), ConvRule(), DepthwiseRule(), SeparableRule())


def rule_for(layer):
    """The rule of `layer`'s kind, or `None` when BNP does not precondition
    it (another kind, not trainable, or LoRA-enabled: LoRA trains low-rank
    factors, not the kernel the statistics fit). A layer that is an
    instance of several rules' kinds (a user class mixing them) has
    none: its kernel's layout is unknown."""
    if not layer.trainable or getattr(layer, "lora_enabled", False):
        return None
    rules = [rule for rule in RULES if isinstance(layer, rule.layer_types)]
    return rules[0] if len(rules) == 1 else None


def blocks(layer):
    """The `Block`s of a layer with a rule, or `[]` while it is unbuilt or
    its kernel is not trainable (e.g. frozen or quantized)."""
    rule = rule_for(layer)
    if rule is None or not layer.built:
        return []
    weights = _trainable(layer)
    if any(name not in weights for name in rule.kernel_names):
        return []
    return rule.blocks(layer)


def _trainable(layer):
    """`{name: variable}` of the layer's own trainable weights: the
    variables themselves, since inside a mixed-precision call attributes
    such as `layer.kernel` can be autocast tensors."""
    return {weight.name: weight for weight in layer.trainable_weights}


def _channel_axis(layer):
    return 1 if getattr(layer, "data_format", None) == "channels_first" else -1


def _depthwise_block(layer, kernel, bias, block_class=Block, **fields):
    """The `block_class` of a depthwise kernel `(*spatial, in,
    multiplier)`: the grouped layout `(*spatial, 1, in * multiplier)` with
    `groups = in`, whose unit `c * multiplier + m` is Keras' output channel
    of input channel `c`."""
    *spatial, channels, multiplier = kernel.shape
    return block_class(
        layer, kernel, bias, channels, groups=channels,
        channel_axis=_channel_axis(layer),
        canonical_shape=(*spatial, 1, channels * multiplier), **fields)


def _overrides_call(layer):
    """Whether `layer`'s class replaces the `call` of Keras' separable
    convolutions (`SeparableConv1D` and `2D` share their base's)."""
    return type(layer).call is not keras.layers.SeparableConv2D.call
