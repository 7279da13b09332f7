"""Datasets for the demo and experiments: a bundled MNIST sample, or
MNIST and CIFAR-10 through `tensorflow_datasets` when online (offline, the
tfds loaders raise `ConnectionError` within seconds, unless an earlier
download is on disk).

The bundled `data/mnist10k.npz` holds 10 000 real MNIST digits with a fixed
train/test split (8000/2000); see `data/README.md` for its source and
licence.
"""

import importlib.resources
import logging
import socket
import threading

import numpy as np

# The host tensorflow_datasets downloads each dataset from.
DOWNLOAD_HOSTS = {"mnist": "storage.googleapis.com",
                  "cifar10": "www.cs.toronto.edu"}


def load_mnist(source="bundled"):
    """Returns `(x_train, y_train), (x_test, y_test)`.

    Images are float32 in [0, 1], shape `(n, 28, 28)`; labels int32.

    Args:
        source: `"bundled"` (offline, 8000/2000 digits) or `"tfds"` (the
            full 60000/10000 MNIST through `tensorflow_datasets`, which
            downloads it once).
    """
    if source == "bundled":
        path = importlib.resources.files("keras_bnp") / "data/mnist10k.npz"
        with importlib.resources.as_file(path) as file, np.load(file) as f:
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif source == "tfds":
        x_train, y_train, x_test, y_test = _tfds_arrays("mnist")
        arrays = [x_train[..., 0], y_train, x_test[..., 0], y_test]
    else:
        raise ValueError(
            "Argument `source` must be 'bundled' or 'tfds'. "
            f"Received: source={source!r}"
        )
    return _scaled(*arrays)


def load_cifar10():
    """The CIFAR-10 training and test sets (50000/10000) through
    `tensorflow_datasets` (downloaded once; there is no bundled copy).

    Returns `(x_train, y_train), (x_test, y_test)`: images float32 in
    [0, 1], shape `(n, 32, 32, 3)`; labels int32.
    """
    return _scaled(*_tfds_arrays("cifar10"))


def _tfds_arrays(name):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "Loading through tensorflow_datasets needs "
            "`tensorflow_datasets`. Install it with "
            '`pip install "keras-bnp[data]"` (or, in a clone, '
            '`pip install -e ".[data]"`).'
        ) from None
    host = DOWNLOAD_HOSTS[name]
    # Offline, tfds would retry its download for minutes: it may then only
    # read what an earlier download left on disk (quietly: not finding it
    # there is the error below, not a warning).
    download = reachable(host)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    if not download:
        absl_logger.setLevel(logging.ERROR)
    try:
        splits = tfds.load(name, split=["train", "test"], download=download)
    except AssertionError:  # tfds: not on disk, and no download allowed
        raise ConnectionError(
            f"Cannot download {name!r} through tensorflow_datasets: {host} "
            "does not answer (offline?) and no earlier download is on disk. "
            "Connect and retry, or use the bundled MNIST sample: "
            "load_mnist('bundled')."
        ) from None
    finally:
        absl_logger.setLevel(level)
    arrays = []
    for split in splits:
        # Batches, not `batch_size=-1`, whose single batch is sized by the
        # dataset's recorded example count.
        batches = list(tfds.as_numpy(split.batch(10_000)))
        arrays += [np.concatenate([batch[key] for batch in batches])
                   for key in ("image", "label")]
    return arrays


def reachable(host, port=443, timeout=3.0):
    """Whether a TCP connection to `host` opens within `timeout` seconds,
    name lookup included (which can hang offline, so it runs in a thread
    that is left behind if it does)."""
    opened = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _scaled(x_train, y_train, x_test, y_test):
    return (
        (x_train.astype("float32") / 255.0, y_train.astype("int32")),
        (x_test.astype("float32") / 255.0, y_test.astype("int32")),
    )
