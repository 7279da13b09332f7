"""BNP against normalization layers trained to convergence: by default
the VGG-style network of the deep suite on the bundled MNIST sample (7000
training images, 1000 held out), 8 epochs, SGD with momentum 0.9,
validation accuracy after every epoch.

    python -m benchmarks.benchmark --convergence --out-dir convergence_out
    python -m benchmarks.benchmark --convergence --batch-size 128 \\
        --out-dir convergence_bs128 [--variants] [--report-only]

Learning rates are tuned on the first seed by the final validation accuracy,
per method and schedule (cosine decay to 0, or constant), over `RATES` and
up to two rates beyond the grid while the best is at its edge; the other
seeds then run at that rate. BatchNorm with momentum 0.9 (PyTorch's default,
`batchnorm90`) and 0.99 (Keras') train identically and differ only in the
moving averages used for validation, so Keras' BatchNorm runs at the rate
tuned for momentum 0.9. Where a seed fails at the tuned rate (diverges, or
ends below half of the first seed's accuracy), the other seeds also run at
the next lower rate tried. Last, with `--variants`, BNP with other damping
and statistics momentum (`VARIANTS`) runs at its tuned cosine rate. Finished
runs are added to `results.json` in `--out-dir` and skipped when the command
runs again, so it can be stopped and resumed; a study split across processes
or machines by `--methods` (one output folder each) is reported as one with
`--merge DIR ...`. `report.md` holds the tables.
"""

import argparse
import json
import os

import numpy as np

from benchmarks import _cli
from benchmarks import experiment

RATES = {"bnp": (0.003, 0.01, 0.03), "sgd": (0.003, 0.01, 0.03),
         "batchnorm90": (0.01, 0.03, 0.1), "batchrenorm": (0.01, 0.03, 0.1),
         "layernorm": (0.01, 0.03, 0.1), "groupnorm": (0.01, 0.03, 0.1),
         "adam": (0.0003, 0.001, 0.003), "adamw": (0.0003, 0.001, 0.003)}
DEFAULTS = {"task": "vgg", "train_size": 7000, "epochs": 8,
            "batch_size": 32, "seeds": [0, 1, 2],
            "methods": ["bnp", "batchnorm90"],
            "schedules": ["cosine", "constant"]}
# BNP with other settings, at BNP's tuned cosine rate: can it hold its
# early lead to the end?
VARIANTS = {"bnp[epsilon=1]": {"epsilon": 1.0},
            "bnp[epsilon=10]": {"epsilon": 10.0},
            "bnp[statistics_momentum=0.9]": {"statistics_momentum": 0.9},
            "bnp[statistics_momentum=0.999]": {"statistics_momentum": 0.999}}
TARGETS = (0.95, 0.98, 0.99)
# How many rates past the grid's edge the tuning may go.
EDGE_STEPS = 2


def _key(method, schedule, rate, seed):
    return f"{method}/{schedule}/{rate}/{seed}"


def _final(record):
    return record["progress"][-1][2]


def rates_to_try(results, method, schedule, seed):
    """`RATES[method]`, and up to `EDGE_STEPS` rates of the 1-3-10
    sequence beyond it while the best on `seed` is at an edge."""
    rates = sorted(RATES[method])
    while (best := _best(results, method, schedule, seed, rates)) is not None:
        rate = experiment.beyond_edge(RATES[method], rates, best, EDGE_STEPS)
        if rate is None:
            break
        rates = sorted(rates + [rate])
    return rates


def _best(results, method, schedule, seed, rates):
    """The rate of `rates` with the best final validation accuracy on
    `seed` (ties: the smaller rate); None until all have run."""
    runs = {r: results.get(_key(method, schedule, r, seed)) for r in rates}
    if None in runs.values():
        return None
    return max(sorted(runs), key=lambda r: _final(runs[r]))


def tuned_rate(results, method, schedule, seed):
    """The best of `rates_to_try` once they have all run, else None."""
    return _best(results, method, schedule, seed,
                 rates_to_try(results, method, schedule, seed))


def plan(results, config, variants):
    """The runs still to do, in order: each rate of the grid on the first
    seed, then the other seeds at the tuned rate, Keras' BatchNorm at
    BatchNorm-0.9's cosine rate, and, with `variants`, BNP's
    `VARIANTS`."""
    first, *others = config["seeds"]
    methods, schedules = config["methods"], config["schedules"]
    tried = {(method, schedule): rates_to_try(results, method, schedule,
                                              first)
             for schedule in schedules for method in methods}
    todo = [(method, schedule, r, first)
            for (method, schedule), rates in tried.items() for r in rates]
    for (method, schedule), rates in tried.items():
        rate = _best(results, method, schedule, first, rates)
        if rate is None:
            continue
        todo += [(method, schedule, rate, s) for s in others]
        lower = [r for r in rates if r < rate]
        if lower and any(_failed(results, (method, schedule, rate, s), first)
                         for s in others):
            # How far from failing is the tuned rate: the other seeds also
            # at the next lower rate tried.
            todo += [(method, schedule, lower[-1], s) for s in others]
    if "batchnorm90" in methods and (rate := tuned_rate(
            results, "batchnorm90", schedules[0], first)) is not None:
        todo += [("batchnorm", schedules[0], rate, s)
                 for s in config["seeds"]]
    if variants and (rate := tuned_rate(
            results, "bnp", "cosine", first)) is not None:
        todo += [(variant, "cosine", rate, seed) for seed in config["seeds"]
                 for variant in VARIANTS]
    return [run for run in todo if _key(*run) not in results]


def _failed(results, run, first):
    """Whether `run` (method, schedule, rate, seed) diverged or ended below
    half of the first seed's final accuracy at that rate."""
    record = results.get(_key(*run))
    reference = results[_key(*run[:3], first)]
    return record is not None and (
        record["diverged"] or _final(record) < 0.5 * _final(reference))


def _mean_std(values):
    """`mean ± standard deviation`, or the value alone."""
    text = f"{np.mean(values):.4f}"
    return text + f" ± {np.std(values):.4f}" if len(values) > 1 else text


def epochs_shown(epochs):
    """Epochs 1, 2, 4, 8, ... up to the last, and the last."""
    shown = [e for e in (2 ** i for i in range(epochs.bit_length()))
             if e < epochs]
    return shown + [epochs]


def report(results, config, command):
    """The study's report in Markdown: every method, schedule and rate
    run, then the time to each of `TARGETS` at the tuned rates."""
    shown = epochs_shown(config["epochs"])
    lines = [
        f"# Convergence study: {config['task']}, batch size "
        f"{config['batch_size']}, {config['epochs']} epochs", "",
        f"Command: `{command}`", "",
        f"{config['train_size']} training images. Validation accuracy "
        f"after epochs {', '.join(map(str, shown))}, and test accuracy, "
        "mean ± standard deviation over seeds; then the time to "
        + ", ".join(f"{t:.0%}" for t in TARGETS) + " of the best final "
        "accuracy (epoch, training seconds) at each tuned rate with every "
        "seed (\"-\": a seed never reached it).", "",
        "| method | schedule | rate | seeds | "
        + " | ".join(f"epoch {e}" for e in shown) + " | test |",
        "|---" * (5 + len(shown)) + "|"]
    rows = {}
    for key, record in results.items():
        method, schedule, rate, _ = key.split("/")
        rows.setdefault((method, schedule, float(rate)), []).append(record)
    for (method, schedule, rate), records in sorted(rows.items()):
        cells = [_mean_std([r["progress"][epoch - 1][2] for r in records])
                 for epoch in shown]
        cells.append(_mean_std([r["test_accuracy"] for r in records]))
        lines.append(f"| {method} | {schedule} | {rate:g} | {len(records)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _to_targets(rows, config) + "\n"


def _to_targets(rows, config):
    """Per method and schedule at its tuned rate with every seed: the
    epoch and the training seconds at which validation accuracy first
    reached each of `TARGETS` times the best method's mean final accuracy,
    the mean over seeds ("-" where a seed never did)."""
    tuned = {key: records for key, records in rows.items()
             if len(records) == len(config["seeds"])}
    if not tuned:
        return ""
    best = max(np.mean([_final(r) for r in records])
               for records in tuned.values())
    lines = ["| method | " + " | ".join(
        f"{f:.0%} ({f * best:.4f}): epoch, seconds" for f in TARGETS)
        + " |", "|---" * (1 + len(TARGETS)) + "|"]
    for (method, schedule, rate), records in sorted(tuned.items()):
        cells = []
        for fraction in TARGETS:
            reached = [next(((i + 1, p[1]) for i, p in enumerate(
                r["progress"]) if p[2] >= fraction * best), None)
                for r in records]
            cells.append("-" if None in reached else
                         f"{np.mean([e for e, _ in reached]):.1f}, "
                         f"{np.mean([t for _, t in reached]):.0f}")
        lines.append(f"| {method} ({schedule}, {rate:g}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load(path):
    """The runs recorded in `path`, if it exists."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark --convergence",
        description=__doc__, formatter_class=_cli.HelpFormatter)
    parser.add_argument("--out-dir", default="convergence_out")
    parser.add_argument("--task", default=DEFAULTS["task"],
                        choices=["mlp", "cnn", "deep_mlp", "vgg", "resnet"])
    parser.add_argument("--batch-size", type=int,
                        default=DEFAULTS["batch_size"])
    parser.add_argument("--train-size", type=int,
                        default=DEFAULTS["train_size"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--seeds", nargs="+", type=int,
                        default=DEFAULTS["seeds"],
                        help="seeds; the first tunes the learning rate")
    parser.add_argument("--methods", nargs="+", choices=list(RATES),
                        default=DEFAULTS["methods"],
                        help="methods to compare (Keras' BatchNorm, "
                        "momentum 0.99, runs with batchnorm90)")
    parser.add_argument("--schedules", nargs="+",
                        choices=["cosine", "constant"],
                        default=DEFAULTS["schedules"],
                        help="learning-rate schedules; Keras' BatchNorm "
                        "runs with the first")
    parser.add_argument("--variants", action="store_true",
                        help="also run BNP's VARIANTS")
    parser.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                        help="also read the runs in these output folders "
                        "(a study split by --methods across processes or "
                        "machines), for the plan and the report")
    parser.add_argument("--report-only", action="store_true",
                        help="report the runs in --out-dir, running nothing")
    args = parser.parse_args(argv)
    config = {name: getattr(args, name) for name in DEFAULTS}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "results.json")
    merged = {}
    for folder in args.merge:
        merged.update(_load(os.path.join(folder, "results.json")))
    results = _load(path)
    while not args.report_only and (
            todo := plan({**merged, **results}, config, args.variants)):
        method, schedule, rate, seed = todo[0]
        record = experiment.run(
            "bnp" if method in VARIANTS else method, config["batch_size"],
            rate, task=config["task"], train_size=config["train_size"],
            epochs=config["epochs"], progress_points=config["epochs"],
            seed=seed, schedule=schedule, bnp_options=VARIANTS.get(method))
        results[_key(method, schedule, rate, seed)] = record
        with open(path, "w") as f:
            json.dump(results, f)
        print(f"{method} {schedule} {rate} seed {seed}: validation "
              f"{_final(record):.4f} after {record['seconds']:.0f} s",
              flush=True)
    command = "python -m benchmarks.benchmark --convergence " + " ".join(
        a for a in (argv if argv is not None else [])
        if a != "--report-only")
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(report({**merged, **results}, config, command.strip()))
    print(f"Wrote {args.out_dir}/report.md")
