"""Which layers' input sums centre on the cost table's batches: after 20
training steps on the fixed batch, each tracked layer's largest running
`mean^2 / variance` over its channels (`statistics.input_sums` centres a
convolution's input when it exceeds `RAW_SUMS_MAX_RATIO`, and always a
Dense layer's, which is a batch of vectors in these models).

    python -m benchmarks.research.centring
"""

import keras
import numpy as np

from benchmarks import benchmark
from benchmarks import experiment
from keras_bnp import registry
from keras_bnp import statistics

for inputs in benchmark.TIMING_INPUTS:
    for task in experiment.TASKS:
        for batch_size in (32, 128):
            x, y = benchmark.timing_batch(task, batch_size, inputs)
            model = experiment.compiled_model("bnp", 1e-3, task=task)
            model.fit(x, y, batch_size=batch_size, epochs=21, verbose=0)
            ratios, centred = [], 0
            for layer in registry.supported_layers(model):
                mean, variance = model.optimizer.layer_statistics(layer)
                with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0
                    ratio = np.where(mean == 0, 0.0, mean**2 / variance)
                ratios.append(float(ratio.max()))
                centred += (isinstance(layer, keras.layers.Dense)
                            or ratios[-1] > statistics.RAW_SUMS_MAX_RATIO)
            print(f"{inputs:>6} {task} {batch_size:>3}: largest mean^2/var "
                  f"per layer {[round(r, 1) for r in ratios]}, "
                  f"{centred} of {len(ratios)} layers centre", flush=True)
