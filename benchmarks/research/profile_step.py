"""Profiles one model's training step with the TensorFlow profiler and
prints the time per step of each op and XLA thunk, summed over threads.

    python -m benchmarks.research.profile_step mlp 32 bnp [steps] [digits|noise]

On the fixed batch of the benchmark's cost table (`benchmark.timing_batch`).
"""

import collections
import glob
import sys
import tempfile

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from benchmarks import benchmark
from benchmarks import experiment

task, batch_size, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 500
inputs = sys.argv[5] if len(sys.argv) > 5 else "digits"
x, y = benchmark.timing_batch(task, batch_size, inputs)
model = experiment.compiled_model(method, 1e-3, task=task)
model.fit(x, y, batch_size=batch_size, verbose=0)
train, _ = benchmark._step_loops(model, x, y, False)
train(5)
logdir = tempfile.mkdtemp()
tf.profiler.experimental.start(logdir)
train(steps)
tf.profiler.experimental.stop()
space = xplane_pb2.XSpace()
with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0],
          "rb") as f:
    space.ParseFromString(f.read())
total, count = collections.Counter(), collections.Counter()
for plane in space.planes:
    for line in plane.lines:
        if not line.name.startswith(("tf_Compute", "tf_numa")):
            continue  # the op threads only
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name
            name = name.split("/")[-1][:70]
            total[name] += event.duration_ps
            count[name] += 1
for name, ps in total.most_common(40):
    print(f"{ps / 1e6 / steps:9.1f} us/step {count[name] / steps:6.2f}x "
          f"{name}")
