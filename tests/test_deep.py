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
from keras_bnp import _reference
from keras_bnp import experiment
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


def _residual_model():
    """A functional model with a residual add and a layer called twice."""
    inputs = keras.Input((6, 6, 2))
    stem = keras.layers.Conv2D(4, 3, padding="same", name="stem")
    x = keras.layers.ReLU()(stem(inputs))
    y = keras.layers.Conv2D(4, 3, padding="same", name="branch")(x)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    shared = keras.layers.Dense(4, activation="relu", name="shared")
    first_call = shared(keras.layers.GlobalAveragePooling2D()(x))
    outputs = keras.layers.Dense(3, name="out")(shared(first_call))
    return keras_bnp.BNPModel(inputs, outputs), first_call


def test_scale_to_unit_variance_gives_unit_output_variances():
    model, first_call = _residual_model()
    rng = np.random.default_rng(0)
    x = (1000.0 + 5.0 * rng.normal(size=(64, 6, 6, 2))).astype("float32")
    before = {layer.name: [w.numpy() for w in layer.weights]
              for layer in registry.supported_layers(model)}
    scales = keras_bnp.scale_to_unit_variance(model, x, target_variance=2.0)
    assert list(scales) == ["stem", "branch", "shared", "out"]
    for layer in registry.supported_layers(model):
        for weight, old in zip(layer.weights, before[layer.name]):
            assert_allclose(weight, scales[layer.name] * old, rtol=1e-6)
    # Measured independently: each layer's output on x, through a model cut
    # at that layer (the shared layer at its first call), has variance 2.
    for name in ("stem", "branch", "out"):
        outputs = keras.Model(model.inputs[0],
                              model.get_layer(name).output)(x).numpy()
        assert_allclose(np.var(outputs.astype("float64")), 2.0, rtol=1e-4)
    outputs = keras.Model(model.inputs[0], first_call)(x).numpy()
    assert_allclose(np.var(outputs.astype("float64")), 2.0, rtol=1e-4)


def _fit_without_steps(optimizer, x, y, **kwargs):
    """`fit` with a learning rate of 0: only the initial scaling can change
    the weights. Returns the weights before and after."""
    keras.utils.set_random_seed(0)
    model = keras_bnp.BNPSequential([
        keras.Input((784,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=optimizer, loss=logits_loss())
    before = [w.numpy() for w in model.weights]
    model.fit(x, y, verbose=0, **kwargs)
    return model, before


def test_first_fit_scales_the_layers_once():
    x, y = _digits(512)
    model, before = _fit_without_steps(keras_bnp.BNP(0.0), x, y,
                                       batch_size=32)
    scales = model.optimizer.initial_scales
    assert list(scales) == ["dense", "dense_1", "dense_2"]
    for layer, (kernel, bias) in zip(model.layers, zip(*[iter(before)] * 2)):
        assert_allclose(layer.kernel, scales[layer.name] * kernel, rtol=1e-6)
        assert_allclose(layer.bias, scales[layer.name] * bias, rtol=1e-6)
    # On the first 256 examples, every layer's output has unit variance.
    probe = x[:256]
    for layer in model.layers:
        outputs = keras.Model(model.inputs[0], layer.output)(probe).numpy()
        assert_allclose(np.var(outputs.astype("float64")), 1.0, rtol=1e-4)
    # A second fit (the optimizer has taken steps) leaves them alone.
    scaled = [w.numpy() for w in model.weights]
    model.fit(x, y, batch_size=32, verbose=0)
    for weight, want in zip(model.weights, scaled):
        assert_allclose(weight, want, atol=0, rtol=0)


def test_initial_scaling_off_keeps_the_weights():
    x, y = _digits(128)
    model, before = _fit_without_steps(
        keras_bnp.BNP(0.0, initial_scaling=False), x, y, batch_size=32)
    assert model.optimizer.initial_scales == {}
    for weight, want in zip(model.weights, before):
        assert_allclose(weight, want, atol=0, rtol=0)


def test_initial_scaling_reads_the_first_batch_of_a_dataset():
    x, y = _digits(256)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    model, _ = _fit_without_steps(keras_bnp.BNP(0.0), dataset, None,
                                  shuffle=False)
    outputs = keras.Model(model.inputs[0], model.layers[-1].output)(x[:64])
    assert_allclose(np.var(outputs.numpy().astype("float64")), 1.0,
                    rtol=1e-4)


def test_initial_scaling_from_a_generator_says_what_to_do():
    x, y = _digits(64)

    def batches():
        while True:
            yield x[:32], y[:32]

    with pytest.raises(ValueError, match=(
            r"cannot be read from a generator without consuming it\. Call "
            r"`keras_bnp\.scale_to_unit_variance\(model, x_batch\)`")):
        _fit_without_steps(keras_bnp.BNP(0.0), batches(), None,
                           steps_per_epoch=2)


@pytest.mark.parametrize("argument", ["relative_epsilon", "initial_scaling"])
def test_switches_must_be_booleans(argument):
    with pytest.raises(ValueError, match=(
            f"Argument `{argument}` must be True or False. "
            f"Received: {argument}='no'")):
        keras_bnp.BNP(**{argument: "no"})
