"""keras_bnp: Batch Normalization Preconditioning for Keras 3.

Public API: `BNP` (the optimizer), `BNPMixin` (the training step),
`BNPModel`, `BNPSequential`, `scale_to_unit_variance` (the initial
scaling of the layers), `register_rule` (BNP for a layer of your own),
`callbacks`, and `coverage` (what BNP preconditions in a model:
`keras_bnp.coverage.report(model)`).
"""

import keras

__version__ = "0.1.0"

if not keras.__version__.startswith("3.") or keras.backend.backend() != (
        "tensorflow"):
    raise ImportError(
        "keras_bnp needs Keras 3 with the TensorFlow backend. Received: "
        f"keras {keras.__version__}, backend '{keras.backend.backend()}'. "
        "Set KERAS_BACKEND=tensorflow before importing keras."
    )

# Importing them registers BNP's classes for `keras.models.load_model`.
from keras_bnp import callbacks  # noqa: E402
from keras_bnp import coverage  # noqa: E402
from keras_bnp.initialization import scale_to_unit_variance  # noqa: E402
from keras_bnp.model import BNPMixin  # noqa: E402
from keras_bnp.model import BNPModel  # noqa: E402
from keras_bnp.model import BNPSequential  # noqa: E402
from keras_bnp.optimizer import BNP  # noqa: E402
from keras_bnp.rules import register_rule  # noqa: E402

__all__ = [
    "BNP",
    "BNPMixin",
    "BNPModel",
    "BNPSequential",
    "callbacks",
    "coverage",
    "register_rule",
    "scale_to_unit_variance",
    "__version__",
]
