"""BNP on a model that keeps its BatchNormalization layers, against SGD on
the same model, on the benchmark's MLP budget (2000 bundled training
images, 2 epochs, seeds 0, 1, 2) at the given batch sizes and learning
rates: test accuracy, mean ± standard deviation over the seeds.

    python -m benchmarks.research.with_batchnorm --batch-sizes 4 16 \
        --learning-rates 0.01 0.03
"""

import argparse

import numpy as np

from benchmarks import experiment

# BNP around SGD on the "batchnorm" model: a method the sweep does not have.
experiment.METHOD_SPECS["bnp_batchnorm"] = ("bnp", "batch")
experiment.METHODS += ("bnp_batchnorm",)

parser = argparse.ArgumentParser()
parser.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 16])
parser.add_argument("--learning-rates", nargs="+", type=float,
                    default=[0.01, 0.03])
args = parser.parse_args()

for batch_size in args.batch_sizes:
    for rate in args.learning_rates:
        for method in ("batchnorm", "bnp_batchnorm"):
            accuracies = [experiment.run(
                method, batch_size, rate, train_size=2000, epochs=2,
                seed=seed)["test_accuracy"] for seed in (0, 1, 2)]
            print(f"batch {batch_size:>3}  lr {rate:<6g} {method:<14}"
                  f"{np.mean(accuracies):.4f} ± {np.std(accuracies):.4f}",
                  flush=True)
