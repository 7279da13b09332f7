"""Data-dependent initial scaling of the preconditioned layers' kernels.

BNP acts on gradients only, so it inherits the forward signal's scale from
the initialization. With Keras' default (Glorot) initializers the inputs of
deep ReLU layers shrink by a factor of 2 to 3 or more per layer; BatchNorm
repairs that at every step, BNP cannot. Scaling each layer once, before
training, so that its pre-activations have unit variance on a batch of
data (LSUV: Mishkin & Matas, "All you need is a good init", ICLR 2016,
measured before the activation and centred per unit, without its
orthogonal start) fixes it and changes only weights, so the model keeps
its architecture and its inference cost.

Which layers are scaled is read off the model's graph (`plan`), never
guessed from the order of calls: a layer is scaled only when every
operation between the model's inputs and it, and between it and the next
scaled layer or the model's outputs, is one whose effect of a change of
scale is known (`_UNDERSTOOD`).
"""

import collections
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_bnp import _compat
from keras_bnp import registry
from keras_bnp import rules

# How many examples of `fit`'s arrays the initial scaling measures, and the
# fewest (with a weight above 0) it measures at all.
EXAMPLES = 256
MIN_EXAMPLES = 16
_SQRT_FLOAT32_MAX = float(np.sqrt(np.finfo(np.float32).max))

# Layers through which a change of scale of an input is harmless to the
# scaling: elementwise activations (which the next scaled layer's unit
# pre-activations are made for), noise and dropout, rearrangements,
# pooling, sums and maxima of their inputs, and fixed input preprocessing.
# Exact types only: a subclass may compute anything.
_UNDERSTOOD = tuple(getattr(keras.layers, name) for name in (
    "InputLayer", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax",
    "PReLU", "Identity", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "GaussianDropout", "GaussianNoise", "AlphaDropout",
    "Flatten", "Reshape", "Permute", "RepeatVector", "ZeroPadding1D",
    "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D",
    "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
    "AveragePooling2D", "AveragePooling3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "Add", "Subtract",
    "Average", "Maximum", "Minimum", "Concatenate", "Rescaling",
    "Normalization",
))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The layers the scaling may scale, in call order, or why none."""

    layers: tuple
    reason: str = ""


def plan(model):
    """Which of `model`'s layers `scale_to_unit_variance` scales.

    A layer is scaled when it is linear in its kernel and bias (Dense and
    the convolutions, called through Keras' own `call`), and every
    operation upstream of it, and downstream up to the next scaled layer or
    the model's outputs, is an `_UNDERSTOOD` layer, a scaled layer, or a
    layer linear in its weights whose output feeds only such operations. So
    nothing is scaled behind, or in front of, a layer whose behaviour under
    a change of scale is unknown: recurrent layers, attention (however it is
    built: a `keras.ops` call in a functional graph is such an operation),
    normalization layers, nested models and any layer without a BNP rule. A
    shared layer is scaled only if every call of it qualifies.

    Only a `Functional` or `Sequential` model shows its graph; a subclassed
    model gets an empty plan with the reason.
    """
    graph = model._functional if isinstance(model, keras.Sequential) else model
    if graph is None:
        return Plan((), "the Sequential model is not built")
    if not isinstance(graph, _compat.Functional):
        return Plan((), (
            f"{type(model).__name__} is a subclassed model, whose graph "
            "between layers is not visible"))
    nodes = [node for depth in sorted(graph._nodes_by_depth, reverse=True)
             for node in graph._nodes_by_depth[depth]]
    clean = {id(tensor) for tensor in graph.inputs}
    calls = {}  # id(layer) -> [whether each call's inputs are clean]
    for node in nodes:
        operation = node.operation
        inputs_clean = all(id(t) in clean for t in node.input_tensors)
        linear = _linear(operation)
        if linear:
            calls.setdefault(id(operation), []).append(inputs_clean)
        if node.is_input or (inputs_clean and (
                linear or type(operation) in _UNDERSTOOD)):
            clean.update(id(tensor) for tensor in node.outputs)
    scaled = {key for key, flags in calls.items() if all(flags)}
    consumers = {}
    for node in nodes:
        for tensor in node.input_tensors:
            consumers.setdefault(id(tensor), []).append(node)
    changed = True
    while changed:  # drop layers whose scale reaches an unknown operation
        changed = False
        for node in nodes:
            if (id(node.operation) in scaled
                    and _reaches_unknown(node, consumers, scaled)):
                scaled.discard(id(node.operation))
                changed = True
    layers, seen = [], set()
    for node in nodes:
        if id(node.operation) in scaled and id(node.operation) not in seen:
            seen.add(id(node.operation))
            layers.append(node.operation)
    reason = "" if layers else (
        "no layer is linear with only known operations around it (a "
        "normalization, recurrent or attention layer, a nested model or an "
        "operation without a BNP rule sits next to each)")
    return Plan(tuple(layers), reason)


def _linear(operation):
    """Whether `operation` is a layer whose output, before its activation,
    is linear in the variables its rule scales (Keras' own `call`, not
    replaced on the class or the instance)."""
    rule = rules.rule_for(operation) if isinstance(
        operation, keras.layers.Layer) else None
    return (rule is not None and rule.scaled and bool(rules.blocks(operation))
            and "call" not in operation.__dict__
            and any(type(operation).call is kind.call
                    for kind in rule.layer_types))


def _reaches_unknown(node, consumers, scaled):
    """Whether a change of scale of `node`'s outputs reaches an operation
    that is not understood before a scaled layer absorbs it."""
    stack, seen = list(node.outputs), set()
    while stack:
        tensor = stack.pop()
        for consumer in consumers.get(id(tensor), []):
            if id(consumer) in seen:
                continue
            seen.add(id(consumer))
            operation = consumer.operation
            if id(operation) in scaled:
                continue
            if not (_linear(operation) or type(operation) in _UNDERSTOOD):
                return True
            stack.extend(consumer.outputs)
    return False


def scale_to_unit_variance(model, inputs, target_variance=1.0,
                           sample_weight=None):
    """Scales the kernel and bias of each layer of `plan(model)` so that,
    on `inputs`, its pre-activations (the output before the layer's own
    activation) have variance `target_variance`, each unit's mean within
    one of its standard deviations of 0.

    One forward pass (in inference mode) visits the layers in call order;
    each layer is scaled as soon as its output is computed, so every later
    layer is measured on the inputs it will see after the scaling. Per
    output unit (channel), the mean and the variance are taken over the
    examples and positions, each example weighted by `sample_weight` (its
    mean over any further axes). The kernel is multiplied by `s =
    sqrt(target_variance / v)`, `v` the mean of the units' variances, so
    the ratios between units are kept. The bias becomes `s * (bias -
    shift)`, `shift = mean - clip(mean, -std, std)` per unit: a unit whose
    mean exceeds its spread (one after a raw column such as a year, whose
    ReLU would be always on or always off) is moved to the edge of that
    range, the others keep their means (centring them all cost the deep
    MLP of `docs/defaults.md` 3 to 4 points); a layer without a bias keeps
    its means. A layer whose pre-activations are constant or not finite is
    left as it is.

    Args:
        model: A `Functional` or `Sequential` Keras model (built on
            `inputs` first if it is not).
        inputs: A batch the model accepts (a few hundred examples is enough).
        target_variance: Float > 0. Defaults to `1.0`.
        sample_weight: Optional array of shape `(batch,)` (or with more
            axes, averaged), the weight of each example. Defaults to equal
            weights.

    Returns:
        A dict `{layer name: scale}` of the factors applied, in call order
        (a layer left as it is has none); layers of the same name are
        named by their `path`.
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
    inputs = as_tensors(inputs)
    if not model.built:
        # Building may trace the model symbolically; keep that out of the
        # measured pass, and let Keras record the build.
        model(inputs, training=False)
    layers = plan(model)
    if not layers.layers:
        raise ValueError(
            "scale_to_unit_variance found no layer to scale in model "
            f"'{model.name}': {layers.reason}.")
    return _scale_layers(model, layers.layers, inputs,
                         _example_weights(sample_weight, inputs),
                         target_variance)


def _scale_layers(model, layers, inputs, weights, target_variance=1.0):
    """`scale_to_unit_variance` of `layers` (a non-empty `plan`) on tensor
    `inputs` with example `weights`."""
    if not (bool(tf.reduce_all(weights >= 0))
            and float(tf.reduce_sum(weights)) > 0):
        raise ValueError(
            "Argument `sample_weight` must be >= 0 and not all 0. Received: "
            f"sample_weight with sum {float(tf.reduce_sum(weights))} and "
            f"minimum {float(tf.reduce_min(weights))}")
    names = _names(registry.supported_layers(model))
    scales = {}

    def scaled_call(layer, call):
        def measured(*args, **kwargs):
            activation = layer.activation
            layer.activation = keras.activations.linear
            try:
                outputs = call(*args, **kwargs)
            finally:
                layer.activation = activation
            if names(layer) not in scales:  # a shared layer: its first call
                outputs = _scale(layer, outputs, weights, target_variance,
                                 scales, names(layer))
            return activation(outputs)

        return measured

    with registry.patched_calls(layers, scaled_call):
        model(inputs, training=False)
    return scales


def initial_scaling(model, x, sample_weight=None):
    """`BNP(initial_scaling=True)`'s step before a fresh optimizer's first:
    `scale_to_unit_variance` when it is safe, else nothing. Returns the
    factors applied and the one line that says what was done or why not
    (the weights were trained or loaded, too few examples have a weight
    above 0, the examples are not finite, or `plan` is empty)."""
    x = as_tensors(x)
    weights = _example_weights(sample_weight, x)
    count = int(tf.reduce_sum(tf.cast(weights > 0, tf.int32)))
    layers = plan(model)
    reason = layers.reason or freshness(layers.layers)
    if reason is None and not all(map(_finite, keras.tree.flatten(x))):
        reason = ("the measured examples contain NaN or Inf, or values "
                  "whose squares overflow float32")
    if reason is None and count < MIN_EXAMPLES:
        reason = (f"the first batch has {count} examples with a weight "
                  f"above 0, fewer than the {MIN_EXAMPLES} it needs; call "
                  "keras_bnp.scale_to_unit_variance(model, x) on more "
                  "examples before fit")
    scales = {}
    if reason is None:
        scales = _scale_layers(model, layers.layers, x, weights)
        if not scales:
            reason = ("no layer's pre-activations vary on the measured "
                      "examples")
    if reason is not None:
        return scales, f"BNP: initial scaling skipped: {reason}."
    return scales, (
        f"BNP: scaled {len(scales)} layers so that their pre-activations "
        f"have variance 1 on {count} training examples (kernel factors "
        f"{min(scales.values()):.3g} to {max(scales.values()):.3g}); pass "
        "BNP(initial_scaling=False) to keep the weights as they are.")


def as_tensors(inputs):
    """`inputs` as `fit` passes them to the model: tensors (a Functional
    model of one input, built from a list, warns about a NumPy array)."""
    return keras.tree.map_structure(
        lambda a: a if isinstance(a, (tf.Tensor, tf.SparseTensor,
                                      tf.RaggedTensor))
        else tf.convert_to_tensor(a), inputs)


def _finite(tensor):
    """Whether a float tensor's values are all finite and their squares
    too in float32, as BNP's statistics require (others: True)."""
    if isinstance(tensor, (tf.SparseTensor, tf.RaggedTensor)):
        tensor = tensor.values
    return not tensor.dtype.is_floating or bool(tf.reduce_all(
        tf.abs(tf.cast(tensor, tf.float64)) < _SQRT_FLOAT32_MAX))


def _scale(layer, outputs, weights, target_variance, scales, name):
    """Scales `layer`'s variables to give `outputs` (its pre-activations)
    unit variance per the docstring above; returns the new outputs."""
    axis = rules.channel_axis(layer) % outputs.shape.rank
    values = tf.cast(outputs, tf.float64)
    shape = [1] * values.shape.rank
    shape[0] = -1
    w = tf.broadcast_to(tf.reshape(weights, shape), tf.shape(values))
    axes = [a for a in range(values.shape.rank) if a != axis]
    total = tf.reduce_sum(w, axes)
    mean = tf.reduce_sum(w * values, axes) / total
    keep = [1] * values.shape.rank
    keep[axis] = -1
    centred = values - tf.reshape(mean, keep)
    unit_variance = tf.reduce_sum(w * centred ** 2, axes) / total
    variance = float(tf.reduce_mean(unit_variance))
    if np.isfinite(variance) and variance > 0:
        scale = float(np.sqrt(target_variance / variance))
        variables = rules.rule_for(layer).scaled_variables(layer)
        shift = tf.zeros_like(mean)
        if any(v.name == "bias" for v in variables):
            # Each unit's mean, moved to within one of its standard
            # deviations of 0.
            std = tf.sqrt(unit_variance)
            shift = mean - tf.clip_by_value(mean, -std, std)
        for variable in variables:
            if variable.name == "bias":
                variable.assign(tf.cast(
                    scale * (tf.cast(variable, tf.float64) - shift),
                    variable.dtype))
            else:
                variable.assign(variable * scale)
        outputs = tf.cast((values - tf.reshape(shift, keep)) * scale,
                          outputs.dtype)
        scales[name] = scale
    return outputs


def _example_weights(sample_weight, inputs):
    """Float64 weights `(batch,)`: `sample_weight` averaged over its
    non-batch axes, or ones for the examples of `inputs` (tensors)."""
    if sample_weight is None:
        first = keras.tree.flatten(inputs)[0]
        batch = (first.dense_shape[0] if isinstance(first, tf.SparseTensor)
                 else tf.shape(first)[0])
        return tf.ones([batch], tf.float64)
    weights = tf.cast(tf.convert_to_tensor(sample_weight), tf.float64)
    if weights.shape.rank > 1:
        weights = tf.reduce_mean(weights, list(range(1, weights.shape.rank)))
    return tf.reshape(weights, [-1])


def _names(layers):
    """`name(layer)`: its name, or its path where names repeat (keras-hub's
    "query", ...)."""
    counts = collections.Counter(layer.name for layer in layers)
    return lambda layer: layer.name if counts[layer.name] == 1 else layer.path


def fit_batch(x, y, sample_weight, class_weight):
    """The first `EXAMPLES` examples of `fit`'s arrays, as `(inputs,
    weights)`, or `None` for data read batch by batch (a dataset, a
    `PyDataset`, a generator): the first training step's batch is used
    then."""
    leaves = keras.tree.flatten(x)
    if not leaves or not all(hasattr(leaf, "shape") for leaf in leaves) or (
            isinstance(x, (tf.data.Dataset, keras.utils.PyDataset))):
        return None
    inputs = keras.tree.map_structure(lambda a: _head(a, EXAMPLES), x)
    if sample_weight is None and class_weight is not None:
        sample_weight = _compat.class_weight_to_sample_weights(
            keras.tree.map_structure(lambda a: _head(a, EXAMPLES), y),
            class_weight)
    if sample_weight is not None:
        sample_weight = _head(sample_weight, EXAMPLES)
    return inputs, sample_weight


def _head(array, size):
    if isinstance(array, tf.SparseTensor):
        shape = array.dense_shape
        return tf.sparse.slice(
            array, tf.zeros_like(shape), tf.concat([[size], shape[1:]], 0))
    return array[:size]


def freshness(layers):
    """Why the weights of `layers` may have been trained or loaded (a
    sentence), or `None` when each bias is still its initializer's
    constant (and at least one layer has such a bias to tell by)."""
    told = False
    for layer in layers:
        bias = getattr(layer, "bias", None)
        initial = _constant(getattr(layer, "bias_initializer", None))
        if bias is None or initial is None:
            continue
        if not bool(tf.reduce_all(tf.convert_to_tensor(bias) == initial)):
            return (f"the bias of layer '{layer.name}' is not at its "
                    "initial value, so the weights were trained or loaded")
        told = True
    if not told:
        return ("no scaled layer has a bias with a constant initializer, so "
                "it cannot tell whether the weights were trained or loaded")
    return None


def _constant(initializer):
    if isinstance(initializer, keras.initializers.Zeros):
        return 0.0
    if isinstance(initializer, keras.initializers.Ones):
        return 1.0
    if isinstance(initializer, keras.initializers.Constant):
        return float(initializer.value)
    return None
