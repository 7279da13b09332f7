r"""Cost of a BNP training step on a Transformer encoder block against SGD's:
MultiHeadAttention (its four EinsumDense projections preconditioned), two
LayerNormalization, a feed-forward Dense pair and a Dense classifier.

    python -m benchmarks.research.transformer_step [--rounds 100] \
        [--jit-compile]

One fixed batch of uniform noise; each model's own training step in a
compiled loop (`benchmark._step_loops`, as the cost tables). Each round
times about 0.1 s of SGD steps, of BNP steps, of SGD steps again; it prints
the median and quartiles over the rounds of BNP's time over its two SGD
neighbours' mean, and the ratio of the fastest steps each method took.
"""

import argparse
import time

import keras
import numpy as np

import keras_bnp
from benchmarks import benchmark


def transformer(length, dim, heads, classes, model_class):
    inputs = keras.Input((length, dim))
    attention = keras.layers.MultiHeadAttention(heads, dim // heads)
    hidden = keras.layers.LayerNormalization()(
        inputs + attention(inputs, inputs))
    feed_forward = keras.layers.Dense(4 * dim, activation="relu")(hidden)
    hidden = keras.layers.LayerNormalization()(
        hidden + keras.layers.Dense(dim)(feed_forward))
    outputs = keras.layers.Dense(classes)(
        keras.layers.GlobalAveragePooling1D()(hidden))
    return model_class(inputs, outputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--jit-compile", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (args.batch_size, args.length, args.dim))
    x = x.astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    loops = {}
    for name, optimizer, model_class in (
            ("sgd", keras.optimizers.SGD(1e-3, momentum=0.9), keras.Model),
            ("bnp", keras_bnp.BNP(1e-3), keras_bnp.BNPModel)):
        keras.utils.set_random_seed(0)
        model = transformer(args.length, args.dim, args.heads, 10,
                            model_class)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True),
                      jit_compile=args.jit_compile)
        model.fit(x, y, batch_size=args.batch_size, verbose=0)
        train, _ = benchmark._step_loops(model, x, y, args.jit_compile)
        train(3)
        loops[name] = train
    # The machine is shared: each round times SGD, BNP, SGD in short
    # calls back to back, and compares BNP with the mean of its two SGD
    # neighbours, so that a round sees one load.
    steps = max(2, int(0.1 / _seconds(loops["sgd"], 4)))
    ratios, best = [], {"sgd": np.inf, "bnp": np.inf}
    for _ in range(args.rounds):
        before, bnp, after = (_seconds(loops[name], steps)
                              for name in ("sgd", "bnp", "sgd"))
        ratios.append(2 * bnp / (before + after))
        best = {"sgd": min(best["sgd"], before, after),
                "bnp": min(best["bnp"], bnp)}
    low, median, high = np.percentile(ratios, [25, 50, 75])
    print(f"{args.rounds} rounds of {steps} steps: BNP / SGD median "
          f"{median:.3f} (quartiles {low:.3f} to {high:.3f}); fastest "
          f"steps: SGD {1e3 * best['sgd']:.2f} ms, BNP "
          f"{1e3 * best['bnp']:.2f} ms, ratio {best['bnp'] / best['sgd']:.3f}")


def _seconds(train, steps):
    """Seconds per step of one call of `train(steps)`."""
    start = time.perf_counter()
    train(steps)
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
