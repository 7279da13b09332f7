"""Per-layer rules: what BNP preconditions in each kind of layer.

A `Rule` turns a built layer into `Block`s, one per preconditioned kernel
(the block-per-layer-kind design of kfac-jax). A block names:
- the tensor whose per-channel statistics it keeps (`Block.features`: by
  default the layer's input, pooled over every axis but the channel axis);
- how its kernel's gradient lays out as the canonical `(*spatial,
  features // groups, units)` that `preconditioner.precondition` takes,
  and back (`Block.gather`, `Block.scatter`);
- the bias its centring moves into, if any.

One module per layer family: `dense`, `convolution`, `einsum` (and so
attention), `recurrent`; `base` holds `Block` and `Rule`. A layer of your
own gets a rule with `register_rule`. The derivations are in
`docs/layer_rules.md`.
"""

from keras_bnp.rules.base import Block
from keras_bnp.rules.base import Rule
from keras_bnp.rules.base import channel_axis
from keras_bnp.rules.base import trainable
from keras_bnp.rules.convolution import ConvRule
from keras_bnp.rules.convolution import ConvTransposeRule
from keras_bnp.rules.convolution import DepthwiseRule
from keras_bnp.rules.convolution import SeparableRule
from keras_bnp.rules.dense import DenseRule
from keras_bnp.rules.einsum import EinsumDenseRule
from keras_bnp.rules.einsum import MultiHeadAttentionRule
from keras_bnp.rules.recurrent import RecurrentRule

__all__ = [
    "Block", "Rule", "RULES", "register_rule", "rule_for", "blocks",
    "DenseRule", "ConvRule", "DepthwiseRule", "SeparableRule",
    "ConvTransposeRule", "EinsumDenseRule", "MultiHeadAttentionRule",
    "RecurrentRule", "channel_axis", "trainable",
]

# Keras' layer kinds. `register_rule` adds yours.
RULES = [DenseRule(), ConvRule(), DepthwiseRule(), SeparableRule(),
         ConvTransposeRule(), EinsumDenseRule(), MultiHeadAttentionRule(),
         RecurrentRule()]
_BUILT_IN = len(RULES)


def register_rule(rule):
    """Teaches BNP a layer kind: `rule`, a `Rule` instance, precondition
    the layers of its `layer_types` from now on (in every model, also for
    `keras_bnp.coverage`). A registered rule takes precedence over the
    built-in ones and over rules registered before it, so a rule for your
    subclass of `Dense` replaces `Dense`'s for that subclass. Returns
    `rule`. See README, "Your own layers", for an example."""
    if not isinstance(rule, Rule):
        raise TypeError(
            "`register_rule` takes an instance of a `keras_bnp.rules.Rule` "
            f"subclass, e.g. `register_rule(MyRule())`. Received: {rule!r}")
    if not rule.layer_types:
        raise ValueError(
            f"{type(rule).__name__}.layer_types is empty: set it to the "
            "layer classes the rule handles, e.g. `layer_types = "
            "(MyLayer,)`.")
    RULES.append(rule)
    return rule


def rule_for(layer):
    """The rule of `layer`'s kind, or `None` when BNP does not precondition
    it (another kind, one its rule does not handle, not trainable, or
    LoRA-enabled: LoRA trains low-rank factors, not the kernel the
    statistics fit). The last registered rule that handles it wins;
    among the built-in rules, a layer that is an instance of several
    rules' kinds (a user class mixing them) has none: its kernel's layout
    is unknown."""
    if not layer.trainable or getattr(layer, "lora_enabled", False):
        return None

    def handling(candidates):
        return [rule for rule in candidates
                if isinstance(layer, rule.layer_types) and rule.handles(layer)]

    registered = handling(RULES[_BUILT_IN:])
    if registered:
        return registered[-1]
    built_in = handling(RULES[:_BUILT_IN])
    return built_in[0] if len(built_in) == 1 else None


def blocks(layer):
    """The `Block`s of a layer with a rule, or `[]` while it is unbuilt or
    its kernel is not trainable (e.g. frozen or quantized)."""
    rule = rule_for(layer)
    if rule is None or not layer.built:
        return []
    weights = trainable(layer)
    if any(name not in weights for name in rule.kernel_names):
        return []
    return rule.blocks(layer)
