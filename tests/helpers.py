"""Shared test helpers and small models."""

import functools
import os
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bnp


def repository_url():
    """The project's address, as setup.py sets it (its one place)."""
    setup = pathlib.Path(__file__).parent.parent / "setup.py"
    return re.search(r'^REPOSITORY_URL = "([^"]+)"$', setup.read_text(),
                     re.M).group(1)


def subprocess_env(**variables):
    """The environment of a Python subprocess that must import this
    keras_bnp: its folder first on PYTHONPATH, since a script run by path
    starts its search path with the script's folder, where an installed
    copy could come first. Plus `variables`."""
    root = os.path.dirname(os.path.dirname(keras_bnp.__file__))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path,
                **variables)


def assert_allclose(actual, desired, atol=1e-6, rtol=1e-6):
    """Keras' default test tolerances, on anything convertible to NumPy."""
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(actual),
        keras.ops.convert_to_numpy(desired),
        atol=atol,
        rtol=rtol,
    )


def assert_statistics_match(optimizer, layer, reference, block=None):
    """The running statistics of `layer`'s block `block` (its only one when
    `None`) in `optimizer` equal `reference`'s (a
    `_reference.RawMomentStatistics`), to float32 round-off."""
    mean, variance = optimizer.layer_statistics(layer, block)
    assert_allclose(mean, reference.mean, atol=1e-5, rtol=1e-5)
    assert_allclose(variance, reference.variance, atol=1e-5, rtol=1e-4)


def _per_channel(rng, shape, channel_axis, scale, offset):
    """Normal values with a `scale` and `offset` per channel (arrays of the
    channel count)."""
    broadcast = [1] * len(shape)
    broadcast[channel_axis] = shape[channel_axis]
    return (rng.normal(size=shape) * scale.reshape(broadcast)
            + offset.reshape(broadcast)).astype("float32")


def shifted_inputs(rng, shape, channel_axis=-1):
    """Inputs whose channels have distinct, non-zero means and scales."""
    channels = shape[channel_axis]
    scale = rng.uniform(0.3, 3.0, channels)
    return _per_channel(rng, shape, channel_axis, scale,
                        rng.uniform(-2.0, 2.0, channels))


def channel_offset_inputs(rng, shape, channels_first=False):
    """Channels with offsets from -5 to 5 and standard deviations from 0.3
    to 10."""
    axis = 1 if channels_first else -1
    scale = 10.0 ** rng.uniform(-0.5, 1.0, shape[axis])
    return _per_channel(rng, shape, axis, scale,
                        rng.uniform(-5.0, 5.0, shape[axis]))


def entrywise_inputs(rng, shape):
    """Each entry of an example its own offset (far from 0) and scale
    (from 0.01 to 10)."""
    offset = rng.choice([-1.0, 1.0], shape[1:]) * rng.uniform(
        2.0, 20.0, shape[1:])
    scale = 10.0 ** rng.uniform(-2.0, 1.0, shape[1:])
    return (rng.normal(size=shape) * scale + offset).astype("float32")


def depthwise_of(layer, x, kernel):
    """The NumPy depthwise convolution of `x` with `layer`'s settings (a
    depthwise or separable convolution) and `kernel`."""
    from keras_bnp import _reference

    return _reference.depthwise_conv(
        x, kernel, layer.strides, layer.padding, layer.dilation_rate,
        layer.data_format == "channels_first")


def _kernel_error(step, errors):
    """TensorFlow's message if `step()` (a forward and backward pass)
    raises one of `errors` for want of a CPU kernel, else `None`."""
    try:
        step()
    except errors as error:
        return error.message.split("}} ")[-1].split(" [Op:")[0]
    return None


@functools.cache
def _channels_first_conv2d_error():
    """TensorFlow's error for a tiny channels-first (NCHW) Conv2D step, the
    op under Keras' `Conv2D` and `Conv1D`, or `None` if it runs. On CPU,
    TensorFlow has this kernel only with oneDNN on (its default on CPUs with
    AVX-512; `TF_ENABLE_ONEDNN_OPTS=0` turns it off)."""
    kernel = tf.Variable(tf.ones((1, 1, 1, 1)))

    def step():
        with tf.GradientTape() as tape:
            outputs = tf.nn.conv2d(tf.ones((1, 1, 2, 2)), kernel, 1, "VALID",
                                   data_format="NCHW")
        tape.gradient(outputs, kernel)

    return _kernel_error(step, tf.errors.UnimplementedError)


def skip_without_channels_first_conv2d():
    """Skips the test where TensorFlow has no channels-first Conv2D kernel
    (Conv1D runs on the same kernel)."""
    error = _channels_first_conv2d_error()
    if error is not None:
        pytest.skip(f"TensorFlow lacks this kernel here: {error}")


def skip_unless_tensorflow_runs(layer, input_shape):
    """Skips the test where TensorFlow has no CPU kernel for `layer`'s
    forward or backward pass (with oneDNN off: channels-first or dilated
    transposed convolutions, for one), after building it."""
    def step():
        with tf.GradientTape() as tape:
            outputs = layer(tf.ones((1, *input_shape)))
        tape.gradient(outputs, layer.trainable_variables)

    error = _kernel_error(step, (tf.errors.InvalidArgumentError,
                                 tf.errors.UnimplementedError))
    if error is not None:
        pytest.skip(f"TensorFlow lacks this kernel here: {error}")


def logits_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(model_class=keras_bnp.BNPSequential, inputs=8, hidden=16, outputs=3):
    return model_class(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(outputs, name="logits"),
        ]
    )


# The settings of the many-step reference tests: a large learning rate and
# a small damping, so that the preconditioning shows in every weight.
REFERENCE_LEARNING_RATE, REFERENCE_MOMENTUM = 0.05, 0.9
REFERENCE_EPSILON, REFERENCE_BETA = 0.05, 0.9


def custom_step(model, optimizer, inputs, cotangent):
    """One step of a custom loop with loss `sum(outputs * cotangent)`;
    returns the gradients as NumPy arrays."""
    with optimizer.capture(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(inputs, training=True) * cotangent)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return [tf.convert_to_tensor(g).numpy() for g in grads]


def check_reference_steps(layer, input_shape, make_inputs, reference,
                          steps=40):
    """`steps` steps of a model made of `layer`, trained by BNP in a custom
    loop on batches of 1 to 3 `make_inputs(rng, shape)`, against a NumPy
    reference: `reference(optimizer, x, grads, weights)` takes each batch,
    its ordinary gradients and the reference's weights before the step,
    updates its own statistics (checking them against `optimizer`'s where
    it likes) and returns its preconditioned gradients.
    The layer's weights must end where SGD with momentum takes the
    reference's, to float32 round-off relative to their magnitude after
    the amplified steps."""
    from keras_bnp import _reference

    model = keras.Sequential([keras.Input(input_shape), layer])
    optimizer = keras_bnp.BNP(
        REFERENCE_LEARNING_RATE, momentum=REFERENCE_MOMENTUM,
        epsilon=REFERENCE_EPSILON, statistics_momentum=REFERENCE_BETA)
    rng = np.random.default_rng(0)
    sgd = _reference.SGDMomentum(REFERENCE_LEARNING_RATE, REFERENCE_MOMENTUM)
    weights = [w.numpy().astype("float64") for w in layer.trainable_weights]
    for _ in range(steps):
        x = make_inputs(rng, (int(rng.integers(1, 4)), *input_shape))
        # The output's shape from a call: `compute_output_shape` is wrong
        # for some EinsumDense equations in Keras 3.15.
        cotangent = rng.normal(size=model(x).shape).astype("float32")
        grads = custom_step(model, optimizer, x, cotangent)
        new_grads = reference(optimizer, x, grads, weights)
        weights = [sgd.update(i, w, g)
                   for i, (w, g) in enumerate(zip(weights, new_grads))]
    for actual, want in zip(layer.trainable_weights, weights):
        assert_allclose(actual, want, atol=1e-5 * np.abs(want).max(),
                        rtol=1e-4)
