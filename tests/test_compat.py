"""The behaviour keras_bnp relies on in each private Keras and TensorFlow
API (`keras_bnp/_compat.py`): an upgrade that changes one fails here, by
name."""

import keras
import numpy as np
import tensorflow as tf

from keras_bnp import _compat
from keras_bnp import registry


def test_symbolic_scope_is_on_only_for_shape_inference():
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(_compat.in_symbolic_scope())
            return x

    probe = Probe()
    probe(keras.Input((3,)))  # Keras infers the output symbolically
    probe(np.ones((2, 3), "float32"))
    assert seen == [True, False]


def test_walk_saveable_names_what_saving_visits():
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert "layers" in dict(_compat.walk_saveable(functional))

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.encoder = keras.layers.Dense(2)

    walked = dict(_compat.walk_saveable(Net()))
    assert isinstance(walked["encoder"], keras.layers.Dense)


def test_unique_names_and_snake_case_are_keras_saving_names():
    used = {}
    assert [_compat.unique_name("dense", used) for _ in range(3)] == [
        "dense", "dense_1", "dense_2"]
    assert _compat.snake_case("Conv2DTranspose") == "conv2d_transpose"
    assert isinstance(keras.layers.Dense(2), _compat.KerasSaveable)


def test_set_keras_mask_attaches_the_mask():
    tensor, mask = tf.ones((2, 3, 4)), tf.constant([[True, False, True]] * 2)
    _compat.set_keras_mask(tensor, mask)
    assert tensor._keras_mask is mask


def test_xla_context_is_seen_only_under_jit_compile():
    def inside(x):
        return tf.constant(_compat.in_xla_context(
            tf.compat.v1.get_default_graph())) | (x > 0)

    assert not bool(tf.function(inside)(tf.constant(-1)))
    assert bool(tf.function(inside, jit_compile=True)(tf.constant(-1)))


def test_vectorized_map_traces_inside_the_pfor_function():
    assert _compat.PFOR_CODE is not None
    seen = []

    def per_example(x):
        seen.append(registry._in_vectorized_map())
        return x

    tf.vectorized_map(per_example, tf.ones((3, 2)))
    assert seen and all(seen)
    assert not registry._in_vectorized_map()


def test_functional_is_the_class_of_functional_models_and_graphs():
    inputs = keras.Input((3,))
    assert isinstance(keras.Model(inputs, keras.layers.Dense(2)(inputs)),
                      _compat.Functional)
    # A built Sequential keeps its graph as a Functional model.
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert isinstance(sequential._functional, _compat.Functional)
    assert keras.Sequential([keras.layers.Dense(2)])._functional is None

    class Net(keras.Model):
        def call(self, x):
            return x

    assert not isinstance(Net(), _compat.Functional)


def test_class_weights_become_sample_weights():
    weights = _compat.class_weight_to_sample_weights(
        np.array([0, 1, 1, 2]), {0: 2.0, 1: 0.5, 2: 0.0})
    np.testing.assert_array_equal(np.asarray(weights), [2.0, 0.5, 0.5, 0.0])


def test_conv_lstm_cell_is_the_cell_of_conv_lstm_layers():
    for layer in (keras.layers.ConvLSTM1D(2, 3), keras.layers.ConvLSTM2D(2, 3),
                  keras.layers.ConvLSTM3D(2, 3)):
        assert type(layer.cell) is _compat.ConvLSTMCell
