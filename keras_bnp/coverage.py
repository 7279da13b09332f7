"""What BNP preconditions in a model: every trainable variable and its rule.

On your own model, built, before or after compiling it with BNP:

    keras_bnp.coverage.report(model)            # prints the table
    result = keras_bnp.coverage.coverage(model)  # its rows and shares

In a clone of the repository, `python -m benchmarks.coverage` prints it for
the models this project checks.

A kernel is a weight that multiplies a layer's inputs: every variable whose
name ends in `kernel` (`kernel`, `recurrent_kernel`, `depthwise_kernel`,
`pointwise_kernel`) and LoRA's factors of a kernel (`lora_kernel_a`, ...),
which take its place in training. Embedding tables (`embeddings`) are
counted apart: a lookup selects rows of them rather than multiplying.
"""

import collections
import dataclasses
import math

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
