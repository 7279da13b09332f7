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
import re
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_bnp import _compat


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
        weights = _trainable(layer)
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


@dataclasses.dataclass(frozen=True, eq=False)
class StackedBlock(Block):
    """A block whose canonical kernel stacks, along the fan-in (the
    kernels' second-to-last axis, after any spatial ones), the columns
    `columns` of several kernels `kernels` (`kernel` is the first: the
    optimizer knows a block by it), and whose bias is those columns of row
    `bias_row` of `bias` (of all of it for `None`). Its features are
    `record[feature]`, channels on `channel_axis`.

    Like a Dense layer whose input is the concatenation of the kernels'
    inputs: `x W + h U + b = [x; h] [W; U] + b`. Where it covers only part
    of a variable, `scatter` writes that part into the gradient `gather`
    read, so the variable's other blocks keep theirs.
    """

    kernels: tuple = ()
    columns: slice = dataclasses.field(default_factory=lambda: slice(None))
    bias_row: int | None = None
    feature: str = ""

    @property
    def variables(self):
        return self.kernels + (() if self.bias is None else (self.bias,))

    def features(self, record):
        return record[self.feature], self.channel_axis

    def gather(self, grads):
        grad_kernel = tf.concat(
            [grad[..., self.columns] for grad in grads[:len(self.kernels)]],
            -2)
        grad_bias = None
        if self.bias is not None and grads[-1] is not None:
            grad_bias = grads[-1]
            if self.bias_row is not None:
                grad_bias = grad_bias[self.bias_row]
            grad_bias = grad_bias[self.columns]
        return grad_kernel, grad_bias

    def scatter(self, grad_kernel, grad_bias, grads):
        parts = tf.split(grad_kernel, [k.shape[-2] for k in self.kernels],
                         -2)
        new_grads = [self._placed(grad, part)
                     for grad, part in zip(grads, parts)]
        if self.bias is not None:
            new_grads.append(None if grad_bias is None else self._placed(
                grads[-1], grad_bias, self.bias_row))
        return new_grads

    def _placed(self, grad, part, row=None):
        """`grad` with `part` in its `columns` (of row `row`)."""
        target = grad if row is None else grad[row]
        start, stop, _ = self.columns.indices(target.shape[-1])
        target = tf.concat([target[..., :start], part, target[..., stop:]],
                           -1)
        if row is None:
            return target
        return tf.concat([grad[:row], target[None], grad[row + 1:]], 0)


_CELLS = (keras.layers.SimpleRNNCell, keras.layers.LSTMCell,
          keras.layers.GRUCell, _compat.ConvLSTMCell)


class RecurrentRule(Rule):
    """`SimpleRNN`, `LSTM`, `GRU`, `ConvLSTM1D`/`2D`/`3D`, and `RNN` of
    one of their cells (also the two layers inside `Bidirectional`; not
    subclasses of the cells).

    At step t the input kernel `(in, k * units)` multiplies the input x_t
    and the recurrent kernel `(units, k * units)` the previous output
    h_{t-1}, and one bias is added: one `StackedBlock` on [x_t; h_{t-1}].
    A GRU with `reset_after=True` has an input and a recurrent bias: one
    block per kernel, each with its bias row. With `reset_after=False`, the
    candidate's recurrent kernel multiplies r_t * h_{t-1} (r_t the reset
    gate): a block of the gates' columns on [x_t; h_{t-1}] and one of the
    candidate's on [r_t * h_{t-1}; x_t]. A ConvLSTM's input and recurrent
    convolutions are one convolution of [x_t; h_{t-1}] stacked along the
    channels, when x_t and h_{t-1} have the same spatial shape
    (`padding="same"`, `strides=1`). Statistics pool batch and time
    steps (and space), without masked steps. The layer's returned sequence gives
    h_{t-1} (see `record`). Derivation: docs/layer_rules.md.
    """

    layer_types = (keras.layers.RNN,)
    scaled = False
    kernel_names = ("kernel", "recurrent_kernel")

    def handles(self, layer):
        # Exactly these cells: a subclass may change what the kernels
        # multiply.
        return type(layer.cell) in _CELLS

    def left_out(self, layer):
        cell = layer.cell
        if isinstance(cell, _compat.ConvLSTMCell) and (
                cell.padding != "same" or max(cell.strides) > 1):
            return ("its input convolution has padding="
                    f"'{cell.padding}' and strides={cell.strides}, so its "
                    "inputs and outputs differ in shape")
        return None

    def blocks(self, layer):
        cell = layer.cell
        reason = self.left_out(layer)
        if reason is not None:
            warnings.warn(
                f"BNP leaves {type(layer).__name__} layer '{layer.name}' "
                f"unpreconditioned (the inner optimizer trains it as is): "
                f"{reason}. The recurrent rule covers padding='same' with "
                "strides=1.", stacklevel=2)
            return []
        weights = _trainable(layer)
        kernel, recurrent = weights["kernel"], weights["recurrent_kernel"]
        bias = weights.get("bias")
        both = kernel.shape[-2] + recurrent.shape[-2]
        if not isinstance(cell, keras.layers.GRUCell):
            return [StackedBlock(layer, kernel, bias, both,
                                 kernels=(kernel, recurrent),
                                 feature="stacked",
                                 channel_axis=_sequence_channel_axis(cell))]
        if cell.reset_after:
            return [
                StackedBlock(layer, kernel, bias, kernel.shape[0],
                             name="input", kernels=(kernel,), bias_row=0,
                             feature="input"),
                StackedBlock(layer, recurrent, bias, recurrent.shape[0],
                             name="recurrent", kernels=(recurrent,),
                             bias_row=1, feature="recurrent"),
            ]
        candidate = slice(2 * cell.units, None)
        return [
            StackedBlock(layer, kernel, bias, both, name="gates",
                         kernels=(kernel, recurrent),
                         columns=slice(0, 2 * cell.units),
                         feature="stacked"),
            StackedBlock(layer, recurrent, bias, both, name="candidate",
                         kernels=(recurrent, kernel), columns=candidate,
                         feature="candidate"),
        ]

    def record(self, layer, call, args, kwargs, records):
        """Calls the layer, recording per call the features of its blocks.

        The layer's time loop (`inner_loop`) runs with `return_sequences`
        on, which changes neither its last output nor its states, so the
        layer returns what it would; the loop's arguments give the initial
        state actually used (`initial_state`, a stateful layer's states or
        zeros) and the mask.
        """
        loops = []
        inner_loop = layer.inner_loop

        def recording_loop(sequences, initial_state, mask, training=False):
            # Read before the loop: a stateful layer's state is a variable,
            # which the layer assigns after it.
            initial_output = tf.identity(initial_state[0])
            dropout = _dropout_masks(layer.cell) if training else (None,
                                                                   None)
            return_sequences = layer.return_sequences
            layer.return_sequences = True
            try:
                result = inner_loop(sequences=sequences,
                                    initial_state=initial_state, mask=mask,
                                    training=training)
            finally:
                layer.return_sequences = return_sequences
            loops.append((sequences, initial_output, mask, result[1],
                          dropout))
            return result

        layer.__dict__["inner_loop"] = recording_loop
        try:
            outputs = call(*args, **kwargs)
        finally:
            del layer.__dict__["inner_loop"]
        records.extend(_recurrent_features(layer.cell, layer.go_backwards,
                                           *loop) for loop in loops)
        return outputs


def _dropout_masks(cell):
    """The cell's dropout masks of its input and of h_{t-1} (`None`
    where it drops nothing, or drops with one mask per gate), as set
    before the time loop: the same for every step of a call."""
    masks = []
    for rate, name in ((cell.dropout, "_dropout_mask"),
                       (cell.recurrent_dropout, "_recurrent_dropout_mask")):
        mask = getattr(cell, name, None)
        masks.append(mask if 0 < rate < 1 and tf.is_tensor(mask) else None)
    return masks


def _recurrent_features(cell, go_backwards, sequences, initial_output, mask,
                        outputs, dropout):
    """`{feature name: (batch, time, features)}` of one call, in the order
    the steps ran, each with the Keras mask of the steps that ran
    unmasked; `dropout`: the masks that multiply the input and h_{t-1}."""
    # A new tensor: the mask set below must not replace the input's.
    inputs = tf.identity(tf.cast(sequences, outputs.dtype))
    if keras.tree.is_nested(mask):
        mask = mask[0]
    if mask is not None:
        mask = tf.cast(mask, tf.bool)
    if go_backwards:
        inputs = tf.reverse(inputs, [1])
        mask = None if mask is None else tf.reverse(mask, [1])
    previous = _previous_outputs(
        outputs, tf.cast(initial_output, outputs.dtype), mask)
    if dropout[0] is not None:
        inputs *= tf.cast(dropout[0], inputs.dtype)[:, None]
    if dropout[1] is not None:
        previous *= tf.cast(dropout[1], inputs.dtype)[:, None]
    features = {"input": inputs, "recurrent": previous,
                "stacked": tf.concat([inputs, previous],
                                     _sequence_channel_axis(cell))}
    if isinstance(cell, keras.layers.GRUCell) and not cell.reset_after:
        units = slice(cell.units, 2 * cell.units)
        reset = (tf.matmul(inputs, tf.cast(cell.kernel[:, units],
                                           inputs.dtype))
                 + tf.matmul(previous, tf.cast(
                     cell.recurrent_kernel[:, units], inputs.dtype)))
        if cell.use_bias:
            reset += tf.cast(cell.bias[units], inputs.dtype)
        reset = cell.recurrent_activation(reset)
        features["candidate"] = tf.concat([reset * previous, inputs], -1)
    if mask is not None:
        for tensor in features.values():
            _compat.set_keras_mask(tensor, mask)
    return features


def _sequence_channel_axis(cell):
    """The channel axis of a recurrent layer's sequences (batch, time,
    ...)."""
    return 2 if getattr(cell, "data_format", None) == "channels_first" else -1


def _previous_outputs(outputs, initial_output, mask):
    """h_{t-1} for each step t of `outputs` (batch, time, units), steps in
    the order they ran: the output of the last step before t that `mask`
    (batch, time) keeps, or `initial_output` if none. Masked steps' outputs
    are not used (Keras repeats the last output there, cuDNN writes 0)."""
    initial = initial_output[:, None]
    if mask is None:
        return tf.concat([initial, outputs[:, :-1]], 1)
    steps = tf.range(tf.shape(outputs)[1])
    # Each row's kept steps first, in order.
    kept = tf.argsort(tf.where(mask, steps, steps + tf.shape(outputs)[1]),
                      axis=1, stable=True)
    before = tf.cumsum(tf.cast(mask, tf.int32), axis=1, exclusive=True)
    last = tf.gather(kept, tf.maximum(before - 1, 0), batch_dims=1)
    return tf.gather(tf.concat([initial, outputs], 1),
                     tf.where(before > 0, last + 1, 0), batch_dims=1)


RULES = (DenseRule(), ConvRule(), DepthwiseRule(), SeparableRule(),
         ConvTransposeRule(), EinsumDenseRule(), MultiHeadAttentionRule(),
         RecurrentRule())


def rule_for(layer):
    """The rule of `layer`'s kind, or `None` when BNP does not precondition
    it (another kind, one its rule does not handle, not trainable, or
    LoRA-enabled: LoRA trains low-rank factors, not the kernel the
    statistics fit). A layer that is an
    instance of several rules' kinds (a user class mixing them) has
    none: its kernel's layout is unknown."""
    if not layer.trainable or getattr(layer, "lora_enabled", False):
        return None
    rules = [rule for rule in RULES if isinstance(layer, rule.layer_types)
             and rule.handles(layer)]
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
