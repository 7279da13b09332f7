"""BNP on the keras-io convolutional VAE (encoder Conv2D, decoder Dense and
a Conv2DTranspose stack), on the bundled MNIST sample.

Prints the share of the VAE's kernels (variables and parameters) that BNP
preconditions without and with the transposed-convolution rule, then
trains it with BNP in ways that differ only in the decoder's transposed
convolutions: left to the inner optimizer ("none"), centred on the mean of
every tap ("all taps", `mean_scale=1`), on the mean over the output
positions (the rule, `mean / prod(strides)`), and (with `--variants`) the
rule for the layers without strides only or with strides only; "no layer"
preconditions no layer at all (the inner optimizer alone). The
learning rate of each is chosen by the validation loss (negative ELBO) at
seed 0; the test loss is then given for each seed.

    python -m benchmarks.research.transposed_vae
    python -m benchmarks.research.transposed_vae --inner adam \
        --learning-rates 1e-3 3e-3 1e-2
"""

import argparse
import dataclasses
import math
import pathlib
import sys

import keras
import numpy as np

import keras_bnp
from keras_bnp import coverage
from keras_bnp import data
from keras_bnp import rules

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "tests"))
from test_rule_transpose import VAE  # noqa: E402

WITHOUT = tuple(r for r in rules.RULES
                if not isinstance(r, rules.ConvTransposeRule))


class AllTapsRule(rules.ConvTransposeRule):
    """The Conv formula as it stands: centred on the mean of every tap."""

    def blocks(self, layer):
        return [dataclasses.replace(block, mean_scale=1.0)
                for block in super().blocks(layer)]


class StridesRule(rules.ConvTransposeRule):
    """The rule, for the layers with (`strided`) or without strides only."""

    def __init__(self, strided):
        self.strided = strided

    def blocks(self, layer):
        strided = math.prod(layer.strides) > 1
        return super().blocks(layer) if strided == self.strided else []


VARIANTS = {"no layer": (), "none": WITHOUT,
            "all taps": (*WITHOUT, AllTapsRule()), "rule": rules.RULES,
            "stride 1 only": (*WITHOUT, StridesRule(strided=False)),
            "strided only": (*WITHOUT, StridesRule(strided=True))}


def test_loss(variant, learning_rate, seed, splits, epochs, inner="sgd"):
    rules.RULES = VARIANTS[variant]
    keras.utils.set_random_seed(seed)
    model = VAE()
    model.compile(optimizer=keras_bnp.BNP(learning_rate) if inner == "sgd"
                  else keras_bnp.BNP(inner_optimizer=keras.optimizers.Adam(
                      learning_rate)))
    train, validation, test = splits
    model.fit(train, batch_size=32, epochs=epochs, verbose=0)
    losses = [float(model.loss_of(x)) for x in (validation, test)]
    return [loss if np.isfinite(loss) else np.inf for loss in losses]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning-rates", type=float, nargs="+",
                        default=[3e-5, 1e-4, 2e-4, 4e-4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["none", "all taps", "rule"])
    parser.add_argument("--inner", choices=["sgd", "adam"], default="sgd",
                        help="BNP's inner optimizer: its SGD (momentum "
                        "0.9) or Adam, as keras-io trains the VAE")
    args = parser.parse_args()

    for variant in ("none", "rule"):
        rules.RULES = VARIANTS[variant]
        model = VAE(filters=(32, 64))
        model(np.zeros((1, 28, 28, 1), "float32"))
        state = "on" if variant == "rule" else "off"
        print(f"keras-io VAE, transposed rule {state}: "
              f"{coverage.coverage(model).line()}")

    (x, _), (x_test, _) = data.load_mnist()
    x, x_test = x[..., None], x_test[..., None]
    splits = (x[:args.train], x[-1000:], x_test[:1000])
    print(f"VAE filters (8, 16), {args.train} training images, "
          f"{args.epochs} epochs, batch 32, inner {args.inner}; "
          "validation/test loss "
          "(negative ELBO, nats)")
    for variant in args.variants:
        losses = {lr: test_loss(variant, lr, args.seeds[0], splits,
                                args.epochs, args.inner)
                  for lr in args.learning_rates}
        validation = {lr: loss[0] for lr, loss in losses.items()}
        best = min(validation, key=validation.get)
        tests = [losses[best][1]] + [
            test_loss(variant, best, seed, splits, args.epochs, args.inner)[1]
            for seed in args.seeds[1:]]
        print(f"{variant:>9}: validation by learning rate "
              f"{ {lr: round(v, 2) for lr, v in validation.items()} }; "
              f"at {best}, test {[round(t, 2) for t in tests]}, mean "
              f"{np.mean(tests):.2f}", flush=True)


if __name__ == "__main__":
    main()
