"""The README's code blocks run as written, each on its own."""

import pathlib
import re

import keras
import numpy as np
import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"
# Every Python block, by the section it is in; the Scaling out block runs
# on two replicas in tests/test_distribute.py.
SECTIONS = ("## Quickstart", "## Saving, resuming and serving",
            "## Custom training steps", "### Two optimizers: GANs",
            "### keras-hub models", "## Scaling out", "### Your own layers")


def _python_block(heading):
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_python_block_is_run_by_a_test():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks == [_python_block(heading) for heading in SECTIONS]
    for block in blocks:  # each prints what it computed
        assert "print(" in block


@pytest.mark.slow
def test_quickstart_runs_and_learns(capsys):
    code = _python_block("## Quickstart")
    assert len(code.strip().splitlines()) <= 25
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert namespace["scores"]["accuracy"] > 0.85
    mean, variance = namespace["mean"], namespace["variance"]
    assert mean.shape == variance.shape == (784,)
    # The first Dense layer sees pixels in [0, 1].
    assert np.all(mean >= 0) and np.all(mean <= 1) and np.all(variance >= 0)
    out = capsys.readouterr().out
    assert f"test accuracy: {namespace['scores']['accuracy']:.4f}" in out
    assert "input statistics: (784,) (784,)" in out


@pytest.mark.slow
def test_saving_section_runs_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_python_block("## Saving, resuming and serving"),
                 "README saving", "exec"), namespace)
    model, restored = namespace["model"], namespace["restored"]
    # 1024 examples in batches of 8: 128 steps, then 128 more on reload.
    assert int(model.optimizer.iterations) == 128
    assert int(restored.optimizer.iterations) == 256
    assert "steps so far: 128" in capsys.readouterr().out
    # The file holds the trained model's optimizer state bit for bit,
    # statistics included (their inputs have mean 3, variance 4).
    reloaded = keras.models.load_model(tmp_path / "bnp_model.keras")
    for saved, trained in zip(reloaded.optimizer.variables,
                              model.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), trained.numpy())
    mean, variance = reloaded.optimizer.layer_statistics(reloaded.layers[0])
    np.testing.assert_allclose(mean, 3.0, atol=0.3)
    np.testing.assert_allclose(variance, 4.0, rtol=0.2)
    # Training resumed, and the served graph is the resumed model.
    x = namespace["x"][:2]
    assert not np.allclose(restored.predict(x, verbose=0),
                           model.predict(x, verbose=0), atol=1e-3)
    served = namespace["served"].serve(x).numpy()
    np.testing.assert_allclose(served, restored.predict(x, verbose=0),
                               atol=1e-5)


@pytest.mark.slow
def test_custom_training_step_section_runs_and_learns(capsys):
    namespace = {}
    exec(compile(_python_block("## Custom training steps"),
                 "README custom training steps", "exec"), namespace)
    vae, losses = namespace["vae"], namespace["history"].history["loss"]
    assert int(vae.optimizer.iterations) == 500  # 8000 digits, 2 epochs
    assert losses[-1] < 0.35 < losses[0]  # binary cross-entropy per pixel
    # The encoder's first layer sees the pixels.
    x = namespace["x_train"].reshape(-1, 784)
    mean, variance = vae.optimizer.layer_statistics(vae.hidden)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=0.05)
    assert np.all(variance >= 0) and np.all(variance <= 0.25)
    assert "loss per epoch: [" in capsys.readouterr().out


# No CoverageWarning (warnings are errors here): every kernel of the task,
# the attention projections included, is preconditioned.
def test_keras_hub_section_runs_learns_and_saves(tmp_path, capsys):
    pytest.importorskip(
        "keras_hub", reason="keras-hub is not installed (pip install "
        "keras-hub); the README's keras-hub section is not run")
    namespace = {}
    exec(compile(_python_block("### keras-hub models"), "README keras-hub",
                 "exec"), namespace)
    model, x = namespace["model"], namespace["x"]
    assert namespace["history"].history["accuracy"][-1] > 0.9
    out = capsys.readouterr().out
    assert "accuracy per epoch: [" in out and "logits" in out
    assert "EinsumDense: centre + scale kernel and bias" in out
    # Saved and loaded with the optimizer's statistics.
    model.save(tmp_path / "bert.keras")
    restored = keras.models.load_model(tmp_path / "bert.keras")
    for saved, trained in zip(restored.optimizer.variables,
                              model.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), trained.numpy())
    np.testing.assert_allclose(restored.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_gan_section_trains_saves_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_python_block("### Two optimizers: GANs"), "README GAN",
                 "exec"), namespace)
    gan, resumed = namespace["gan"], namespace["resumed"]
    # 2048 images in batches of 64: 32 steps of each optimizer.
    assert "steps restored: 32 32" in capsys.readouterr().out
    for trained, loaded in ((gan.d_optimizer, resumed.d_optimizer),
                            (gan.g_optimizer, resumed.g_optimizer)):
        for a, b in zip(trained.variables, loaded.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Each keeps the statistics of its own network's two Dense layers.
    assert sorted(row["layer"] for row in gan.d_optimizer.statistics_summary()
                  ) == sorted(layer.name for layer in gan.discriminator.layers
                              if isinstance(layer, keras.layers.Dense))
    assert len(gan.g_optimizer.statistics_summary()) == 2


def test_own_layer_section_registers_a_rule(capsys):
    from keras_bnp import rules

    count = len(rules.RULES)
    namespace = {}
    try:
        exec(compile(_python_block("### Your own layers"), "README rule",
                     "exec"), namespace)
    finally:
        del rules.RULES[count:]
    assert capsys.readouterr().out == (
        "BNP preconditions 27 of 27 (100.0%) trainable parameters; kernels: "
        "1 of 1 variables, 24 of 24 (100.0%) parameters.\n")
