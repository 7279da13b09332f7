"""`EinsumDense` and `MultiHeadAttention`: bias layouts, masks, attention's
projections in `fit`, saving. EinsumDense's many-step reference tests are
rows of `test_reference.py`."""


import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import assert_statistics_match
from helpers import custom_step
from helpers import entrywise_inputs
from test_reference import ROWS

import keras_bnp
from keras_bnp import _reference
from keras_bnp import coverage
from keras_bnp import initialization
from keras_bnp import rules


def test_bias_layout_follows_the_kernels_units():
    # "abc,ced->abde": units in the kernel's order (e, d), the bias (d, e).
    layer = keras.layers.EinsumDense("abc,ced->abde", (4, 2, 3),
                                     bias_axes="de")
    layer.build((None, 4, 6))
    block, = rules.blocks(layer)
    kernel = np.arange(36.0).reshape(6, 3, 2)
    bias = np.arange(6.0).reshape(2, 3)
    grads = [tf.constant(kernel), tf.constant(bias)]
    canonical_kernel, canonical_bias = block.gather(grads)
    # Unit (e, d) is column 2 * e + d of the kernel and bias.
    assert_allclose(canonical_kernel, kernel.reshape(6, 6))
    assert_allclose(canonical_bias, bias.T.reshape(-1))
    back = block.scatter(canonical_kernel, canonical_bias, grads)
    assert_allclose(back[0], kernel)
    assert_allclose(back[1], bias)


@pytest.mark.parametrize("name", ["einsum_grouped",
                                  "einsum_kernel_per_position"])
def test_grouped_kernels_are_covered(name):
    # Their reference steps: rows of `test_reference.py`.
    factory, input_shape, _, _ = ROWS[name]
    model = keras.Sequential([keras.Input(input_shape), factory()])
    assert coverage.coverage(model).kernel_parameters.fraction == 1.0


# Keras warns that EinsumDense does not pass the mask on; it still gets it.
@pytest.mark.filterwarnings("ignore:.*does not support masking")
def test_masked_positions_are_left_out():
    tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0], [2, 4, 6, 1]])
    embedding = keras.layers.Embedding(8, 6, mask_zero=True)
    layer = keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3),
                                     bias_axes="de")
    model = keras.Sequential([keras.Input((4,), dtype="int32"), embedding,
                              layer])
    optimizer = keras_bnp.BNP(statistics_momentum=0.0)
    want = embedding.embeddings.numpy()[tokens[tokens != 0]]
    custom_step(model, optimizer, tokens, np.ones((3, 4, 2, 3), "float32"))
    mean, variance = optimizer.layer_statistics(layer)
    assert_allclose(mean, want.mean(0), atol=1e-6)
    assert_allclose(variance, want.var(0), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
def test_attention_projections_leave_masked_positions_out(jit_compile):
    # MultiHeadAttention removes its inputs' masks before its projections;
    # BNP hands them on: the query's to the query and output projections,
    # the value's to the value and key projections.
    tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0], [2, 4, 6, 1],
                       [6, 6, 2, 0]])
    embedding = keras.layers.Embedding(8, 6, mask_zero=True)
    attention = keras.layers.MultiHeadAttention(2, 3)
    inputs = keras.Input((4,), dtype="int32")
    embedded = embedding(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(
        attention(embedded, embedded)))
    model = keras_bnp.BNPModel(inputs, outputs)
    model.compile(optimizer=keras_bnp.BNP(0.0, statistics_momentum=0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), jit_compile=jit_compile)
    seen = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda step, logs: seen.append(
            _projection_inputs(attention, embedding.embeddings.numpy()[
                tokens], tokens != 0)))
    model.fit(tokens, np.arange(4) % 2, batch_size=4, callbacks=[callback],
              verbose=0)
    keep = tokens != 0
    for name in ("query", "key", "value", "output"):
        layer = getattr(attention, f"_{name}_dense")
        want = _reference.einsum_features(seen[0][name], layer.equation)[
            keep.reshape(-1)]
        mean, variance = model.optimizer.layer_statistics(layer)
        assert_allclose(mean, want.mean(0), atol=1e-5, rtol=1e-5)
        assert_allclose(variance, want.var(0), atol=1e-5, rtol=1e-4)


def test_masked_merged_features_keep_the_mask():
    # Features of two axes: the mask covers the remaining (batch, time).
    layer = keras.layers.EinsumDense("abcd,dce->abe", (4, 5), bias_axes="e")
    layer.build((None, 4, 2, 3))
    block, = rules.blocks(layer)
    x = entrywise_inputs(np.random.default_rng(0), (2, 4, 2, 3))
    inputs = tf.constant(x)
    mask = tf.constant([[True, True, False, False], [True] * 4])
    inputs._keras_mask = mask
    features, axis = block.features(inputs)
    assert axis == 2
    assert features._keras_mask is mask
    # Column d * 2 + c is x[..., c, d] (the kernel's order, d then c).
    assert_allclose(features, np.swapaxes(x, 2, 3).reshape(2, 4, 6))


def _transformer(length, dim, heads, classes):
    """A Transformer encoder block (MultiHeadAttention, LayerNormalization,
    feed-forward Dense) with a pooled classification head."""
    inputs = keras.Input((length, dim))
    attention = keras.layers.MultiHeadAttention(heads, dim // heads)
    hidden = keras.layers.LayerNormalization()(
        inputs + attention(inputs, inputs))
    feed_forward = keras.layers.Dense(2 * dim, activation="relu")(hidden)
    hidden = keras.layers.LayerNormalization()(
        hidden + keras.layers.Dense(dim)(feed_forward))
    outputs = keras.layers.Dense(classes)(
        keras.layers.GlobalAveragePooling1D()(hidden))
    return keras_bnp.BNPModel(inputs, outputs), attention


def _projection_inputs(attention, x, mask=None):
    """In float64 NumPy, from the layer's weights: the inputs of the query,
    key, value and output projections of self-attention on `x`, whose
    positions `mask` (batch, time) leaves out of the keys."""
    w = {name: getattr(attention, f"_{name}_dense").kernel.numpy()
         for name in ("query", "key", "value")}
    b = {name: getattr(attention, f"_{name}_dense").bias.numpy()
         for name in ("query", "key", "value")}
    x = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btf,fhd->bthd", x, w[n]) + b[n]
               for n in ("query", "key", "value"))
    scores = np.einsum("bshd,bthd->bhts", k, q) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask[:, None, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("bhts,bshd->bthd", weights, v)
    return {"query": x, "key": x, "value": x, "output": heads}


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
def test_attention_projections_statistics_in_fit(jit_compile):
    length, dim, heads, batch, steps = 6, 8, 2, 4, 3
    model, attention = _transformer(length, dim, heads, 3)
    beta = 0.9
    model.compile(optimizer=keras_bnp.BNP(statistics_momentum=beta),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = entrywise_inputs(rng, (batch * steps, length, dim))
    y = rng.integers(0, 3, batch * steps)
    projections = {name: getattr(attention, f"_{name}_dense")
                   for name in ("query", "key", "value", "output")}
    seen = []  # each step's projection inputs, from its weights
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda step, logs: seen.append(
            _projection_inputs(attention, x[step * batch:][:batch])))
    model.fit(x, y, batch_size=batch, shuffle=False, callbacks=[callback],
              verbose=0)
    assert len(seen) == steps
    for name, layer in projections.items():
        stats = _reference.RawMomentStatistics(dim, beta)
        for inputs in seen:
            stats.update([_reference.einsum_features(
                inputs[name], layer.equation)], -1)
        assert_statistics_match(model.optimizer, layer, stats)


def test_initial_scaling_stops_at_attention():
    # Scaling the query and key projections would change the attention
    # logits' scale (softmax temperature); so neither they, the layers
    # after them, nor the Dense whose output feeds them are scaled.
    inputs = keras.Input((5, 8))
    hidden = keras.layers.Dense(8, name="first")(inputs)
    attention = keras.layers.MultiHeadAttention(2, 4)
    model = keras_bnp.BNPModel(
        inputs, keras.layers.Dense(8)(attention(hidden, hidden)))
    assert initialization.plan(model).layers == ()
    x = entrywise_inputs(np.random.default_rng(0), (16, 5, 8))
    with pytest.raises(ValueError, match=(
            "found no layer to scale in model .*: no layer is linear with "
            "only known operations around it")):
        keras_bnp.scale_to_unit_variance(model, x)


@pytest.mark.slow
def test_attention_statistics_survive_saving(tmp_path):
    # Two attention layers: their projections' names repeat ("query", ...);
    # the saved statistics are keyed by the layers' paths in the file.
    inputs = keras.Input((5, 8))
    first = keras.layers.MultiHeadAttention(2, 4)
    second = keras.layers.MultiHeadAttention(2, 4)
    hidden = first(inputs, inputs)
    outputs = keras.layers.Dense(3)(
        keras.layers.GlobalAveragePooling1D()(second(hidden, hidden)))
    model = keras_bnp.BNPModel(inputs, outputs)
    model.compile(optimizer=keras_bnp.BNP(),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    rng = np.random.default_rng(0)
    x = entrywise_inputs(rng, (16, 5, 8))
    y = rng.integers(0, 3, 16)
    model.fit(x, y, batch_size=4, verbose=0)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    for attention in (first, second):
        twin = restored.get_layer(attention.name)
        for name in ("query", "key", "value", "output"):
            want = model.optimizer.layer_statistics(
                getattr(attention, f"_{name}_dense"))
            got = restored.optimizer.layer_statistics(
                getattr(twin, f"_{name}_dense"))
            for a, b in zip(got, want):
                assert_allclose(a, b, atol=0, rtol=0)
    restored.fit(x, y, batch_size=4, verbose=0)  # resumes
