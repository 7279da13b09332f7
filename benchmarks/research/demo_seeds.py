r"""The demo's table (`python -m keras_bnp.demo`, which trains with seed 0)
over several seeds: each row's test accuracy per seed, then their mean,
minimum and maximum, to compare the spread across seeds with the difference
between BNP and SGD.

    python -m benchmarks.research.demo_seeds --seeds 0 1 2
    TF_ENABLE_ONEDNN_OPTS=0 python -m benchmarks.research.demo_seeds \
        --seeds 0 1 2
"""

import argparse

import numpy as np

from keras_bnp import demo

parser = argparse.ArgumentParser()
parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 2])
args = parser.parse_args()

print(f"{'method':<8}{'batch':>6}  test acc per seed {args.seeds}"
      "   mean    min    max")
for batch_size in args.batch_sizes:
    for method in ("sgd", "bnp"):
        accuracies = np.array([
            demo.train(method, batch_size, seed=seed)[0]
            for seed in args.seeds])
        print(f"{method:<8}{batch_size:>6}  "
              + " ".join(f"{a:.4f}" for a in accuracies)
              + f"  {accuracies.mean():.4f} {accuracies.min():.4f}"
              f" {accuracies.max():.4f}", flush=True)
