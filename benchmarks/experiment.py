r"""Train a model on MNIST with BNP or a baseline, and sweep settings.

One function, `run`, is the measuring instrument behind the defaults study
(`docs/defaults.md`), the benchmark (`benchmarks.benchmark`), the
convergence study (`benchmarks.convergence`) and the tests' MNIST
checks. Its command line sweeps BNP against SGD:

    python -m benchmarks.experiment --batch-sizes 1 2 4 \
        --learning-rates 0.001 0.01 --out results.json

Each finished run is appended to the JSON file, and runs already there are
skipped, so an interrupted sweep resumes where it stopped. `--report` prints
Markdown tables of a results file instead of training:

    python -m benchmarks.experiment --out results.json --report
"""

import argparse
import inspect
import itertools
import json
import math
import os
import time

import numpy as np

from benchmarks import _cli

# method: (optimizer family, normalization layer after each hidden layer)
METHOD_SPECS = {
    "sgd": ("sgd", None),
    "bnp": ("bnp", None),
    "batchnorm": ("sgd", "batch"),
    # Momentum 0.9, PyTorch's default (Keras' is 0.99): the same training,
    # other moving averages for validation.
    "batchnorm90": ("sgd", "batch90"),
    "layernorm": ("sgd", "layer"),
    "groupnorm": ("sgd", "group"),
    "batchrenorm": ("sgd", "renorm"),
    "adam": ("adam", None),
    "adamw": ("adamw", None),
    "muon": ("muon", None),
    "bnp_adam": ("bnp_adam", None),
}
# BNP's arguments that `run` and the command line can set; `None` keeps
# BNP's default.
BNP_OPTIONS = ("epsilon", "statistics_momentum", "relative_epsilon",
               "initial_scaling")
METHODS = tuple(METHOD_SPECS)
SCHEDULES = ("constant", "cosine")
# Shallow tasks: a one-hidden-layer MLP and a 3-conv CNN. Deep tasks: an
# 8x256 MLP, a VGG-style 8-conv CNN and a ResNet-20-style CNN, all without
# normalization layers unless a method adds them.
TASKS = ("mlp", "cnn", "deep_mlp", "vgg", "resnet")
IMAGE_TASKS = ("cnn", "vgg", "resnet")
# data source -> task -> dataset: offline, every task uses the bundled MNIST
# sample; through tensorflow_datasets the MLPs train on MNIST and the CNNs
# on CIFAR-10.
DATASETS = {
    "bundled": {task: "mnist" for task in TASKS},
    "tfds": {task: "cifar10" if task in IMAGE_TASKS else "mnist"
             for task in TASKS},
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
    return shape if task in IMAGE_TASKS else (math.prod(shape),)


def _normalization(kind):
    import keras

    return {
        "batch": keras.layers.BatchNormalization,
        "batch90": lambda: keras.layers.BatchNormalization(momentum=0.9),
        "layer": keras.layers.LayerNormalization,
        "group": lambda: keras.layers.GroupNormalization(groups=4),
        "renorm": lambda: keras.layers.BatchNormalization(renorm=True),
    }[kind]()


def build_model(task, normalization=None, hidden=(128,), seed=0,
                dataset="mnist"):
    """The model of `task` for `dataset`'s images, with logits out, Keras'
    default initializers, and an optional normalization layer before every
    hidden activation.

    - `"mlp"`: a ReLU MLP with `hidden` units on flattened images.
    - `"cnn"`: three 3x3 convolutions (16, 32, 32 filters; the last two with
      stride 2), then a Dense layer.
    - `"deep_mlp"`: eight hidden Dense layers of 256 units.
    - `"vgg"`: eight 3x3 "same" convolutions (16, 16, pool, 32, 32, pool,
      64 x 4), global average pooling, Dense: a plain deep CNN.
    - `"resnet"`: a ResNet-20-style CNN: a 16-filter convolution, then three
      stages (16, 32, 64 filters) of three residual blocks of two 3x3
      convolutions (a strided 1x1 convolution on the shortcut where the
      shape changes), global average pooling, Dense.
    """
    import keras

    from keras_bnp.model import BNPModel

    if task not in TASKS:
        raise ValueError(
            f"Argument `task` must be one of {TASKS}. Received: task={task!r}"
        )
    keras.utils.set_random_seed(seed)

    def activated(x, layer, residual=None):
        x = layer(x)
        if normalization is not None:
            x = _normalization(normalization)(x)
        if residual is not None:
            x = keras.layers.Add()([x, residual])
        return keras.layers.ReLU()(x)

    inputs = keras.Input(input_shape(task, dataset))
    x = inputs
    if task in ("mlp", "deep_mlp"):
        for units in hidden if task == "mlp" else (256,) * 8:
            x = activated(x, keras.layers.Dense(units))
    elif task == "cnn":
        for filters, strides in ((16, 1), (32, 2), (32, 2)):
            x = activated(x, keras.layers.Conv2D(filters, 3, strides))
        x = keras.layers.Flatten()(x)
    elif task == "vgg":
        for filters in (16, 16, "pool", 32, 32, "pool", 64, 64, 64, 64):
            x = (keras.layers.MaxPooling2D()(x) if filters == "pool" else
                 activated(x, keras.layers.Conv2D(filters, 3, padding="same")))
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = activated(x, keras.layers.Conv2D(16, 3, padding="same"))
        for filters, first_strides in ((16, 1), (32, 2), (64, 2)):
            for block in range(3):
                strides = first_strides if block == 0 else 1
                shortcut = x
                if strides != 1 or x.shape[-1] != filters:
                    shortcut = keras.layers.Conv2D(filters, 1, strides)(x)
                y = activated(x, keras.layers.Conv2D(
                    filters, 3, strides, padding="same"))
                x = activated(y, keras.layers.Conv2D(
                    filters, 3, padding="same"), residual=shortcut)
        x = keras.layers.GlobalAveragePooling2D()(x)
    return BNPModel(inputs, keras.layers.Dense(10)(x))


def _optimizer(family, learning_rate, momentum, bnp_options,
               decay_steps=None):
    import keras

    from keras_bnp.optimizer import BNP

    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps)
    if family in ("bnp", "bnp_adam"):
        settings = {k: v for k, v in (bnp_options or {}).items()
                    if v is not None}
        if family == "bnp":
            return BNP(learning_rate, momentum=momentum, **settings)
        return BNP(inner_optimizer=keras.optimizers.Adam(learning_rate),
                   **settings)
    if family == "adam":
        return keras.optimizers.Adam(learning_rate)
    if family == "adamw":
        return keras.optimizers.AdamW(learning_rate)
    if family == "muon":
        # Since Keras 3.13 Muon orthogonalizes 2-D kernels only; conv
        # kernels and every other variable get its AdamW update.
        return keras.optimizers.Muon(learning_rate)
    return keras.optimizers.SGD(learning_rate, momentum=momentum)


def compiled_model(
    method,
    learning_rate,
    *,
    task="mlp",
    momentum=0.9,
    bnp_options=None,
    hidden=(128,),
    seed=0,
    dataset="mnist",
    decay_steps=None,
    **compile_kwargs,
):
    """`build_model` for `method`, compiled with its optimizer and a
    from-logits cross-entropy; `bnp_options` (a dict of `BNP_OPTIONS`) go to
    BNP, `compile_kwargs` to `compile`. With `decay_steps`, the learning
    rate follows a cosine decay to 0 over that many steps."""
    import keras

    if method not in METHODS:
        raise ValueError(
            f"Argument `method` must be one of {METHODS}. "
            f"Received: method={method!r}"
        )
    family, normalization = METHOD_SPECS[method]
    model = build_model(task, normalization, hidden, seed, dataset)
    model.compile(
        optimizer=_optimizer(family, learning_rate, momentum, bnp_options,
                             decay_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def _progress(x, y, every):
    """A callback recording `(step, training seconds, validation accuracy)`
    in its `points`, every `every` steps and at the end; the time spent
    evaluating is not counted."""
    import keras

    class Progress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.points = []
            self._seconds = 0.0
            self._since = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step >= (len(self.points) + 1) * every:
                self.record(step)

        def on_train_end(self, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if not self.points or self.points[-1][0] != step:
                self.record(step)

        def record(self, step):
            self._seconds += time.perf_counter() - self._since
            _, accuracy = self.model.evaluate(x, y, batch_size=500, verbose=0)
            self.points.append((step, self._seconds, float(accuracy)))
            self._since = time.perf_counter()

    return Progress()


def next_rate(rate, down):
    """The neighbour of `rate` in the sequence ..., 0.001, 0.003, 0.01,
    0.03, ... (rates of one significant digit, 1 or 3)."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    first = round(rate / 10 ** exponent)
    if down:
        value = (3, exponent - 1) if first == 1 else (1, exponent)
    else:
        value = (3, exponent) if first == 1 else (1, exponent + 1)
    return float(f"{value[0]}e{value[1]}")


def beyond_edge(grid, tried, best, steps):
    """The rate to try next past the edge of the rates `tried` (a learning
    rate grid `grid` and the rates already added beyond it), when `best` is
    that edge and fewer than `steps` rates lie beyond `grid` on that side;
    else None."""
    tried = sorted(tried)
    if best == tried[0] and sum(r < min(grid) for r in tried) < steps:
        return next_rate(best, down=True)
    if best == tried[-1] and sum(r > max(grid) for r in tried) < steps:
        return next_rate(best, down=False)
    return None


def run(
    method,
    batch_size,
    learning_rate,
    *,
    task="mlp",
    momentum=0.9,
    bnp_options=None,
    hidden=(128,),
    train_size=3000,
    validation_size=1000,
    epochs=1,
    seed=0,
    source="bundled",
    progress_points=0,
    schedule="constant",
):
    """Trains one configuration and returns its measurements.

    The model sees the first `train_size` training images (in an order fixed
    by `seed`); the last `validation_size` training images are held out for
    model selection; the test split is only reported.

    Args:
        method: One of `METHODS`: `"sgd"`, `"bnp"` (BNP around SGD),
            `"batchnorm"`, `"batchrenorm"`, `"layernorm"`, `"groupnorm"`
            (SGD on the model with those layers), `"adam"`, `"adamw"`,
            `"muon"`, `"bnp_adam"` (BNP around Adam).
        task: One of `TASKS` (see `build_model`).
        bnp_options: A dict of BNP's arguments named in `BNP_OPTIONS`.
        source: `"bundled"` (the offline MNIST sample) or `"tfds"` (full
            MNIST for the MLPs, CIFAR-10 for the CNNs; see `DATASETS`).
        progress_points: How many times to measure validation accuracy
            during training (evenly spread over the steps, and at the end);
            0 measures it at the end of each epoch only.
        schedule: `"constant"`, or `"cosine"`: the learning rate decays
            from `learning_rate` to 0 over the run's steps (`SCHEDULES`).

    Returns:
        A dict of the arguments plus `dataset`, BNP's settings, `train_loss`
        (cross-entropy on the training images after training),
        `validation_accuracy`, `test_accuracy`, `diverged` (non-finite, or
        training loss above the `ln(10)` of a uniform guess), `seconds`
        (training time, without the validation), `loss_curve` and
        `validation_curve` (per epoch; empty with `progress_points`),
        `progress` (`[step, seconds, validation accuracy]` at each of the
        `progress_points`) and
        `optimizer_state_floats` (the size of the optimizer's state).
    """
    from keras_bnp import data
    from keras_bnp.optimizer import find_bnp

    if schedule not in SCHEDULES:
        raise ValueError(f"Argument `schedule` must be one of {SCHEDULES}. "
                         f"Received: schedule={schedule!r}")
    dataset = dataset_for(task, source)
    steps = epochs * math.ceil(train_size / batch_size)
    model = compiled_model(
        method, learning_rate, task=task, momentum=momentum,
        bnp_options=bnp_options, hidden=hidden, seed=seed, dataset=dataset,
        decay_steps=steps if schedule == "cosine" else None,
        metrics=["accuracy"], steps_per_execution=max(1, 64 // batch_size),
    )
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
    progress = (_progress(x_val, y_val, max(1, steps // progress_points))
                if progress_points else None)
    start = time.perf_counter()
    history = model.fit(
        x_fit, y_fit, batch_size=batch_size, epochs=epochs, verbose=0,
        shuffle=False, callbacks=[progress] if progress else None,
        validation_data=None if progress else (x_val, y_val),
        validation_batch_size=500,
    ).history
    points = progress.points if progress else []
    seconds = points[-1][1] if points else time.perf_counter() - start
    train_loss, _ = model.evaluate(x_fit, y_fit, batch_size=500, verbose=0)
    _, test_accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    bnp = find_bnp(model.optimizer)  # other optimizers have an epsilon too
    settings = {name: getattr(bnp, name, None) for name in BNP_OPTIONS}
    return {
        "method": method,
        "task": task,
        "dataset": dataset,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "schedule": schedule,
        "momentum": (
            momentum if METHOD_SPECS[method][0] in ("sgd", "bnp") else None),
        **settings,
        "hidden": list(hidden),
        "train_size": train_size,
        "epochs": epochs,
        "seed": seed,
        "train_loss": float(train_loss),
        "validation_accuracy": (points[-1][2] if points
                                else float(history["val_accuracy"][-1])),
        "test_accuracy": float(test_accuracy),
        "diverged": bool(not train_loss < math.log(10.0)),
        "seconds": seconds,
        "loss_curve": [float(v) for v in history["loss"]],
        "validation_curve": [
            float(v) for v in history.get("val_accuracy", [])],
        "progress": [list(point) for point in points],
        "optimizer_state_floats": int(sum(
            np.prod(v.shape) for v in model.optimizer.variables)),
    }


def _key(result):
    return (result["task"], result["method"], result["batch_size"],
            result["learning_rate"], _setting(result), result["seed"])


def _setting(result):
    """BNP's settings of a run (all `None` for other methods). Runs recorded
    before `relative_epsilon` and `initial_scaling` existed had neither."""
    if result.get("epsilon") is None:
        return (None,) * len(BNP_OPTIONS)
    return (result["epsilon"], result["statistics_momentum"],
            result.get("relative_epsilon", False),
            result.get("initial_scaling", False))


def _mean(results, field):
    return float(np.mean([r[field] for r in results]))


def report(results):
    """Markdown tables, per task: the grid of BNP settings (`BNP_OPTIONS`),
    then BNP at the selected setting beside SGD, per batch size and learning
    rate.

    A cell "converges" when the training loss after training is below
    `ln(10) / 2` for every seed (clearly better than a uniform guess); a
    run "diverges" when its training loss is not below `ln(10)`. A BNP
    setting is admissible when it diverges in no seed of any cell where
    SGD converges; the selected one has the best mean validation accuracy
    over those cells (where SGD converges nowhere, as on the deep tasks: the
    best validation accuracy over the learning rates, averaged over batch
    sizes).
    """
    tasks = sorted({r["task"] for r in results})
    if len(tasks) > 1:
        return "\n\n".join(
            f"## {task}\n\n" + report([r for r in results
                                         if r["task"] == task])
            for task in tasks)
    cells = {}
    for r in results:
        key = (r["batch_size"], r["learning_rate"])
        cells.setdefault(key, {}).setdefault(_setting(r), []).append(r)
    none = _setting({})
    sgd_ok = [
        key for key, runs in cells.items()
        if none in runs and all(
            r["train_loss"] < math.log(10.0) / 2 for r in runs[none])
    ]
    settings = sorted({s for runs in cells.values() for s in runs
                       if s != none})
    batch_sizes = sorted({k[0] for k in cells})
    lines = [
        "| " + " | ".join(BNP_OPTIONS) + " | diverged where SGD converges "
        "| mean val. acc. there (BNP - SGD) | "
        + " | ".join(f"best val. acc. (lr), bs {b}" for b in batch_sizes)
        + " | diverged at (bs/lr) |",
        "|---" * (len(BNP_OPTIONS) + 3 + len(batch_sizes)) + "|",
    ]
    scores = {}
    for setting in settings:
        runs = [cells[k].get(setting, []) for k in sgd_ok]
        diverged = sum(r["diverged"] for rs in runs for r in rs)
        gain = np.mean([
            _mean(cells[k][setting], "validation_accuracy")
            - _mean(cells[k][none], "validation_accuracy")
            for k in sgd_ok if setting in cells[k]
        ] or [np.nan])
        best_cells = [max(
            ((_mean(runs[setting], "validation_accuracy"), k[1])
             for k, runs in cells.items()
             if k[0] == batch_size and setting in runs), default=(np.nan, 0))
            for batch_size in batch_sizes]
        failed = [f"{k[0]}/{k[1]:g}" for k, runs in sorted(cells.items())
                  if any(r["diverged"] for r in runs.get(setting, []))]
        # Without cells where SGD converges (deep tasks), rank by the best
        # validation accuracy instead of the gain over SGD.
        scores[setting] = (diverged == 0, gain if sgd_ok else np.nanmean(
            [accuracy for accuracy, _ in best_cells]))
        lines.append(
            "| " + " | ".join(_format(v) for v in setting)
            + f" | {diverged} | {gain:+.4f} | "
            + " | ".join(f"{a:.4f} ({lr:g})" for a, lr in best_cells)
            + f" | {', '.join(failed) or 'none'} |")
    best = max(scores, key=lambda s: scores[s])
    lines += [
        "",
        "Selected: " + ", ".join(
            f"{name}={_format(value)}"
            for name, value in zip(BNP_OPTIONS, best)) + ".",
        "",
        tuned_table(cells, best),
        "",
        "| batch | lr | SGD loss | SGD val. | SGD test | BNP loss "
        "| BNP val. | BNP test | SGD converges | BNP diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cells):
        sgd, bnp = cells[key].get(none), cells[key].get(best)
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


def _format(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}"


def tuned_table(cells, setting):
    """Per batch size, SGD and BNP (at `setting`) each at the learning rate
    with the best mean validation accuracy; test accuracy mean +- std."""
    lines = [
        "| batch | SGD lr | SGD test acc. | BNP lr | BNP test acc. |",
        "|---|---|---|---|---|",
    ]
    for batch_size in sorted({k[0] for k in cells}):
        row = [f"| {batch_size} "]
        for method_setting in (_setting({}), setting):
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


def _switch(text):
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.experiment", description=__doc__,
        formatter_class=_cli.HelpFormatter,
    )
    parser.add_argument("--tasks", nargs="+", default=["mlp"], choices=TASKS,
                        help="models to train (see build_model)")
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
    for name in ("relative_epsilon", "initial_scaling"):
        parser.add_argument(
            "--" + name.replace("_", "-"), nargs="+", type=_switch,
            metavar="{on,off}",
            help=f"BNP {name} settings to try (default: BNP's own)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="random seeds (weights and data order)")
    parser.add_argument("--train-size", type=int, default=3000,
                        help="training images seen per epoch")
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs per run")
    parser.add_argument("--source", choices=["bundled", "tfds"],
                        default="bundled",
                        help="the bundled MNIST sample (offline), or through "
                        "tensorflow_datasets full MNIST for the MLPs and "
                        "CIFAR-10 for the CNNs")
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
    from keras_bnp import BNP

    defaults = inspect.signature(BNP).parameters
    given = {"epsilon": args.epsilons,
             "statistics_momentum": args.statistics_momenta,
             "relative_epsilon": args.relative_epsilon,
             "initial_scaling": args.initial_scaling}
    bnp_grid = [dict(zip(BNP_OPTIONS, values)) for values in itertools.product(
        *(given[name] or [defaults[name].default] for name in BNP_OPTIONS))]
    done = {_key(r) for r in results}
    for task, method, batch_size, lr, seed in itertools.product(
        args.tasks, args.methods, args.batch_sizes, args.learning_rates,
        args.seeds,
    ):
        for options in bnp_grid if method == "bnp" else [{}]:
            key = (task, method, batch_size, lr, _setting(options), seed)
            if key in done:
                continue
            result = run(
                method, batch_size, lr, task=task, bnp_options=options,
                train_size=args.train_size, epochs=args.epochs, seed=seed,
                source=args.source,
            )
            results.append(result)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            print(
                f"{task} {method} bs={batch_size} lr={lr:g} {options} "
                f"seed={seed} loss={result['train_loss']:.4f} "
                f"val={result['validation_accuracy']:.4f} "
                f"test={result['test_accuracy']:.4f} "
                f"({result['seconds']:.1f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
