"""The initial scaling (`BNP(initial_scaling=True)`, the default): which
layers it scales, what it measures, on which data, and when it must keep
the weights. Each case of a client model that the scaling used to break is
a test here, asserting the values it must give."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose

import keras_bnp
from benchmarks import zoo
from keras_bnp import initialization


def _planned(model):
    return [layer.name for layer in initialization.plan(model).layers]


def _pre_activations(model, layer, x):
    """`layer`'s output before its activation on `x`, computed in NumPy from
    its input (Dense only)."""
    inputs = keras.Model(model.inputs[0], layer.input)(x).numpy()
    return inputs.astype("float64") @ layer.kernel.numpy() + layer.bias.numpy()


def _unit_moments(values, weights=None):
    """Per unit (last axis) weighted mean and variance, in float64."""
    values = values.reshape(-1, values.shape[-1]).astype("float64")
    mean = np.average(values, axis=0, weights=weights)
    return mean, np.average((values - mean) ** 2, axis=0, weights=weights)


def _assert_unit(values, weights=None, target=1.0):
    """Mean variance over units `target`; each unit's mean within one of
    its standard deviations of 0."""
    mean, variance = _unit_moments(values, weights)
    assert_allclose(variance.mean(), target, rtol=1e-4)
    assert np.all(np.abs(mean) <= np.sqrt(variance) * (1 + 1e-4) + 1e-6)


def _classifier(head, seed=0):
    """Dense(32, relu) on 20 raw features, then `head(hidden)`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((20,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    return keras_bnp.BNPModel(inputs, head(hidden))


def _tabular(count=512, seed=0):
    return zoo.year_table(count, seed)


def _weights(model):
    return [w.numpy() for w in model.weights]


# --- what is measured: the pre-activation, per unit, centred ------------


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "tanh"])
def test_a_built_in_activation_is_measured_before_it(activation):
    # The same function written two ways gets the same weights: the
    # scaling measures the head's logits, not the activation's output.
    x = (1000.0 + 5.0 * np.random.default_rng(0).normal(size=(256, 20))
         ).astype("float32")
    built_in = _classifier(
        lambda h: keras.layers.Dense(10, activation=activation,
                                     name="head")(h))
    separate = _classifier(lambda h: keras.layers.Activation(activation)(
        keras.layers.Dense(10, name="head")(h)))
    scales = [keras_bnp.scale_to_unit_variance(model, x)
              for model in (built_in, separate)]
    assert scales[0] == scales[1]
    for mine, theirs in zip(_weights(built_in), _weights(separate)):
        assert_allclose(mine, theirs, atol=0, rtol=0)
    for name in ("hidden", "head"):
        layer = built_in.get_layer(name)
        _assert_unit(_pre_activations(built_in, layer, x))


def test_raw_columns_with_large_offsets_train():
    # A raw year column beside standardized ones: the units' means, not
    # their spread, dominated the pooled variance of the old scaling (loss
    # inf at learning rate 0.01). Each unit is now scaled by the spread and
    # a mean beyond it moved to its edge.
    x, y = _tabular()
    model = keras_bnp.BNPSequential([
        keras.Input((4,)), keras.layers.Dense(32, activation="relu")])
    layer = model.layers[0]
    mean, variance = _unit_moments(_pre_activations(model, layer, x[:256]))
    far = np.abs(mean) > np.sqrt(variance)
    assert np.abs(mean / np.sqrt(variance)).max() > 100  # the situation
    keras_bnp.scale_to_unit_variance(model, x[:256])
    values = _pre_activations(model, layer, x[:256])
    _assert_unit(values)
    mean, variance = _unit_moments(values)
    assert_allclose(np.abs(mean[far]), np.sqrt(variance[far]), rtol=1e-4)


@pytest.mark.parametrize("learning_rate", [0.01, 0.03])
def test_raw_columns_train_without_diverging(learning_rate):
    # With the scaling every epoch's loss is finite and falls. (Without
    # it, this network diverges at 0.03 and fits this linear target better
    # at 0.01 and below: docs/defaults.md.)
    x, y = _tabular()
    model = zoo.year_mlp(seed=0)
    model.compile(optimizer=keras_bnp.BNP(learning_rate), loss="mse")
    losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0,
                       shuffle=False).history["loss"]
    assert list(model.optimizer.initial_scales) == [
        "dense", "dense_1", "dense_2"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.1 * losses[0]
    assert np.all(np.diff(losses) < 0)


def test_sample_weights_weight_the_statistics():
    # 16 padding rows of value 100 with weight 0 do not move the scaling:
    # it equals the scaling of the weighted rows alone.
    rng = np.random.default_rng(1)
    real = rng.normal(size=(48, 20)).astype("float32")
    x = np.concatenate([real, np.full((16, 20), 100.0, "float32")])
    y = np.zeros((64, 1), "float32")
    weights = np.concatenate([np.ones(48), np.zeros(16)]).astype("float32")
    head = lambda h: keras.layers.Dense(1, name="head")(h)  # noqa: E731
    padded = _classifier(head)
    padded.compile(optimizer=keras_bnp.BNP(0.0), loss="mse")
    padded.fit(x, y, sample_weight=weights, batch_size=64, verbose=0)
    alone = _classifier(head)
    want = keras_bnp.scale_to_unit_variance(alone, real)
    assert padded.optimizer.initial_scales == pytest.approx(want, rel=1e-6)
    for mine, theirs in zip(_weights(padded), _weights(alone)):
        assert_allclose(mine, theirs, atol=1e-6, rtol=1e-5)


def test_class_weights_weight_the_statistics():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 20)).astype("float32")
    x[48:] += 50.0  # class 1 only, weighted 0
    y = (np.arange(64) >= 48).astype("int32")
    head = lambda h: keras.layers.Dense(2, name="head")(h)  # noqa: E731
    weighted = _classifier(head)
    weighted.compile(optimizer=keras_bnp.BNP(0.0),
                     loss=keras.losses.SparseCategoricalCrossentropy(True))
    weighted.fit(x, y, class_weight={0: 1.0, 1: 0.0}, batch_size=64,
                 verbose=0)
    want = keras_bnp.scale_to_unit_variance(_classifier(head), x[:48])
    assert weighted.optimizer.initial_scales == pytest.approx(want, rel=1e-6)


# --- where it stops: anything whose reaction to scale is unknown --------


@pytest.mark.slow
def test_keras_applications_heads_keep_their_weights():
    # Their softmax heads sit behind BatchNormalization: nothing scaled
    # (NASNetMobile's BatchNorm moving variances grew to 6.8e6 after
    # scaled layers; see docs/zoo.md).
    for build in (keras.applications.EfficientNetV2B0,
                  keras.applications.ResNet50V2,
                  keras.applications.MobileNetV3Small,
                  keras.applications.NASNetMobile):
        base = build(weights=None, classes=10, input_shape=(32, 32, 3))
        model = keras_bnp.BNPModel(base.inputs, base.outputs)
        assert _planned(model) == []


@pytest.mark.slow
def test_layers_behind_a_recurrent_layer_are_not_scaled():
    # Scaling a ConvLSTM2D's kernels does not scale its output; the Conv3D
    # head behind it was scaled x4885 to the output of the untrained
    # recurrent layer.
    inputs = keras.Input((3, 8, 8, 1))
    hidden = keras.layers.ConvLSTM2D(4, 3, padding="same",
                                     return_sequences=True)(inputs)
    outputs = keras.layers.Conv3D(1, 3, padding="same",
                                  activation="sigmoid")(hidden)
    model = keras_bnp.BNPModel(inputs, outputs)
    assert _planned(model) == []
    x = np.random.default_rng(0).uniform(size=(16, 3, 8, 8, 1)).astype(
        "float32")
    before = _weights(model)
    model.compile(optimizer=keras_bnp.BNP(0.0), loss="mse")
    model.fit(x, x, batch_size=16, verbose=0)
    for weight, want in zip(model.weights, before):
        assert_allclose(weight, want, atol=0, rtol=0)


def test_attention_built_from_plain_dense_layers_is_not_scaled():
    # Query and key projections are plain Dense layers whose outputs meet
    # in a matmul and a softmax (as in T5): scaling them would change the
    # softmax temperature. Neither they nor the head behind are scaled; the
    # first Dense, which feeds only ReLU and the projections, neither.
    inputs = keras.Input((5, 8))
    embedded = keras.layers.Dense(8, activation="relu", name="embed")(inputs)
    query = keras.layers.Dense(8, name="query")(embedded)
    key = keras.layers.Dense(8, name="key")(embedded)
    logits = keras.ops.matmul(query, keras.ops.transpose(key, (0, 2, 1)))
    mixed = keras.ops.matmul(keras.ops.softmax(logits), embedded)
    outputs = keras.layers.Dense(3, name="head")(
        keras.layers.Flatten()(mixed))
    assert _planned(keras_bnp.BNPModel(inputs, outputs)) == []
    # The same attention inside a layer of its own (as keras-hub builds it)
    # hides it: nothing before or behind that layer is scaled either.

    class Attention(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.query = keras.layers.Dense(8)
            self.key = keras.layers.Dense(8)

        def call(self, x):
            logits = keras.ops.matmul(
                self.query(x), keras.ops.transpose(self.key(x), (0, 2, 1)))
            return keras.ops.matmul(keras.ops.softmax(logits), x)

    inputs = keras.Input((5, 8))
    first = keras.layers.Dense(8, name="first")
    hidden = Attention()(keras.layers.ReLU()(first(inputs)))
    outputs = keras.layers.Dense(3, name="head")(
        keras.layers.Flatten()(hidden))
    assert _planned(keras_bnp.BNPModel(inputs, outputs)) == []


def test_residual_graph_scales_every_linear_layer_once():
    # Adds, ReLUs, pooling and a layer called twice are understood; the
    # shared layer is scaled at its first call.
    inputs = keras.Input((6, 6, 2))
    stem = keras.layers.Conv2D(4, 3, padding="same", name="stem")
    x = keras.layers.ReLU()(stem(inputs))
    y = keras.layers.Conv2D(4, 3, padding="same", name="branch")(x)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    shared = keras.layers.Dense(4, activation="relu", name="shared")
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="out")(shared(shared(pooled)))
    model = keras_bnp.BNPModel(inputs, outputs)
    x = (1000.0 + 5.0 * np.random.default_rng(0).normal(size=(64, 6, 6, 2))
         ).astype("float32")
    scales = keras_bnp.scale_to_unit_variance(model, x, target_variance=2.0)
    assert list(scales) == ["stem", "branch", "shared", "out"]
    for name in ("stem", "branch"):
        outputs = keras.Model(inputs, model.get_layer(name).output)(x)
        _assert_unit(outputs.numpy().astype("float64"), target=2.0)
    features = keras.Model(inputs, pooled)(x).numpy().astype("float64")
    _assert_unit(features @ shared.kernel.numpy() + shared.bias.numpy(),
                 target=2.0)


def test_a_subclassed_model_is_not_scaled_and_says_why(capsys):
    class Net(keras_bnp.BNPMixin, keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.out = keras.layers.Dense(2)

        def call(self, x):
            return self.out(self.hidden(x))

    model = Net()
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    model.compile(optimizer=keras_bnp.BNP(0.0), loss="mse")
    model.fit(x, x[:, :2], batch_size=32, verbose=2)
    assert model.optimizer.initial_scales == {}
    assert ("BNP: initial scaling skipped: Net is a subclassed model, whose "
            "graph between layers is not visible.") in capsys.readouterr().out
    with pytest.raises(ValueError, match=(
            "scale_to_unit_variance found no layer to scale in model")):
        keras_bnp.scale_to_unit_variance(model, x)


# --- trained or loaded weights are never changed ------------------------


@pytest.mark.slow
def test_fine_tuning_keeps_the_pretrained_predictions(capsys):
    x, y = _tabular(256)
    x = (x - x.mean(0)) / x.std(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    trained = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    trained.compile(optimizer="adam", loss="mse")
    trained.fit(x, y, batch_size=32, epochs=2, verbose=0)
    before = trained.predict(x, verbose=0)
    model = keras_bnp.BNPModel(trained.inputs, trained.outputs)
    model.compile(optimizer=keras_bnp.BNP(0.0), loss="mse")
    model.fit(x, y, batch_size=32, verbose=1)
    assert model.optimizer.initial_scales == {}
    assert_allclose(model.predict(x, verbose=0), before, atol=0, rtol=0)
    assert_allclose(trained.predict(x, verbose=0), before, atol=0, rtol=0)
    assert "is not at its initial value, so the weights were trained or " \
        "loaded." in capsys.readouterr().out


# --- the data: taken from the first step, never consumed ----------------


def _dense_net():
    keras.utils.set_random_seed(0)
    return keras_bnp.BNPSequential([
        keras.Input((20,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(10, name="head"),
    ])


def _batches(count, size):
    rng = np.random.default_rng(3)
    x = (50.0 + 3.0 * rng.normal(size=(count * size, 20))).astype("float32")
    y = rng.integers(0, 10, count * size).astype("int32")
    return x, y


def test_a_one_shot_generator_trains_every_batch():
    # The scaling measures the first step's own batch: all five batches
    # are trained on, and the first one is the one measured.
    x, y = _batches(5, 32)
    batches = iter([(x[i:i + 32], y[i:i + 32]) for i in range(0, 160, 32)])
    dataset = tf.data.Dataset.from_generator(
        lambda: batches, output_signature=(
            tf.TensorSpec((None, 20), tf.float32),
            tf.TensorSpec((None,), tf.int32)))
    model = _dense_net()
    model.compile(optimizer=keras_bnp.BNP(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(True))
    with pytest.warns(UserWarning, match="Your input ran out of data"):
        model.fit(dataset, shuffle=False, verbose=0)  # (Keras' warning)
    assert int(model.optimizer.iterations.numpy()) == 5
    assert len(model.optimizer.initial_scales) == 2
    _assert_unit(_pre_activations(model, model.get_layer("head"), x[:32]))


@pytest.mark.parametrize("kind", ["dataset", "pydataset"])
def test_batched_data_is_measured_on_the_first_training_batch(kind):
    x, y = _batches(4, 64)
    if kind == "dataset":
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    else:
        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 4

            def __getitem__(self, index):
                return x[64 * index:64 * (index + 1)], y[
                    64 * index:64 * (index + 1)]

        data = Batches()
    model = _dense_net()
    model.compile(optimizer=keras_bnp.BNP(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(data, shuffle=False, verbose=0)
    _assert_unit(_pre_activations(model, model.get_layer("head"), x[:64]))


def test_too_small_a_first_batch_is_not_measured(capsys):
    x, y = _batches(8, 1)
    model = _dense_net()
    before = _weights(model)
    model.compile(optimizer=keras_bnp.BNP(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(1),
              shuffle=False, verbose=2)
    assert model.optimizer.initial_scales == {}
    for weight, want in zip(model.weights, before):
        assert_allclose(weight, want, atol=0, rtol=0)
    assert ("BNP: initial scaling skipped: the first batch has 1 examples "
            "with a weight above 0, fewer than the 16 it needs; call "
            "keras_bnp.scale_to_unit_variance(model, x) on more examples "
            "before fit.") in capsys.readouterr().out


def test_arrays_are_measured_on_their_first_256_examples(capsys):
    x, y = _batches(10, 32)
    model = _dense_net()
    model.compile(optimizer=keras_bnp.BNP(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, batch_size=1, epochs=1, steps_per_epoch=3, verbose=2)
    _assert_unit(_pre_activations(model, model.get_layer("head"), x[:256]))
    line = capsys.readouterr().out
    assert "BNP: scaled 2 layers so that their pre-activations have " \
        "variance 1 on 256 training examples (kernel factors" in line
    assert "pass BNP(initial_scaling=False) to keep the weights as they " \
        "are." in line


@pytest.mark.parametrize("bad", [np.nan, np.inf, 3e19])
def test_non_finite_first_examples_are_not_measured(bad, capsys):
    # 3e19 is finite, but its square overflows float32: one such value
    # would shrink a layer's scale by 1e-19.
    x, y = _batches(2, 32)
    x[5, 3] = bad
    model = _dense_net()
    model.compile(optimizer=keras_bnp.BNP(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(True))
    with pytest.warns(UserWarning,
                      match=r"BNP '\w+' skipped \d+ statistics update"):
        model.fit(x, y, batch_size=64, verbose=2)
    assert model.optimizer.initial_scales == {}
    assert ("BNP: initial scaling skipped: the measured examples contain "
            "NaN or Inf, or values whose squares overflow float32."
            ) in capsys.readouterr().out
