"""Benchmark BNP against SGD, BatchNorm, LayerNorm, GroupNorm and Adam.

    python -m benchmarks.benchmark           # default: MLP, ~10 min, 2 CPUs
    python -m benchmarks.benchmark --full    # MLP and CNN, longer runs
    python -m benchmarks.benchmark --tasks cnn --batch-sizes 1 4 --methods bnp
    python -m benchmarks.benchmark --zoo     # client models (zoo.py)
    python -m benchmarks.benchmark --convergence  # to convergence

Trains every method at every batch size over a learning-rate grid and
several seeds (`benchmarks.experiment.run`), picks each method's learning
rate by validation accuracy (never the test set), and measures per-step
training time (interleaved, as a ratio to SGD), inference time and optimizer
state size. Writes to `--out-dir`: `results.json` (every run; an existing
file is resumed, so a sweep can be split or interrupted), `timing.json`,
`report.md` and PNG plots.

The plots need matplotlib: `pip install "keras-bnp[benchmark]"` (in a
clone, `pip install -e ".[benchmark]"`); the command checks for it before
the first run.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import sys
import time

import numpy as np

from benchmarks import _cli
from benchmarks import convergence
from benchmarks import experiment
from benchmarks import zoo

SGD_RATES = (0.003, 0.01, 0.03)
ADAM_RATES = (0.0003, 0.001, 0.003)
SHALLOW_METHODS = ["sgd", "bnp", "batchnorm", "layernorm", "groupnorm",
                   "adam", "bnp_adam"]
DEFAULTS = {
    "tasks": ["mlp"],
    "batch_sizes": [1, 2, 4, 16, 64, 256],
    "seeds": [0, 1, 2],
    "train_size": 2000,
    "epochs": 2,
    "methods": SHALLOW_METHODS,
}
FULL = {
    "tasks": ["mlp", "cnn"],
    "batch_sizes": [1, 2, 4, 16, 64, 256],
    "seeds": [0, 1, 2, 3, 4],
    "train_size": 7000,
    "epochs": 3,
    "methods": SHALLOW_METHODS,
}
# The deep suite: networks where BatchNorm matters most, without
# normalization layers unless a method adds them; validation accuracy is
# measured 8 times during training, against steps and training time.
DEEP = {
    "tasks": ["deep_mlp", "vgg", "resnet"],
    "batch_sizes": [1, 4, 32, 128],
    "seeds": [0, 1, 2],
    "train_size": 3000,
    "epochs": 1,
    "progress_points": 8,
    "tune_seeds": 1,
    "edge_steps": 2,
    "methods": ["sgd", "batchnorm", "batchrenorm", "layernorm", "groupnorm",
                "adam", "adamw", "muon", "bnp", "bnp_adam"],
}
# The deep suite's grids are wider: its best rates fell on the shallow
# grids' edges (normalization layers at small batches, Muon).
DEEP_SGD_RATES = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
DEEP_ADAM_RATES = (0.0001, 0.0003, 0.001, 0.003)


DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}


def learning_rates(method, config=None):
    """The grid a method's learning rate is tuned on."""
    deep = config is not None and config.get("progress_points")
    if "adam" in method or method == "muon":
        return DEEP_ADAM_RATES if deep else ADAM_RATES
    return DEEP_SGD_RATES if deep else SGD_RATES


def _key(result):
    return (result["task"], result["method"], result["batch_size"],
            result["learning_rate"], result["seed"])


def _in_config(result, config):
    """Whether `result` was run with `config`'s data and budget (a resumed
    results file may also hold runs of other configurations)."""
    dataset = experiment.dataset_for(result["task"], config["source"])
    return (result.get("dataset", "mnist") == dataset
            and result["train_size"] == config["train_size"]
            and result["epochs"] == config["epochs"])


def sweep(config, results, save, log=print):
    """Runs every missing configuration; `save(results)` after each.

    With `config["tune_seeds"]` (the deep suite: 1), only that many of the
    seeds run the whole learning-rate grid; the others then run only at
    the rate those chose (`_tuned`), which is how the report reads them.
    With `config["edge_steps"]` (the deep suite: 2), a method whose best
    rate is the lowest or highest it ran also runs the next rate of the
    1-3-10 sequence beyond it (on the tuning seeds), up to that many steps
    on each side, so that no tuned rate is an untried edge.
    """
    tune = config.get("tune_seeds") or len(config["seeds"])
    cells = [(task, method, batch_size)
             for task in config["tasks"]
             for batch_size in config["batch_sizes"]
             for method in config["methods"]]
    _run_all(config, [
        (task, method, batch_size, lr, seed)
        for task, method, batch_size in cells
        for lr in learning_rates(method, config)
        for seed in config["seeds"][:tune]
    ], results, save, log)
    for _ in range(config.get("edge_steps", 0)):
        beyond = [
            (*cell, lr, seed)
            for cell in cells
            for lr in _beyond_edge(config, results, *cell)
            for seed in config["seeds"][:tune]
        ]
        if not beyond:
            break
        _run_all(config, beyond, results, save, log)
    if tune >= len(config["seeds"]):
        return
    in_config = [r for r in results if _in_config(r, config)]
    _run_all(config, [
        (task, method, batch_size,
         _tuned(in_config, task, method, batch_size)[0]["learning_rate"],
         seed)
        for task, method, batch_size in cells
        for seed in config["seeds"][tune:]
    ], results, save, log)


def _beyond_edge(config, results, task, method, batch_size):
    """The next rate past the edge of the rates `method` ran, if its
    best (`_tuned`) is that edge and fewer than `edge_steps` rates lie
    beyond its grid there; else nothing."""
    runs = [r for r in results if _in_config(r, config) and (
        r["task"], r["method"], r["batch_size"]) == (task, method,
                                                     batch_size)]
    if not runs:
        return []
    rate = experiment.beyond_edge(
        learning_rates(method, config), {r["learning_rate"] for r in runs},
        _tuned(runs, task, method, batch_size)[0]["learning_rate"],
        config["edge_steps"])
    return [] if rate is None else [rate]


def _run_all(config, runs, results, save, log):
    """Runs those of `runs` (`(task, method, batch_size, lr, seed)`) that
    `results` does not hold yet."""
    done = {_key(r) for r in results if _in_config(r, config)}
    todo = [run for run in runs if run not in done]
    for i, (task, method, batch_size, lr, seed) in enumerate(todo, 1):
        result = experiment.run(
            method, batch_size, lr, task=task, seed=seed,
            train_size=config["train_size"], epochs=config["epochs"],
            source=config["source"],
            progress_points=config.get("progress_points", 0),
        )
        results.append(result)
        save(results)
        log(f"[{i}/{len(todo)}] {task} {method} bs={batch_size} lr={lr:g} "
            f"seed={seed}: test {result['test_accuracy']:.4f} "
            f"({result['seconds']:.1f}s)")


def merge_results(results, others):
    """`results` plus the runs of `others` it does not have (same task,
    method, batch size, learning rate, seed, data and budget)."""
    def key(r):
        return (*_key(r), r.get("dataset", "mnist"), r["train_size"],
                r["epochs"])

    have = {key(r) for r in results}
    return results + [r for r in others if key(r) not in have]


def merge_timings(timings, newer):
    """Cost tables `{task: {batch size: runs}}` (as in `timing.json`),
    `newer`'s where both have a task and batch size."""
    merged = {task: dict(sizes) for task, sizes in timings.items()}
    for task, sizes in newer.items():
        merged.setdefault(task, {}).update(sizes)
    return merged


def _seconds_per_step(run, seconds=0.25, repeats=3):
    """Seconds per step of `run(steps)`, the median of `repeats` calls of
    about `seconds` each (long enough that a call's fixed cost is small)."""
    def per_step(steps):
        start = time.perf_counter()
        run(steps)
        return (time.perf_counter() - start) / steps

    steps = max(8, int(seconds / per_step(8)))
    return float(np.median([per_step(steps) for _ in range(repeats)]))


def _step_loops(model, x, y, jit_compile):
    """Compiled loops of `steps` training steps (the model's own
    `train_step`, as `fit` runs it) and of `steps` inference calls on one
    fixed batch: no input pipeline, only the work of the step."""
    import tensorflow as tf

    x, y = tf.constant(x), tf.constant(y)

    @tf.function(jit_compile=jit_compile)
    def train(steps):
        for _ in tf.range(steps):
            model.train_step((x, y))

    @tf.function(jit_compile=jit_compile)
    def infer(steps):
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            # Scaling by exactly 1 that depends on the last call keeps XLA
            # from computing the loop-invariant call only once.
            scale = 1.0 + 1e-30 * tf.minimum(tf.abs(total), 1e6)
            total += tf.reduce_sum(model(x * scale, training=False))
        return total

    return (lambda steps: train(tf.constant(steps)),
            lambda steps: infer(tf.constant(steps)).numpy())


# How the cost table's steps run, by `jit_compile`.
STEP_COMPILATION = {
    False: "in a TensorFlow graph (what `fit` runs on CPU by default)",
    True: "compiled whole with XLA (`jit_compile=True`, what `fit` picks "
          "on a GPU)",
}
# The fixed batch of the cost table, by name.
TIMING_INPUTS = {"digits": "bundled MNIST digits", "noise": "uniform noise"}


def timing_batch(task, batch_size, inputs="digits", seed=0):
    """The one batch `(x, y)` that `timing` trains on: the first
    `batch_size` digits of the bundled MNIST sample (repeated if needed),
    or uniform noise in [0, 1] with random labels. The data matter to BNP
    only through its input sums, which take a slower path for layers whose
    running mean is large against their spread (see
    `statistics.input_sums`); on noise, the upper layers' features are such
    a case."""
    from keras_bnp import data

    if inputs == "digits":
        (x, y), _ = data.load_mnist()
        index = np.arange(batch_size) % len(x)
        x, y = x[index], y[index]
    elif inputs == "noise":
        rng = np.random.default_rng(seed)
        x = rng.uniform(size=(batch_size, *experiment.input_shape(task)))
        x = x.astype("float32")
        y = rng.integers(0, 10, size=batch_size)
    else:
        raise ValueError(f"Argument `inputs` must be one of "
                         f"{list(TIMING_INPUTS)}. Received: inputs={inputs!r}")
    return x.reshape((batch_size, *experiment.input_shape(task))), y


def timing(task, batch_size, methods, rounds=5, seed=0, jit_compile=False,
           inputs="digits"):
    """Per-step training and inference seconds per method on one fixed
    batch (`timing_batch`), measured in rounds that interleave the methods
    (in a rotating order), so that load on a shared machine hits every
    method alike. Returns medians."""
    x, y = timing_batch(task, batch_size, inputs, seed)
    loops = {}
    for method in methods:
        model = experiment.compiled_model(method, 1e-3, task=task, seed=seed)
        model.fit(x, y, batch_size=batch_size, verbose=0)  # builds all state
        loops[method] = _step_loops(model, x, y, jit_compile)
        for loop in loops[method]:
            loop(2)  # trace
    samples = {m: {"train": [], "inference": []} for m in methods}
    for r in range(rounds):
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:
            train, infer = loops[method]
            samples[method]["train"].append(_seconds_per_step(train))
            samples[method]["inference"].append(_seconds_per_step(infer))
    return {
        method: {kind: float(np.median(v)) for kind, v in s.items()}
        for method, s in samples.items()
    }


def timing_in_processes(task, batch_size, methods, rounds=5, processes=1,
                        inputs="digits", jit_compile=False):
    """`timing` in `processes` fresh processes, one after another (a list of
    their results): how fast a model runs varies more between processes
    (memory layout, thread placement) than between rounds of one. With one
    process, runs in this one."""
    options = dict(inputs=inputs, jit_compile=jit_compile)
    if processes == 1:
        return [timing(task, batch_size, methods, rounds, **options)]
    context = multiprocessing.get_context("spawn")
    results = []
    for _ in range(processes):
        with concurrent.futures.ProcessPoolExecutor(
                1, mp_context=context) as pool:
            results.append(pool.submit(
                timing, task, batch_size, methods, rounds,
                **options).result())
    return results


def _ratio_cell(runs, method, kind):
    """Median over processes of `method`'s time over SGD's in the same
    process, with the range when there are several processes."""
    ratios = [run[method][kind] / run["sgd"][kind] for run in runs]
    cell = f"{np.median(ratios):.2f}x"
    if len(ratios) > 1:
        cell += f" ({min(ratios):.2f}–{max(ratios):.2f})"
    return cell


def _tuned(results, task, method, batch_size):
    """The runs of the learning rate with the best mean validation
    accuracy over the seeds that every rate ran (all of them in a full
    grid; the tuning seeds where the other seeds ran only at the chosen
    rate), or [] if there are none."""
    by_lr = {}
    for r in results:
        if (r["task"], r["method"], r["batch_size"]) == (
                task, method, batch_size):
            by_lr.setdefault(r["learning_rate"], []).append(r)
    if not by_lr:
        return []
    common = set.intersection(*(
        {r["seed"] for r in runs} for runs in by_lr.values()))
    return max(by_lr.values(), key=lambda runs: np.mean(
        [r["validation_accuracy"] for r in runs if r["seed"] in common]
        or [-1.0]))


def _epochs_to(runs, target):
    epochs = [next((i + 1 for i, a in enumerate(r["validation_curve"])
                    if a >= target), None) for r in runs]
    reached = [e for e in epochs if e is not None]
    if not reached:
        return "—"
    return f"{np.mean(reached):.1f} ({len(reached)}/{len(epochs)})"


def _step_seconds(timings, task, batch_size, method):
    """Median seconds per training step from the cost table, or `None`."""
    runs = timings.get(task, {}).get(str(batch_size))
    if not runs or method not in runs[0]:
        return None
    return float(np.median([run[method]["train"] for run in runs]))


def _progress(runs, step_seconds):
    """Mean `[steps, seconds, validation accuracy]` over `runs` (which
    evaluate at the same steps); seconds from the cost table's step time
    when given, else as measured."""
    points = np.mean([r["progress"] for r in runs], axis=0)
    if step_seconds is not None:
        points[:, 1] = points[:, 0] * step_seconds
    return points


def _to_target(runs, target, step_seconds):
    """Steps and seconds until the validation accuracy first reached
    `target`, mean over the runs that reached it (how many did)."""
    reached = [next(((s, t) for s, t, a in _progress([r], step_seconds)
                     if a >= target), None) for r in runs]
    reached = [point for point in reached if point is not None]
    if not reached:
        return f"— (0/{len(runs)})"
    steps, seconds = np.mean(reached, axis=0)
    return f"{steps:.0f} steps, {seconds:.1f} s ({len(reached)}/{len(runs)})"


def _progress_tables(config, results, timings, task):
    """Markdown tables of one task of a suite with progress points: final
    validation accuracy at each method's tuned learning rate, and the steps
    and training time to reach BatchNorm's final validation accuracy."""
    accuracy, speed, rates = (_batch_size_header(config) for _ in range(3))
    targets = {}
    for batch_size in config["batch_sizes"]:
        runs = _tuned(results, task, "batchnorm", batch_size)
        targets[batch_size] = np.mean(
            [r["validation_accuracy"] for r in runs]) if runs else None
    for method in config["methods"]:
        cells, time_cells = [], []
        for batch_size in config["batch_sizes"]:
            runs = _tuned(results, task, method, batch_size)
            values = [r["validation_accuracy"] for r in runs]
            cells.append(
                f"{np.mean(values):.3f} ± {np.std(values):.3f} "
                f"(lr {runs[0]['learning_rate']:g})" if runs else "—")
            target = targets[batch_size]
            time_cells.append(
                _to_target(runs, target, _step_seconds(
                    timings, task, batch_size, method))
                if runs and target is not None else "—")
        accuracy.append(f"| {method} | " + " | ".join(cells) + " |")
        speed.append(f"| {method} | " + " | ".join(time_cells) + " |")
        rates.append(f"| {method} | " + " | ".join(
            _rate_cell(results, task, method, batch_size, config)
            for batch_size in config["batch_sizes"]) + " |")
    target_text = ", ".join(
        f"bs {b}: {t:.3f}" for b, t in targets.items() if t is not None)
    return [
        f"## {task}: validation accuracy at the tuned learning rate", "",
        *accuracy, "",
        f"## {task}: training to BatchNorm's final validation accuracy "
        f"({target_text})", "",
        "Steps until the validation accuracy (measured "
        f"{config['progress_points']} times in training) first reached "
        "it, and their training time: steps times the method's step time "
        "in the cost table where it has that batch size (so that the load "
        "of a shared machine counts alike for every method), else as "
        "measured. Mean over the seeds that reached it (how many did).",
        "", *speed, "",
        *(f"![{task}, batch size {b}]({task}_bs{b}_progress.png)"
          for b in config["batch_sizes"]), "",
        f"## {task}: validation accuracy at each learning rate", "",
        f"Seed {config['seeds'][0]}, learning rate: accuracy; † marks a "
        "run that diverged (final training loss not below ln 10, the loss "
        "of a uniform guess, or not finite).", "",
        *rates, "",
    ]


def _rate_cell(results, task, method, batch_size, config):
    """`lr: accuracy` of the first seed's runs, † where it diverged."""
    runs = sorted((r for r in results if (
        r["task"], r["method"], r["batch_size"], r["seed"]) == (
        task, method, batch_size, config["seeds"][0])),
        key=lambda r: r["learning_rate"])
    return " · ".join(
        f"{r['learning_rate']:g}: {r['validation_accuracy']:.2f}"
        + ("†" if r["diverged"] else "") for r in runs) or "—"


def _epoch_tables(config, results, target, task):
    """Markdown tables of one task of a suite measured per epoch: test
    accuracy at each method's tuned learning rate, and epochs to `target`
    validation accuracy."""
    accuracy, epochs = _batch_size_header(config), _batch_size_header(config)
    for method in config["methods"]:
        cells, epoch_cells = [], []
        for batch_size in config["batch_sizes"]:
            runs = _tuned(results, task, method, batch_size)
            values = [r["test_accuracy"] for r in runs]
            cells.append(f"{np.mean(values):.4f} ± {np.std(values):.4f}"
                         if runs else "—")
            epoch_cells.append(_epochs_to(runs, target) if runs else "—")
        accuracy.append(f"| {method} | " + " | ".join(cells) + " |")
        epochs.append(f"| {method} | " + " | ".join(epoch_cells) + " |")
    return [
        f"## {task.upper()}: test accuracy at the tuned learning rate",
        "", *accuracy, "",
        f"![BNP minus each baseline, test accuracy]({task}_accuracy.png)",
        "",
        f"## {task.upper()}: epochs to {target:.0%} validation accuracy",
        "", "Mean over the seeds that reached it (how many did).", "",
        *epochs, "",
        f"![test accuracy per learning rate]({task}_learning_rate.png)", "",
    ]


def _tuning_text(config):
    """The report's words for how the grid was extended past its edges
    and which seeds tuned the learning rates."""
    tune = config.get("tune_seeds") or len(config["seeds"])
    text = "" if not config.get("edge_steps") else (
        f", extended by up to {config['edge_steps']} rates of the 1-3-10 "
        "sequence past an edge that was a method's best")
    if tune >= len(config["seeds"]):
        return text + ", by the mean over seeds"
    return text + (f", on seed(s) {config['seeds'][:tune]}, the other seeds "
                   "run at that rate only")


def _batch_size_header(config):
    """The first two lines of a table with a column per batch size."""
    return ["| method | " + " | ".join(
        f"bs {b}" for b in config["batch_sizes"]) + " |",
        "|---" * (len(config["batch_sizes"]) + 1) + "|"]


def report(config, results, timings, target, command):
    """The Markdown report."""
    import keras
    import tensorflow as tf

    methods = config["methods"]
    datasets = "; ".join(
        f"{task.upper()} on "
        f"{DATASET_NAMES[experiment.dataset_for(task, config['source'])]}"
        for task in config["tasks"])
    lines = [
        "# keras_bnp benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()}; TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}; {time.strftime('%Y-%m-%d')}.  ",
        f"Data: {datasets} ({config['source']}), "
        f"{config['train_size']} training images, {config['epochs']} "
        "epochs; learning rate per method and batch size chosen on 1000 "
        "held-out training images from "
        f"{list(learning_rates('sgd', config))} (SGD-based) or "
        f"{list(learning_rates('adam', config))} (Adam- and Muon-based)"
        f"{_tuning_text(config)}; seeds {config['seeds']}; mean ± standard "
        "deviation over seeds.",
        "",
    ]
    for task in config["tasks"]:
        lines += (_progress_tables(config, results, timings, task)
                  if config.get("progress_points")
                  else _epoch_tables(config, results, target, task))
    for task, per_batch in timings.items():
        for batch_size, runs in per_batch.items():
            lines += [
                f"## {task.upper()}: cost per step, batch size {batch_size}",
                "",
                f"One fixed batch of {TIMING_INPUTS[config['timing_inputs']]}"
                f", steps {STEP_COMPILATION[config['timing_jit_compile']]}"
                f". Each of {len(runs)} process(es) interleaves the methods; "
                "times and ratios to SGD are per-process medians, then the "
                "median over processes (range in brackets). Inference is "
                "compared with the plain model of the same architecture "
                "(`sgd`).", "",
                "| method | train ms/step | vs SGD | inference ms/batch "
                "| vs plain | optimizer state (floats) |",
                "|---|---|---|---|---|---|",
            ]
            for method in (m for m in methods if m in runs[0]):
                state = [r["optimizer_state_floats"] for r in results
                         if r["task"] == task and r["method"] == method]
                train, inference = (
                    1e3 * np.median([run[method][kind] for run in runs])
                    for kind in ("train", "inference"))
                lines.append(
                    f"| {method} | {train:.3f} | "
                    f"{_ratio_cell(runs, method, 'train')} | "
                    f"{inference:.3f} | "
                    f"{_ratio_cell(runs, method, 'inference')} | "
                    f"{state[0] if state else '—'} |")
            lines.append("")
    return "\n".join(lines)


# (BNP variant, baseline) pairs of the accuracy plot.
COMPARISONS = (("bnp", "sgd"), ("bnp", "batchnorm"), ("bnp", "layernorm"),
               ("bnp", "groupnorm"), ("bnp", "adam"), ("bnp_adam", "adam"))
# Learning-rate plot: (method, colour, line style); grid positions match.
RATE_LINES = (("sgd", "C0", "--"), ("bnp", "C1", "-"),
              ("adam", "C2", "--"), ("bnp_adam", "C3", "-"))


def paired_differences(results, task, method, baseline, batch_size):
    """`method`'s test accuracy minus `baseline`'s in percentage points, per
    seed that both ran, each at its tuned learning rate (`_tuned`)."""
    ours, theirs = ({r["seed"]: r["test_accuracy"]
                     for r in _tuned(results, task, m, batch_size)}
                    for m in (method, baseline))
    return [100 * (ours[s] - theirs[s]) for s in sorted(ours) if s in theirs]


def plots(config, results, out_dir):
    """Per task, two PNGs: `{task}_accuracy.png`, BNP's test accuracy minus
    each baseline's per batch size (each at its tuned learning rate; bars:
    mean over seeds of the per-seed difference, whiskers: its standard
    deviation), and `{task}_learning_rate.png`, test accuracy at every
    learning rate of the grid, per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sizes = config["batch_sizes"]
    for task in config["tasks"]:
        pairs = [pair for pair in COMPARISONS
                 if set(pair) <= set(config["methods"])]
        fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharey=True,
                                 squeeze=False)
        for ax, (method, baseline) in zip(axes.flat, pairs):
            means, stds = [], []
            for batch_size in sizes:
                diffs = paired_differences(
                    results, task, method, baseline, batch_size) or [np.nan]
                means.append(np.mean(diffs))
                stds.append(np.std(diffs))
            # Cut the rare huge difference (BatchNorm at batch size 1), without
            # whiskers, and print its value, so that the others stay readable.
            shown = np.clip(means, -16, 16)
            stds = np.where(shown == means, stds, 0.0)
            ax.bar(range(len(sizes)), shown, yerr=stds, capsize=3,
                   color=["C2" if m >= 0 else "C3" for m in means])
            for i, (mean, bar, std) in enumerate(zip(means, shown, stds)):
                if np.isfinite(mean):
                    up = mean >= 0
                    tip = bar + (std if up else -std)
                    ax.annotate(f"{mean:+.1f}", (i, tip),
                                ha="center", va="bottom" if up else "top",
                                fontsize=7, xytext=(0, 2 if up else -2),
                                textcoords="offset points")
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_ylim(-21, 21)
            ax.set_xticks(range(len(sizes)), [str(b) for b in sizes])
            ax.set_title(f"{method} minus {baseline}", fontsize=10)
            ax.set_xlabel("batch size")
        for ax in axes.flat[len(pairs):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("test accuracy difference\n(percentage points)")
        dataset = DATASET_NAMES[experiment.dataset_for(task, config["source"])]
        fig.suptitle(f"{dataset} {task.upper()}: above 0, BNP is more accurate "
                     "(tuned learning rates, mean ± std over seeds)",
                     fontsize=10)
        paths.append(_save(fig, os.path.join(out_dir, f"{task}_accuracy.png")))

        fig, axes = plt.subplots(1, len(sizes), figsize=(2.2 * len(sizes), 3.4),
                                 squeeze=False)
        for ax, batch_size in zip(axes[0], sizes):
            for method, colour, style in RATE_LINES:
                if method not in config["methods"]:
                    continue
                rates = learning_rates(method)
                values = [[r["test_accuracy"] for r in results
                           if (r["task"], r["method"], r["batch_size"],
                               r["learning_rate"]) == (task, method,
                                                       batch_size, rate)]
                          for rate in rates]
                ax.errorbar(range(len(rates)),
                            [np.mean(v) if v else np.nan for v in values],
                            yerr=[np.std(v) if v else 0 for v in values],
                            color=colour, linestyle=style, marker="o",
                            capsize=2, label=method)
            ax.set_xticks(range(len(SGD_RATES)), [
                f"{a:g}\n({b:g})" for a, b in zip(SGD_RATES, ADAM_RATES)],
                fontsize=7)
            ax.set_title(f"batch size {batch_size}", fontsize=9)
        axes[0, 0].set_ylabel("test accuracy")
        axes[0, 0].set_xlabel("learning rate\n(Adam's)", fontsize=8)
        axes[0, -1].legend(fontsize=7)
        fig.suptitle(f"{dataset} {task.upper()}: test accuracy at each "
                     "learning rate "
                     "(mean ± std over seeds)", fontsize=10)
        paths.append(_save(fig, os.path.join(
            out_dir, f"{task}_learning_rate.png")))
    return paths


def progress_plots(config, results, timings, out_dir):
    """Validation accuracy against training time (as in `_progress`), per
    task and batch size, at each method's tuned learning rate (mean over
    seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in config["tasks"]:
        for batch_size in config["batch_sizes"]:
            fig, ax = plt.subplots(figsize=(6, 4))
            for method in config["methods"]:
                runs = _tuned(results, task, method, batch_size)
                if runs:
                    points = _progress(runs, _step_seconds(
                        timings, task, batch_size, method))
                    ax.plot(points[:, 1], points[:, 2], marker=".",
                            label=method)
            ax.set_xlabel("training seconds")
            ax.set_ylabel("validation accuracy")
            ax.set_title(f"{task}, batch size {batch_size}, tuned learning "
                         "rates", fontsize=10)
            ax.legend(fontsize=7)
            paths.append(_save(fig, os.path.join(
                out_dir, f"{task}_bs{batch_size}_progress.png")))
    return paths


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _default_help(text, name):
    """`text` with the default of `name` and its values under `--full` and
    `--deep`."""
    def typed(value):
        return " ".join(map(str, value)) if isinstance(value, list) else value

    return (f"{text} (default: {typed(DEFAULTS[name])}; with --full: "
            f"{typed(FULL[name])}; with --deep: {typed(DEEP[name])})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--zoo" in argv:
        argv.remove("--zoo")
        return zoo.main(argv)
    if "--convergence" in argv:
        argv.remove("--convergence")
        return convergence.main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark", description=__doc__,
        formatter_class=_cli.HelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="MLP and CNN, 7000 images, 3 epochs, 5 seeds")
    parser.add_argument("--deep", action="store_true",
                        help="the deep suite: 8x256 MLP, VGG-style and "
                        "ResNet-20-style CNNs, against every baseline, "
                        "with accuracy against training time")
    parser.add_argument("--tasks", nargs="+", choices=experiment.TASKS,
                        help=_default_help("models to train", "tasks"))
    parser.add_argument("--methods", nargs="+", choices=experiment.METHODS,
                        help=_default_help(
                            "methods to compare (sgd, the reference of "
                            "every ratio, is always added)", "methods"))
    parser.add_argument("--batch-sizes", nargs="+", type=int,
                        help=_default_help("batch sizes", "batch_sizes"))
    parser.add_argument("--seeds", nargs="+", type=int,
                        help=_default_help("random seeds", "seeds"))
    parser.add_argument("--train-size", type=int,
                        help=_default_help("training images", "train_size"))
    parser.add_argument("--epochs", type=int,
                        help=_default_help("epochs per run", "epochs"))
    parser.add_argument("--data", dest="source", choices=["bundled", "tfds"],
                        default="bundled",
                        help="bundled MNIST sample (offline), or via "
                        "tensorflow_datasets full MNIST for the MLP and "
                        "CIFAR-10 for the CNN (needs the `data` extra and "
                        "the internet once)")
    parser.add_argument("--target", type=float, default=0.85,
                        help="validation accuracy for 'epochs to target'")
    parser.add_argument("--timing-batch-sizes", nargs="*", type=int,
                        default=[128], help="batch sizes of the cost table "
                        "(none: no cost table)")
    parser.add_argument("--timing-tasks", nargs="+", choices=experiment.TASKS,
                        help="tasks of the cost table (default: --tasks)")
    parser.add_argument("--timing-rounds", type=_positive_int, default=5,
                        help="interleaved rounds per cost measurement")
    parser.add_argument("--timing-processes", type=_positive_int,
                        default=1,
                        help="repeat the cost table in this many fresh "
                        "processes and report the median and range")
    parser.add_argument("--timing-inputs", choices=list(TIMING_INPUTS),
                        default="digits",
                        help="the fixed batch of the cost table: bundled "
                        "MNIST digits, or uniform noise")
    parser.add_argument("--timing-jit-compile", action="store_true",
                        help="time steps compiled whole with XLA "
                        "(jit_compile=True) instead of graph steps")
    parser.add_argument("--out-dir", default="benchmark_out",
                        help="folder of the results, report and plots")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs already in "
                        "--out-dir and the --merge folders (a method, "
                        "batch size or seed without runs shows as —)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                        help="also use the runs and cost tables of these "
                        "--out-dir folders (a sweep split across processes "
                        "or machines); runs already here are kept")
    args = parser.parse_args(argv)
    # Everything it needs, before the first run: the plots come last.
    _cli.require("matplotlib", "benchmark", "python -m benchmarks.benchmark")
    if args.source == "tfds":
        _cli.require("tensorflow_datasets", "data", "--data tfds")

    config = dict(DEEP if args.deep else FULL if args.full else DEFAULTS)
    for name in ("tasks", "batch_sizes", "seeds", "train_size", "epochs",
                 "methods"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    config["methods"] = list(config["methods"])
    if "sgd" not in config["methods"]:
        config["methods"].insert(0, "sgd")  # the reference of every ratio
    config["source"] = args.source
    config["timing_inputs"] = args.timing_inputs
    config["timing_jit_compile"] = args.timing_jit_compile
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    results, merged_timings = [], {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    own_timing = os.path.join(args.out_dir, "timing.json")
    if os.path.exists(own_timing):  # kept unless measured again
        with open(own_timing) as f:
            merged_timings = json.load(f)
    for folder in args.merge:
        with open(os.path.join(folder, "results.json")) as f:
            results = merge_results(results, json.load(f))
        timing_path = os.path.join(folder, "timing.json")
        if os.path.exists(timing_path):
            with open(timing_path) as f:
                merged_timings = merge_timings(merged_timings, json.load(f))

    def save(values):
        with open(results_path, "w") as f:
            json.dump(values, f, indent=1)

    if args.report_only:
        save(results)
    else:
        sweep(config, results, save)
    timings = merge_timings(merged_timings, {
        task: {
            str(batch_size): timing_in_processes(
                task, batch_size, config["methods"], args.timing_rounds,
                args.timing_processes, args.timing_inputs,
                args.timing_jit_compile)
            for batch_size in ([] if args.report_only
                               else args.timing_batch_sizes)
        }
        for task in args.timing_tasks or config["tasks"]
    })
    with open(os.path.join(args.out_dir, "timing.json"), "w") as f:
        json.dump(timings, f, indent=1)
    command = "python -m benchmarks.benchmark " + " ".join(
        argv if argv is not None else sys.argv[1:])
    results = [r for r in results if _in_config(r, config)]
    text = report(config, results, timings, args.target, command.strip())
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    if config.get("progress_points"):
        progress_plots(config, results, timings, args.out_dir)
    else:
        plots(config, results, args.out_dir)
    print(f"Wrote {args.out_dir}/report.md, results.json, timing.json and "
          "plots.")


if __name__ == "__main__":
    main()
