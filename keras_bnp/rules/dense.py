"""`Dense`."""

import keras

from keras_bnp.rules.base import Block
from keras_bnp.rules.base import Rule
from keras_bnp.rules.base import trainable


class DenseRule(Rule):
    """`Dense`: the kernel `(in, units)` on the input's last axis."""

    layer_types = (keras.layers.Dense,)

    def blocks(self, layer):
        weights = trainable(layer)
        kernel = weights["kernel"]
        return [Block(layer, kernel, weights.get("bias"), kernel.shape[0])]


