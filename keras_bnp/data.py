"""MNIST for the demo and experiments: bundled sample, or tfds when online.

The bundled `data/mnist10k.npz` holds 10 000 real MNIST digits with a fixed
train/test split (8000/2000); see `data/README.md` for its source and
licence.
"""

import importlib.resources

import numpy as np


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
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError(
                "source='tfds' needs tensorflow-datasets: "
                "`pip install keras-bnp[data]`."
            ) from None
        train, test = tfds.as_numpy(
            tfds.load("mnist", split=["train", "test"], batch_size=-1)
        )
        arrays = [
            train["image"][..., 0],
            train["label"],
            test["image"][..., 0],
            test["label"],
        ]
    else:
        raise ValueError(
            "Argument `source` must be 'bundled' or 'tfds'. "
            f"Received: source={source!r}"
        )
    x_train, y_train, x_test, y_test = arrays
    return (
        (x_train.astype("float32") / 255.0, y_train.astype("int32")),
        (x_test.astype("float32") / 255.0, y_test.astype("int32")),
    )
