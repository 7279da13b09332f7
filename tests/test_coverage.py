"""`keras_bnp.coverage`: what BNP preconditions in a model, in
`BNP.summary()`, on the first `fit`, and from the command line."""

import math
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from helpers import subprocess_env

import keras_bnp
from benchmarks import coverage as coverage_models
from keras_bnp import coverage
from keras_bnp import rules


class Scale(keras.layers.Layer):
    """A kind no rule knows: `x @ kernel`."""

    def build(self, input_shape):
        self.kernel = self.add_weight((input_shape[-1], 40), name="kernel")

    def call(self, x):
        return x @ self.kernel


def _mixed_model(model_class=keras.Model):
    """Conv2D and Dense (preconditioned), LayerNormalization, Embedding,
    a frozen Dense and a LoRA Dense."""
    images = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(images)    # 54 + 3
    x = keras.layers.LayerNormalization(name="norm")(x)   # 3 + 3
    x = keras.layers.Flatten()(x)                         # 48 values
    x = keras.layers.Dense(5, name="dense")(x)            # 48 * 5 + 5
    tokens = keras.Input((4,), dtype="int32")
    y = keras.layers.Embedding(50, 6, name="embed")(tokens)  # 300
    frozen = keras.layers.Dense(5, name="frozen")         # 24 * 5 + 5
    y = frozen(keras.layers.Flatten()(y))
    lora = keras.layers.Dense(3, name="lora")             # 10 * 3 + 3
    outputs = lora(keras.layers.Concatenate()([x, y]))
    frozen.trainable = False
    lora.enable_lora(2)                                   # 10 * 2, 2 * 3
    return model_class([images, tokens], outputs)


def _expected(model):
    """Hand counts of `_mixed_model`: trainable parameters 57 (conv) + 6
    (norm) + 245 (dense) + 300 (embed) + 3 (lora's bias) + 26 (LoRA's
    factors); preconditioned 57 + 245, and the embedding table if a rule
    covers Embedding. Kernels: conv 54, dense 240, lora_kernel_a 20,
    lora_kernel_b 6."""
    embedding = 300 if rules.blocks(model.get_layer("embed")) else 0
    return {"parameters": (302 + embedding, 637), "kernels": (2, 4),
            "kernel_parameters": (294, 320),
            "embedding_parameters": (embedding, 300)}


def test_rows_and_shares_by_hand():
    model = _mixed_model()
    result = keras_bnp.coverage.coverage(model)
    for name, (covered, total) in _expected(model).items():
        share = getattr(result, name)
        assert (share.covered, share.total) == (covered, total), name
    rows = {row.path: row for row in result.rows}
    params = {
        "conv/kernel": 54, "conv/bias": 3, "norm/gamma": 3, "norm/beta": 3,
        "dense/kernel": 240, "dense/bias": 5, "embed/embeddings": 300,
        "frozen/kernel": 120, "frozen/bias": 5, "lora/kernel": 30,
        "lora/bias": 3, "lora/lora_kernel_a": 20, "lora/lora_kernel_b": 6}
    assert {path: row.params for path, row in rows.items()} == params
    assert rows["conv/kernel"].rule == (
        "Conv2D: centre + scale kernel and bias, 2 features")
    assert rows["dense/bias"].rule == "Dense: centre + scale kernel and bias"
    assert rows["norm/gamma"].rule == "inner optimizer only: not a kernel"
    for path in ("frozen/kernel", "frozen/bias", "lora/kernel"):
        assert not rows[path].trained
        assert rows[path].rule == "not trained: frozen"
    for path in ("lora/bias", "lora/lora_kernel_a"):
        assert rows[path].rule == ("inner optimizer only: LoRA (trains "
                                   "low-rank factors, not the kernel itself)")
    assert rows["lora/lora_kernel_b"].kind == "kernel"
    assert rows["embed/embeddings"].kind == "embeddings"
    assert result.warning() is None  # 26 of 320 kernel parameters left out


def test_summary_shows_variables_and_shares():
    model = _mixed_model(keras_bnp.BNPModel)
    optimizer = keras_bnp.BNP()
    lines = []
    optimizer.summary(print_fn=lines.append)
    assert "No model tracked yet" in lines[0]
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    x = [rng.normal(5.0, 3.0, (4, 6, 6, 2)), rng.integers(0, 50, (4, 4))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CoverageWarning
        model.fit(x, np.zeros((4, 3)), verbose=0)
    lines.clear()
    optimizer.summary(print_fn=lines.append)
    text = lines[0].splitlines()
    assert text[0].startswith("BNP 'bnp")
    assert text[1].split() == ["variable", "layer", "params", "rule"]
    variables = {line.split()[0]: line.split()[1:] for line in text[2:15]}
    assert variables["conv/kernel"] == [
        "Conv2D", "54", "Conv2D:", "centre", "+", "scale", "kernel", "and",
        "bias,", "2", "features"]
    assert variables["lora/lora_kernel_b"][:4] == [
        "Dense", "6", "inner", "optimizer"]
    assert variables["frozen/bias"] == [
        "Dense", "5", "not", "trained:", "frozen"]
    assert text[15] == ""
    expected = _expected(model)
    covered, total = expected["parameters"]
    assert (f"BNP preconditions {covered:,} of {total:,} "
            f"({covered / total:.1%}) trainable parameters; kernels: 2 of "
            "4 variables, 294 of 320 (91.9%) parameters.") in text
    assert "Frozen (not trained, not counted): 3 variables, 155 " \
        "parameters." in text


def _uncovered_model():
    """A Dense of 10 * 40 + 40 parameters after a `Scale` of 40 * 40."""
    inputs = keras.Input((40,))
    outputs = keras.layers.Dense(10, name="head")(Scale(name="scale")(inputs))
    return keras_bnp.BNPModel(inputs, outputs)


def test_first_fit_prints_the_share_and_warns_once(capsys):
    model = _uncovered_model()
    model.compile(optimizer=keras_bnp.BNP(initial_scaling=False), loss="mse")
    x, y = np.full((2, 40), 100.0), np.zeros((2, 10))
    with pytest.warns(coverage.CoverageWarning) as caught:
        model.fit(x, y, verbose=2)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "BNP preconditions only 400 of 2,000 (20.0%) of this model's "
        "trainable kernel parameters (it warns above 10% left out). The "
        "largest left to the inner optimizer alone: Scale 1,600 (kind not "
        "supported). BNP changes nothing there; to precondition them, use "
        "layer kinds BNP supports (README, 'Supported layers'), and compare "
        "with the inner optimizer alone. `keras_bnp.coverage.report(model)` "
        "lists every variable.")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (
        "BNP preconditions 410 of 2,010 (20.4%) trainable parameters; "
        "kernels: 1 of 2 variables, 400 of 2,000 (20.0%) parameters.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, verbose=2)  # not the first fit: no line, no warning
    assert "BNP preconditions" not in capsys.readouterr().out


def test_first_fit_is_quiet_with_verbose_0(capsys):
    model = _uncovered_model()
    model.compile(optimizer=keras_bnp.BNP(initial_scaling=False), loss="mse")
    with pytest.warns(coverage.CoverageWarning):
        model.fit(np.ones((2, 40)), np.zeros((2, 10)), verbose=0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("text, width, expected", [
    ("dense/kernel", 12, "dense/kernel"),
    ("transformer_encoder_1/_self_attention_layer/query_dense/kernel", 48,
     "transformer_encoder_1/.../query_dense/kernel"),
    ("a/b/c/d/e/f", 10, "a/.../e/f"),
    ("a/b/c/d/e/f/g", 11, "a/.../e/f/g"),
    # No middle part to leave out: characters of the first part, else of
    # both ends.
    ("transformer_layer_0/_feedforward_intermediate_dense/kernel", 56,
     "transformer_la.../_feedforward_intermediate_dense/kernel"),
    ("a" * 30 + "/kernel", 20, "aaaaaaaa...aa/kernel"),
])
def test_shorten_keeps_both_ends(text, width, expected):
    assert coverage.shorten(text, width) == expected
    assert len(coverage.shorten(text, width)) <= width


def test_coverage_of_something_else_names_the_fix():
    with pytest.raises(ValueError, match=r"expects a Keras model .* "
                                         r"Received: str 'model'"):
        keras_bnp.coverage.coverage("model")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    assert coverage.coverage(unbuilt).table() == (
        "The model has no variables yet: build it first (give it an "
        "`Input`, call it on data, or call `model.build(shape)`).")


@pytest.mark.slow
def test_command_prints_a_small_model():
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.coverage", "--models", "vae",
         "--brief"], check=True, capture_output=True, text=True,
        timeout=300, env=subprocess_env())
    model = coverage_models.vae()
    trainable = sum(math.prod(v.shape) for v in model.trainable_variables)
    assert trainable == 134_165  # keras-io's VAE
    # Its Dense (59,668) and Conv2D (18,816) parameters, and its
    # Conv2DTranspose ones (55,681) where a rule covers that kind.
    transposed = [layer for layer in model._flatten_layers()
                  if isinstance(layer, keras.layers.Conv2DTranspose)]
    covered = 78_484 + 55_681 * bool(rules.blocks(transposed[0]))
    assert run.stdout.startswith("== vae: keras-io's variational autoencoder")
    assert "conv2d/kernel" not in run.stdout  # --brief: no variables
    assert (f"BNP preconditions {covered:,} of 134,165 "
            f"({covered / 134_165:.1%}) trainable parameters") in run.stdout
    assert run.stdout.splitlines()[-1].split()[:3] == [
        "vae", "134,165", f"{covered / 134_165:.1%}"]


def test_report_prints_the_table_and_returns_the_coverage():
    model = _mixed_model()
    printed = []
    result = keras_bnp.coverage.report(model, print_fn=printed.append)
    table = keras_bnp.coverage.coverage(model).table()
    assert printed == [table]
    assert str(result) == table
    assert repr(result) == f"<Coverage: {result.line()}>"
    assert result.kernel_parameters.covered == 294
