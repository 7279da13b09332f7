"""`BNP`: preconditions layer gradients, then applies an inner optimizer."""

import contextlib
import dataclasses
import math
import os
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_bnp import coverage
from keras_bnp import preconditioner
from keras_bnp import registry
from keras_bnp import rules
from keras_bnp import statistics

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_BASE_ARGUMENTS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)
# Why a layer's statistics update can be skipped, as counted by BNP.
SKIP_CAUSES = ("non_finite_input", "overflow")
_MISSING_CAPTURE = (
    "BNP needs the inputs of the model's preconditioned layers (Dense, "
    "convolutions, attention, recurrent, ...), which only a "
    "model with `keras_bnp.BNPMixin` records. Build the model as "
    "`keras_bnp.BNPModel(inputs, outputs)` or "
    "`keras_bnp.BNPSequential([...])`, or put `BNPMixin` first in your "
    "class: `class Net(keras_bnp.BNPMixin, keras.Model)`. In a custom "
    "training loop, or with a BNP that the model does not hold as its "
    "optimizer or as an attribute, run the forward pass and "
    "`apply_gradients` inside `with optimizer.capture(model):`."
)

_CUSTOM_STEP = (
    "Model '{name}' ({cls}) has BNPMixin but overrides `train_step`, so "
    "BNPMixin's training step, which records the inputs of the model's "
    "preconditioned layers for BNP, does not run. Run the forward pass and "
    "`apply_gradients` of your `train_step` inside "
    "`with self.bnp_capture(sample_weight):` (it records for the model's "
    "optimizer and every optimizer the model holds as an attribute, such "
    "as a GAN's `d_optimizer`, that is a BNP; `sample_weight` may be "
    "`None`), e.g.\n\n"
    "    def train_step(self, data):\n"
    "        x, y, sample_weight = "
    "keras.utils.unpack_x_y_sample_weight(data)\n"
    "        with self.bnp_capture(sample_weight):\n"
    "            with tf.GradientTape() as tape:\n"
    "                loss = ...  # the forward pass\n"
    "            grads = tape.gradient(loss, self.trainable_weights)\n"
    "            self.optimizer.apply_gradients(\n"
    "                zip(grads, self.trainable_weights))\n"
    "        ...\n\n"
    "or return `super().train_step(data)` from it."
)

# Per kind of graph a layer can be called in inside the training step's
# (see `registry.capture_inputs`): how to name it, and how to call the
# layer outside it.
_NESTED = {
    "loop": (
        "a loop (`keras.ops.scan`, `fori_loop`, `while_loop`, `map`, "
        "`tf.while_loop`)",
        "call the layer outside the loop: apply it to all steps at once "
        "(stacked along the batch axis) when a step does not need the "
        "previous one's output, or unroll a loop of fixed length in "
        "Python.",
    ),
    "cond": (
        "a `cond` branch (`keras.ops.cond` or `tf.cond` on a tensor)",
        "call the layer outside the `cond`, e.g. compute both branches "
        "and choose with `keras.ops.where`.",
    ),
    "vectorized_map": (
        "`keras.ops.vectorized_map` or `tf.vectorized_map`, whose function "
        "is traced for a single element",
        "call the layer on the whole batch outside `vectorized_map` (a "
        "layer maps every example already).",
    ),
    "function": (
        "a nested `tf.function`",
        "call the layer outside the nested `tf.function` (`fit` compiles "
        "the training step already).",
    ),
}


def _missing_capture(model):
    """The error message for a step that recorded no layer inputs, for the
    model BNP last tracked (`None` if none)."""
    # `BNPMixin` by name: `keras_bnp.model` imports this module.
    mixin = next((base for base in type(model).__mro__
                  if base.__module__ == "keras_bnp.model"
                  and base.__name__ == "BNPMixin"), None)
    if mixin is not None and type(model).train_step is not mixin.train_step:
        return _CUSTOM_STEP.format(name=model.name, cls=type(model).__name__)
    return _MISSING_CAPTURE


def _key(variable):
    """Identifies a model variable. Not `Optimizer._var_key`, which reads
    the variable's value and so fails inside a mixed-precision layer call,
    where `_track` can run."""
    return id(variable)


@dataclasses.dataclass
class _Slot:
    """Running statistics of one block's features (optimizer-owned state;
    see `rules.Block`).

    `BNP._slots` keys it by the block's kernel (`_key`); it holds no model
    variable, so that none is tracked into the optimizer. `rank` is the
    block's position among the model's blocks (the order of summaries);
    `label` is the layer's name, and the block's (`block_name`) when it has
    several.
    """

    rank: int
    label: str
    block_name: str
    layer_class: str
    moving_mean: keras.Variable
    moving_variance: keras.Variable
    moving_count: keras.Variable

    FIELDS = ("moving_mean", "moving_variance", "moving_count")

    @property
    def variables(self):
        return [self.moving_mean, self.moving_variance, self.moving_count]


@keras.saving.register_keras_serializable(package="keras_bnp")
class BNP(keras.optimizers.Optimizer):
    """Batch Normalization Preconditioning (BNP) for Keras layers.

    BNP gets the conditioning benefit of `BatchNormalization` without adding
    normalization layers: it rescales and centres each layer's kernel
    gradients with running statistics of that layer's inputs, then hands them
    to an inner optimizer. The forward pass is unchanged (no inference cost)
    and, because the statistics are running averages rather than batch
    statistics, it works at any batch size, including 1.

    For a layer with kernel `w` (fan-in axes first), bias `b`, inputs `x`,
    and ordinary gradients `g_w`, `g_b`, one training step is:

    ```python
    # 1. statistics, per input channel, with the current batch of n values
    moving_count = statistics_momentum * moving_count + n
    w = n / moving_count
    delta = mean(x) - moving_mean
    moving_mean += w * delta
    moving_variance = ((1 - w) * moving_variance + w * var(x)
                       + w * (1 - w) * delta ** 2)
    # 2. preconditioning, with the damping d relative to the layer's inputs
    d = max(epsilon * mean(moving_variance),
            1e-6 * mean(moving_variance + moving_mean ** 2))
    g_w = (g_w - moving_mean * g_b) / (moving_variance + d)
    g_b = g_b - sum(g_w * moving_mean, axis=fan_in_axes)
    # 3. the inner optimizer (clipping, weight decay, momentum act on the
    #    preconditioned gradients)
    inner_optimizer.apply([g_w, g_b], [w, b])
    ```

    Step 1 keeps moving averages of the raw sums `n`, `sum(x)`, `sum(x^2)`
    in centred form: each batch's sums are taken of `x - moving_mean`, and
    the first batch's (no running mean yet) of `x` minus its first
    example's mean, so the variance is exact to float32 rounding of its
    spread whatever the inputs' offset. A batch with a NaN or Inf, or
    whose squared deviations overflow float32, leaves the statistics
    unchanged (`skipped_statistics_updates_by_cause` counts them; `fit`
    warns). Dividing by `moving_count` corrects the start-up bias
    (Adam's `1 - statistics_momentum ** t` for equal batch sizes) and weights
    a smaller last batch by its size. `mean(x)`, `var(x)` are over the batch
    and all spatial positions (the population variance, as
    `BatchNormalization` uses), so at batch size 1 the variance comes from
    the averaging across steps.
    Step 2 is one SGD step on the layer rewritten with normalized inputs
    `(x - moving_mean) / sqrt(moving_variance)`, mapped back to `(w, b)`:
    the inverse of the input second moment `E[[x; 1][x; 1]^T]` with the
    covariances between inputs dropped. A layer without bias gets
    `g_w @ inv(diag(moving_variance + d) + moving_mean moving_mean^T)`
    instead. Both are positive definite, so steps descend. Because `d`
    scales with the inputs' variance, scaling all of a layer's inputs by `a`
    scales its preconditioned gradient by `1 / a^2`, exactly as normalizing
    them would: deep layers, whose inputs have variances far below 1, are
    preconditioned as much as the first.

    BNP acts on gradients only, so it cannot repair a forward signal that
    the initialization makes vanish in a deep network, as BatchNorm does at
    every step. With `initial_scaling=True`, the first step of a fresh
    BNP's `fit` is therefore preceded by one scaling of each linear layer
    (Dense, convolutions) so that its pre-activations have unit variance on
    that step's batch, or the first 256 rows of `fit`'s arrays
    (`keras_bnp.scale_to_unit_variance`, LSUV-style, weighted as the loss
    is). Only layers of a Functional or Sequential graph with nothing
    around them whose reaction to scale is unknown (attention, recurrent
    and normalization layers, `keras.ops` calls, layers without a rule)
    are scaled, and nothing when a bias shows that the weights were trained
    or loaded; `fit` prints one line saying which. This changes weights,
    not the architecture.

    This rule is derived from the description of BNP in Lange et al. (the
    paper's algorithm box was not available to this project); the relative
    damping, the initial scaling and the defaults are this project's
    measured choices (see `docs/defaults.md`), not the paper's.

    References:
    - [Lange, Helfrich & Ye, 2022. Batch Normalization Preconditioning for
      Neural Network Training. JMLR 23(72)](
      https://jmlr.org/papers/v23/20-1135.html)

    Args:
        learning_rate: Learning rate of the built-in SGD. Defaults to `0.01`.
        momentum: Momentum of the built-in SGD. Defaults to `0.9`.
        nesterov: Whether the built-in SGD uses Nesterov momentum. Defaults
            to `False`.
        epsilon: Float > 0, the damping added to each input variance, as a
            multiple of the layer's mean input variance (with
            `relative_epsilon=True`): no input channel is scaled more than
            `(1 + epsilon) / epsilon` times as much as a channel of average
            variance. Defaults to `3.0` (see `docs/defaults.md`).
        relative_epsilon: Bool. `False` adds `epsilon` itself, in the units
            of the inputs' variance, which leaves layers whose inputs have
            variances far below `epsilon` unpreconditioned. Defaults to
            `True`.
        statistics_momentum: Float in `[0, 1)`, the decay of the running
            statistics; `0` uses the current batch only. Defaults to `0.99`.
        initial_scaling: Bool. Whether the first `fit` of a fresh optimizer
            scales the linear layers to unit pre-activation variance
            before its first step (see above; never trained or loaded
            weights). `False` keeps the weights as given. Defaults to
            `True`.
        inner_optimizer: A `keras.optimizers.Optimizer` instance (or a name
            such as `"adam"`) that applies the preconditioned gradients, in
            place of the built-in SGD. Then `learning_rate`, `momentum` and
            `nesterov` must be left unset. Defaults to `None`.
        name: String. Defaults to `None`.

    Example:

    >>> model = keras_bnp.BNPSequential([
    ...     keras.Input((784,)),
    ...     keras.layers.Dense(128, activation="relu"),
    ...     keras.layers.Dense(10)])
    >>> model.compile(optimizer=keras_bnp.BNP(0.01, momentum=0.9),
    ...               loss="sparse_categorical_crossentropy")

    The rule is written for a Dense layer. Each other supported kind
    (convolutions, depthwise, separable and transposed convolutions,
    `EinsumDense` and so attention, `SimpleRNN`/`LSTM`/`GRU`) has a rule in
    `keras_bnp.rules` that says which values its statistics pool over and
    how its kernel lays out as `(fan-in, units)`; the derivations are in
    `docs/layer_rules.md`, and `keras_bnp.coverage.report(model)` lists
    what a model gets.

    The statistics are optimizer variables (saved and restored with it).
    Only layers of a model with `BNPMixin` are preconditioned; every other
    trainable variable is updated by the inner optimizer as usual.
    """

    def __init__(
        self,
        learning_rate=None,
        momentum=None,
        nesterov=False,
        *,
        epsilon=3.0,
        relative_epsilon=True,
        statistics_momentum=0.99,
        initial_scaling=True,
        inner_optimizer=None,
        name=None,
        **kwargs,
    ):
        for argument in _BASE_ARGUMENTS:
            if argument in kwargs:
                raise ValueError(
                    f"BNP does not support `{argument}`. Instead, set "
                    f"`{argument}` on an `inner_optimizer`, e.g. "
                    f"`BNP(inner_optimizer=keras.optimizers.SGD(0.01, "
                    f"{argument}=...))`. Received: {argument}="
                    f"{kwargs[argument]!r}"
                )
        if kwargs:
            raise ValueError(
                f"BNP got unexpected arguments: {sorted(kwargs)}. Its "
                "arguments are learning_rate, momentum, nesterov, epsilon, "
                "relative_epsilon, statistics_momentum, initial_scaling, "
                "inner_optimizer, name."
            )
        epsilon = _as_float("epsilon", epsilon)
        if not _FLOAT32_TINY <= epsilon <= _FLOAT32_MAX:
            raise ValueError(
                "Argument `epsilon` must be a finite float > 0 that float32 "
                "represents as a normal number (from 1.2e-38 to 3.4e38; "
                "smaller values round to 0 or lose precision, and a "
                "constant input then gives NaN), e.g. the default 3.0. "
                f"Received: epsilon={epsilon}"
            )
        statistics_momentum = _as_float(
            "statistics_momentum", statistics_momentum
        )
        if not 0.0 <= statistics_momentum < 1.0:
            raise ValueError(
                "Argument `statistics_momentum` must be in [0, 1) (0 uses "
                "the current batch only). Received: "
                f"statistics_momentum={statistics_momentum}"
            )
        inner_optimizer = _inner_optimizer(
            inner_optimizer, learning_rate, momentum, nesterov
        )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.epsilon = epsilon
        self.relative_epsilon = _as_bool("relative_epsilon", relative_epsilon)
        self.initial_scaling = _as_bool("initial_scaling", initial_scaling)
        # Set by the first `fit` when it scales the layers (see
        # `keras_bnp.scale_to_unit_variance`): `{layer name: factor}`.
        self.initial_scales = {}
        self.statistics_momentum = statistics_momentum
        # Python-side bookkeeping, kept out of Keras' variable tracking.
        self.__dict__["_slots"] = {}
        self.__dict__["_step_inputs"] = None
        self.__dict__["_step_weights"] = None
        self.__dict__["_step_regularized"] = False
        self.__dict__["_step_nested"] = {}
        self.__dict__["_model"] = None  # a weak reference, once tracked
        self.__dict__["_places"] = None  # cache of `_saved_places`
        self.__dict__["_released"] = set()  # ids of released variables

    def build(self, var_list):
        """Builds the inner optimizer, and BNP's own variable:
        - `skipped_statistics_updates`: shape `(2,)`, how many (layer,
          step) statistics updates were skipped because the layer's input
          had a NaN or Inf, and because its finite values' squares
          overflowed float32.

        Per tracked layer, BNP adds (in `track`, not here, because only the
        model knows its layers) three float32 variables:
        - `{layer}_moving_mean`: shape `(in_channels,)`, running mean of
          the layer's input per input channel.
        - `{layer}_moving_variance`: shape `(in_channels,)`, running
          variance of the layer's input per input channel.
        - `{layer}_moving_count`: shape `()`, moving average of the number
          of values per channel in each step (the normalizer that corrects
          the start-up bias).
        """
        self._skipped_updates = self._statistics_variable(
            (len(SKIP_CAUSES),), "zeros", "skipped_statistics_updates"
        )
        super().build(var_list)
        if self._model is not None:
            self._build_inner()

    def _build_inner(self):
        """Builds the inner optimizer, once BNP is built and knows its
        model: with the variables in the order of the model's saved files,
        so that the inner optimizer's state, which Keras saves by position,
        matches them in a process that created the layers in another
        order."""
        if self.inner_optimizer.built:
            return
        _, order = self._saved_places()
        self.inner_optimizer.build(sorted(
            self._trainable_variables,
            key=lambda v: (0, *order[_key(v)]) if _key(v) in order else (1,)))

    def track(self, model):
        """Creates the statistics of `model`'s supported, built layers, and
        releases those of layers no longer in it (e.g. popped).

        `BNPMixin` calls this before training and when a model is loaded. In
        a custom distributed loop, call `optimizer.build(
        model.trainable_variables)` and `optimizer.track(model)` under
        `strategy.scope()` before the first step.
        """
        self._track(model, registry.supported_layers(model))

    def _track(self, model, layers):
        """`layers`: `model`'s supported layers, in `supported_layers`
        order. Once BNP is built, it keeps the statistics of the blocks
        whose kernels it trains only (a GAN's two optimizers each train
        part of one model)."""
        built_for = {_key(v) for v in getattr(self, "_trainable_variables",
                                              [])}
        blocks = {_key(block.kernel): block for layer in layers
                  for block in rules.blocks(layer)
                  if not self.built or _key(block.kernel) in built_for}
        if self.built and model.trainable_variables and not any(
                _key(v) in built_for for v in model.trainable_variables):
            raise ValueError(
                f"This BNP ('{self.name}') was built for the variables of "
                f"another model, so it cannot train '{model.name}'; a Keras "
                "optimizer keeps state per variable. Create a new BNP for "
                "each model, e.g. inside the loop over the folds of a "
                "k-fold cross-validation."
            )
        for key in [key for key in self._slots if key not in blocks]:
            self._release(self._slots.pop(key))
        for rank, (key, block) in enumerate(blocks.items()):
            if key in self._slots:
                self._slots[key].rank = rank
                continue
            channels = (block.features_count,)
            name = block.label.replace("/", "_")
            # float64 layers get float64 statistics; all others float32.
            dtype = ("float64" if block.kernel.dtype == "float64"
                     else "float32")
            self._slots[key] = _Slot(
                rank=rank,
                label=block.label,
                block_name=block.name,
                layer_class=type(block.layer).__name__,
                moving_mean=self._statistics_variable(
                    channels, "zeros", f"{name}_moving_mean", dtype
                ),
                moving_variance=self._statistics_variable(
                    channels, "ones", f"{name}_moving_variance", dtype
                ),
                moving_count=self._statistics_variable(
                    (), "zeros", f"{name}_moving_count", dtype
                ),
            )
        self.__dict__["_model"] = weakref.ref(model)
        self.__dict__["_places"] = None
        self._restore_deferred_statistics()
        if self.built:
            self._build_inner()

    def _saved_places(self):
        """`(paths, order)` of the tracked model in its saved files (see
        `registry.saved_paths`): `{kernel key: layer path}` of the tracked
        layers, and `{variable key: (layer path, index)}` of its trainable
        variables. Walking the model takes a while (0.15 s for ResNet50), so
        the result is kept until the next `_track`."""
        model = self._model and self._model()
        if model is None:
            return {}, {}
        if self._places is not None:
            return self._places
        paths = registry.saved_paths(model)
        order = {}
        for layer in model._flatten_layers(include_self=True, recursive=True):
            for index, variable in enumerate(layer.trainable_weights):
                order[_key(variable)] = (paths.get(id(layer), ""), index)
        kernels = {key: path for key, (path, index) in order.items()
                   if key in self._slots}
        self.__dict__["_places"] = kernels, order
        return self._places

    def _release(self, slot):
        """Leaves a slot's variables out of the optimizer's state (they stay
        in `_variables`, which TensorFlow's checkpoints track as an
        append-only list)."""
        self._released.update(id(v) for v in slot.variables)

    def _own_variables(self):
        """BNP's own variables: neither statistics nor released ones."""
        statistics_variables = {id(v) for s in self._slots.values()
                                for v in s.variables}
        return [v for v in self._variables if id(v) not in
                statistics_variables and id(v) not in self._released]

    def _statistics_variable(self, shape, initializer, name,
                             dtype="float32"):
        # Under a tf.distribute strategy each replica keeps its own copy and
        # assigns it without communication: the batch sums are all-reduced
        # first (`_all_replica_sums`), so the copies are identical, and a
        # read outside the replicas (checkpoints, `layer_statistics`) gives
        # their mean, i.e. the same value.
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                initializer,
                shape=shape,
                dtype=dtype,
                trainable=False,
                aggregation="mean",
                synchronization="on_read",
                name=name,
            )
        self._track_variable(variable)
        return variable

    def capture(self, model, sample_weight=None, regularized=False):
        """Records the inputs of `model`'s supported layers for one step.

        The forward pass and `apply_gradients` of one training step must run
        inside this context. `BNPMixin.train_step` does this for `fit`, and
        `BNPMixin.bnp_capture` for a model's own `train_step`.
        `sample_weight` (the step's, as the loss gets it) weighs each
        example in the statistics; `None` weighs all equally.
        `regularized=True` says that the loss includes the layers'
        regularization penalties (`model.losses`, as Keras' `compute_loss`
        adds them): their gradients are then not preconditioned.
        """
        return capture_step(model, [self], sample_weight, regularized)

    def apply(self, grads, trainable_variables=None):
        step_inputs = self._step_inputs
        if step_inputs is None:
            raise RuntimeError(
                _missing_capture(self._model and self._model()))
        self.__dict__["_step_inputs"] = None
        weights, regularized = self._step_weights, self._step_regularized
        # A copy: under a tf.distribute strategy, while this replica waits
        # in an all-reduce, the next one's forward pass runs through the
        # layers this one patched and records its inputs here too.
        step_inputs = {layer: list(inputs)
                       for layer, inputs in step_inputs.items()}
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            model = self._model and self._model()
            if model is not None:
                self._track(model, registry.supported_layers(model))
        self._build_inner()
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        grads = list(grads)
        # The layers this BNP trains (not those of a second optimizer).
        step_inputs = {layer: inputs for layer, inputs in step_inputs.items()
                       if any(_key(block.kernel) in self._slots
                              for block in rules.blocks(layer))}
        called = self._called(step_inputs, dict(self._step_nested))
        blocks = [block for layer in called for block in rules.blocks(layer)
                  if _key(block.kernel) in self._slots]
        if not blocks:
            self.inner_optimizer.apply(grads, trainable_variables)
            return
        slots = [self._slots[_key(block.kernel)] for block in blocks]
        position = {_key(v): i for i, v in enumerate(trainable_variables)}
        indices = [[position.get(_key(v)) for v in block.variables]
                   for block in blocks]
        features = [[block.features(record) for record in
                     step_inputs[block.layer]] for block in blocks]
        # The first update of a block (no running mean yet) centres its sums
        # on values of the batch, the same on every replica.
        first_sums = _all_replica_sums([
            statistics.shift_sums(x, axis, _mask(x), weights,
                                  slot.moving_mean.dtype)
            for slot, ((x, axis), *_) in zip(slots, features)
        ])
        shifts, variances = [], []
        for slot, (total, count) in zip(slots, first_sums):
            running = tf.convert_to_tensor(slot.moving_count) > 0
            shifts.append(tf.where(running, tf.convert_to_tensor(
                slot.moving_mean), tf.math.divide_no_nan(total, count)))
            variances.append(tf.where(running, tf.convert_to_tensor(
                slot.moving_variance), float("nan")))
        # The input sums run as TensorFlow ops (on CPU, their multi-threaded
        # reductions beat XLA's) and are all-reduced across replicas.
        sums = _all_replica_sums([
            _input_sums(calls, shift, variance, weights)
            for calls, shift, variance in zip(features, shifts, variances)
        ])
        # The inner optimizer's update joins the compiled update below,
        # except under a tf.distribute strategy, whose cross-replica merge
        # cannot run inside it.
        distributed = tf.distribute.has_strategy()
        # Each parameter of the compiled call costs about 1 us on CPU, so
        # counts known when tracing go in as constants, and the running
        # means are read inside.
        sums = [(_static(count), *rest) for count, *rest in sums]

        # Keras' loss adds the layers' regularization penalties (divided by
        # the number of replicas): their gradients go around the
        # preconditioning, so that a penalty's strength does not depend on
        # the units of the layer's inputs.
        penalized = sorted({
            i for block_indices in indices for i in block_indices
            if i is not None and grads[i] is not None and getattr(
                trainable_variables[i], "regularizer", None) is not None
        }) if regularized else []
        replicas = tf.distribute.get_strategy().num_replicas_in_sync

        def update(sums, shifts, grads):
            grads = list(grads)  # tf.function forbids changing its argument
            penalties = {i: _penalty_gradient(trainable_variables[i])
                         / replicas for i in penalized}
            for i, penalty in penalties.items():
                grads[i] = grads[i] - penalty
            skipped = []
            for block, slot, block_sums, shift, block_indices in zip(
                    blocks, slots, sums, shifts, indices):
                # A Dense kernel's gradient for sparse inputs has no static
                # shape; XLA compiles `ensure_shape` away.
                block_grads = [
                    None if i is None or grads[i] is None else
                    tf.ensure_shape(grads[i], trainable_variables[i].shape)
                    for i in block_indices]
                canonical = ((None, None) if block_grads[0] is None
                             else block.gather(block_grads))
                mean, variance, count, skips, *new_grads = _layer_update(
                    tf.convert_to_tensor(slot.moving_mean),
                    tf.convert_to_tensor(slot.moving_variance),
                    tf.convert_to_tensor(slot.moving_count),
                    shift, *block_sums, *canonical,
                    momentum=self.statistics_momentum, damping=self._damping,
                    groups=block.groups, mean_scale=block.mean_scale,
                )
                self.assign(slot.moving_mean, mean)
                self.assign(slot.moving_variance, variance)
                self.assign(slot.moving_count, count)
                skipped.append(skips)
                if new_grads[0] is None:
                    continue
                for index, grad in zip(block_indices,
                                       block.scatter(*new_grads, block_grads)):
                    if index is not None and grad is not None:
                        grads[index] = grad
            for i, penalty in penalties.items():
                grads[i] = grads[i] + penalty
            self.assign_add(self._skipped_updates, tf.add_n(skipped))
            if distributed:
                return grads
            # Returning the gradients would make XLA write them out.
            self.inner_optimizer.apply(grads, trainable_variables)
            return None

        if not tf.executing_eagerly():
            # XLA fuses the step's BNP work (about 50 small ops per layer,
            # plus the inner update) into one compiled call, also when the
            # training step itself is not jit-compiled (the default on CPU).
            update = tf.function(update, jit_compile=True)
        preconditioned = update(sums, shifts, grads)
        if distributed:
            self.inner_optimizer.apply(preconditioned, trainable_variables)

    def _called(self, step_inputs, nested):
        """The captured layers that were called in the step's own graph;
        warns about the others, and about calls in graphs nested in it
        (`nested`: `{layer: constructs}`, see `registry.capture_inputs`)."""
        for layer, inputs in step_inputs.items():
            where = " or ".join(_NESTED[c][0] for c in sorted(
                nested.get(layer, ())))
            fixes = " ".join(_NESTED[c][1] for c in sorted(
                nested.get(layer, ())))
            layer_text = f"Layer '{layer.name}' ({type(layer).__name__})"
            if where and inputs:
                message = (
                    f"{layer_text} is called in this training step both "
                    f"inside {where} and outside ({len(inputs)} "
                    "call(s)). BNP's statistics of its input pool only the "
                    "calls outside, while its gradient sums over all "
                    f"calls. To pool every call, {fixes}")
            elif where:
                message = (
                    f"{layer_text} is called in this training step only "
                    f"inside {where}, whose tensors BNP cannot read, so BNP "
                    "has no statistics of its input and leaves its "
                    f"gradients unpreconditioned. To precondition it, "
                    f"{fixes}")
            elif not inputs:
                message = (
                    f"{layer_text} was not called in this training step, "
                    "so BNP has no statistics of its input and leaves its "
                    "gradients unpreconditioned. This happens when a model "
                    "uses a layer's weights without calling the layer; "
                    "call the layer, or set `layer.trainable = False` if "
                    "it is not trained.")
            else:
                continue
            warnings.warn(message, stacklevel=3)
        return [layer for layer, inputs in step_inputs.items() if inputs]

    def layer_statistics(self, layer, block=None):
        """Current running `(mean, variance)` of the features of `layer`'s
        block named `block` (normally its input), as NumPy arrays of shape
        `(features,)`. `block` may be omitted for a layer with one block."""
        slots = [self._slots[_key(b.kernel)] for b in rules.blocks(layer)
                 if _key(b.kernel) in self._slots]
        if not slots:
            raise ValueError(
                f"BNP has no statistics for layer '{layer.name}' "
                f"({type(layer).__name__}). Statistics exist for the "
                "trainable layers that BNP preconditions (see "
                "`BNP.summary()`) of a model with BNPMixin once the model "
                "has been built and compiled with this optimizer (or "
                "trained one step)."
            )
        names = [slot.block_name for slot in slots]
        if block is None and len(slots) == 1:
            slot = slots[0]
        elif block in names:
            slot = slots[names.index(block)]
        else:
            raise ValueError(
                f"Layer '{layer.name}' has the statistics blocks {names}; "
                f"pass one of them as `block`. Received: block={block!r}"
            )
        return (
            slot.moving_mean.numpy(),
            slot.moving_variance.numpy(),
        )

    def _damping(self, mean, variance):
        """What is added to each input variance of a layer with these
        statistics (see `epsilon`)."""
        if not self.relative_epsilon:
            return self.epsilon
        return preconditioner.damping(
            tf.convert_to_tensor(mean), tf.convert_to_tensor(variance),
            self.epsilon)

    @property
    def skipped_statistics_updates(self):
        """Number of (layer, step) statistics updates skipped so far, for
        any of `SKIP_CAUSES` (0 before the first step)."""
        return sum(self.skipped_statistics_updates_by_cause.values())

    @property
    def skipped_statistics_updates_by_cause(self):
        """`{cause: number}` of the skipped (layer, step) statistics
        updates, for each of `SKIP_CAUSES`: `"non_finite_input"` (a NaN or
        Inf value) and `"overflow"` (finite values whose squared deviations
        overflow float32). A step without values (an empty batch, a fully
        masked sample) has nothing to add and is not counted."""
        counts = (self._skipped_updates.numpy() if self.built
                  else [0] * len(SKIP_CAUSES))
        return {cause: int(n) for cause, n in zip(SKIP_CAUSES, counts)}

    def single_value_layers(self):
        """With `statistics_momentum=0`, the labels of the layers whose
        last statistics update had at most one value per input channel
        (so variance 0, and a mean equal to the input); else `[]`."""
        if self.statistics_momentum != 0:
            return []
        return [slot.label for slot in sorted(self._slots.values(),
                                              key=lambda s: s.rank)
                if 0 < float(slot.moving_count.numpy()) <= 1]

    def statistics_summary(self, near_constant=1e-6):
        """Per tracked layer (in model order), a dict of diagnostics:
        `layer`, `class`, `in_channels`, `min_variance`, `max_scale` (the
        largest `1 / (variance + damping)`, see `epsilon`) and
        `near_constant` (the number of input channels with variance at most
        `near_constant`)."""
        rows = []
        for slot in sorted(self._slots.values(), key=lambda s: s.rank):
            variance = slot.moving_variance.numpy()
            damping = float(self._damping(slot.moving_mean, variance))
            rows.append({
                "layer": slot.label,
                "class": slot.layer_class,
                "in_channels": int(variance.shape[0]),
                "min_variance": float(variance.min()),
                "max_scale": 1.0 / (float(variance.min()) + damping),
                "near_constant": int((variance <= near_constant).sum()),
            })
        return rows

    def summary(self, print_fn=print):
        """Prints BNP's settings and, for the tracked model, every trainable
        variable with what BNP does with it, and the shares preconditioned
        (`keras_bnp.coverage`)."""
        lines = [
            f"BNP '{self.name}': epsilon={self.epsilon:g} "
            f"({'relative' if self.relative_epsilon else 'absolute'}), "
            f"statistics_momentum={self.statistics_momentum:g}, inner "
            f"optimizer {type(self.inner_optimizer).__name__}",
        ]
        model = self._model and self._model()
        if model is None:
            lines.append("No model tracked yet: compile a BNPMixin model "
                         "with this optimizer and build or train it. "
                         "`keras_bnp.coverage.report(model)` shows what BNP "
                         "would precondition in any built model.")
        else:
            lines.append(coverage.coverage(model).table())
        print_fn("\n".join(lines))

    @property
    def variables(self):
        """Own, then statistics, then inner variables.

        The statistics are in the order of their layers' places in the
        model's saved files, not in the order they were created (the order
        layers are first built or called, which can differ between training
        and loading a saved model).
        """
        statistics_variables = [v for _, s in self._saved_slots()
                                for v in s.variables]
        return (self._own_variables() + statistics_variables
                + self.inner_optimizer.variables)

    def _saved_slots(self):
        """`(layer path, slot)` pairs, in the order of the paths (by rank
        when no model is tracked)."""
        paths, _ = self._saved_places()
        return sorted(((_joined(paths.get(key, str(slot.rank)),
                                slot.block_name), slot)
                       for key, slot in self._slots.items()),
                      key=lambda pair: pair[0])

    def _saved_state(self):
        """`{key: variable}` of what BNP itself saves in Keras files: its own
        variables by name, each layer's statistics by the layer's path in
        the model's files. Keras saves the inner optimizer's state on its
        own, under `inner_optimizer`."""
        state = {variable.name: variable for variable in self._own_variables()}
        for path, slot in self._saved_slots():
            for field, variable in zip(_Slot.FIELDS, slot.variables):
                state[f"{path.replace('/', '.')}:{field}"] = variable
        return state

    def _statistics_state(self):
        """The statistics' entries of `_saved_state`: `{"path:field":
        variable}`."""
        own = {id(variable) for variable in self._own_variables()}
        return {key: variable for key, variable in self._saved_state().items()
                if id(variable) not in own}

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """BNP's dependencies in TensorFlow's object-based checkpoints
        (`tf.train.Checkpoint`, `tf.train.CheckpointManager`): each
        statistic by its `_saved_state` key, i.e. by its layer's path in the
        model's saved files, so that a model whose layers are created (or
        built) in another order gets each layer's own statistics back.

        Not Keras' `_variables` and `_trainable_variables`, which TensorFlow
        tracks as lists, by position: the first in creation order, the
        second (the model's own variables, which the model checkpoints by
        name) in the model's order of the process. Matched by position,
        they would swap the statistics of a reordered model's layers, and
        where the model's path to a kernel is the longer one, its kernels
        too. The inner optimizer's state stays positional, in the order of
        the model's saved files (see `_build_inner`).
        """
        children = super()._trackable_children(save_type, **kwargs)
        children.pop("_variables", None)
        children.pop("_trainable_variables", None)
        children.update(self._statistics_state())
        return children

    def _restore_deferred_statistics(self):
        """Restores the statistics that a TensorFlow checkpoint restored
        before they existed (`checkpoint.restore` before the first step)
        holds for them by name; eagerly, also when their layer was first
        built inside the traced step."""
        self._maybe_initialize_trackable()
        if not self._deferred_dependencies:
            return
        with tf.init_scope():
            for key, variable in self._statistics_state().items():
                self._handle_deferred_dependencies(name=key, trackable=variable)

    def save_own_variables(self, store):
        # The statistics first and BNP's own variables last, so that a save
        # interrupted in between never leaves what an unbuilt BNP saves
        # (only `iteration` and `learning_rate`), which loads as nothing.
        state = self._saved_state()
        statistics_keys = set(self._statistics_state())
        for key in sorted(state, key=lambda key: key not in statistics_keys):
            store[key] = state[key].numpy()

    def load_own_variables(self, store):
        """Assigns BNP's saved state, after checking all of it: a load that
        fails assigns nothing."""
        state = self._saved_state()
        saved = set(store.keys())
        source = _source(store)
        if not saved:
            raise ValueError(
                f"{source or 'The file'} has no saved state for optimizer "
                f"'{self.name}' (BNP's layer statistics): it was saved from a "
                "model without an optimizer, or its save was interrupted. To "
                "load only the layers' weights, load them before compiling "
                "with BNP, or pass `skip_mismatch=True` to `load_weights`, "
                "which warns and keeps BNP's state as it is."
            )
        where = f" in {source}" if source else ""
        # A BNP saved before it was built (a model never trained) has only
        # Keras' own two variables.
        unbuilt = saved <= {"iteration", "learning_rate"}
        if not self.built and not unbuilt:
            raise ValueError(
                f"Optimizer '{self.name}' is not built, so it cannot take "
                f"the saved state{where} (its layer statistics and inner "
                "optimizer's state are per variable). A model's optimizer "
                "is built by `load_weights` itself; build any other "
                "optimizer with the variables it trains before loading, as "
                "for every Keras optimizer, e.g. for a GAN: "
                "`gan.d_optimizer.build(gan.discriminator."
                "trainable_variables)` and the same for `g_optimizer`."
            )
        if saved != set(state) and not unbuilt:
            raise ValueError(
                f"The saved state of optimizer '{self.name}'{where} does not "
                f"fit this BNP: it has statistics of layers "
                f"{_layer_keys(saved)} and other variables "
                f"{sorted(k for k in saved if ':' not in k)}, where this BNP "
                f"has statistics of layers {_layer_keys(state)} (by their "
                "paths in the model's saved files) and variables "
                f"{sorted(k for k in state if ':' not in k)}. Load a file "
                "saved from the same architecture, compiled with BNP."
            )
        values = {key: np.asarray(store[key]) for key in sorted(saved)}
        wrong = [f"{key} has shape {value.shape} where this BNP has "
                 f"{tuple(state[key].shape)}" for key, value in values.items()
                 if value.shape != tuple(state[key].shape)]
        if wrong:
            raise ValueError(
                f"The saved state of optimizer '{self.name}'{where} does not "
                f"fit this BNP: {'; '.join(wrong)}. Load a file saved from "
                "the same architecture, compiled with BNP."
            )
        for key, value in values.items():
            state[key].assign(value)

    def get_weights(self):
        """The values of all variables (own, statistics, inner optimizer's),
        as NumPy arrays in the order of `variables`."""
        return [variable.numpy() for variable in self.variables]

    def set_weights(self, weights):
        """Sets all variables, in the order of `variables`."""
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(
                f"BNP has {len(variables)} variables (its own, the layer "
                "statistics and the inner optimizer's); received "
                f"{len(weights)} weights."
            )
        for variable, weight in zip(variables, weights):
            if tuple(variable.shape) != tuple(weight.shape):
                raise ValueError(
                    f"Optimizer variable '{variable.path}' has shape "
                    f"{tuple(variable.shape)}; received a weight of shape "
                    f"{tuple(weight.shape)}."
                )
            variable.assign(weight)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = _checked_learning_rate(
            learning_rate)

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "epsilon": self.epsilon,
            "relative_epsilon": self.relative_epsilon,
            "initial_scaling": self.initial_scaling,
            "statistics_momentum": self.statistics_momentum,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # Absent from `keras.optimizers.get("keras_bnp>BNP")`'s config.
        if config.get("inner_optimizer") is not None:
            config["inner_optimizer"] = keras.saving.deserialize_keras_object(
                config["inner_optimizer"], custom_objects=custom_objects
            )
        return cls(**config)


def _mask(inputs):
    """The Keras mask of a layer's input (attached as `_keras_mask`)."""
    return getattr(inputs, "_keras_mask", None)


def _input_sums(calls, shift, variance, weights):
    """`(count, sum(x - shift), sum((x - shift)^2))` pooled over the
    `(x, channel_axis)` of all of a block's calls in this step, given its
    running variance (see `statistics.input_sums`), without the positions
    that a Keras mask on `x` leaves out, weighted by the step's sample
    weights."""
    per_call = [
        statistics.input_sums(x, axis, shift, variance, mask=_mask(x),
                              weights=weights)
        for x, axis in calls
    ]
    return [tf.add_n(list(parts)) for parts in zip(*per_call)]


def _layer_update(
    moving_mean, moving_variance, moving_count, shift, count, centred_sum,
    centred_square_sum, grad_kernel, grad_bias, *, momentum, damping, groups,
    mean_scale=1.0,
):
    """One layer's statistics update and preconditioning, as a pure
    function of tensors (the sums are of the inputs minus `shift`).

    A batch with a non-finite value, whose squares overflow float32, or
    with no values leaves the statistics as they were. `skips` counts the
    first two causes, `[non-finite input, overflow]` (a batch without
    values has nothing to skip). `grad_kernel` may be `None` (the kernel
    is not trained this step). The gradients are centred on `mean_scale`
    times the mean (`rules.Block.mean_scale`).
    """
    mean, variance = statistics.moments_from_sums(
        count, centred_sum, centred_square_sum, shift
    )
    # `shift` is the running mean, except in the first update, where the
    # old mean has weight 0 and the shift keeps `mean - old mean` finite.
    new_mean, new_variance, new_count = statistics.update_moving(
        shift, moving_variance, moving_count, mean, variance, count, momentum
    )
    # A NaN or Inf input makes the sums non-finite. Otherwise the sums are
    # finite, unless the squares of finite values overflow float32 (values
    # apart by more than about sqrt(3e38 / count)).
    has_values = count > 0
    finite_input = tf.reduce_all(tf.math.is_finite(centred_sum))
    finite_squares = tf.reduce_all(tf.math.is_finite(centred_square_sum))
    usable = has_values & finite_input & finite_squares
    skips = tf.cast(tf.stack([has_values & ~finite_input,
                              has_values & finite_input & ~finite_squares]),
                    tf.float32)
    new_mean = tf.where(usable, new_mean, moving_mean)
    new_variance = tf.where(usable, new_variance, moving_variance)
    new_count = tf.where(usable, new_count, moving_count)
    if grad_kernel is not None:
        grad_kernel, grad_bias = preconditioner.precondition(
            grad_kernel, grad_bias, mean_scale * new_mean, new_variance,
            damping(new_mean, new_variance), groups,
        )
    return new_mean, new_variance, new_count, skips, grad_kernel, grad_bias


def _penalty_gradient(variable):
    """The gradient of `variable`'s own regularization penalty."""
    value = tf.convert_to_tensor(variable)
    with tf.GradientTape() as tape:
        tape.watch(value)
        penalty = variable.regularizer(value)
    return tape.gradient(penalty, value)


def _static(count):
    """`count` as a Python float if it is known when tracing."""
    value = tf.get_static_value(count)
    return count if value is None else float(value)


def _all_replica_sums(sums):
    """Sums each layer's `(count, sum, sum of squares)` over the replicas of
    a tf.distribute strategy, in one all-reduce for all layers; unchanged
    without one. Summing counts weights replicas by their examples."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1 or not sums:
        return sums
    return context.all_reduce(tf.distribute.ReduceOp.SUM, sums)


def _joined(path, name):
    return f"{path}/{name}" if name else path


def _source(store):
    """`'path'` of the file that a Keras weights store reads, where the
    store tells (a `.weights.h5` file, or a `.keras` archive read by
    `load_weights`); else `None`."""
    archive = getattr(store, "archive", None)
    path = (getattr(archive, "filename", None)
            or getattr(store, "path_or_io", None))
    if not isinstance(path, (str, os.PathLike)):
        return None
    return f"'{os.fspath(path)}'"


def _layer_keys(keys):
    """The layer paths in the statistics' state keys `path:field`."""
    return sorted({key.split(":")[0].replace(".", "/") for key in keys
                   if ":" in key})


def find_bnp(optimizer):
    """The `BNP` inside `optimizer` (e.g. under a LossScaleOptimizer)."""
    while optimizer is not None and not isinstance(optimizer, BNP):
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return optimizer


def attached(model):
    """The BNPs `model` trains with, each once: its optimizer's, then
    those it holds as attributes (the optimizers that a GAN's own
    `compile` sets, such as `d_optimizer` and `g_optimizer`)."""
    found = {}
    for optimizer in [getattr(model, "optimizer", None), *vars(model).values()]:
        if isinstance(optimizer, keras.optimizers.Optimizer):
            bnp = find_bnp(optimizer)
            if bnp is not None:
                found.setdefault(id(bnp), bnp)
    return list(found.values())


@contextlib.contextmanager
def capture_step(model, bnps, sample_weight=None, regularized=False):
    """Records the inputs of `model`'s supported layers for one step of
    each of `bnps` (see `BNP.capture`)."""
    layers = registry.supported_layers(model)
    for bnp in bnps:
        bnp._track(model, layers)

    def on_first_call(layer):
        # A deferred-build layer gets its statistics on its first call.
        for bnp in bnps:
            bnp._track(model, layers)

    nested = {}  # {layer: {construct, ...}}, see `BNP._called`

    def on_nested_call(layer, construct):
        nested.setdefault(layer, set()).add(construct)

    weights = statistics.position_weights(sample_weight)
    with registry.capture_inputs(layers, on_first_call,
                                 on_nested_call) as captured:
        for bnp in bnps:
            bnp.__dict__.update(_step_inputs=captured, _step_nested=nested,
                                _step_weights=weights,
                                _step_regularized=regularized)
        try:
            yield
        finally:
            for bnp in bnps:
                bnp.__dict__.update(_step_inputs=None, _step_weights=None,
                                    _step_regularized=False)


def _as_float(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Argument `{name}` must be a float. Received: {name}={value!r}"
        ) from None


def _as_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"Argument `{name}` must be True or False. Received: "
            f"{name}={value!r}"
        )
    return bool(value)


def _inner_optimizer(inner_optimizer, learning_rate, momentum, nesterov):
    """The optimizer BNP hands its gradients to."""
    if inner_optimizer is None:
        return keras.optimizers.SGD(
            learning_rate=_checked_learning_rate(
                0.01 if learning_rate is None else learning_rate),
            momentum=_as_float("momentum", 0.9 if momentum is None
                               else momentum),
            nesterov=bool(nesterov),
        )
    given = {
        name: value
        for name, value in (
            ("learning_rate", learning_rate),
            ("momentum", momentum),
            ("nesterov", nesterov or None),
        )
        if value is not None
    }
    if given:
        raise ValueError(
            f"BNP got both `inner_optimizer` and {sorted(given)}, which only "
            "configure the built-in SGD. Set them on the inner optimizer "
            "instead, e.g. `BNP(inner_optimizer=keras.optimizers.SGD("
            "learning_rate=0.01, momentum=0.9))`. Received: "
            + ", ".join(f"{k}={v!r}" for k, v in given.items())
        )
    if isinstance(inner_optimizer, (str, dict)):
        inner_optimizer = keras.optimizers.get(inner_optimizer)
    if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "Argument `inner_optimizer` must be a keras.optimizers.Optimizer "
            "instance or an optimizer name such as 'adam'. Received: "
            f"inner_optimizer={inner_optimizer!r}"
        )
    if isinstance(inner_optimizer, (BNP, keras.optimizers.LossScaleOptimizer)):
        raise ValueError(
            "Argument `inner_optimizer` must be a plain optimizer (SGD, "
            f"Adam, ...), not a {type(inner_optimizer).__name__}. For mixed "
            "precision, compile with BNP and Keras wraps it in a "
            f"LossScaleOptimizer itself. Received: "
            f"inner_optimizer={inner_optimizer!r}"
        )
    # A schedule's config is a dict.
    rate = inner_optimizer.get_config().get("learning_rate")
    if not isinstance(rate, dict):
        _checked_learning_rate(rate, "inner_optimizer.learning_rate")
    return inner_optimizer


def _checked_learning_rate(learning_rate, name="learning_rate"):
    """`learning_rate` as a float, after checking that it is finite and
    >= 0 (a schedule or callable as it is)."""
    schedule = keras.optimizers.schedules.LearningRateSchedule
    if isinstance(learning_rate, schedule) or callable(learning_rate):
        return learning_rate
    value = _as_float(name, learning_rate)
    if not 0.0 <= value < math.inf:
        raise ValueError(
            f"`{name}` must be a finite float >= 0 (or a "
            "keras.optimizers.schedules.LearningRateSchedule), e.g. 0.01: "
            "BNP's step is a descent direction only with a positive "
            f"learning rate. Received: {name}={value}"
        )
    return value
