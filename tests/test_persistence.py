"""Saving, resuming and exporting BNP models."""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_allclose
from helpers import logits_loss
from helpers import shifted_inputs
from helpers import subprocess_env
from models import IN
from models import MODEL_KINDS
from models import OUT

import keras_bnp

X = shifted_inputs(np.random.default_rng(0), (48, IN))
Y = np.arange(48) % OUT
FIT = dict(batch_size=8, shuffle=False, verbose=0)
SAVED_KINDS = ["sequential", "functional_branches", "subclassed",
               "nested_submodel", "deferred_sequential"]


def _compiled(kind, **compile_kwargs):
    keras.utils.set_random_seed(0)
    model, _ = MODEL_KINDS[kind]()
    model.compile(
        optimizer=keras_bnp.BNP(0.05, momentum=0.9),
        loss=logits_loss(),
        **compile_kwargs,
    )
    return model


def _prepared(kind):
    """A compiled model whose optimizer and statistics exist before any
    step, as a custom loop or a restore needs them."""
    model = _compiled(kind)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.track(model)
    return model


def _straight(kind, epochs=2):
    model = _compiled(kind)
    model.fit(X, Y, epochs=epochs, **FIT)
    return model


def _assert_same_state(model, other, atol=1e-6):
    for a, b in zip(model.get_weights(), other.get_weights()):
        assert_allclose(a, b, atol=atol, rtol=0)
    assert len(model.optimizer.variables) == len(other.optimizer.variables)
    for a, b in zip(model.optimizer.variables, other.optimizer.variables):
        assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", SAVED_KINDS)
def test_keras_file_resumes_exactly(kind, tmp_path):
    straight = _straight(kind)
    model = _compiled(kind)
    model.fit(X, Y, epochs=1, **FIT)
    model.save(tmp_path / "m.keras")
    # pytest turns every warning (e.g. Keras' "Skipping variable loading
    # for optimizer") into an error.
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is type(model)
    bnp = loaded.optimizer
    assert isinstance(bnp, keras_bnp.BNP)
    assert isinstance(bnp.inner_optimizer, keras.optimizers.SGD)
    assert bnp.inner_optimizer.momentum == 0.9 and int(bnp.iterations) == 6
    _assert_same_state(model, loaded, atol=0)
    loaded.fit(X, Y, epochs=1, **FIT)
    _assert_same_state(straight, loaded)


@pytest.mark.slow
def test_keras_file_resumes_exactly_in_a_fresh_process(tmp_path):
    straight = _straight("functional_branches")
    model = _compiled("functional_branches")
    model.fit(X, Y, epochs=1, **FIT)
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "data.npz", x=X, y=Y)
    script = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("error", UserWarning)
        import keras, numpy as np, keras_bnp
        data = np.load({str(tmp_path / "data.npz")!r})
        model = keras.models.load_model({str(tmp_path / "m.keras")!r})
        model.fit(data["x"], data["y"], epochs=1, batch_size=8,
                  shuffle=False, verbose=0)
        np.savez({str(tmp_path / "out.npz")!r}, *model.get_weights(),
                 *[v.numpy() for v in model.optimizer.variables])
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env,
                   timeout=300)
    with np.load(tmp_path / "out.npz") as out:
        resumed = [out[f"arr_{i}"] for i in range(len(out.files))]
    want = straight.get_weights() + [
        v.numpy() for v in straight.optimizer.variables]
    assert len(resumed) == len(want)
    for a, b in zip(resumed, want):
        assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_tf_train_checkpoint_carries_the_statistics(tmp_path):
    straight = _straight("sequential")
    model = _compiled("sequential")
    model.fit(X, Y, epochs=1, **FIT)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    restored = _prepared("sequential")
    tf.train.Checkpoint(
        model=restored, optimizer=restored.optimizer
    ).restore(path).assert_consumed()
    _assert_same_state(model, restored, atol=0)
    restored.fit(X, Y, epochs=1, **FIT)
    _assert_same_state(straight, restored)


@pytest.mark.slow
@pytest.mark.parametrize("weights_only", [True, False])
def test_model_checkpoint_callback_resumes(weights_only, tmp_path):
    straight = _straight("functional_branches")
    path = str(tmp_path / ("m.weights.h5" if weights_only else "m.keras"))
    model = _compiled("functional_branches")
    model.fit(X, Y, epochs=1, callbacks=[keras.callbacks.ModelCheckpoint(
        path, save_weights_only=weights_only)], **FIT)
    if weights_only:
        resumed = _compiled("functional_branches")
        resumed.load_weights(path)
    else:
        resumed = keras.models.load_model(path)
    resumed.fit(X, Y, epochs=1, **FIT)
    _assert_same_state(straight, resumed)


class _Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() == 9:  # mid epoch 2
            raise RuntimeError("interrupted")


@pytest.mark.slow
def test_backup_and_restore_resumes_an_interrupted_run(tmp_path):
    straight = _straight("sequential", epochs=3)
    backup = str(tmp_path / "backup")
    model = _compiled("sequential")
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(X, Y, epochs=3, callbacks=[
            keras.callbacks.BackupAndRestore(backup), _Interrupt()], **FIT)
    resumed = _compiled("sequential")
    resumed.fit(X, Y, epochs=3,
                callbacks=[keras.callbacks.BackupAndRestore(backup)], **FIT)
    assert int(resumed.optimizer.iterations) == 18
    _assert_same_state(straight, resumed)


def test_optimizer_weights_api_includes_inner_state():
    model = _straight("sequential", epochs=1)
    bnp = model.optimizer
    names = [v.path for v in bnp.variables]
    assert any(n.endswith("a_moving_mean") for n in names)
    assert any("momentum" in n for n in names)  # the inner SGD's slots
    values = bnp.get_weights()
    assert len(values) == len(names) and len(values) > 10
    for value, variable in zip(values, bnp.variables):
        assert_allclose(value, variable, atol=0, rtol=0)
    other = _prepared("sequential")
    other.optimizer.set_weights(values)
    for variable, value in zip(other.optimizer.variables, values):
        assert_allclose(variable, value, atol=0, rtol=0)
    # Keras files: BNP saves its own variables and the statistics, keyed by
    # name and by the layer's path in the file; the inner optimizer saves
    # its state itself (once).
    store, inner_store = {}, {}
    bnp.save_own_variables(store)
    bnp.inner_optimizer.save_own_variables(inner_store)
    assert sorted(store) == [
        "iteration", "layers.dense:moving_count", "layers.dense:moving_mean",
        "layers.dense:moving_variance", "layers.dense_1:moving_count",
        "layers.dense_1:moving_mean", "layers.dense_1:moving_variance",
        "learning_rate", "skipped_statistics_updates"]
    assert len(store) + len(inner_store) == len(values)
    third = _prepared("sequential")
    third.optimizer.load_own_variables(store)
    third.optimizer.inner_optimizer.load_own_variables(inner_store)
    for variable, value in zip(third.optimizer.variables, values):
        assert_allclose(variable, value, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"received 2 weights"):
        third.optimizer.set_weights(values[:2])


def _graph_op_types(path):
    loaded = tf.saved_model.load(path)  # keeps the variables alive
    graph = loaded.signatures["serving_default"].graph
    return sorted(op.type for op in graph.get_operations())


@pytest.mark.slow
def test_export_serves_predictions_and_contains_no_bnp_work(tmp_path):
    model = _straight("functional_branches", epochs=1)
    model.export(str(tmp_path / "bnp"), verbose=False)
    expected = model.predict(X, verbose=0)
    loaded = tf.saved_model.load(str(tmp_path / "bnp"))
    assert_allclose(loaded.serve(X), expected, atol=1e-6)
    layer = keras.layers.TFSMLayer(str(tmp_path / "bnp"), call_endpoint="serve")
    assert_allclose(layer(X), expected, atol=1e-6)
    # The same architecture as a plain keras.Model exports the same ops.
    plain = keras.Model(model.inputs, model.outputs)
    plain.export(str(tmp_path / "plain"), verbose=False)
    assert _graph_op_types(str(tmp_path / "bnp")) == _graph_op_types(
        str(tmp_path / "plain"))


def _every_kind():
    """A model with a layer of every kind BNP preconditions besides Dense
    and Conv: separable, depthwise and transposed convolutions, attention
    and a bidirectional LSTM."""
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.SeparableConv2D(4, 3, padding="same")(inputs)
    hidden = keras.layers.DepthwiseConv2D(3, padding="same")(hidden)
    hidden = keras.layers.Conv2DTranspose(4, 3, padding="same")(hidden)
    sequence = keras.layers.Reshape((8, 32))(hidden)
    sequence = keras.layers.MultiHeadAttention(2, 4)(sequence, sequence)
    sequence = keras.layers.Bidirectional(keras.layers.LSTM(5))(sequence)
    model = keras_bnp.BNPModel(inputs, keras.layers.Dense(3)(sequence))
    model.compile(optimizer=keras_bnp.BNP(0.01), loss=logits_loss())
    return model


@pytest.mark.slow
def test_every_layer_kind_exports_saves_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    x = (3.0 * rng.normal(size=(64, 8, 8, 3)) + 5.0).astype("float32")
    y = rng.integers(0, 3, 64)
    model = _every_kind()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    # Separable: 2 blocks; attention: 4; each LSTM of the pair: 1.
    assert len(model.optimizer._slots) == 11
    model.export(str(tmp_path / "served"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_array_equal(loaded.serve(x[:4]).numpy(),
                                  model.predict(x[:4], verbose=0))
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert len(restored.optimizer.variables) == len(
        model.optimizer.variables)
    for saved, read in zip(model.optimizer.variables,
                           restored.optimizer.variables):
        np.testing.assert_array_equal(read.numpy(), saved.numpy())
    for trained in (model, restored):
        trained.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(b, a)


@pytest.fixture
def restore_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_statistics(policy, restore_policy):
    from keras_bnp import data

    keras.mixed_precision.set_global_policy(policy)
    (x, y), _ = data.load_mnist()
    x = x[:2000].reshape(2000, -1)
    keras.utils.set_random_seed(0)
    model = keras_bnp.BNPSequential([
        keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10)])
    model.compile(optimizer=keras_bnp.BNP(0.01), loss=logits_loss())
    history = model.fit(x, y[:2000], batch_size=32, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]
    bnp = keras_bnp.optimizer.find_bnp(model.optimizer)
    wrapped = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert wrapped == (policy == "mixed_float16")
    assert all(v.dtype == "float32" for s in bnp._slots.values()
               for v in s.variables)
    mean, variance = bnp.layer_statistics(model.layers[0])
    # The last batch's pixels drive the first layer's statistics: a valid
    # mean of values in [0, 1], close to the data's overall pixel mean.
    assert mean.dtype == np.float32
    assert abs(mean.mean() - x.mean()) < 0.02
    assert np.all(variance >= 0)


@pytest.mark.slow
def test_graph_xla_and_eager_steps_give_the_same_weights():
    # Graph mode runs BNP's update and the inner SGD as one XLA call,
    # jit_compile the whole step, run_eagerly op by op.
    models = []
    for mode in ({}, {"jit_compile": True}, {"run_eagerly": True}):
        model = _compiled("functional_branches", **mode)
        model.fit(X, Y, epochs=6, **FIT)  # 36 steps
        models.append(model)
    _assert_same_state(models[0], models[1], atol=1e-5)
    _assert_same_state(models[0], models[2], atol=1e-5)


_REORDERED = textwrap.dedent("""
    import os
    import sys
    import warnings

    import keras
    import numpy as np

    import keras_bnp


    @keras.saving.register_keras_serializable(package="reordered")
    class Net(keras_bnp.BNPMixin, keras.Model):
        # Two layers of the same shapes, auto-named: created in the other
        # order, their names swap ("dense" is `head`), the attributes that
        # Keras restores their weights by do not. (Keras' files address an
        # attribute that sorts after "layers" by its place in `layers`, so
        # even Keras would not restore its weights in another order.)
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if os.environ["ORDER"] == "reversed":
                self.head = keras.layers.Dense(4)
                self.encoder = keras.layers.Dense(4, activation="relu")
            else:
                self.encoder = keras.layers.Dense(4, activation="relu")
                self.head = keras.layers.Dense(4)

        def call(self, x):
            return self.head(self.encoder(x))


    def state(model):
        bnp = model.optimizer
        inner = bnp.inner_optimizer
        arrays = {}
        for name in ("encoder", "head"):
            layer = getattr(model, name)
            arrays[name + "_mean"], arrays[name + "_variance"] = (
                bnp.layer_statistics(layer))
            arrays[name + "_kernel"] = layer.kernel.numpy()
            if inner.momentum:
                index = inner._get_variable_index(layer.kernel)
                arrays[name + "_velocity"] = inner.momentums[index].numpy()
        return arrays


    path, momentum = sys.argv[1], float(sys.argv[2])
    if os.environ["ORDER"] == "reversed":
        # E.g. Keras' "Skipping variable loading for optimizer" is an error.
        warnings.simplefilter("error", UserWarning)
        model = keras.models.load_model(path)
    else:
        keras.utils.set_random_seed(0)
        model = Net()
        model.compile(optimizer=keras_bnp.BNP(0.01, momentum=momentum),
                      loss="mse")
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(32, 4)) * [1, 2, 3, 4] + [5, -5, 0, 9])
        model.fit(x.astype("float32"), np.zeros((32, 4)), batch_size=8,
                  verbose=0)
        model.save(path)
    np.savez(path + "." + os.environ["ORDER"] + ".npz", **state(model))
""")


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_reload_with_layers_created_in_another_order(momentum, tmp_path):
    # Saved in one process, loaded in another whose model creates its
    # layers in the other order: each layer gets back its own statistics
    # (and SGD velocities), bit for bit. Before, the statistics were
    # swapped, and with momentum the load failed.
    script = tmp_path / "reordered.py"
    script.write_text(_REORDERED)
    path = str(tmp_path / "m.keras")
    for order in ("saved", "reversed"):
        subprocess.run(
            [sys.executable, str(script), path, str(momentum)], check=True,
            timeout=300, env=subprocess_env(ORDER=order))
    with np.load(path + ".saved.npz") as saved, np.load(
            path + ".reversed.npz") as loaded:
        assert sorted(saved.files) == sorted(loaded.files)
        assert len(saved.files) == (8 if momentum else 6)
        for name in saved.files:
            assert_allclose(loaded[name], saved[name], atol=0, rtol=0)
        # The two layers' statistics differ, so a swap would show.
        assert not np.allclose(saved["encoder_mean"], saved["head_mean"])


_REORDERED_CHECKPOINT = textwrap.dedent("""
    import os
    import sys

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_bnp


    def add_layers(owner, reverse):
        # Two Dense layers of the same shapes: created in the other order,
        # their creation positions (and names) swap, their attributes, which
        # checkpoints and Keras files name them by, do not.
        if reverse:
            owner.head = keras.layers.Dense(4)
            owner.encoder = keras.layers.Dense(4, activation="relu")
        else:
            owner.encoder = keras.layers.Dense(4, activation="relu")
            owner.head = keras.layers.Dense(4)


    class Block(keras.layers.Layer):
        def __init__(self, reverse, **kwargs):
            super().__init__(**kwargs)
            add_layers(self, reverse)

        def call(self, x):
            return self.head(self.encoder(x))


    class Net(keras_bnp.BNPMixin, keras.Model):
        # The layers as attributes of the model, or one level down (then
        # the model's path to a kernel is longer than the optimizer's).
        def __init__(self, reverse, nested, **kwargs):
            super().__init__(**kwargs)
            if nested:
                self.block = Block(reverse)
            else:
                add_layers(self, reverse)

        def call(self, x):
            block = getattr(self, "block", self)
            return block.head(block.encoder(x))


    def compiled(reverse, nested):
        model = Net(reverse, nested)
        model.compile(optimizer=keras_bnp.BNP(inner_optimizer=(
            keras.optimizers.SGD(0.01, momentum=0.9) if INNER == "sgd"
            else keras.optimizers.Adam(0.01))), loss="mse")
        return model


    def state(model):
        bnp = model.optimizer
        inner = bnp.inner_optimizer
        slots = ([inner.momentums] if INNER == "sgd"
                 else [inner._momentums, inner._velocities])
        arrays = {"iterations": bnp.iterations.numpy()}
        for name in ("encoder", "head"):
            layer = getattr(getattr(model, "block", model), name)
            arrays[name + "_mean"], arrays[name + "_variance"] = (
                bnp.layer_statistics(layer))
            arrays[name + "_kernel"] = layer.kernel.numpy()
            index = inner._get_variable_index(layer.kernel)
            for i, slot in enumerate(slots):
                arrays[f"{name}_slot{i}"] = slot[index].numpy()
        return arrays


    directory, INNER, order = sys.argv[1:]
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(32, 4)) * [1, 2, 3, 4] + [5, -5, 0, 9]).astype(
        "float32")
    for nested in (False, True):
        folder = os.path.join(directory, f"nested{nested:d}")
        if order == "saved":
            keras.utils.set_random_seed(0)
            model = compiled(False, nested)
            model.fit(x, np.zeros((32, 4)), batch_size=8, verbose=0)
            checkpoint = tf.train.Checkpoint(model=model,
                                             optimizer=model.optimizer)
            tf.train.CheckpointManager(checkpoint, folder, 1).save()
            np.savez(os.path.join(folder, "saved.npz"), **state(model))
            continue
        # Restored into the statistics (after the optimizer is built), and
        # before they exist (TensorFlow restores each one on creation).
        for when in ("after", "before"):
            keras.utils.set_random_seed(1)
            model = compiled(True, nested)
            model(x[:1])
            checkpoint = tf.train.Checkpoint(model=model,
                                             optimizer=model.optimizer)
            latest = tf.train.latest_checkpoint(folder)
            if when == "after":
                model.optimizer.build(model.trainable_variables)
                model.optimizer.track(model)
            status = checkpoint.restore(latest)
            if when == "before":
                model.optimizer.build(model.trainable_variables)
                model.optimizer.track(model)
            status.assert_consumed()
            np.savez(os.path.join(folder, when + ".npz"), **state(model))
""")


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_tf_checkpoint_restores_each_layer_its_own_state(inner, tmp_path):
    # A tf.train.Checkpoint (via CheckpointManager) restored in a fresh
    # process whose model creates its layers in the other order, before
    # and after the optimizer is built: each layer gets back its own
    # statistics, kernel and inner optimizer slots (SGD's velocity, Adam's
    # m and v), bit for bit. Before, TensorFlow matched BNP's statistics by
    # creation position and swapped them between the layers, and, with the
    # layers one level down, the kernels too (via the optimizer's list of
    # the model's variables), without an error.
    script = tmp_path / "reordered_checkpoint.py"
    script.write_text(_REORDERED_CHECKPOINT)
    for order in ("saved", "reversed"):
        subprocess.run([sys.executable, str(script), str(tmp_path), inner,
                        order], check=True, timeout=300, env=subprocess_env())
    for nested in ("nested0", "nested1"):
        with np.load(tmp_path / nested / "saved.npz") as saved:
            saved = dict(saved)
        # The two layers' states differ, so a swap would show.
        assert not np.allclose(saved["encoder_mean"], saved["head_mean"])
        assert not np.allclose(saved["encoder_kernel"], saved["head_kernel"])
        assert len(saved) == 1 + 2 * (3 + (1 if inner == "sgd" else 2))
        for when in ("after", "before"):
            with np.load(tmp_path / nested / f"{when}.npz") as loaded:
                assert sorted(loaded.files) == sorted(saved)
                for name, value in saved.items():
                    np.testing.assert_array_equal(
                        loaded[name], value, err_msg=f"{nested} {when} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sequential", "deferred_sequential"])
def test_tf_checkpoint_restored_before_the_first_step_resumes(kind, tmp_path):
    # Restored into a fresh model before any step, so that BNP's variables
    # are created after the restore (inside the first traced step for the
    # deferred Sequential's layers), then trained on: the run continues as
    # if uninterrupted. Before, with the deferred Sequential, a layer's
    # running mean received the skipped-updates counter's value (matched
    # by creation position).
    straight = _straight(kind)
    model = _compiled(kind)
    model.fit(X, Y, epochs=1, **FIT)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    restored = _compiled(kind)
    status = tf.train.Checkpoint(
        model=restored, optimizer=restored.optimizer).restore(path)
    restored.fit(X, Y, epochs=1, **FIT)
    status.assert_consumed()
    _assert_same_state(straight, restored)


def test_k_fold_reuse_is_refused_and_leaves_the_first_model_intact(tmp_path):
    # One BNP for the models of two folds: the second is refused before
    # BNP takes any of its layers, so the first still saves and reloads
    # all of its statistics (before, the second model's layers joined the
    # optimizer's state, and the reload skipped every statistic).
    bnp = keras_bnp.BNP(0.05, momentum=0.9)
    folds = []
    for _ in range(2):
        model, _ = MODEL_KINDS["sequential"]()
        model.compile(optimizer=bnp, loss=logits_loss())
        folds.append(model)
    folds[0].fit(X, Y, **FIT)
    state = [v.numpy() for v in bnp.variables]
    with pytest.raises(ValueError, match=r"built for the variables of "
                       r"another model.*Create a new BNP for each model"):
        folds[1].fit(X, Y, **FIT)
    assert len(bnp.variables) == len(state)
    for variable, value in zip(bnp.variables, state):
        assert_allclose(variable, value, atol=0, rtol=0)
    folds[0].save(tmp_path / "fold0.keras")
    loaded = keras.models.load_model(tmp_path / "fold0.keras")
    _assert_same_state(folds[0], loaded, atol=0)
    for layer, other in zip(folds[0].layers, loaded.layers):
        for a, b in zip(bnp.layer_statistics(layer),
                        loaded.optimizer.layer_statistics(other)):
            assert_allclose(a, b, atol=0, rtol=0)


@pytest.mark.slow
def test_popped_layer_is_released(tmp_path):
    # After `pop` (and compiling again with the same optimizer), BNP keeps
    # no statistics of the removed layer, and saves those of the layers
    # the model has, which a model of that architecture loads. (The inner
    # optimizer's slots of the removed variables stay, as in plain Keras.)
    def build(units):
        keras.utils.set_random_seed(0)
        return keras_bnp.BNPSequential([keras.Input((IN,)), *(
            keras.layers.Dense(n, activation="relu") for n in units)])

    model = build([5, OUT, 2])
    model.compile(optimizer=keras_bnp.BNP(0.05), loss=logits_loss())
    model.fit(X, np.arange(48) % 2, **FIT)
    popped = model.layers[-1]
    model.pop()
    bnp = model.optimizer
    model.compile(optimizer=bnp, loss=logits_loss())  # keeps its state
    model.fit(X, Y, **FIT)
    assert len(bnp._slots) == 2
    with pytest.raises(ValueError, match=r"no statistics for layer"):
        bnp.layer_statistics(popped)
    # TensorFlow checkpoints still save (their variable list is append-only).
    tf.train.Checkpoint(model=model, optimizer=bnp).save(str(tmp_path / "c"))
    store = {}
    bnp.save_own_variables(store)
    other = build([5, OUT])
    other.compile(optimizer=keras_bnp.BNP(0.05), loss=logits_loss())
    other.optimizer.build(other.trainable_variables)
    other.optimizer.track(other)
    other.optimizer.load_own_variables(store)
    for layer, loaded in zip(model.layers, other.layers):
        for a, b in zip(bnp.layer_statistics(layer),
                        other.optimizer.layer_statistics(loaded)):
            assert_allclose(a, b, atol=0, rtol=0)


def test_saved_optimizer_holds_each_state_once(tmp_path):
    # The inner Adam's state plus BNP's statistics and counters, counted
    # from the variables' shapes: before, Adam's slots were saved twice
    # (under optimizer/vars and optimizer/inner_optimizer/vars).
    import h5py

    model, _ = MODEL_KINDS["functional_branches"]()
    model.compile(optimizer=keras_bnp.BNP(
        inner_optimizer=keras.optimizers.Adam(1e-3)), loss=logits_loss())
    model.fit(X, Y, **FIT)
    weights = sum(4 * int(np.prod(v.shape))
                  for v in model.trainable_variables)
    adam = 2 * weights + 8 + 4  # m and v, iterations (int64), learning rate
    # Per Dense layer 2 * in_channels + 1 float32 values; in_channels are
    # IN for `a` and `c`, 2 * 5 for `b`.
    statistics = 4 * ((2 * IN + 1) * 2 + (2 * 10 + 1))
    own = 8 + 4 + 4 * 2  # iterations, learning rate, skip counters
    model.save_weights(tmp_path / "m.weights.h5")
    sizes = []
    with h5py.File(tmp_path / "m.weights.h5") as f:
        f["optimizer"].visititems(lambda name, item: sizes.append(
            item.nbytes) if isinstance(item, h5py.Dataset) else None)
    assert sum(sizes) == adam + statistics + own
    loaded, _ = MODEL_KINDS["functional_branches"]()
    loaded.compile(optimizer=keras_bnp.BNP(
        inner_optimizer=keras.optimizers.Adam(1e-3)), loss=logits_loss())
    loaded.load_weights(tmp_path / "m.weights.h5")
    _assert_same_state(model, loaded, atol=0)


def test_state_of_another_optimizer_is_refused(tmp_path):
    # Weights saved with Adam, loaded into a model compiled with BNP: an
    # error that names what the file has and what BNP needs (before, a
    # warning, and training went on with fresh statistics).
    adam = _compiled("sequential")
    adam.compile(optimizer="adam", loss=logits_loss())
    adam.fit(X, Y, **FIT)
    adam.save_weights(tmp_path / "adam.weights.h5")
    model = _compiled("sequential")
    with pytest.raises(ValueError, match=r"does not fit this BNP: it has "
                       r"statistics of layers \[\] and other variables "
                       r"\['0', '1'.*statistics of layers \['layers/dense', "
                       r"'layers/dense_1'\]"):
        model.load_weights(tmp_path / "adam.weights.h5")


class _Interrupted(Exception):
    pass


def _interrupt_after(written):
    """A `save_own_variables` that stops after writing `written` of BNP's
    entries, as an interrupted save (e.g. Ctrl-C, a full disk) does."""
    save = keras_bnp.BNP.save_own_variables

    def interrupted(self, store):
        class Store:
            count = 0

            def __setitem__(self, key, value):
                if self.count == written:
                    raise _Interrupted(f"after {written} entries")
                self.count += 1
                store[key] = value

        save(self, Store())

    return interrupted


def _statistics_values(bnp):
    return [v.numpy() for _, s in bnp._saved_slots() for v in s.variables]


@pytest.mark.slow
@pytest.mark.parametrize("written", [0, 2, 8])
def test_weights_file_of_an_interrupted_save_is_refused(written, tmp_path,
                                                        monkeypatch):
    # A save interrupted while BNP writes its part leaves a readable
    # .weights.h5 (Keras writes it in place) with all layers' weights and
    # some or none of BNP's 9 entries. Loading it is an error that names
    # the file, and leaves BNP's statistics as they were. Before, with 0 or
    # 2 entries written, BNP loaded nothing without a word (the inner
    # optimizer's "Skipping variable loading" warning was the only sign),
    # and training went on with fresh statistics.
    model = _straight("sequential", epochs=1)
    path = tmp_path / "m.weights.h5"
    monkeypatch.setattr(keras_bnp.BNP, "save_own_variables",
                        _interrupt_after(written))
    with pytest.raises(_Interrupted):
        model.save_weights(path)
    monkeypatch.undo()
    loaded = _prepared("sequential")
    loaded.fit(X[:8], Y[:8], verbose=0)  # statistics not at their start
    before = _statistics_values(loaded.optimizer)
    name = loaded.optimizer.name
    if written == 0:
        message = (
            f"'{path}' has no saved state for optimizer '{name}' (BNP's "
            "layer statistics): it was saved from a model "
            "without an optimizer, or its save was interrupted. To load only "
            "the layers' weights, load them before compiling with BNP, or "
            "pass `skip_mismatch=True` to `load_weights`, which warns and "
            "keeps BNP's state as it is.")
    else:
        message = (
            f"The saved state of optimizer '{name}' in "
            f"'{path}' does not fit this BNP: it has statistics of layers "
            f"{['layers/dense', 'layers/dense_1'][:1 + (written > 3)]}")
    with pytest.raises(ValueError, match=re.escape(message)):
        loaded.load_weights(path)
    for a, b in zip(_statistics_values(loaded.optimizer), before):
        np.testing.assert_array_equal(a, b)


def test_weights_without_optimizer_state_load_with_skip_mismatch(tmp_path):
    # Weights saved from a model without an optimizer have nothing for BNP:
    # an error (before, only the inner optimizer's warning); with
    # `skip_mismatch=True`, Keras' warning, the layers' weights, and BNP's
    # state as it was.
    model = _straight("sequential", epochs=1)
    plain, _ = MODEL_KINDS["sequential"]()
    plain.set_weights(model.get_weights())
    path = tmp_path / "plain.weights.h5"
    plain.save_weights(path)
    loaded = _prepared("sequential")
    with pytest.raises(ValueError, match=re.escape(
            f"'{path}' has no saved state for optimizer "
            f"'{loaded.optimizer.name}'")):
        loaded.load_weights(path)
    loaded = _prepared("sequential")
    before = _statistics_values(loaded.optimizer)
    with pytest.warns(UserWarning, match="A total of 1 objects could not be "
                      "loaded"), pytest.warns(UserWarning, match="Skipping "
                                              "variable loading"):
        loaded.load_weights(path, skip_mismatch=True)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_statistics_values(loaded.optimizer), before):
        np.testing.assert_array_equal(a, b)


def test_truncated_or_unfinished_files_are_refused(tmp_path, monkeypatch):
    # What a killed process or a copy cut short leaves: Keras' own errors,
    # never a partial load. A .keras file whose save stopped in BNP's part
    # has no weights at all (Keras writes them into the archive last).
    model = _straight("sequential", epochs=1)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    for name in ("m.keras", "m.weights.h5"):
        data = (tmp_path / name).read_bytes()
        for fraction in (0.1, 0.5, 0.99):
            cut = tmp_path / f"cut_{name}"
            cut.write_bytes(data[:int(len(data) * fraction)])
            if name == "m.keras":
                with pytest.raises(ValueError, match=re.escape(
                        f"File not found: filepath={cut}. Please ensure the "
                        "file is an accessible `.keras` zip file.")):
                    keras.models.load_model(cut)
            else:
                with pytest.raises(OSError, match=r"^Unable to synchronously "
                                   r"open file \(truncated file: eof = "):
                    _compiled("sequential").load_weights(cut)
    monkeypatch.setattr(keras_bnp.BNP, "save_own_variables",
                        _interrupt_after(4))
    with pytest.raises(_Interrupted):
        model.save(tmp_path / "m.keras")  # over the complete file
    monkeypatch.undo()
    with pytest.raises(ValueError, match=re.escape(
            "Expected a model.weights.h5 or model.weights.npz file.")):
        keras.models.load_model(tmp_path / "m.keras")


def test_failed_load_assigns_nothing():
    # BNP checks every saved entry (names, shapes, readable) before it
    # assigns any: a load that fails leaves all of its state as it was.
    # Before, the entries before the faulty one were assigned.
    model = _straight("sequential", epochs=1)
    store = {}
    model.optimizer.save_own_variables(store)
    other = _prepared("sequential")
    before = [v.numpy() for v in other.optimizer.variables]

    def unchanged():
        for variable, value in zip(other.optimizer.variables, before):
            np.testing.assert_array_equal(variable.numpy(), value)

    wrong = dict(store)
    wrong["layers.dense_1:moving_variance"] = np.ones(4, "float32")
    with pytest.raises(ValueError, match=re.escape(
            f"The saved state of optimizer '{other.optimizer.name}' does not "
            "fit this BNP: layers.dense_1:moving_variance has shape (4,) "
            "where this BNP has (5,). Load a file saved from the same "
            "architecture, compiled with BNP.")):
        other.optimizer.load_own_variables(wrong)
    unchanged()

    class Unreadable(dict):
        def __getitem__(self, key):
            if key == "layers.dense_1:moving_variance":
                raise OSError("Can't read data (corrupt)")
            return super().__getitem__(key)

    with pytest.raises(OSError, match=r"Can't read data \(corrupt\)"):
        other.optimizer.load_own_variables(Unreadable(store))
    unchanged()
