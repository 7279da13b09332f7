"""Demo: an MLP on MNIST trained with BNP and with plain SGD.

    python -m keras_bnp.demo            # bundled 8000/2000-digit sample
    python -m keras_bnp.demo --source tfds   # full MNIST (needs internet)

Prints test accuracy and training time of each method, at a normal batch
size and at a tiny one, where BatchNormalization cannot help: a line per
run while it trains (on stderr), then the table.
"""

import argparse
import functools
import sys
import time

import numpy as np

# The last training images, held out as the benchmark holds them out.
VALIDATION_SIZE = 1000


@functools.cache
def _flat_mnist(source):
    """MNIST from `source` (see `data.load_mnist`), images flattened; loaded
    once per process."""
    from keras_bnp import data

    (x_train, y_train), (x_test, y_test) = data.load_mnist(source)
    return ((x_train.reshape(-1, 784), y_train),
            (x_test.reshape(-1, 784), y_test))


def train(method, batch_size, learning_rate=0.01, *, train_size=7000,
          epochs=2, seed=0, source="bundled"):
    """Trains the MLP 784-256-256-10 with `method` (`"sgd"`, or `"bnp"`
    around that SGD), momentum 0.9, on the first `train_size` training
    images in an order fixed by `seed`; returns `(test accuracy, seconds
    of fit)`."""
    import keras

    import keras_bnp

    (x_train, y_train), (x_test, y_test) = _flat_mnist(source)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,))
    x = inputs
    for _ in range(2):
        x = keras.layers.ReLU()(keras.layers.Dense(256)(x))
    model = keras_bnp.BNPModel(inputs, keras.layers.Dense(10)(x))
    optimizer = (keras_bnp.BNP(learning_rate, momentum=0.9) if method == "bnp"
                 else keras.optimizers.SGD(learning_rate, momentum=0.9))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], steps_per_execution=max(1, 64 // batch_size))
    order = np.random.default_rng(seed).permutation(
        len(x_train) - VALIDATION_SIZE)[:train_size]
    start = time.perf_counter()
    model.fit(x_train[order], y_train[order], batch_size=batch_size,
              epochs=epochs, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    return float(accuracy), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_bnp.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", choices=["bundled", "tfds"],
                        default="bundled",
                        help="the bundled MNIST sample (offline), or full "
                        "MNIST through tensorflow_datasets (needs the `data` "
                        "extra) (default: bundled)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 2],
                        help="batch sizes to train at (default: 32 2)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs (default: 2)")
    parser.add_argument("--learning-rate", type=float, default=0.01,
                        help="learning rate of both methods (default: 0.01)")
    parser.add_argument("--train-size", type=int, default=7000,
                        help="training images (default: 7000)")
    args = parser.parse_args(argv)
    try:  # before any training: the full MNIST needs an optional package
        _flat_mnist(args.source)
    except (ImportError, ConnectionError) as error:
        parser.error(f"--source {args.source}: {error}")
    print(
        f"MLP 784-256-256-10 on MNIST ({args.source}), {args.epochs} "
        f"epochs, SGD momentum 0.9, learning rate {args.learning_rate}",
        flush=True)
    rows = []
    for batch_size in args.batch_sizes:
        for method in ("sgd", "bnp"):
            print(f"training {method} at batch size {batch_size}",
                  file=sys.stderr, flush=True)
            accuracy, seconds = train(
                method, batch_size, args.learning_rate,
                train_size=args.train_size, epochs=args.epochs,
                source=args.source)
            rows.append(f"{method:<8}{batch_size:>6}{accuracy:>10.4f}"
                        f"{seconds:>9.1f}")
    # At the end: TensorFlow's log lines, if any, come before it.
    print("\n".join([f"{'method':<8}{'batch':>6}{'test acc':>10}"
                     f"{'seconds':>9}", *rows]))


if __name__ == "__main__":
    main()
