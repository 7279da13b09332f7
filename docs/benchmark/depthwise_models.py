"""Keras applications built on depthwise and separable convolutions under
BNP: the share of their trainable kernels that BNP preconditions with the
Dense and Conv rules alone and with all rules, and a few `fit` steps with
the initial scaling on.

    python docs/benchmark/depthwise_models.py [--steps 4]
"""

import argparse
import time

import keras
import numpy as np

import keras_bnp
from keras_bnp import registry
from keras_bnp import rules

MODELS = {
    "MobileNetV2": (keras.applications.MobileNetV2, 32),
    "MobileNetV3Small": (keras.applications.MobileNetV3Small, 32),
    "EfficientNetB0": (keras.applications.EfficientNetB0, 32),
    "Xception": (keras.applications.Xception, 71),
}
DENSE_AND_CONV = (rules.DenseRule, rules.ConvRule)


def kernel_shares(model, kinds=None):
    """`(share of kernel parameters, share of kernel variables)` that the
    blocks of the rules in `kinds` (all rules: `None`) precondition, among
    the model's trainable variables named `*kernel`."""
    kernels = [v for v in model.trainable_variables
               if v.name.endswith("kernel")]
    covered = {id(block.kernel) for layer in registry.supported_layers(model)
               if kinds is None or isinstance(rules.rule_for(layer), kinds)
               for block in rules.blocks(layer)}
    sizes = [int(np.prod(v.shape)) for v in kernels]
    hit = [size for v, size in zip(kernels, sizes) if id(v) in covered]
    return sum(hit) / sum(sizes), len(hit) / len(kernels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print("| model | input | kernel params, Dense+Conv rules | all rules | "
          "kernel variables, Dense+Conv rules | all rules | initial scales "
          "| loss, first and last step | fit seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (application, size) in MODELS.items():
        keras.utils.set_random_seed(0)
        base = application(input_shape=(size, size, 3), weights=None,
                           classes=3, classifier_activation=None)
        model = keras_bnp.BNPModel(base.inputs, base.outputs)
        before = kernel_shares(model, DENSE_AND_CONV)
        after = kernel_shares(model)
        rng = np.random.default_rng(0)
        count = args.steps * args.batch_size
        x = rng.uniform(0, 255, (count, size, size, 3)).astype("float32")
        y = rng.integers(0, 3, count)
        model.compile(keras_bnp.BNP(0.01), loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
        losses = []
        callback = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda _, logs, out=losses: out.append(
                logs["loss"]))
        start = time.perf_counter()
        model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0,
                  callbacks=[callback])
        seconds = time.perf_counter() - start
        scales = list(model.optimizer.initial_scales.values())
        print(f"| {name} | {size}x{size} | {before[0]:.1%} | {after[0]:.1%} "
              f"| {before[1]:.1%} | {after[1]:.1%} | {min(scales):.3g} to "
              f"{max(scales):.3g} ({len(scales)} layers) | {losses[0]:.3f}, "
              f"{losses[-1]:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
