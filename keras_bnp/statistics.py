"""Batch moments of layer inputs and the running-statistics update.

Everything is float32, whatever the input dtype. The running statistics are
the bias-corrected exponential moving averages of the raw moments `E[x]` and
`E[x^2]` (as Adam corrects its moments), stored in centred form
`(moving_mean, moving_variance)`: the same numbers, without the cancellation
of `E[x^2] - E[x]^2` in float32 when `|mean| >> std`.
"""

import tensorflow as tf


def input_sums(inputs, channel_axis, shift):
    """Per-channel `(count, sum(x - shift), sum((x - shift)^2))` of `inputs`.

    One pass over the input. `shift` (shape `(channels,)`, normally the
    running mean) only improves float32 accuracy; it cancels in
    `moments_from_sums`. `count` is the number of values per channel.
    """
    inputs = tf.cast(tf.stop_gradient(inputs), tf.float32)
    rank = inputs.shape.rank
    channel_axis %= rank
    broadcast = [1] * rank
    broadcast[channel_axis] = -1
    centred = inputs - tf.reshape(shift, broadcast)
    axes = [axis for axis in range(rank) if axis != channel_axis]
    count = tf.cast(tf.size(inputs), tf.float32) / tf.cast(
        tf.shape(inputs)[channel_axis], tf.float32
    )
    return (
        count,
        tf.reduce_sum(centred, axis=axes),
        tf.reduce_sum(tf.square(centred), axis=axes),
    )


def moments_from_sums(count, centred_sum, centred_square_sum, shift):
    """Mean and population variance from the output of `input_sums`."""
    centred_mean = centred_sum / count
    variance = tf.maximum(
        centred_square_sum / count - tf.square(centred_mean), 0.0
    )
    return shift + centred_mean, variance


def update_moving(moving_mean, moving_variance, steps, mean, variance, momentum):
    """One bias-corrected EMA step of the statistics.

    `steps` is the number of updates so far. The new batch gets weight
    `w = (1 - momentum) / (1 - momentum ** (steps + 1))`, which is the Adam
    bias correction; the first update (and every update with momentum 0)
    returns the batch statistics exactly. The variance is that of the
    weighted mixture of the old estimate and the batch:

        moving_variance = (1 - w) * moving_variance + w * variance
                          + w * (1 - w) * (mean - moving_mean) ** 2

    Returns:
        `(moving_mean, moving_variance)` after the update.
    """
    momentum = tf.cast(momentum, tf.float32)
    weight = (1.0 - momentum) / (1.0 - tf.pow(momentum, steps + 1.0))
    delta = mean - moving_mean
    new_mean = (1.0 - weight) * moving_mean + weight * mean
    new_variance = (
        (1.0 - weight) * moving_variance
        + weight * variance
        + weight * (1.0 - weight) * tf.square(delta)
    )
    return new_mean, new_variance
