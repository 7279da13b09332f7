"""Fixed cases of the preconditioner: by hand and against the NumPy
reference for every kernel layout. Random shapes, scales and the identity
and descent properties are in test_properties.py."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose

from keras_bnp import _reference
from keras_bnp import preconditioner

# (kernel shape, groups): Dense, Conv1D/2D/3D, and grouped convolutions.
KERNELS = {
    "dense": ((5, 3), 1),
    "conv1d": ((3, 4, 2), 1),
    "conv2d": ((3, 2, 3, 4), 1),
    "conv3d": ((2, 2, 2, 3, 2), 1),
    "conv1d_groups2": ((3, 2, 4), 2),
    "conv2d_groups3": ((2, 2, 2, 6), 3),
}


def _case(kernel_shape, groups, seed):
    rng = np.random.default_rng(seed)
    channels = kernel_shape[-2] * groups
    return (
        rng.normal(size=kernel_shape).astype("float32"),
        rng.normal(size=kernel_shape[-1]).astype("float32"),
        rng.uniform(-2, 2, channels).astype("float32"),
        rng.uniform(0.01, 3, channels).astype("float32"),
    )


def test_dense_with_bias_by_hand():
    # s = 1 / (var + eps) = [1/2, 1/4]
    # g_w = s * (g_w - mean * g_b) = [0.5 * (1 - 3), 0.25 * (2 - 0)]
    # g_b = g_b - sum(g_w * mean) = 3 - (-1 * 1 + 0.5 * 0)
    g_w, g_b = preconditioner.precondition(
        tf.constant([[1.0], [2.0]]), tf.constant([3.0]),
        tf.constant([1.0, 0.0]), tf.constant([1.0, 3.0]), 1.0,
    )
    assert_allclose(g_w, [[-1.0], [0.5]])
    assert_allclose(g_b, [4.0])


def test_dense_without_bias_by_hand():
    # inv(diag([2, 4]) + [1, 0][1, 0]^T) = diag([1/3, 1/4])
    g_w, g_b = preconditioner.precondition(
        tf.constant([[1.0], [2.0]]), None,
        tf.constant([1.0, 0.0]), tf.constant([1.0, 3.0]), 1.0,
    )
    assert g_b is None
    assert_allclose(g_w, [[1.0 / 3.0], [0.5]])


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_matches_reference(name, use_bias):
    kernel_shape, groups = KERNELS[name]
    for seed in range(3):
        g_w, g_b, mean, variance = _case(kernel_shape, groups, seed)
        g_b = g_b if use_bias else None
        actual_w, actual_b = preconditioner.precondition(
            tf.constant(g_w), None if g_b is None else tf.constant(g_b),
            tf.constant(mean), tf.constant(variance), 0.05, groups,
        )
        want_w, want_b = _reference.precondition(
            g_w, g_b, mean.astype("float64"), variance.astype("float64"),
            0.05, groups,
        )
        assert actual_w.shape == kernel_shape
        assert actual_w.dtype == tf.float32
        assert_allclose(actual_w, want_w, atol=1e-5, rtol=1e-5)
        if use_bias:
            assert_allclose(actual_b, want_b, atol=1e-5, rtol=1e-5)
        else:
            assert actual_b is None


def test_float64_gradients_keep_their_dtype():
    g_w, g_b, mean, variance = _case((4, 2), 1, 0)
    new_w, new_b = preconditioner.precondition(
        tf.constant(g_w, tf.float64), tf.constant(g_b, tf.float64),
        tf.constant(mean), tf.constant(variance), 0.1,
    )
    assert new_w.dtype == tf.float64 and new_b.dtype == tf.float64
    want_w, want_b = _reference.precondition(
        g_w, g_b, mean.astype("float64"), variance.astype("float64"), 0.1
    )
    assert_allclose(new_w, want_w, atol=1e-6)
    assert_allclose(new_b, want_b, atol=1e-6)
