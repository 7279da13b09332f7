"""`keras_bnp.rules.register_rule`: a rule for a layer of one's own."""

import keras
import numpy as np
import pytest
from helpers import assert_allclose
from helpers import logits_loss
from helpers import shifted_inputs

import keras_bnp
from keras_bnp import rules


class MyDense(keras.layers.Layer):
    """A Dense layer of one's own: `x @ kernel + bias`."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units),
                                      initializer="glorot_uniform",
                                      name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros",
                                    name="bias")

    def call(self, x):
        return keras.ops.matmul(x, self.kernel) + self.bias


class MyDenseRule(rules.Rule):
    """Its kernel `(in, units)` on the input's last axis, as Dense's."""

    layer_types = (MyDense,)
    scaled = False  # the initial scaling leaves it as it is

    def blocks(self, layer):
        weights = rules.trainable(layer)
        kernel = weights["kernel"]
        return [rules.Block(layer, kernel, weights["bias"], kernel.shape[0])]


@pytest.fixture
def registered():
    rule = rules.register_rule(MyDenseRule())
    yield rule
    rules.RULES.remove(rule)


def _trained(layer, x, y):
    model = keras_bnp.BNPSequential([keras.Input((5,)), layer])
    model.build((None, 5))
    layer.set_weights([np.linspace(-1, 1, 15).reshape(5, 3).astype(
        "float32"), np.array([0.1, 0.0, -0.1], "float32")])
    model.compile(optimizer=keras_bnp.BNP(0.1, initial_scaling=False),
                  loss=logits_loss())
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return model


def test_registered_rule_trains_its_layer_as_dense_is_trained(registered):
    rng = np.random.default_rng(0)
    x = shifted_inputs(rng, (32, 5)) + 10.0
    y = rng.integers(0, 3, 32)
    mine = _trained(MyDense(3), x, y)
    dense = _trained(keras.layers.Dense(3), x, y)
    for a, b in zip(mine.layers[0].weights, dense.layers[0].weights):
        assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(mine.optimizer.layer_statistics(mine.layers[0]),
                    dense.optimizer.layer_statistics(dense.layers[0])):
        assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    share = keras_bnp.coverage.coverage(mine).kernel_parameters
    assert (share.covered, share.total) == (15, 15)


def test_unregistered_layer_is_left_to_the_inner_optimizer():
    layer = MyDense(3)
    keras.Sequential([keras.Input((5,)), layer])
    assert rules.rule_for(layer) is None and rules.blocks(layer) == []


def test_registered_rule_takes_precedence_for_a_subclass(registered):
    class MyKerasDense(keras.layers.Dense):
        pass

    class SubclassRule(rules.DenseRule):
        layer_types = (MyKerasDense,)

    assert isinstance(rules.rule_for(MyKerasDense(2)), rules.DenseRule)
    rule = rules.register_rule(SubclassRule())
    try:
        assert rules.rule_for(MyKerasDense(2)) is rule
        assert type(rules.rule_for(keras.layers.Dense(2))) is rules.DenseRule
    finally:
        rules.RULES.remove(rule)


def test_register_rule_refuses_what_is_not_a_rule():
    with pytest.raises(TypeError, match=(
            r"`register_rule` takes an instance of a `keras_bnp.rules.Rule` "
            r"subclass, e.g. `register_rule\(MyRule\(\)\)`. Received: "
            r"<class")):
        rules.register_rule(MyDenseRule)
    with pytest.raises(ValueError, match=r"Rule.layer_types is empty"):
        rules.register_rule(rules.Rule())
