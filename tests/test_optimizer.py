import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import assert_statistics_match
from helpers import custom_step
from helpers import logits_loss
from helpers import mlp
from helpers import shifted_inputs

import keras_bnp
from keras_bnp import _reference


def test_shared_layer_pools_all_calls():
    shared = keras.layers.Dense(2, name="shared")
    a, b = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([a, b], shared(a) + shared(b))
    optimizer = keras_bnp.BNP(statistics_momentum=0.0)
    rng = np.random.default_rng(0)
    x1, x2 = shifted_inputs(rng, (4, 3)), 3.0 * shifted_inputs(rng, (4, 3))
    custom_step(model, optimizer, [x1, x2], np.ones((4, 2), "float32"))
    want_mean, want_variance = _reference.batch_moments([x1, x2], -1)
    mean, variance = optimizer.layer_statistics(shared)
    assert_allclose(mean, want_mean, atol=1e-5)
    assert_allclose(variance, want_variance, atol=1e-5, rtol=1e-5)


def test_identity_statistics_reduce_to_sgd():
    # Every batch has exactly mean 0 and population variance 1 / (1 +
    # epsilon) per feature, so with the relative damping epsilon * variance
    # every scale is 1, and momentum 0: BNP must take exactly SGD's steps.
    epsilon = 0.2
    rng = np.random.default_rng(0)
    models = []
    for optimizer in (
        keras_bnp.BNP(0.1, momentum=0.9, epsilon=epsilon,
                      statistics_momentum=0.0, initial_scaling=False),
        keras.optimizers.SGD(0.1, momentum=0.9),
    ):
        keras.utils.set_random_seed(0)
        model = keras_bnp.BNPSequential(
            [keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer=optimizer, loss=logits_loss())
        models.append(model)
    for _ in range(10):
        x = rng.normal(size=(8, 4))
        x = (x - x.mean(0)) / x.std(0) / np.sqrt(1 + epsilon)
        y = rng.integers(0, 3, 8)
        for model in models:
            model.train_on_batch(x.astype("float32"), y)
    for bnp_weight, sgd_weight in zip(*(m.get_weights() for m in models)):
        assert_allclose(bnp_weight, sgd_weight, atol=1e-6)


@pytest.mark.slow
def test_inner_optimizer_trains_other_variables_unchanged():
    # LayerNormalization's gamma/beta are not preconditioned: their first
    # Adam step must equal plain Adam's.
    def build():
        keras.utils.set_random_seed(0)
        return keras_bnp.BNPSequential([
            keras.Input((4,)), keras.layers.Dense(6),
            keras.layers.LayerNormalization(), keras.layers.Dense(3)])

    x = shifted_inputs(np.random.default_rng(0), (16, 4))
    y = np.arange(16) % 3
    results = []
    for optimizer in (
        keras_bnp.BNP(inner_optimizer=keras.optimizers.Adam(0.01)),
        keras.optimizers.Adam(0.01),
    ):
        model = build()
        model.compile(optimizer=optimizer, loss=logits_loss())
        model.train_on_batch(x, y)
        results.append(model)
    bnp_model, adam_model = results
    for i in (1,):
        for a, b in zip(bnp_model.layers[i].weights,
                        adam_model.layers[i].weights):
            assert_allclose(a, b)
    # ...while the Dense kernels took different (preconditioned) steps.
    assert not np.allclose(bnp_model.layers[0].kernel.numpy(),
                           adam_model.layers[0].kernel.numpy(), atol=1e-4)
    assert int(bnp_model.optimizer.iterations) == 1


# Arguments of the inner optimizer that BNP's errors point users to; each
# must act on the preconditioned gradients, as on plain ones.
INNER_ARGUMENTS = {
    "clipnorm": {"clipnorm": 0.02},
    "global_clipnorm": {"global_clipnorm": 0.02},
    "clipvalue": {"clipvalue": 0.005},
    "weight_decay": {"weight_decay": 0.5},
    "gradient_accumulation": {"gradient_accumulation_steps": 3},
    "ema": {"use_ema": True, "ema_momentum": 0.5},
    "ema_overwrite": {"use_ema": True, "ema_momentum": 0.5,
                      "ema_overwrite_frequency": 5},
    "loss_scale_factor": {"loss_scale_factor": 64.0},
}


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("name", sorted(INNER_ARGUMENTS))
def test_inner_optimizer_arguments_act_on_preconditioned_gradients(
    name, jit_compile
):
    # `fit` with BNP around SGD(**arguments), against a plain model whose
    # gradients are preconditioned by the NumPy reference and handed to a
    # plain SGD(**arguments).
    arguments = INNER_ARGUMENTS[name]
    learning_rate, epsilon, beta, batch = 0.1, 0.1, 0.8, 4
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (12 * batch, 5))
    y = rng.integers(0, 3, 12 * batch)

    def build():
        keras.utils.set_random_seed(0)
        return keras_bnp.BNPSequential(
            [keras.Input((5,)), keras.layers.Dense(3)])

    def inner(**extra):
        return keras.optimizers.SGD(learning_rate, momentum=0.9, **extra)

    def train_bnp(**extra):
        model = build()
        model.compile(
            optimizer=keras_bnp.BNP(
                inner_optimizer=inner(**extra), epsilon=epsilon,
                statistics_momentum=beta, initial_scaling=False),
            loss=logits_loss(), jit_compile=jit_compile)
        model.fit(x, y, batch_size=batch, shuffle=False, verbose=0)
        return [w.numpy() for w in model.weights]

    reference = build()
    optimizer = inner(**arguments)
    stats = _reference.RawMomentStatistics(5, beta)
    for start in range(0, len(x), batch):
        inputs, labels = x[start:start + batch], y[start:start + batch]
        with tf.GradientTape() as tape:
            loss = optimizer.scale_loss(
                logits_loss()(labels, reference(inputs)))
        grads = tape.gradient(loss, reference.trainable_variables)
        stats.update([inputs], -1)
        grads = _reference.precondition(
            *grads, stats.mean, stats.variance,
            _reference.damping(stats.mean, stats.variance, epsilon))
        optimizer.apply([g.astype("float32") for g in grads],
                        reference.trainable_variables)
    optimizer.finalize_variable_values(reference.trainable_variables)

    weights = train_bnp(**arguments)
    for actual, want in zip(weights, reference.weights):
        assert_allclose(actual, want, atol=1e-5, rtol=1e-5)
    plain = train_bnp()
    change = max(np.abs(a - b).max() for a, b in zip(weights, plain))
    if name == "loss_scale_factor":
        # Scaling by a power of two, then unscaling, is exact.
        assert change == 0.0
    else:
        # The argument changed the training (a clip that binds, ...), so
        # the comparison above tests it.
        assert change > 1e-3


def test_config_round_trip():
    optimizer = keras_bnp.BNP(
        epsilon=0.05, statistics_momentum=0.9,
        inner_optimizer=keras.optimizers.Adam(3e-4, beta_1=0.8), name="pre",
    )
    config = optimizer.get_config()
    restored = keras_bnp.BNP.from_config(config)
    assert restored.get_config() == config
    assert isinstance(restored.inner_optimizer, keras.optimizers.Adam)
    assert restored.inner_optimizer.beta_1 == 0.8
    assert float(restored.learning_rate) == pytest.approx(3e-4)
    serialized = keras.saving.serialize_keras_object(optimizer)
    assert serialized["registered_name"] == "keras_bnp>BNP"
    again = keras.saving.deserialize_keras_object(serialized)
    assert again.get_config() == config
    by_name = keras.optimizers.get(serialized)
    assert isinstance(by_name, keras_bnp.BNP) and by_name.epsilon == 0.05


def test_registered_name_gives_the_defaults():
    # The config of a name alone has no `inner_optimizer`.
    optimizer = keras.optimizers.get("keras_bnp>BNP")
    assert isinstance(optimizer, keras_bnp.BNP)
    assert (optimizer.epsilon, optimizer.relative_epsilon,
            optimizer.statistics_momentum, optimizer.initial_scaling) == (
        3.0, True, 0.99, True)
    inner = optimizer.inner_optimizer
    assert isinstance(inner, keras.optimizers.SGD)
    assert (inner.momentum, inner.nesterov) == (0.9, False)
    model = mlp()
    model.compile(optimizer="keras_bnp>BNP", loss=logits_loss())
    x = shifted_inputs(np.random.default_rng(0), (8, 8))
    model.fit(x, np.arange(8) % 3, batch_size=8, verbose=0)
    assert isinstance(model.optimizer, keras_bnp.BNP)
    assert int(model.optimizer.iterations) == 1
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
    mean, _ = model.optimizer.layer_statistics(model.layers[0])
    assert_allclose(mean, x.astype("float64").mean(0), atol=1e-6)


def test_builtin_sgd_and_delegation():
    optimizer = keras_bnp.BNP(0.05, momentum=0.5, nesterov=True)
    inner = optimizer.inner_optimizer
    assert isinstance(inner, keras.optimizers.SGD)
    assert (inner.momentum, inner.nesterov) == (0.5, True)
    assert float(optimizer.learning_rate) == pytest.approx(0.05)
    optimizer.learning_rate = 0.5
    assert float(inner.learning_rate) == pytest.approx(0.5)
    defaults = keras_bnp.BNP()
    assert float(defaults.learning_rate) == pytest.approx(0.01)
    assert defaults.inner_optimizer.momentum == 0.9
    assert isinstance(keras_bnp.BNP(inner_optimizer="adam").inner_optimizer,
                      keras.optimizers.Adam)


def test_learning_rate_schedule_follows_inner_iterations():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 4, 0.5)
    model = mlp()
    model.compile(optimizer=keras_bnp.BNP(schedule), loss=logits_loss())
    x = shifted_inputs(np.random.default_rng(0), (16, 8))
    model.fit(x, np.arange(16) % 3, batch_size=2, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 8
    assert float(model.optimizer.inner_optimizer._get_current_learning_rate()
                 ) == pytest.approx(0.1 * 0.5 ** 2)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"epsilon": 0.0}, r"`epsilon` must be a finite float > 0 that "
                           r"float32 represents as a normal number.*"
                           r"Received: epsilon=0\.0"),
        # 1e-39 is subnormal in float32, 1e-50 rounds to 0.
        ({"epsilon": 1e-39}, r"Received: epsilon=1e-39"),
        ({"epsilon": 1e-50}, r"from 1\.2e-38 to 3\.4e38.*"
                             r"Received: epsilon=1e-50"),
        ({"epsilon": 1e39}, r"Received: epsilon=1e\+39"),
        ({"learning_rate": -0.1}, r"`learning_rate` must be a finite float "
                                  r">= 0.*Received: learning_rate=-0\.1"),
        ({"learning_rate": float("inf")}, r"Received: learning_rate=inf"),
        ({"learning_rate": float("nan")}, r"Received: learning_rate=nan"),
        ({"epsilon": float("nan")}, r"Received: epsilon=nan"),
        ({"epsilon": "small"}, r"`epsilon` must be a float\. "
                               r"Received: epsilon='small'"),
        ({"statistics_momentum": 1.0},
         r"`statistics_momentum` must be in \[0, 1\).*"
         r"Received: statistics_momentum=1\.0"),
        ({"statistics_momentum": -0.1}, r"statistics_momentum=-0\.1"),
        ({"clipnorm": 1.0}, r"BNP does not support `clipnorm`\. Instead, set "
                            r"`clipnorm` on an `inner_optimizer`.*"
                            r"Received: clipnorm=1\.0"),
        ({"weight_decay": 1e-4}, r"set `weight_decay` on an `inner_optimizer`"),
        ({"momentun": 0.9}, r"unexpected arguments: \['momentun'\]"),
        ({"learning_rate": 0.1, "inner_optimizer": "adam"},
         r"both `inner_optimizer` and \['learning_rate'\].*"
         r"Received: learning_rate=0\.1"),
        ({"nesterov": True, "inner_optimizer": "sgd"},
         r"Received: nesterov=True"),
        ({"inner_optimizer": 3}, r"Received: inner_optimizer=3"),
        ({"inner_optimizer": keras_bnp.BNP()}, r"not a BNP"),
        ({"learning_rate": "fast"}, r"Received: learning_rate='fast'"),
        ({"inner_optimizer": keras.optimizers.Adam(-1.0)},
         r"`inner_optimizer.learning_rate` must be a finite float >= 0.*"
         r"Received: inner_optimizer.learning_rate=-1\.0"),
        ({"inner_optimizer": keras.optimizers.SGD(float("nan"))},
         r"Received: inner_optimizer.learning_rate=nan"),
    ],
)
def test_invalid_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        keras_bnp.BNP(**kwargs)


def test_layer_statistics_of_untracked_layer_raises():
    model = mlp()
    model.compile(optimizer=keras_bnp.BNP(), loss=logits_loss())
    with pytest.raises(ValueError, match=r"no statistics for layer 'hidden'"):
        model.optimizer.layer_statistics(model.layers[0])
    norm = keras.layers.LayerNormalization(name="norm")
    with pytest.raises(ValueError, match=r"layer 'norm' \(LayerNormal"):
        model.optimizer.layer_statistics(norm)


def test_learning_rate_set_later_is_checked():
    optimizer = keras_bnp.BNP(0.1)
    optimizer.learning_rate = 0.05
    assert float(optimizer.inner_optimizer.learning_rate) == np.float32(0.05)
    with pytest.raises(ValueError, match=(
            r"`learning_rate` must be a finite float >= 0.*"
            r"Received: learning_rate=-1\.0")):
        optimizer.learning_rate = -1
    assert float(optimizer.inner_optimizer.learning_rate) == np.float32(0.05)
    # A schedule given to the inner optimizer is not evaluated.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    keras_bnp.BNP(inner_optimizer=keras.optimizers.SGD(schedule))


@pytest.mark.parametrize("loss_scale_factor", [None, 64.0])
@pytest.mark.parametrize("input_scale", [1e-3, 1.0, 1e3])
def test_regularization_penalty_is_not_preconditioned(input_scale,
                                                      loss_scale_factor):
    # A loss of the penalties alone: whatever the units of the inputs, the
    # kernel and bias decay as SGD decays them, w - lr * 2 * l2 * w.
    rng = np.random.default_rng(0)
    x = (shifted_inputs(rng, (16, 5)) + 3.0) * input_scale
    keras.utils.set_random_seed(0)
    model = keras_bnp.BNPSequential([keras.Input((5,)), keras.layers.Dense(
        3, kernel_regularizer=keras.regularizers.L2(0.05),
        bias_regularizer=keras.regularizers.L2(0.02),
        bias_initializer="ones")])
    before = [w.numpy() for w in model.weights]
    model.compile(optimizer=keras_bnp.BNP(
        inner_optimizer=keras.optimizers.SGD(
            0.1, loss_scale_factor=loss_scale_factor),
        initial_scaling=False),
        loss=lambda y, p: 0.0 * keras.ops.mean(p, axis=-1))
    model.fit(x, np.zeros(16), batch_size=16, verbose=0)
    for weight, l2, start in zip(model.weights, (0.05, 0.02), before):
        assert_allclose(weight, start * (1 - 0.1 * 2 * l2), rtol=1e-6)


def test_regularized_step_preconditions_the_data_loss_only():
    # One step: the data loss's gradient preconditioned by the NumPy
    # reference, plus the penalty's gradient as it is.
    rng = np.random.default_rng(1)
    x = shifted_inputs(rng, (16, 5)) * 0.1 + 0.4
    y = rng.integers(0, 3, 16)
    epsilon, l2 = 0.1, 0.05

    def build():
        keras.utils.set_random_seed(0)
        return keras_bnp.BNPSequential([keras.Input((5,)), keras.layers.Dense(
            3, kernel_regularizer=keras.regularizers.L2(l2))])

    model = build()
    kernel, bias = (w.numpy() for w in model.weights)
    with tf.GradientTape() as tape:
        loss = logits_loss()(y, model(x))  # without the penalty
    grad_kernel, grad_bias = tape.gradient(loss, model.trainable_variables)
    mean, variance = x.astype("float64").mean(0), x.astype("float64").var(0)
    grad_kernel, grad_bias = _reference.precondition(
        grad_kernel.numpy(), grad_bias.numpy(), mean, variance,
        _reference.damping(mean, variance, epsilon))
    model.compile(optimizer=keras_bnp.BNP(
        0.1, momentum=0.0, epsilon=epsilon, initial_scaling=False),
        loss=logits_loss())
    model.fit(x, y, batch_size=16, verbose=0)
    assert_allclose(model.weights[0],
                    kernel - 0.1 * (grad_kernel + 2 * l2 * kernel),
                    rtol=1e-4, atol=1e-6)
    assert_allclose(model.weights[1], bias - 0.1 * grad_bias, rtol=1e-4,
                    atol=1e-6)


def test_gradient_accumulation_updates_statistics_per_micro_batch():
    # 12 micro-batches of 4, applied every 3: the statistics take all 12
    # batches (as BatchNormalization's moving averages would), the
    # optimizer counts the 4 applied steps.
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (48, 5)) + 7.0
    model = keras_bnp.BNPSequential([keras.Input((5,)),
                                     keras.layers.Dense(3)])
    model.compile(optimizer=keras_bnp.BNP(
        inner_optimizer=keras.optimizers.SGD(
            0.01, gradient_accumulation_steps=3),
        statistics_momentum=0.8, initial_scaling=False), loss=logits_loss())
    model.fit(x, rng.integers(0, 3, 48), batch_size=4, shuffle=False,
              verbose=0)
    assert int(model.optimizer.iterations) == 4
    reference = _reference.RawMomentStatistics(5, 0.8)
    for start in range(0, 48, 4):
        reference.update([x[start:start + 4]], -1)
    assert_statistics_match(model.optimizer, model.layers[0], reference)


@pytest.mark.slow
def test_statistics_momentum_zero_at_batch_size_one_warns():
    # The mean is the example itself and the variance 0: the centred kernel
    # gradient is 0 but for rounding.
    model = mlp(inputs=6, outputs=3)
    model.compile(optimizer=keras_bnp.BNP(0.1, statistics_momentum=0.0,
                                          initial_scaling=False),
                  loss=logits_loss())
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (6, 6))
    with pytest.warns(UserWarning, match=(
            r"BNP 'bnp' has statistics_momentum=0, so each step's statistics "
            r"are of that step's batch alone, and layer\(s\) \['hidden', "
            r"'logits'\] saw one value per input channel \(in the first "
            r"step\).*Use a statistics_momentum above 0")) as caught:
        model.fit(x, np.arange(6) % 3, batch_size=1, verbose=0)
    assert len(caught) == 1
    # Two examples a step give a variance: no warning.
    model.fit(x, np.arange(6) % 3, batch_size=2, verbose=0)


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")


def test_float64_model_keeps_float64_statistics(float64):
    # Inputs at 1e4 +- 1e-3, which float32 cannot tell apart (`fit` hands
    # arrays to the model in `floatx`).
    rng = np.random.default_rng(0)
    x = 1e4 + rng.normal(0.0, 1e-3, (32, 3))
    model = keras_bnp.BNPSequential([
        keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(optimizer=keras_bnp.BNP(0.01, initial_scaling=False),
                  loss=logits_loss())
    history = model.fit(x, np.arange(32) % 2, batch_size=16, epochs=2,
                        shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # The reference's raw sums of x^2 would lose the variance to rounding
    # in float64 too: it takes x - 1e4 (exact), the same moments shifted.
    reference = _reference.RawMomentStatistics(3, 0.99)
    for _ in range(2):
        for start in (0, 16):
            reference.update([x[start:start + 16] - 1e4], -1)
    mean, variance = model.optimizer.layer_statistics(model.layers[0])
    assert variance.dtype == np.float64
    np.testing.assert_allclose(mean - 1e4, reference.mean, rtol=1e-7)
    np.testing.assert_allclose(variance, reference.variance, rtol=1e-7)
