r"""Train a model on MNIST with BNP or a baseline, and sweep settings.

One function, `run`, is the measuring instrument behind the demo, the
defaults study (`docs/defaults.md`), the benchmark (`keras_bnp.benchmark`)
and the tests' MNIST checks. Its command line sweeps BNP against SGD:

    python -m keras_bnp.experiment --batch-sizes 1 2 4 \
        --learning-rates 0.001 0.01 --out results.json

Each finished run is appended to the JSON file, and runs already there are
skipped, so an interrupted sweep resumes where it stopped. `--report` prints
Markdown tables of a results file instead of training:

    python -m keras_bnp.experiment --out results.json --report
"""

import argparse
import inspect
import itertools
import json
import math
import os
import time

import numpy as np

import keras_bnp
from keras_bnp import _cli
from keras_bnp import data

# method: (optimizer family, normalization layer after each hidden layer)
METHOD_SPECS = {
    "sgd": ("sgd", None),
    "bnp": ("bnp", None),
    "batchnorm": ("sgd", "batch"),
    "layernorm": ("sgd", "layer"),
    "groupnorm": ("sgd", "group"),
    "adam": ("adam", None),
    "bnp_adam": ("bnp_adam", None),
}
METHODS = tuple(METHOD_SPECS)
TASKS = ("mlp", "cnn")
# data source -> task -> dataset: offline, both tasks use the bundled MNIST
# sample; through tensorflow_datasets the CNN trains on CIFAR-10.
DATASETS = {
    "bundled": {"mlp": "mnist", "cnn": "mnist"},
    "tfds": {"mlp": "mnist", "cnn": "cifar10"},
}
IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def dataset_for(task, source):
    """The dataset `task` trains on with data `source` (see `DATASETS`)."""
    if source not in DATASETS:
        raise ValueError(
            "Argument `source` must be 'bundled' or 'tfds'. "
            f"Received: source={source!r}"
        )
    if task not in TASKS:
        raise ValueError(
            f"Argument `task` must be one of {TASKS}. Received: task={task!r}"
        )
    return DATASETS[source][task]


def input_shape(task, dataset="mnist"):
    """The shape of one example as `task`'s model takes it: flattened
    images for the MLP."""
    shape = IMAGE_SHAPES[dataset]
    return (math.prod(shape),) if task == "mlp" else shape


def _normalization(kind):
    import keras

    return {
        "batch": keras.layers.BatchNormalization,
        "layer": keras.layers.LayerNormalization,
        "group": lambda: keras.layers.GroupNormalization(groups=4),
    }[kind]()


def build_model(task, normalization=None, hidden=(128,), seed=0,
                dataset="mnist"):
    """A ReLU MLP (on flattened images) or a small CNN for `dataset`'s
    images, with logits out and an optional normalization layer before every
    hidden activation."""
    import keras

    from keras_bnp.model import BNPSequential

    keras.utils.set_random_seed(seed)
    if task == "mlp":
        hidden_layers = [keras.layers.Dense(units) for units in hidden]
    elif task == "cnn":
        hidden_layers = [
            keras.layers.Conv2D(16, 3),
            keras.layers.Conv2D(32, 3, strides=2),
            keras.layers.Conv2D(32, 3, strides=2),
        ]
    else:
        raise ValueError(
            f"Argument `task` must be one of {TASKS}. Received: task={task!r}"
        )
    layers = [keras.Input(input_shape(task, dataset))]
    for layer in hidden_layers:
        layers.append(layer)
        if normalization is not None:
            layers.append(_normalization(normalization))
        layers.append(keras.layers.ReLU())
    if task == "cnn":
        layers.append(keras.layers.Flatten())
    return BNPSequential(layers + [keras.layers.Dense(10)])


def _optimizer(family, learning_rate, momentum, bnp_settings):
    import keras

    from keras_bnp.optimizer import BNP

    if family in ("bnp", "bnp_adam"):
        # `None` keeps BNP's own default.
        settings = {k: v for k, v in bnp_settings.items() if v is not None}
        if family == "bnp":
            return BNP(learning_rate, momentum=momentum, **settings)
        return BNP(inner_optimizer=keras.optimizers.Adam(learning_rate),
                   **settings)
    if family == "adam":
        return keras.optimizers.Adam(learning_rate)
    return keras.optimizers.SGD(learning_rate, momentum=momentum)


def compiled_model(
    method,
    learning_rate,
    *,
    task="mlp",
    momentum=0.9,
    epsilon=None,
    statistics_momentum=None,
    hidden=(128,),
    seed=0,
    dataset="mnist",
    **compile_kwargs,
):
    """`build_model` for `method`, compiled with its optimizer and a
    from-logits cross-entropy; `compile_kwargs` go to `compile`."""
    import keras

    if method not in METHODS:
        raise ValueError(
            f"Argument `method` must be one of {METHODS}. "
            f"Received: method={method!r}"
        )
    family, normalization = METHOD_SPECS[method]
    model = build_model(task, normalization, hidden, seed, dataset)
    model.compile(
        optimizer=_optimizer(
            family, learning_rate, momentum,
            {"epsilon": epsilon, "statistics_momentum": statistics_momentum},
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def run(
    method,
    batch_size,
    learning_rate,
    *,
    task="mlp",
    momentum=0.9,
    epsilon=None,
    statistics_momentum=None,
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

    Args:
        method: One of `METHODS`: `"sgd"`, `"bnp"` (BNP around SGD),
            `"batchnorm"`, `"layernorm"`, `"groupnorm"` (SGD on the model
            with those layers), `"adam"`, `"bnp_adam"` (BNP around Adam).
        task: `"mlp"` or `"cnn"`.
        source: `"bundled"` (the offline MNIST sample) or `"tfds"` (full
            MNIST for the MLP, CIFAR-10 for the CNN; see `DATASETS`).

    Returns:
        A dict of the arguments plus `dataset`, `train_loss` (cross-entropy
        on the training images after training), `validation_accuracy`,
        `test_accuracy`, `diverged` (non-finite, or training loss above the
        `ln(10)` of a uniform guess), `seconds` (training time),
        `loss_curve` and `validation_curve` (per epoch) and
        `optimizer_state_floats` (the size of the optimizer's state).
    """
    from keras_bnp.optimizer import BNP

    dataset = dataset_for(task, source)
    model = compiled_model(
        method, learning_rate, task=task, momentum=momentum, epsilon=epsilon,
        statistics_momentum=statistics_momentum, hidden=hidden, seed=seed,
        dataset=dataset, metrics=["accuracy"],
        steps_per_execution=max(1, 64 // batch_size),
    )
    optimizer = model.optimizer
    is_bnp = isinstance(optimizer, BNP)
    if is_bnp:
        epsilon, statistics_momentum = (
            optimizer.epsilon, optimizer.statistics_momentum)
    (x_train, y_train), (x_test, y_test) = (
        data.load_mnist(source) if dataset == "mnist" else data.load_cifar10()
    )
    shape = (-1, *input_shape(task, dataset))
    x_train, x_test = x_train.reshape(shape), x_test.reshape(shape)
    x_val, y_val = x_train[-validation_size:], y_train[-validation_size:]
    order = np.random.default_rng(seed).permutation(
        len(x_train) - validation_size
    )[:train_size]
    x_fit, y_fit = x_train[order], y_train[order]
    start = time.perf_counter()
    history = model.fit(
        x_fit, y_fit, batch_size=batch_size, epochs=epochs, verbose=0,
        shuffle=False, validation_data=(x_val, y_val),
        validation_batch_size=500,
    ).history
    seconds = time.perf_counter() - start
    train_loss, _ = model.evaluate(x_fit, y_fit, batch_size=500, verbose=0)
    _, test_accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    return {
        "method": method,
        "task": task,
        "dataset": dataset,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "momentum": (
            momentum if METHOD_SPECS[method][0] in ("sgd", "bnp") else None),
        "epsilon": epsilon if is_bnp else None,
        "statistics_momentum": statistics_momentum if is_bnp else None,
        "hidden": list(hidden),
        "train_size": train_size,
        "epochs": epochs,
        "seed": seed,
        "train_loss": float(train_loss),
        "validation_accuracy": float(history["val_accuracy"][-1]),
        "test_accuracy": float(test_accuracy),
        "diverged": bool(not train_loss < math.log(10.0)),
        "seconds": seconds,
        "loss_curve": [float(v) for v in history["loss"]],
        "validation_curve": [float(v) for v in history["val_accuracy"]],
        "optimizer_state_floats": int(sum(
            np.prod(v.shape) for v in model.optimizer.variables)),
    }


def _key(result):
    return tuple(
        result[k]
        for k in (
            "method", "batch_size", "learning_rate", "epsilon",
            "statistics_momentum", "seed",
        )
    )


def _mean(results, field):
    return float(np.mean([r[field] for r in results]))


def report(results):
    """Markdown tables: the (epsilon, statistics_momentum) grid, then BNP at
    the selected setting beside SGD, per batch size and learning rate.

    A cell "converges" when the training loss after training is below
    `ln(10) / 2` for every seed (clearly better than a uniform guess); a
    run "diverges" when its training loss is not below `ln(10)`. A BNP
    setting is admissible when it diverges in no seed of any cell where
    SGD converges; the selected one has the best mean validation accuracy
    over those cells.
    """
    cells = {}
    for r in results:
        key = (r["batch_size"], r["learning_rate"])
        setting = (r["epsilon"], r["statistics_momentum"])
        cells.setdefault(key, {}).setdefault(setting, []).append(r)
    sgd_ok = [
        key for key, runs in cells.items()
        if (None, None) in runs and all(
            r["train_loss"] < math.log(10.0) / 2 for r in runs[(None, None)])
    ]
    settings = sorted({s for runs in cells.values() for s in runs
                       if s != (None, None)})
    lines = [
        "| epsilon | statistics_momentum | diverged where SGD converges "
        "| mean val. acc. there (BNP - SGD) |",
        "|---|---|---|---|",
    ]
    scores = {}
    for setting in settings:
        runs = [cells[k].get(setting, []) for k in sgd_ok]
        diverged = sum(r["diverged"] for rs in runs for r in rs)
        gain = np.mean([
            _mean(cells[k][setting], "validation_accuracy")
            - _mean(cells[k][(None, None)], "validation_accuracy")
            for k in sgd_ok if setting in cells[k]
        ])
        scores[setting] = (diverged == 0, gain)
        lines.append(f"| {setting[0]:g} | {setting[1]:g} | {diverged} "
                     f"| {gain:+.4f} |")
    best = max(scores, key=lambda s: scores[s])
    lines += [
        "",
        f"Selected: epsilon={best[0]:g}, statistics_momentum={best[1]:g}.",
        "",
        tuned_table(cells, best),
        "",
        "| batch | lr | SGD loss | SGD val. | SGD test | BNP loss "
        "| BNP val. | BNP test | SGD converges | BNP diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cells):
        sgd, bnp = cells[key].get((None, None)), cells[key].get(best)
        if not sgd or not bnp:
            continue
        lines.append(
            f"| {key[0]} | {key[1]:g} "
            + " ".join(
                f"| {_mean(runs, 'train_loss'):.3g} "
                f"| {_mean(runs, 'validation_accuracy'):.4f} "
                f"| {_mean(runs, 'test_accuracy'):.4f}"
                for runs in (sgd, bnp)
            )
            + f" | {'yes' if key in sgd_ok else 'no'} "
            f"| {sum(r['diverged'] for r in bnp)}/{len(bnp)} |"
        )
    return "\n".join(lines)


def tuned_table(cells, setting):
    """Per batch size, SGD and BNP (at `setting`) each at the learning rate
    with the best mean validation accuracy; test accuracy mean +- std."""
    lines = [
        "| batch | SGD lr | SGD test acc. | BNP lr | BNP test acc. |",
        "|---|---|---|---|---|",
    ]
    for batch_size in sorted({k[0] for k in cells}):
        row = [f"| {batch_size} "]
        for method_setting in ((None, None), setting):
            runs_by_lr = {
                k[1]: runs[method_setting] for k, runs in cells.items()
                if k[0] == batch_size and method_setting in runs
            }
            lr = max(runs_by_lr, key=lambda lr: _mean(
                runs_by_lr[lr], "validation_accuracy"))
            accuracy = [r["test_accuracy"] for r in runs_by_lr[lr]]
            row.append(f"| {lr:g} | {np.mean(accuracy):.4f} ± "
                       f"{np.std(accuracy):.4f} ")
        lines.append("".join(row) + "|")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_bnp.experiment", description=__doc__,
        formatter_class=_cli.HelpFormatter,
    )
    parser.add_argument("--methods", nargs="+", default=["sgd", "bnp"],
                        choices=["sgd", "bnp"], help="methods to train")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4],
                        help="batch sizes to train at")
    parser.add_argument(
        "--learning-rates", nargs="+", type=float,
        default=[0.001, 0.003, 0.01, 0.03, 0.1], help="learning rates to try",
    )
    parser.add_argument("--epsilons", nargs="+", type=float,
                        help="BNP epsilons to try (default: BNP's own)")
    parser.add_argument("--statistics-momenta", nargs="+", type=float,
                        help="BNP statistics momenta to try (default: BNP's "
                        "own)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="random seeds (weights and data order)")
    parser.add_argument("--train-size", type=int, default=3000,
                        help="training images seen per epoch")
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs per run")
    parser.add_argument("--source", choices=["bundled", "tfds"],
                        default="bundled",
                        help="the bundled MNIST sample (offline), or full "
                        "MNIST through tensorflow_datasets")
    parser.add_argument("--out", required=True, help="JSON file of results")
    parser.add_argument("--report", action="store_true",
                        help="print Markdown tables of --out and exit")
    args = parser.parse_args(argv)

    results = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if args.report:
        print(report(results))
        return
    if args.source == "tfds":
        _cli.require("tensorflow_datasets", "data", "--source tfds")
    keras_bnp._import_api()
    bnp_defaults = inspect.signature(keras_bnp.BNP).parameters
    epsilons = args.epsilons or [bnp_defaults["epsilon"].default]
    momenta = args.statistics_momenta or [
        bnp_defaults["statistics_momentum"].default]
    done = {_key(r) for r in results}
    for method, batch_size, lr, seed in itertools.product(
        args.methods, args.batch_sizes, args.learning_rates, args.seeds
    ):
        bnp_grid = itertools.product(epsilons, momenta)
        for epsilon, statistics_momentum in (
            bnp_grid if method == "bnp" else [(None, None)]
        ):
            key = (method, batch_size, lr, epsilon, statistics_momentum, seed)
            if key in done:
                continue
            result = run(
                method, batch_size, lr,
                epsilon=epsilon,
                statistics_momentum=statistics_momentum,
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
