"""A zoo of client models, written as their users write them, to test
BNP's defaults where users train.

    python -m benchmarks.benchmark --zoo --out-dir zoo_out
    python -m benchmarks.benchmark --zoo --models tabular siamese --epochs 3

Each model (`MODELS`) is built as its source builds it (keras.applications
with its own softmax head, keras-io patterns), wrapped as
`BNPModel(model.inputs, model.outputs)`, and trained with `fit` on a task it
can learn: the bundled MNIST digits, resized and coloured for the image
models, or synthetic but learnable sequences, frames and tables. Every
method (`METHODS`: BNP at its defaults, its inner SGD with momentum 0.9
alone, Adam; and BNP with `initial_scaling=False`, run where the scaling
acts) has its learning rate tuned on seed 0 by the final validation loss
(up to two rates past the grid while the best is at its edge), then runs
the other seeds at that rate. `results.json` holds every
run (resumed: runs already there are skipped), `report.md` the tables and
`zoo.png` validation loss against training time.
"""

import argparse
import json
import math
import os
import time

import numpy as np

from benchmarks import _cli

METHODS = ("bnp", "sgd", "adam", "bnp_unscaled")
RATES = {"bnp": (0.003, 0.01, 0.03, 0.1), "sgd": (0.003, 0.01, 0.03, 0.1),
         "adam": (0.0003, 0.001, 0.003),
         "bnp_unscaled": (0.003, 0.01, 0.03, 0.1)}
DEFAULTS = {"seeds": [0, 1], "train_size": 2000, "epochs": 6}
# How many rates past the grid's edge the tuning may go.
EDGE_STEPS = 2


def _digits(train_size, seed, size=28, colour=False):
    """Bundled MNIST: `train_size` training, 500 validation (the end of the
    training split) and 1000 test digits, float32; resized to `size` and
    tinted with a random colour per image for the RGB models (pixel values
    in [0, 255], as keras.applications expect)."""
    import tensorflow as tf

    from keras_bnp import data

    (x, y), (x_test, y_test) = data.load_mnist()
    order = np.random.default_rng(seed).permutation(len(x) - 500)[:train_size]
    splits = [(x[order], y[order]), (x[-500:], y[-500:]),
              (x_test[:1000], y_test[:1000])]
    rng = np.random.default_rng(seed + 100)
    out = []
    for images, labels in splits:
        images = images[..., None]
        if size != 28:
            images = tf.image.resize(images, (size, size)).numpy()
        if colour:
            tint = rng.uniform(0.3, 1.0, (len(images), 1, 1, 3))
            images = 255.0 * images * tint
        out.append((images.astype("float32"), labels.astype("int32")))
    return out


def _mobilenet_v3_small(train_size, seed):
    import keras

    model = keras.applications.MobileNetV3Small(
        weights=None, classes=10, input_shape=(32, 32, 3))
    return model, "sparse_categorical_crossentropy", _digits(
        train_size, seed, 32, colour=True)


def _efficientnet_v2_b0(train_size, seed):
    import keras

    model = keras.applications.EfficientNetV2B0(
        weights=None, classes=10, input_shape=(32, 32, 3))
    return model, "sparse_categorical_crossentropy", _digits(
        train_size, seed, 32, colour=True)


def _siamese(train_size, seed):
    """keras-io's Siamese network with a contrastive loss: label 0 for a
    pair of the same digit, 1 for different digits."""
    import keras
    from keras import ops

    def tower_input():
        return keras.Input((28, 28, 1))

    inputs = tower_input()
    x = keras.layers.BatchNormalization()(inputs)
    x = keras.layers.Conv2D(4, (5, 5), activation="tanh")(x)
    x = keras.layers.AveragePooling2D(pool_size=(2, 2))(x)
    x = keras.layers.Conv2D(16, (5, 5), activation="tanh")(x)
    x = keras.layers.AveragePooling2D(pool_size=(2, 2))(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dense(10, activation="tanh")(x)
    tower = keras.Model(inputs, x)
    left, right = tower_input(), tower_input()
    distance = keras.layers.Lambda(lambda pair: ops.sqrt(ops.maximum(
        ops.sum(ops.square(pair[0] - pair[1]), axis=1, keepdims=True),
        keras.backend.epsilon())))([tower(left), tower(right)])
    x = keras.layers.BatchNormalization()(distance)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)

    def contrastive(y_true, y_pred, margin=1.0):
        y_true = ops.cast(y_true, y_pred.dtype)
        return ops.mean((1 - y_true) * ops.square(y_pred) + y_true
                        * ops.square(ops.maximum(margin - y_pred, 0)))

    rng = np.random.default_rng(seed)
    splits = []
    for images, labels in _digits(train_size, seed):
        first = rng.permutation(len(images))
        by_digit = [np.flatnonzero(labels == d) for d in range(10)]
        same = np.array([rng.choice(by_digit[labels[i]]) for i in first])
        other = rng.permutation(len(images))
        pick = rng.uniform(size=len(images)) < 0.5
        second = np.where(pick, same, other)
        target = (labels[first] != labels[second]).astype("float32")
        splits.append(((images[first], images[second]), target[:, None]))
    return keras.Model([left, right], outputs), contrastive, splits


def _sequences(train_size, seed, length=128):
    """Two classes of noisy waves, told apart by their frequency."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (train_size, 500, 1000):
        labels = rng.integers(0, 2, count)
        frequency = np.where(labels == 1, 3.0, 4.0) + rng.normal(
            0, 0.3, count)
        t = np.linspace(0, 1, length)
        waves = np.sin(2 * np.pi * frequency[:, None] * t + rng.uniform(
            0, 2 * np.pi, (count, 1)))
        waves += rng.normal(0, 1.0, waves.shape)
        out.append((waves[..., None].astype("float32"),
                    labels.astype("int32")))
    return out


def _conv1d_timeseries(train_size, seed):
    """keras-io's "Timeseries classification from scratch" network."""
    import keras

    inputs = keras.Input((128, 1))
    x = inputs
    for _ in range(3):
        x = keras.layers.Conv1D(64, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return (keras.Model(inputs, outputs), "sparse_categorical_crossentropy",
            _sequences(train_size, seed))


def _frames(train_size, seed, steps=6, size=16):
    """Squares moving in straight lines; the target is the next frame."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (train_size // 4, 125, 250):
        movies = np.zeros((count, steps + 1, size, size, 1), "float32")
        for i in range(count):
            r, c = rng.integers(0, size - 4, 2)
            dr, dc = rng.integers(-1, 2, 2)
            for t in range(steps + 1):
                rr = int(np.clip(r + dr * t, 0, size - 4))
                cc = int(np.clip(c + dc * t, 0, size - 4))
                movies[i, t, rr:rr + 4, cc:cc + 4] = 1.0
        out.append((movies[:, :-1], movies[:, 1:]))
    return out


def _convlstm_next_frame(train_size, seed):
    """keras-io's next-frame prediction with ConvLSTM2D, one layer."""
    import keras

    inputs = keras.Input((None, 16, 16, 1))
    x = keras.layers.ConvLSTM2D(16, 3, padding="same",
                                return_sequences=True)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Conv3D(1, 3, padding="same",
                                  activation="sigmoid")(x)
    return (keras.Model(inputs, outputs), "binary_crossentropy",
            _frames(train_size, seed))


def year_table(count, seed):
    """A year (2000-2024) beside three standardized columns, and a linear
    target of all four: the raw-column case of `docs/defaults.md`."""
    rng = np.random.default_rng(seed)
    year = rng.integers(2000, 2025, count).astype("float32")
    other = rng.normal(size=(count, 3)).astype("float32")
    x = np.concatenate([year[:, None], other], axis=1)
    y = (0.1 * (year - 2012) + other @ [1.0, -0.5, 0.25]).astype("float32")
    return x, y[:, None]


def year_mlp(seed=0):
    """The MLP 4-32-32-1 that `docs/defaults.md` trains on `year_table`."""
    import keras

    import keras_bnp

    keras.utils.set_random_seed(seed)
    return keras_bnp.BNPSequential([
        keras.Input((4,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(1),
    ])


def _table(count, rng):
    """Raw columns: a year, a price spanning four decades, three
    standardized ones; a smooth non-linear target."""
    year = rng.integers(2000, 2025, count).astype("float64")
    price = np.exp(rng.uniform(np.log(1e3), np.log(1e7), count))
    other = rng.normal(size=(count, 3))
    target = (np.sin((year - 2000) / 4) + 0.5 * np.log10(price) - 2.5
              + other[:, 0] * other[:, 1] + np.tanh(other[:, 2]))
    x = np.column_stack([year, price, other]).astype("float32")
    return x, target[:, None].astype("float32")


def _tabular(train_size, seed):
    """An MLP on raw, unstandardized columns."""
    import keras

    rng = np.random.default_rng(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(64, activation="relu")(inputs)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(1)(x)
    return keras.Model(inputs, outputs), "mse", [
        _table(count, rng) for count in (train_size, 500, 1000)]


def _tokens(train_size, seed, length=32, vocabulary=200):
    """Token sequences labelled by their majority: 1 when more than half
    of the tokens come from the lower half of the vocabulary (a sentiment
    task of positive and negative words, learnable by pooling)."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (train_size, 500, 1000):
        tokens = rng.integers(1, vocabulary, (count, length))
        lower = (tokens < vocabulary // 2).sum(axis=1)
        labels = np.where(lower == length // 2, tokens[:, 0] < vocabulary // 2,
                          lower > length // 2)
        out.append((tokens.astype("int32"), labels.astype("int32")))
    return out


def _transformer_text(train_size, seed):
    """keras-io's "Text classification with Transformer": token and
    position embeddings, one Transformer block, pooling, a Dense head."""
    import keras

    length, vocabulary, width = 32, 200, 32
    inputs = keras.Input((length,))
    positions = keras.ops.arange(length)
    x = keras.layers.Embedding(vocabulary, width)(inputs) + \
        keras.layers.Embedding(length, width)(positions)
    attention = keras.layers.MultiHeadAttention(2, width)(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(
        x + keras.layers.Dropout(0.1)(attention))
    ffn = keras.layers.Dense(width)(
        keras.layers.Dense(64, activation="relu")(x))
    x = keras.layers.LayerNormalization(epsilon=1e-6)(
        x + keras.layers.Dropout(0.1)(ffn))
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(20, activation="relu")(
        keras.layers.Dropout(0.1)(x))
    outputs = keras.layers.Dense(2, activation="softmax")(
        keras.layers.Dropout(0.1)(x))
    return (keras.Model(inputs, outputs), "sparse_categorical_crossentropy",
            _tokens(train_size, seed))


# name: builder(train_size, seed) -> (model, loss, [train, val, test]).
MODELS = {
    "mobilenet_v3_small": _mobilenet_v3_small,
    "efficientnet_v2_b0": _efficientnet_v2_b0,
    "siamese": _siamese,
    "conv1d_timeseries": _conv1d_timeseries,
    "convlstm_next_frame": _convlstm_next_frame,
    "tabular": _tabular,
    "transformer_text": _transformer_text,
}


def run(name, method, learning_rate, seed=0, train_size=2000, epochs=6,
        batch_size=32):
    """Trains zoo model `name` with `method` and returns its record: the
    arguments, `train_loss`, `val_loss` and `seconds` per epoch (training
    time, cumulative), `test_loss`, `diverged` (a non-finite loss), and
    `initial_scales` (BNP's)."""
    import keras

    import keras_bnp

    keras.utils.set_random_seed(seed)
    model, loss, (train, val, test) = MODELS[name](train_size, seed)
    model = keras_bnp.BNPModel(model.inputs, model.outputs)
    optimizer = {
        "bnp": lambda: keras_bnp.BNP(learning_rate, momentum=0.9),
        "bnp_unscaled": lambda: keras_bnp.BNP(
            learning_rate, momentum=0.9, initial_scaling=False),
        "sgd": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(learning_rate),
    }[method]()
    model.compile(optimizer=optimizer, loss=loss)
    clock = _clock()
    history = model.fit(*train, validation_data=val, epochs=epochs,
                        batch_size=batch_size, verbose=0, callbacks=[clock])
    test_loss = float(model.evaluate(*test, batch_size=256, verbose=0))
    losses = history.history["loss"] + [test_loss]
    return {
        "model": name, "method": method, "learning_rate": learning_rate,
        "seed": seed, "train_size": train_size, "epochs": epochs,
        "batch_size": batch_size,
        "train_loss": history.history["loss"],
        "val_loss": history.history["val_loss"],
        "seconds": clock.seconds, "test_loss": test_loss,
        "diverged": not all(math.isfinite(v) for v in losses),
        "initial_scales": dict(getattr(optimizer, "initial_scales", {})),
    }


def _clock():
    """A callback holding the cumulative training seconds at each epoch
    end (validation excluded) in `seconds`."""
    import keras

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            done = self.seconds[-1] if self.seconds else 0.0
            self.seconds.append(done + self.last - self.start)

    return Clock()


def _key(record):
    return (record["model"], record["method"], record["learning_rate"],
            record["seed"], record["train_size"], record["epochs"])


def _score(record):
    """Final validation loss; a diverged run scores infinity."""
    value = record["val_loss"][-1]
    return math.inf if record["diverged"] or not math.isfinite(value) \
        else value


def tuned_rate(results, name, method, tune_seed, config):
    """The learning rate with the lowest final validation loss on
    `tune_seed` in `config`'s runs (ties: the smaller rate)."""
    runs = [r for r in results if (
        r["model"], r["method"], r["seed"], r["train_size"], r["epochs"]) == (
        name, method, tune_seed, config["train_size"], config["epochs"])]
    return min(runs, key=lambda r: (_score(r), r["learning_rate"]))[
        "learning_rate"]


def sweep(config, results, save, log=print):
    """Runs what `config` asks for that `results` lacks: every rate of
    `RATES` on the first seed, and up to `EDGE_STEPS` rates of the
    1-3-10 sequence beyond the grid while the best is at its edge; then
    the other seeds at the tuned rate."""
    from benchmarks.benchmark import _next_rate

    done = {_key(r) for r in results}
    size, epochs = config["train_size"], config["epochs"]
    first, *others = config["seeds"]

    def ensure(name, method, rate, seed):
        if (name, method, rate, seed, size, epochs) in done:
            return
        record = run(name, method, rate, seed, size, epochs)
        results.append(record)
        done.add(_key(record))
        save(results)
        log(f"{name} {method} lr={rate} seed={seed} "
            f"val={record['val_loss'][-1]:.4g} "
            f"test={record['test_loss']:.4g} "
            f"({record['seconds'][-1]:.1f}s)")

    for name in config["models"]:
        for method in config["methods"]:
            rates = sorted(RATES[method])
            for _ in range(EDGE_STEPS + 1):
                for rate in rates:
                    ensure(name, method, rate, first)
                best = tuned_rate(results, name, method, first, config)
                if best == rates[-1] and len(rates) < len(
                        RATES[method]) + EDGE_STEPS:
                    rates.append(_next_rate(best, down=False))
                elif best == rates[0] and len(rates) < len(
                        RATES[method]) + EDGE_STEPS:
                    rates.insert(0, _next_rate(best, down=True))
                else:
                    break
            for seed in others:
                ensure(name, method, tuned_rate(
                    results, name, method, first, config), seed)
    return results


def summary(config, results):
    """`{model: {method: {...}}}`: the tuned rate, and over the seeds run
    at it: the mean and standard deviation of the final test loss, the
    mean validation loss per epoch and the mean cumulative seconds."""
    first = config["seeds"][0]
    table = {}
    for name in config["models"]:
        table[name] = {}
        for method in config["methods"]:
            if not any((r["model"], r["method"]) == (name, method)
                       for r in results):
                continue  # not run for this model
            rate = tuned_rate(results, name, method, first, config)
            runs = [r for r in results if (
                r["model"], r["method"], r["learning_rate"]) == (
                name, method, rate) and r["seed"] in config["seeds"]
                and r["epochs"] == config["epochs"]
                and r["train_size"] == config["train_size"]]
            test = np.array([r["test_loss"] for r in runs], "float64")
            table[name][method] = {
                "learning_rate": rate,
                "seeds": sorted(r["seed"] for r in runs),
                "test_mean": float(np.mean(test)),
                "test_std": float(np.std(test)),
                "val_curve": np.mean([r["val_loss"] for r in runs],
                                     0).tolist(),
                "seconds": np.mean([r["seconds"] for r in runs], 0).tolist(),
                "diverged": sum(r["diverged"] for r in runs),
                "scaled_layers": len(runs[0]["initial_scales"]),
            }
    return table


def report(config, results, command):
    """The zoo's report in Markdown."""
    table = summary(config, results)
    lines = [
        "# The zoo: BNP's defaults on client models", "",
        f"Command: `{command}`", "",
        f"{config['train_size']} training examples "
        f"({config['train_size'] // 4} movies for the next-frame model), "
        f"{config['epochs']} epochs, batch size 32; "
        f"learning rates tuned on seed {config['seeds'][0]} by the final "
        "validation loss, then seeds "
        f"{', '.join(map(str, config['seeds'][1:])) or '(none)'} at that "
        "rate. Test loss (lower is better): mean ± standard deviation over "
        "the seeds. 'vs SGD' is BNP's mean minus SGD's, in units of the "
        "larger of their two standard deviations (below 0: BNP's loss is "
        "lower).", "",
        "| model | BNP (rate) | SGD (rate) | Adam (rate) | BNP vs SGD | "
        "layers scaled | BNP, `initial_scaling=False` (rate) |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(entry):
        text = (f"{entry['test_mean']:.4g} ± {entry['test_std']:.2g} "
                f"({entry['learning_rate']:g})")
        return text + (f"; diverged {entry['diverged']}"
                       if entry["diverged"] else "")

    for name, methods in table.items():
        bnp, sgd = methods.get("bnp"), methods.get("sgd")
        versus = ""
        if bnp and sgd:
            spread = max(bnp["test_std"], sgd["test_std"], 1e-12)
            versus = f"{(bnp['test_mean'] - sgd['test_mean']) / spread:+.1f}"
            for label, entry in (("SGD", sgd), ("BNP", bnp)):
                if not math.isfinite(entry["test_mean"]):
                    versus = f"{label} diverged"
        lines.append("| " + " | ".join(
            [name] + [cell(methods[m]) if m in methods else ""
                      for m in ("bnp", "sgd", "adam")]
            + [versus, str(bnp["scaled_layers"]) if bnp else "",
               cell(methods["bnp_unscaled"])
               if "bnp_unscaled" in methods else ""]) + " |")
    lines += ["", "Validation loss per epoch (mean over seeds) and the "
              "cumulative training seconds at the last epoch:", ""]
    for name, methods in table.items():
        lines.append(f"- **{name}**: " + "; ".join(
            f"{method} " + ", ".join(f"{v:.4g}" for v in entry["val_curve"])
            + f" ({entry['seconds'][-1]:.0f} s)"
            for method, entry in methods.items()))
    return "\n".join(lines) + "\n"


def plot(config, results, path):
    """Validation loss against training seconds, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary(config, results)
    columns = min(4, len(table))
    rows = math.ceil(len(table) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows),
                             squeeze=False)
    for ax, (name, methods) in zip(axes.flat, table.items()):
        for method, entry in methods.items():
            ax.plot(entry["seconds"], entry["val_curve"], marker="o",
                    label=f"{method} ({entry['learning_rate']:g})")
        ax.set_title(name)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(table):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark --zoo",
        description=__doc__, formatter_class=_cli.HelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=list(MODELS), help="zoo models to train")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=list(METHODS[:3]), help="methods to compare")
    parser.add_argument("--seeds", nargs="+", type=int,
                        default=DEFAULTS["seeds"],
                        help="seeds; the first tunes the learning rate")
    parser.add_argument("--train-size", type=int,
                        default=DEFAULTS["train_size"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--out-dir", default="zoo_out")
    parser.add_argument("--report-only", action="store_true",
                        help="report the runs in --out-dir, running nothing")
    args = parser.parse_args(argv)
    _cli.require("matplotlib", "benchmark", "the zoo's plot")
    config = {"models": args.models, "methods": args.methods,
              "seeds": args.seeds, "train_size": args.train_size,
              "epochs": args.epochs}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "results.json")
    results = []
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)

    def save(records):
        with open(path, "w") as f:
            json.dump(records, f, indent=1)

    if not args.report_only:
        sweep(config, results, save)
    command = "python -m benchmarks.benchmark --zoo " + " ".join(
        argv if argv is not None else [])
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(report(config, results, command.strip()))
    plot(config, results, os.path.join(args.out_dir, "zoo.png"))
    print(f"Wrote {args.out_dir}/report.md and zoo.png")
