"""Batch sizes 1 and 2 on real MNIST digits: the case BNP exists for.

A short version of the defaults study in docs/defaults.md (which uses 3000
training images and three seeds): 1000 images, one epoch, one seed.
"""

import math

import pytest

from benchmarks import experiment

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow

LEARNING_RATES = (0.001, 0.003, 0.01)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_small_batches(batch_size):
    runs = {
        method: [
            experiment.run(method, batch_size, lr, train_size=1000)
            for lr in LEARNING_RATES
        ]
        for method in ("sgd", "bnp")
    }
    for sgd, bnp in zip(runs["sgd"], runs["bnp"]):
        if sgd["train_loss"] < math.log(10.0) / 2:  # SGD converges here
            assert not bnp["diverged"], (sgd, bnp)
            assert bnp["train_loss"] < math.log(10.0) / 2, (sgd, bnp)

    def tuned(results):  # learning rate chosen on the validation images
        return max(results, key=lambda r: r["validation_accuracy"])

    sgd, bnp = tuned(runs["sgd"]), tuned(runs["bnp"])
    assert bnp["test_accuracy"] >= sgd["test_accuracy"], (sgd, bnp)
    assert bnp["test_accuracy"] > 0.8
