"""Data-dependent initial scaling of the preconditioned layers' kernels.

BNP acts on gradients only, so it inherits the forward signal's scale from
the initialization. With Keras' default (Glorot) initializers the inputs of
deep ReLU layers shrink by a factor of 2 to 3 or more per layer; BatchNorm
repairs that at every step, BNP cannot. Scaling each layer once, before
training, so that its outputs have unit variance on a batch of data (LSUV:
Mishkin & Matas, "All you need is a good init", ICLR 2016, without its
orthogonal start) fixes it and changes only weights, so the model keeps its
architecture and its inference cost.
"""

import collections

import keras
import numpy as np
import tensorflow as tf

from keras_bnp import registry
from keras_bnp import rules


def scale_to_unit_variance(model, inputs, target_variance=1.0):
    """Scales each preconditioned layer's kernel and bias so that, on
    `inputs`, its outputs have variance `target_variance`.

    One forward pass (in inference mode) visits the layers in the order the
    model calls them; each layer's output is scaled as soon as it is
    computed, so every later layer is measured on the inputs it will see
    after the scaling. The variance is over the whole output (every example,
    position and unit), so the ratios between units and the kernel's shape
    of initialization are kept. A layer whose output is constant or not
    finite is left as it is.

    The scaling stops at the first preconditioned layer of a kind it does
    not scale (recurrent layers, attention's `EinsumDense`): a later layer
    scaled to the output of such a layer, which can be far from unit
    variance and change quickly in training, starts with weights sized for
    that one batch (measured: a Dense head after an LSTM whose outputs had
    a standard deviation of 0.009 was multiplied by 142 and training
    diverged).

    Args:
        model: A Keras model (built on `inputs` first if it is not).
        inputs: A batch the model accepts (a few hundred examples is enough).
        target_variance: Float > 0. Defaults to `1.0`.

    Returns:
        A dict `{layer name: scale}` of the factors applied, in call order;
        layers of the same name (such as the projections of several
        `MultiHeadAttention` layers) are named by their `path`, e.g.
        `"multi_head_attention/query"`.
    """
    target_variance = float(target_variance)
    if not target_variance > 0:
        raise ValueError(
            "Argument `target_variance` must be a float > 0. Received: "
            f"target_variance={target_variance}"
        )
    if not tf.executing_eagerly():
        raise RuntimeError(
            "scale_to_unit_variance runs eagerly; call it outside "
            "tf.function."
        )
    scales, done = {}, set()
    stopped = []  # the first layer of a kind that is not scaled

    def on_output(layer, outputs):
        rule = rules.rule_for(layer)
        if not rule.scaled:
            stopped.append(layer)
        if stopped or id(layer) in done:
            return outputs  # a shared layer: scaled at its first call
        done.add(id(layer))
        variables = rule.scaled_variables(layer)
        variance = float(tf.math.reduce_variance(
            tf.cast(outputs, tf.float32)))
        scale = 1.0
        if variables and np.isfinite(variance) and variance > 0:
            scale = float(np.sqrt(target_variance / variance))
            for variable in variables:
                variable.assign(variable * scale)
        scales[layer.name if names[layer.name] == 1 else layer.path] = scale
        return outputs * tf.cast(scale, outputs.dtype)

    if not model.built:
        # Building may trace the model symbolically; keep that out of the
        # measured pass, and let Keras record the build.
        model(inputs, training=False)
    layers = [layer for layer in registry.supported_layers(model)
              if rules.blocks(layer)]
    # Layers nested in others can share names (keras-hub's "query", ...).
    names = collections.Counter(layer.name for layer in layers)
    with registry.intercept_outputs(layers, on_output):
        model(inputs, training=False)
    return scales


def first_batch(x, size):
    """The inputs of the first `size` examples of `fit`'s `x`, or `None`
    when they cannot be read without consuming it (a Python generator)."""
    if isinstance(x, tf.data.Dataset):
        element = next(iter(x.take(1)))
        return element[0] if isinstance(element, tuple) else element
    if isinstance(x, keras.utils.PyDataset):
        element = x[0]
        return element[0] if isinstance(element, tuple) else element
    leaves = keras.tree.flatten(x)
    if not leaves or not all(hasattr(leaf, "shape") for leaf in leaves):
        return None
    return keras.tree.map_structure(lambda array: _head(array, size), x)


def _head(array, size):
    if isinstance(array, tf.SparseTensor):
        shape = array.dense_shape
        return tf.sparse.slice(
            array, tf.zeros_like(shape), tf.concat([[size], shape[1:]], 0))
    return array[:size]
