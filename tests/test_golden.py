"""BNP's numerics, pinned: seeded runs of the demo's MLP and of a small
deep-suite CNN end with the weights and optimizer state recorded in
`tests/data/golden.json`: bit for bit (a SHA-256 of each array) on a
machine like the one that recorded them (same TensorFlow, Keras, oneDNN
setting and CPU), elsewhere each array's sum and sum of magnitudes to
float32 round-off. A change meant to keep the numerics (a
refactor) must pass it unchanged; one that changes them on purpose
records them again:

    python tests/test_golden.py
"""

import hashlib
import json
import os
import pathlib
import platform
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden.json"
# name: (task, hidden units of the MLP, learning rate)
CASES = {"demo_mlp": ("mlp", (256, 256), 0.01), "vgg": ("vgg", (128,), 0.03)}


def fingerprint():
    """What the bits depend on besides the code."""
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "machine": platform.machine(), "cpu": model}


def train(name):
    """Three steps of BNP at its defaults (initial scaling included) on the
    first 96 bundled training digits, batch size 32, seed 0: the model's
    weights, then the optimizer's variables."""
    from benchmarks import experiment
    from keras_bnp import data

    task, hidden, learning_rate = CASES[name]
    keras.utils.set_random_seed(0)
    (x, y), _ = data.load_mnist()
    x = x[:96].reshape(96, *experiment.input_shape(task))
    model = experiment.compiled_model("bnp", learning_rate, task=task,
                                      hidden=hidden, seed=0)
    model.fit(x, y[:96], batch_size=32, epochs=1, shuffle=False, verbose=0)
    return ([w.numpy() for w in model.weights]
            + [v.numpy() for v in model.optimizer.variables])


def summary(array):
    """`(sha256, sum, sum of magnitudes)` of an array."""
    array = np.ascontiguousarray(array)
    return (hashlib.sha256(array.tobytes()).hexdigest(),
            float(array.astype("float64").sum()),
            float(np.abs(array.astype("float64")).sum()))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_runs_end_where_recorded(name):
    golden = json.loads(GOLDEN.read_text())
    want = golden["cases"][name]
    got = [summary(array) for array in train(name)]
    assert len(got) == len(want)
    if golden["fingerprint"] == fingerprint():
        assert [digest for digest, *_ in got] == [
            digest for digest, *_ in want]
    for (_, total, size), (_, want_total, want_size) in zip(got, want):
        assert size == pytest.approx(want_size, rel=1e-4, abs=1e-6)
        assert total == pytest.approx(want_total, rel=1e-3,
                                      abs=1e-4 * want_size + 1e-6)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    cases = {case: [summary(array) for array in train(case)]
             for case in CASES}
    GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(),
                                  "cases": cases}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {fingerprint()}")
