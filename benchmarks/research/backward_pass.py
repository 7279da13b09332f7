"""What a BNP step costs when the preconditioning happens in the backward
pass, against SGD's and today's BNP step, on the deep suite's MLP (eight
Dense(256) + ReLU, Dense(10)).

    python -m benchmarks.research.backward_pass [--batch-sizes 32 128] \\
        [--rounds 5]

For a Dense layer with a bias, the preconditioned gradients are

    kernel: ((x - mean) / (variance + damping))^T delta = Z^T delta
    bias:   (1 - Z mean)^T delta

(`preconditioner.precondition` expanded over the batch), so a layer whose
matmul has a custom gradient can produce them directly: one elementwise
pass over its input (batch x fan-in) instead of passes over its kernel
(fan-in x units), and no `x^T delta` to precondition afterwards. Here
`BackwardDense` does so, updating its running statistics in the forward
pass with the library's own functions (`statistics.moments_from_sums`,
`statistics.update_moving`, `preconditioner.damping`), under plain SGD with
momentum 0.9. It times one training step of each (as the benchmark's cost
table does: one fixed batch of digits, the model's own `train_step` in a
compiled loop, rounds that interleave the methods, medians), then checks
that 20 steps in float64 give the weights of BNP with the same settings
(`initial_scaling=False`), and prints the ratios to SGD.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

from benchmarks import benchmark
from benchmarks import experiment
from keras_bnp import preconditioner
from keras_bnp import statistics

LEARNING_RATE, STATISTICS_MOMENTUM, EPSILON = 1e-3, 0.99, 3.0


@tf.function(jit_compile=True)
def _updated_statistics(inputs, moving_mean, moving_variance, moving_count):
    """The running statistics after batch `inputs`, and the inverse of the
    damped variance: one compiled call per layer and step."""
    count = tf.cast(tf.shape(inputs)[0], inputs.dtype)
    shift = tf.where(moving_count > 0, moving_mean, tf.reduce_mean(inputs, 0))
    centred = inputs - shift
    mean, variance = statistics.moments_from_sums(
        count, tf.reduce_sum(centred, 0), tf.reduce_sum(tf.square(centred), 0),
        shift)
    mean, variance, count = statistics.update_moving(
        shift, moving_variance, moving_count, mean, variance, count,
        STATISTICS_MOMENTUM)
    inverse = 1.0 / (variance + preconditioner.damping(mean, variance,
                                                       EPSILON))
    return mean, variance, count, inverse


class BackwardDense(keras.layers.Dense):
    """A Dense layer that returns BNP's preconditioned gradients for its
    kernel and bias from its backward pass (training only)."""

    def build(self, input_shape):
        super().build(input_shape)
        fan_in = input_shape[-1]
        self.moving_mean = self.add_weight((fan_in,), "zeros",
                                           trainable=False)
        self.moving_variance = self.add_weight((fan_in,), "ones",
                                               trainable=False)
        self.moving_count = self.add_weight((), "zeros", trainable=False)

    def call(self, inputs, training=False):
        if not training:
            return super().call(inputs)
        mean, variance, count, inverse = _updated_statistics(
            inputs, *map(tf.convert_to_tensor, (
                self.moving_mean, self.moving_variance, self.moving_count)))
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        self.moving_count.assign(count)

        @tf.custom_gradient
        def affine(x, kernel, bias):
            def grad(delta):
                normalized = (x - mean) * inverse
                return (tf.matmul(delta, kernel, transpose_b=True),
                        tf.matmul(normalized, delta, transpose_a=True),
                        tf.linalg.matvec(delta, 1.0 - tf.linalg.matvec(
                            normalized, mean), transpose_a=True))
            return tf.matmul(x, kernel) + bias, grad

        return self.activation(affine(inputs, self.kernel, self.bias))


def backward_model(reference):
    """`reference`'s architecture (Dense and ReLU layers) with
    `BackwardDense` layers holding its weights, compiled with SGD."""
    inputs = keras.Input(reference.input_shape[1:])
    x = inputs
    for layer in reference.layers[1:]:
        if isinstance(layer, keras.layers.Dense):
            copy = BackwardDense(layer.units)
            x = copy(x)
            copy.kernel.assign(layer.kernel)
            copy.bias.assign(layer.bias)
        else:
            x = keras.layers.ReLU()(x)
    model = keras.Model(inputs, x)
    model.compile(keras.optimizers.SGD(LEARNING_RATE, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model


def models(batch_size):
    """SGD's, today's BNP's and the backward-pass model, from one
    initialization, each with its state built by one step."""
    x, y = benchmark.timing_batch("deep_mlp", batch_size)
    options = {"epsilon": EPSILON,
               "statistics_momentum": STATISTICS_MOMENTUM,
               "initial_scaling": False}
    sgd = experiment.compiled_model("sgd", LEARNING_RATE, task="deep_mlp")
    bnp = experiment.compiled_model("bnp", LEARNING_RATE, task="deep_mlp",
                                    bnp_options=options)
    bnp.set_weights(sgd.get_weights())
    backward = backward_model(sgd)
    return {"sgd": sgd, "bnp": bnp, "backward": backward}, (x, y)


def check_same_weights(batch_size, steps=20):
    """The largest difference between today's BNP's weights and the
    backward-pass model's after `steps` steps in float64, relative to the
    weights' largest magnitude: the two compute the same update, so it is
    rounding. (In float32 the difference grows to about 1e-3 over 20 steps
    on one fixed batch of 128, the rounding amplified by the training.)"""
    keras.config.set_dtype_policy("float64")
    try:
        nets, (x, y) = models(batch_size)
        for name in ("bnp", "backward"):
            nets[name].fit(x.astype("float64"), y, batch_size=batch_size,
                           epochs=steps, verbose=0, shuffle=False)
    finally:
        keras.config.set_dtype_policy("float32")
    pairs = zip(nets["bnp"].trainable_weights,
                nets["backward"].trainable_weights)
    return max(float(np.max(np.abs(a.numpy() - b.numpy()))
                     / np.max(np.abs(a.numpy()))) for a, b in pairs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", nargs="+", type=int,
                        default=[32, 128])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'batch':>5}  weights apart (float64)  {'SGD ms':>7}  "
          "BNP today  BNP in the backward pass")
    rows = []
    for batch_size in args.batch_sizes:
        nets, (x, y) = models(batch_size)
        loops = {}
        for name, model in nets.items():
            model.fit(x, y, batch_size=batch_size, verbose=0)
            loops[name], _ = benchmark._step_loops(model, x, y, False)
            loops[name](2)  # trace
        names = list(loops)
        samples = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                samples[name].append(benchmark._seconds_per_step(loops[name]))
        ratios = {name: np.median(np.array(samples[name])
                                  / np.array(samples["sgd"]))
                  for name in names}
        rows.append((batch_size, np.median(samples["sgd"]), ratios))
    for batch_size, sgd, ratios in rows:
        error = check_same_weights(batch_size)
        print(f"{batch_size:>5}  {error:23.1e}  {1e3 * sgd:7.3f}  "
              f"{ratios['bnp']:8.2f}x  {ratios['backward']:8.2f}x",
              flush=True)

if __name__ == "__main__":
    main()
