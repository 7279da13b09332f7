"""Cost of a BNP training step on a Transformer encoder block against SGD's:
MultiHeadAttention (its four EinsumDense projections preconditioned), two
LayerNormalization, a feed-forward Dense pair and a Dense classifier.

    python docs/benchmark/transformer_step.py [--rounds 7] [--jit-compile]

One fixed batch of uniform noise; each model's own training step in a
compiled loop (`benchmark._step_loops`, as the cost tables), timed as the
median of 3 calls of about 0.25 s. The rounds interleave BNP and SGD in one
process; it prints each round's ratio, then their median and range.
"""

import argparse

import keras
import numpy as np

import keras_bnp
from keras_bnp import benchmark


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
    parser.add_argument("--rounds", type=int, default=7)
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
    ratios = []
    for round_ in range(args.rounds):
        seconds = {name: benchmark._seconds_per_step(train)
                   for name, train in loops.items()}
        ratios.append(seconds["bnp"] / seconds["sgd"])
        print(f"round {round_}: SGD {1e3 * seconds['sgd']:.2f} ms/step, "
              f"BNP {1e3 * seconds['bnp']:.2f} ms/step, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"BNP / SGD: median {np.median(ratios):.3f} "
          f"(range {min(ratios):.3f} to {max(ratios):.3f}, "
          f"{args.rounds} rounds)")


if __name__ == "__main__":
    main()
