"""Which layers BNP preconditions, and how their inputs are captured.

Supported: `Dense`, `Conv1D`, `Conv2D`, `Conv3D` (any `groups`, both data
formats). Every other layer's variables are still trained, by the inner
optimizer alone.
"""

import contextlib
import dataclasses

import keras
import tensorflow as tf
from keras.src.saving import saving_lib
from keras.src.saving.keras_saveable import KerasSaveable
from keras.src.utils import naming

SUPPORTED_LAYERS = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
# Not subclasses of the above in Keras 3, but their kernels have other
# layouts, so a user subclass mixing them in must never be picked.
EXCLUDED_LAYERS = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.EinsumDense,
)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What BNP needs to know of a supported, built layer."""

    layer: keras.layers.Layer
    kernel: keras.Variable
    bias: keras.Variable | None
    channel_axis: int
    groups: int

    @property
    def in_channels(self):
        return self.kernel.shape[-2] * self.groups


def is_supported(layer):
    """Whether `layer` is a layer kind BNP preconditions (built or not)."""
    return (
        isinstance(layer, SUPPORTED_LAYERS)
        and not isinstance(layer, EXCLUDED_LAYERS)
        # LoRA trains low-rank factors, not the kernel the statistics fit.
        and not getattr(layer, "lora_enabled", False)
        and layer.trainable
    )


def spec(layer):
    """The `LayerSpec` of a supported layer, or `None` while it is unbuilt
    or its kernel is not trainable (e.g. frozen or quantized)."""
    if not layer.built:
        return None
    # The variables themselves: inside a mixed-precision call, attributes
    # such as `layer.kernel` can be autocast tensors.
    weights = {weight.name: weight for weight in layer.trainable_weights}
    kernel = weights.get("kernel")
    if kernel is None:
        return None
    data_format = getattr(layer, "data_format", "channels_last")
    return LayerSpec(
        layer=layer,
        kernel=kernel,
        bias=weights.get("bias"),
        channel_axis=1 if data_format == "channels_first" else -1,
        groups=getattr(layer, "groups", 1),
    )


def supported_layers(model):
    """Supported layers of `model` and its nested sub-models, each once."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if is_supported(layer)
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
        for attribute, child in saving_lib._walk_saveable(saveable):
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
                if isinstance(item, KerasSaveable):
                    name = naming.to_snake_case(type(item).__name__)
                elif isinstance(item, (list, dict, tuple)):
                    name = "container"
                else:
                    continue
                name = saving_lib._get_unique_name(name, used)
                visit_child(item, f"{path}/{name}", containers)

    visit(model, "")
    return paths


@contextlib.contextmanager
def capture_inputs(layers, on_first_call):
    """Records the first positional input of every call of `layers`.

    Yields a dict `{layer: [input, ...]}`; a layer called several times (a
    shared layer) has one entry per call. `on_first_call(layer)` runs the
    first time each layer is called, after Keras has built it. Calls in
    another graph than the one entered in (Keras' symbolic shape inference
    while it builds a model) are not recorded.
    """
    captured = {layer: [] for layer in layers}
    graph = tf.compat.v1.get_default_graph()

    def wrap(layer, call):
        def recording_call(*args, **kwargs):
            if tf.compat.v1.get_default_graph() is graph:
                if not captured[layer]:
                    on_first_call(layer)
                captured[layer].append(args[0] if args else kwargs["inputs"])
            return call(*args, **kwargs)

        return recording_call

    with _patched_calls(layers, wrap):
        yield captured


@contextlib.contextmanager
def intercept_outputs(layers, on_output):
    """Replaces the output of every call of `layers` by `on_output(layer,
    output)`."""

    def wrap(layer, call):
        return lambda *args, **kwargs: on_output(layer, call(*args, **kwargs))

    with _patched_calls(layers, wrap):
        yield


@contextlib.contextmanager
def _patched_calls(layers, wrap):
    """Patches each layer's `call` on the instance only with `wrap(layer,
    call)`, and restores it on exit."""
    try:
        for layer in layers:
            layer.__dict__["call"] = wrap(layer, layer.call)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("call", None)
