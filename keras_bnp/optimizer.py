"""`BNP`: preconditions layer gradients, then applies an inner optimizer."""

import math

import keras
import numpy as np

from keras_bnp import coverage
from keras_bnp import registry
from keras_bnp import rules
from keras_bnp import update
from keras_bnp.capture import called_layers
from keras_bnp.capture import capture_step
from keras_bnp.capture import missing_capture
from keras_bnp.state import SKIP_CAUSES
from keras_bnp.state import StatisticsState
from keras_bnp.state import variable_key

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


@keras.saving.register_keras_serializable(package="keras_bnp")
class BNP(StatisticsState, keras.optimizers.Optimizer):
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
            key=lambda v: (0, *order[variable_key(v)])
            if variable_key(v) in order else (1,)))

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
            raise RuntimeError(missing_capture(self._model and self._model()))
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
        # The blocks this BNP trains (not those of a second optimizer).
        owned = {layer: [block for block in rules.blocks(layer)
                         if variable_key(block.kernel) in self._slots]
                 for layer in step_inputs}
        step_inputs = {layer: inputs for layer, inputs in step_inputs.items()
                       if owned[layer]}
        called = called_layers(step_inputs, dict(self._step_nested))
        blocks = [block for layer in called for block in owned[layer]]
        if not blocks:
            self.inner_optimizer.apply(grads, trainable_variables)
            return
        slots = [self._slots[variable_key(block.kernel)] for block in blocks]
        update.precondition_and_apply(self, blocks, slots, step_inputs, grads,
                                      trainable_variables, weights,
                                      regularized)

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
