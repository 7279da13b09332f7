from setuptools import find_packages
from setuptools import setup

# tensorflow-datasets 4.9.x imports importlib_resources on every Python but
# declares it only below 3.9 (tensorflow/datasets#11212): without it, loading
# MNIST fails with ModuleNotFoundError.
DATA = ["tensorflow-datasets", "importlib_resources"]

setup(
    name="keras-bnp",
    version="0.1.0",
    description=(
        "Batch Normalization Preconditioning (Lange, Helfrich & Ye, 2022) "
        "as a Keras 3 optimizer"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_bnp", "keras_bnp.*"]),
    package_data={"keras_bnp": ["data/mnist10k.npz", "data/README.md"]},
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.10,<3.16",
        "numpy",
    ],
    extras_require={
        "data": DATA,
        "test": DATA + [
            "pytest",
            "hypothesis",
            "tensorboard",
            "matplotlib",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
        "benchmark": ["matplotlib"],
    },
)
