"""Share of the kernel parameters that BNP preconditions in small BERT,
GPT-2 and ViT backbones of KerasHub, built from configs (no weights).

    python docs/benchmark/preconditioned_share.py

Kernels are the trainable variables named `kernel` (Dense, EinsumDense,
Conv); preconditioned are those in a `rules.blocks` of the model's layers.
Needs `pip install keras-hub`.
"""

import keras_hub

from keras_bnp import registry
from keras_bnp import rules

BACKBONES = {
    # bert_tiny_en_uncased's sizes.
    "BERT (2 layers, 128 wide)": lambda: keras_hub.models.BertBackbone(
        vocabulary_size=30522, num_layers=2, num_heads=2, hidden_dim=128,
        intermediate_dim=512, max_sequence_length=512),
    # gpt2_base_en's sizes, 2 layers.
    "GPT-2 (2 layers, 768 wide)": lambda: keras_hub.models.GPT2Backbone(
        vocabulary_size=50257, num_layers=2, num_heads=12, hidden_dim=768,
        intermediate_dim=3072, max_sequence_length=1024),
    # ViT-Tiny's sizes, 2 layers.
    "ViT (2 layers, 192 wide)": lambda: keras_hub.models.ViTBackbone(
        image_shape=(224, 224, 3), patch_size=16, num_layers=2, num_heads=3,
        hidden_dim=192, mlp_dim=768),
}


def share(model):
    """`(preconditioned kernel parameters, kernel parameters, all
    trainable parameters)` of `model`."""
    preconditioned = {id(block.kernel): _size(block.kernel)
                      for layer in registry.supported_layers(model)
                      for block in rules.blocks(layer)}
    kernels = [v for v in model.trainable_variables
               if v.path.split("/")[-1] == "kernel"]
    return (sum(preconditioned.values()), sum(map(_size, kernels)),
            sum(map(_size, model.trainable_variables)))


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= dim
    return size


def main():
    print("| backbone | kernel parameters | preconditioned | share of "
          "kernels | share of all trainable |")
    print("|---|---|---|---|---|")
    for name, build in BACKBONES.items():
        done, kernels, total = share(build())
        print(f"| {name} | {kernels:,} | {done:,} | {done / kernels:.1%} | "
              f"{done / total:.1%} |")


if __name__ == "__main__":
    main()
