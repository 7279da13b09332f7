"""The base of every rule: `Block` (one preconditioned kernel of a layer)
and `Rule` (one kind of layer), and the helpers rules share."""

import dataclasses

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
    units)`; the bias, its axes ordered by `bias_permutation`, reshapes to
    `(units,)`. `features(record)` gives,
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
    bias_permutation: tuple | None = None
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
        grad_kernel = _to_canonical(grads[0], self.permutation)
        if self.canonical_shape is not None:
            grad_kernel = tf.reshape(grad_kernel, self.canonical_shape)
        grad_bias = None
        if self.bias is not None and grads[1] is not None:
            grad_bias = tf.reshape(
                _to_canonical(grads[1], self.bias_permutation), (-1,))
        return grad_kernel, grad_bias

    def scatter(self, grad_kernel, grad_bias, grads):
        """The gradients of `variables` from the canonical ones (`grads`:
        those `gather` read, for a block that preconditions only part of a
        variable)."""
        grad_kernel = _from_canonical(grad_kernel, self.permutation,
                                      self.kernel.shape)
        if self.bias is None:
            return [grad_kernel]
        return [grad_kernel, None if grad_bias is None else _from_canonical(
            grad_bias, self.bias_permutation, self.bias.shape)]


def _to_canonical(grad, permutation):
    """`grad` with its axes in the canonical order (`None`: as they are)."""
    return grad if permutation is None else tf.transpose(grad, permutation)


def _from_canonical(grad, permutation, shape):
    """A canonical gradient back in the layout of a variable of `shape`."""
    if permutation is not None:
        grad = tf.transpose(
            tf.reshape(grad, [shape[axis] for axis in permutation]),
            np.argsort(permutation))
    return tf.reshape(grad, shape)


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

    def handles(self, layer):
        """Whether this rule knows `layer`'s kernels (beyond its type)."""
        return True

    def blocks(self, layer):
        """The `Block`s of a built layer with a trainable kernel."""
        raise NotImplementedError

    def left_out(self, layer):
        """Why this rule gives a built layer of its kind no block although
        its kernel is trainable, or `None`."""
        return None

    def record(self, layer, call, args, kwargs, records):
        """Calls the layer, appending to `records` what its blocks'
        `features` need of this call: the first positional input."""
        records.append(args[0] if args else kwargs["inputs"])
        return call(*args, **kwargs)

    def scaled_variables(self, layer):
        """The variables `scale_to_unit_variance` multiplies to scale the
        layer's output."""
        weights = trainable(layer)
        return [weights[name] for name in ("kernel", "bias")
                if name in weights]


def trainable(layer):
    """`{name: variable}` of the layer's own trainable weights: the
    variables themselves, since inside a mixed-precision call attributes
    such as `layer.kernel` can be autocast tensors."""
    return {weight.name: weight for weight in layer.trainable_weights}


def channel_axis(layer):
    return 1 if getattr(layer, "data_format", None) == "channels_first" else -1
