"""Batch moments of layer inputs and the running-statistics update.

Everything is float32, whatever the input dtype. The running statistics are
exponential moving averages of the raw sums `n`, `sum(x)`, `sum(x^2)` of each
step's inputs; their ratios give the mean and variance. Dividing by the
averaged count `n` is the start-up bias correction (for equal batch sizes it
is exactly Adam's `1 - momentum ** t`) and weights a smaller batch (the last
of an epoch) by its size. They are stored in centred form `(moving_mean,
moving_variance, moving_count)`: the same numbers, without the cancellation
of `E[x^2] - E[x]^2` in float32 when `|mean| >> std`. Each step's sums are
taken of `x - shift`, with the running mean as the shift; the first update,
which has no running mean yet, takes it from the batch (`shift_sums`).
"""

import tensorflow as tf

# What tf.function itself uses to know that it traces for XLA.
from tensorflow.python.ops import control_flow_util

# `input_sums` may skip centring when every channel's running mean is within
# this factor of its running variance: shift^2 <= RAW_SUMS_MAX_RATIO * var.
RAW_SUMS_MAX_RATIO = 16.0


def input_sums(inputs, channel_axis, shift, variance=None, mask=None):
    """Per-channel `(count, sum(x - shift), sum((x - shift)^2))` of `inputs`.

    `shift` (shape `(channels,)`, normally the running mean) only improves
    float32 accuracy; it cancels in `moments_from_sums`. `count` is the
    number of values per channel.

    Without `variance`, and for a batch of vectors (rank 2, as Dense layers
    see) outside XLA, the sums are taken of `x - shift`: exact to float32
    rounding relative to the spread of `x` around `shift`, however large
    `|shift|` is. Otherwise, given `variance` (the running variance) and
    when `shift^2 <= RAW_SUMS_MAX_RATIO * variance` in every channel (a NaN
    `variance`, i.e. no estimate yet, never allows it), they
    are derived from `sum(x)` and `sum(x^2)` instead, which skips writing the
    centred copy of the input (about half the time on CPU). Then the
    rounding error of the variance, relative to `variance`, grows from about
    `a^2` to at most about `(a + 4)^2` roundings, where
    `a^2 = mean((x - shift)^2) / variance` (about 1 for a typical batch).
    For a batch of vectors in a TensorFlow graph, the conditional choosing
    the path costs more than the copy it saves; in a step compiled with
    XLA it does not (both measured on CPU, see docs/benchmarks.md).
    A non-finite input gives a non-finite sum of squares either way.
    A `tf.SparseTensor` (a Dense layer's sparse input) counts its implicit
    zeros as values; its sums are exact, from the stored values only.

    `mask` (a Keras mask: boolean, the input's shape without the channel
    axis, e.g. the padded time steps of sequences) leaves the masked
    positions out, even non-finite ones: `count` is then the number of
    unmasked positions, and the sums are of the centred unmasked values. A
    mask of another rank does not describe the input's positions and is
    not used.
    """
    if isinstance(inputs, tf.SparseTensor):
        return _sparse_sums(inputs, channel_axis, shift)
    inputs = tf.cast(tf.stop_gradient(inputs), tf.float32)
    rank = inputs.shape.rank
    channel_axis %= rank
    broadcast = [1] * rank
    broadcast[channel_axis] = -1
    axes = [axis for axis in range(rank) if axis != channel_axis]
    mask = _position_mask(mask, rank)
    if mask is not None:
        count = tf.reduce_sum(tf.cast(mask, tf.float32))
    elif inputs.shape.is_fully_defined():  # a constant: no ops in the step
        count = tf.constant(
            inputs.shape.num_elements() / inputs.shape[channel_axis],
            tf.float32)
    else:
        count = tf.cast(tf.size(inputs), tf.float32) / tf.cast(
            tf.shape(inputs)[channel_axis], tf.float32
        )

    def centred_sums():
        centred = _masked(inputs - tf.reshape(shift, broadcast), mask,
                          channel_axis)
        return (tf.reduce_sum(centred, axis=axes),
                _sum_of_squares(centred, axes))

    def raw_sums():
        total = tf.reduce_sum(inputs, axis=axes)
        square_total = _sum_of_squares(inputs, axes)
        return (total - count * shift,
                square_total - shift * (2.0 * total - count * shift))

    if mask is not None or variance is None or (rank == 2 and not _in_xla()):
        return (count, *centred_sums())
    raw = tf.reduce_all(tf.square(shift) <= RAW_SUMS_MAX_RATIO * variance)
    return (count, *tf.cond(raw, raw_sums, centred_sums))


def shift_sums(inputs, channel_axis, mask=None):
    """Per-channel `(total, count)` of some of the batch's own values: the
    shift `total / count` of a layer's first statistics update, which has
    no running mean yet, so that its sums are centred whatever the inputs'
    offset (such as years or Unix times).

    Of the first example's values (a slice, cheap); given a Keras mask
    (see `input_sums`), of all unmasked values, since the first example
    may be all padding; of a `tf.SparseTensor`, of all values, from the
    stored ones. No values give `(0, 0)`. Summed over replicas, the totals
    and counts give one shift for all of them.
    """
    if isinstance(inputs, tf.SparseTensor):
        shape = tf.cast(inputs.dense_shape, tf.float32)
        total = tf.math.unsorted_segment_sum(
            tf.cast(tf.stop_gradient(inputs.values), tf.float32),
            inputs.indices[:, channel_axis], inputs.dense_shape[channel_axis])
        return total, tf.reduce_prod(shape) / shape[channel_axis]
    inputs = tf.cast(tf.stop_gradient(inputs), tf.float32)
    rank = inputs.shape.rank
    channel_axis %= rank
    axes = [axis for axis in range(rank) if axis != channel_axis]
    mask = _position_mask(mask, rank)
    if mask is None:
        inputs = inputs[:1]  # the first example (none in an empty batch)
        count = tf.size(inputs) // tf.shape(inputs)[channel_axis]
    else:
        inputs = _masked(inputs, mask, channel_axis)
        count = tf.reduce_sum(tf.cast(mask, tf.int32))
    return tf.reduce_sum(inputs, axis=axes), tf.cast(count, tf.float32)


def _position_mask(mask, rank):
    """A Keras mask if it describes the positions of an input of `rank`
    (its shape without the channel axis), else `None`."""
    return mask if mask is not None and mask.shape.rank == rank - 1 else None


def _masked(inputs, mask, channel_axis):
    """`inputs` with the positions `mask` leaves out set to 0 (even
    non-finite ones)."""
    if mask is None:
        return inputs
    keep = tf.expand_dims(tf.cast(mask, tf.bool), channel_axis)
    return tf.where(keep, inputs, 0.0)


def _sparse_sums(inputs, channel_axis, shift):
    """`input_sums` of a sparse tensor (without repeated indices): the
    stored values' centred sums, plus `-shift` and `shift^2` once for each
    implicit zero of the channel."""
    shape = tf.cast(inputs.dense_shape, tf.float32)
    count = tf.reduce_prod(shape) / shape[channel_axis]
    channels = inputs.indices[:, channel_axis]
    centred = tf.cast(tf.stop_gradient(inputs.values), tf.float32) - tf.gather(
        shift, channels)

    def per_channel(values):
        return tf.math.unsorted_segment_sum(
            values, channels, tf.shape(shift)[0])

    zeros = count - per_channel(tf.ones_like(centred))
    return (count,
            per_channel(centred) - zeros * shift,
            per_channel(tf.square(centred)) + zeros * tf.square(shift))


def _sum_of_squares(x, axes):
    """`sum(x^2)` over `axes`.

    For inputs with spatial axes (convolutions), as the squared Euclidean
    norm: one pass that does not write `x^2` out (squaring the norm adds
    about one rounding). For a batch of vectors, as square then sum: on CPU,
    TensorFlow's `EuclideanNorm` starts using several threads at a smaller
    size than `Sum`, which was slower for Dense inputs such as `(128, 784)`
    (measured on 2 cores; see docs/benchmarks.md). Also as square then sum
    in a step compiled with XLA (`jit_compile=True`), which fuses them and
    has no `EuclideanNorm` kernel.
    """
    if x.shape.rank == 2 or _in_xla():
        return tf.reduce_sum(tf.square(x), axis=axes)
    return tf.square(tf.math.reduce_euclidean_norm(x, axis=axes))


def _in_xla():
    """Whether ops are being traced for XLA (`jit_compile=True`)."""
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def moments_from_sums(count, centred_sum, centred_square_sum, shift):
    """Mean and population variance from the output of `input_sums`."""
    centred_mean = centred_sum / count
    variance = tf.maximum(
        centred_square_sum / count - tf.square(centred_mean), 0.0
    )
    return shift + centred_mean, variance


def update_moving(
    moving_mean, moving_variance, moving_count, mean, variance, count, momentum
):
    """One step of the count-weighted moving averages.

    With `moving_count = momentum * moving_count + count`, the new batch gets
    weight `w = count / moving_count`: the first update (and every update
    with momentum 0) returns the batch statistics exactly. The variance is
    that of the weighted mixture of the old estimate and the batch:

        moving_variance = (1 - w) * moving_variance + w * variance
                          + w * (1 - w) * (mean - moving_mean) ** 2

    Returns:
        `(moving_mean, moving_variance, moving_count)` after the update.
    """
    moving_count = tf.cast(momentum, tf.float32) * moving_count + count
    weight = count / moving_count
    delta = mean - moving_mean
    new_mean = (1.0 - weight) * moving_mean + weight * mean
    new_variance = (
        (1.0 - weight) * moving_variance
        + weight * variance
        + weight * (1.0 - weight) * tf.square(delta)
    )
    return new_mean, new_variance, moving_count
