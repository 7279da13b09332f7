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


def assert_statistics_match(optimizer, layer, reference):
    """`layer`'s running statistics in `optimizer` equal `reference`'s (a
    `_reference.RawMomentStatistics`), to float32 round-off."""
    mean, variance = optimizer.layer_statistics(layer)
    assert_allclose(mean, reference.mean, atol=1e-5, rtol=1e-5)
    assert_allclose(variance, reference.variance, atol=1e-5, rtol=1e-4)


def shifted_inputs(rng, shape, channel_axis=-1):
    """Inputs whose channels have distinct, non-zero means and scales."""
    channels = shape[channel_axis]
    broadcast = [1] * len(shape)
    broadcast[channel_axis] = channels
    scale = rng.uniform(0.3, 3.0, channels).reshape(broadcast)
    offset = rng.uniform(-2.0, 2.0, channels).reshape(broadcast)
    return (rng.normal(size=shape) * scale + offset).astype("float32")


@functools.cache
def _channels_first_conv2d_error():
    """TensorFlow's error for a tiny channels-first (NCHW) Conv2D step, the
    op under Keras' `Conv2D` and `Conv1D`, or `None` if it runs. On CPU,
    TensorFlow has this kernel only with oneDNN on (its default on CPUs with
    AVX-512; `TF_ENABLE_ONEDNN_OPTS=0` turns it off)."""
    kernel = tf.Variable(tf.ones((1, 1, 1, 1)))
    try:
        with tf.GradientTape() as tape:
            outputs = tf.nn.conv2d(tf.ones((1, 1, 2, 2)), kernel, 1, "VALID",
                                   data_format="NCHW")
        tape.gradient(outputs, kernel)
    except tf.errors.UnimplementedError as error:
        return error.message.split("}} ")[-1]
    return None


def skip_without_channels_first_conv2d():
    """Skips the test where TensorFlow has no channels-first Conv2D kernel
    (Conv1D runs on the same kernel)."""
    error = _channels_first_conv2d_error()
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
