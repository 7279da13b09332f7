"""What BNP preconditions in a model: every trainable variable and its rule.

On your own model, built, before or after compiling it with BNP:

    keras_bnp.coverage.report(model)            # prints the table
    result = keras_bnp.coverage.coverage(model)  # its rows and shares

The command prints the table for the models this project checks (building
them on a CPU takes a while; `--models` picks some, `--brief` leaves out
the variables):

    python -m keras_bnp.coverage
    python -m keras_bnp.coverage --models vgg16 bilstm --brief

A kernel is a weight that multiplies a layer's inputs: every variable whose
name ends in `kernel` (`kernel`, `recurrent_kernel`, `depthwise_kernel`,
`pointwise_kernel`) and LoRA's factors of a kernel (`lora_kernel_a`, ...),
which take its place in training. Embedding tables (`embeddings`) are
counted apart: a lookup selects rows of them rather than multiplying.
"""

import argparse
import collections
import dataclasses
import math

import keras_bnp
from keras_bnp import _cli

# Above this share of a model's trainable kernel parameters left to the
# inner optimizer, the first `fit` with BNP warns.
WARNING_SHARE = 0.1
# The widest the path column gets; narrower when every path is shorter.
_PATH_WIDTH = 96
_CLASS_WIDTH = 20
_NO_VARIABLES = ("The model has no variables yet: build it first (give it an "
                 "`Input`, call it on data, or call `model.build(shape)`).")


class CoverageWarning(UserWarning):
    """Much of a model's kernel parameters is not preconditioned by BNP."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One variable of a model.

    `path`: the path of the layer that owns it in the model's saved files,
    with the layers of functional and sequential models by their names
    (`encoder/conv/kernel` for `layers/functional/layers/conv2d/kernel`),
    then the variable's name. `kind`: `"kernel"`, `"embeddings"` or
    `"other"` (see the module's docstring). `trained`: whether it is among
    the model's trainable variables (`False`: frozen). `rule`: what BNP
    does with its gradient.
    """

    path: str
    layer_class: str
    kind: str
    params: int
    preconditioned: bool
    trained: bool
    rule: str


@dataclasses.dataclass(frozen=True)
class Share:
    """`covered` of `total` (variables or parameters)."""

    covered: int
    total: int

    @property
    def fraction(self):
        """`covered / total`, or `None` when `total` is 0."""
        return self.covered / self.total if self.total else None

    def __str__(self):
        if not self.total:
            return "none"
        return f"{self.covered:,} of {self.total:,} ({self.fraction:.1%})"


@dataclasses.dataclass(frozen=True)
class Coverage:
    """The `Row`s of a model's variables (trainable and frozen), in the
    order of `model.weights`, and the shares BNP preconditions."""

    rows: tuple

    def _share(self, kind=None, count=False):
        rows = [row for row in self.rows if row.trained
                and kind in (None, row.kind)]
        size = len if count else _size
        return Share(size([row for row in rows if row.preconditioned]),
                     size(rows))

    @property
    def parameters(self):
        """Preconditioned of all trainable parameters."""
        return self._share()

    @property
    def kernels(self):
        """Preconditioned of the trainable kernel variables."""
        return self._share("kernel", count=True)

    @property
    def kernel_parameters(self):
        """Preconditioned of the trainable kernels' parameters."""
        return self._share("kernel")

    @property
    def embedding_parameters(self):
        """Preconditioned of the trainable embedding tables' parameters."""
        return self._share("embeddings")

    def uncovered_kernels(self):
        """`[(layer class, rule, parameters)]` of the trainable kernels BNP
        does not precondition, grouped, largest first."""
        groups = collections.Counter()
        for row in self.rows:
            if row.trained and row.kind == "kernel" and not row.preconditioned:
                groups[row.layer_class, row.rule] += row.params
        return [(*key, params) for key, params in groups.most_common()]

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"<Coverage: {self.line()}>"

    def line(self):
        """One line: the preconditioned shares."""
        if not self.rows:
            return f"BNP preconditions nothing. {_NO_VARIABLES}"
        kernels = (f"kernels: {self.kernels.covered} of "
                   f"{self.kernels.total} variables, "
                   f"{self.kernel_parameters} parameters" if self.kernels.total
                   else "no trainable kernels")
        return (f"BNP preconditions {self.parameters} trainable parameters; "
                f"{kernels}.")

    def warning(self):
        """The warning text when more than `WARNING_SHARE` of the trainable
        kernel parameters is not preconditioned, else `None`."""
        share = self.kernel_parameters
        if not share.total or share.total - share.covered <= (
                WARNING_SHARE * share.total):
            return None
        largest = "; ".join(
            f"{layer_class} {params:,} ({rule.split(': ', 1)[-1]})"
            for layer_class, rule, params in self.uncovered_kernels()[:3])
        return (
            f"BNP preconditions only {share} of this model's trainable "
            f"kernel parameters (it warns above {WARNING_SHARE:.0%} left "
            f"out). The largest left to the inner optimizer alone: "
            f"{largest}. BNP changes nothing there; to precondition them, "
            "use layer kinds BNP supports (README, 'Supported layers'), "
            "and compare with the inner optimizer alone. "
            "`keras_bnp.coverage.report(model)` lists every variable."
        )

    def table(self, variables=True):
        """The report: each variable's row (with `variables`), each layer
        class's totals, and the shares."""
        if not self.rows:
            return _NO_VARIABLES
        lines = []
        if variables:
            width = min(_PATH_WIDTH, max(len(row.path) for row in self.rows))
            lines.append(_columns("variable", "layer", "params", "rule",
                                  width))
            lines += [_columns(row.path, row.layer_class, row.params,
                               row.rule, width) for row in self.rows]
            lines.append("")
        lines.append(f"{'layer class':<28} {'variables':>9} {'params':>13}"
                     f" {'preconditioned':>15}")
        classes = collections.defaultdict(list)
        for row in self.rows:
            if row.trained:
                classes[row.layer_class].append(row)
        for layer_class, rows in sorted(
                classes.items(), key=lambda item: -_size(item[1])):
            share = Share(_size(r for r in rows if r.preconditioned),
                          _size(rows))
            lines.append(f"{shorten(layer_class, 28):<28} {len(rows):>9} "
                         f"{share.total:>13,} {share.fraction or 0:>15.1%}")
        frozen = [row for row in self.rows if not row.trained]
        lines += ["", self.line()]
        if self.embedding_parameters.total:
            lines.append(f"Embedding tables: {self.embedding_parameters} "
                         "parameters preconditioned.")
        if frozen:
            lines.append(f"Frozen (not trained, not counted): {len(frozen)} "
                         f"variables, {_size(frozen):,} parameters.")
        return "\n".join(lines)


def _size(rows):
    return sum(row.params for row in rows)


def _columns(path, layer_class, params, rule, width):
    """A line of the table, paths longer than `width` and long class names
    cut in the middle."""
    if isinstance(params, int):
        params = f"{params:,}"
    width = max(width, len("variable"))
    return (f"{shorten(path, width):<{width}} "
            f"{shorten(layer_class, _CLASS_WIDTH):<{_CLASS_WIDTH}} "
            f"{params:>11}  {rule}").rstrip()


def coverage(model):
    """The `Coverage` of a built Keras model: what BNP does with each of
    its variables, from the rules of `keras_bnp.rules`. A pure function of
    the model: it needs no BNP and changes nothing."""
    import keras

    from keras_bnp import registry
    from keras_bnp import rules

    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            "keras_bnp.coverage expects a Keras model (or layer), e.g. "
            "`keras_bnp.coverage.report(model)` on the model you compile "
            f"with BNP. Received: {type(model).__name__} {model!r:.80}")
    layers = model._flatten_layers(include_self=True, recursive=True)
    paths = _layer_paths(registry.saved_paths(model), layers)
    owners, created_trainable = {}, set()
    blocks = {}
    for layer in layers:
        for variable in layer._trainable_variables:
            created_trainable.add(id(variable))
        for variable in (layer._trainable_variables
                         + layer._non_trainable_variables):
            owners.setdefault(id(variable), layer)
        for block in rules.blocks(layer):
            for variable in block.variables:
                blocks.setdefault(id(variable), block)
    trained = {id(variable) for variable in model.trainable_variables}
    rows = []
    for variable in model.weights:
        if id(variable) not in trained and (
                id(variable) not in created_trainable):
            continue  # a state such as BatchNormalization's moving mean
        layer = owners.get(id(variable))
        block = blocks.get(id(variable))
        if block is not None:
            layer = block.layer
        path = paths.get(id(layer), "?") if layer else "?"
        if id(variable) not in trained:
            rule = "not trained: frozen"
        elif block is not None:
            rule = _block_rule(block, variable)
        else:
            rule = "inner optimizer only: " + _reason(layer)
        rows.append(Row(
            path="/".join(filter(None, [path, variable.name])),
            layer_class=type(layer).__name__ if layer else "?",
            kind=_kind(variable.name),
            params=math.prod(variable.shape),
            preconditioned=block is not None and id(variable) in trained,
            trained=id(variable) in trained,
            rule=rule,
        ))
    return Coverage(tuple(rows))


def report(model, print_fn=print):
    """Prints the coverage table of `model` and returns its `Coverage`
    (whose `str` is the table; `line()` and the shares are its summary)."""
    result = coverage(model)
    print_fn(result.table())
    return result


def shorten(text, width):
    """`text` cut to `width` characters in the middle. Of a path, it keeps
    the layer and the variable (the last two parts) whole, and the first
    part and as many more of the last as fit; where no whole part can go,
    it cuts characters, as few as it can of the layer and the variable."""
    if len(text) <= width:
        return text
    parts = text.split("/")
    head, middle, tail = parts[0], parts[1:-2], parts[-2:]
    if middle and len("/".join([head, "...", *tail])) <= width:
        while middle and len("/".join(
                [head, "...", middle[-1], *tail])) <= width:
            tail.insert(0, middle.pop())
        return "/".join([head, "...", *tail])
    keep = width - 3
    end = len("/".join(tail)) + (len(parts) > 2)
    end = end if end <= 3 * keep // 4 else keep - keep // 2
    return f"{text[:keep - end]}...{text[len(text) - end:]}"


def _layer_paths(saved_paths, layers):
    """`{id(layer): path}`: paths in the model's saved files
    (`registry.saved_paths`), where the layers of a functional or
    sequential model are `layers/<class>_<n>`, with those by their own
    names instead (`layers/dense_3` -> `head`)."""
    layers = {id(layer): layer for layer in layers}
    at = {path: layers[key] for key, path in saved_paths.items()
          if key in layers}
    paths = {}
    for key, path in saved_paths.items():
        parts = path.split("/")
        named = []
        for i, part in enumerate(parts):
            if part == "layers":
                continue
            layer = at.get("/".join(parts[:i + 1]))
            named.append(layer.name if i and parts[i - 1] == "layers"
                         and layer is not None else part)
        paths[key] = "/".join(named)
    return paths


def _kind(name):
    if name.endswith("kernel") or "lora_kernel" in name:
        return "kernel"
    return "embeddings" if "embeddings" in name else "other"


def _block_rule(block, variable):
    kind = next(t.__name__ for rule in _matching_rules(block.layer)
                for t in rule.layer_types if isinstance(block.layer, t))
    label = f"{kind} {block.name}" if block.name else kind
    text = ("centre + scale kernel and bias" if block.bias is not None
            else "scale kernel (no-bias rule)")
    if variable is block.kernel:
        count = block.features_count
        text += f", {count} feature{'s' if count != 1 else ''}"
        if block.groups > 1:
            text += f" in {block.groups} groups"
    return f"{label}: {text}"


def _matching_rules(layer):
    from keras_bnp import rules

    return [rule for rule in rules.RULES
            if isinstance(layer, rule.layer_types) and rule.handles(layer)]


def _reason(layer):
    """Why a trainable variable of `layer` is in none of its blocks."""
    from keras_bnp import rules

    if layer is None:
        return "owned by no layer"
    if getattr(layer, "lora_enabled", False):
        return "LoRA (trains low-rank factors, not the kernel itself)"
    matching = _matching_rules(layer)
    if len(matching) > 1:
        return (f"{type(layer).__name__} is a kind of several rules' "
                "layers, so its kernel layout is unknown")
    if matching:
        if getattr(layer, "quantization_mode", None):
            return "kernel quantized"
        if rules.blocks(layer):
            return "outside the rule's blocks"
        return matching[0].left_out(layer) or "kernel frozen"
    if any(_kind(v.name) == "kernel" for v in layer._trainable_variables):
        return "kind not supported"
    if any(_kind(v.name) == "embeddings"
           for v in layer._trainable_variables):
        return "embedding lookup"
    return "not a kernel"


def _applications(name, size=32):
    def build():
        import keras

        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=10)
    return build


def _keras_hub(name, **config):
    def build():
        import keras_hub

        return getattr(keras_hub.models, name)(**config)
    return build


def bilstm_classifier(vocabulary=20000, units=64):
    """keras-io's "Bidirectional LSTM on IMDB": an embedding, two
    bidirectional LSTMs and a Dense output."""
    import keras

    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, 128)(inputs)
    x = keras.layers.Bidirectional(
        keras.layers.LSTM(units, return_sequences=True))(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(units))(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="bilstm")


def vae(latent=2, filters=(32, 64)):
    """keras-io's "Variational AutoEncoder" on MNIST: a convolutional
    encoder to `(z_mean, z_log_var)`, a sample, and a Conv2DTranspose
    decoder, as one functional model of the two (its layers `encoder` and
    `decoder`). `filters`: the convolutions' (keras-io's by default)."""
    small, large = filters
    import keras

    class Sampling(keras.layers.Layer):
        """`z = z_mean + exp(z_log_var / 2) * epsilon`."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed = keras.random.SeedGenerator(0)

        def call(self, inputs):
            z_mean, z_log_var = inputs
            epsilon = keras.random.normal(keras.ops.shape(z_mean),
                                          seed=self.seed)
            return z_mean + keras.ops.exp(0.5 * z_log_var) * epsilon

    images = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(small, 3, 2, "same", activation="relu")(images)
    x = keras.layers.Conv2D(large, 3, 2, "same", activation="relu")(x)
    x = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(x))
    z_mean = keras.layers.Dense(latent, name="z_mean")(x)
    z_log_var = keras.layers.Dense(latent, name="z_log_var")(x)
    z = Sampling()([z_mean, z_log_var])
    encoder = keras.Model(images, [z_mean, z_log_var, z], name="encoder")
    codes = keras.Input((latent,))
    x = keras.layers.Dense(7 * 7 * large, activation="relu")(codes)
    x = keras.layers.Reshape((7, 7, large))(x)
    x = keras.layers.Conv2DTranspose(large, 3, 2, "same",
                                     activation="relu")(x)
    x = keras.layers.Conv2DTranspose(small, 3, 2, "same",
                                     activation="relu")(x)
    decoded = keras.layers.Conv2DTranspose(1, 3, padding="same",
                                           activation="sigmoid")(x)
    decoder = keras.Model(codes, decoded, name="decoder")
    return keras.Model(images, decoder(encoder(images)[2]), name="vae")


# name: (what it is, builder). The keras.applications models without
# weights, at 32x32 (Xception: its smallest, 71x71) with 10 classes; the
# keras-hub backbones in small configurations.
MODELS = {
    "vgg16": ("keras.applications.VGG16", _applications("VGG16")),
    "resnet50": ("keras.applications.ResNet50", _applications("ResNet50")),
    "densenet121": ("keras.applications.DenseNet121",
                    _applications("DenseNet121")),
    "convnext_tiny": ("keras.applications.ConvNeXtTiny",
                      _applications("ConvNeXtTiny")),
    "mobilenet_v2": ("keras.applications.MobileNetV2",
                     _applications("MobileNetV2")),
    "mobilenet_v3_small": ("keras.applications.MobileNetV3Small",
                           _applications("MobileNetV3Small")),
    "efficientnet_b0": ("keras.applications.EfficientNetB0",
                        _applications("EfficientNetB0")),
    "xception": ("keras.applications.Xception",
                 _applications("Xception", size=71)),
    "bert": ("keras_hub BertBackbone, 2 layers, width 128 (BERT-tiny)",
             _keras_hub("BertBackbone", vocabulary_size=30522, num_layers=2,
                        num_heads=2, hidden_dim=128, intermediate_dim=512)),
    "gpt2": ("keras_hub GPT2Backbone, 2 layers, width 128",
             _keras_hub("GPT2Backbone", vocabulary_size=50257, num_layers=2,
                        num_heads=2, hidden_dim=128, intermediate_dim=512,
                        max_sequence_length=1024)),
    "vit": ("keras_hub ViTBackbone, 32x32 images, patches 4, 2 layers, "
            "width 128",
            _keras_hub("ViTBackbone", image_shape=(32, 32, 3), patch_size=4,
                       num_layers=2, num_heads=2, hidden_dim=128,
                       mlp_dim=512)),
    "bilstm": ("keras-io's bidirectional LSTM text classifier",
               bilstm_classifier),
    "vae": ("keras-io's variational autoencoder", vae),
}
_KERAS_HUB = ("bert", "gpt2", "vit")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_bnp.coverage", description=__doc__,
        formatter_class=_cli.HelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=list(MODELS), metavar="MODEL",
                        help=f"models to build, of: {' '.join(MODELS)}")
    parser.add_argument("--brief", action="store_true",
                        help="leave out the table of variables")
    args = parser.parse_args(argv)
    keras_bnp._import_api()
    import importlib.util

    summary = []
    for name in args.models:
        title, build = MODELS[name]
        if name in _KERAS_HUB and importlib.util.find_spec(
                "keras_hub") is None:
            print(f"== {name}: skipped, keras_hub is not installed "
                  "(`pip install keras-hub`)\n")
            continue
        result = coverage(build())
        print(f"== {name}: {title}\n{result.table(not args.brief)}\n",
              flush=True)
        summary.append((name, result))
    print(f"{'model':<20}{'trainable':>13}{'preconditioned':>16}"
          f"{'kernel params':>15}{'kernels':>10}  largest left out")
    for name, result in summary:
        kernels = result.kernels
        left_out = result.uncovered_kernels()
        print(f"{name:<20}{result.parameters.total:>13,}"
              f"{_percent(result.parameters):>16}"
              f"{_percent(result.kernel_parameters):>15}"
              f"{f'{kernels.covered}/{kernels.total}':>10}  "
              f"{left_out[0][0] if left_out else '-'}")


def _percent(share):
    return "-" if share.fraction is None else f"{share.fraction:.1%}"


if __name__ == "__main__":
    main()
