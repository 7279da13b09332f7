"""The cost of one XLA call from a TensorFlow graph on this machine: a
jit-compiled function that adds to K scalar variables, called in a graph
loop, against the same adds as plain TensorFlow ops.

    python -m benchmarks.research.xla_launch
"""

import time

import numpy as np
import tensorflow as tf


def per_call(loop):
    """Median microseconds per iteration of `loop(n)`."""
    loop(tf.constant(2))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        loop(tf.constant(2000))
        samples.append((time.perf_counter() - start) / 2000 * 1e6)
    return np.median(samples)


def loops(k):
    """Graph loops that add 1 to each of `k` variables per iteration: in
    one XLA call, and as plain TF ops."""
    variables = [tf.Variable(0.0) for _ in range(k)]

    def add_all():
        for variable in variables:
            variable.assign_add(1.0)

    compiled = tf.function(add_all, jit_compile=True)

    @tf.function
    def xla_loop(n):
        for _ in tf.range(n):
            compiled()

    @tf.function
    def ops_loop(n):
        for _ in tf.range(n):
            add_all()

    return {"XLA call": xla_loop, "TF ops": ops_loop}


for k in (1, 5, 10, 20, 40):
    print(f"{k:3d} variables: " + ", ".join(
        f"{name} {per_call(loop):.1f} us" for name, loop in loops(k).items()),
        flush=True)
