"""The zoo's VAE (its own `train_step`, so BNP's initial scaling does not
act) with BNP after scaling its encoder and decoder explicitly:
`keras_bnp.scale_to_unit_variance(vae.encoder, x)` on 256 training digits,
then the decoder on the encoder's `z_mean` for them. Prints the validation
loss (negative ELBO per image) after each of the zoo's 6 epochs, per seed
and learning rate.

    python -m benchmarks.research.vae_scaling [--seeds 0 1 2] \
        [--rates 1e-05 3e-05 0.0001 0.0003 0.001]
"""

import argparse


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rates", nargs="+", type=float,
                        default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3])
    args = parser.parse_args()

    import keras

    import keras_bnp
    from benchmarks import zoo

    for seed in args.seeds:
        for rate in args.rates:
            keras.utils.set_random_seed(seed)
            vae, _, (train, val, _) = zoo.MODELS["vae"](
                zoo.DEFAULTS["train_size"], seed)
            x = train[0][:256]
            keras_bnp.scale_to_unit_variance(vae.encoder, x)
            keras_bnp.scale_to_unit_variance(vae.decoder, vae.encoder(x)[0])
            vae.compile(keras_bnp.BNP(rate, momentum=0.9))
            history = vae.fit(train[0], validation_data=val, batch_size=32,
                              epochs=zoo.DEFAULTS["epochs"], verbose=0)
            print(f"seed {seed} lr {rate:g}: validation loss per epoch "
                  + ", ".join(f"{v:.1f}" for v in history.history[
                      "val_loss"]), flush=True)


if __name__ == "__main__":
    main()
