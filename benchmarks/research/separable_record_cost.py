"""Cost of keeping a separable convolution's depthwise output for BNP.

Times, interleaved in one process, one forward and backward pass of a
`SeparableConv2D` (`tf.function`, gradients of the kernels and bias):
- `keras`: the layer's own call (no depthwise output to keep);
- `two_step`: `SeparableRule.record`, the depthwise then the pointwise
  convolution, keeping the depthwise output and taking its sums;
- `extra_depthwise`: the layer's own call, plus a second depthwise
  convolution for the depthwise output and its sums.

    python -m benchmarks.research.separable_record_cost [--rounds 30]
"""

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from keras_bnp import rules

CASES = {
    # name: (input shape, filters, data format)
    "32x32x64 -> 128, channels_last": ((8, 32, 32, 64), 128, "channels_last"),
    "16x16x256 -> 256, channels_last": ((8, 16, 16, 256), 256,
                                         "channels_last"),
    "32x32x64 -> 128, channels_first": ((8, 64, 32, 32), 128,
                                        "channels_first"),
}


def _sums(tensor, axis):
    axes = [a for a in range(len(tensor.shape)) if a != axis % len(
        tensor.shape)]
    return tf.reduce_sum(tensor, axes) + tf.reduce_sum(tf.square(tensor), axes)


def steps(layer, x, cotangent):
    """`{variant: tf.function}` of one forward and backward pass."""
    rule = rules.rule_for(layer)
    axis = 1 if layer.data_format == "channels_first" else -1
    variables = layer.trainable_variables

    def keras_call():
        return layer.call(x), None

    def two_step():
        records = []
        outputs = rule.record(layer, layer.call, (x,), {}, records)
        return outputs, records[0][1]

    def extra_depthwise():
        depthwise = keras.ops.depthwise_conv(
            x, layer.depthwise_kernel, layer.strides, layer.padding,
            layer.data_format, layer.dilation_rate)
        return layer.call(x), depthwise

    def step(forward):
        with tf.GradientTape() as tape:
            outputs, depthwise = forward()
            loss = tf.reduce_sum(outputs * cotangent)
        grads = tape.gradient(loss, variables)
        extra = [] if depthwise is None else [_sums(depthwise, axis)]
        return grads + extra, outputs

    return {name: tf.function(lambda forward=forward: step(forward))
            for name, forward in (("keras", keras_call),
                                  ("two_step", two_step),
                                  ("extra_depthwise", extra_depthwise))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print("| case | keras ms | two_step ms | extra_depthwise ms | two_step / "
          "keras | extra_depthwise / keras | max relative output difference "
          "|")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, (shape, filters, data_format) in CASES.items():
        layer = keras.layers.SeparableConv2D(
            filters, 3, padding="same", data_format=data_format)
        x = tf.constant(rng.normal(size=shape) + 1.0, tf.float32)
        layer.build(shape)
        cotangent = tf.constant(rng.normal(
            size=layer.compute_output_shape(shape)), tf.float32)
        functions = steps(layer, x, cotangent)
        outputs = {key: f()[1].numpy() for key, f in functions.items()}
        difference = max(
            np.abs(out - outputs["keras"]).max() / np.abs(
                outputs["keras"]).max() for out in outputs.values())
        times = {key: [] for key in functions}
        for _ in range(args.rounds):
            for key, function in functions.items():
                start = time.perf_counter()
                tf.nest.map_structure(lambda t: t.numpy(), function()[0])
                times[key].append(time.perf_counter() - start)
        median = {key: 1000 * float(np.median(t)) for key, t in times.items()}
        print(f"| {name} | {median['keras']:.1f} | {median['two_step']:.1f} "
              f"| {median['extra_depthwise']:.1f} | "
              f"{median['two_step'] / median['keras']:.2f} | "
              f"{median['extra_depthwise'] / median['keras']:.2f} | "
              f"{difference:.1e} |")


if __name__ == "__main__":
    main()
