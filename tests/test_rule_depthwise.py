"""Depthwise and separable convolutions against the NumPy reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import REFERENCE_BETA
from helpers import REFERENCE_EPSILON
from helpers import assert_allclose
from helpers import check_reference_steps

import keras_bnp
from keras_bnp import _reference
from keras_bnp import rules

# name: (layer factory, input shape without batch, channels first)
DEPTHWISE = {
    "depthwise2d": (lambda: keras.layers.DepthwiseConv2D(3), (5, 5, 3),
                    False),
    "depthwise2d_multiplier2_strided_same": (
        lambda: keras.layers.DepthwiseConv2D(
            3, strides=2, padding="same", depth_multiplier=2),
        (5, 6, 2), False),
    "depthwise2d_channels_first_no_bias": (
        lambda: keras.layers.DepthwiseConv2D(
            2, depth_multiplier=2, use_bias=False,
            data_format="channels_first"),
        (3, 4, 4), True),
    "depthwise1d_multiplier2": (
        lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2),
        (7, 3), False),
    "depthwise1d_channels_first_dilated_same": (
        lambda: keras.layers.DepthwiseConv1D(
            2, dilation_rate=2, padding="same",
            data_format="channels_first"),
        (3, 7), True),
}
SEPARABLE = {
    "separable2d_multiplier2": (
        lambda: keras.layers.SeparableConv2D(3, 3, depth_multiplier=2),
        (5, 5, 2), False),
    "separable2d_strided_same_no_bias": (
        lambda: keras.layers.SeparableConv2D(
            4, 3, strides=2, padding="same", use_bias=False),
        (6, 5, 3), False),
    "separable2d_channels_first": (
        lambda: keras.layers.SeparableConv2D(
            2, 2, data_format="channels_first"),
        (3, 4, 4), True),
    "separable2d_strided_dilated": (
        lambda: keras.layers.SeparableConv2D(
            2, 2, strides=2, dilation_rate=2),
        (7, 8, 2), False),
    "separable1d": (lambda: keras.layers.SeparableConv1D(3, 2), (6, 3),
                    False),
    "separable1d_channels_first_dilated_multiplier2": (
        lambda: keras.layers.SeparableConv1D(
            2, 2, dilation_rate=2, depth_multiplier=2,
            data_format="channels_first"),
        (3, 8), True),
}


def _inputs(rng, shape, channels_first):
    """Channels with offsets from -5 to 5 and standard deviations from 0.3
    to 10."""
    axis = 1 if channels_first else -1
    broadcast = [1] * len(shape)
    broadcast[axis] = shape[axis]
    scale = 10.0 ** rng.uniform(-0.5, 1.0, shape[axis])
    offset = rng.uniform(-5.0, 5.0, shape[axis])
    return (rng.normal(size=shape) * scale.reshape(broadcast)
            + offset.reshape(broadcast)).astype("float32")


def _axis(layer):
    return 1 if layer.data_format == "channels_first" else -1


def _depthwise(layer, x, kernel):
    """The reference depthwise convolution with `layer`'s settings."""
    return _reference.depthwise_conv(
        x, kernel, layer.strides, layer.padding, layer.dilation_rate,
        layer.data_format == "channels_first")


def _pointwise(layer, y, kernel, bias):
    """The reference pointwise convolution (and bias) of `layer`."""
    out = np.moveaxis(y, _axis(layer), -1) @ kernel.reshape(
        kernel.shape[-2:])
    return np.moveaxis(out + (0.0 if bias is None else bias), -1,
                       _axis(layer))


def _run(name, table, precondition):
    """40 steps of `table[name]`'s layer in a model against the reference,
    where `precondition(layer, optimizer, x, grads, weights)` updates the
    reference's statistics with input `x` and returns the reference's
    preconditioned `grads` (`weights`: the reference's, before the
    step)."""
    factory, input_shape, channels_first = table[name]
    layer = factory()
    check_reference_steps(
        layer, input_shape,
        lambda rng, shape: _inputs(rng, shape, channels_first),
        lambda optimizer, x, grads, weights: precondition(
            layer, optimizer, x, grads, weights))


def _statistics(channels):
    return _reference.RawMomentStatistics(channels, REFERENCE_BETA)


def _check_statistics(optimizer, layer, block, reference):
    mean, variance = optimizer.layer_statistics(layer, block)
    assert_allclose(mean, reference.mean, atol=1e-5, rtol=1e-5)
    assert_allclose(variance, reference.variance, atol=1e-5, rtol=1e-4)


def _damping(statistics):
    return _reference.damping(statistics.mean, statistics.variance,
                              REFERENCE_EPSILON)


@pytest.mark.parametrize("name", sorted(DEPTHWISE))
def test_depthwise_many_steps_match_numpy_reference(name):
    statistics = {}

    def precondition(layer, optimizer, x, grads, weights):
        axis = _axis(layer)
        stats = statistics.setdefault("inputs", _statistics(x.shape[axis]))
        stats.update([x], axis)
        _check_statistics(optimizer, layer, None, stats)
        return _reference.depthwise_precondition(
            grads[0], grads[1] if layer.use_bias else None, stats.mean,
            stats.variance, _damping(stats))

    _run(name, DEPTHWISE, precondition)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SEPARABLE))
def test_separable_many_steps_match_numpy_reference(name):
    # The depthwise kernel by the rule without bias on the input's
    # statistics; the pointwise kernel and the bias by the rule with bias
    # on the statistics of the depthwise output, which the reference
    # computes with its own weights.
    statistics = {}

    def precondition(layer, optimizer, x, grads, weights):
        axis = _axis(layer)
        depthwise_kernel, pointwise_kernel = weights[:2]
        inputs = statistics.setdefault("inputs", _statistics(x.shape[axis]))
        depthwise = statistics.setdefault(
            "depthwise", _statistics(pointwise_kernel.shape[-2]))
        inputs.update([x], axis)
        depthwise.update([_depthwise(layer, x, depthwise_kernel)], axis)
        _check_statistics(optimizer, layer, "depthwise", inputs)
        _check_statistics(optimizer, layer, "pointwise", depthwise)
        depthwise_grad, _ = _reference.depthwise_precondition(
            grads[0], None, inputs.mean, inputs.variance, _damping(inputs))
        pointwise_grad, bias_grad = _reference.precondition(
            grads[1].reshape(pointwise_kernel.shape[-2:]),
            grads[2] if layer.use_bias else None, depthwise.mean,
            depthwise.variance, _damping(depthwise))
        return [depthwise_grad,
                pointwise_grad.reshape(pointwise_kernel.shape), bias_grad]

    _run(name, SEPARABLE, precondition)


@pytest.mark.parametrize("name", sorted(DEPTHWISE) + sorted(SEPARABLE))
def test_reference_convolutions_match_keras(name):
    factory, input_shape, channels_first = {**DEPTHWISE, **SEPARABLE}[name]
    layer = factory()
    x = _inputs(np.random.default_rng(1), (2, *input_shape), channels_first)
    outputs = layer(x)
    weights = [w.numpy() for w in layer.weights]
    if name in DEPTHWISE:
        want = _depthwise(layer, x, weights[0]) + (
            _bias(layer, weights[1]) if layer.use_bias else 0.0)
    else:
        want = _pointwise(layer, _depthwise(layer, x, weights[0]),
                          weights[1], weights[2] if layer.use_bias else None)
    assert_allclose(outputs, want, atol=1e-5 * np.abs(want).max())


def _bias(layer, bias):
    shape = [1] * (layer.rank + 2)
    shape[_axis(layer)] = -1
    return bias.reshape(shape)


@pytest.mark.parametrize("name", sorted(SEPARABLE))
def test_separable_call_in_two_steps_equals_layer_call(name):
    factory, input_shape, channels_first = SEPARABLE[name]
    layer = factory()
    layer.activation = keras.activations.relu
    x = tf.constant(_inputs(np.random.default_rng(2), (3, *input_shape),
                            channels_first))
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
    x = _inputs(np.random.default_rng(3), (2, 4, 4, 2), False)
    want = layer(x)
    records = []
    outputs = rules.rule_for(layer).record(
        layer, layer.call, (tf.constant(x),), {}, records)
    assert_allclose(outputs, want)
    assert_allclose(records[0][1],
                    _depthwise(layer, x, layer.depthwise_kernel.numpy()),
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
    x = _inputs(rng, (32, 8, 8, 3), False)
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
    x = _inputs(rng, (16, 8, 8, 3), False)
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
