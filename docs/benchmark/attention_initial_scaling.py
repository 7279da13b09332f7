"""Initial scaling of attention projections, on a small BERT classifier.

Trains the README's keras-hub example (a one-layer BERT built from its
config, 512 random token sequences, label = which half of the vocabulary
the first token is in) with `BNP(0.01)` for 3 epochs, seeds 0-2: with
BNP's initial scaling, which stops at the first attention projection
(`EinsumDense`), and, for comparison, with the projections and every layer
after them scaled to unit output variance like `Dense` layers. Prints the
training accuracy per epoch.

    python docs/benchmark/attention_initial_scaling.py
"""

import warnings

import keras
import keras_hub
import numpy as np

import keras_bnp
from keras_bnp import rules


def train(seed):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=12)
    task = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None)
    model = keras_bnp.BNPModel(task.input, task.output)
    model.compile(
        optimizer=keras_bnp.BNP(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    token_ids = np.random.default_rng(0).integers(1, 20, size=(512, 12))
    x = {"token_ids": token_ids, "segment_ids": np.zeros_like(token_ids),
         "padding_mask": np.ones_like(token_ids, dtype=bool)}
    y = (token_ids[:, 0] < 10).astype("int32")
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    return np.round(history.history["accuracy"], 3).tolist()


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    for scaled in (False, True):
        rules.EinsumDenseRule.scaled = scaled
        name = ("every layer scaled" if scaled
                else "scaling stops at attention")
        for seed in (0, 1, 2):
            print(f"{name}, seed {seed}: accuracy per epoch {train(seed)}",
                  flush=True)
