"""Recurrent layers: `SimpleRNN`, `LSTM`, `GRU`, `ConvLSTM1D`/`2D`/`3D`."""

import dataclasses
import warnings

import keras
import tensorflow as tf

from keras_bnp import _compat
from keras_bnp.rules.base import Block
from keras_bnp.rules.base import Rule
from keras_bnp.rules.base import trainable


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
        weights = trainable(layer)
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


