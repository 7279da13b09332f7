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
import math

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """One preconditioned kernel of a layer, and the bias its centring
    moves into (`None`: the kernel gets the rule without bias, and a bias,
    if the layer has one, is left to the inner optimizer).

    `permutation` orders the kernel's axes as `(*spatial, fan-in, units)`
    and `canonical_shape` reshapes them to `(*spatial, features // groups,
    units)`; the bias reshapes to `(units,)`. `features(record)` gives,
    from what `Rule.record` kept of one call, the tensor and its channel
    axis whose statistics the block keeps. `mean_scale` is the fraction of
    the layer's output positions that each kernel entry reaches (1 but for
    a strided transposed convolution): the fan-in's mean is the features'
    mean times it, and the gradients are centred on that.
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
    mean_scale: float = 1.0

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
        weights = _trainable(layer)
        kernel = weights["kernel"]
        rank = len(kernel.shape)
        return [Block(
            layer, kernel, weights.get("bias"), kernel.shape[-1],
            channel_axis=_channel_axis(layer),
            permutation=(*range(rank - 2), rank - 1, rank - 2),
            mean_scale=1.0 / math.prod(layer.strides))]


RULES = (DenseRule(), ConvRule(), ConvTransposeRule())


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

