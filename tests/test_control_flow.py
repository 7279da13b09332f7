"""Layers called inside loops, `cond` branches and nested functions of the
training step: what their statistics pool, and the warnings."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose

import keras_bnp

BATCH, STEPS, CHANNELS = 32, 5, 4
LOOP = r"a loop \(`keras.ops.scan`"
COND = r"a `cond` branch"


def _inputs(seed=0):
    """`(BATCH, STEPS, CHANNELS)`: channels far from zero, with tiny and
    huge variances, and each time step shifted differently."""
    rng = np.random.default_rng(seed)
    scale = np.array([1e-2, 1e3, 1.0, 0.1])
    offset = np.array([100.0, -50.0, 0.5, 7.0])
    steps = np.arange(STEPS)[:, None] * np.array([1.0, 300.0, -2.0, 0.5])
    x = rng.normal(size=(BATCH, STEPS, CHANNELS)) * scale + offset + steps
    return x.astype("float32")


def _fit(model, x, optimizer=None, **compile_args):
    """One step on the whole batch; BNP with `statistics_momentum=0`, so
    the statistics are those of this batch."""
    model.compile(
        optimizer=optimizer or keras_bnp.BNP(
            1e-6, momentum=0.0, statistics_momentum=0.0,
            initial_scaling=False),
        loss="mse", **compile_args)
    model.fit(x, np.zeros((BATCH, CHANNELS), "float32"), batch_size=BATCH,
              epochs=1, shuffle=False, verbose=0)


def _assert_statistics(optimizer, layer, values):
    """`layer`'s running statistics are the mean and population variance
    of `values` `(examples, CHANNELS)`, computed in float64."""
    mean, variance = optimizer.layer_statistics(layer)
    values = values.astype("float64")
    assert_allclose(mean, values.mean(axis=0), atol=0, rtol=1e-6)
    assert_allclose(variance, values.var(axis=0), atol=0, rtol=1e-4)


def _assert_never_updated(optimizer, layer):
    """`layer`'s statistics are still the initial zeros and ones."""
    mean, variance = optimizer.layer_statistics(layer)
    assert_allclose(mean, 0.0, atol=0, rtol=0)
    assert_allclose(variance, 1.0, atol=0, rtol=0)


class Scan(keras_bnp.BNPMixin, keras.Model):
    """Sums `dense` over the time steps in a `keras.ops.scan`; with
    `outside`, the first step's call is outside the loop."""

    def __init__(self, outside):
        super().__init__()
        self.outside = outside
        self.dense = keras.layers.Dense(CHANNELS)

    def call(self, x):
        def step(total, x_t):
            return total + self.dense(x_t), None

        steps = keras.ops.moveaxis(x, 1, 0)
        if self.outside:
            first, steps = self.dense(steps[0]), steps[1:]
        else:
            first = keras.ops.zeros_like(steps[0])
        return keras.ops.scan(step, first, steps)[0]


def test_layer_inside_and_outside_a_scan_pools_its_outside_call_and_warns():
    x = _inputs()
    model = Scan(outside=True)
    with pytest.warns(UserWarning) as record:
        _fit(model, x)
    [message] = {str(w.message) for w in record}  # once per trace
    assert message.startswith(
        f"Layer '{model.dense.name}' (Dense) is called in this training step "
        "both inside a loop (`keras.ops.scan`, `fori_loop`, `while_loop`, "
        "`map`, `tf.while_loop`) and outside (1 call(s)). BNP's statistics "
        "of its input pool only the calls outside, while its gradient sums "
        "over all calls. To pool every call, call the layer outside the "
        "loop: apply it to all steps at once")
    _assert_statistics(model.optimizer, model.dense, x[:, 0])


def test_layer_only_inside_a_scan_trains_with_the_inner_optimizer_alone():
    x = _inputs()
    weights = []
    for optimizer in (keras_bnp.BNP(1e-6, momentum=0.0,
                                    initial_scaling=False),
                      keras.optimizers.SGD(1e-6)):
        keras.utils.set_random_seed(0)
        model = Scan(outside=False)
        model(x[:1])
        before = model.dense.get_weights()
        if isinstance(optimizer, keras_bnp.BNP):
            with pytest.warns(UserWarning, match=(
                    rf"Layer '{model.dense.name}' \(Dense\) is called in "
                    rf"this training step only inside {LOOP}.*, whose "
                    r"tensors BNP cannot read, so BNP has no statistics of "
                    r"its input and leaves its gradients unpreconditioned\. "
                    r"To precondition it, call the layer outside the loop")):
                _fit(model, x, optimizer)
            _assert_never_updated(optimizer, model.dense)
        else:
            _fit(model, x, optimizer)
        weights.append(model.dense.get_weights())
        assert not np.allclose(weights[-1][0], before[0], rtol=0, atol=0)
    for bnp, sgd in zip(*weights):
        assert_allclose(bnp, sgd, atol=0, rtol=0)


class Mapped(keras_bnp.BNPMixin, keras.Model):
    """`dense` on each example, through `map_fn` (`keras.ops.map` or
    `keras.ops.vectorized_map`)."""

    def __init__(self, map_fn):
        super().__init__()
        self.map_fn = map_fn
        self.dense = keras.layers.Dense(CHANNELS)

    def call(self, x):
        return self.map_fn(lambda example: self.dense(example[None])[0], x)


def test_layer_in_vectorized_map_is_not_recorded_and_warns():
    # pfor traces the function once for a placeholder index (example 0 when
    # run), then vectorizes its ops: that call's input is one example.
    x = _inputs()[:, 1]
    model = Mapped(keras.ops.vectorized_map)
    with pytest.warns(UserWarning, match=(
            rf"Layer '{model.dense.name}' \(Dense\) is called in this "
            r"training step only inside `keras.ops.vectorized_map` or "
            r"`tf.vectorized_map`, whose function is traced for a single "
            r"element, .* call the layer on the whole batch outside "
            r"`vectorized_map`")):
        _fit(model, x)
    _assert_never_updated(model.optimizer, model.dense)


# Its statistics are of one example a step, with statistics_momentum=0.
@pytest.mark.filterwarnings("ignore:BNP 'bnp' has statistics_momentum=0")
def test_layer_in_keras_map_pools_the_first_example_keras_calls_outside():
    # `keras.ops.map` calls the function on the first example outside the
    # loop, for the output's structure; that call is recorded.
    x = _inputs()[:, 1]
    model = Mapped(keras.ops.map)
    with pytest.warns(UserWarning, match=(
            rf"Layer '{model.dense.name}' \(Dense\) is called in this "
            rf"training step both inside {LOOP}.* and outside \(1 "
            r"call\(s\)\)")):
        _fit(model, x)
    _assert_statistics(model.optimizer, model.dense, x[:1])


class Branches(keras_bnp.BNPMixin, keras.Model):
    """`dense` on the input, then on one of two values chosen by a `cond`
    on a tensor, or on `python_bool` if given."""

    def __init__(self, python_bool=None):
        super().__init__()
        self.python_bool = python_bool
        self.dense = keras.layers.Dense(CHANNELS)

    def call(self, x):
        first = self.dense(x)
        predicate = (keras.ops.mean(first) > 0 if self.python_bool is None
                     else self.python_bool)
        return keras.ops.cond(predicate, lambda: self.dense(first),
                              lambda: self.dense(-first))


def test_layer_in_cond_branches_pools_its_outside_call_and_warns():
    x = _inputs()[:, 2]
    model = Branches()
    with pytest.warns(UserWarning, match=(
            rf"Layer '{model.dense.name}' \(Dense\) is called in this "
            rf"training step both inside {COND} \(`keras.ops.cond` or "
            r"`tf.cond` on a tensor\) and outside \(1 call\(s\)\).*call the "
            r"layer outside the `cond`, e.g. compute both branches and "
            r"choose with `keras.ops.where`\.")):
        _fit(model, x)
    _assert_statistics(model.optimizer, model.dense, x)


def test_cond_on_a_python_bool_is_recorded():
    # Only the branch picked is traced, in the step's own graph.
    x = _inputs()[:, 2]
    model = Branches(python_bool=False)
    model(x[:1])
    kernel, bias = model.dense.get_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit(model, x)
    first = x.astype("float64") @ kernel + bias
    _assert_statistics(model.optimizer, model.dense,
                       np.concatenate([x, -first]))


class Nested(keras_bnp.BNPMixin, keras.Model):
    """`dense` inside a `tf.function` of its own."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(CHANNELS)
        self.nested = tf.function(self.dense)

    def call(self, x):
        return self.nested(x)


def test_layer_in_a_nested_tf_function_warns():
    x = _inputs()[:, 2]
    model = Nested()
    model(x[:1])
    with pytest.warns(UserWarning, match=(
            rf"Layer '{model.dense.name}' \(Dense\) is called in this "
            r"training step only inside a nested `tf.function`.*call the "
            r"layer outside the nested `tf.function`")):
        _fit(model, x)
    _assert_never_updated(model.optimizer, model.dense)


class Cell(keras.layers.Layer):
    """An RNN cell whose input transform is a `Dense`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.state_size = CHANNELS
        self.dense = keras.layers.Dense(CHANNELS)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x, states):
        h = keras.ops.tanh(self.dense(x) * 1e-3 + 0.5 * states[0])
        return h, [h]


@pytest.mark.parametrize("unroll", [False, True])
def test_rnn_cell_layer_is_pooled_over_time_only_when_unrolled(unroll):
    # `keras.layers.RNN` runs its cell in a `tf.while_loop`, after one call
    # outside it on the first time step (for the output's shape); with
    # `unroll=True`, in a Python loop: one recorded call per time step.
    x = _inputs()
    inputs = keras.Input((STEPS, CHANNELS))
    rnn = keras.layers.RNN(Cell(), unroll=unroll)
    model = keras_bnp.BNPModel(inputs, rnn(inputs))
    dense = rnn.cell.dense
    if unroll:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            _fit(model, x)
        _assert_statistics(model.optimizer, dense, x.reshape(-1, CHANNELS))
    else:
        with pytest.warns(UserWarning, match=(
                rf"Layer '{dense.name}' \(Dense\) is called in this training "
                rf"step both inside {LOOP}.* and outside \(1 call\(s\)\)")):
            _fit(model, x)
        _assert_statistics(model.optimizer, dense, x[:, 0])


class Subclassed(keras_bnp.BNPMixin, keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(CHANNELS)

    def call(self, x):
        return self.dense(x)


def test_symbolic_shape_inference_in_a_step_is_neither_recorded_nor_warned():
    # `compute_output_spec` runs `call` in a scratch graph whose outer graph
    # is the step's.
    x = _inputs()[:, 0]
    model = Subclassed()
    model(x[:1])
    optimizer = keras_bnp.BNP(1e-6, statistics_momentum=0.0)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(x):
        with optimizer.capture(model):
            with tf.GradientTape() as tape:
                spec = model.compute_output_spec(
                    keras.KerasTensor((None, CHANNELS)))
                loss = keras.ops.mean(model(x) ** 2)
            variables = model.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                          variables))
        return spec.shape

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        step(x)
    _assert_statistics(optimizer, model.dense, x)


def test_eager_steps_record_every_call_of_a_loop():
    # With `run_eagerly=True` a loop runs in Python, in the step's (eager)
    # context: each iteration's call is recorded and pooled.
    x = _inputs()
    model = Scan(outside=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit(model, x, run_eagerly=True)
    _assert_statistics(model.optimizer, model.dense, x.reshape(-1, CHANNELS))
