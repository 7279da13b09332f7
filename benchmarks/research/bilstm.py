"""BNP on keras-io's bidirectional LSTM text classifier (Embedding(20000,
128) -> Bidirectional(LSTM(64, return_sequences=True)) ->
Bidirectional(LSTM(64)) -> Dense(1), logits, sequences of 200 tokens), on
random tokens: the share of kernel parameters BNP preconditions with and
without the recurrent rule, a few `fit` steps, a `.keras` round trip of
the statistics, and the seconds per training step against SGD, with rounds
interleaving the methods.

    python -m benchmarks.research.bilstm --batch-size 32 --rounds 9

"sgd, whole sequence" is SGD with the last layers' time loops run with
`return_sequences` on, as BNP's recording runs them.
"""

import argparse
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import keras_bnp
from benchmarks import benchmark
from keras_bnp import rules

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--learning-rate", type=float, default=1e-3)
parser.add_argument("--steps", type=int, default=4,
                    help="training steps per timed call")
args = parser.parse_args()

VOCABULARY, LENGTH = 20000, 200
LOSS = keras.losses.BinaryCrossentropy(from_logits=True)


def build(model_class=keras_bnp.BNPModel):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, 128)(inputs)
    x = keras.layers.Bidirectional(
        keras.layers.LSTM(64, return_sequences=True))(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(64))(x)
    return model_class(inputs, keras.layers.Dense(1)(x))


def kernel_share(model):
    """Preconditioned kernel and bias parameters over all trainable ones
    but the Embedding's: `(with every rule, with Dense and Conv only)`."""
    layers = model._flatten_layers(include_self=False, recursive=True)
    variables = {id(v): v for layer in layers for block in rules.blocks(layer)
                 for v in block.variables}
    dense = {id(v): v for layer in layers
             if isinstance(rules.rule_for(layer),
                           (rules.DenseRule, rules.ConvRule))
             for block in rules.blocks(layer) for v in block.variables}
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables
                if "embedding" not in v.path)
    count = lambda vs: sum(int(np.prod(v.shape)) for v in vs.values())  # noqa: E731
    return count(variables), count(dense), total


def whole_sequence(layer):
    """Runs `layer`'s time loop with `return_sequences` on, as BNP's
    recording does."""
    inner_loop = layer.inner_loop

    def loop(sequences, initial_state, mask, training=False):
        keep, layer.return_sequences = layer.return_sequences, True
        try:
            return inner_loop(sequences=sequences, initial_state=initial_state,
                              mask=mask, training=training)
        finally:
            layer.return_sequences = keep

    layer.__dict__["inner_loop"] = loop


rng = np.random.default_rng(0)
x = rng.integers(1, VOCABULARY, (args.batch_size * 4, LENGTH)).astype("int32")
y = (x[:, :10].mean(axis=1) > VOCABULARY / 2).astype("float32")

# BNP's defaults scale the Dense head once before the first step (the
# recurrent layers are not scaled); the second run keeps the weights.
for options in ({}, {"initial_scaling": False}):
    model = build()
    model.compile(optimizer=keras_bnp.BNP(args.learning_rate, momentum=0.9,
                                          **options), loss=LOSS)
    recurrent = keras.Model(model.inputs, model.layers[2].output)
    spreads = [(np.std(recurrent(x[:64])), np.std(model(x[:64])))]
    losses = []
    for _ in range(3):
        history = model.fit(x, y, batch_size=args.batch_size, verbose=0)
        losses.append(history.history["loss"][0])
        spreads.append((np.std(recurrent(x[:64])), np.std(model(x[:64]))))
    print(f"BNP({args.learning_rate:g}, momentum=0.9, {options}): fit "
          f"{len(x) // args.batch_size} steps per epoch, loss per epoch "
          + ", ".join(f"{loss:.4f}" for loss in losses)
          + f"; initial scales {model.optimizer.initial_scales}; standard "
          "deviation of the last LSTM layer's outputs and of the logits "
          "before and after each epoch: "
          + ", ".join(f"({a:.3g}, {b:.3g})" for a, b in spreads))
sgd_model = build(keras.Model)
sgd_model.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9),
                  loss=LOSS)
history = sgd_model.fit(x, y, batch_size=args.batch_size, epochs=3, verbose=0)
print("SGD(0.01, momentum=0.9): loss per epoch "
      + ", ".join(f"{loss:.4f}" for loss in history.history["loss"]))
after, before, total = kernel_share(model)
print(f"kernel and bias parameters (Embedding aside): {total}")
print(f"preconditioned with Dense/Conv rules only: {before} "
      f"({before / total:.1%}); with the recurrent rule: {after} "
      f"({after / total:.1%})")
model.optimizer.summary()

path = os.path.join(tempfile.mkdtemp(), "bilstm.keras")
model.save(path)
restored = keras.models.load_model(path)
for layer, twin in zip(model._flatten_layers(recursive=True),
                       restored._flatten_layers(recursive=True)):
    for block in rules.blocks(layer):
        for a, b in zip(model.optimizer.layer_statistics(layer,
                                                         block.name or None),
                        restored.optimizer.layer_statistics(
                            twin, block.name or None)):
            np.testing.assert_array_equal(a, b)
print("load_model restored the statistics of "
      f"{len(restored.optimizer._slots)} blocks exactly")

methods = {"sgd": build(keras.Model), "sgd, whole sequence": build(keras.Model),
           "bnp": build()}
for layer in (methods["sgd, whole sequence"].layers[2].forward_layer,
              methods["sgd, whole sequence"].layers[2].backward_layer):
    whole_sequence(layer)
loops = {}
batch = (x[:args.batch_size], y[:args.batch_size])
for name, net in methods.items():
    optimizer = (keras_bnp.BNP(1e-2, momentum=0.9) if name == "bnp"
                 else keras.optimizers.SGD(1e-2, momentum=0.9))
    net.compile(optimizer=optimizer, loss=LOSS)
    net.fit(*batch, batch_size=args.batch_size, verbose=0)
    loops[name] = benchmark._step_loops(net, *batch, jit_compile=False)[0]
    loops[name](1)  # trace
samples = {name: [] for name in methods}
names = list(methods)
for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
        start = time.perf_counter()
        loops[name](args.steps)
        samples[name].append((time.perf_counter() - start) / args.steps)
sgd = np.median(samples["sgd"])
print(f"seconds per training step, batch {args.batch_size}, median of "
      f"{args.rounds} interleaved rounds of {args.steps} steps "
      f"(TensorFlow {tf.__version__}, {os.cpu_count()} CPUs):")
for name, values in samples.items():
    print(f"  {name:<20} {np.median(values):.3f} s  "
          f"{np.median(values) / sgd:.2f}x SGD")
