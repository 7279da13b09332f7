"""The README's code blocks run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).parent.parent / "README.md"


def _python_block(heading):
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_learns():
    code = _python_block("## Quickstart")
    assert len(code.strip().splitlines()) <= 25
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert namespace["scores"]["accuracy"] > 0.85
    mean, variance = namespace["mean"], namespace["variance"]
    assert mean.shape == variance.shape == (784,)
    # The first Dense layer sees pixels in [0, 1].
    assert np.all(mean >= 0) and np.all(mean <= 1) and np.all(variance >= 0)


def test_saving_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(_python_block("## Quickstart"), namespace)
    trained = namespace["model"]
    iterations = int(trained.optimizer.iterations)
    predictions = trained.predict(namespace["x_test"][:8], verbose=0)
    exec(_python_block("## Saving, resuming and serving"), namespace)
    resumed = namespace["model"]
    assert resumed is not trained
    assert int(resumed.optimizer.iterations) == iterations + 250
    # The served graph reproduces the resumed model's predictions.
    np.testing.assert_allclose(
        namespace["logits"], resumed.predict(namespace["x_test"][:8],
                                             verbose=0), atol=1e-5)
    assert not np.allclose(predictions, namespace["logits"], atol=1e-3)
