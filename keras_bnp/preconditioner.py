"""The BNP preconditioner as pure tensor functions (no Keras state).

A supported kernel has the layout `(*spatial, in_channels // groups, units)`
(Dense is the case of no spatial axes and `groups == 1`). Statistics are per
input channel, shape `(in_channels,)`.

For convolutions the rule is the exact normalized-input reparametrization
only with `padding="valid"`: zero padding is not shifted by the mean, so at
the borders the identity holds approximately.
"""

import math

import numpy as np
import tensorflow as tf

# Relative to the mean square of the inputs, the smallest damping: it keeps
# the float32 rounding of the centring `g_kernel - mean * g_bias` (about
# 1e-7 of `|mean * g_bias|`) from being amplified when every input channel
# is (nearly) constant.
DAMPING_FLOOR = 1e-6
_TINY = float(np.finfo(np.float32).tiny)


def damping(mean, variance, epsilon, relative=True):
    """The value added to each input variance of a layer with these
    statistics: `epsilon` itself when not `relative`; else `epsilon` times
    the layer's mean input variance, so that the rule does not depend on
    the units of the layer's inputs (scaling the inputs by `a` scales the
    preconditioned gradient by `1 / a^2`, as normalizing them would), at
    least `DAMPING_FLOOR` times the mean input second moment, and never
    0."""
    if not relative:
        return epsilon
    variance = tf.reduce_mean(variance)
    second_moment = variance + tf.reduce_mean(tf.square(mean))
    return tf.maximum(
        epsilon * variance,
        tf.maximum(DAMPING_FLOOR * second_moment, _TINY),
    )


def kernel_view(per_channel, kernel_shape, groups=1):
    """Lays a per-input-channel vector out along a kernel's last two axes.

    Returns a tensor that broadcasts against a kernel of shape `kernel_shape`:
    `(in_channels, 1)` for `groups == 1`, else `(in_channels // groups,
    units)`, where entry `[c, o]` belongs to input channel
    `(o // (units // groups)) * (in_channels // groups) + c`.
    """
    if groups == 1:
        return per_channel[:, None]
    fan_in, units = kernel_shape[-2], kernel_shape[-1]
    per_group = tf.reshape(per_channel, (groups, fan_in))
    return tf.repeat(tf.transpose(per_group), units // groups, axis=1)


def precondition(grad_kernel, grad_bias, mean, variance, damping, groups=1):
    """Preconditions one layer's gradients with its input statistics.

    With a bias (the input-side factor of the layer's curvature, with the
    input covariances dropped; see `BNP` for the derivation):

        g_kernel = (g_kernel - mean * g_bias) / (variance + damping)
        g_bias = g_bias - sum_{fan-in axes}(g_kernel * mean)

    Without a bias the centring cannot move into a bias, so the kernel
    gradient is multiplied by the inverse of the diagonal-plus-mean second
    moment `diag(variance + damping) + mean mean^T` of the flattened fan-in
    (Sherman-Morrison). Both maps are symmetric positive definite, so the
    result is always a descent direction.

    Args:
        grad_kernel: Kernel gradient, `(*spatial, in_channels // groups,
            units)`.
        grad_bias: Bias gradient `(units,)`, or `None` for a layer without
            bias.
        mean: Per-input-channel mean, `(in_channels,)`.
        variance: Per-input-channel variance, `(in_channels,)`.
        damping: What is added to the variance: a Python float, or a
            scalar tensor such as `damping(mean, variance, epsilon)`.
        groups: Number of convolution groups.

    Returns:
        `(grad_kernel, grad_bias)` preconditioned, with the input dtypes;
        `grad_bias` is `None` when it was `None`.
    """
    dtype = grad_kernel.dtype
    shape = grad_kernel.shape
    mean = kernel_view(tf.cast(mean, dtype), shape, groups)
    # A Python-float damping converts exactly to the gradients' dtype.
    if tf.is_tensor(damping):
        damping = tf.cast(damping, dtype)
    inverse = kernel_view(
        1.0 / (tf.cast(variance, dtype) + damping), shape, groups
    )
    inverse_mean = inverse * mean
    spatial_size = math.prod(shape[:-2])
    # sum_{fan-in} inverse * mean^2, per output unit (shape (1,) or (units,))
    mean_norm = spatial_size * tf.einsum("fu,fu->u", inverse_mean, mean)
    if grad_bias is None:
        coefficient = _fan_in_dot(grad_kernel, inverse_mean) / (1.0 + mean_norm)
        return inverse * grad_kernel - inverse_mean * coefficient, None
    # The kernel's centring, expanded so that the bias needs only the
    # original kernel gradient (a matrix-vector product, no second pass):
    # g_bias - sum(g_kernel_new * mean) = g_bias * (1 + mean_norm)
    #                                     - sum(inverse_mean * g_kernel)
    return (
        inverse * grad_kernel - inverse_mean * grad_bias,
        grad_bias * (1.0 + mean_norm) - _fan_in_dot(grad_kernel, inverse_mean),
    )


def _fan_in_dot(grad_kernel, per_fan_in):
    """`sum_{fan-in axes}(per_fan_in * grad_kernel)`, shape `(units,)`, with
    `per_fan_in` a `kernel_view`; a matrix-vector product when it has one
    column (no groups)."""
    units = grad_kernel.shape[-1]
    rows = tf.reshape(grad_kernel, (-1, per_fan_in.shape[0], units))
    if per_fan_in.shape[1] == 1:
        return tf.einsum("sfu,f->u", rows, per_fan_in[:, 0])
    return tf.einsum("sfu,fu->u", rows, per_fan_in)
