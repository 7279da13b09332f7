"""Batch moments of layer inputs and the running-statistics update.

Everything is float32 (float64 for a float64 layer), whatever the input
dtype. The running statistics are
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

from keras_bnp import _compat

# `input_sums` may skip centring when every channel's running mean is within
# this factor of its running variance: shift^2 <= RAW_SUMS_MAX_RATIO * var.
RAW_SUMS_MAX_RATIO = 16.0


def input_sums(inputs, channel_axis, shift, variance=None, mask=None,
               weights=None):
    """Per-channel `(count, sum(x - shift), sum((x - shift)^2))` of `inputs`,
    in the dtype of `shift`.

    `shift` (shape `(channels,)`, normally the running mean) only improves
    rounding; it cancels in `moments_from_sums`. `count` is the number of
    values per channel (their total weight, given `mask` or `weights`).

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
    positions out, even non-finite ones. A mask of another rank does not
    describe the input's positions and is not used. `weights` (the step's
    sample weights, see `position_weights`) weigh each example's values;
    a weight of 0 leaves them out, even non-finite ones.
    """
    dtype = shift.dtype
    if isinstance(inputs, tf.SparseTensor):
        return _sparse_sums(inputs, channel_axis, shift, weights)
    inputs = tf.cast(tf.stop_gradient(inputs), dtype)
    rank = inputs.shape.rank
    channel_axis %= rank
    broadcast = [1] * rank
    broadcast[channel_axis] = -1
    axes = [axis for axis in range(rank) if axis != channel_axis]
    weight = _weight(inputs, channel_axis, mask, weights)
    if weight is not None:
        count = tf.reduce_sum(weight)
    elif inputs.shape.is_fully_defined():  # a constant: no ops in the step
        count = tf.constant(
            inputs.shape.num_elements() / inputs.shape[channel_axis], dtype)
    else:
        count = tf.cast(tf.size(inputs), dtype) / tf.cast(
            tf.shape(inputs)[channel_axis], dtype
        )

    def centred_sums():
        centred = inputs - tf.reshape(shift, broadcast)
        if weight is None:
            return (tf.reduce_sum(centred, axis=axes),
                    _sum_of_squares(centred, axes))
        weight_view = tf.expand_dims(weight, channel_axis)
        centred = tf.where(weight_view > 0, centred, tf.zeros((), dtype))
        weighted = weight_view * centred
        return (tf.reduce_sum(weighted, axis=axes),
                tf.reduce_sum(weighted * centred, axis=axes))

    def raw_sums():
        total = tf.reduce_sum(inputs, axis=axes)
        square_total = _sum_of_squares(inputs, axes)
        return (total - count * shift,
                square_total - shift * (2.0 * total - count * shift))

    if weight is not None or variance is None or (
            rank == 2 and not _in_xla()):
        return (count, *centred_sums())
    raw = tf.reduce_all(tf.square(shift) <= RAW_SUMS_MAX_RATIO * variance)
    return (count, *tf.cond(raw, raw_sums, centred_sums))


def shift_sums(inputs, channel_axis, mask=None, weights=None,
               dtype=tf.float32):
    """Per-channel `(total, count)` of some of the batch's own values: the
    shift `total / count` of a layer's first statistics update, which has
    no running mean yet, so that its sums are centred whatever the inputs'
    offset (such as years or Unix times).

    Of the first example's values (a slice, cheap); given a Keras mask or
    sample weights (see `input_sums`), their weighted sum over all values,
    since the first example may be padding; of a `tf.SparseTensor`, of all
    values, from the stored ones. No values give `(0, 0)`. Summed over
    replicas, the totals and counts give one shift for all of them.
    """
    if isinstance(inputs, tf.SparseTensor):
        shape = tf.cast(inputs.dense_shape, dtype)
        total = tf.math.unsorted_segment_sum(
            tf.cast(tf.stop_gradient(inputs.values), dtype),
            inputs.indices[:, channel_axis], inputs.dense_shape[channel_axis])
        return total, tf.reduce_prod(shape) / shape[channel_axis]
    inputs = tf.cast(tf.stop_gradient(inputs), dtype)
    rank = inputs.shape.rank
    channel_axis %= rank
    axes = [axis for axis in range(rank) if axis != channel_axis]
    weight = _weight(inputs, channel_axis, mask, weights)
    if weight is None:
        inputs = inputs[:1]  # the first example (none in an empty batch)
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[channel_axis],
                        dtype)
        return tf.reduce_sum(inputs, axis=axes), count
    weight_view = tf.expand_dims(weight, channel_axis)
    inputs = tf.where(weight_view > 0, inputs, tf.zeros((), dtype))
    return (tf.reduce_sum(weight_view * inputs, axis=axes),
            tf.reduce_sum(weight))


def position_weights(sample_weight):
    """The sample weights of a training step as the statistics use them: a
    float tensor whose first axis is the batch's (or `None`). A structure
    of weights (one per output of a model) gives each example the mean of
    its outputs' weights, each averaged over any axes after the batch's."""
    if sample_weight is None:
        return None
    flat = [tf.cast(w, tf.float32) for w in tf.nest.flatten(sample_weight)
            if w is not None]
    if not flat:
        return None
    if len(flat) == 1:
        return flat[0]
    return tf.add_n([_per_example(w) for w in flat]) / len(flat)


def _per_example(weights):
    """`weights` averaged over every axis after the first."""
    return (weights if weights.shape.rank == 1 else
            tf.reduce_mean(weights, axis=list(range(1, weights.shape.rank))))


def _weight(inputs, channel_axis, mask, weights):
    """The weight of each position of `inputs` (its shape without the
    channel axis), from a Keras mask of that shape and the step's
    `position_weights`; `None` without either.

    Weights of shape `(batch, ...)` apply to the positions whose leading
    axes they match (per example, or per time step of a sequence);
    otherwise they are averaged per example first. They apply only to an
    input whose first axis is the batch's: a layer that sees the batch
    reshaped (inside `TimeDistributed`, say) or concatenated with itself
    keeps unweighted statistics.
    """
    dtype = inputs.dtype
    rank = inputs.shape.rank
    weight = None
    if mask is not None and mask.shape.rank == rank - 1:
        weight = tf.cast(mask, dtype)
    if weights is None or channel_axis == 0:
        return weight
    static = inputs.shape
    positions = [axis for axis in range(rank) if axis != channel_axis]
    weights = tf.cast(weights, dtype)
    if (weights.shape.rank > len(positions)
            or not all(a is None or b is None or a == b for a, b in zip(
                weights.shape, [static[axis] for axis in positions]))):
        weights = _per_example(weights)
    batch, weights_batch = static[0], weights.shape[0]
    if batch is not None and weights_batch is not None:
        if batch != weights_batch:
            return weight  # another batch axis
    else:  # known only when run
        shape = tf.shape(inputs)
        ones = tf.ones(tf.concat([shape[:1], tf.shape(weights)[1:]], 0),
                       dtype)
        weights = tf.cond(tf.equal(tf.shape(weights)[0], shape[0]),
                          lambda: weights, lambda: ones)
    weights = tf.reshape(weights, tf.concat([
        tf.shape(weights),
        tf.ones([len(positions) - weights.shape.rank], tf.int32)], 0))
    weights = tf.broadcast_to(
        weights, tf.gather(tf.shape(inputs), positions))
    return weights if weight is None else weight * weights


def _sparse_sums(inputs, channel_axis, shift, weights):
    """`input_sums` of a sparse tensor (rows of channels, without repeated
    indices): the stored values' centred sums, plus `-shift` and
    `shift^2` once for each implicit zero of the channel; each row weighted
    by `weights` (per example) if given."""
    dtype = shift.dtype
    shape = tf.cast(inputs.dense_shape, dtype)
    channels = inputs.indices[:, channel_axis]
    centred = tf.cast(tf.stop_gradient(inputs.values), dtype) - tf.gather(
        shift, channels)
    if weights is None:
        count = tf.reduce_prod(shape) / shape[channel_axis]
        value_weight = tf.ones_like(centred)
    else:
        weights = _per_example(tf.cast(weights, dtype))
        count = tf.reduce_sum(weights)
        value_weight = tf.gather(weights, inputs.indices[:, 0])
        centred = tf.where(value_weight > 0, centred, tf.zeros((), dtype))

    def per_channel(values):
        return tf.math.unsorted_segment_sum(
            values, channels, tf.shape(shift)[0])

    zeros = count - per_channel(value_weight)
    return (count,
            per_channel(value_weight * centred) - zeros * shift,
            per_channel(value_weight * tf.square(centred))
            + zeros * tf.square(shift))


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
    # What tf.function itself uses to know that it traces for XLA.
    return _compat.in_xla_context(tf.compat.v1.get_default_graph())


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
    moving_count = momentum * moving_count + count
    weight = count / moving_count
    delta = mean - moving_mean
    new_mean = (1.0 - weight) * moving_mean + weight * mean
    new_variance = (
        (1.0 - weight) * moving_variance
        + weight * variance
        + weight * (1.0 - weight) * tf.square(delta)
    )
    return new_mean, new_variance, moving_count
