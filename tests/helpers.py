"""Shared test helpers and small models."""

import os

import keras
import numpy as np

import keras_bnp


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
