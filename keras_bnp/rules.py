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
from keras.src import tree
from keras.src.backend.common import masking


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

    def scatter(self, grad_kernel, grad_bias, grads):
        """The gradients of `variables` from the canonical ones (`grads`:
        those `gather` read, for a block that preconditions only part of a
        variable)."""
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

    def handles(self, layer):
        """Whether this rule knows `layer`'s kernels (beyond its type)."""
        return True

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


@dataclasses.dataclass(frozen=True, eq=False)
class StackedBlock(Block):
    """A block whose canonical kernel stacks, along the fan-in, the columns
    `columns` of several kernels `kernels` (`kernel` is the first: the
    optimizer knows a block by it), and whose bias is those columns of row
    `bias_row` of `bias` (of all of it for `None`). Its features are
    `record[feature]`, channels last.

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
        return record[self.feature], -1

    def gather(self, grads):
        grad_kernel = tf.concat(
            [grad[:, self.columns] for grad in grads[:len(self.kernels)]], 0)
        grad_bias = None
        if self.bias is not None and grads[-1] is not None:
            grad_bias = grads[-1]
            if self.bias_row is not None:
                grad_bias = grad_bias[self.bias_row]
            grad_bias = grad_bias[self.columns]
        return grad_kernel, grad_bias

    def scatter(self, grad_kernel, grad_bias, grads):
        parts = tf.split(grad_kernel, [k.shape[0] for k in self.kernels], 0)
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
          keras.layers.GRUCell)


class RecurrentRule(Rule):
    """`SimpleRNN`, `LSTM`, `GRU`, and `RNN` of one of their cells (also
    the two layers inside `Bidirectional`; not subclasses of the cells).

    At step t the input kernel `(in, k * units)` multiplies the input x_t
    and the recurrent kernel `(units, k * units)` the previous output
    h_{t-1}, and one bias is added: one `StackedBlock` on [x_t; h_{t-1}].
    A GRU with `reset_after=True` has an input and a recurrent bias: one
    block per kernel, each with its bias row. With `reset_after=False`, the
    candidate's recurrent kernel multiplies r_t * h_{t-1} (r_t the reset
    gate): a block of the gates' columns on [x_t; h_{t-1}] and one of the
    candidate's on [r_t * h_{t-1}; x_t]. Statistics pool batch and time
    steps, without masked steps. The layer's returned sequence gives
    h_{t-1} (see `record`). Derivation: docs/layer_rules.md.
    """

    layer_types = (keras.layers.RNN,)
    scaled = False
    kernel_names = ("kernel", "recurrent_kernel")

    def handles(self, layer):
        # Exactly these cells: a subclass may change what the kernels
        # multiply.
        return type(layer.cell) in _CELLS

    def blocks(self, layer):
        cell = layer.cell
        weights = _trainable(layer)
        kernel, recurrent = weights["kernel"], weights["recurrent_kernel"]
        bias = weights.get("bias")
        both = kernel.shape[0] + recurrent.shape[0]
        if not isinstance(cell, keras.layers.GRUCell):
            return [StackedBlock(layer, kernel, bias, both,
                                 kernels=(kernel, recurrent),
                                 feature="stacked")]
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
    if tree.is_nested(mask):
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
                "stacked": tf.concat([inputs, previous], -1)}
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
            masking.set_keras_mask(tensor, mask)
    return features


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


RULES = (DenseRule(), ConvRule(), RecurrentRule())


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

