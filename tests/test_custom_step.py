"""Models with their own `train_step`: `BNPMixin.bnp_capture` and the
error that names it."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import shifted_inputs

import keras_bnp
from keras_bnp import registry

FEATURES = 6


class AutoEncoder(keras_bnp.BNPMixin, keras.Model):
    """Keras' own `train_step`, with `loss="mse"`."""

    def __init__(self):
        super().__init__()
        self.encoder = keras.layers.Dense(3, activation="tanh")
        self.decoder = keras.layers.Dense(FEATURES)

    def call(self, x):
        return self.decoder(self.encoder(x))


class CustomStep(AutoEncoder):
    """The same loss in a `train_step` of its own, in the keras-io
    pattern; `capture=False` leaves `bnp_capture` out."""

    def __init__(self, capture=True):
        super().__init__()
        self.capture = capture
        self.tracker = keras.metrics.Mean(name="loss")

    def train_step(self, data):
        x, y = data
        with self.bnp_capture() if self.capture else contextlib.nullcontext():
            with tf.GradientTape() as tape:
                prediction = keras.ops.cast(self(x), "float32")
                loss = keras.ops.mean((prediction - y) ** 2)
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, self.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


def _data():
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (64, FEATURES))
    # Features far from zero, one nearly constant, one huge.
    return x * [1, 1, 1e-3, 1e3, 1, 1] + [40, 0, -7, 2e3, 0, 1]


def _running_mean(x, batch_size=16, momentum=0.99):
    """BNP's running mean after one step per batch of `x`, in order: the
    batch means weighted by `momentum ** (steps after)`."""
    batch_means = x.astype("float64").reshape(
        -1, batch_size, x.shape[-1]).mean(axis=1)
    weights = momentum ** np.arange(len(batch_means))[::-1]
    return weights @ batch_means / weights.sum()


def _fit(model, x, optimizer, epochs=3, **compile_args):
    model.compile(optimizer=optimizer, **compile_args)
    return model.fit(x, x, batch_size=16, epochs=epochs, shuffle=False,
                     verbose=0)


def test_custom_step_with_bnp_capture_trains_as_the_mixins_step():
    x = _data()
    models = []
    for model_class, compile_args in ((AutoEncoder, {"loss": "mse"}),
                                      (CustomStep, {})):
        keras.utils.set_random_seed(0)
        model = model_class()
        _fit(model, x, keras_bnp.BNP(1e-3), **compile_args)
        models.append(model)
    stock, custom = models
    for a, b in zip(stock.get_weights(), custom.get_weights()):
        assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    for a, b in zip(stock.optimizer.variables, custom.optimizer.variables):
        assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    assert int(custom.optimizer.iterations) == 12
    mean, _ = custom.optimizer.layer_statistics(custom.encoder)
    assert_allclose(mean, _running_mean(np.concatenate([x] * 3)), rtol=1e-5,
                    atol=1e-4)


def test_custom_step_without_capture_gets_an_error_with_the_fix():
    model = CustomStep(capture=False)
    with pytest.raises(RuntimeError) as error:
        _fit(model, _data(), keras_bnp.BNP(1e-3), epochs=1)
    message = str(error.value)
    assert message.startswith(
        f"Model '{model.name}' (CustomStep) has BNPMixin but overrides "
        "`train_step`, so BNPMixin's training step, which records the "
        "inputs of the model's preconditioned layers for BNP, does not "
        "run. Run the forward pass and `apply_gradients` of your "
        "`train_step` inside "
        "`with self.bnp_capture():`")
    assert ("    def train_step(self, data):\n"
            "        with self.bnp_capture():\n") in message
    assert message.endswith("or return `super().train_step(data)` from it.")


def test_bnp_capture_does_nothing_with_another_optimizer(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("layer inputs were captured")

    monkeypatch.setattr(registry, "capture_inputs", fail)
    history = _fit(CustomStep(), _data(), keras.optimizers.Adam(0.01),
                   epochs=5)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_bnp_capture_finds_bnp_inside_a_loss_scale_optimizer(mixed_float16):
    x = shifted_inputs(np.random.default_rng(0), (64, FEATURES)) + 40
    model = CustomStep()
    _fit(model, x, keras_bnp.BNP(1e-3, initial_scaling=False), epochs=1)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    bnp = keras_bnp.optimizer.find_bnp(model.optimizer)
    # The loss scale starts high: the steps whose float16 gradients overflow
    # are skipped (the first ones), statistics included. The encoder sees
    # the inputs rounded to float16.
    applied = int(bnp.iterations)
    assert 1 <= applied < 4
    mean, _ = bnp.layer_statistics(model.encoder)
    assert_allclose(mean, _running_mean(x.astype("float16")[-16 * applied:]),
                    rtol=1e-5, atol=1e-4)
