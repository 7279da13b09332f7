"""What BNP preconditions in the models this project checks: the table of
`keras_bnp.coverage.report` for keras.applications models (without
weights), keras-hub backbones in small configurations and keras-io models.
Building them on a CPU takes a while; `--models` picks some, `--brief`
leaves out the variables:

    python -m benchmarks.coverage
    python -m benchmarks.coverage --models vgg16 bilstm --brief
"""

import argparse
import importlib.util

from benchmarks import _cli


def _applications(name, size=32):
    def build():
        import keras

        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=10)
    return build


def _keras_hub(name, **config):
    def build():
        import keras_hub

        return getattr(keras_hub.models, name)(**config)
    return build


def bilstm_classifier(vocabulary=20000, units=64):
    """keras-io's "Bidirectional LSTM on IMDB": an embedding, two
    bidirectional LSTMs and a Dense output."""
    import keras

    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, 128)(inputs)
    x = keras.layers.Bidirectional(
        keras.layers.LSTM(units, return_sequences=True))(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(units))(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="bilstm")


def vae(latent=2, filters=(32, 64)):
    """keras-io's "Variational AutoEncoder" on MNIST: a convolutional
    encoder to `(z_mean, z_log_var)`, a sample, and a Conv2DTranspose
    decoder, as one functional model of the two (its layers `encoder` and
    `decoder`). `filters`: the convolutions' (keras-io's by default)."""
    small, large = filters
    import keras

    class Sampling(keras.layers.Layer):
        """`z = z_mean + exp(z_log_var / 2) * epsilon`."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed = keras.random.SeedGenerator(0)

        def call(self, inputs):
            z_mean, z_log_var = inputs
            epsilon = keras.random.normal(keras.ops.shape(z_mean),
                                          seed=self.seed)
            return z_mean + keras.ops.exp(0.5 * z_log_var) * epsilon

    images = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(small, 3, 2, "same", activation="relu")(images)
    x = keras.layers.Conv2D(large, 3, 2, "same", activation="relu")(x)
    x = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(x))
    z_mean = keras.layers.Dense(latent, name="z_mean")(x)
    z_log_var = keras.layers.Dense(latent, name="z_log_var")(x)
    z = Sampling()([z_mean, z_log_var])
    encoder = keras.Model(images, [z_mean, z_log_var, z], name="encoder")
    codes = keras.Input((latent,))
    x = keras.layers.Dense(7 * 7 * large, activation="relu")(codes)
    x = keras.layers.Reshape((7, 7, large))(x)
    x = keras.layers.Conv2DTranspose(large, 3, 2, "same",
                                     activation="relu")(x)
    x = keras.layers.Conv2DTranspose(small, 3, 2, "same",
                                     activation="relu")(x)
    decoded = keras.layers.Conv2DTranspose(1, 3, padding="same",
                                           activation="sigmoid")(x)
    decoder = keras.Model(codes, decoded, name="decoder")
    return keras.Model(images, decoder(encoder(images)[2]), name="vae")


# name: (what it is, builder). The keras.applications models without
# weights, at 32x32 (Xception: its smallest, 71x71) with 10 classes; the
# keras-hub backbones in small configurations.
MODELS = {
    "vgg16": ("keras.applications.VGG16", _applications("VGG16")),
    "resnet50": ("keras.applications.ResNet50", _applications("ResNet50")),
    "densenet121": ("keras.applications.DenseNet121",
                    _applications("DenseNet121")),
    "convnext_tiny": ("keras.applications.ConvNeXtTiny",
                      _applications("ConvNeXtTiny")),
    "mobilenet_v2": ("keras.applications.MobileNetV2",
                     _applications("MobileNetV2")),
    "mobilenet_v3_small": ("keras.applications.MobileNetV3Small",
                           _applications("MobileNetV3Small")),
    "efficientnet_b0": ("keras.applications.EfficientNetB0",
                        _applications("EfficientNetB0")),
    "xception": ("keras.applications.Xception",
                 _applications("Xception", size=71)),
    "bert": ("keras_hub BertBackbone, 2 layers, width 128 (BERT-tiny)",
             _keras_hub("BertBackbone", vocabulary_size=30522, num_layers=2,
                        num_heads=2, hidden_dim=128, intermediate_dim=512)),
    "gpt2": ("keras_hub GPT2Backbone, 2 layers, width 128",
             _keras_hub("GPT2Backbone", vocabulary_size=50257, num_layers=2,
                        num_heads=2, hidden_dim=128, intermediate_dim=512,
                        max_sequence_length=1024)),
    "vit": ("keras_hub ViTBackbone, 32x32 images, patches 4, 2 layers, "
            "width 128",
            _keras_hub("ViTBackbone", image_shape=(32, 32, 3), patch_size=4,
                       num_layers=2, num_heads=2, hidden_dim=128,
                       mlp_dim=512)),
    "bilstm": ("keras-io's bidirectional LSTM text classifier",
               bilstm_classifier),
    "vae": ("keras-io's variational autoencoder", vae),
}
_KERAS_HUB = ("bert", "gpt2", "vit")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.coverage", description=__doc__,
        formatter_class=_cli.HelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=list(MODELS), metavar="MODEL",
                        help=f"models to build, of: {' '.join(MODELS)}")
    parser.add_argument("--brief", action="store_true",
                        help="leave out the table of variables")
    args = parser.parse_args(argv)
    from keras_bnp.coverage import coverage

    summary = []
    for name in args.models:
        title, build = MODELS[name]
        if name in _KERAS_HUB and importlib.util.find_spec(
                "keras_hub") is None:
            print(f"== {name}: skipped, keras_hub is not installed "
                  "(`pip install keras-hub`)\n")
            continue
        result = coverage(build())
        print(f"== {name}: {title}\n{result.table(not args.brief)}\n",
              flush=True)
        summary.append((name, result))
    print(f"{'model':<20}{'trainable':>13}{'preconditioned':>16}"
          f"{'kernel params':>15}{'kernels':>10}  largest left out")
    for name, result in summary:
        kernels = result.kernels
        left_out = result.uncovered_kernels()
        print(f"{name:<20}{result.parameters.total:>13,}"
              f"{_percent(result.parameters):>16}"
              f"{_percent(result.kernel_parameters):>15}"
              f"{f'{kernels.covered}/{kernels.total}':>10}  "
              f"{left_out[0][0] if left_out else '-'}")


def _percent(share):
    return "-" if share.fraction is None else f"{share.fraction:.1%}"


if __name__ == "__main__":
    main()
