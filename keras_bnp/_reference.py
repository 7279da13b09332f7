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

    def update(self, inputs, channel_axis, weights=None):
        """One step on the calls `inputs`; `weights`, per call, the weight
        of each position (the call's shape without the channel axis, or
        its leading axes: per example), or `None` for 1. A position of
        weight 0 is left out, whatever its values."""
        rows, row_weights = [], []
        for i, x in enumerate(inputs):
            x = np.moveaxis(np.asarray(x, np.float64), channel_axis, -1)
            w = np.ones(x.shape[:-1]) if weights is None else np.asarray(
                weights[i], np.float64)
            w = np.broadcast_to(w.reshape(w.shape + (1,) * (
                x.ndim - 1 - w.ndim)), x.shape[:-1])
            rows.append(x.reshape(-1, x.shape[-1]))
            row_weights.append(w.reshape(-1))
        flat, w = np.concatenate(rows), np.concatenate(row_weights)
        flat = np.where(w[:, None] > 0, flat, 0.0)
        beta = self.momentum
        self.count = beta * self.count + w.sum()
        self.first = beta * self.first + w @ flat
        self.second = beta * self.second + w @ flat**2

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


def precondition(grad_kernel, grad_bias, mean, variance, damping, groups=1):
    """BNP-preconditioned `(grad_kernel, grad_bias)` by explicit inverses.

    For output unit `o`, the fan-in vector `u` lists the kernel entries
    `[..., c, o]` (all spatial positions, the channels of `o`'s group). The
    preconditioner is `inv(A)` with `A = diag(variance_u + damping) +
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
        second_moment = np.diag(var_u + damping) + np.outer(mean_u, mean_u)
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


def depthwise_conv(inputs, kernel, strides=1, padding="valid",
                   dilation_rate=1, channels_first=False):
    """Keras' depthwise convolution, by its definition: output channel
    `c * multiplier + m` at position `i` is `sum_k x[s * i + d * k, c] *
    kernel[k, c, m]` over the kernel's taps `k`, on the input zero-padded
    as TensorFlow's "same" pads (the extra row, if any, at the end).

    `inputs`: `(batch, *spatial, channels)` (channels first with
    `channels_first`); `kernel`: `(*spatial, channels, multiplier)`.
    """
    x = np.asarray(inputs, np.float64)
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    *taps, channels, multiplier = np.shape(kernel)
    rank = len(taps)
    strides = np.broadcast_to(strides, rank)
    dilation_rate = np.broadcast_to(dilation_rate, rank)
    pads = [(0, 0)]
    sizes = []
    for n, k, s, d in zip(x.shape[1:-1], taps, strides, dilation_rate):
        span = (k - 1) * d + 1
        size = -(-n // s) if padding == "same" else (n - span) // s + 1
        total = max((size - 1) * s + span - n, 0) if padding == "same" else 0
        pads.append((total // 2, total - total // 2))
        sizes.append(size)
    x = np.pad(x, pads + [(0, 0)])
    out = np.zeros((x.shape[0], *sizes, channels, multiplier))
    for tap in np.ndindex(*taps):
        window = tuple(
            slice(t * d, t * d + (size - 1) * s + 1, s)
            for t, d, s, size in zip(tap, dilation_rate, strides, sizes))
        out += (x[(slice(None), *window)][..., None]
                * np.asarray(kernel, np.float64)[tap])
    out = out.reshape(*out.shape[:-2], channels * multiplier)
    return np.moveaxis(out, -1, 1) if channels_first else out


def depthwise_precondition(grad_kernel, grad_bias, mean, variance, damping):
    """BNP-preconditioned gradients of a depthwise kernel `(*spatial,
    channels, multiplier)` and its bias `(channels * multiplier,)` (or
    `None`): each input channel `c` is its own layer, whose fan-in is the
    taps of channel `c` and whose units are the outputs `c * multiplier +
    m`."""
    grad_kernel = np.asarray(grad_kernel, np.float64)
    multiplier = grad_kernel.shape[-1]
    out_kernel = np.empty_like(grad_kernel)
    out_bias = None if grad_bias is None else np.empty(np.shape(grad_bias))
    for c in range(grad_kernel.shape[-2]):
        units = slice(c * multiplier, (c + 1) * multiplier)
        kernel, bias = precondition(
            grad_kernel[..., c:c + 1, :],
            None if grad_bias is None else grad_bias[units],
            mean[c:c + 1], variance[c:c + 1], damping)
        out_kernel[..., c:c + 1, :] = kernel
        if grad_bias is not None:
            out_bias[units] = bias
    return out_kernel, out_bias


def _einsum_parts(equation):
    """`(input, kernel, output)` subscripts of an `EinsumDense` equation
    (the input and output may hold `...`), the kernel's contracted axes and
    its output ("unit") axes, each in the kernel's order."""
    left, output = equation.split("->")
    inputs, kernel = left.split(",")
    contracted = "".join(a for a in kernel if a in inputs)
    units = "".join(a for a in kernel if a not in inputs)
    return inputs, kernel, output, contracted, units


def einsum_features(inputs, equation):
    """An `EinsumDense` input as a `(positions, features)` matrix: one row
    per index of the input axes that reach the output (`...` included),
    one column per index of the contracted axes in the kernel's order.
    Input axes in neither the kernel nor the output are summed, as the
    einsum sums them."""
    spec, _, output, contracted, _ = _einsum_parts(equation)
    kept = "".join(a for a in spec.replace("...", "") if a in output)
    ellipsis = "..." if "..." in spec else ""
    matrix = np.einsum(f"{spec}->{ellipsis}{kept}{contracted}",
                       np.asarray(inputs, np.float64))
    features = int(np.prod(matrix.shape[matrix.ndim - len(contracted):]))
    return matrix.reshape(-1, features)


def einsum_precondition(grad_kernel, grad_bias, equation, bias_axes, mean,
                        variance, damping):
    """BNP-preconditioned gradients of an `EinsumDense` kernel and bias.

    The kernel gradient as a matrix (rows: the contracted axes' indices in
    the kernel's order; columns: the output axes' indices, units) goes
    through `precondition`, with the bias gradient laid out as those units
    when `bias_axes` are exactly the kernel's output axes; another bias is
    returned as it is (the rule without bias). A kernel axis that is also
    an input and output axis leaves both gradients as they are.
    """
    spec, kernel, output, contracted, units = _einsum_parts(equation)
    if any(a in spec and a in output for a in kernel):
        return grad_kernel, grad_bias
    grad_kernel = np.asarray(grad_kernel, np.float64)
    size = dict(zip(kernel, grad_kernel.shape))
    shape = [size[a] for a in contracted + units]
    matrix = np.einsum(f"{kernel}->{contracted}{units}", grad_kernel)
    matrix = matrix.reshape(int(np.prod(shape[:len(contracted)])), -1)
    exact = grad_bias is not None and set(bias_axes) == set(units)
    if exact:
        # The bias' axes: the output's from the first bias axis on (size 1
        # where not a bias axis), then size-1 axes of a right `...`.
        letters = output.replace("...", "")
        letters = letters[min(letters.index(a) for a in bias_axes):]
        bias = np.asarray(grad_bias, np.float64).reshape(
            [size.get(a, 1) for a in letters])
        bias = np.einsum(f"{letters}->{units}", bias).reshape(-1)
    matrix, bias = precondition(matrix, bias if exact else None, mean,
                                variance, damping)
    new_kernel = np.einsum(f"{contracted}{units}->{kernel}",
                           matrix.reshape(shape))
    if not exact:
        return new_kernel, grad_bias
    bias = np.einsum(f"{units}->{''.join(a for a in letters if a in units)}",
                     bias.reshape([size[a] for a in units]))
    return new_kernel, bias.reshape(np.shape(grad_bias))


def precondition_transposed(grad_kernel, grad_bias, mean, variance, damping,
                            strides):
    """`precondition` for a transposed convolution's kernel `(*spatial,
    units, in_channels)`: output unit `o`'s fan-in is every entry `[...,
    o, c]`, all taps of all input channels. Each tap reaches one output
    position in `prod(strides)`, so the fan-in's mean over the output
    positions is `mean / prod(strides)`; the variance is the input's."""
    kernel, bias = precondition(
        np.swapaxes(grad_kernel, -1, -2), grad_bias,
        np.asarray(mean) / np.prod(strides), variance, damping)
    return np.swapaxes(kernel, -1, -2), bias


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def recurrent_pass(kind, weights, inputs, mask=None, state=None,
                   go_backwards=False, reset_after=True, zero_masked=False):
    """A `SimpleRNN`, `LSTM` or `GRU` pass (Keras' default activations) in
    float64, step by step from the cells' equations.

    `weights`: `[kernel, recurrent_kernel, bias]` (no bias: two), `state`:
    the initial states (`[h]`, or `[h, c]` for an LSTM; zeros if `None`),
    `mask`: `(batch, time)` booleans, a masked step keeping the states.
    Returns `(rows, outputs, states)`: `rows` is `{"x", "h", "r"}` of the
    unmasked steps (input, previous output h_{t-1}, and a GRU's reset gate
    r_t), one row per step; `outputs` per step in the order they ran (a
    masked step's is 0 with `zero_masked`, else the last output, 0 before
    any); `states` the final states.
    """
    kernel, recurrent = (np.asarray(w, np.float64) for w in weights[:2])
    bias = (np.asarray(weights[2], np.float64) if len(weights) > 2
            else np.zeros((2, kernel.shape[1]) if kind == "gru" and
                          reset_after else kernel.shape[1]))
    inputs = np.asarray(inputs, np.float64)
    batch, steps, _ = inputs.shape
    units = recurrent.shape[0]
    if mask is None:
        mask = np.ones((batch, steps), bool)
    if go_backwards:
        inputs, mask = inputs[:, ::-1], mask[:, ::-1]
    if state is None:
        state = [np.zeros((batch, units))] * (2 if kind == "lstm" else 1)
    h, *c = [np.asarray(s, np.float64) for s in state]
    rows = {"x": [], "h": [], "r": []}
    outputs = np.zeros((batch, steps, units))
    output = np.zeros((batch, units))
    for t in range(steps):
        x = inputs[:, t]
        keep = mask[:, t][:, None]
        if kind == "simple_rnn":
            new_h = np.tanh(x @ kernel + h @ recurrent + bias)
            new_c = []
        elif kind == "lstm":
            z = x @ kernel + h @ recurrent + bias
            i, f, g, o = np.split(z, 4, axis=1)
            new_c = [_sigmoid(f) * c[0] + _sigmoid(i) * np.tanh(g)]
            new_h = _sigmoid(o) * np.tanh(new_c[0])
        else:
            w_z, w_r, w_h = np.split(kernel, 3, axis=1)
            u_z, u_r, u_h = np.split(recurrent, 3, axis=1)
            b_in, b_rec = bias if reset_after else (bias, 0 * bias)
            b_z, b_r, b_h = np.split(b_in, 3)
            c_z, c_r, c_h = np.split(b_rec, 3)
            update = _sigmoid(x @ w_z + b_z + h @ u_z + c_z)
            r = _sigmoid(x @ w_r + b_r + h @ u_r + c_r)
            if reset_after:
                candidate = np.tanh(x @ w_h + b_h + r * (h @ u_h + c_h))
            else:
                candidate = np.tanh(x @ w_h + b_h + (r * h) @ u_h)
            new_h = update * h + (1 - update) * candidate
            new_c = []
            rows["r"].append(r[mask[:, t]])
        rows["x"].append(x[mask[:, t]])
        rows["h"].append(h[mask[:, t]])
        h = np.where(keep, new_h, h)
        c = [np.where(keep, new, old) for new, old in zip(new_c, c)]
        output = np.where(keep, new_h, output)
        outputs[:, t] = np.where(keep, output, 0.0) if zero_masked else output
    rows = {k: np.concatenate(v) for k, v in rows.items() if v}
    return rows, outputs, [h, *c]
