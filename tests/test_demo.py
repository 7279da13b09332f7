"""`python -m keras_bnp.demo` runs and reports both methods."""

import os
import re
import subprocess
import sys

import pytest

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow


def test_demo_prints_accuracy_and_time_of_each_method():
    # With TensorFlow's logging at its default: no log line between the
    # rows of the table (stderr and stdout together, as a terminal shows).
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [sys.executable, "-m", "keras_bnp.demo", "--batch-sizes", "16",
         "--epochs", "1", "--train-size", "2000"],
        check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300, env=env,
    ).stdout
    rows = re.findall(r"^(sgd|bnp)\s+16\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
    assert [method for method, _, _ in rows] == ["sgd", "bnp"], out
    table = out[out.index("method   batch"):].splitlines()
    assert len(table) == 3, out
    for _, accuracy, seconds in rows:
        assert 0.75 < float(accuracy) <= 1.0 and float(seconds) > 0
