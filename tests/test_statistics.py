import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import shifted_inputs

from keras_bnp import _reference
from keras_bnp import statistics


def _compiled(function, jit_compile):
    """`function` itself, or compiled with XLA as in a jit-compiled step."""
    return tf.function(function, jit_compile=True) if jit_compile else function


def _moments(inputs, channel_axis, shift, variance=None, jit_compile=False):
    """Pooled moments through `input_sums`: eagerly, or in a function
    compiled with XLA (`jit_compile=True`) as in a jit-compiled step."""

    def moments(inputs):
        sums = [statistics.input_sums(x, channel_axis, shift, variance)
                for x in inputs]
        count, s1, s2 = (tf.add_n(list(p)) for p in zip(*sums))
        return count, statistics.moments_from_sums(count, s1, s2, shift)

    return _compiled(moments, jit_compile)([tf.constant(x) for x in inputs])


# A running variance of 1e3 makes `input_sums` use raw sums here (every
# shift^2 < 16e3) for inputs with spatial axes, and for rank-2 inputs under
# XLA; None always centres.
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("running_variance", [None, 1e3])
@pytest.mark.parametrize(
    "shape, channel_axis",
    [((7, 3), -1), ((2, 5, 4), -1), ((2, 3, 4, 5), -1), ((2, 3, 4, 5), 1),
     ((2, 3, 2, 2, 2), 1)],
)
def test_pooled_moments_match_numpy(
    shape, channel_axis, running_variance, jit_compile
):
    rng = np.random.default_rng(0)
    inputs = [shifted_inputs(rng, shape, channel_axis) for _ in range(2)]
    channels = shape[channel_axis]
    shift = tf.constant(rng.normal(size=channels), tf.float32)
    count, (mean, variance) = _moments(inputs, channel_axis, shift,
                                       running_variance, jit_compile)
    want_mean, want_variance = _reference.batch_moments(inputs, channel_axis)
    assert float(count) == 2 * np.prod(shape) / channels
    assert_allclose(mean, want_mean, atol=1e-5, rtol=1e-5)
    assert_allclose(variance, want_variance, atol=1e-5, rtol=1e-5)


def test_float16_inputs_are_reduced_in_float32():
    # 4096 values of 1.0 sum to 4096; float16 cannot represent 4097, so a
    # float16 sum of 4097 ones would stall at 4096.
    inputs = np.ones((4097, 1), np.float16)
    count, s1, s2 = statistics.input_sums(
        tf.constant(inputs), -1, tf.zeros(1)
    )
    assert s1.dtype == tf.float32
    assert float(s1[0]) == 4097.0 and float(s2[0]) == 4097.0


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("running_variance", [None, 0.01])
@pytest.mark.parametrize("shape", [(512, 1), (8, 8, 8, 1)])
def test_large_offset_keeps_variance_accurate(
    shape, running_variance, jit_compile
):
    # mean 1000, std 0.1: E[x^2] - E[x]^2 in float32 loses the variance
    # (float32 spacing at 1e6 is 0.0625); shifting by the running mean keeps
    # it, for dense and convolution inputs. With the running variance 0.01,
    # 999.9^2 > 16 * 0.01, so `input_sums` must centre.
    rng = np.random.default_rng(0)
    x = (1000.0 + 0.1 * rng.normal(size=shape)).astype("float32")
    shift = tf.constant([999.9])
    _, (mean, variance) = _moments([x], -1, shift, running_variance,
                                   jit_compile)
    want = x.reshape(-1, 1).astype("float64")
    assert_allclose(variance, want.var(0), rtol=1e-3, atol=0)
    assert_allclose(mean, want.mean(0), rtol=1e-6, atol=0)
    # A running variance of 1e6 allows raw sums, which lose it (the reason
    # for the switch); outside XLA a batch of vectors is always centred,
    # so it keeps it.
    _, (_, loose_variance) = _moments([x], -1, shift, 1e6, jit_compile)
    error = abs(float(loose_variance[0]) - want.var())
    if len(shape) == 2 and not jit_compile:
        assert error < 1e-3 * want.var()
    else:
        assert error > 0.1 * want.var()


@pytest.mark.parametrize("shape", [(4, 2), (2, 2, 1, 2)])
@pytest.mark.parametrize("shift", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_sums_of_non_finite_inputs_are_non_finite(
    jit_compile, bad, shift, shape
):
    # The optimizer skips a batch whose sum of squares is not finite; both
    # paths must keep that so: the centred one (Dense inputs in a graph)
    # and the raw one (convolution inputs, summed as a norm, and under XLA
    # every input; Inf - Inf is NaN, also non-finite).
    x = np.ones(shape, np.float32)
    x[(1,) + (0,) * (len(shape) - 1)] = bad

    def square_sum(x):
        return statistics.input_sums(
            x, -1, tf.constant([shift, shift]), tf.constant(1e3))[2]

    total = _compiled(square_sum, jit_compile)(tf.constant(x)).numpy()
    assert not np.isfinite(total[0]) and np.isfinite(total[1])


@pytest.mark.parametrize("shape", [(0, 3), (0, 4, 4, 3), (1, 1, 3)])
def test_empty_and_single_value_batches(shape):
    # No values: all sums 0, so summing across replicas adds nothing. One
    # value: its deviation from the shift, squared.
    x = np.arange(np.prod(shape), dtype="float32").reshape(shape) + 1.0
    shift = tf.constant([0.5, 1.0, 1.5])
    count, s1, s2 = statistics.input_sums(tf.constant(x), -1, shift)
    deviation = x.reshape(-1, 3) - shift.numpy()
    assert float(count) == deviation.shape[0]
    assert_allclose(s1, deviation.sum(0), atol=1e-6, rtol=1e-6)
    assert_allclose(s2, (deviation**2).sum(0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_update_matches_raw_sum_reference(momentum):
    # Uneven batch sizes (1 to 4 rows), as at the end of an epoch.
    rng = np.random.default_rng(1)
    channels = 4
    reference = _reference.RawMomentStatistics(channels, momentum)
    mean, variance, count = tf.zeros(channels), tf.ones(channels), 0.0
    for _ in range(60):
        batch = shifted_inputs(rng, (int(rng.integers(1, 5)), channels))
        batch_mean, batch_variance = _reference.batch_moments([batch], -1)
        mean, variance, count = statistics.update_moving(
            mean, variance, count, tf.constant(batch_mean, tf.float32),
            tf.constant(batch_variance, tf.float32), float(len(batch)),
            momentum,
        )
        reference.update([batch], -1)
        assert_allclose(count, reference.count, atol=1e-5, rtol=1e-5)
        assert_allclose(mean, reference.mean, atol=1e-5, rtol=1e-5)
        assert_allclose(variance, reference.variance, atol=1e-5, rtol=1e-5)


def test_equal_batches_give_adam_bias_correction():
    # For equal batch sizes the count normalizer is Adam's 1 - beta^t: the
    # mean after batches with means 1, 2, 3 is their EMA over (1 - beta^3).
    beta = 0.9
    mean, variance, count = tf.zeros(1), tf.zeros(1), 0.0
    for value in (1.0, 2.0, 3.0):
        mean, variance, count = statistics.update_moving(
            mean, variance, count, tf.constant([value]), tf.zeros(1), 8.0,
            beta,
        )
    ema = (1 - beta) * (beta**2 * 1.0 + beta * 2.0 + 3.0)
    assert_allclose(mean, [ema / (1 - beta**3)])
    assert_allclose(count, 8.0 * (1 - beta**3) / (1 - beta), rtol=1e-6)


@pytest.mark.parametrize(
    "first, second, momentum, want",
    [
        # A full batch of 6 values at 0, then a last batch of 2 values at 3:
        # weights 0.5 * 6 = 3 against 2, so the mean is 6/5 and the variance
        # (3/5)(2/5)(3 - 0)^2.
        ((0.0, 6.0), (3.0, 2.0), 0.5,
         (6.0 / 5.0, (3 / 5) * (2 / 5) * 9.0, 5.0)),
        # Batch size one: single values 0 and 2, weights 1/3 and 2/3, so
        # mean 4/3 and variance (1/3)(2/3)(2 - 0)^2 = 8/9; count 0.5 + 1.
        ((0.0, 1.0), (2.0, 1.0), 0.5, (4.0 / 3.0, 8.0 / 9.0, 1.5)),
    ],
    ids=["smaller_last_batch_weighted_by_size", "batch_size_one"],
)
def test_two_updates_give_the_weighted_mixture(first, second, momentum, want):
    # Zero-variance batches: all of the variance comes from the averaging.
    mean, variance, count = tf.ones(1), tf.ones(1), 0.0
    for value, size in (first, second):
        mean, variance, count = statistics.update_moving(
            mean, variance, count, tf.constant([value]), tf.zeros(1), size,
            momentum,
        )
    want_mean, want_variance, want_count = want
    assert_allclose(mean, [want_mean])
    assert_allclose(variance, [want_variance])
    assert_allclose(count, want_count)


def test_first_update_and_zero_momentum_return_the_batch():
    batch_mean = tf.constant([1.0, -2.0])
    batch_variance = tf.constant([0.5, 4.0])
    for momentum, moving_count in [(0.99, 0.0), (0.0, 0.0), (0.0, 17.0)]:
        mean, variance, _ = statistics.update_moving(
            tf.constant([5.0, 5.0]), tf.constant([9.0, 9.0]), moving_count,
            batch_mean, batch_variance, 3.0, momentum,
        )
        assert_allclose(mean, batch_mean)
        assert_allclose(variance, batch_variance)


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 4)])
def test_sparse_inputs_count_their_implicit_zeros(shape):
    # A Dense layer's sparse input is the dense tensor with its zeros: the
    # sums must equal those of the dense tensor, also with a stored zero, a
    # channel with no stored value, and a shift far from the values (the
    # zeros contribute -shift and shift^2 each, exactly).
    rng = np.random.default_rng(0)
    x = np.where(rng.uniform(size=shape) < 0.4,
                 rng.normal(size=shape) + 3.0, 0.0).astype("float32")
    x[..., 3] = 0.0  # no stored value in channel 3
    sparse = tf.sparse.from_dense(x)
    stored_zero = tf.sparse.SparseTensor(  # channel 2's zero, stored
        [(0,) * (len(shape) - 1) + (2,)], [0.0], shape)
    sparse = tf.sparse.reorder(tf.sparse.add(sparse, stored_zero))
    assert sparse.values.shape[0] == np.count_nonzero(x) + (
        x[(0,) * (len(shape) - 1) + (2,)] == 0)
    shift = np.array([0.5, -2.0, 100.0, 1.0], np.float32)
    count, s1, s2 = statistics.input_sums(sparse, -1, tf.constant(shift))
    deviation = x.reshape(-1, 4).astype("float64") - shift
    assert float(count) == deviation.shape[0]
    assert_allclose(s1, deviation.sum(0), atol=1e-5, rtol=1e-6)
    assert_allclose(s2, (deviation**2).sum(0), atol=1e-5, rtol=1e-6)
    # A non-finite stored value makes its channel's sum of squares so.
    bad = tf.sparse.SparseTensor(sparse.indices, tf.tensor_scatter_nd_update(
        sparse.values, [[0]], [np.nan]), sparse.dense_shape)
    channel = int(sparse.indices[0, -1])
    total = statistics.input_sums(bad, -1, tf.constant(shift))[2].numpy()
    assert np.isnan(total[channel])
    assert np.isfinite(np.delete(total, channel)).all()


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("channel_axis", [-1, 1])
def test_masked_positions_are_left_out(channel_axis, jit_compile):
    # A Keras mask over (batch, time): the sums are those of the unmasked
    # positions only; a NaN at a masked position changes nothing.
    rng = np.random.default_rng(0)
    shape = (3, 5, 4) if channel_axis == -1 else (3, 4, 5)
    x = shifted_inputs(rng, shape, channel_axis)
    mask = rng.uniform(size=(3, 5)) < 0.6
    mask[0, 0], mask[1, 0] = True, False
    values = x if channel_axis == -1 else np.swapaxes(x, 1, 2)
    values[1, 0, 2] = np.nan  # masked
    x = values if channel_axis == -1 else np.swapaxes(values, 1, 2)
    shift = np.array([0.5, -1.0, 2.0, 0.0], np.float32)

    def sums(x, mask):
        return statistics.input_sums(x, channel_axis, tf.constant(shift),
                                     tf.constant(1e3), mask)

    count, s1, s2 = _compiled(sums, jit_compile)(tf.constant(x),
                                                  tf.constant(mask))
    deviation = values[mask].astype("float64") - shift
    assert float(count) == mask.sum()
    assert_allclose(s1, deviation.sum(0), atol=1e-5, rtol=1e-6)
    assert_allclose(s2, (deviation**2).sum(0), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_shift_sums_take_values_of_the_batch(jit_compile):
    # The first example's values; with a mask, all unmasked ones (a NaN at
    # a masked position, and a first example all padding, change nothing);
    # of a sparse tensor, all values; of an empty batch, none.
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (3, 5, 4)) + 1e6
    mask = rng.uniform(size=(3, 5)) < 0.6
    mask[0], mask[1, 0] = False, True
    x[0, 0, 1] = np.nan
    sums = _compiled(lambda x, mask=None: statistics.shift_sums(x, -1, mask),
                     jit_compile)
    total, count = sums(tf.constant(x))
    assert float(count) == 5
    assert_allclose(total[2:], x[0, :, 2:].astype("float64").sum(0),
                    rtol=1e-7, atol=0)
    total, count = sums(tf.constant(x), tf.constant(mask))
    assert float(count) == mask.sum()
    assert_allclose(total, x[mask].astype("float64").sum(0), rtol=1e-7,
                    atol=0)
    total, count = sums(tf.constant(x[:0]))
    assert float(count) == 0 and np.all(total.numpy() == 0)
    dense = np.where(rng.uniform(size=(6, 4)) < 0.5, 3.0, 0.0)
    total, count = statistics.shift_sums(tf.sparse.from_dense(dense), -1)
    assert float(count) == 6
    assert_allclose(total, dense.sum(0), atol=0, rtol=0)


def _weighted_sums(values, weights, shift):
    """NumPy `(count, sum(w (x - shift)), sum(w (x - shift)^2))` of rows
    `values` (positions, channels) with weights `weights` (positions,),
    leaving out the rows of weight 0 (even NaN ones)."""
    keep = weights > 0
    deviation = values[keep].astype("float64") - shift
    w = weights[keep].astype("float64")
    return w.sum(), w @ deviation, w @ deviation**2


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("case", ["dense", "sequence_per_example",
                                  "sequence_per_step", "conv_channels_first",
                                  "masked_sequence"])
def test_sample_weights_weigh_each_example(case, jit_compile):
    # Offsets far from zero; the rows of weight 0 hold values of 100 (and a
    # NaN), which must change nothing.
    rng = np.random.default_rng(0)
    shape, axis, weight_shape = {
        "dense": ((8, 4), -1, (8,)),
        "sequence_per_example": ((8, 5, 4), -1, (8,)),
        "sequence_per_step": ((8, 5, 4), -1, (8, 5)),
        "conv_channels_first": ((8, 4, 3, 3), 1, (8,)),
        "masked_sequence": ((8, 5, 4), -1, (8,)),
    }[case]
    x = shifted_inputs(rng, shape, axis) + 1e4
    weights = rng.uniform(0.5, 3.0, weight_shape).astype("float32")
    weights[:3] = 0.0
    x[:3] = 100.0
    x[1].flat[0] = np.nan
    values = np.moveaxis(x, axis, -1)
    position_weights = np.broadcast_to(
        weights.reshape(weights.shape + (1,) * (values.ndim - 1
                                                 - weights.ndim)),
        values.shape[:-1]).copy()
    mask = None
    if case == "masked_sequence":
        mask = rng.uniform(size=shape[:2]) < 0.7
        position_weights *= mask
    shift = (values[3:].reshape(-1, 4).mean(0) + 0.5).astype("float32")

    def sums(x, weights, mask=None):
        return statistics.input_sums(x, axis, tf.constant(shift),
                                     tf.constant(1e3), mask, weights)

    arguments = [tf.constant(x), tf.constant(weights)] + (
        [] if mask is None else [tf.constant(mask)])
    count, s1, s2 = _compiled(sums, jit_compile)(*arguments)
    expected = _weighted_sums(values.reshape(-1, 4),
                              position_weights.reshape(-1), shift)
    assert_allclose(count, expected[0], rtol=1e-6, atol=0)
    assert_allclose(s1, expected[1], rtol=1e-5, atol=1e-3)
    assert_allclose(s2, expected[2], rtol=1e-5, atol=1e-3)
    total, count = _compiled(
        lambda x, w, mask=None: statistics.shift_sums(x, axis, mask, w),
        jit_compile)(*arguments)
    w = position_weights.reshape(-1)
    assert_allclose(total, w[w > 0] @ values.reshape(-1, 4)[w > 0],
                    rtol=1e-6, atol=0)


def test_sample_weights_of_another_batch_axis_are_not_used():
    # A layer that sees the batch reshaped (inside TimeDistributed) or
    # stacked with itself: statically known or only when run, the
    # statistics stay unweighted.
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (12, 4)) + 50.0
    weights = np.array([0.0, 1.0, 2.0, 1.0], np.float32)
    shift = tf.constant(np.zeros(4, np.float32))
    unweighted = [t.numpy() for t in statistics.input_sums(tf.constant(x),
                                                           -1, shift)]
    static = statistics.input_sums(tf.constant(x), -1, shift,
                                   weights=tf.constant(weights))
    dynamic = tf.function(
        lambda x, w: statistics.input_sums(x, -1, shift, weights=w),
        input_signature=[tf.TensorSpec((None, 4)), tf.TensorSpec((None,))])(
            tf.constant(x), tf.constant(weights))
    for sums in (static, dynamic):
        for a, b in zip(sums, unweighted):
            assert_allclose(a, b, rtol=0, atol=0)


def test_sparse_rows_are_weighted():
    rng = np.random.default_rng(0)
    dense = np.where(rng.uniform(size=(6, 4)) < 0.5,
                     rng.normal(size=(6, 4)) + 3.0, 0.0).astype("float32")
    weights = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 3.0], np.float32)
    shift = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
    count, s1, s2 = statistics.input_sums(
        tf.sparse.from_dense(dense), -1, tf.constant(shift),
        weights=tf.constant(weights))
    expected = _weighted_sums(dense, weights, shift)
    assert_allclose(count, expected[0], rtol=0, atol=0)
    assert_allclose(s1, expected[1], rtol=1e-6, atol=1e-6)
    assert_allclose(s2, expected[2], rtol=1e-6, atol=1e-6)


def test_several_outputs_weights_are_averaged_per_example():
    weights = statistics.position_weights(
        {"a": np.array([0.0, 2.0, 4.0], np.float32),
         "b": np.array([[0.0, 0.0], [1.0, 3.0], [0.0, 2.0]], np.float32)})
    assert_allclose(weights, [0.0, 2.0, 2.5], rtol=0, atol=0)
    assert statistics.position_weights(None) is None
    assert statistics.position_weights({"a": None}) is None


def test_float64_inputs_keep_float64_sums():
    # 1e4 +- 1e-3: float32 cannot tell the values apart.
    x = 1e4 + np.random.default_rng(0).normal(0, 1e-3, (64, 3))
    shift = tf.constant(np.full(3, 1e4))
    count, s1, s2 = statistics.input_sums(tf.constant(x), -1, shift)
    assert s1.dtype == tf.float64
    _, variance = statistics.moments_from_sums(count, s1, s2, shift)
    assert_allclose(variance, x.var(0), rtol=1e-9, atol=0)
