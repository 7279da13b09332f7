"""A zoo of client models, written as their users write them, to test
BNP's defaults where users train.

    python -m benchmarks.benchmark --zoo --out-dir zoo_out
    python -m benchmarks.benchmark --zoo --models tabular siamese --epochs 3

Each model (`MODELS`) is built as its source builds it (keras.applications
with its own softmax head, keras-io patterns), wrapped as
`BNPModel(model.inputs, model.outputs)`, and trained with `fit` on a task it
can learn: the bundled MNIST digits, resized and coloured for the image
models, or synthetic but learnable sequences, frames and tables. Every
method (`METHODS`: BNP at its defaults, its inner SGD with momentum 0.9
alone, Adam; and BNP with `initial_scaling=False`, run where the scaling
acts) has its learning rate tuned on seed 0 by the final validation loss
(up to two rates past the grid while the best is at its edge), then runs
the other seeds at that rate. `results.json` holds every
run (resumed: runs already there are skipped), `report.md` the tables and
`zoo.png` validation loss against training time.
"""

import argparse
import json
import math
import os
import time

import numpy as np

from benchmarks import _cli

METHODS = ("bnp", "sgd", "adam", "bnp_unscaled")
RATES = {"bnp": (0.003, 0.01, 0.03, 0.1), "sgd": (0.003, 0.01, 0.03, 0.1),
         "adam": (0.0003, 0.001, 0.003),
         "bnp_unscaled": (0.003, 0.01, 0.03, 0.1)}
DEFAULTS = {"seeds": [0, 1], "train_size": 2000, "epochs": 6}
# Models whose loss is a sum over pixels (the VAE) or carries a gradient
# penalty (the WGAN-GP), and the ViT, whose best rates for SGD and BNP were
# below the first grid: the SGD-based methods' grids are scaled down.
RATE_SCALE = {"vae": 0.01, "wgan_gp": 0.01, "vit_image": 0.1}
# Adam as the model's source configures it (keras-io's WGAN-GP).
ADAM = {"wgan_gp": {"beta_1": 0.5, "beta_2": 0.9}}
# How many rates past the grid's edge the tuning may go.
EDGE_STEPS = 2


def _digits(train_size, seed, size=28, colour=False):
    """Bundled MNIST: `train_size` training, 500 validation (the end of the
    training split) and 1000 test digits, float32; resized to `size` and
    tinted with a random colour per image for the RGB models (pixel values
    in [0, 255], as keras.applications expect)."""
    import tensorflow as tf

    from keras_bnp import data

    (x, y), (x_test, y_test) = data.load_mnist()
    order = np.random.default_rng(seed).permutation(len(x) - 500)[:train_size]
    splits = [(x[order], y[order]), (x[-500:], y[-500:]),
              (x_test[:1000], y_test[:1000])]
    rng = np.random.default_rng(seed + 100)
    out = []
    for images, labels in splits:
        images = images[..., None]
        if size != 28:
            images = tf.image.resize(images, (size, size)).numpy()
        if colour:
            tint = rng.uniform(0.3, 1.0, (len(images), 1, 1, 3))
            images = 255.0 * images * tint
        out.append((images.astype("float32"), labels.astype("int32")))
    return out


def _application(constructor):
    """A builder of `keras.applications.<constructor>(weights=None,
    classes=10, input_shape=(32, 32, 3))`, its own softmax head and
    preprocessing, on the coloured 32x32 digits."""

    def build(train_size, seed):
        import keras

        model = getattr(keras.applications, constructor)(
            weights=None, classes=10, input_shape=(32, 32, 3))
        return model, "sparse_categorical_crossentropy", _digits(
            train_size, seed, 32, colour=True)

    return build


def _siamese(train_size, seed):
    """keras-io's Siamese network with a contrastive loss: label 0 for a
    pair of the same digit, 1 for different digits."""
    import keras
    from keras import ops

    def tower_input():
        return keras.Input((28, 28, 1))

    inputs = tower_input()
    x = keras.layers.BatchNormalization()(inputs)
    x = keras.layers.Conv2D(4, (5, 5), activation="tanh")(x)
    x = keras.layers.AveragePooling2D(pool_size=(2, 2))(x)
    x = keras.layers.Conv2D(16, (5, 5), activation="tanh")(x)
    x = keras.layers.AveragePooling2D(pool_size=(2, 2))(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dense(10, activation="tanh")(x)
    tower = keras.Model(inputs, x)
    left, right = tower_input(), tower_input()
    distance = keras.layers.Lambda(lambda pair: ops.sqrt(ops.maximum(
        ops.sum(ops.square(pair[0] - pair[1]), axis=1, keepdims=True),
        keras.backend.epsilon())))([tower(left), tower(right)])
    x = keras.layers.BatchNormalization()(distance)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)

    def contrastive(y_true, y_pred, margin=1.0):
        y_true = ops.cast(y_true, y_pred.dtype)
        return ops.mean((1 - y_true) * ops.square(y_pred) + y_true
                        * ops.square(ops.maximum(margin - y_pred, 0)))

    rng = np.random.default_rng(seed)
    splits = []
    for images, labels in _digits(train_size, seed):
        first = rng.permutation(len(images))
        by_digit = [np.flatnonzero(labels == d) for d in range(10)]
        same = np.array([rng.choice(by_digit[labels[i]]) for i in first])
        other = rng.permutation(len(images))
        pick = rng.uniform(size=len(images)) < 0.5
        second = np.where(pick, same, other)
        target = (labels[first] != labels[second]).astype("float32")
        splits.append(((images[first], images[second]), target[:, None]))
    return keras.Model([left, right], outputs), contrastive, splits


def _sequences(train_size, seed, length=128):
    """Two classes of noisy waves, told apart by their frequency."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (train_size, 500, 1000):
        labels = rng.integers(0, 2, count)
        frequency = np.where(labels == 1, 3.0, 4.0) + rng.normal(
            0, 0.3, count)
        t = np.linspace(0, 1, length)
        waves = np.sin(2 * np.pi * frequency[:, None] * t + rng.uniform(
            0, 2 * np.pi, (count, 1)))
        waves += rng.normal(0, 1.0, waves.shape)
        out.append((waves[..., None].astype("float32"),
                    labels.astype("int32")))
    return out


def _conv1d_timeseries(train_size, seed):
    """keras-io's "Timeseries classification from scratch" network."""
    import keras

    inputs = keras.Input((128, 1))
    x = inputs
    for _ in range(3):
        x = keras.layers.Conv1D(64, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return (keras.Model(inputs, outputs), "sparse_categorical_crossentropy",
            _sequences(train_size, seed))


def _frames(train_size, seed, steps=6, size=16):
    """Squares moving in straight lines; the target is the next frame."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (train_size // 4, 125, 250):
        movies = np.zeros((count, steps + 1, size, size, 1), "float32")
        for i in range(count):
            r, c = rng.integers(0, size - 4, 2)
            dr, dc = rng.integers(-1, 2, 2)
            for t in range(steps + 1):
                rr = int(np.clip(r + dr * t, 0, size - 4))
                cc = int(np.clip(c + dc * t, 0, size - 4))
                movies[i, t, rr:rr + 4, cc:cc + 4] = 1.0
        out.append((movies[:, :-1], movies[:, 1:]))
    return out


def _convlstm_next_frame(train_size, seed):
    """keras-io's next-frame prediction with ConvLSTM2D, one layer."""
    import keras

    inputs = keras.Input((None, 16, 16, 1))
    x = keras.layers.ConvLSTM2D(16, 3, padding="same",
                                return_sequences=True)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Conv3D(1, 3, padding="same",
                                  activation="sigmoid")(x)
    return (keras.Model(inputs, outputs), "binary_crossentropy",
            _frames(train_size, seed))


def year_table(count, seed):
    """A year (2000-2024) beside three standardized columns, and a linear
    target of all four: the raw-column case of `docs/defaults.md`."""
    rng = np.random.default_rng(seed)
    year = rng.integers(2000, 2025, count).astype("float32")
    other = rng.normal(size=(count, 3)).astype("float32")
    x = np.concatenate([year[:, None], other], axis=1)
    y = (0.1 * (year - 2012) + other @ [1.0, -0.5, 0.25]).astype("float32")
    return x, y[:, None]


def year_mlp(seed=0):
    """The MLP 4-32-32-1 that `docs/defaults.md` trains on `year_table`."""
    import keras

    import keras_bnp

    keras.utils.set_random_seed(seed)
    return keras_bnp.BNPSequential([
        keras.Input((4,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(1),
    ])


def _table(count, rng):
    """Raw columns: a year, a price spanning four decades, three
    standardized ones; a smooth non-linear target."""
    year = rng.integers(2000, 2025, count).astype("float64")
    price = np.exp(rng.uniform(np.log(1e3), np.log(1e7), count))
    other = rng.normal(size=(count, 3))
    target = (np.sin((year - 2000) / 4) + 0.5 * np.log10(price) - 2.5
              + other[:, 0] * other[:, 1] + np.tanh(other[:, 2]))
    x = np.column_stack([year, price, other]).astype("float32")
    return x, target[:, None].astype("float32")


def _tabular(train_size, seed):
    """An MLP on raw, unstandardized columns."""
    import keras

    rng = np.random.default_rng(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(64, activation="relu")(inputs)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(1)(x)
    return keras.Model(inputs, outputs), "mse", [
        _table(count, rng) for count in (train_size, 500, 1000)]


def _tokens(train_size, seed, length=32, vocabulary=200):
    """Token sequences labelled by their majority: 1 when more than half
    of the tokens come from the lower half of the vocabulary (a sentiment
    task of positive and negative words, learnable by pooling)."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (train_size, 500, 1000):
        tokens = rng.integers(1, vocabulary, (count, length))
        lower = (tokens < vocabulary // 2).sum(axis=1)
        labels = np.where(lower == length // 2, tokens[:, 0] < vocabulary // 2,
                          lower > length // 2)
        out.append((tokens.astype("int32"), labels.astype("int32")))
    return out


def _transformer_text(train_size, seed):
    """keras-io's "Text classification with Transformer": token and
    position embeddings, one Transformer block, pooling, a Dense head."""
    import keras

    length, vocabulary, width = 32, 200, 32
    inputs = keras.Input((length,))
    positions = keras.ops.arange(length)
    x = keras.layers.Embedding(vocabulary, width)(inputs) + \
        keras.layers.Embedding(length, width)(positions)
    attention = keras.layers.MultiHeadAttention(2, width)(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(
        x + keras.layers.Dropout(0.1)(attention))
    ffn = keras.layers.Dense(width)(
        keras.layers.Dense(64, activation="relu")(x))
    x = keras.layers.LayerNormalization(epsilon=1e-6)(
        x + keras.layers.Dropout(0.1)(ffn))
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(20, activation="relu")(
        keras.layers.Dropout(0.1)(x))
    outputs = keras.layers.Dense(2, activation="softmax")(
        keras.layers.Dropout(0.1)(x))
    return (keras.Model(inputs, outputs), "sparse_categorical_crossentropy",
            _tokens(train_size, seed))


def _distilbert_text(train_size, seed):
    """keras-hub's `DistilBertTextClassifier` built from a config (no
    preset: two layers of width 64), on `_tokens`' task; logits."""
    import keras
    import keras_hub

    backbone = keras_hub.models.DistilBertBackbone(
        vocabulary_size=200, num_layers=2, num_heads=2, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=32)
    task = keras_hub.models.DistilBertTextClassifier(
        backbone, num_classes=2, preprocessor=None)
    return task, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), [
        ({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)},
         labels) for tokens, labels in _tokens(train_size, seed)]


def _bart_reverse(train_size, seed, length=10, vocabulary=40):
    """keras-hub's `BartSeq2SeqLM` built from a config (one encoder and one
    decoder layer of width 64), taught with teacher forcing to write its
    input backwards; token-level cross-entropy of the logits."""
    import keras
    import keras_hub

    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=vocabulary, num_layers=1, num_heads=2, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=length + 1)
    task = keras_hub.models.BartSeq2SeqLM(backbone, preprocessor=None)
    rng = np.random.default_rng(seed)
    splits = []
    for count in (train_size, 500, 1000):
        source = rng.integers(3, vocabulary, (count, length))
        target = source[:, ::-1]
        start = np.full((count, 1), 2)  # BART's decoder start token
        mask = np.ones((count, length + 1), bool)
        splits.append(({
            "encoder_token_ids": np.concatenate([source, start], 1),
            "encoder_padding_mask": mask,
            "decoder_token_ids": np.concatenate([start, target], 1),
            "decoder_padding_mask": mask,
        }, np.concatenate([target, start], 1).astype("int32")))
    return task, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), splits


def _vit_image(train_size, seed):
    """keras-hub's `ViTImageClassifier` built from a config (patches of
    4x4, two layers of width 64) on the coloured digits scaled to [0, 1]
    as its image converter would; logits."""
    import keras
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=4, num_layers=2, num_heads=2,
        hidden_dim=64, mlp_dim=128)
    task = keras_hub.models.ViTImageClassifier(
        backbone, num_classes=10, preprocessor=None)
    return task, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), [(x / 255.0, y) for x, y in _digits(
            train_size, seed, 32, colour=True)]


def _images(train_size, seed, low=0.0):
    """Bundled MNIST digits without labels, pixel values from `low` to 1
    (the generative models' data)."""
    return [(low + (1 - low) * x, None) for x, _ in _digits(train_size, seed)]


class _Scored:
    """Validation and test of a model with its own `train_step`: `test_step`
    reports `score(batch)`, averaged over the batches, as `loss`."""

    OPTIMIZERS = 1  # how many optimizers `compile` takes

    def _trackers(self):
        import keras

        self.train_tracker = keras.metrics.Mean(name="train")
        self.score_tracker = keras.metrics.Mean(name="score")

    @property
    def metrics(self):
        return [self.train_tracker, self.score_tracker]

    def test_step(self, data):
        import keras

        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        self.score_tracker.update_state(self.score(x))
        return {"loss": self.score_tracker.result()}

    def _logs(self, loss):
        """`train_step`'s logs: the mean of `loss` over the epoch."""
        self.train_tracker.update_state(loss)
        return {"loss": self.train_tracker.result()}


def _vae(train_size, seed):
    """keras-io's "Variational AutoEncoder": a convolutional encoder to a
    2-D latent space, a transposed-convolution decoder, its own
    `train_step` with the summed binary cross-entropy and the KL term."""
    import keras
    import tensorflow as tf
    from keras import layers
    from keras import ops

    import keras_bnp

    latent = 2
    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(32, 3, activation="relu", strides=2,
                      padding="same")(inputs)
    x = layers.Conv2D(64, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Dense(16, activation="relu")(layers.Flatten()(x))
    encoder = keras.Model(inputs, [layers.Dense(latent)(x),
                                   layers.Dense(latent)(x)])
    z = keras.Input((latent,))
    x = layers.Reshape((7, 7, 64))(layers.Dense(7 * 7 * 64,
                                                activation="relu")(z))
    x = layers.Conv2DTranspose(64, 3, activation="relu", strides=2,
                               padding="same")(x)
    x = layers.Conv2DTranspose(32, 3, activation="relu", strides=2,
                               padding="same")(x)
    decoder = keras.Model(z, layers.Conv2DTranspose(
        1, 3, activation="sigmoid", padding="same")(x))

    class VAE(_Scored, keras_bnp.BNPMixin, keras.Model):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = encoder, decoder
            self.seed = keras.random.SeedGenerator(seed)
            self._trackers()

        def score(self, x):
            """The negative ELBO per image (keras-io's total loss)."""
            z_mean, z_log_var = self.encoder(x)
            noise = keras.random.normal(ops.shape(z_mean), seed=self.seed)
            reconstruction = self.decoder(
                z_mean + ops.exp(0.5 * z_log_var) * noise)
            rebuilt = ops.mean(ops.sum(keras.losses.binary_crossentropy(
                x, reconstruction), axis=(1, 2)))
            kl = -0.5 * (1 + z_log_var - ops.square(z_mean)
                         - ops.exp(z_log_var))
            return rebuilt + ops.mean(ops.sum(kl, axis=1))

        def train_step(self, data):
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            with self.bnp_capture():
                with tf.GradientTape() as tape:
                    loss = self.score(x)
                grads = tape.gradient(loss, self.trainable_weights)
                self.optimizer.apply_gradients(
                    zip(grads, self.trainable_weights))
            return self._logs(loss)

    return VAE(), None, _images(train_size, seed)


def sliced_wasserstein(a, b, directions):
    """The mean over `directions` (columns) of the 1-Wasserstein distance
    between the projections of the equally many examples `a` and `b`
    (flattened): the mean absolute difference of the sorted projections."""
    from keras import ops

    def projected(x):
        return ops.sort(ops.reshape(x, (ops.shape(x)[0], -1)) @ directions,
                        axis=0)

    return ops.mean(ops.abs(projected(a) - projected(b)))


def _wgan_gp(train_size, seed, latent=64):
    """keras-io's "WGAN-GP": a convolutional critic (LeakyReLU, Dropout, no
    normalization) and an upsampling generator with BatchNorm, three critic
    steps per generator step, gradient penalty weight 10, digits scaled to
    [-1, 1]; widths a quarter of keras-io's. Scored by the sliced
    Wasserstein distance between generated and held-out digits (64 fixed
    random directions)."""
    import keras
    import tensorflow as tf
    from keras import layers
    from keras import ops

    import keras_bnp

    critic = keras.Sequential([keras.Input((28, 28, 1)),
                               layers.ZeroPadding2D(2)])
    for filters, dropout in ((16, 0), (32, 0.3), (64, 0.3), (128, 0)):
        critic.add(layers.Conv2D(filters, 5, strides=2, padding="same"))
        critic.add(layers.LeakyReLU(0.2))
        if dropout:
            critic.add(layers.Dropout(dropout))
    critic.add(layers.Flatten())
    critic.add(layers.Dropout(0.2))
    critic.add(layers.Dense(1))

    generator = keras.Sequential([
        keras.Input((latent,)), layers.Dense(4 * 4 * 64, use_bias=False),
        layers.BatchNormalization(), layers.LeakyReLU(0.2),
        layers.Reshape((4, 4, 64))])
    for filters in (32, 16, 1):
        generator.add(layers.UpSampling2D())
        generator.add(layers.Conv2D(filters, 3, padding="same",
                                    use_bias=False))
        generator.add(layers.BatchNormalization())
        generator.add(layers.LeakyReLU(0.2) if filters > 1
                      else layers.Activation("tanh"))
    generator.add(layers.Cropping2D(2))
    directions = np.random.default_rng(seed).normal(size=(784, 64))
    directions = (directions / np.linalg.norm(directions, axis=0)).astype(
        "float32")

    class WGANGP(_Scored, keras_bnp.BNPMixin, keras.Model):
        OPTIMIZERS = 2

        def __init__(self):
            super().__init__()
            self.critic, self.generator = critic, generator
            self.seed = keras.random.SeedGenerator(seed)
            self._trackers()
            self.built = True

        def compile(self, d_optimizer, g_optimizer):
            super().compile()
            self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

        def noise(self, n):
            return keras.random.normal((n, latent), seed=self.seed)

        def score(self, real):
            fake = self.generator(self.noise(ops.shape(real)[0]),
                                  training=False)
            return sliced_wasserstein(real, fake, directions)

        def train_step(self, data):
            real, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            n = ops.shape(real)[0]
            for _ in range(3):
                with self.bnp_capture():
                    fake = self.generator(self.noise(n), training=True)
                    alpha = keras.random.uniform((n, 1, 1, 1),
                                                 seed=self.seed)
                    mixed = real + alpha * (fake - real)
                    with tf.GradientTape() as tape:
                        with tf.GradientTape() as inner:
                            inner.watch(mixed)
                            mixed_score = self.critic(mixed, training=True)
                        slope = ops.sqrt(ops.sum(ops.square(inner.gradient(
                            mixed_score, mixed)), axis=(1, 2, 3)))
                        d_loss = (ops.mean(self.critic(fake, training=True))
                                  - ops.mean(self.critic(real, training=True))
                                  + 10.0 * ops.mean(ops.square(slope - 1)))
                    weights = self.critic.trainable_weights
                    self.d_optimizer.apply_gradients(
                        zip(tape.gradient(d_loss, weights), weights))
            with self.bnp_capture():
                with tf.GradientTape() as tape:
                    g_loss = -ops.mean(self.critic(self.generator(
                        self.noise(n), training=True), training=True))
                weights = self.generator.trainable_weights
                self.g_optimizer.apply_gradients(
                    zip(tape.gradient(g_loss, weights), weights))
            return self._logs(d_loss)

    return WGANGP(), None, _images(train_size, seed, low=-1.0)


# name: builder(train_size, seed) -> (model, loss, [train, val, test]).
MODELS = {
    "mobilenet_v3_small": _application("MobileNetV3Small"),
    "mobilenet_v3_large": _application("MobileNetV3Large"),
    "efficientnet_v2_b0": _application("EfficientNetV2B0"),
    "resnet50_v2": _application("ResNet50V2"),
    "convnext_tiny": _application("ConvNeXtTiny"),
    "nasnet_mobile": _application("NASNetMobile"),
    "siamese": _siamese,
    "conv1d_timeseries": _conv1d_timeseries,
    "convlstm_next_frame": _convlstm_next_frame,
    "tabular": _tabular,
    "transformer_text": _transformer_text,
    "distilbert_text": _distilbert_text,
    "bart_reverse": _bart_reverse,
    "vit_image": _vit_image,
    "vae": _vae,
    "wgan_gp": _wgan_gp,
}

# The models that need keras-hub (in the `benchmark` extra).
KERAS_HUB = ("distilbert_text", "bart_reverse", "vit_image")


def run(name, method, learning_rate, seed=0, train_size=2000, epochs=6,
        batch_size=32):
    """Trains zoo model `name` with `method` and returns its record: the
    arguments, `train_loss`, `val_loss` and `seconds` per epoch (training
    time, cumulative), `test_loss`, `diverged` (a non-finite loss), and
    `initial_scales` (BNP's)."""
    import keras

    import keras_bnp

    keras.utils.set_random_seed(seed)
    model, loss, (train, val, test) = MODELS[name](train_size, seed)
    make = {
        "bnp": lambda: keras_bnp.BNP(learning_rate, momentum=0.9),
        "bnp_unscaled": lambda: keras_bnp.BNP(
            learning_rate, momentum=0.9, initial_scaling=False),
        "sgd": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(
            learning_rate, **ADAM.get(name, {})),
    }[method]
    if loss is None:  # its own train_step, `compile` takes its optimizers
        optimizers = [make() for _ in range(model.OPTIMIZERS)]
        model.compile(*optimizers)
    else:
        model = keras_bnp.BNPModel(model.input, model.output)
        optimizers = [make()]
        model.compile(optimizer=optimizers[0], loss=loss)
    clock = _clock()
    history = model.fit(*train, validation_data=val, epochs=epochs,
                        batch_size=batch_size, verbose=0, callbacks=[clock])
    test_loss = float(model.evaluate(*test, batch_size=256, verbose=0))
    losses = history.history["loss"] + [test_loss]
    return {
        "model": name, "method": method, "learning_rate": learning_rate,
        "seed": seed, "train_size": train_size, "epochs": epochs,
        "batch_size": batch_size,
        "train_loss": history.history["loss"],
        "val_loss": history.history["val_loss"],
        "seconds": clock.seconds, "test_loss": test_loss,
        "diverged": not all(math.isfinite(v) for v in losses),
        "initial_scales": {layer: scale for o in optimizers for layer, scale
                           in getattr(o, "initial_scales", {}).items()},
    }


def _clock():
    """A callback holding the cumulative training seconds at each epoch
    end (validation excluded) in `seconds`."""
    import keras

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            done = self.seconds[-1] if self.seconds else 0.0
            self.seconds.append(done + self.last - self.start)

    return Clock()


def _key(record):
    return (record["model"], record["method"], record["learning_rate"],
            record["seed"], record["train_size"], record["epochs"])


def _score(record):
    """Final validation loss; a diverged run scores infinity."""
    value = record["val_loss"][-1]
    return math.inf if record["diverged"] or not math.isfinite(value) \
        else value


def _tuning_runs(results, name, method, tune_seed, config):
    """The runs of `name` with `method` on `tune_seed` in `config`."""
    return [r for r in results if (
        r["model"], r["method"], r["seed"], r["train_size"], r["epochs"]) == (
        name, method, tune_seed, config["train_size"], config["epochs"])]


def tuned_rate(results, name, method, tune_seed, config):
    """The learning rate with the lowest final validation loss on
    `tune_seed` in `config`'s runs (ties: the smaller rate)."""
    return min(_tuning_runs(results, name, method, tune_seed, config),
               key=lambda r: (_score(r), r["learning_rate"]))["learning_rate"]


def grid(name, method):
    """The learning rates tried first for `method` on model `name`."""
    scale = 1.0 if method == "adam" else RATE_SCALE.get(name, 1.0)
    return sorted(float(f"{rate * scale:.1g}") for rate in RATES[method])


def sweep(config, results, save, log=print):
    """Runs what `config` asks for that `results` lacks: every rate of
    `RATES` on the first seed, and up to `EDGE_STEPS` rates of the
    1-3-10 sequence beyond the grid while the best is at its edge; then
    the other seeds at the tuned rate."""
    from benchmarks.experiment import beyond_edge

    done = {_key(r) for r in results}
    size, epochs = config["train_size"], config["epochs"]
    first, *others = config["seeds"]

    def ensure(name, method, rate, seed):
        if (name, method, rate, seed, size, epochs) in done:
            return
        record = run(name, method, rate, seed, size, epochs)
        results.append(record)
        done.add(_key(record))
        save(results)
        log(f"{name} {method} lr={rate} seed={seed} "
            f"val={record['val_loss'][-1]:.4g} "
            f"test={record['test_loss']:.4g} "
            f"({record['seconds'][-1]:.1f}s)")

    for name in config["models"]:
        for method in config["methods"]:
            rates = grid(name, method)
            while rates:
                for rate in rates:
                    ensure(name, method, rate, first)
                rate = beyond_edge(grid(name, method), rates, tuned_rate(
                    results, name, method, first, config), EDGE_STEPS)
                rates = [] if rate is None else sorted(rates + [rate])
            for seed in others:
                ensure(name, method, tuned_rate(
                    results, name, method, first, config), seed)
    return results


def summary(config, results):
    """`{model: {method: {...}}}`: the tuned rate, and over the seeds run
    at it: the mean and standard deviation of the final test loss, the
    mean validation loss per epoch and the mean cumulative seconds."""
    first = config["seeds"][0]
    table = {}
    for name in config["models"]:
        table[name] = {}
        for method in config["methods"]:
            if not any((r["model"], r["method"]) == (name, method)
                       for r in results):
                continue  # not run for this model
            rate = tuned_rate(results, name, method, first, config)
            runs = [r for r in results if (
                r["model"], r["method"], r["learning_rate"]) == (
                name, method, rate) and r["seed"] in config["seeds"]
                and r["epochs"] == config["epochs"]
                and r["train_size"] == config["train_size"]]
            tried = [r["learning_rate"] for r in _tuning_runs(
                results, name, method, first, config)]
            test = np.array([r["test_loss"] for r in runs], "float64")
            table[name][method] = {
                "learning_rate": rate,
                "seeds": sorted(r["seed"] for r in runs),
                "test_mean": float(np.mean(test)),
                "test_std": float(np.std(test)),
                "val_curve": np.mean([r["val_loss"] for r in runs],
                                     0).tolist(),
                "train_curve": np.mean([r["train_loss"] for r in runs],
                                       0).tolist(),
                "seconds": np.mean([r["seconds"] for r in runs], 0).tolist(),
                "diverged": sum(r["diverged"] for r in runs),
                "scaled_layers": len(runs[0]["initial_scales"]),
                # The best rate tried is the smallest or the largest.
                "at_edge": rate in (min(tried), max(tried)),
            }
    return table


def report(config, results, command):
    """The zoo's report in Markdown."""
    table = summary(config, results)
    lines = [
        "# The zoo: BNP's defaults on client models", "",
        f"Command: `{command}`", "",
        f"{config['train_size']} training examples "
        f"({config['train_size'] // 4} movies for the next-frame model), "
        f"{config['epochs']} epochs, batch size 32; "
        f"learning rates tuned on seed {config['seeds'][0]} by the final "
        "validation loss, then seeds "
        f"{', '.join(map(str, config['seeds'][1:])) or '(none)'} at that "
        "rate. Test loss (lower is better): mean ± standard deviation over "
        "the seeds; 'edge': the tuned rate is the smallest or largest "
        "tried, so a rate beyond it might do better. 'vs SGD' is BNP's "
        "mean minus SGD's, in units of the larger of their two standard "
        "deviations (below 0: BNP's loss is lower).", "",
        "| model | BNP (rate) | SGD (rate) | Adam (rate) | BNP vs SGD | "
        "layers scaled | BNP, `initial_scaling=False` (rate) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(entry):
        text = (f"{entry['test_mean']:.4g} ± {entry['test_std']:.2g} "
                f"({entry['learning_rate']:g}{', edge' * entry['at_edge']})")
        return text + (f"; diverged {entry['diverged']}"
                       if entry["diverged"] else "")

    for name, methods in table.items():
        bnp, sgd = methods.get("bnp"), methods.get("sgd")
        versus = ""
        if bnp and sgd:
            spread = max(bnp["test_std"], sgd["test_std"], 1e-12)
            versus = f"{(bnp['test_mean'] - sgd['test_mean']) / spread:+.1f}"
            for label, entry in (("SGD", sgd), ("BNP", bnp)):
                if not math.isfinite(entry["test_mean"]):
                    versus = f"{label} diverged"
        lines.append("| " + " | ".join(
            [name] + [cell(methods[m]) if m in methods else ""
                      for m in ("bnp", "sgd", "adam")]
            + [versus, str(bnp["scaled_layers"]) if bnp else "",
               cell(methods["bnp_unscaled"])
               if "bnp_unscaled" in methods else "",
               str(len(bnp["seeds"])) if bnp else ""]) + " |")
    lines += ["", "Validation loss per epoch (mean over seeds), the "
              "training loss of the last epoch and the cumulative training "
              "seconds at the last epoch:", ""]
    for name, methods in table.items():
        lines.append(f"- **{name}**: " + "; ".join(
            f"{method} " + ", ".join(f"{v:.4g}" for v in entry["val_curve"])
            + f" (training {entry['train_curve'][-1]:.4g}, "
            f"{entry['seconds'][-1]:.0f} s)"
            for method, entry in methods.items()))
    return "\n".join(lines) + "\n"


def plot(config, results, path):
    """Validation loss against training seconds, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary(config, results)
    columns = min(4, len(table))
    rows = math.ceil(len(table) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows),
                             squeeze=False)
    for ax, (name, methods) in zip(axes.flat, table.items()):
        for method, entry in methods.items():
            ax.plot(entry["seconds"], entry["val_curve"], marker="o",
                    label=f"{method} ({entry['learning_rate']:g})")
        ax.set_title(name)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(table):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark --zoo",
        description=__doc__, formatter_class=_cli.HelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=list(MODELS), help="zoo models to train")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=list(METHODS[:3]), help="methods to compare")
    parser.add_argument("--seeds", nargs="+", type=int,
                        default=DEFAULTS["seeds"],
                        help="seeds; the first tunes the learning rate")
    parser.add_argument("--train-size", type=int,
                        default=DEFAULTS["train_size"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--out-dir", default="zoo_out")
    parser.add_argument("--report-only", action="store_true",
                        help="report the runs in --out-dir, running nothing")
    args = parser.parse_args(argv)
    _cli.require("matplotlib", "benchmark", "the zoo's plot")
    if set(args.models) & set(KERAS_HUB):
        _cli.require("keras_hub", "benchmark", "the zoo's keras-hub models")
    config = {"models": args.models, "methods": args.methods,
              "seeds": args.seeds, "train_size": args.train_size,
              "epochs": args.epochs}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "results.json")
    results = []
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)

    def save(records):
        with open(path, "w") as f:
            json.dump(records, f, indent=1)

    if not args.report_only:
        sweep(config, results, save)
    command = "python -m benchmarks.benchmark --zoo " + " ".join(
        argv if argv is not None else [])
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(report(config, results, command.strip()))
    plot(config, results, os.path.join(args.out_dir, "zoo.png"))
    print(f"Wrote {args.out_dir}/report.md and zoo.png")
