"""The project's measurement tools: not part of the `keras_bnp` package.

Run them from the root of a clone, after `pip install -e ".[benchmark]"`:

    python -m benchmarks.benchmark --help   # BNP against the alternatives
    python -m benchmarks.experiment --help  # one-method sweeps on MNIST
    python -m benchmarks.coverage --help    # what BNP preconditions
    python -m benchmarks.research.<name>    # the docs' one-off studies
"""
