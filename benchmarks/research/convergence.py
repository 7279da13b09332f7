"""BNP against BatchNorm trained to convergence: the VGG-style network of
the deep suite on the bundled MNIST sample (7000 training images, 1000
held out), 8 epochs, SGD with momentum 0.9, validation accuracy after
every epoch.

    python -m benchmarks.research.convergence --out convergence.json \
        [--batch-size 32] [--variants]

Learning rates are tuned on seed 0 by the final validation accuracy, per
method and schedule (cosine decay to 0, or constant); seeds 1 and 2 then
run at that rate. BatchNorm with momentum 0.9 (PyTorch's default) and 0.99
(Keras') train identically and differ only in the moving averages used for
validation, so Keras' BatchNorm runs at the rate tuned for momentum 0.9.
Last, with `--variants`, BNP with other damping and statistics momentum
(`VARIANTS`) runs at its tuned cosine rate. Finished runs are appended to
`--out` and skipped when the command runs again. `--report` prints the
tables of a results file.
"""

import argparse
import json
import os

import numpy as np

from benchmarks import experiment

RATES = {"bnp": (0.003, 0.01, 0.03), "batchnorm90": (0.01, 0.03, 0.1)}
RUN = {"task": "vgg", "train_size": 7000, "epochs": 8, "progress_points": 8}
SCHEDULES = ("cosine", "constant")
# BNP with other settings, at BNP's tuned cosine rate: can it hold its
# early lead to the end?
VARIANTS = {"bnp[epsilon=1]": {"epsilon": 1.0},
            "bnp[epsilon=10]": {"epsilon": 10.0},
            "bnp[statistics_momentum=0.9]": {"statistics_momentum": 0.9},
            "bnp[statistics_momentum=0.999]": {"statistics_momentum": 0.999}}
SEEDS = (0, 1, 2)
EPOCHS_SHOWN = (1, 2, 4, 8)


def _key(method, schedule, rate, seed):
    return f"{method}/{schedule}/{rate}/{seed}"


def _final(record):
    return record["progress"][-1][2]


def tuned_rate(results, method, schedule):
    runs = {r: results.get(_key(method, schedule, r, 0))
            for r in RATES[method]}
    if None in runs.values():
        return None
    return max(runs, key=lambda r: _final(runs[r]))


def plan(results, variants):
    """The runs still to do, in order: each rate of the grid on seed 0,
    then the other seeds at the tuned rate, Keras' BatchNorm at
    BatchNorm-0.9's cosine rate, and, with `variants`, BNP's
    `VARIANTS`."""
    todo = []
    for schedule in SCHEDULES:
        for method in RATES:
            todo += [(method, schedule, r, 0) for r in RATES[method]]
    for schedule in SCHEDULES:
        for method in RATES:
            rate = tuned_rate(results, method, schedule)
            if rate is not None:
                todo += [(method, schedule, rate, s) for s in SEEDS[1:]]
    rate = tuned_rate(results, "batchnorm90", "cosine")
    if rate is not None:
        todo += [("batchnorm", "cosine", rate, s) for s in SEEDS]
    rate = tuned_rate(results, "bnp", "cosine")
    if variants and rate is not None:
        todo += [(variant, "cosine", rate, seed) for seed in SEEDS
                 for variant in VARIANTS]
    return [run for run in todo if _key(*run) not in results]


def _mean_std(values):
    """`mean ± standard deviation`, or the value alone."""
    text = f"{np.mean(values):.4f}"
    return text + f" ± {np.std(values):.4f}" if len(values) > 1 else text


def report(results):
    lines = ["| method | schedule | rate | seeds | "
             + " | ".join(f"epoch {e}" for e in EPOCHS_SHOWN)
             + " | test |", "|---" * (5 + len(EPOCHS_SHOWN)) + "|"]
    rows = {}
    for key, record in results.items():
        method, schedule, rate, _ = key.split("/")
        rows.setdefault((method, schedule, float(rate)), []).append(record)
    for (method, schedule, rate), records in sorted(rows.items()):
        cells = [_mean_std([r["progress"][epoch - 1][2] for r in records])
                 for epoch in EPOCHS_SHOWN]
        cells.append(_mean_std([r["test_accuracy"] for r in records]))
        lines.append(f"| {method} | {schedule} | {rate:g} | {len(records)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _to_targets(rows)


def _to_targets(rows):
    """Per method and schedule at its tuned rate with every seed: the
    epoch and the training seconds at which validation accuracy first
    reached 95%, 98% and 99% of the best method's mean final accuracy, the
    mean over seeds ("-" where a seed never did)."""
    tuned = {key: records for key, records in rows.items()
             if len(records) == len(SEEDS)}
    best = max(np.mean([_final(r) for r in records])
               for records in tuned.values())
    fractions = (0.95, 0.98, 0.99)
    lines = ["| method | " + " | ".join(
        f"{f:.0%} ({f * best:.4f}): epoch, seconds" for f in fractions)
        + " |", "|---" * (1 + len(fractions)) + "|"]
    for (method, schedule, rate), records in sorted(tuned.items()):
        cells = []
        for fraction in fractions:
            reached = [next(((i + 1, p[1]) for i, p in enumerate(
                r["progress"]) if p[2] >= fraction * best), None)
                for r in records]
            cells.append("-" if None in reached else
                         f"{np.mean([e for e, _ in reached]):.1f}, "
                         f"{np.mean([t for _, t in reached]):.0f}")
        lines.append(f"| {method} ({schedule}, {rate:g}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="convergence.json")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", action="store_true",
                        help="also run BNP's VARIANTS")
    args = parser.parse_args()
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    while not args.report and (todo := plan(results, args.variants)):
        method, schedule, rate, seed = todo[0]
        record = experiment.run(
            "bnp" if method in VARIANTS else method, args.batch_size, rate,
            seed=seed, schedule=schedule, bnp_options=VARIANTS.get(method),
            **RUN)
        results[_key(method, schedule, rate, seed)] = record
        with open(args.out, "w") as f:
            json.dump(results, f)
        print(f"{method} {schedule} {rate} seed {seed}: validation "
              f"{_final(record):.4f} after {record['seconds']:.0f} s",
              flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
