import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import assert_statistics_match
from helpers import logits_loss
from helpers import mlp
from helpers import shifted_inputs
from models import IN
from models import MODEL_KINDS
from models import OUT

import keras_bnp
from keras_bnp import _reference

X = shifted_inputs(np.random.default_rng(0), (24, IN))
Y = np.arange(24) % OUT


@pytest.mark.parametrize("steps_per_execution", [1, 3])
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_statistics_of_every_layer_match_numpy(
    kind, jit_compile, steps_per_execution
):
    # Learning rate 0 keeps the weights fixed, so every layer's inputs can be
    # recomputed in NumPy and folded into the reference statistics batch by
    # batch (3 batches of 8, in order).
    model, layer_inputs = MODEL_KINDS[kind]()
    beta = 0.9
    model.compile(
        optimizer=keras_bnp.BNP(0.0, momentum=0.0, statistics_momentum=beta),
        loss=logits_loss(),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    references = {}
    for start in range(0, 24, 8):
        for layer, inputs in layer_inputs(X[start : start + 8]).items():
            reference = references.setdefault(
                layer, _reference.RawMomentStatistics(inputs[0].shape[-1], beta)
            )
            reference.update(inputs, -1)
    assert len(references) == len(model.optimizer._slots)
    for layer, reference in references.items():
        assert_statistics_match(model.optimizer, layer, reference)
    # Capture is active only inside training steps.
    assert not any("call" in layer.__dict__ for layer in references)


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
def test_convolution_statistics_in_fit_match_numpy(jit_compile):
    # The convolution input sums (a squared norm, and a centring choice per
    # step) inside a compiled training step, also when XLA compiles it all.
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(4, 3, activation="relu")
    dense = keras.layers.Dense(OUT)
    model = keras_bnp.BNPSequential(
        [keras.Input((6, 6, 3)), conv, keras.layers.Flatten(), dense])
    beta = 0.9
    model.compile(
        optimizer=keras_bnp.BNP(0.0, momentum=0.0, statistics_momentum=beta),
        loss=logits_loss(), jit_compile=jit_compile)
    x = shifted_inputs(np.random.default_rng(1), (24, 6, 6, 3))
    model.fit(x, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    references = {
        conv: _reference.RawMomentStatistics(3, beta),
        dense: _reference.RawMomentStatistics(4 * 4 * 4, beta),
    }
    for start in range(0, 24, 8):
        batch = x[start : start + 8]
        references[conv].update([batch], -1)
        hidden = keras.ops.convert_to_numpy(conv(batch)).reshape(8, -1)
        references[dense].update([hidden], -1)
    for layer, reference in references.items():
        assert_statistics_match(model.optimizer, layer, reference)


def test_zero_momentum_full_batch_gives_batch_mean_and_population_variance():
    model = mlp(inputs=IN, outputs=OUT)
    model.compile(optimizer=keras_bnp.BNP(statistics_momentum=0.0),
                  loss=logits_loss())
    model.fit(X, Y, batch_size=len(X), epochs=1, verbose=0)
    mean, variance = model.optimizer.layer_statistics(model.layers[0])
    assert_allclose(mean, X.astype("float64").mean(0), atol=1e-6, rtol=1e-6)
    assert_allclose(variance, X.astype("float64").var(0), atol=1e-6,
                    rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_every_model_kind_trains(kind, jit_compile):
    model, _ = MODEL_KINDS[kind]()
    # The default epsilon (3, relative) takes about a quarter of SGD's step
    # on inputs of unit variance, hence a learning rate of 0.1 (at 0.2 the
    # shared-layer model's ReLUs die, with or without the scaling). The labels
    # are arbitrary: training must fit them well below a uniform guess's
    # loss, ln(OUT) (the initial scaling already brings the first epoch's
    # loss near it).
    model.compile(
        optimizer=keras_bnp.BNP(0.1, momentum=0.9),
        loss=logits_loss(),
        jit_compile=jit_compile,
    )
    history = model.fit(X, Y, batch_size=4, epochs=12, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * np.log(OUT)


def _history(model_class, optimizer, **fit_kwargs):
    keras.utils.set_random_seed(0)
    x = keras.Input((IN,))
    h = keras.layers.Dense(5, activation="relu")(x)
    outputs = {
        "a": keras.layers.Dense(OUT, name="a")(h),
        "b": keras.layers.Dense(1, name="b")(h),
    }
    model = model_class(x, outputs)
    model.compile(
        optimizer=optimizer,
        loss={"a": logits_loss(), "b": "mse"},
        metrics={"a": ["accuracy"]},
    )
    return model.fit(
        X, {"a": Y, "b": X[:, :1]}, batch_size=8, epochs=2, shuffle=False,
        verbose=0, validation_data=(X[:8], {"a": Y[:8], "b": X[:8, :1]}),
        **fit_kwargs,
    ).history


@pytest.mark.slow
@pytest.mark.parametrize(
    "fit_kwargs",
    [{}, {"sample_weight": np.linspace(0.1, 2.0, 24)}],
)
def test_history_equals_default_train_step(fit_kwargs):
    # With learning rate 0 both models keep their weights, so BNP's training
    # step must report exactly what Keras' default step reports.
    bnp = _history(
        keras_bnp.BNPModel,
        keras_bnp.BNP(0.0, momentum=0.0, initial_scaling=False), **fit_kwargs
    )
    plain = _history(keras.Model, keras.optimizers.SGD(0.0), **fit_kwargs)
    assert sorted(bnp) == sorted(plain)
    assert "val_a_accuracy" in bnp and "b_loss" in bnp
    for key in plain:
        assert_allclose(bnp[key], plain[key], atol=1e-6)


@pytest.mark.slow
def test_class_weight_is_applied():
    def loss_of(model_class, optimizer, class_weight):
        keras.utils.set_random_seed(0)
        model = mlp(model_class, inputs=IN, outputs=OUT)
        model.compile(optimizer=optimizer, loss=logits_loss())
        return model.fit(X, Y, batch_size=8, verbose=0,
                         class_weight=class_weight).history["loss"][0]

    weights = {0: 5.0, 1: 1.0, 2: 0.1}
    bnp = loss_of(keras_bnp.BNPSequential,
                  keras_bnp.BNP(0.0, momentum=0.0, initial_scaling=False),
                  weights)
    plain = loss_of(keras.Sequential, keras.optimizers.SGD(0.0), weights)
    unweighted = loss_of(keras.Sequential, keras.optimizers.SGD(0.0), None)
    assert bnp == pytest.approx(plain, abs=1e-6)
    assert abs(bnp - unweighted) > 1e-3


@pytest.mark.parametrize("weighting", ["sample_weight", "class_weight"])
def test_sample_and_class_weights_weigh_the_statistics(weighting):
    # Padding rows of value 100 with weight 0: every layer's statistics
    # are those of the weighted rows, as the loss is (a NaN there would
    # reach the weights through Keras' loss, 0 * NaN; the statistics leave
    # it out, see test_statistics). Learning rate 0 keeps the weights, so
    # NumPy recomputes the hidden layer's inputs.
    rng = np.random.default_rng(1)
    x = shifted_inputs(rng, (24, IN)) + 30.0
    y = np.arange(24) % OUT
    sample_weight = rng.uniform(0.5, 2.0, 24)
    pad = np.arange(24) % 4 == 0
    sample_weight[pad] = 0.0
    x[pad] = 100.0
    class_weight = None
    if weighting == "class_weight":
        class_weight = {0: 0.0, 1: 1.0, 2: 2.5}
        sample_weight = np.array([class_weight[c] for c in y])
        x[y == 0] = 100.0
    keras.utils.set_random_seed(0)
    model = mlp(inputs=IN, outputs=OUT)
    model.compile(optimizer=keras_bnp.BNP(0.0, momentum=0.0,
                                          initial_scaling=False),
                  loss=logits_loss())
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
              **({"class_weight": class_weight} if class_weight else
                 {"sample_weight": sample_weight}))
    kernel, bias = (v.numpy() for v in model.layers[0].weights)
    hidden = np.maximum(x @ kernel + bias, 0.0)
    for layer, inputs in zip(model.layers, (x, hidden)):
        reference = _reference.RawMomentStatistics(inputs.shape[1], 0.99)
        for start in range(0, 24, 8):
            rows = slice(start, start + 8)
            reference.update([inputs[rows]], -1, [sample_weight[rows]])
        assert_statistics_match(model.optimizer, layer, reference)


@pytest.mark.slow
def test_sparse_inputs_train_as_their_dense_version():
    # A Dense layer on sparse inputs computes what it computes on the dense
    # tensor, so BNP must take the same steps and keep the same statistics.
    rng = np.random.default_rng(0)
    x = np.where(rng.uniform(size=(24, IN)) < 0.3,
                 rng.normal(size=(24, IN)) + 2.0, 0.0).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, Y)).batch(8)
    models = []
    for sparse in (False, True):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((IN,), sparse=sparse)
        hidden = keras.layers.Dense(6, activation="relu")(inputs)
        model = keras_bnp.BNPModel(inputs, keras.layers.Dense(OUT)(hidden))
        model.compile(optimizer=keras_bnp.BNP(0.05), loss=logits_loss())
        model.fit(dataset.map(lambda a, b: (tf.sparse.from_dense(a), b))
                  if sparse else dataset, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    dense, sparse = models
    for a, b in zip(dense.weights, sparse.weights):
        assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    stats = _reference.RawMomentStatistics(IN, 0.99)
    for _ in range(2):
        for start in range(0, 24, 8):
            stats.update([x[start:start + 8]], -1)
    assert_statistics_match(sparse.optimizer, sparse.layers[1], stats)


def test_masked_time_steps_are_left_out_of_the_statistics():
    # Padded sequences behind a Masking layer: the per-step Dense layer's
    # statistics are those of the real time steps only (learning rate 0
    # keeps the inputs of every batch known).
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (24, 6, IN))
    for row, length in enumerate(rng.integers(1, 7, 24)):
        x[row, length:] = 0.0  # padding
    inputs = keras.Input((6, IN))
    steps = keras.layers.Dense(5, name="per_step")(
        keras.layers.Masking(0.0)(inputs))
    outputs = keras.layers.Dense(OUT)(
        keras.layers.GlobalAveragePooling1D()(steps))
    model = keras_bnp.BNPModel(inputs, outputs)
    model.compile(optimizer=keras_bnp.BNP(0.0, statistics_momentum=0.9),
                  loss=logits_loss())
    model.fit(x, Y, batch_size=8, shuffle=False, verbose=0)
    stats = _reference.RawMomentStatistics(IN, 0.9)
    for start in range(0, 24, 8):
        batch = x[start:start + 8]
        stats.update([batch[(batch != 0).any(-1)]], -1)
    assert_statistics_match(model.optimizer, model.get_layer("per_step"),
                            stats)


def test_callbacks_change_the_inner_learning_rate():
    model = mlp(inputs=IN, outputs=OUT)
    model.compile(optimizer=keras_bnp.BNP(0.1), loss=logits_loss())
    history = model.fit(
        X, Y, batch_size=8, epochs=3, verbose=0,
        callbacks=[keras.callbacks.ReduceLROnPlateau(
            monitor="loss", mode="max", factor=0.5, patience=0)],
    )
    # Epoch 0 sets the best loss; epochs 1 and 2 halve the rate (logged
    # before the cut).
    assert_allclose(history.history["learning_rate"], [0.1, 0.1, 0.05])
    assert float(model.optimizer.inner_optimizer.learning_rate) == (
        pytest.approx(0.025))
    history = model.fit(
        X, Y, batch_size=8, epochs=2, verbose=0,
        callbacks=[keras.callbacks.LearningRateScheduler(
            lambda epoch: 0.01 * (epoch + 1))],
    )
    assert_allclose(history.history["learning_rate"], [0.01, 0.02])


@pytest.mark.slow
def test_evaluate_and_predict_are_untouched():
    bnp_model = mlp(inputs=IN, outputs=OUT)
    bnp_model.compile(optimizer=keras_bnp.BNP(0.05), loss=logits_loss(),
                      metrics=["accuracy"])
    bnp_model.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    plain = mlp(keras.Sequential, inputs=IN, outputs=OUT)
    plain.set_weights(bnp_model.get_weights())
    plain.compile(optimizer="sgd", loss=logits_loss(), metrics=["accuracy"])
    before = [v.numpy() for v in bnp_model.optimizer.variables]
    assert_allclose(bnp_model.predict(X, verbose=0),
                    plain.predict(X, verbose=0))
    assert_allclose(bnp_model.evaluate(X, Y, verbose=0),
                    plain.evaluate(X, Y, verbose=0))
    for old, variable in zip(before, bnp_model.optimizer.variables):
        assert_allclose(variable, old, atol=0, rtol=0)


def test_plain_model_with_bnp_raises_naming_the_mixin():
    model = mlp(keras.Sequential, inputs=IN, outputs=OUT)
    model.compile(optimizer=keras_bnp.BNP(), loss=logits_loss())
    with pytest.raises(RuntimeError, match=r"keras_bnp.BNPMixin.*BNPModel"):
        model.fit(X, Y, verbose=0)


def test_mixin_with_other_optimizer_trains_like_keras():
    weights = []
    for model_class in (keras_bnp.BNPSequential, keras.Sequential):
        keras.utils.set_random_seed(0)
        model = mlp(model_class, inputs=IN, outputs=OUT)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=logits_loss())
        model.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        assert_allclose(a, b, atol=0, rtol=0)


class UsesKernelDirectly(keras_bnp.BNPMixin, keras.Model):
    def __init__(self):
        super().__init__()
        self.called = keras.layers.Dense(4, name="called")
        self.bypassed = keras.layers.Dense(OUT, name="bypassed")
        self.bypassed.build((None, 4))

    def call(self, x):
        hidden = self.called(x)
        return hidden @ self.bypassed.kernel + self.bypassed.bias


def test_layer_never_called_gets_a_warning_with_its_name():
    model = UsesKernelDirectly()
    model.compile(optimizer=keras_bnp.BNP(0.01), loss=logits_loss())
    with pytest.warns(UserWarning, match=r"Layer 'bypassed' \(Dense\) was not "
                                         r"called in this training step"):
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    assert model.optimizer.layer_statistics(model.called)[0].shape == (IN,)


def test_fit_keeps_a_call_patched_on_a_layer_instance():
    # A user's `layer.call = ...` (an adapter or a debugging patch) runs
    # before, during and after `fit`: BNP's capture restores it.
    model = keras_bnp.BNPSequential([
        keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    layer = model.get_layer("dense")
    original = layer.call
    layer.call = lambda inputs, **kwargs: original(inputs) + 100.0
    x = np.ones((8, 4), "float32")
    want = x @ layer.kernel.numpy() + layer.bias.numpy() + 100.0
    model.compile(optimizer=keras_bnp.BNP(0.0), loss="mse")
    model.fit(x, np.zeros((8, 3), "float32"), batch_size=8, verbose=0)
    assert_allclose(model.predict(x, verbose=0), want, atol=1e-4, rtol=0)
