"""`BNPMixin`: the training step that feeds layer inputs to `BNP`."""

import contextlib
import warnings

import keras

from keras_bnp import coverage
from keras_bnp import initialization
from keras_bnp.callbacks import NonFiniteInputWarning
from keras_bnp.optimizer import find_bnp

# Positions of `verbose` and `callbacks` among `Model.fit`'s positional
# parameters.
_FIT_VERBOSE_POSITION = 4
_FIT_CALLBACKS_POSITION = 5
# How many examples of `fit`'s data the initial scaling measures.
_INITIAL_SCALING_EXAMPLES = 256


class BNPMixin:
    """Lets a Keras model train with the `BNP` optimizer.

    Put it first among the bases: `class Net(BNPMixin, keras.Model)`. The
    training step is `train_step`, overridden only to record the inputs of
    the model's preconditioned layers during the forward pass; loss, metrics and
    the optimizer call are Keras' own `train_step`. A model with its own
    `train_step` wraps its forward pass and `apply_gradients` in
    `with self.bnp_capture():`. Besides, it creates
    BNP's state before it is needed (`make_train_function`,
    `compile_from_config` and `load_weights`, so that training under a
    distribution strategy and every kind of restore find it), and `fit`
    adds a callback that warns about NaN/Inf inputs. It never overrides
    `compile`. `evaluate` and `predict` are untouched. With an optimizer
    other than `BNP` the model trains exactly as without the mixin.

    Do not subclass a class that was also used as `BNPModel(inputs,
    outputs)`: Keras rewrites the bases of such a class to `Functional`.
    """

    def train_step(self, data):
        with self.bnp_capture():
            return super().train_step(data)

    @contextlib.contextmanager
    def bnp_capture(self):
        """Records, for one training step, the layer inputs that `BNP`
        needs; nothing when the model's optimizer is not (or does not wrap)
        a `BNP`. A model that overrides `train_step` runs its forward pass
        and `apply_gradients` inside `with self.bnp_capture():`."""
        bnp = find_bnp(getattr(self, "optimizer", None))
        if bnp is None:
            yield
            return
        with bnp.capture(self):
            yield

    def fit(self, *args, **kwargs):
        # Scales the initial weights (BNP's `initial_scaling`), and adds
        # callbacks that report what BNP preconditions (at the start of a
        # fresh BNP's first fit) and warn (once, at an epoch end) if BNP
        # skipped statistics updates on NaN/Inf inputs; everything else is
        # Keras'.
        bnp = find_bnp(getattr(self, "optimizer", None))
        if bnp is not None:
            x = args[0] if args else kwargs.get("x")
            verbose = (args[_FIT_VERBOSE_POSITION]
                       if len(args) > _FIT_VERBOSE_POSITION
                       else kwargs.get("verbose", "auto"))
            self._initial_scaling(bnp, x, print if verbose != 0 else None)
            added = [_CoverageReport(bnp, verbose), NonFiniteInputWarning()]
            if len(args) > _FIT_CALLBACKS_POSITION:
                args = list(args)
                args[_FIT_CALLBACKS_POSITION] = _with(
                    args[_FIT_CALLBACKS_POSITION], added)
            else:
                kwargs["callbacks"] = _with(kwargs.get("callbacks"), added)
        return super().fit(*args, **kwargs)

    def _initial_scaling(self, bnp, x, print_fn):
        """Before a fresh BNP's first step, scales the preconditioned
        layers to unit output variance on the first examples of `x`."""
        if not bnp.initial_scaling or int(bnp.iterations.numpy()) > 0:
            return
        inputs = initialization.first_batch(x, _INITIAL_SCALING_EXAMPLES)
        if inputs is None:
            raise ValueError(
                "BNP(initial_scaling=True) scales the layers on the first "
                "examples of `fit`'s data, which cannot be read from a "
                f"{type(x).__name__} without consuming it. Call "
                "`keras_bnp.scale_to_unit_variance(model, x_batch)` before "
                "`fit` and compile with `BNP(..., initial_scaling=False)`, "
                "or pass arrays, a tf.data.Dataset or a PyDataset."
            )
        with self.distribute_strategy.scope():
            scales = initialization.scale_to_unit_variance(self, inputs)
        bnp.initial_scales = scales
        if print_fn is not None and scales:
            print_fn(
                f"BNP: scaled {len(scales)} layers to unit output variance "
                "before the first step (factors "
                f"{min(scales.values()):.3g} to {max(scales.values()):.3g}); "
                "pass BNP(initial_scaling=False) to keep the weights as "
                "they are."
            )

    def make_train_function(self, force=False):
        self._build_bnp_state()
        return super().make_train_function(force=force)

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
        if bnp is None or not self.built:
            return
        with self.distribute_strategy.scope():
            if not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)
            bnp.track(self)


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
