"""BNP's defaults on deep networks: the relative damping and the initial
scaling, against NumPy references and the behaviour that motivated them."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import logits_loss

import keras_bnp
from benchmarks import experiment
from keras_bnp import _reference
from keras_bnp import registry
from keras_bnp.data import load_mnist


def _digits(count, task="deep_mlp"):
    (x, y), _ = load_mnist()
    return (x[:count].reshape(-1, *experiment.input_shape(task)),
            y[:count].astype("int32"))


def _deepest_dense_update(optimizer):
    """One step of the 8x256 MLP (Keras' default initializers) on 64 digits
    with `optimizer` in a custom loop (no initial scaling): the change of
    the last hidden layer's kernel, that layer's input, and its gradients."""
    model = experiment.build_model("deep_mlp")
    layer = registry.supported_layers(model)[-2]
    x, y = _digits(64)
    inputs = keras.Model(model.inputs[0], layer.input)(x).numpy()
    before = layer.kernel.numpy()
    is_bnp = isinstance(optimizer, keras_bnp.BNP)
    with optimizer.capture(model) if is_bnp else contextlib.nullcontext():
        with tf.GradientTape(persistent=True) as tape:
            loss = logits_loss()(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
    grads = tape.gradient(loss, [layer.kernel, layer.bias])
    return layer.kernel.numpy() - before, inputs, [g.numpy() for g in grads]


def test_default_update_preconditions_deep_layers_with_tiny_variances():
    learning_rate = 0.01
    bnp_step, inputs, (grad_kernel, grad_bias) = _deepest_dense_update(
        keras_bnp.BNP(learning_rate, momentum=0.0, statistics_momentum=0.0))
    sgd_step, _, _ = _deepest_dense_update(
        keras.optimizers.SGD(learning_rate))
    # The situation: Glorot-initialized ReLU layers shrink the signal, so
    # this layer's inputs have a mean variance far below 1.
    mean, variance = inputs.mean(axis=0), inputs.var(axis=0)
    assert variance.mean() < 1e-3
    # BNP's step is the NumPy reference's, with the damping relative to the
    # mean input variance ...
    want, _ = _reference.precondition(
        grad_kernel, grad_bias, mean, variance,
        _reference.damping(mean, variance, 3.0))
    assert_allclose(bnp_step, -learning_rate * want,
                    atol=1e-4 * np.abs(want).max() * learning_rate, rtol=1e-3)
    # ... and so it is larger than SGD's by orders of magnitude, not equal.
    ratio = np.linalg.norm(bnp_step) / np.linalg.norm(sgd_step)
    assert ratio > 100


def test_absolute_epsilon_leaves_deep_layers_at_sgd_scale():
    # The failure the relative damping fixes: with an absolute epsilon of 1
    # (in the units of the inputs' variance), the deep layer's gradient is
    # only centred, not scaled, and its step stays at SGD's size.
    learning_rate = 0.01
    bnp_step, inputs, (grad_kernel, grad_bias) = _deepest_dense_update(
        keras_bnp.BNP(learning_rate, momentum=0.0, statistics_momentum=0.0,
                      epsilon=1.0, relative_epsilon=False))
    sgd_step, _, _ = _deepest_dense_update(
        keras.optimizers.SGD(learning_rate))
    want, _ = _reference.precondition(
        grad_kernel, grad_bias, inputs.mean(axis=0), inputs.var(axis=0), 1.0)
    # Steps of about 1e-7 on weights of about 0.1: float32 rounding of the
    # weights (6e-9) dominates.
    assert_allclose(bnp_step, -learning_rate * want, atol=3e-8, rtol=1e-3)
    ratio = np.linalg.norm(bnp_step) / np.linalg.norm(sgd_step)
    assert 0.2 < ratio < 1.0


@pytest.mark.parametrize("argument", ["relative_epsilon", "initial_scaling"])
def test_switches_must_be_booleans(argument):
    with pytest.raises(ValueError, match=(
            f"Argument `{argument}` must be True or False. "
            f"Received: {argument}='no'")):
        keras_bnp.BNP(**{argument: "no"})
