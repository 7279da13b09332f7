"""The recurrent rule (`SimpleRNN`, `LSTM`, `GRU`, `RNN(cell)`,
`Bidirectional`) against the NumPy reference, which runs the recurrence
itself."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import shifted_inputs

import keras_bnp
from keras_bnp import _reference
from keras_bnp import rules

STEPS, FEATURES = 5, 3
L = keras.layers
# name: (layer factory, options): "masked" puts a Masking layer first,
# "initial_state" feeds a second input as the initial state, "stateful"
# fixes the batch size.
CASES = {
    "simple_rnn_sequences": (lambda: L.SimpleRNN(4, return_sequences=True),
                             {}),
    "simple_rnn_initial_state": (lambda: L.SimpleRNN(4),
                                 {"initial_state": True}),
    "simple_rnn_no_bias_backwards_masked": (
        lambda: L.SimpleRNN(3, use_bias=False, go_backwards=True),
        {"masked": True}),
    "lstm": (lambda: L.LSTM(3), {}),
    "lstm_sequences_masked": (lambda: L.LSTM(3, return_sequences=True),
                              {"masked": True}),
    "lstm_stateful": (lambda: L.LSTM(3, stateful=True), {"stateful": True}),
    "gru": (lambda: L.GRU(3), {}),
    "gru_no_bias_unrolled_masked": (
        lambda: L.GRU(3, use_bias=False, unroll=True), {"masked": True}),
    "gru_reset_before_sequences_masked": (
        lambda: L.GRU(3, reset_after=False, return_sequences=True),
        {"masked": True}),
    "gru_reset_before_backwards_masked": (
        lambda: L.GRU(3, reset_after=False, go_backwards=True),
        {"masked": True}),
    "rnn_of_gru_cell_reset_before": (
        lambda: L.RNN(L.GRUCell(3, reset_after=False)), {}),
    "rnn_of_lstm_cell_sequences": (
        lambda: L.RNN(L.LSTMCell(3), return_sequences=True), {}),
    "bidirectional_lstm_sequences_masked": (
        lambda: L.Bidirectional(L.LSTM(3, return_sequences=True)),
        {"masked": True}),
    "bidirectional_gru_masked": (lambda: L.Bidirectional(L.GRU(3)),
                                 {"masked": True}),
}


# The reference runs' settings: a large learning rate and a small damping,
# so that the preconditioning shows in every weight.
LEARNING_RATE, MOMENTUM, EPSILON, BETA = 0.01, 0.9, 0.05, 0.9


def _optimizer_and_step(model):
    """A BNP with the reference settings, built and tracking `model`
    outside the step (a step that creates no variables is traced once),
    and a compiled custom step: the loss `sum(outputs * cotangent)`,
    preconditioned and applied; it returns the outputs and the ordinary
    gradients."""
    optimizer = keras_bnp.BNP(LEARNING_RATE, momentum=MOMENTUM,
                              epsilon=EPSILON, statistics_momentum=BETA)
    optimizer.build(model.trainable_variables)
    optimizer.track(model)

    @tf.function(autograph=False)
    def step(inputs, cotangent):
        with optimizer.capture(model):
            with tf.GradientTape() as tape:
                outputs = model(inputs, training=True)
                loss = tf.reduce_sum(outputs * cotangent)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return outputs, grads

    return optimizer, step


def _kind(layer):
    cell = layer.cell
    if isinstance(cell, L.LSTMCell):
        return "lstm"
    return "gru" if isinstance(cell, L.GRUCell) else "simple_rnn"


def _padded(rng, x):
    """`x` with Masking's padding (all-zero steps): right-padded rows of
    random lengths, the first row left-padded; and the mask."""
    batch, steps = x.shape[:2]
    mask = np.arange(steps) < rng.integers(1, steps + 1, (batch, 1))
    mask[0] = mask[0][::-1]
    return np.where(mask[..., None], x, 0.0).astype("float32"), mask


def _reference_blocks(layer, rows, grads):
    """`{block name: (features, [kernel gradient parts], bias gradient,
    places)}` written from the cell's equations: `places` are
    `(variable index, columns)` of each part, the bias's last."""
    kernel, recurrent, *bias = grads
    bias = bias[0] if bias else None
    x, h = rows["x"], rows["h"]
    every = slice(None)
    if not isinstance(layer.cell, L.GRUCell):
        return {"": (np.hstack([x, h]), [kernel, recurrent], bias,
                     [(0, every), (1, every), (2, every)])}
    units = layer.cell.units
    if layer.cell.reset_after:
        return {
            "input": (x, [kernel], None if bias is None else bias[0],
                      [(0, every), (2, (0, every))]),
            "recurrent": (h, [recurrent], None if bias is None else bias[1],
                          [(1, every), (2, (1, every))]),
        }
    gates, candidate = slice(0, 2 * units), slice(2 * units, None)
    return {
        "gates": (np.hstack([x, h]), [kernel[:, gates], recurrent[:, gates]],
                  None if bias is None else bias[gates],
                  [(0, gates), (1, gates), (2, gates)]),
        "candidate": (np.hstack([rows["r"] * h, x]),
                      [recurrent[:, candidate], kernel[:, candidate]],
                      None if bias is None else bias[candidate],
                      [(1, candidate), (0, candidate), (2, candidate)]),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_many_steps_match_numpy_reference(name):
    factory, options = CASES[name]
    layer = factory()
    batch_size = 3 if options.get("stateful") else None
    sequences = keras.Input((STEPS, FEATURES), batch_size=batch_size)
    inputs, hidden = [sequences], sequences
    if options.get("masked"):
        hidden = L.Masking(0.0)(hidden)
    if options.get("initial_state"):
        inputs.append(keras.Input((layer.cell.units,)))
        outputs = layer(hidden, initial_state=inputs[1])
    else:
        outputs = layer(hidden)
    model = keras.Model(inputs, outputs)
    recurrent_layers = ([layer.forward_layer, layer.backward_layer]
                        if isinstance(layer, L.Bidirectional) else [layer])
    learning_rate, momentum, epsilon, beta = (LEARNING_RATE, MOMENTUM,
                                              EPSILON, BETA)
    optimizer, step = _optimizer_and_step(model)

    rng = np.random.default_rng(0)
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    references = [{
        "weights": [w.numpy().astype("float64")
                    for w in recurrent.trainable_weights],
        "indices": [position[id(w)] for w in recurrent.trainable_weights],
        "statistics": {},
        "state": None,
    } for recurrent in recurrent_layers]
    sgd = _reference.SGDMomentum(learning_rate, momentum)
    for _ in range(25):
        batch = 3  # one shape: one trace (masks vary the counts)
        x = shifted_inputs(rng, (batch, STEPS, FEATURES)) * 3.0 + 20.0
        mask = None
        if options.get("masked"):
            x, mask = _padded(rng, x)
        feed = [x]
        if options.get("initial_state"):
            state = shifted_inputs(rng, (batch, layer.cell.units))
            feed.append(state)
        out_shape = model.compute_output_shape(
            [(batch, *np.shape(f)[1:]) for f in feed] if len(feed) > 1
            else (batch, STEPS, FEATURES))
        cotangent = rng.normal(size=out_shape).astype("float32")
        outputs, grads = step(feed if len(feed) > 1 else x, cotangent)
        grads = [g.numpy() for g in grads]

        want_outputs = []
        for recurrent, reference in zip(recurrent_layers, references):
            if options.get("initial_state"):
                reference["state"] = [state]
            rows, sequence, states = _reference.recurrent_pass(
                _kind(recurrent), reference["weights"], x, mask,
                reference["state"], recurrent.go_backwards,
                getattr(recurrent.cell, "reset_after", True),
                recurrent.zero_output_for_mask)
            if recurrent.stateful:
                reference["state"] = states
            want_outputs.append(sequence if recurrent.return_sequences
                                else sequence[:, -1])
            new_grads = [grads[i].astype("float64")
                         for i in reference["indices"]]
            layer_grads = [grads[i] for i in reference["indices"]]
            for block, (features, parts, bias, places) in _reference_blocks(
                    recurrent, rows, layer_grads).items():
                stats = reference["statistics"].setdefault(
                    block, _reference.RawMomentStatistics(
                        features.shape[1], beta))
                stats.update([features], -1)
                kernel, new_bias = _reference.precondition(
                    np.vstack(parts), bias, stats.mean, stats.variance,
                    _reference.damping(stats.mean, stats.variance, epsilon))
                splits = np.cumsum([p.shape[0] for p in parts])[:-1]
                new_parts = np.split(kernel, splits)
                if bias is not None:
                    new_parts.append(new_bias)
                for (index, columns), new in zip(places, new_parts):
                    if isinstance(columns, tuple):
                        new_grads[index][columns[0]][columns[1]] = new
                    else:
                        new_grads[index][..., columns] = new
                mean, variance = optimizer.layer_statistics(
                    recurrent, block or None)
                assert_allclose(mean, stats.mean, atol=1e-5, rtol=1e-5)
                assert_allclose(variance, stats.variance, atol=1e-5,
                                rtol=1e-4)
            reference["weights"] = [
                sgd.update((id(recurrent), i), w, g) for i, (w, g) in
                enumerate(zip(reference["weights"], new_grads))]
        if isinstance(layer, L.Bidirectional):
            forward, backward = want_outputs
            if layer.return_sequences:
                backward = backward[:, ::-1]
            want_outputs = [np.concatenate([forward, backward], -1)]
        # The reference's own pass gives the layer's outputs.
        assert_allclose(outputs, want_outputs[0], atol=1e-4, rtol=1e-4)
    # float32 round-off, relative to the weights' magnitude, amplified by
    # inputs far from zero: the centring rounds to about 1e-7 of
    # mean * gradient, then is divided by variance + d, and the condition
    # number of diag(variance + d) + mean mean^T grows as mean^2 / variance
    # (about 500 for the inputs here).
    for recurrent, reference in zip(recurrent_layers, references):
        for actual, want in zip(recurrent.trainable_weights,
                                reference["weights"]):
            assert_allclose(actual, want, atol=1e-4 * np.abs(want).max(),
                            rtol=1e-3)


def _text_classifier(model_class=keras_bnp.BNPModel):
    """keras-io's bidirectional LSTM classifier, small, with padding
    masked (`mask_zero`)."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((8,), dtype="int32")
    x = L.Embedding(50, 6, mask_zero=True)(tokens)
    x = L.Bidirectional(L.LSTM(4, return_sequences=True))(x)
    x = L.Bidirectional(L.GRU(4, reset_after=False))(x)
    return model_class(tokens, L.Dense(2)(x))


def _tokens(rng, batch):
    tokens = rng.integers(1, 50, (batch, 8))
    return np.where(np.arange(8) < rng.integers(2, 9, (batch, 1)), tokens, 0)


@pytest.mark.slow
def test_recording_leaves_outputs_unchanged():
    # The time loop runs with `return_sequences` on while BNP records; the
    # model's outputs must be those of the plain layers.
    model = _text_classifier()
    optimizer = keras_bnp.BNP(initial_scaling=False)
    optimizer.build(model.trainable_variables)
    tokens = _tokens(np.random.default_rng(0), 5)

    @tf.function
    def outputs(record):
        if not record:
            return model(tokens, training=True)
        with optimizer.capture(model):
            return model(tokens, training=True)

    assert_allclose(outputs(True), outputs(False), atol=0, rtol=0)


@pytest.mark.slow
def test_text_classifier_fits_and_saves_statistics(tmp_path):
    model = _text_classifier()
    model.compile(optimizer=keras_bnp.BNP(1e-3, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    rng = np.random.default_rng(0)
    x = _tokens(rng, 64)
    y = (x[:, 0] > 25).astype("int32")
    history = model.fit(x, y, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # Four recurrent layers, the GRUs with two blocks each, and the Dense.
    labels = sorted(s.label for s in model.optimizer._slots.values())
    assert len(labels) == 7 and sum("/candidate" in x for x in labels) == 2
    # Nothing is scaled around the recurrent layers.
    assert model.optimizer.initial_scales == {}
    path = tmp_path / "classifier.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    pairs = zip(model._flatten_layers(recursive=True),
                restored._flatten_layers(recursive=True))
    for layer, twin in pairs:
        for block in rules.blocks(layer):
            for a, b in zip(
                    model.optimizer.layer_statistics(layer, block.name or None),
                    restored.optimizer.layer_statistics(
                        twin, block.name or None)):
                np.testing.assert_array_equal(a, b)
    assert int(restored.optimizer.iterations) == 4


@pytest.mark.slow
def test_other_cells_are_left_to_the_inner_optimizer():
    # Stacked cells: no rule (their kernels' layout is not one cell's).
    layer = L.RNN([L.LSTMCell(3), L.GRUCell(2)])
    model = keras_bnp.BNPSequential([keras.Input((4, 3)), layer, L.Dense(2)])
    model.compile(optimizer=keras_bnp.BNP(1e-3), loss="mse")
    x = shifted_inputs(np.random.default_rng(0), (8, 4, 3))
    before = [w.numpy() for w in layer.weights]
    with pytest.warns(keras_bnp.coverage.CoverageWarning,
                      match="LSTMCell 72 .kind not supported"):
        model.fit(x, np.ones((8, 2)), batch_size=4, verbose=0)
    assert rules.rule_for(layer) is None
    # Nor subclasses of the cells, which may change what kernels multiply.
    subclass = type("Cell", (L.LSTMCell,), {})
    assert rules.rule_for(L.RNN(subclass(3))) is None
    assert [s.label for s in model.optimizer._slots.values()] == ["dense"]
    assert all(np.any(a != w.numpy()) for a, w in zip(before, layer.weights))


@pytest.mark.parametrize("layer", [
    lambda: L.SimpleRNN(3, dropout=0.5, recurrent_dropout=0.5),
    lambda: L.LSTM(3, dropout=0.5),
    lambda: L.GRU(3, dropout=0.5, reset_after=False),
], ids=["simple_rnn", "lstm", "gru_reset_before"])
def test_statistics_are_of_the_dropped_inputs(layer):
    # Each input channel c is constant, and dropout keeps it (times 2) or
    # zeroes it per example, the same at every step: whatever the share p
    # kept, the mean is 2cp and the variance 4c^2 p (1 - p) = mean (2c -
    # mean). The undropped inputs would have variance 0.
    layer = layer()
    model = keras_bnp.BNPSequential([keras.Input((STEPS, FEATURES)), layer])
    model.compile(optimizer=keras_bnp.BNP(
        1e-3, statistics_momentum=0.0, initial_scaling=False), loss="mse")
    constant = np.array([20.0, -3.0, 0.5], "float32")
    x = np.broadcast_to(constant, (64, STEPS, FEATURES))
    model.fit(x, np.zeros((64, 3)), batch_size=64, verbose=0)
    block = "gates" if isinstance(layer, L.GRU) else None
    mean, variance = model.optimizer.layer_statistics(layer, block)
    mean, variance = mean[:FEATURES], variance[:FEATURES]
    assert np.all(variance > 0.1 * constant**2)
    assert_allclose(variance, mean * (2 * constant - mean), rtol=1e-4,
                    atol=1e-4)


@pytest.mark.parametrize("layer_class, space", [(L.ConvLSTM1D, (6,)),
                                                (L.ConvLSTM2D, (4, 5))])
def test_conv_lstm_matches_numpy_reference(layer_class, space):
    # The input and recurrent convolutions as one convolution of
    # [x_t; h_{t-1}]: statistics per stacked channel over batch, time and
    # space, the stacked kernel preconditioned by the NumPy reference. The
    # layer's own returned sequence gives h_{t-1}.
    layer = layer_class(3, 3, padding="same", return_sequences=True,
                        bias_initializer="ones")
    model = keras.Sequential([keras.Input((STEPS, *space, FEATURES)), layer])
    learning_rate, momentum, epsilon, beta = (LEARNING_RATE, MOMENTUM,
                                              EPSILON, BETA)
    optimizer, step = _optimizer_and_step(model)

    rng = np.random.default_rng(0)
    weights = [w.numpy().astype("float64") for w in layer.trainable_weights]
    stats = _reference.RawMomentStatistics(FEATURES + 3, beta)
    sgd = _reference.SGDMomentum(learning_rate, momentum)
    for _ in range(10):
        x = shifted_inputs(rng, (2, STEPS, *space, FEATURES)) * 3.0 + 20.0
        cotangent = rng.normal(size=(2, STEPS, *space, 3)).astype("float32")
        outputs, grads = step(x, cotangent)
        kernel, recurrent, bias = (g.numpy().astype("float64")
                                   for g in grads)
        previous = np.concatenate([np.zeros_like(outputs[:, :1]),
                                   outputs[:, :-1]], 1)
        stats.update([np.concatenate([x, previous], -1)], -1)
        new_kernel, new_bias = _reference.precondition(
            np.concatenate([kernel, recurrent], -2), bias, stats.mean,
            stats.variance,
            _reference.damping(stats.mean, stats.variance, epsilon))
        new_grads = [new_kernel[..., :FEATURES, :],
                     new_kernel[..., FEATURES:, :], new_bias]
        weights = [sgd.update(i, w, g)
                   for i, (w, g) in enumerate(zip(weights, new_grads))]
        mean, variance = optimizer.layer_statistics(layer)
        assert_allclose(mean, stats.mean, atol=1e-5, rtol=1e-5)
        assert_allclose(variance, stats.variance, atol=1e-5, rtol=1e-4)
    for actual, want in zip(layer.trainable_weights, weights):
        assert_allclose(actual, want, atol=1e-4 * np.abs(want).max(),
                        rtol=1e-3)


def test_conv_lstm_of_other_shapes_is_left_out_with_a_warning():
    layer = L.ConvLSTM2D(2, 3, padding="valid")
    layer.build((None, STEPS, 6, 6, FEATURES))
    with pytest.warns(UserWarning, match=(
            r"BNP leaves ConvLSTM2D layer '\w+' unpreconditioned.*"
            r"padding='valid' and strides=\(1, 1\).*The recurrent rule "
            r"covers padding='same' with strides=1")):
        assert rules.blocks(layer) == []


def test_next_frame_model_is_fully_preconditioned():
    # keras-io's next-frame prediction: ConvLSTM2D layers with BatchNorm
    # between them and a Conv3D head.
    from keras_bnp import coverage

    inputs = keras.Input((None, 8, 8, 1))
    x = inputs
    for size in (5, 3, 1):
        x = L.ConvLSTM2D(4, size, padding="same", return_sequences=True,
                         activation="relu")(x)
        x = L.BatchNormalization()(x)
    outputs = L.Conv3D(1, 3, padding="same", activation="sigmoid")(x)
    share = coverage.coverage(keras.Model(inputs, outputs)).kernel_parameters
    # 3 input and 3 recurrent kernels, and the head's.
    assert share.total == (25 * (1 + 4) + 9 * (4 + 4) + 1 * (4 + 4)) * 16 + (
        27 * 4)
    assert share.covered == share.total
