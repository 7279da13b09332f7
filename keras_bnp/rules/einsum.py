"""`EinsumDense`, and `MultiHeadAttention`, whose projections are
`EinsumDense` layers."""

import dataclasses
import math
import re

import keras
import tensorflow as tf

from keras_bnp.rules.base import Block
from keras_bnp.rules.base import Rule
from keras_bnp.rules.base import trainable


@dataclasses.dataclass(frozen=True, eq=False)
class EinsumBlock(Block):
    """An `EinsumDense` kernel: its features are the input's axes that the
    kernel contracts, flattened in the kernel's order into one channel
    axis. `summed` are the input's axes in neither the kernel nor the
    output (the layer sums them first); `contracted` the positions of the
    contracted axes, in the kernel's order, once those are summed."""

    summed: tuple = ()
    contracted: tuple = ()

    def features(self, record):
        inputs, mask = record, getattr(record, "_keras_mask", None)
        if self.summed:
            # The layer sums them, masked positions included.
            inputs, mask = tf.reduce_sum(inputs, self.summed), None
        axes, rank = list(self.contracted), inputs.shape.rank
        if not axes:  # an outer product: one feature, the input itself
            inputs, axes = tf.expand_dims(inputs, -1), [rank]
        elif axes != list(range(axes[0], axes[0] + len(axes))):
            inputs = tf.transpose(
                inputs, [a for a in range(rank) if a not in axes] + axes)
            axes = list(range(rank - len(axes), rank))
        if len(axes) > 1:
            dims = [tf.shape(inputs)[axis] if size is None else size
                    for axis, size in enumerate(inputs.shape)]
            inputs = tf.reshape(inputs, dims[:axes[0]] + [
                self.features_count] + dims[axes[-1] + 1:])
        if inputs is not record and mask is not None:
            # The mask still covers the non-feature axes, in their order.
            inputs._keras_mask = mask
        return inputs, axes[0]


class EinsumDenseRule(Rule):
    """`EinsumDense` (so also `MultiHeadAttention`'s projections): features
    are the input axes the kernel contracts, statistics pool over every
    other input axis, units are the kernel's axes in the output only. A
    kernel axis in the input and the output too (`"bgi,gio->bgo"`, a
    grouped Dense, or a kernel per position) makes groups: each of its
    indices is a Dense layer of its own, and its features join the
    contracted ones. The bias takes the centring when it spans exactly the
    kernel's output axes.
    Not scaled by the initial scaling: in attention, scaling the query and
    key projections would change the softmax's temperature (measured to
    stall a small BERT classifier; see docs/layer_rules.md)."""

    layer_types = (keras.layers.EinsumDense,)
    scaled = False

    def record(self, layer, call, args, kwargs, records):
        """Records the input, with the Keras mask that a calling
        `MultiHeadAttention` removed from it (see
        `MultiHeadAttentionRule`)."""
        mask = _PROJECTION_MASKS.get(id(layer))
        if mask is None:
            return super().record(layer, call, args, kwargs, records)
        inputs = tf.identity(args[0] if args else kwargs["inputs"])
        inputs._keras_mask = mask
        records.append(inputs)
        return call(*args, **kwargs)

    def blocks(self, layer):
        weights = trainable(layer)
        kernel, bias = weights["kernel"], weights.get("bias")
        inputs, kernel_axes, output = re.split(",|->", layer.equation)
        input_axes, output_axes = (inputs.replace("...", ""),
                                   output.replace("...", ""))
        shared = [a for a in kernel_axes
                  if a in input_axes and a in output_axes]
        contracted = [a for a in kernel_axes
                      if a in input_axes and a not in output_axes]
        units = [a for a in kernel_axes if a not in input_axes]
        offset = (layer.input_spec.ndim - len(input_axes)
                  if inputs.startswith("...") else 0)
        position = {a: offset + i for i, a in enumerate(input_axes)}
        summed = [position[a] for a in input_axes
                  if a not in kernel_axes + output_axes]
        size = {a: kernel.shape[i] for i, a in enumerate(kernel_axes)}
        if bias is not None and set(layer.bias_axes) != set(shared + units):
            bias = None  # left to the inner optimizer
        groups = math.prod(size[a] for a in shared)
        return [EinsumBlock(
            layer, kernel, bias,
            groups * math.prod(size[a] for a in contracted), groups=groups,
            permutation=_permutation(
                [kernel_axes.index(a) for a in contracted + shared + units]),
            canonical_shape=(math.prod(size[a] for a in contracted),
                             groups * math.prod(size[a] for a in units)),
            bias_permutation=None if bias is None else _bias_permutation(
                layer.bias_axes, output_axes, shared + units,
                len(bias.shape)),
            summed=tuple(summed),
            # The features, group by group.
            contracted=tuple(
                position[a] - sum(axis < position[a] for axis in summed)
                for a in shared + contracted),
        )]


class MultiHeadAttentionRule(Rule):
    """`MultiHeadAttention` has no block of its own: its projections are
    `EinsumDense` layers with theirs. It removes the Keras masks of its
    query, value and key before it calls them; its `record` hands those
    masks on to their records (the query's to the output projection too),
    so that their statistics leave out the masked positions as a
    projection outside attention would."""

    layer_types = (keras.layers.MultiHeadAttention,)
    scaled = False
    kernel_names = ()

    def blocks(self, layer):
        return []

    def record(self, layer, call, args, kwargs, records):
        given = dict(zip(("query", "value", "key"), args), **kwargs)
        if given.get("key") is None:
            given["key"] = given.get("value")

        def mask(name):
            found = given.get(f"{name}_mask")
            return getattr(given.get(name), "_keras_mask", None) if (
                found is None) else found

        # The key's own mask counts only for a key other than the value.
        key = "value" if given["key"] is given.get("value") else "key"
        masks = {id(getattr(layer, f"_{projection}_dense", None)): mask(name)
                 for projection, name in (("query", "query"),
                                          ("value", "value"), ("key", key),
                                          ("output", "query"))}
        records.append(given.get("query"))
        _PROJECTION_MASKS.update(masks)
        try:
            return call(*args, **kwargs)
        finally:
            for projection in masks:
                _PROJECTION_MASKS.pop(projection, None)


# `{id(projection): mask}` while a `MultiHeadAttention` call is recorded.
_PROJECTION_MASKS = {}


def _permutation(order):
    """`order` as a transposition, `None` for the identity."""
    return None if order == sorted(order) else tuple(order)


def _bias_permutation(bias_axes, output_axes, units, rank):
    """The transposition of an `EinsumDense` bias (rank `rank`: the output's
    axes from the first bias axis on, of size 1 where not a bias axis, then
    those of a right `...`) that orders its axes as the kernel orders
    `units`."""
    axes = output_axes[min(output_axes.index(a) for a in bias_axes):]
    positions = [axes.index(a) for a in units]
    if positions == sorted(positions):
        return None  # the axes between them have size 1
    return tuple([a for a in range(rank) if a not in positions] + positions)


