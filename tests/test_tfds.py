"""The `tensorflow_datasets` path (`--data tfds`, `load_mnist("tfds")`).

These machines are offline, so `tfds.testing.mock_data` stands in for the
download: the real `tfds.load` with its real feature specs (MNIST's
28x28x1 and CIFAR-10's 32x32x3 uint8 images, 10 classes), filled with
random examples instead of the files.
"""

import json
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from benchmarks import benchmark
from keras_bnp import data

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow

# The benchmark holds out 1000 training images for validation.
EXAMPLES = 1040


def _raw(name, split):
    examples = list(tfds.as_numpy(tfds.load(name, split=split)))
    return (np.stack([e["image"] for e in examples]),
            np.array([e["label"] for e in examples]))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_loaders_scale_the_tfds_images(name):
    with tfds.testing.mock_data(num_examples=7):
        loaded = (data.load_mnist("tfds") if name == "mnist"
                  else data.load_cifar10())
        for (x, y), split in zip(loaded, ("train", "test")):
            images, labels = _raw(name, split)
            if name == "mnist":
                images = images[..., 0]  # (n, 28, 28), as the bundled sample
            assert x.dtype == np.float32 and y.dtype == np.int32
            assert x.shape == images.shape
            np.testing.assert_array_equal(
                x, images.astype(np.float32) / np.float32(255))
            np.testing.assert_array_equal(y, labels)
            assert images.max() > 128  # the scaling was tested on a range


def test_benchmark_trains_the_mlp_on_mnist_and_the_cnn_on_cifar10(tmp_path):
    with tfds.testing.mock_data(num_examples=EXAMPLES):
        benchmark.main([
            "--data", "tfds", "--tasks", "mlp", "cnn", "--methods", "bnp",
            "--batch-sizes", "16", "--seeds", "0", "--train-size", "32",
            "--epochs", "1", "--timing-batch-sizes", "--out-dir",
            str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    # sgd (the reference) and bnp, 3 learning rates each, per task.
    assert len(results) == 12
    assert {(r["task"], r["dataset"]) for r in results} == {
        ("mlp", "mnist"), ("cnn", "cifar10")}
    state = {(r["task"], r["method"]): r["optimizer_state_floats"]
             for r in results}
    # BNP adds to its inner SGD's state 2 * in_channels + 1 floats per layer
    # and 4 of its own (iteration, learning_rate, and
    # skipped_statistics_updates by its two causes).
    # MLP 784-128-10; the CNN on 32x32x3 images: its Conv2D layers see 3, 16
    # and 32 channels, its Dense layer 6 * 6 * 32 = 1152 features.
    assert state["mlp", "bnp"] - state["mlp", "sgd"] == sum(
        2 * c + 1 for c in (784, 128)) + 4
    assert state["cnn", "bnp"] - state["cnn", "sgd"] == sum(
        2 * c + 1 for c in (3, 16, 32, 1152)) + 4
    report = (tmp_path / "report.md").read_text()
    assert "Data: MLP on MNIST; CNN on CIFAR-10 (tfds), 32 training" in report


def test_offline_load_fails_in_seconds_with_the_fallback(tmp_path,
                                                        monkeypatch):
    # A host that never resolves (RFC 6761), and no earlier download: tfds
    # itself would retry for minutes, then raise its own error.
    monkeypatch.setitem(data.DOWNLOAD_HOSTS, "mnist", "tfds-host.invalid")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=(
            r"Cannot download 'mnist' through tensorflow_datasets: "
            r"tfds-host.invalid does not answer .* load_mnist\('bundled'\)")):
        data.load_mnist("tfds")
    assert time.perf_counter() - start < 10


def test_reachable_only_where_a_connection_opens():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert data.reachable("127.0.0.1", port)
    # The server is closed: its port refuses.
    assert not data.reachable("127.0.0.1", port)
    assert not data.reachable("tfds-host.invalid")
