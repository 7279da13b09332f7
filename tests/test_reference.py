"""Every layer kind's rule against the NumPy reference, from one table.

A row is one layer configuration: `(layer factory, input shape without
batch, inputs, reference)`. `inputs(rng, shape)` draws a batch like real
data (channels or entries with offsets far from zero and scales far from
one). `reference(layer, x, grads, weights, statistics)` is the kind's NumPy
maths (`keras_bnp._reference`, written from the definitions): it updates
`statistics` (block name, as `BNP.layer_statistics` takes it, to a
`_reference.RawMomentStatistics`; `None` for a layer of one block) with
batch `x` and returns the preconditioned `grads` (`weights`: the
reference's own, before the step). The test trains the layer for 40 steps
with BNP and checks every block's statistics and the final weights.

Adding a layer kind is its rule in `keras_bnp/rules/` and a row here, with
a reference function if its maths is new. Layers made of other layers
(`MultiHeadAttention`, the recurrent layers) have a whole forward pass as
their reference: `test_rule_einsum.py`, `test_rule_rnn.py`.
"""

import keras
import numpy as np
import pytest
from helpers import REFERENCE_BETA
from helpers import REFERENCE_EPSILON
from helpers import assert_statistics_match
from helpers import channel_offset_inputs
from helpers import check_reference_steps
from helpers import depthwise_of
from helpers import entrywise_inputs
from helpers import shifted_inputs
from helpers import skip_unless_tensorflow_runs

from keras_bnp import _reference

L = keras.layers


def _channel_axis(layer):
    return 1 if getattr(layer, "data_format", None) == "channels_first" else -1


def _updated(statistics, block, features, axis=-1):
    stats = statistics.setdefault(block, _reference.RawMomentStatistics(
        features.shape[axis], REFERENCE_BETA))
    stats.update([features], axis)
    return stats


def _damping(stats):
    return _reference.damping(stats.mean, stats.variance, REFERENCE_EPSILON)


def _precondition(function, grad_kernel, grad_bias, stats, *args):
    return function(grad_kernel, grad_bias, stats.mean, stats.variance,
                    _damping(stats), *args)


def _bias(layer, grads, index=1):
    return grads[index] if layer.use_bias else None


def dense(layer, x, grads, weights, statistics):
    """Dense and convolutions (grouped too): the input's channels."""
    stats = _updated(statistics, None, x, _channel_axis(layer))
    return _precondition(_reference.precondition, grads[0],
                         _bias(layer, grads), stats,
                         getattr(layer, "groups", 1))


def transposed(layer, x, grads, weights, statistics):
    stats = _updated(statistics, None, x, _channel_axis(layer))
    return _precondition(_reference.precondition_transposed, grads[0],
                         _bias(layer, grads), stats, layer.strides)


def depthwise(layer, x, grads, weights, statistics):
    stats = _updated(statistics, None, x, _channel_axis(layer))
    return _precondition(_reference.depthwise_precondition, grads[0],
                         _bias(layer, grads), stats)


def separable(layer, x, grads, weights, statistics):
    """The depthwise kernel by the rule without bias on the input's
    statistics; the pointwise kernel and the bias by the rule with bias on
    the statistics of the depthwise output, which the reference computes
    with its own weights."""
    axis = _channel_axis(layer)
    depthwise_kernel, pointwise_kernel = weights[:2]
    inputs = _updated(statistics, "depthwise", x, axis)
    hidden = _updated(statistics, "pointwise",
                      depthwise_of(layer, x, depthwise_kernel), axis)
    depthwise_grad, _ = _precondition(_reference.depthwise_precondition,
                                      grads[0], None, inputs)
    pointwise_grad, bias_grad = _precondition(
        _reference.precondition, grads[1].reshape(pointwise_kernel.shape[-2:]),
        _bias(layer, grads, 2), hidden)
    return [depthwise_grad, pointwise_grad.reshape(pointwise_kernel.shape),
            bias_grad]


def einsum(layer, x, grads, weights, statistics):
    stats = _updated(statistics, None,
                     _reference.einsum_features(x, layer.equation))
    return _reference.einsum_precondition(
        grads[0], grads[1] if layer.bias_axes else None, layer.equation,
        layer.bias_axes, stats.mean, stats.variance, _damping(stats))


def grouped_einsum(layer, x, grads, weights, statistics):
    """An axis in the input, the kernel and the output: each of its indices
    a Dense layer of its own, preconditioned with its features' statistics
    and the damping of the whole layer's."""
    groups, fan_in = x.shape[1:]
    stats = _updated(statistics, None, x.reshape(len(x), groups * fan_in))
    parts = [_reference.precondition(
        grads[0][g], grads[1][g] if layer.bias_axes else None,
        stats.mean[g * fan_in:(g + 1) * fan_in],
        stats.variance[g * fan_in:(g + 1) * fan_in], _damping(stats))
        for g in range(groups)]
    kernels, biases = zip(*parts)
    return np.stack(kernels), (np.stack(biases) if layer.bias_axes else None)


def shifted(axis=-1):
    return lambda rng, shape: shifted_inputs(rng, shape, axis)


def offsets(channels_first=False):
    return lambda rng, shape: channel_offset_inputs(rng, shape,
                                                    channels_first)


def einsum_layer(equation, output_shape, bias_axes):
    return lambda: L.EinsumDense(equation, output_shape, bias_axes=bias_axes)


# name: (layer factory, input shape without batch, inputs, reference)
ROWS = {
    "dense": (lambda: L.Dense(3), (5,), shifted(), dense),
    "dense_no_bias": (lambda: L.Dense(3, use_bias=False), (5,), shifted(),
                      dense),
    "dense_3d_input": (lambda: L.Dense(2), (4, 3), shifted(), dense),
    "conv1d": (lambda: L.Conv1D(3, 2), (6, 2), shifted(), dense),
    "conv2d": (lambda: L.Conv2D(2, 3), (5, 5, 3), shifted(), dense),
    "conv2d_same_no_bias": (
        lambda: L.Conv2D(2, 3, padding="same", use_bias=False), (4, 4, 2),
        shifted(), dense),
    "conv2d_channels_first": (
        lambda: L.Conv2D(2, 2, data_format="channels_first"), (3, 4, 4),
        shifted(1), dense),
    "conv2d_groups": (lambda: L.Conv2D(4, 2, groups=2), (4, 4, 4),
                      shifted(), dense),
    "conv1d_dilated_strided": (
        lambda: L.Conv1D(2, 2, dilation_rate=2), (7, 3), shifted(), dense),
    "conv2d_strided_same": (
        lambda: L.Conv2D(3, 3, strides=2, padding="same"), (5, 5, 2),
        shifted(), dense),
    "conv3d": (lambda: L.Conv3D(2, 2), (3, 3, 3, 2), shifted(), dense),
    # Channels first where TensorFlow's CPU kernels lack channels-first
    # Conv2D (oneDNN off).
    "conv3d_channels_first": (
        lambda: L.Conv3D(2, 2, data_format="channels_first"), (3, 2, 4, 5),
        shifted(1), dense),
    "conv3d_channels_first_no_bias": (
        lambda: L.Conv3D(2, 2, data_format="channels_first",
                         use_bias=False),
        (2, 3, 3, 3), shifted(1), dense),
    "transpose1d_valid": (lambda: L.Conv1DTranspose(3, 3), (5, 2),
                          shifted(), transposed),
    "transpose1d_dilated_same_no_bias": (
        lambda: L.Conv1DTranspose(2, 3, dilation_rate=2, padding="same",
                                  use_bias=False),
        (6, 3), shifted(), transposed),
    "transpose2d_strided_same": (
        lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same"),
        (3, 4, 2), shifted(), transposed),
    "transpose2d_strided_output_padding_no_bias": (
        lambda: L.Conv2DTranspose(2, 3, strides=2, output_padding=1,
                                  use_bias=False),
        (3, 3, 3), shifted(), transposed),
    "transpose2d_channels_first": (
        lambda: L.Conv2DTranspose(2, 2, strides=2,
                                  data_format="channels_first"),
        (3, 3, 4), shifted(1), transposed),
    "transpose3d_valid": (lambda: L.Conv3DTranspose(2, 2), (2, 3, 2, 2),
                          shifted(), transposed),
    "transpose3d_strided_channels_first": (
        lambda: L.Conv3DTranspose(2, 2, strides=(1, 2, 2), padding="same",
                                  data_format="channels_first"),
        (2, 2, 3, 2), shifted(1), transposed),
    "depthwise2d": (lambda: L.DepthwiseConv2D(3), (5, 5, 3), offsets(),
                    depthwise),
    "depthwise2d_multiplier2_strided_same": (
        lambda: L.DepthwiseConv2D(3, strides=2, padding="same",
                                  depth_multiplier=2),
        (5, 6, 2), offsets(), depthwise),
    "depthwise2d_channels_first_no_bias": (
        lambda: L.DepthwiseConv2D(2, depth_multiplier=2, use_bias=False,
                                  data_format="channels_first"),
        (3, 4, 4), offsets(True), depthwise),
    "depthwise1d_multiplier2": (
        lambda: L.DepthwiseConv1D(3, depth_multiplier=2), (7, 3), offsets(),
        depthwise),
    "depthwise1d_channels_first_dilated_same": (
        lambda: L.DepthwiseConv1D(2, dilation_rate=2, padding="same",
                                  data_format="channels_first"),
        (3, 7), offsets(True), depthwise),
    "separable2d_multiplier2": (
        lambda: L.SeparableConv2D(3, 3, depth_multiplier=2), (5, 5, 2),
        offsets(), separable),
    "separable2d_strided_same_no_bias": (
        lambda: L.SeparableConv2D(4, 3, strides=2, padding="same",
                                  use_bias=False),
        (6, 5, 3), offsets(), separable),
    "separable2d_channels_first": (
        lambda: L.SeparableConv2D(2, 2, data_format="channels_first"),
        (3, 4, 4), offsets(True), separable),
    "separable2d_strided_dilated": (
        lambda: L.SeparableConv2D(2, 2, strides=2, dilation_rate=2),
        (7, 8, 2), offsets(), separable),
    "separable1d": (lambda: L.SeparableConv1D(3, 2), (6, 3), offsets(),
                    separable),
    "separable1d_channels_first_dilated_multiplier2": (
        lambda: L.SeparableConv1D(2, 2, dilation_rate=2, depth_multiplier=2,
                                  data_format="channels_first"),
        (3, 8), offsets(True), separable),
    "einsum_dense": (einsum_layer("ab,bc->ac", 3, "c"), (5,),
                     entrywise_inputs, einsum),
    "einsum_sequence": (einsum_layer("abc,cd->abd", (4, 3), "d"), (4, 5),
                        entrywise_inputs, einsum),
    "einsum_attention_projection": (
        einsum_layer("abc,cde->abde", (4, 2, 3), "de"), (4, 6),
        entrywise_inputs, einsum),
    "einsum_attention_output": (
        einsum_layer("abcd,cde->abe", (4, 5), "e"), (4, 2, 3),
        entrywise_inputs, einsum),
    "einsum_left_ellipsis": (einsum_layer("...b,bc->...c", 3, "c"),
                             (3, 2, 5), entrywise_inputs, einsum),
    "einsum_right_ellipsis": (einsum_layer("ab...,bc->ac...", (3, 3), "c"),
                              (4, 3), entrywise_inputs, einsum),
    "einsum_partial_bias": (einsum_layer("abc,cde->abde", (4, 2, 3), "e"),
                            (4, 6), entrywise_inputs, einsum),
    "einsum_no_bias": (einsum_layer("abc,cde->abde", (4, 2, 3), None),
                       (4, 6), entrywise_inputs, einsum),
    # The input's contracted axes in another order than the kernel's.
    "einsum_contracted_reordered": (
        einsum_layer("abcd,dce->abe", (4, 5), "e"), (4, 2, 3),
        entrywise_inputs, einsum),
    # The bias' axes in another order than the kernel's.
    "einsum_units_reordered": (
        einsum_layer("abc,ced->abde", (4, 2, 3), "de"), (4, 6),
        entrywise_inputs, einsum),
    # An input axis in neither kernel nor output: the einsum sums it.
    "einsum_summed_axis": (einsum_layer("abc,cd->ad", 3, "d"), (4, 5),
                           entrywise_inputs, einsum),
    # A grouped Dense: 3 groups of 4 features to 2 units each.
    "einsum_grouped": (einsum_layer("bgi,gio->bgo", (3, 2), "go"), (3, 4),
                       entrywise_inputs, grouped_einsum),
    # A kernel per position 'b' (of 4), no bias to centre into.
    "einsum_kernel_per_position": (
        einsum_layer("abc,bcd->abd", (4, 3), None), (4, 5),
        entrywise_inputs, grouped_einsum),
}
# Above 5 s each on 2 cores: in the full tier only.
SLOW = {"conv2d_groups", "conv3d_channels_first",
        "conv3d_channels_first_no_bias",
        *(name for name in ROWS if name.startswith("separable"))}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
    for name in ROWS])
def test_many_steps_match_numpy_reference(name):
    factory, input_shape, inputs, reference = ROWS[name]
    layer = factory()
    skip_unless_tensorflow_runs(layer, input_shape)
    statistics = {}

    def step(optimizer, x, grads, weights):
        new_grads = reference(layer, x, grads, weights, statistics)
        for block, stats in statistics.items():
            assert_statistics_match(optimizer, layer, stats, block)
        return new_grads

    check_reference_steps(layer, input_shape, inputs, step)
