"""Train an MLP on MNIST with BNP or plain SGD, and sweep settings.

One function, `run`, is the measuring instrument behind the demo, the
defaults study (`docs/defaults.md`) and the tests' MNIST checks:

    python -m keras_bnp.experiment --batch-sizes 1 2 4 \
        --learning-rates 0.001 0.01 --out results.json

Each finished run is appended to the JSON file, and runs already there are
skipped, so an interrupted sweep resumes where it stopped.
"""

import argparse
import itertools
import json
import math
import os
import time

import keras
import numpy as np

from keras_bnp import data
from keras_bnp.model import BNPSequential
from keras_bnp.optimizer import BNP

METHODS = ("sgd", "bnp")


def build_mlp(hidden, seed):
    """A ReLU MLP on flattened 28x28 images, with logits out."""
    keras.utils.set_random_seed(seed)
    return BNPSequential(
        [keras.Input((784,))]
        + [keras.layers.Dense(units, activation="relu") for units in hidden]
        + [keras.layers.Dense(10)]
    )


def run(
    method,
    batch_size,
    learning_rate,
    *,
    momentum=0.9,
    epsilon=0.1,
    statistics_momentum=0.99,
    hidden=(128,),
    train_size=3000,
    validation_size=1000,
    epochs=1,
    seed=0,
    source="bundled",
):
    """Trains one configuration and returns its measurements.

    The model sees the first `train_size` training images (in an order fixed
    by `seed`); the last `validation_size` training images are held out for
    model selection; the test split is only reported.

    Returns:
        A dict of the arguments plus `train_loss` (cross-entropy on the
        training images after training), `validation_accuracy`,
        `test_accuracy`, `diverged` (non-finite, or training loss above the
        `ln(10)` of a uniform guess) and `seconds` (training time).
    """
    if method not in METHODS:
        raise ValueError(
            f"Argument `method` must be one of {METHODS}. "
            f"Received: method={method!r}"
        )
    (x_train, y_train), (x_test, y_test) = data.load_mnist(source)
    x_train = x_train.reshape(len(x_train), -1)
    x_test = x_test.reshape(len(x_test), -1)
    x_val, y_val = x_train[-validation_size:], y_train[-validation_size:]
    order = np.random.default_rng(seed).permutation(
        len(x_train) - validation_size
    )[:train_size]
    x_fit, y_fit = x_train[order], y_train[order]

    model = build_mlp(hidden, seed)
    if method == "bnp":
        optimizer = BNP(
            learning_rate,
            momentum=momentum,
            epsilon=epsilon,
            statistics_momentum=statistics_momentum,
        )
    else:
        optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=max(1, 64 // batch_size),
    )
    start = time.perf_counter()
    model.fit(
        x_fit, y_fit, batch_size=batch_size, epochs=epochs, verbose=0,
        shuffle=False,
    )
    seconds = time.perf_counter() - start
    train_loss, _ = model.evaluate(x_fit, y_fit, batch_size=500, verbose=0)
    _, validation_accuracy = model.evaluate(
        x_val, y_val, batch_size=500, verbose=0
    )
    _, test_accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    return {
        "method": method,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "momentum": momentum,
        "epsilon": epsilon if method == "bnp" else None,
        "statistics_momentum": (
            statistics_momentum if method == "bnp" else None
        ),
        "hidden": list(hidden),
        "train_size": train_size,
        "epochs": epochs,
        "seed": seed,
        "train_loss": float(train_loss),
        "validation_accuracy": float(validation_accuracy),
        "test_accuracy": float(test_accuracy),
        "diverged": bool(not train_loss < math.log(10.0)),
        "seconds": seconds,
    }


def _key(result):
    return tuple(
        result[k]
        for k in (
            "method", "batch_size", "learning_rate", "epsilon",
            "statistics_momentum", "seed",
        )
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_bnp.experiment", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument(
        "--learning-rates", nargs="+", type=float,
        default=[0.001, 0.003, 0.01, 0.03, 0.1],
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.1])
    parser.add_argument(
        "--statistics-momenta", nargs="+", type=float, default=[0.99]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--source", choices=["bundled", "tfds"], default="bundled")
    parser.add_argument("--out", required=True, help="JSON file of results")
    args = parser.parse_args(argv)

    results = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    done = {_key(r) for r in results}
    for method, batch_size, lr, seed in itertools.product(
        args.methods, args.batch_sizes, args.learning_rates, args.seeds
    ):
        bnp_grid = itertools.product(args.epsilons, args.statistics_momenta)
        for epsilon, statistics_momentum in (
            bnp_grid if method == "bnp" else [(None, None)]
        ):
            key = (method, batch_size, lr, epsilon, statistics_momentum, seed)
            if key in done:
                continue
            result = run(
                method, batch_size, lr,
                epsilon=epsilon or 0.1,
                statistics_momentum=statistics_momentum or 0.0,
                train_size=args.train_size, epochs=args.epochs, seed=seed,
                source=args.source,
            )
            results.append(result)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            print(
                f"{method:4s} bs={batch_size:<4d} lr={lr:<7g} eps={epsilon} "
                f"beta={statistics_momentum} seed={seed} "
                f"loss={result['train_loss']:.4f} "
                f"val={result['validation_accuracy']:.4f} "
                f"test={result['test_accuracy']:.4f} "
                f"({result['seconds']:.1f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
