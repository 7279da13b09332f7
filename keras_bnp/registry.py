"""The model's preconditioned layers, their places in saved files, and the
capture of what their calls see (`rules` says what each kind needs)."""

import contextlib
import sys

import keras
import tensorflow as tf

from keras_bnp import _compat
from keras_bnp import rules


def supported_layers(model):
    """Supported layers of `model` and its nested sub-models, each once."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if rules.rule_for(layer) is not None
    ]


def saved_paths(model):
    """`{id(layer): path}` of `model`'s layers (and `model` itself, at
    `""`): where Keras' saved files (`.keras`, `.weights.h5`) store each
    layer's weights, e.g. `"encoder/dense"` for an attribute of a subclassed
    model, `"layers/dense_1"` for the second Dense of a functional model.

    Keras restores a layer's weights from this path, so it names the same
    layer in the saving and the loading process, whatever order the layers
    were created in; layer names, which Keras numbers in creation order,
    need not. The walk is Keras' own (`saving_lib`).
    """
    paths = {}

    def visit(saveable, path):
        if id(saveable) in paths:
            return
        paths[id(saveable)] = path
        for attribute, child in _compat.walk_saveable(saveable):
            visit_child(child, f"{path}/{attribute}".lstrip("/"), set())

    def visit_child(child, path, containers):
        if isinstance(child, keras.layers.Layer):  # only layers hold layers
            visit(child, path)
        elif isinstance(child, (list, dict, tuple)):
            if id(child) in containers:
                return
            containers.add(id(child))
            used = {}
            for item in (child.values() if isinstance(child, dict) else child):
                if isinstance(item, _compat.KerasSaveable):
                    name = _compat.snake_case(type(item).__name__)
                elif isinstance(item, (list, dict, tuple)):
                    name = "container"
                else:
                    continue
                name = _compat.unique_name(name, used)
                visit_child(item, f"{path}/{name}", containers)

    visit(model, "")
    return paths


@contextlib.contextmanager
def capture_inputs(layers, on_first_call, on_nested_call):
    """Records what every call of `layers` gives their blocks' statistics
    (`Rule.record`: normally the first positional input).

    Yields a dict `{layer: [record, ...]}`; a layer called several times (a
    shared layer) has one entry per call. `on_first_call(layer)` runs the
    first time each layer is called in the graph entered in, after Keras
    has built it.

    Only calls in the graph the capture was entered in are recorded: a
    tensor of a graph nested in it (a loop body, a `cond` branch, a nested
    `tf.function`) cannot be used outside, and one of `vectorized_map`'s
    function holds a single element. Such a call runs
    `on_nested_call(layer, construct)` instead, `construct` naming what it
    is nested in (see `_nesting`). Calls for Keras' symbolic shape
    inference, and in unrelated graphs, are neither.
    """
    captured = {layer: [] for layer in layers}
    called = set()
    graph = tf.compat.v1.get_default_graph()

    def wrap(layer, call):
        rule = rules.rule_for(layer)

        def recording_call(*args, **kwargs):
            current = tf.compat.v1.get_default_graph()
            construct = _nesting(current, graph)
            if construct is not None:
                on_nested_call(layer, construct)
            if current is not graph:
                return call(*args, **kwargs)
            if layer not in called:
                called.add(layer)
                on_first_call(layer)
            if construct is not None:
                return call(*args, **kwargs)
            return rule.record(layer, call, args, kwargs, captured[layer])

        return recording_call

    with patched_calls(layers, wrap):
        yield captured


# TensorFlow's graph classes for control flow, by what builds them.
_CONSTRUCTS = {
    "WhileBodyFuncGraph": "loop",  # tf.while_loop, keras.ops.scan, ...
    "WhileCondFuncGraph": "loop",
    "CondBranchFuncGraph": "cond",  # tf.cond, keras.ops.cond on a tensor
}


def _nesting(current, graph):
    """What a call in graph `current` is nested in inside `graph`:
    `"vectorized_map"`, or, for the outermost graph between them, `"loop"`,
    `"cond"` or `"function"` (a nested `tf.function`); `None` for a call in
    `graph` itself, in an unrelated graph, or for Keras' symbolic shape
    inference."""
    if _compat.in_symbolic_scope():
        return None
    if _in_vectorized_map():
        return "vectorized_map"
    construct = None
    while current is not graph:
        if current is None:
            return None
        construct = _CONSTRUCTS.get(type(current).__name__, "function")
        current = getattr(current, "outer_graph", None)
    return construct


def _in_vectorized_map():
    """Whether TensorFlow's `pfor` (`tf.vectorized_map`,
    `keras.ops.vectorized_map`) is tracing its function: it calls it once,
    in the current graph, for a placeholder element index (element 0 when
    run), and vectorizes the ops afterwards; a tensor of that call holds
    one element, not the batch."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _compat.PFOR_CODE:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def patched_calls(layers, wrap):
    """Patches each layer's `call` on the instance only with `wrap(layer,
    call)`, and restores on exit what the instance had (a user's own
    `layer.call = ...` included)."""
    missing = object()
    saved = [(layer, layer.__dict__.get("call", missing)) for layer in layers]
    try:
        for layer in layers:
            layer.__dict__["call"] = wrap(layer, layer.call)
        yield
    finally:
        for layer, call in saved:
            if call is missing:
                layer.__dict__.pop("call", None)
            else:
                layer.__dict__["call"] = call
