"""Which data each task trains on, and the CIFAR-10-shaped CNN.

CIFAR-10 itself comes only through tensorflow_datasets, which needs the
internet (not available where these tests run), so the CNN for it is
trained here on random images of its shape (and `test_tfds.py` runs the
tfds path on tfds' mock data).
"""

import keras
import numpy as np
import pytest

from benchmarks import experiment

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow


def test_tfds_trains_the_cnn_on_cifar10_and_the_mlp_on_mnist():
    assert experiment.dataset_for("cnn", "tfds") == "cifar10"
    assert experiment.dataset_for("mlp", "tfds") == "mnist"
    assert experiment.dataset_for("cnn", "bundled") == "mnist"
    assert experiment.input_shape("mlp", "cifar10") == (3072,)
    assert experiment.input_shape("cnn", "cifar10") == (32, 32, 3)
    assert experiment.input_shape("cnn") == (28, 28, 1)


@pytest.mark.parametrize(
    "task, source, match",
    [("cnn", "cifar", "Argument `source` must be 'bundled' or 'tfds'. "
      "Received: source='cifar'"),
     ("rnn", "tfds", "Argument `task` must be one of")],
)
def test_unknown_task_or_source_is_rejected(task, source, match):
    with pytest.raises(ValueError, match=match):
        experiment.run("bnp", 8, 0.01, task=task, source=source)


def test_cifar10_cnn_trains_with_bnp():
    model = experiment.compiled_model("bnp", 0.01, task="cnn",
                                      dataset="cifar10")
    # conv 32 -> 30 -> 14 -> 6: the Dense layer sees 6 * 6 * 32 features.
    kernels = [layer.kernel.shape for layer in model.layers
               if hasattr(layer, "kernel")]
    assert kernels == [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 32),
                       (1152, 10)]
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 32, 32, 3)).astype("float32")
    y = (x[:, :16].mean(axis=(1, 2, 3)) > x[:, 16:].mean(axis=(1, 2, 3)))
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y.astype("int32"), batch_size=8, epochs=5, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.7 * before
    mean, _ = model.optimizer.layer_statistics(model.layers[1])
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), atol=0.01)
    keras.backend.clear_session()


@pytest.mark.parametrize("method, epsilon", [("adam", None), ("bnp_adam", 3.0)])
def test_run_records_bnp_settings_only_for_bnp(method, epsilon):
    # Adam has an `epsilon` of its own, which is not a BNP setting.
    result = experiment.run(method, 64, 1e-3, train_size=64,
                            validation_size=64)
    assert result["epsilon"] == epsilon
    assert (result["relative_epsilon"], result["initial_scaling"]) == (
        (None, None) if epsilon is None else (True, True))


@pytest.mark.parametrize("method", ["bnp", "batchnorm90"])
def test_cosine_schedule_decays_to_zero_over_the_runs_steps(method,
                                                            monkeypatch):
    built = []
    compiled_model = experiment.compiled_model
    monkeypatch.setattr(experiment, "compiled_model", lambda *a, **k: (
        built.append(k["decay_steps"]) or compiled_model(*a, **k)))
    # 3 epochs of 40 images at batch size 16: 3 * 3 = 9 steps.
    result = experiment.run(method, 16, 0.05, train_size=40, epochs=3,
                            schedule="cosine")
    assert result["schedule"] == "cosine"
    experiment.run(method, 16, 0.05, train_size=40, epochs=1)
    assert built == [9, None]
    model = experiment.compiled_model(method, 0.05, decay_steps=9)
    rate = model.optimizer.learning_rate
    schedule = getattr(model.optimizer, "inner_optimizer",
                       model.optimizer)._learning_rate
    for step in (0, 3, 9):
        want = 0.05 * 0.5 * (1 + np.cos(np.pi * step / 9))
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6)
    assert float(rate) == pytest.approx(0.05)  # before any step
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.momentum for layer in norms] == (
        [0.9] if method == "batchnorm90" else [])
    with pytest.raises(ValueError, match="Argument `schedule` must be one "
                       "of .*Received: schedule='linear'"):
        experiment.run(method, 16, 0.05, schedule="linear")
