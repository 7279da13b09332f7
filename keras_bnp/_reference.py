"""A slow NumPy reference of BNP, written from the definitions.

Used by the tests to check the TensorFlow path. It shares no code with it
and takes the long way on purpose:
- statistics are EMAs of the raw sums `n`, `sum(x)`, `sum(x^2)` (the TF
  path keeps a centred form);
- the preconditioner is an explicit matrix inverse, per output unit, of the
  input second moment with covariances dropped (the TF path uses the closed
  form).
"""

import numpy as np


def batch_moments(inputs, channel_axis):
    """Pooled per-channel mean and population variance of several arrays."""
    flat = np.concatenate(
        [
            np.moveaxis(np.asarray(x, np.float64), channel_axis, -1).reshape(
                -1, np.shape(x)[channel_axis]
            )
            for x in inputs
        ]
    )
    return flat.mean(axis=0), flat.var(axis=0)


class RawMomentStatistics:
    """Moving averages of the raw sums `n`, `sum(x)`, `sum(x^2)`."""

    def __init__(self, channels, momentum):
        self.momentum = momentum
        self.count = 0.0
        self.first = np.zeros(channels)
        self.second = np.zeros(channels)

    def update(self, inputs, channel_axis):
        flat = np.concatenate([
            np.moveaxis(np.asarray(x, np.float64), channel_axis, -1).reshape(
                -1, np.shape(x)[channel_axis])
            for x in inputs
        ])
        beta = self.momentum
        self.count = beta * self.count + len(flat)
        self.first = beta * self.first + flat.sum(axis=0)
        self.second = beta * self.second + (flat**2).sum(axis=0)

    @property
    def mean(self):
        return self.first / self.count

    @property
    def variance(self):
        return np.maximum(self.second / self.count - self.mean**2, 0.0)


def damping(mean, variance, epsilon, relative=True):
    """What BNP adds to each input variance: `epsilon` itself, or, relative,
    `epsilon` times the mean input variance, at least 1e-6 times the mean
    input second moment and the smallest normal float32."""
    if not relative:
        return epsilon
    mean_variance = np.mean(variance)
    second_moment = mean_variance + np.mean(np.square(mean))
    return max(epsilon * mean_variance, 1e-6 * second_moment,
               np.finfo(np.float32).tiny)


def precondition(grad_kernel, grad_bias, mean, variance, epsilon, groups=1):
    """BNP-preconditioned `(grad_kernel, grad_bias)` by explicit inverses.

    For output unit `o`, the fan-in vector `u` lists the kernel entries
    `[..., c, o]` (all spatial positions, the channels of `o`'s group). The
    preconditioner is `inv(A)` with `A = diag(variance_u + epsilon) +
    mean_u mean_u^T` (no bias), or, with bias, the augmented
    `[[A, mean_u], [mean_u^T, 1]]` acting on `[g_u; g_bias[o]]`.
    """
    grad_kernel = np.asarray(grad_kernel, np.float64)
    *spatial, fan_in, units = grad_kernel.shape
    out_kernel = np.empty_like(grad_kernel)
    out_bias = None if grad_bias is None else np.empty(units)
    for o in range(units):
        group = o // (units // groups)
        channels = np.arange(group * fan_in, (group + 1) * fan_in)
        mean_u = np.broadcast_to(mean[channels], (*spatial, fan_in)).ravel()
        var_u = np.broadcast_to(variance[channels], (*spatial, fan_in)).ravel()
        second_moment = np.diag(var_u + epsilon) + np.outer(mean_u, mean_u)
        gradient = grad_kernel[..., o].ravel()
        if grad_bias is not None:
            second_moment = np.block(
                [
                    [second_moment, mean_u[:, None]],
                    [mean_u[None, :], np.ones((1, 1))],
                ]
            )
            gradient = np.append(gradient, grad_bias[o])
        result = np.linalg.inv(second_moment) @ gradient
        if grad_bias is not None:
            out_bias[o] = result[-1]
            result = result[:-1]
        out_kernel[..., o] = result.reshape(*spatial, fan_in)
    return out_kernel, out_bias


class SGDMomentum:
    """Keras' SGD update: `v = momentum * v - lr * g; w += v`."""

    def __init__(self, learning_rate, momentum):
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.velocity = {}

    def update(self, name, weight, grad):
        velocity = self.velocity.get(name, 0.0)
        velocity = self.momentum * velocity - self.learning_rate * grad
        self.velocity[name] = velocity
        return weight + velocity



def precondition_transposed(grad_kernel, grad_bias, mean, variance, epsilon,
                            strides):
    """`precondition` for a transposed convolution's kernel `(*spatial,
    units, in_channels)`: output unit `o`'s fan-in is every entry `[...,
    o, c]`, all taps of all input channels. Each tap reaches one output
    position in `prod(strides)`, so the fan-in's mean over the output
    positions is `mean / prod(strides)`; the variance is the input's."""
    kernel, bias = precondition(
        np.swapaxes(grad_kernel, -1, -2), grad_bias,
        np.asarray(mean) / np.prod(strides), variance, epsilon)
    return np.swapaxes(kernel, -1, -2), bias
