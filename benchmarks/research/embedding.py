"""Does preconditioning an Embedding help? A measurement, not a rule of
the package.

An Embedding lookup is a Dense layer without bias on one-hot inputs: input
feature `c` (token `c`) has mean `p_c`, the token's frequency, and
variance `p_c (1 - p_c)`. This script adds that rule (statistics from a
sparse one-hot, so counts per token; the preconditioner's no-bias form)
beside the package's rules, and trains a bag-of-embeddings classifier
with BNP on synthetic sentiment data whose tokens follow a Zipf law, with
and without it. The learning rate of each variant is chosen by the mean
validation accuracy over the seeds; the test accuracy is given at it.

    python -m benchmarks.research.embedding
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

import keras_bnp
from keras_bnp import rules


class OneHotBlock(rules.Block):
    """An embedding table as a Dense kernel on one-hot token ids."""

    def features(self, record):
        ids = tf.reshape(tf.cast(record, tf.int64), (-1,))
        rows = tf.range(tf.size(ids, out_type=tf.int64))
        return tf.SparseTensor(
            tf.stack([rows, ids], axis=1), tf.ones_like(ids, tf.float32),
            (tf.size(ids, out_type=tf.int64), self.features_count)), -1

    def gather(self, grads):
        return tf.convert_to_tensor(grads[0]), None


class EmbeddingRule(rules.Rule):
    layer_types = (keras.layers.Embedding,)
    kernel_names = ("embeddings",)
    scaled = False

    def blocks(self, layer):
        table = rules._trainable(layer)["embeddings"]
        return [OneHotBlock(layer, table, None, table.shape[0])]


def zipf_sentiment(rng, n, vocabulary, length, polarity, exponent):
    """Sequences of Zipf-distributed tokens; the label is the sign of the
    sum of the tokens' polarities plus noise of the same spread."""
    frequency = 1.0 / np.arange(1, vocabulary + 1) ** exponent
    tokens = rng.choice(vocabulary, size=(n, length),
                        p=frequency / frequency.sum())
    score = polarity[tokens].sum(axis=1)
    labels = score + rng.normal(scale=score.std(), size=n) > 0
    return tokens.astype("int32"), labels.astype("int32")


def accuracy(with_rule, learning_rate, seed, splits, args):
    rules.RULES = BASE + (EmbeddingRule(),) if with_rule else BASE
    keras.utils.set_random_seed(seed)
    model = keras_bnp.BNPSequential([
        keras.Input((args.length,), dtype="int32"),
        keras.layers.Embedding(args.vocabulary, 16),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(2),
    ])
    model.compile(
        optimizer=keras_bnp.BNP(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    (x, y), validation, test = splits
    model.fit(x, y, batch_size=32, epochs=args.epochs, verbose=0)
    return [model.evaluate(*part, batch_size=1000, verbose=0)[1]
            for part in (validation, test)]


BASE = rules.RULES


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocabulary", type=int, default=2000)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--exponent", type=float, default=1.1)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rates", type=float, nargs="+",
                        default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    rng = np.random.default_rng(1234)
    polarity = rng.normal(size=args.vocabulary) * (
        rng.uniform(size=args.vocabulary) < 0.3)
    splits = [zipf_sentiment(rng, n, args.vocabulary, args.length, polarity,
                             args.exponent)
              for n in (args.train, 2000, 4000)]
    print(f"vocabulary {args.vocabulary}, Zipf exponent {args.exponent}, "
          f"length {args.length}, {args.train} training sequences, "
          f"{args.epochs} epochs, batch 32, seeds {args.seeds}")
    for with_rule in (False, True):
        results = {lr: np.array([accuracy(with_rule, lr, seed, splits, args)
                                 for seed in args.seeds])
                   for lr in args.learning_rates}
        best = max(results, key=lambda lr: results[lr][:, 0].mean())
        name = "embedding preconditioned" if with_rule else "inner SGD only"
        validation = {lr: round(float(r[:, 0].mean()), 4)
                      for lr, r in results.items()}
        print(f"{name}: mean validation accuracy by learning rate "
              f"{validation}"
              f"; at {best}: test {np.round(results[best][:, 1], 4).tolist()}"
              f", mean {results[best][:, 1].mean():.4f} +- "
              f"{results[best][:, 1].std():.4f}", flush=True)


if __name__ == "__main__":
    main()
