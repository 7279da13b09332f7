"""keras_bnp: Batch Normalization Preconditioning for Keras 3.

Public API: `BNP` (the optimizer), `BNPMixin` (the training step),
`BNPModel` and `BNPSequential`.
"""

import keras

if not keras.__version__.startswith("3.") or keras.backend.backend() != (
    "tensorflow"
):
    raise ImportError(
        "keras_bnp needs Keras 3 with the TensorFlow backend. Received: "
        f"keras {keras.__version__}, backend '{keras.backend.backend()}'. "
        "Set KERAS_BACKEND=tensorflow before importing keras."
    )

from keras_bnp import callbacks  # noqa: E402
from keras_bnp.model import BNPMixin  # noqa: E402
from keras_bnp.model import BNPModel  # noqa: E402
from keras_bnp.model import BNPSequential  # noqa: E402
from keras_bnp.initialization import scale_to_unit_variance  # noqa: E402
from keras_bnp.optimizer import BNP  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BNP",
    "BNPMixin",
    "BNPModel",
    "BNPSequential",
    "callbacks",
    "scale_to_unit_variance",
    "__version__",
]
