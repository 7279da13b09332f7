"""Batch moments of layer inputs and the running-statistics update.

Everything is float32, whatever the input dtype. The running statistics are
exponential moving averages of the raw sums `n`, `sum(x)`, `sum(x^2)` of each
step's inputs; their ratios give the mean and variance. Dividing by the
averaged count `n` is the start-up bias correction (for equal batch sizes it
is exactly Adam's `1 - momentum ** t`) and weights a smaller batch (the last
of an epoch) by its size. They are stored in centred form `(moving_mean,
moving_variance, moving_count)`: the same numbers, without the cancellation
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
    if inputs.shape.is_fully_defined():  # a constant: no ops in the step
        count = tf.constant(
            inputs.shape.num_elements() / inputs.shape[channel_axis],
            tf.float32)
    else:
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
