"""Demo: an MLP on MNIST trained with BNP and with plain SGD.

    python -m keras_bnp.demo            # bundled 8000/2000-digit sample
    python -m keras_bnp.demo --source tfds   # full MNIST (needs internet)

Prints test accuracy and training time of each method, at a normal batch
size and at a tiny one, where BatchNormalization cannot help.
"""

import argparse
import os

import keras_bnp
from keras_bnp import _cli
from keras_bnp import experiment


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_bnp.demo", description=__doc__,
        formatter_class=_cli.HelpFormatter,
    )
    parser.add_argument("--source", choices=["bundled", "tfds"],
                        default="bundled",
                        help="the bundled MNIST sample (offline), or full "
                        "MNIST through tensorflow_datasets (needs the `data` "
                        "extra)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 2],
                        help="batch sizes to train at")
    parser.add_argument("--epochs", type=int, default=2, help="epochs")
    parser.add_argument("--learning-rate", type=float, default=0.01,
                        help="learning rate of both methods")
    parser.add_argument("--train-size", type=int, default=7000,
                        help="training images")
    args = parser.parse_args(argv)
    if args.source == "tfds":
        _cli.require("tensorflow_datasets", "data", "--source tfds")
    # TensorFlow's start-up lines (CPU features, no CUDA driver) would break
    # up the table; a setting of the user's own stands.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras_bnp._import_api()

    print(
        f"MLP 784-256-256-10 on MNIST ({args.source}), {args.epochs} "
        f"epochs, SGD momentum 0.9, learning rate {args.learning_rate}"
    )
    print(f"{'method':<8}{'batch':>6}{'test acc':>10}{'seconds':>9}")
    for batch_size in args.batch_sizes:
        for method in ("sgd", "bnp"):
            result = experiment.run(
                method, batch_size, args.learning_rate,
                hidden=(256, 256), train_size=args.train_size,
                epochs=args.epochs, source=args.source,
            )
            print(
                f"{method:<8}{batch_size:>6}{result['test_accuracy']:>10.4f}"
                f"{result['seconds']:>9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
