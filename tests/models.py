"""Small models of every kind BNP must handle, with NumPy forward passes.

`MODEL_KINDS[name]()` returns `(model, layer_inputs)`: `layer_inputs(x)`
computes, in NumPy from the model's current weights, the list of inputs each
tracked layer receives (several for a shared layer).
"""

import keras
import numpy as np

import keras_bnp

IN, HIDDEN, OUT = 6, 5, 3


def _relu(v):
    return np.maximum(v, 0.0)


def _affine(layer, x):
    return x @ layer.kernel.numpy() + layer.bias.numpy()


def _dense(name, units=HIDDEN, activation="relu"):
    return keras.layers.Dense(units, activation=activation, name=name)


def sequential(deferred=False):
    head = [] if deferred else [keras.Input((IN,))]
    model = keras_bnp.BNPSequential(
        head + [_dense("a"), _dense("b", OUT, None)]
    )

    def layer_inputs(x):
        a, b = model.get_layer("a"), model.get_layer("b")
        return {a: [x], b: [_relu(_affine(a, x))]}

    return model, layer_inputs


def branches():
    x = keras.Input((IN,))
    a, c, b = _dense("a"), _dense("c"), _dense("b", OUT, None)
    model = keras_bnp.BNPModel(x, b(keras.layers.Concatenate()([a(x), c(x)])))

    def layer_inputs(x):
        joined = np.concatenate(
            [_relu(_affine(a, x)), _relu(_affine(c, x))], axis=-1
        )
        return {a: [x], c: [x], b: [joined]}

    return model, layer_inputs


@keras.saving.register_keras_serializable(package="keras_bnp_tests")
class Subclassed(keras_bnp.BNPMixin, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = _dense("a")
        self.b = _dense("b", OUT, None)

    def call(self, x):
        return self.b(self.a(x))


def subclassed():
    model = Subclassed()

    def layer_inputs(x):
        return {model.a: [x], model.b: [_relu(_affine(model.a, x))]}

    return model, layer_inputs


def nested():
    inner = keras.Sequential([keras.Input((IN,)), _dense("a")], name="inner")
    x = keras.Input((IN,))
    b = _dense("b", OUT, None)
    model = keras_bnp.BNPModel(x, b(inner(x)))

    def layer_inputs(x):
        a = inner.get_layer("a")
        return {a: [x], b: [_relu(_affine(a, x))]}

    return model, layer_inputs


def shared():
    x = keras.Input((IN,))
    s, b = _dense("s", IN), _dense("b", OUT, None)
    model = keras_bnp.BNPModel(x, b(s(s(x))))

    def layer_inputs(x):
        h = _relu(_affine(s, x))
        return {s: [x, h], b: [_relu(_affine(s, h))]}

    return model, layer_inputs


MODEL_KINDS = {
    "sequential": sequential,
    "deferred_sequential": lambda: sequential(deferred=True),
    "functional_branches": branches,
    "subclassed": subclassed,
    "nested_submodel": nested,
    "shared_layer": shared,
}
