"""Times two ways to take per-channel sums of squares of a layer input on
this machine: `reduce_sum(square(x))` (writes `x^2` out) against
`square(reduce_euclidean_norm(x))` (one pass), each with the `sum(x)` that
the input sums also take.

    python -m benchmarks.research.sum_of_squares [ROWSxCHANNELS or NxHxWxC ...]

Each is evaluated 50 times in a `tf.while_loop` per call (no Python call
per evaluation); rounds interleave the two; medians in µs per evaluation.
"""

import sys
import time

import numpy as np
import tensorflow as tf

SHAPES = ["32x784", "128x784", "32x128", "128x128",
          "32x26x26x16", "32x12x12x32", "32x28x28x1",
          "128x26x26x16", "128x12x12x32", "128x28x28x1"]
REPEATS, ROUNDS, CALLS = 50, 9, 10


def square_then_sum(x, axes):
    return tf.reduce_sum(tf.square(x), axis=axes)


def squared_norm(x, axes):
    return tf.square(tf.math.reduce_euclidean_norm(x, axis=axes))


def loop(sum_of_squares, x):
    axes = list(range(x.shape.rank - 1))

    @tf.function
    def run():
        def body(i, total):
            sums = tf.reduce_sum(x, axis=axes) + sum_of_squares(x, axes)
            return i + 1, total + sums[0]
        return tf.while_loop(lambda i, _: i < REPEATS, body, (0, 0.0))

    run()
    return run


def main(shapes):
    print(f"{'shape':>16} {'square+sum':>11} {'norm^2':>8}  (us)")
    for text in shapes:
        shape = tuple(int(d) for d in text.split("x"))
        x = tf.constant(np.random.default_rng(0).uniform(size=shape),
                        tf.float32)
        runs = {f: loop(f, x) for f in (square_then_sum, squared_norm)}
        times = {f: [] for f in runs}
        for _ in range(ROUNDS):
            for f, run in runs.items():
                start = time.perf_counter()
                for _ in range(CALLS):
                    run()
                times[f].append((time.perf_counter() - start) / CALLS
                                / REPEATS * 1e6)
        medians = [np.median(t) for t in times.values()]
        print(f"{text:>16} {medians[0]:11.1f} {medians[1]:8.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or SHAPES)
