"""keras_bnp: Batch Normalization Preconditioning for Keras 3.

Public API: `BNP` (the optimizer), `BNPMixin` (the training step),
`BNPModel`, `BNPSequential`, `scale_to_unit_variance` (the initial
scaling of the layers), and `coverage` (what BNP preconditions in a model:
`keras_bnp.coverage.report(model)`).
"""

import sys

__version__ = "0.1.0"
__all__ = [
    "BNP",
    "BNPMixin",
    "BNPModel",
    "BNPSequential",
    "callbacks",
    "coverage",
    "scale_to_unit_variance",
    "__version__",
]


def _import_api():
    """Checks for Keras 3 on TensorFlow, then imports the public API (which
    registers BNP's classes for `keras.models.load_model`)."""
    import keras

    if not keras.__version__.startswith("3.") or keras.backend.backend() != (
        "tensorflow"
    ):
        raise ImportError(
            "keras_bnp needs Keras 3 with the TensorFlow backend. Received: "
            f"keras {keras.__version__}, backend "
            f"'{keras.backend.backend()}'. Set KERAS_BACKEND=tensorflow "
            "before importing keras."
        )
    from keras_bnp import callbacks
    from keras_bnp import coverage
    from keras_bnp.initialization import scale_to_unit_variance
    from keras_bnp.model import BNPMixin
    from keras_bnp.model import BNPModel
    from keras_bnp.model import BNPSequential
    from keras_bnp.optimizer import BNP

    globals().update(
        BNP=BNP, BNPMixin=BNPMixin, BNPModel=BNPModel,
        BNPSequential=BNPSequential, callbacks=callbacks, coverage=coverage,
        scale_to_unit_variance=scale_to_unit_variance,
    )


def _running_a_command():
    """Whether Python imports this package to run one of its modules,
    `python -m keras_bnp.<module>`. Such a command parses its arguments
    (and answers `--help`) first, then calls `_import_api` itself."""
    argv = getattr(sys, "orig_argv", [])
    return sys.argv[:1] == ["-m"] and any(
        a == "-m" and b.startswith("keras_bnp.")
        for a, b in zip(argv, argv[1:]))


if not _running_a_command():
    _import_api()
