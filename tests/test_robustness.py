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
from helpers import skip_without_channels_first_conv2d

import keras_bnp
from keras_bnp import _reference
from keras_bnp import data
from keras_bnp import registry


def _mnist(n):
    (x, y), _ = data.load_mnist()
    return x[:n].reshape(n, -1), y[:n]


@pytest.mark.slow
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
    # The warning says what happened: a NaN or Inf, or finite values whose
    # squares overflow float32 (3e19 here, beside values near 1).
    cause = ("contained NaN or Inf" if not np.isfinite(bad) else
             "finite but so far apart that the sum of their squared "
             "deviations overflowed float32")
    with pytest.warns(UserWarning, match=r"BNP 'bnp' skipped \d+ statistics "
                      r"update\(s\) \(up to epoch 1\) because a layer's "
                      r"input (values were )?" + cause) as caught:
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert len(caught) == 1
    # The first layer sees x itself: the bad batch is simply absent from its
    # averages, in both epochs.
    reference = _reference.RawMomentStatistics(6, 0.5)
    for _ in range(2):
        for start in (0, 16):
            reference.update([x[start:start + 8]], -1)
    mean, variance = model.optimizer.layer_statistics(model.layers[0])
    assert_allclose(mean, reference.mean, atol=1e-5)
    assert_allclose(variance, reference.variance, atol=1e-5, rtol=1e-5)
    skipped = model.optimizer.skipped_statistics_updates_by_cause
    assert skipped["non_finite_input" if not np.isfinite(bad) else
                   "overflow"] >= 2
    assert min(skipped.values()) == 0
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_summary_lists_variables_and_rules():
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = keras_bnp.BNPModel(inputs, outputs)
    optimizer = keras_bnp.BNP()
    lines = []
    optimizer.summary(print_fn=lines.append)
    assert "No model tracked yet" in lines[0]
    model.compile(optimizer=optimizer, loss=logits_loss())
    model.fit(np.ones((4, 8, 8, 2)), np.zeros(4), verbose=0)
    lines.clear()
    optimizer.summary(print_fn=lines.append)
    text = lines[0].splitlines()
    assert text[0].startswith("BNP 'bnp")
    assert text[2].split() == ["conv/kernel", "Conv2D", "72", "Conv2D:",
                               "scale", "kernel", "(no-bias", "rule),", "2",
                               "features"]
    assert text[3].split()[:4] == ["norm/gamma", "LayerNormalization", "4",
                                   "inner"]
    assert text[5].split()[:3] == ["head/kernel", "Dense", "432"]


def _tabular(rng, n):
    """Unnormalized columns: a year, a price, a Unix time in seconds and in
    nanoseconds (2020 +- 5, 1e6 +- 100, 1.7e9 +- 1e6, 1.7e18 +- 1e16)."""
    offset = np.array([2020.0, 1e6, 1.7e9, 1.7e18])
    spread = np.array([5.0, 100.0, 1e6, 1e16])
    return (offset + spread * rng.normal(size=(n, 4))).astype("float32")


def _assert_first_statistics_exact(optimizer, layer, x, channel_axis=-1,
                                   rtol=1e-5):
    # The variance exact to float32 rounding relative to the data's own
    # spread, whatever its offset.
    want_mean, want_variance = _reference.batch_moments([x], channel_axis)
    mean, variance = optimizer.layer_statistics(layer)
    assert_allclose(mean, want_mean, rtol=1e-5, atol=0)
    assert_allclose(variance, want_variance, rtol=rtol, atol=0)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_first_update_is_exact_for_far_offset_dense_inputs(jit_compile):
    # Before any update the running mean is 0: sums of x - 0 lose such
    # columns' variance in float32 (relative error 1, and the nanosecond
    # column's squares overflow). The first update centres on the batch.
    x = _tabular(np.random.default_rng(0), 256)
    model = keras_bnp.BNPSequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_bnp.BNP(0.0, statistics_momentum=0.9),
                  loss="mse", jit_compile=jit_compile)
    model.train_on_batch(x, np.zeros(256, "float32"))
    assert model.optimizer.skipped_statistics_updates == 0
    _assert_first_statistics_exact(model.optimizer, model.layers[0], x)


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_first_update_is_exact_for_far_offset_images(data_format,
                                                      jit_compile):
    # MNIST digits shifted by 1000 (a pixel spread of 0.3), and a second
    # channel at -5e5: before, the relative error of the variance was 1.
    x, _ = _mnist(32)
    x = x.reshape(32, 28, 28, 1)
    x = np.concatenate([x + 1000.0, 5e5 * x - 5e5], axis=-1).astype("float32")
    axis = -1
    if data_format == "channels_first":
        if not jit_compile:  # XLA has its own channels-first kernel
            skip_without_channels_first_conv2d()
        x, axis = np.moveaxis(x, -1, 1).copy(), 1
    conv = keras.layers.Conv2D(2, 3, data_format=data_format)
    model = keras_bnp.BNPSequential(
        [keras.Input(x.shape[1:]), conv, keras.layers.Flatten(),
         keras.layers.Dense(1)])
    model.compile(optimizer=keras_bnp.BNP(0.0, statistics_momentum=0.9),
                  loss="mse", jit_compile=jit_compile)
    model.train_on_batch(x, np.zeros(32, "float32"))
    # TensorFlow's float32 sums over a channel's 25 088 values (strided, with
    # two channels) round to about 1e-4 of the variance, at any offset.
    _assert_first_statistics_exact(model.optimizer, conv, x, axis, rtol=1e-3)


@pytest.mark.parametrize("relative_epsilon", [True, False])
def test_regression_on_unnormalized_columns_follows_the_reference(
        relative_epsilon):
    # A Dense(1) on a year, a price and a Unix time: the losses of 24 steps
    # follow those of the NumPy reference (float64 statistics, explicit
    # inverse, SGD with momentum). Before, the first step's variance of the
    # price was 0, and the loss stayed near its start. With an absolute
    # epsilon of 1 every column is normalized and the loss falls by 10x;
    # with the default relative epsilon, the damping is 3 times the mean
    # variance, which the Unix time's sets, so the year and the price are
    # barely preconditioned and the loss falls more slowly (the README's
    # caveat: standardize such columns).
    rng = np.random.default_rng(0)
    x = _tabular(rng, 96)[:, :3]
    exact = x.astype("float64")
    y = ((exact - exact.mean(0)) / exact.std(0)) @ [1.0, -1.0, 0.5]
    y = (y + 0.1 * rng.normal(size=96)).astype("float32")
    model = keras_bnp.BNPSequential([
        keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    epsilon = 3.0 if relative_epsilon else 1.0
    model.compile(optimizer=keras_bnp.BNP(
        epsilon=epsilon, relative_epsilon=relative_epsilon), loss="mse")
    bnp = model.optimizer
    stats = _reference.RawMomentStatistics(3, bnp.statistics_momentum)
    sgd = _reference.SGDMomentum(0.01, 0.9)
    kernel, bias = np.zeros((3, 1)), np.zeros(1)
    losses, want = [], []
    for step in range(24):
        start = 32 * (step % 3)
        inputs, labels = exact[start:start + 32], y[start:start + 32]
        losses.append(float(model.train_on_batch(inputs.astype("float32"),
                                                 labels)))
        residual = inputs @ kernel[:, 0] + bias[0] - labels
        want.append(np.mean(residual**2))
        stats.update([inputs], -1)
        grads = _reference.precondition(
            (2 * inputs.T @ residual / 32)[:, None], [2 * residual.mean()],
            stats.mean, stats.variance, _reference.damping(
                stats.mean, stats.variance, epsilon, relative_epsilon))
        kernel, bias = sgd.update(0, kernel, grads[0]), sgd.update(
            1, bias, grads[1])
    # float32 gradients of columns at 1.7e9 +- 1e6 cancel to about 1e-4
    # (relative) in each step, so the losses drift apart by up to 1% of
    # the first one.
    assert_allclose(losses, want, rtol=0, atol=0.01 * want[0])
    if relative_epsilon:
        assert 0.5 * want[0] < max(want[-3:]) < 0.9 * want[0]
    else:
        assert max(want[-3:]) < 0.1 * want[0]


def test_nanosecond_timestamps_keep_their_statistics():
    # 1.7e18 +- 1e16 at batch size 256: squares of deviations from 0 overflow
    # float32 (before, every update was skipped, blamed on NaN or Inf);
    # centred on the batch they do not, in any step.
    x = _tabular(np.random.default_rng(0), 1024)[:, 3:]
    model = keras_bnp.BNPSequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_bnp.BNP(0.0, statistics_momentum=0.9),
                  loss="mse")
    model.fit(x, np.zeros(1024), batch_size=256, shuffle=False, verbose=0)
    reference = _reference.RawMomentStatistics(1, 0.9)
    for start in range(0, 1024, 256):
        reference.update([x[start:start + 256]], -1)
    mean, variance = model.optimizer.layer_statistics(model.layers[0])
    assert model.optimizer.skipped_statistics_updates == 0
    assert_allclose(mean, reference.mean, rtol=1e-7, atol=0)
    assert_allclose(variance, reference.variance, rtol=1e-4, atol=0)


# The SimpleRNN's kernels are left to the inner optimizer, which `fit`
# warns about; this test is about the Dense layer's statistics.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::keras_bnp.coverage.CoverageWarning")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_steps_without_values_are_not_skips(jit_compile):
    # A fully masked sample at batch size 1 gives the per-step layer no
    # values: nothing to add to its statistics, and nothing to warn about
    # (pytest turns a warning into an error).
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (6, 4, 3)) + 100.0
    x[[1, 4]] = 0.0  # fully padded samples
    x[2, 2:] = 0.0
    inputs = keras.Input((4, 3))
    steps = keras.layers.Dense(2, name="per_step")(
        keras.layers.Masking(0.0)(inputs))
    # (Masked average pooling would give NaN for an all-padding sample, a
    # non-finite input of the next layer; a recurrent layer gives 0.)
    outputs = keras.layers.Dense(1)(keras.layers.SimpleRNN(2)(steps))
    model = keras_bnp.BNPModel(inputs, outputs)
    model.compile(optimizer=keras_bnp.BNP(0.0, statistics_momentum=0.5),
                  loss="mse", jit_compile=jit_compile)
    model.fit(x, np.zeros(6), batch_size=1, shuffle=False, verbose=0)
    assert model.optimizer.skipped_statistics_updates_by_cause == {
        "non_finite_input": 0, "overflow": 0}
    reference = _reference.RawMomentStatistics(3, 0.5)
    for sample in x:
        if (sample != 0).any():
            reference.update([sample[(sample != 0).any(-1)]], -1)
    mean, variance = model.optimizer.layer_statistics(
        model.get_layer("per_step"))
    assert_allclose(mean, reference.mean, rtol=1e-6)
    assert_allclose(variance, reference.variance, rtol=1e-4, atol=1e-5)
