"""Depthwise and separable convolutions: the NumPy convolutions against
Keras', the separable call in two steps, `fit` and resume. Their many-step
reference tests are rows of `test_reference.py`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import channel_offset_inputs
from helpers import depthwise_of
from test_reference import ROWS
from test_reference import depthwise
from test_reference import separable

import keras_bnp
from keras_bnp import rules

# The rows of the reference table (`test_reference.py`) of each kind.
DEPTHWISE = sorted(n for n, row in ROWS.items() if row[3] is depthwise)
SEPARABLE = sorted(n for n, row in ROWS.items() if row[3] is separable)


def _axis(layer):
    return 1 if layer.data_format == "channels_first" else -1


def _pointwise(layer, y, kernel, bias):
    """The reference pointwise convolution (and bias) of `layer`."""
    out = np.moveaxis(y, _axis(layer), -1) @ kernel.reshape(
        kernel.shape[-2:])
    return np.moveaxis(out + (0.0 if bias is None else bias), -1,
                       _axis(layer))


@pytest.mark.parametrize("name", DEPTHWISE + SEPARABLE)
def test_reference_convolutions_match_keras(name):
    factory, input_shape, inputs, _ = ROWS[name]
    layer = factory()
    x = inputs(np.random.default_rng(1), (2, *input_shape))
    outputs = layer(x)
    weights = [w.numpy() for w in layer.weights]
    if name in DEPTHWISE:
        want = depthwise_of(layer, x, weights[0]) + (
            _bias(layer, weights[1]) if layer.use_bias else 0.0)
    else:
        want = _pointwise(layer, depthwise_of(layer, x, weights[0]),
                          weights[1], weights[2] if layer.use_bias else None)
    assert_allclose(outputs, want, atol=1e-5 * np.abs(want).max())


def _bias(layer, bias):
    shape = [1] * (layer.rank + 2)
    shape[_axis(layer)] = -1
    return bias.reshape(shape)


@pytest.mark.parametrize("name", SEPARABLE)
def test_separable_call_in_two_steps_equals_layer_call(name):
    factory, input_shape, inputs, _ = ROWS[name]
    layer = factory()
    layer.activation = keras.activations.relu
    x = tf.constant(inputs(np.random.default_rng(2), (3, *input_shape)))
    records = []
    rule = rules.rule_for(layer)
    want = layer(x)
    outputs = tf.function(
        lambda x: rule.record(layer, layer.call, (x,), {}, records))(x)
    assert_allclose(outputs, want, atol=1e-6 * np.abs(want).max())


def test_separable_subclass_with_own_call_keeps_its_call():
    class Doubled(keras.layers.SeparableConv2D):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    layer = Doubled(3, 2)
    x = channel_offset_inputs(np.random.default_rng(3), (2, 4, 4, 2))
    want = layer(x)
    records = []
    outputs = rules.rule_for(layer).record(
        layer, layer.call, (tf.constant(x),), {}, records)
    assert_allclose(outputs, want)
    assert_allclose(records[0][1],
                    depthwise_of(layer, x, layer.depthwise_kernel.numpy()),
                    atol=1e-5)


def _small_model():
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.DepthwiseConv2D(
        3, depth_multiplier=2, activation="relu", name="depthwise")(inputs)
    hidden = keras.layers.SeparableConv2D(
        4, 3, activation="relu", name="separable")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras_bnp.BNPModel(inputs, keras.layers.Dense(3)(hidden))


def test_initial_scaling_scales_pointwise_kernel_and_bias():
    model = _small_model()
    rng = np.random.default_rng(5)
    x = channel_offset_inputs(rng, (32, 8, 8, 3))
    model(x)
    separable = model.get_layer("separable")
    separable.bias.assign(rng.normal(size=4))
    before = [w.numpy() for w in separable.weights]
    scales = keras_bnp.scale_to_unit_variance(model, x)
    depthwise, pointwise, _ = (w.numpy() for w in separable.weights)
    scale = scales["separable"]
    assert abs(scale - 1.0) > 0.1
    assert_allclose(depthwise, before[0], atol=0)
    assert_allclose(pointwise, scale * before[1])
    # Each layer's pre-activations (Keras' own call, activation removed):
    # mean variance 1, each channel's mean within its standard deviation.
    for name in ("depthwise", "separable"):
        layer = model.get_layer(name)
        inputs = keras.Model(model.input, layer.input)(x)
        activation, layer.activation = layer.activation, None
        outputs = layer(inputs).numpy().astype("float64")
        layer.activation = activation
        outputs = outputs.reshape(-1, outputs.shape[-1])
        assert_allclose(outputs.var(axis=0).mean(), 1.0, rtol=1e-4)
        assert np.all(np.abs(outputs.mean(axis=0))
                      <= outputs.std(axis=0) * (1 + 1e-4))


@pytest.mark.parametrize("application, size", [
    (keras.applications.MobileNetV3Small, 32),
    (keras.applications.Xception, 71),
])
def test_applications_have_every_kernel_preconditioned(application, size):
    model = application(input_shape=(size, size, 3), weights=None, classes=3)
    kernels = keras_bnp.coverage.coverage(model).kernels
    assert kernels.covered == kernels.total


@pytest.mark.slow
def test_fit_preconditions_every_kernel_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(6)
    x = channel_offset_inputs(rng, (16, 8, 8, 3))
    y = rng.integers(0, 3, 16)
    model = _small_model()
    model.compile(keras_bnp.BNP(0.05), loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    fit = dict(batch_size=8, shuffle=False, verbose=0)
    losses = model.fit(x, y, epochs=3, **fit).history["loss"]
    assert losses[-1] < losses[0]
    lines = []
    model.optimizer.summary(print_fn=lines.append)
    for rule in ("DepthwiseConv2D: centre + scale kernel and bias, 3 "
                 "features in 3 groups",
                 "SeparableConv2D depthwise: scale kernel (no-bias rule), 6 "
                 "features in 6 groups",
                 "SeparableConv2D pointwise: centre + scale kernel and bias, "
                 "6 features",
                 "BNP preconditions 157 of 157 (100.0%) trainable"):
        assert rule in lines[0]
    with pytest.raises(ValueError, match=r"\['depthwise', 'pointwise'\]; "
                       "pass one of them as `block`"):
        model.optimizer.layer_statistics(model.get_layer("separable"))

    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for block in ("depthwise", "pointwise"):
        for a, b in zip(*(m.optimizer.layer_statistics(
                m.get_layer("separable"), block) for m in (model, loaded))):
            assert_allclose(a, b, atol=0, rtol=0)
    for resumed in (model, loaded):
        resumed.fit(x, y, epochs=1, **fit)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        assert_allclose(a, b, atol=1e-6)
