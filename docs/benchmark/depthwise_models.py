"""Keras applications built on depthwise and separable convolutions under
BNP: the share of their trainable kernels that BNP preconditions with the
Dense and Conv rules alone and with all rules, and a short `fit` on a few
fixed examples of noise (with BNP, its initial scaling on or off, or SGD).

    python docs/benchmark/depthwise_models.py [--optimizer bnp]
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
    parser.add_argument("--optimizer", default="bnp",
                        choices=["bnp", "bnp-unscaled", "sgd"])
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    print("| model | input | kernel params, Dense+Conv rules | all rules | "
          "kernel variables, Dense+Conv rules | all rules | initial scales "
          "| loss, first and last epoch | fit seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (application, size) in MODELS.items():
        keras.utils.set_random_seed(0)
        base = application(input_shape=(size, size, 3), weights=None,
                           classes=3, classifier_activation=None)
        model = keras_bnp.BNPModel(base.inputs, base.outputs)
        before = kernel_shares(model, DENSE_AND_CONV)
        after = kernel_shares(model)
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (args.examples, size, size, 3)).astype(
            "float32")
        y = rng.integers(0, 3, args.examples)
        if args.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(args.learning_rate, momentum=0.9)
        else:
            optimizer = keras_bnp.BNP(
                args.learning_rate,
                initial_scaling=args.optimizer == "bnp")
        model.compile(optimizer, loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
        start = time.perf_counter()
        losses = model.fit(x, y, batch_size=args.batch_size,
                           epochs=args.epochs, verbose=0).history["loss"]
        seconds = time.perf_counter() - start
        scales = list(getattr(optimizer, "initial_scales", {}).values())
        scaled = (f"{min(scales):.3g} to {max(scales):.3g} ({len(scales)} "
                  "layers)" if scales else "none")
        print(f"| {name} | {size}x{size} | {before[0]:.1%} | {after[0]:.1%} "
              f"| {before[1]:.1%} | {after[1]:.1%} | {scaled} | "
              f"{losses[0]:.3f}, {losses[-1]:.3f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
