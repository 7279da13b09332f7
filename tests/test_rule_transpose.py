"""The rule for transposed convolutions (`rules.ConvTransposeRule`): its
premise, and a VAE. Its many-step reference tests are rows of
`test_reference.py`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose

import keras_bnp
from benchmarks import coverage as coverage_models
from keras_bnp import rules

T1, T2 = keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose


@pytest.mark.parametrize("kernel_size,padding", [(3, "valid"), (4, "same")])
def test_mean_term_is_constant_in_the_interior_only_at_stride_1(
        kernel_size, padding):
    # The derivation's premise: a constant input mu gives, away from the
    # borders, sum_{k,c} mu_c W[k, o, c] at stride 1, but at stride 2 a
    # pattern of period 2 (each output position gets the taps of its phase
    # only), so no bias can absorb it; its mean over the positions, which
    # the bias takes, is that sum / 2 (kernel 3 or 4 splits into two
    # phases).
    mean = np.array([40.0, -3.0], "float32")
    x = np.broadcast_to(mean, (1, 12, 2))
    for strides in (1, 2):
        layer = T1(2, kernel_size, strides=strides, padding=padding,
                   use_bias=False)
        interior = layer(x).numpy()[0, kernel_size:-kernel_size]
        all_taps = np.einsum("koc,c->o", layer.kernel.numpy(), mean)
        if strides == 1:
            assert_allclose(interior, np.broadcast_to(all_taps, interior.shape),
                            atol=1e-4, rtol=1e-5)
        else:
            even, odd = interior[0::2], interior[1::2]
            assert_allclose(even, np.broadcast_to(even[0], even.shape),
                            atol=1e-4, rtol=1e-5)
            assert_allclose(odd, np.broadcast_to(odd[0], odd.shape),
                            atol=1e-4, rtol=1e-5)
            assert_allclose((even[0] + odd[0]) / 2, all_taps / 2, atol=1e-4,
                            rtol=1e-5)
            assert np.abs(even[0] - odd[0]).min() > 1e-2


class VAE(keras_bnp.BNPMixin, keras.Model):
    """The keras-io VAE (`benchmarks.coverage.vae`) with its custom
    `train_step`, inside BNP's capture."""

    def __init__(self, filters=(8, 16), **kwargs):
        super().__init__(**kwargs)
        parts = coverage_models.vae(filters=filters)
        self.encoder = parts.get_layer("encoder")
        self.decoder = parts.get_layer("decoder")

    def call(self, images):
        return self.decoder(self.encoder(images)[2])

    def train_step(self, images):
        with self.optimizer.capture(self):
            with tf.GradientTape() as tape:
                loss = self.loss_of(images)
            grads = tape.gradient(loss, self.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return {"loss": loss}

    def loss_of(self, images):
        """The negative ELBO: reconstruction cross-entropy plus KL."""
        z_mean, z_log_var, z = self.encoder(images)
        reconstruction = keras.ops.sum(keras.losses.binary_crossentropy(
            images, self.decoder(z)), axis=(1, 2))
        kl = -0.5 * keras.ops.sum(
            1 + z_log_var - z_mean**2 - keras.ops.exp(z_log_var), axis=1)
        return keras.ops.mean(reconstruction + kl)


@pytest.mark.slow
def test_vae_trains_with_every_kernel_preconditioned():
    # The keras-io VAE pattern: a custom train_step inside BNP's capture;
    # every kernel has a rule, and the decoder's transposed convolutions
    # have statistics after `fit`.
    model = VAE()
    model.compile(optimizer=keras_bnp.BNP(1e-3))
    rng = np.random.default_rng(0)
    images = (rng.uniform(size=(32, 28, 28, 1)) < 0.2).astype("float32")
    history = model.fit(images, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    kernels = {id(v) for layer in model._flatten_layers()
               for v in layer.trainable_weights if "kernel" in v.path}
    covered = {id(block.kernel) for layer in model._flatten_layers()
               for block in rules.blocks(layer)}
    assert covered == kernels
    for layer in model.decoder.layers:
        if isinstance(layer, T2):
            _, variance = model.optimizer.layer_statistics(layer)
            assert variance.shape == (layer.kernel.shape[-1],)
            assert np.all(np.isfinite(variance)) and np.all(variance > 0)
