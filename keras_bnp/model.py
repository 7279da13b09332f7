"""`BNPMixin`: the training step that feeds layer inputs to `BNP`."""

import contextlib
import dataclasses
import inspect
import itertools
import warnings

import keras
import tensorflow as tf

from keras_bnp import coverage
from keras_bnp import initialization
from keras_bnp.callbacks import StatisticsWarnings
from keras_bnp.capture import capture_step
from keras_bnp.optimizer import attached
from keras_bnp.optimizer import find_bnp

_FIT = inspect.signature(keras.Model.fit)


class BNPMixin:
    """Lets a Keras model train with the `BNP` optimizer.

    Put it first among the bases: `class Net(BNPMixin, keras.Model)`. The
    training step is `train_step`, overridden only to record the inputs of
    the model's preconditioned layers during the forward pass; loss, metrics and
    the optimizer call are Keras' own `train_step`; the step's sample
    weights (from `sample_weight` or `class_weight`) weigh the
    statistics as they weigh the loss. A model with its own `train_step`
    wraps its forward pass and `apply_gradients` in
    `with self.bnp_capture(sample_weight):`. Besides, it creates
    BNP's state before it is needed (`make_train_function`,
    `compile_from_config` and `load_weights`, so that training under a
    distribution strategy and every kind of restore find it), and `fit`
    adds a callback that warns about NaN/Inf inputs (for every BNP the
    model holds, see `bnp_capture`). It never overrides
    `compile`. `evaluate` and `predict` are untouched. With an optimizer
    other than `BNP` the model trains exactly as without the mixin.

    Do not subclass a class that was also used as `BNPModel(inputs,
    outputs)`: Keras rewrites the bases of such a class to `Functional`.
    """

    def train_step(self, data):
        _, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # Keras' `compute_loss` adds the regularization penalties.
        with self.bnp_capture(sample_weight, regularized=True):
            return super().train_step(data)

    @contextlib.contextmanager
    def bnp_capture(self, sample_weight=None, regularized=False):
        """Records, for one training step, the layer inputs that `BNP`
        needs, weighted by `sample_weight`: for the model's optimizer and
        for each optimizer the model holds as an attribute (a GAN's
        `d_optimizer` and `g_optimizer`) that is a BNP; each keeps the
        statistics of the layers whose kernels it trains. Nothing without
        a BNP. A model that overrides `train_step` runs its forward pass and
        `apply_gradients` inside `with self.bnp_capture(sample_weight):`,
        one `with` per optimizer step; with `regularized=True` if its loss
        adds `self.losses` (see `BNP.capture`)."""
        bnps = attached(self)
        if not bnps:
            yield
            return
        with capture_step(self, bnps, sample_weight, regularized):
            yield

    def fit(self, *args, **kwargs):
        # Arranges BNP's initial scaling for the first step, and adds
        # callbacks that report what BNP preconditions (at the start of a
        # fresh BNP's first fit) and warn (at an epoch end) about
        # statistics it could not use; everything else is Keras'.
        bnps = attached(self)
        if not bnps:
            return super().fit(*args, **kwargs)
        bnp = find_bnp(getattr(self, "optimizer", None))
        arguments = _FIT.bind(self, *args, **kwargs).arguments
        del arguments["self"]
        verbose = arguments.get("verbose", "auto")
        added = [StatisticsWarnings(bnps)]
        if bnp is not None:
            added.insert(0, _CoverageReport(bnp, verbose))
        if (bnp is not None and bnp.initial_scaling
                and int(bnp.iterations.numpy()) == 0):
            self.__dict__["_bnp_scaling"] = _Scaling(
                bnp, verbose != 0, initialization.fit_batch(
                    arguments.get("x"), arguments.get("y"),
                    arguments.get("sample_weight"),
                    arguments.get("class_weight")))
        arguments["callbacks"] = _with(arguments.get("callbacks"), added)
        try:
            return super().fit(**arguments)
        finally:
            self.__dict__.pop("_bnp_scaling", None)

    def make_train_function(self, force=False):
        self._build_bnp_state()
        super().make_train_function(force=force)
        scaling = self.__dict__.pop("_bnp_scaling", None)
        if scaling is not None:
            # The first call scales the layers on the data of the first
            # step (or the first examples of `fit`'s arrays), then trains
            # on that same data: nothing of the user's data is consumed.
            train_function = self.train_function

            def first_call(iterator):
                self.train_function = train_function
                if scaling.batch is not None:
                    self._scale_initially(scaling, *scaling.batch)
                    return train_function(iterator)
                data = next(iterator)
                x, _, weights = keras.utils.unpack_x_y_sample_weight(
                    _local(data, self.distribute_strategy))
                self._scale_initially(scaling, x, weights)
                return train_function(itertools.chain([data], iterator))

            self.train_function = first_call
        return self.train_function

    def _scale_initially(self, scaling, x, sample_weight):
        """BNP's `initial_scaling` on `x`, with its one line printed when
        `fit` is verbose."""
        with self.distribute_strategy.scope():
            if not self.built and type(self).call is not keras.Model.call:
                # Keras builds a model without a strategy in the first
                # step's trace; built here, BNP tracks its layers before
                # that step.
                self(initialization.as_tensors(x), training=False)
                self._build_bnp_state()
            if type(self).train_step is BNPMixin.train_step:
                scales, line = initialization.initial_scaling(
                    self, x, sample_weight)
            else:
                scales, line = {}, (
                    f"BNP: initial scaling skipped: {type(self).__name__} "
                    "has its own train_step, whose losses and calls the "
                    "scaling cannot see; to scale, call keras_bnp."
                    "scale_to_unit_variance(network, inputs) on each "
                    "functional network it calls, before fit.")
        scaling.bnp.initial_scales = scales
        if scaling.verbose:
            print(line)

    def compile_from_config(self, config):
        super().compile_from_config(config)
        self._build_bnp_state()

    def load_weights(self, filepath, *args, **kwargs):
        self._build_bnp_state()
        return super().load_weights(filepath, *args, **kwargs)

    def _build_bnp_state(self):
        """Builds the optimizer and the statistics of every built layer.

        Restoring (`load_model`, `load_weights`, `BackupAndRestore`) needs
        them to exist before the saved values are assigned; creating them
        here, outside the traced step and under the model's distribution
        strategy, also keeps variable creation out of the step.
        """
        bnp = find_bnp(getattr(self, "optimizer", None))
        with self.distribute_strategy.scope():
            if bnp is not None and self.built and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)
            # The others (a GAN's) once built with their variables.
            for other in attached(self):
                if other.built:
                    other.track(self)


@dataclasses.dataclass
class _Scaling:
    """A pending initial scaling: the optimizer, whether to print its line,
    and `fit`'s first examples `(x, sample_weight)` (`None`: the first
    step's batch)."""

    bnp: object
    verbose: bool
    batch: tuple = None


def _local(data, strategy):
    """`data` with each distributed value's replicas concatenated."""
    parts = strategy.experimental_local_results(data)
    return tf.nest.map_structure(lambda *values: tf.concat(values, 0),
                                 *parts) if len(parts) > 1 else parts[0]


def _with(callbacks, added):
    if isinstance(callbacks, keras.callbacks.CallbackList):
        for callback in added:
            callbacks.append(callback)
        return callbacks
    return list(callbacks or []) + added


class _CoverageReport(keras.callbacks.Callback):
    """At the start of a fresh BNP's first `fit`, once the model is built,
    prints the share BNP preconditions (unless `verbose=0`) and warns with
    a `CoverageWarning` when more than `coverage.WARNING_SHARE` of the
    trainable kernel parameters is left to the inner optimizer."""

    def __init__(self, bnp, verbose):
        super().__init__()
        self.bnp = bnp
        self.verbose = verbose

    def on_train_begin(self, logs=None):
        if (self.bnp.__dict__.get("_coverage_reported")
                or int(self.bnp.iterations.numpy()) > 0):
            return
        self.bnp.__dict__["_coverage_reported"] = True
        result = coverage.coverage(self.model)
        if self.verbose != 0:
            print(result.line())
        message = result.warning()
        if message is not None:
            warnings.warn(message, coverage.CoverageWarning, stacklevel=2)


@keras.saving.register_keras_serializable(package="keras_bnp")
class BNPModel(BNPMixin, keras.Model):
    """A functional `keras.Model` that trains with `BNP`:
    `BNPModel(inputs, outputs)`. Wrap an existing functional model (e.g. from
    `keras.applications`) as `BNPModel(base.inputs, base.outputs)`."""


@keras.saving.register_keras_serializable(package="keras_bnp")
class BNPSequential(BNPMixin, keras.Sequential):
    """A `keras.Sequential` that trains with `BNP`."""
