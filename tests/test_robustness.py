"""Hostile data, long runs, clear errors and diagnostics."""

import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import logits_loss
from helpers import mlp
from helpers import shifted_inputs

import keras_bnp
from keras_bnp import _reference
from keras_bnp import data
from keras_bnp import registry


def _mnist(n):
    (x, y), _ = data.load_mnist()
    return x[:n].reshape(n, -1), y[:n]


@pytest.mark.parametrize("batch_size, learning_rate, epochs",
                         [(1, 0.003, 1), (2, 0.003, 1), (32, 0.03, 3)])
def test_constant_columns_and_dead_units_do_not_blow_up(
    batch_size, learning_rate, epochs
):
    # MNIST's border pixels are always 0; add an always-one column and an
    # almost-constant one, and kill half of the hidden units.
    x, y = _mnist(1000)
    rng = np.random.default_rng(0)
    x = np.concatenate([
        x, np.ones((1000, 1)), 0.5 + 1e-4 * rng.normal(size=(1000, 1))
    ], axis=1).astype("float32")
    model = mlp(inputs=x.shape[1], hidden=32, outputs=10)
    kernel, bias = model.layers[0].get_weights()
    bias[:16] = -1e3  # these ReLUs never fire: constant-0 inputs downstream
    model.layers[0].set_weights([kernel, bias])
    model.compile(optimizer=keras_bnp.BNP(learning_rate), loss=logits_loss(),
                  steps_per_execution=32)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        verbose=0)
    loss = model.evaluate(x, y, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert loss < 0.7 * math.log(10.0)
    for layer in model.layers:
        mean, variance = model.optimizer.layer_statistics(layer)
        assert np.all(np.isfinite(mean)) and np.all(variance >= 0)
    _, hidden_variance = model.optimizer.layer_statistics(model.layers[1])
    assert np.all(hidden_variance[:16] == 0)


# 3e19 is finite, but its square overflows float32.
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19])
def test_non_finite_batch_leaves_statistics_unpoisoned(bad):
    x = shifted_inputs(np.random.default_rng(0), (24, 6))
    y = np.arange(24) % 3
    x[9, 2] = bad  # in the second batch of 8
    model = mlp(inputs=6, outputs=3)
    model.compile(optimizer=keras_bnp.BNP(0.01, statistics_momentum=0.5),
                  loss=logits_loss())
    with pytest.warns(UserWarning, match=r"BNP skipped \d+ statistics "
                                         r"update\(s\) \(up to epoch 1\)"):
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    # The first layer sees x itself: the bad batch is simply absent from its
    # averages, in both epochs.
    reference = _reference.RawMomentStatistics(6, 0.5)
    for _ in range(2):
        for start in (0, 16):
            reference.update([x[start:start + 8]], -1)
    mean, variance = model.optimizer.layer_statistics(model.layers[0])
    assert_allclose(mean, reference.mean, atol=1e-5)
    assert_allclose(variance, reference.variance, atol=1e-5, rtol=1e-5)
    assert model.optimizer.skipped_statistics_updates >= 2
    if not np.isfinite(bad):
        # The NaN gradients did reach the weights (the inner optimizer's
        # business, as documented), and still no statistic is poisoned.
        assert not np.all(np.isfinite(model.layers[0].kernel.numpy()))
    for slot in model.optimizer._slots.values():
        assert all(np.all(np.isfinite(v.numpy())) for v in slot.variables)


def test_smaller_last_batch_is_weighted_by_its_size():
    x = shifted_inputs(np.random.default_rng(0), (10, 6))
    model = mlp(inputs=6, outputs=3)
    model.compile(optimizer=keras_bnp.BNP(0.0, statistics_momentum=0.5),
                  loss=logits_loss())
    model.fit(x, np.arange(10) % 3, batch_size=4, shuffle=False, verbose=0)
    reference = _reference.RawMomentStatistics(6, 0.5)
    for start in (0, 4, 8):  # batches of 4, 4 and 2
        reference.update([x[start:start + 4]], -1)
    mean, variance = model.optimizer.layer_statistics(model.layers[0])
    assert_allclose(mean, reference.mean, atol=1e-6)
    assert_allclose(variance, reference.variance, atol=1e-6, rtol=1e-5)


def test_ten_thousand_steps_at_batch_size_one_stay_finite():
    x, y = _mnist(2000)
    model = mlp(inputs=784, hidden=64, outputs=10)
    model.compile(optimizer=keras_bnp.BNP(0.003), loss=logits_loss(),
                  steps_per_execution=100)
    model.fit(x, y, batch_size=1, epochs=5, verbose=0)
    assert int(model.optimizer.iterations) == 10_000
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert all(np.all(np.isfinite(v.numpy()))
               for v in model.optimizer.variables)
    assert model.evaluate(x, y, verbose=0) < 0.5


def test_mixin_with_another_optimizer_does_no_statistics_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("layer inputs were captured")

    monkeypatch.setattr(registry, "capture_inputs", fail)
    model = mlp(inputs=6, outputs=3)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=logits_loss())
    history = model.fit(shifted_inputs(np.random.default_rng(0), (16, 6)),
                        np.arange(16) % 3, batch_size=4, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert all("call" not in layer.__dict__ for layer in model.layers)


def test_loading_without_import_gives_keras_message(tmp_path):
    model = mlp(inputs=6, outputs=3)
    model.compile(optimizer=keras_bnp.BNP(), loss=logits_loss())
    model.save(tmp_path / "m.keras")
    script = textwrap.dedent(f"""
        import keras
        try:
            keras.models.load_model({str(tmp_path / "m.keras")!r})
        except TypeError as error:
            print(error)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True,
        check=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout
    # The message README.md documents, with its fix (import keras_bnp).
    assert "Could not locate class 'BNPSequential'" in out
    assert "register_keras_serializable" in out


def test_statistics_logger_writes_history_and_tensorboard(tmp_path):
    x = np.concatenate([shifted_inputs(np.random.default_rng(0), (16, 5)),
                        np.ones((16, 1), "float32")], axis=1)
    model = mlp(inputs=6, outputs=3)
    optimizer = keras_bnp.BNP(0.01, epsilon=0.5)
    model.compile(optimizer=optimizer, loss=logits_loss())
    history = model.fit(
        x, np.arange(16) % 3, batch_size=4, epochs=2, verbose=0,
        callbacks=[keras_bnp.callbacks.StatisticsLogger(str(tmp_path))])
    mean, variance = optimizer.layer_statistics(model.get_layer("hidden"))
    logs = history.history
    assert_allclose(logs["bnp/hidden/min_variance"][-1], variance.min())
    assert variance.min() == 0.0  # the always-one column
    # Its scale is 1 / damping, with the damping 0.5 times the mean variance.
    assert_allclose(logs["bnp/hidden/max_scale"][-1],
                    1.0 / (0.5 * variance.astype("float64").mean()),
                    rtol=1e-5)
    assert logs["bnp/hidden/near_constant"] == [1, 1]
    assert "bnp/logits/max_scale" in logs
    events = [e for f in os.listdir(tmp_path) for e in
              tf.compat.v1.train.summary_iterator(str(tmp_path / f))]
    tags = {v.tag for e in events for v in e.summary.value}
    assert "bnp/hidden/near_constant" in tags


def test_statistics_logger_needs_bnp():
    model = mlp(inputs=6, outputs=3)
    model.compile(optimizer="sgd", loss=logits_loss())
    with pytest.raises(ValueError, match=r"not compiled with keras_bnp.BNP "
                                         r"\(its optimizer is SGD\)"):
        model.fit(np.ones((4, 6)), np.zeros(4), verbose=0,
                  callbacks=[keras_bnp.callbacks.StatisticsLogger()])


def test_summary_lists_layers_and_rules():
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = keras_bnp.BNPModel(inputs, outputs)
    optimizer = keras_bnp.BNP()
    lines = []
    optimizer.summary(print_fn=lines.append)
    assert "No layers tracked yet" in lines[0]
    model.compile(optimizer=optimizer, loss=logits_loss())
    model.fit(np.ones((4, 8, 8, 2)), np.zeros(4), verbose=0)
    lines.clear()
    optimizer.summary(print_fn=lines.append)
    text = lines[0].splitlines()
    assert text[0].startswith("BNP 'bnp")
    assert text[2].split() == ["conv", "Conv2D", "2", "1", "scale", "kernel",
                               "(no", "bias)"]
    assert text[3].split()[:4] == ["head", "Dense", "144", "1"]
    assert text[4] == "2 other trainable variables: inner optimizer only."
