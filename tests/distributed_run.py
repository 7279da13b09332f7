"""Trains one small model under a tf.distribute strategy, in its own process.

Used by test_distribute.py (TensorFlow's devices must be configured before
anything else touches them, so each run is a fresh process):

    python distributed_run.py mirrored OUT_DIR
    python distributed_run.py worker OUT_DIR   # TF_CONFIG set by the caller

Writes `OUT_DIR/*.npz` with weights and per-replica statistics.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_bnp  # noqa: E402


def data(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 10, 3)) * [1.0, 2.0, 0.5] + [0.5, -1.0, 2.0]
    return x.astype("float32"), np.arange(n) % 3


def build(strategy, learning_rate):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((10, 3))
        h = keras.layers.Conv1D(4, 3, activation="relu", name="conv")(inputs)
        h = keras.layers.Flatten()(h)
        outputs = keras.layers.Dense(3, name="head")(h)
        model = keras_bnp.BNPModel(inputs, outputs)
        model.compile(
            optimizer=keras_bnp.BNP(learning_rate, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return model


def replica_values(variable):
    """Each replica's copy of a BNP statistics variable."""
    value = variable.value
    return [v.numpy() for v in getattr(value, "values", (value,))]


def state(model):
    arrays = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    bnp = model.optimizer
    arrays["iterations"] = bnp.iterations.numpy()
    for s in bnp._slots.values():
        for v in s.variables:
            for r, value in enumerate(replica_values(v)):
                arrays[f"{v.name}_replica{r}"] = value
    return arrays


def main():
    if MODE == "mirrored":
        for name, strategy in (
            ("single", tf.distribute.get_strategy()),
            ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
        ):
            # 12 steps of a global batch of 8 (4 per replica).
            x, y = data(48)
            model = build(strategy, 0.05)
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            np.savez(os.path.join(OUT, f"{name}.npz"), **state(model))
            if name == "mirrored":
                model.save(os.path.join(OUT, "mirrored.keras"))
                loaded = keras.models.load_model(
                    os.path.join(OUT, "mirrored.keras"))
                np.savez(os.path.join(OUT, "reloaded.npz"), **state(loaded))
                path = tf.train.Checkpoint(
                    model=model, optimizer=model.optimizer
                ).save(os.path.join(OUT, "ckpt"))
                restored = build(strategy, 0.05)
                with strategy.scope():
                    restored.optimizer.build(restored.trainable_variables)
                    restored.optimizer.track(restored)
                tf.train.Checkpoint(
                    model=restored, optimizer=restored.optimizer
                ).restore(path).assert_consumed()
                np.savez(os.path.join(OUT, "checkpoint.npz"),
                         **state(restored))
            # One step of statistics (learning rate 0, statistics momentum
            # 0) of a Dense layer on inputs far from 0: the first update is
            # centred on the same values on both replicas.
            x = (data(8)[0][:, 0] + [0.0, 0.0, 1000.0]).astype("float32")
            with strategy.scope():
                inputs = keras.Input((3,))
                model = keras_bnp.BNPModel(
                    inputs, keras.layers.Dense(2, name="first")(inputs))
                model.compile(optimizer=keras_bnp.BNP(
                    0.0, statistics_momentum=0.0), loss="mse")
            model.fit(x, np.zeros((8, 2)), batch_size=8, verbose=0)
            np.savez(os.path.join(OUT, f"{name}_first.npz"), x=x,
                     **state(model))
            # Statistics only (learning rate 0), 43 examples: the last global
            # batch of 3 splits unevenly between the replicas.
            x, y = data(43)
            model = build(strategy, 0.0)
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
            np.savez(os.path.join(OUT, f"{name}_uneven.npz"), **state(model))
    else:
        # Keras 3's fit does not run under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585), so this is the documented custom loop.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        model = build(strategy, 0.05)
        bnp = model.optimizer
        with strategy.scope():
            bnp.build(model.trainable_variables)
            bnp.track(model)
        x, y = data(48)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
            .with_options(options))
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum")

        @tf.function
        def step(inputs, labels):
            def replica_step(inputs, labels):
                with bnp.capture(model):
                    with tf.GradientTape() as tape:
                        loss = loss_fn(labels, model(inputs, training=True))
                        loss = loss / 8.0  # the global batch
                    grads = tape.gradient(loss, model.trainable_variables)
                    bnp.apply_gradients(zip(grads, model.trainable_variables))

            strategy.run(replica_step, args=(inputs, labels))

        for inputs, labels in dataset:
            step(inputs, labels)
        task = int(os.environ["BNP_WORKER_INDEX"])
        np.savez(os.path.join(OUT, f"worker{task}.npz"), **state(model))


if __name__ == "__main__":
    main()
