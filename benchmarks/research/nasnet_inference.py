"""NASNetMobile (32x32, `weights=None`, its own softmax head) after 25
steps on 800 bundled MNIST digits (padded to 32x32, three channels),
batch size 32, seed 0, with BNP(0.01), SGD(0.01, momentum 0.9) and
Adam(1e-3): whether its outputs in inference mode (BatchNorm's moving
averages) and in training mode are finite, and the largest BatchNorm
moving variance. `--scale 255` feeds raw pixel values.

    python -m benchmarks.research.nasnet_inference --scale 1
    python -m benchmarks.research.nasnet_inference --scale 255
"""

import argparse
import warnings

import keras
import numpy as np

import keras_bnp
from keras_bnp import data

parser = argparse.ArgumentParser()
parser.add_argument("--scale", type=float, default=1.0)
scale = parser.parse_args().scale
warnings.simplefilter("ignore")
(x, y), _ = data.load_mnist()
x = scale * np.repeat(np.pad(x[:800], ((0, 0), (2, 2), (2, 2)))[..., None],
                      3, -1)
y = y[:800]
print("method | inference finite | training finite | max moving variance")
for method in ("bnp", "sgd", "adam"):
    keras.utils.set_random_seed(0)
    base = keras.applications.NASNetMobile(
        input_shape=(32, 32, 3), weights=None, classes=10)
    model, optimizer = base, {
        "sgd": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "bnp": lambda: keras_bnp.BNP(0.01)}[method]()
    if method == "bnp":
        model = keras_bnp.BNPModel(base.inputs, base.outputs)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # 25 steps
    inference = model.predict(x[:64], verbose=0)
    training = model(x[:64], training=True).numpy()
    variance = max(float(np.max(v.numpy())) for v in model.weights
                   if "moving_variance" in v.path)
    print(f"{method} | {np.isfinite(inference).all()} | "
          f"{np.isfinite(training).all()} | {variance:.3g}")
