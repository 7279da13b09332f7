import pathlib
import re

from setuptools import find_packages
from setuptools import setup

HERE = pathlib.Path(__file__).parent
# The project's home, in this one place: the package's project URLs, the
# README's relative links on the registry page (made absolute below) and
# the notebooks' Colab badges (tests/test_notebooks.py checks that they
# match). No public repository exists yet; this is the address it is
# meant to have.
REPOSITORY_URL = "https://github.com/keras-bnp/keras_bnp"
VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (HERE / "keras_bnp" / "__init__.py").read_text(encoding="utf-8"),
    re.M,
).group(1)
# tensorflow-datasets 4.9.x imports importlib_resources on every Python but
# declares it only below 3.9 (tensorflow/datasets#11212): without it, loading
# MNIST fails with ModuleNotFoundError.
DATA = ["tensorflow-datasets", "importlib_resources"]


def absolute_links(markdown):
    """`markdown` with its relative links and images, and its links to its
    own sections, pointing into the repository (the registry page has no
    files next to it, nor the repository's heading anchors)."""
    def absolute(match):
        image, path = match.groups()
        kind = "raw" if image else "blob"
        if path.startswith("#"):
            path = "README.md" + path
        return f"{image or ''}]({REPOSITORY_URL}/{kind}/main/{path})"

    return re.sub(r"(!\[[^\]]*)?\]\((?!https?://)([^)\s]+)\)", absolute,
                  markdown)


setup(
    name="keras-bnp",
    version=VERSION,
    description=(
        "Batch Normalization Preconditioning (Lange, Helfrich & Ye, 2022) "
        "as a Keras 3 optimizer"
    ),
    long_description=absolute_links(
        (HERE / "README.md").read_text(encoding="utf-8")),
    long_description_content_type="text/markdown",
    author="keras_bnp contributors",
    url=REPOSITORY_URL,
    project_urls={
        "Source": REPOSITORY_URL,
        "Issues": f"{REPOSITORY_URL}/issues",
        "Documentation": f"{REPOSITORY_URL}/blob/main/README.md",
    },
    # The code is Apache-2.0; the bundled MNIST sample is CC BY-SA 3.0.
    license_expression="Apache-2.0 AND CC-BY-SA-3.0",
    license_files=["LICENSE", "keras_bnp/data/LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    keywords=["keras", "tensorflow", "optimizer", "batch normalization",
              "preconditioning"],
    # The oldest versions the tests have run against: Python 3.11,
    # TensorFlow 2.16.2, Keras 3.14.0 (which needs Python 3.11).
    python_requires=">=3.11",
    packages=find_packages(include=["keras_bnp", "keras_bnp.*"]),
    package_data={"keras_bnp": ["data/mnist10k.npz", "data/README.md",
                                "data/LICENSE"]},
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.14,<3.16",
        "numpy",
    ],
    extras_require={
        "data": DATA,
        "test": DATA + [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "tensorboard",
            "matplotlib",
            "nbclient",
            "nbformat",
            "ipykernel",
            # tests/test_packaging.py builds the wheel and sdist offline.
            "build",
            "setuptools>=77",
        ],
        # The zoo's keras-hub models need keras-hub.
        "benchmark": ["matplotlib", "keras-hub"],
        # What the notebooks use beside keras_bnp.
        "notebooks": DATA + ["matplotlib"],
    },
)
