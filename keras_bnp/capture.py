"""Recording what BNP needs during a training step: the inputs of the
model's preconditioned layers (`capture_step`), and the warnings and errors
about calls it cannot record."""

import contextlib
import warnings

from keras_bnp import registry
from keras_bnp import statistics

_MISSING_CAPTURE = (
    "BNP needs the inputs of the model's preconditioned layers (Dense, "
    "convolutions, attention, recurrent, ...), which only a "
    "model with `keras_bnp.BNPMixin` records. Build the model as "
    "`keras_bnp.BNPModel(inputs, outputs)` or "
    "`keras_bnp.BNPSequential([...])`, or put `BNPMixin` first in your "
    "class: `class Net(keras_bnp.BNPMixin, keras.Model)`. In a custom "
    "training loop, or with a BNP that the model does not hold as its "
    "optimizer or as an attribute, run the forward pass and "
    "`apply_gradients` inside `with optimizer.capture(model):`."
)

_CUSTOM_STEP = (
    "Model '{name}' ({cls}) has BNPMixin but overrides `train_step`, so "
    "BNPMixin's training step, which records the inputs of the model's "
    "preconditioned layers for BNP, does not run. Run the forward pass and "
    "`apply_gradients` of your `train_step` inside "
    "`with self.bnp_capture(sample_weight):` (it records for the model's "
    "optimizer and every optimizer the model holds as an attribute, such "
    "as a GAN's `d_optimizer`, that is a BNP; `sample_weight` may be "
    "`None`), e.g.\n\n"
    "    def train_step(self, data):\n"
    "        x, y, sample_weight = "
    "keras.utils.unpack_x_y_sample_weight(data)\n"
    "        with self.bnp_capture(sample_weight):\n"
    "            with tf.GradientTape() as tape:\n"
    "                loss = ...  # the forward pass\n"
    "            grads = tape.gradient(loss, self.trainable_weights)\n"
    "            self.optimizer.apply_gradients(\n"
    "                zip(grads, self.trainable_weights))\n"
    "        ...\n\n"
    "or return `super().train_step(data)` from it."
)

# Per kind of graph a layer can be called in inside the training step's
# (see `registry.capture_inputs`): how to name it, and how to call the
# layer outside it.
_NESTED = {
    "loop": (
        "a loop (`keras.ops.scan`, `fori_loop`, `while_loop`, `map`, "
        "`tf.while_loop`)",
        "call the layer outside the loop: apply it to all steps at once "
        "(stacked along the batch axis) when a step does not need the "
        "previous one's output, or unroll a loop of fixed length in "
        "Python.",
    ),
    "cond": (
        "a `cond` branch (`keras.ops.cond` or `tf.cond` on a tensor)",
        "call the layer outside the `cond`, e.g. compute both branches "
        "and choose with `keras.ops.where`.",
    ),
    "vectorized_map": (
        "`keras.ops.vectorized_map` or `tf.vectorized_map`, whose function "
        "is traced for a single element",
        "call the layer on the whole batch outside `vectorized_map` (a "
        "layer maps every example already).",
    ),
    "function": (
        "a nested `tf.function`",
        "call the layer outside the nested `tf.function` (`fit` compiles "
        "the training step already).",
    ),
}


def missing_capture(model):
    """The error message for a step that recorded no layer inputs, for the
    model BNP last tracked (`None` if none)."""
    # `BNPMixin` by name: `keras_bnp.model` imports this module.
    mixin = next((base for base in type(model).__mro__
                  if base.__module__ == "keras_bnp.model"
                  and base.__name__ == "BNPMixin"), None)
    if mixin is not None and type(model).train_step is not mixin.train_step:
        return _CUSTOM_STEP.format(name=model.name, cls=type(model).__name__)
    return _MISSING_CAPTURE


@contextlib.contextmanager
def capture_step(model, bnps, sample_weight=None, regularized=False):
    """Records the inputs of `model`'s supported layers for one step of
    each of `bnps` (see `BNP.capture`)."""
    layers = registry.supported_layers(model)
    for bnp in bnps:
        bnp._track(model, layers)

    def on_first_call(layer):
        # A deferred-build layer gets its statistics on its first call.
        for bnp in bnps:
            bnp._track(model, layers)

    nested = {}  # {layer: {construct, ...}}, see `called_layers`

    def on_nested_call(layer, construct):
        nested.setdefault(layer, set()).add(construct)

    weights = statistics.position_weights(sample_weight)
    with registry.capture_inputs(layers, on_first_call,
                                 on_nested_call) as captured:
        for bnp in bnps:
            bnp.__dict__.update(_step_inputs=captured, _step_nested=nested,
                                _step_weights=weights,
                                _step_regularized=regularized)
        try:
            yield
        finally:
            for bnp in bnps:
                bnp.__dict__.update(_step_inputs=None, _step_weights=None,
                                    _step_regularized=False)


def called_layers(step_inputs, nested):
    """The captured layers that were called in the step's own graph;
    warns about the others, and about calls in graphs nested in it
    (`nested`: `{layer: constructs}`, see `registry.capture_inputs`)."""
    for layer, inputs in step_inputs.items():
        where = " or ".join(_NESTED[c][0] for c in sorted(
            nested.get(layer, ())))
        fixes = " ".join(_NESTED[c][1] for c in sorted(
            nested.get(layer, ())))
        layer_text = f"Layer '{layer.name}' ({type(layer).__name__})"
        if where and inputs:
            message = (
                f"{layer_text} is called in this training step both "
                f"inside {where} and outside ({len(inputs)} "
                "call(s)). BNP's statistics of its input pool only the "
                "calls outside, while its gradient sums over all "
                f"calls. To pool every call, {fixes}")
        elif where:
            message = (
                f"{layer_text} is called in this training step only "
                f"inside {where}, whose tensors BNP cannot read, so BNP "
                "has no statistics of its input and leaves its "
                f"gradients unpreconditioned. To precondition it, "
                f"{fixes}")
        elif not inputs:
            message = (
                f"{layer_text} was not called in this training step, "
                "so BNP has no statistics of its input and leaves its "
                "gradients unpreconditioned. This happens when a model "
                "uses a layer's weights without calling the layer; "
                "call the layer, or set `layer.trainable = False` if "
                "it is not trained.")
        else:
            continue
        warnings.warn(message, stacklevel=3)
    return [layer for layer, inputs in step_inputs.items() if inputs]

