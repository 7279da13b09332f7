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


@pytest.mark.slow
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


class NoCall(keras_bnp.BNPMixin, keras.Model):
    """keras-io's VAE pattern: networks as attributes, a `train_step`, and
    no `call` (the model cannot be called on data)."""

    def __init__(self):
        super().__init__()
        self.net = keras.Sequential([keras.Input((FEATURES,)),
                                     keras.layers.Dense(3, activation="tanh"),
                                     keras.layers.Dense(FEATURES)])

    def train_step(self, data):
        x, y = data
        with self.bnp_capture():
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((self.net(x) - y) ** 2)
            grads = tape.gradient(loss, self.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return {"loss": loss}


def test_custom_step_skips_the_initial_scaling_and_says_so(capsys):
    model = NoCall()
    before = [w.copy() for w in model.get_weights()]
    model.compile(optimizer=keras_bnp.BNP(0.0))
    x = _data()
    model.fit(x, x, batch_size=16, epochs=1, shuffle=False, verbose=2)
    assert int(model.optimizer.iterations) == 4
    assert model.optimizer.initial_scales == {}
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, a)
    assert ("BNP: initial scaling skipped: NoCall has its own train_step, "
            "whose losses and calls the scaling cannot see; to scale, call "
            "keras_bnp.scale_to_unit_variance(network, inputs) on each "
            "functional network it calls, before fit.\n"
            ) in capsys.readouterr().out
    mean, _ = model.optimizer.layer_statistics(model.net.layers[0])
    assert_allclose(mean, _running_mean(x), rtol=1e-5, atol=1e-4)


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
        "`with self.bnp_capture(sample_weight):`")
    assert ("    def train_step(self, data):\n"
            "        x, y, sample_weight = "
            "keras.utils.unpack_x_y_sample_weight(data)\n"
            "        with self.bnp_capture(sample_weight):\n") in message
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


LATENT = 3


class GAN(keras_bnp.BNPMixin, keras.Model):
    """The keras-io DCGAN pattern: two optimizers set in an overridden
    `compile`, a `train_step` of its own with one `bnp_capture` per
    optimizer step. The latent vectors come with the data (`real, z for
    the discriminator's step, z for the generator's`), so that a test can
    recompute what each step saw."""

    def __init__(self):
        super().__init__()
        self.generator = keras.Sequential([
            keras.Input((LATENT,)), keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(FEATURES)], name="generator")
        self.discriminator = keras.Sequential([
            keras.Input((FEATURES,)), keras.layers.Dense(8),
            keras.layers.LeakyReLU(0.2), keras.layers.Dense(1)],
            name="discriminator")
        self.built = True  # its networks are (Keras saves built models)

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def train_step(self, data):
        real, z_d, z_g = data
        n = tf.shape(real)[0]
        with self.bnp_capture():
            fake = self.generator(z_d)
            labels = tf.concat([tf.ones((n, 1)), tf.zeros((n, 1))], 0)
            with tf.GradientTape() as tape:
                d_loss = self.loss_fn(labels, self.discriminator(
                    tf.concat([fake, real], 0)))
            weights = self.discriminator.trainable_weights
            self.d_optimizer.apply_gradients(
                zip(tape.gradient(d_loss, weights), weights))
        with self.bnp_capture():
            with tf.GradientTape() as tape:
                g_loss = self.loss_fn(tf.zeros((n, 1)), self.discriminator(
                    self.generator(z_g)))
            weights = self.generator.trainable_weights
            self.g_optimizer.apply_gradients(
                zip(tape.gradient(g_loss, weights), weights))
        return {"d_loss": d_loss, "g_loss": g_loss}


def _gan_data(steps=4, batch_size=16, seed=0):
    rng = np.random.default_rng(seed)
    n = steps * batch_size
    real = (rng.normal(size=(n, FEATURES)) * [1, 1e-3, 1e3, 1, 1, 1]
            + [40, -7, 2e3, 0, 0, 1]).astype("float32")
    z_d, z_g = (rng.normal(3.0, 2.0, size=(n, LATENT)).astype("float32")
                for _ in range(2))
    return real, z_d, z_g


def _gan(d_optimizer=None, g_optimizer=None):
    keras.utils.set_random_seed(0)
    gan = GAN()
    gan.compile(d_optimizer or keras_bnp.BNP(1e-3),
                g_optimizer or keras_bnp.BNP(1e-3))
    return gan


def _fit_gan(gan, data, epochs=1):
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(16)
    return gan.fit(dataset, epochs=epochs, shuffle=False, verbose=0)


@pytest.mark.slow
def test_gan_pattern_keeps_each_optimizers_statistics_of_its_own_steps():
    data = _gan_data()
    gan = _gan()
    _fit_gan(gan, data, epochs=2)
    d, g = gan.d_optimizer, gan.g_optimizer
    assert int(d.iterations) == int(g.iterations) == 8
    # The generator's first layer, for g_optimizer: the latent vectors of
    # the generator's steps only (not those the discriminator's step
    # generated from).
    mean, variance = g.layer_statistics(gan.generator.layers[0])
    z_g = np.concatenate([data[2]] * 2)
    assert_allclose(mean, _running_mean(z_g), rtol=1e-5, atol=1e-5)
    # Each optimizer keeps statistics of the layers it trains only.
    with pytest.raises(ValueError, match="BNP has no statistics for layer"):
        d.layer_statistics(gan.generator.layers[0])
    with pytest.raises(ValueError, match="BNP has no statistics for layer"):
        g.layer_statistics(gan.discriminator.layers[0])
    assert sorted(row["layer"] for row in d.statistics_summary()) == sorted(
        layer.name for layer in gan.discriminator.layers[::2])
    assert sorted(row["layer"] for row in g.statistics_summary()) == sorted(
        layer.name for layer in gan.generator.layers)


@pytest.mark.slow
def test_gan_pattern_warns_about_non_finite_inputs_for_its_optimizers():
    real, z_d, z_g = _gan_data()
    real[-5, 0] = np.nan  # in the last step
    gan = _gan()
    with pytest.warns(UserWarning, match=(
            f"BNP '{gan.d_optimizer.name}' skipped 2 statistics update")):
        _fit_gan(gan, (real, z_d, z_g))
    # The discriminator's two Dense layers, once (its first has no
    # activation: oneDNN's fused matmul and relu may turn a NaN into 0).
    assert gan.d_optimizer.skipped_statistics_updates_by_cause == {
        "non_finite_input": 2, "overflow": 0}
    assert gan.g_optimizer.skipped_statistics_updates == 0


@pytest.mark.slow
def test_gan_pattern_saves_loads_and_resumes_bit_identically(tmp_path):
    data = _gan_data()
    gan = _gan()
    _fit_gan(gan, data)
    path = str(tmp_path / "gan.weights.h5")
    gan.save_weights(path)

    fresh = _gan()
    with pytest.raises(ValueError, match=(
            r"is not built, so it cannot take the saved state in '.*"
            r"gan.weights.h5'.*gan.d_optimizer.build\(gan.discriminator."
            r"trainable_variables\)")):
        fresh.load_weights(path)

    fresh = _gan()
    fresh.d_optimizer.build(fresh.discriminator.trainable_variables)
    fresh.g_optimizer.build(fresh.generator.trainable_variables)
    fresh.load_weights(path)
    for a, b in zip(gan.d_optimizer.variables + gan.g_optimizer.variables,
                    fresh.d_optimizer.variables + fresh.g_optimizer.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    more = _gan_data(seed=1)
    _fit_gan(gan, more)
    _fit_gan(fresh, more)
    for a, b in zip(gan.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(b, a)
    for a, b in zip(gan.d_optimizer.variables + gan.g_optimizer.variables,
                    fresh.d_optimizer.variables + fresh.g_optimizer.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
