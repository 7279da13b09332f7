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
