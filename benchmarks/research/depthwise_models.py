"""Keras applications built on depthwise and separable convolutions: a
short `fit` on a few fixed examples of noise, with BNP (its initial scaling
on or off) or SGD. (`python -m benchmarks.coverage` gives the shares of
their kernels that BNP preconditions.)

    python -m benchmarks.research.depthwise_models [--optimizer bnp]
"""

import argparse
import time

import keras
import numpy as np

import keras_bnp

MODELS = {
    "MobileNetV2": (keras.applications.MobileNetV2, 32),
    "MobileNetV3Small": (keras.applications.MobileNetV3Small, 32),
    "EfficientNetB0": (keras.applications.EfficientNetB0, 32),
    "Xception": (keras.applications.Xception, 71),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="bnp",
                        choices=["bnp", "bnp-unscaled", "sgd"])
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    print("| model | input | initial scales | loss, first and last epoch | "
          "fit seconds |")
    print("|---|---|---|---|---|")
    for name, (application, size) in MODELS.items():
        keras.utils.set_random_seed(0)
        base = application(input_shape=(size, size, 3), weights=None,
                           classes=3, classifier_activation=None)
        model = keras_bnp.BNPModel(base.inputs, base.outputs)
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
        print(f"| {name} | {size}x{size} | {scaled} | {losses[0]:.3f}, "
              f"{losses[-1]:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
