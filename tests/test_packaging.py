"""The wheel and sdist that `python -m build` makes: licenses, data, docs."""

import email
import hashlib
import json
import pathlib
import re
import runpy
import subprocess
import sys
import tarfile
import zipfile

import pytest
import setuptools
from helpers import repository_url

import keras_bnp

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # Without isolation: offline, with this environment's setuptools.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir",
         str(out), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300)
    version = keras_bnp.__version__
    return (out / f"keras_bnp-{version}-py3-none-any.whl",
            out / f"keras_bnp-{version}.tar.gz")


def test_wheel_holds_both_licenses_and_the_data_but_no_tests(dist):
    wheel, _ = dist
    info = f"keras_bnp-{keras_bnp.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        read = archive.read
        assert read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE"
                                                    ).read_bytes()
        data_license = read("keras_bnp/data/LICENSE").decode()
        assert read(f"{info}/licenses/keras_bnp/data/LICENSE").decode() == (
            data_license)
        readme = read("keras_bnp/data/README.md").decode()
        sample = read("keras_bnp/data/mnist10k.npz")
        metadata = email.message_from_bytes(read(f"{info}/METADATA"))
    assert "Apache License\n                           Version 2.0" in (
        ROOT / "LICENSE").read_text()
    words = " ".join(data_license.split())
    assert "Creative Commons Attribution-ShareAlike 3.0" in words
    assert "Yann LeCun, Corinna Cortes and Christopher J.C. Burges" in words
    # The data file is the one its README describes.
    assert hashlib.sha256(sample).hexdigest() in readme
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    assert "keras_bnp/demo.py" in names  # the README's first command
    assert metadata["Version"] == keras_bnp.__version__
    assert metadata["License-Expression"] == "Apache-2.0 AND CC-BY-SA-3.0"
    assert metadata["Requires-Python"] == ">=3.11"


def test_sdist_holds_licenses_notebooks_and_docs(dist):
    _, sdist = dist
    prefix = f"keras_bnp-{keras_bnp.__version__}/"
    with tarfile.open(sdist) as archive:
        names = {n.removeprefix(prefix) for n in archive.getnames()}
        pkg_info = archive.extractfile(prefix + "PKG-INFO").read().decode()
    wanted = {"LICENSE", "keras_bnp/data/LICENSE",
              "keras_bnp/data/mnist10k.npz", "docs/benchmarks.md",
              "docs/defaults.md"}
    wanted |= {str(p.relative_to(ROOT))
               for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert len(wanted) == 8 and wanted <= names
    # The registry page has no files beside it: every link is absolute.
    description = pkg_info.split("\n\n", 1)[1]
    targets = re.findall(r"\]\(([^)]+)\)", description)
    assert f"{repository_url()}/blob/main/docs/defaults.md" in targets
    assert all(t.startswith("https://") for t in targets)


def _setup_arguments(monkeypatch):
    """The keyword arguments setup.py passes to `setuptools.setup`."""
    captured = {}
    monkeypatch.setattr(setuptools, "setup", captured.update)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


def test_notebooks_install_what_they_import(monkeypatch):
    # Outside Colab, a notebook's install cell installs keras_bnp with an
    # extra; every third-party module its cells import must come with
    # keras_bnp or that extra, and the cell must run when one is missing.
    arguments = _setup_arguments(monkeypatch)
    base = {re.split(r"[<>=;\[ ]", r)[0].lower()
            for r in arguments["install_requires"]}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = ["".join(cell["source"]) for cell in
                 json.loads(path.read_text())["cells"]
                 if cell["cell_type"] == "code"]
        install = next(cell for cell in cells if "%pip install" in cell)
        extra = re.search(r'\{PACKAGE\}\[(\w+)\]', install).group(1)
        provided = base | {
            re.split(r"[<>=;\[ ]", r)[0].lower().replace("-", "_")
            for r in arguments["extras_require"][extra]}
        imported = {name for cell in cells for name in re.findall(
            r"^(?:import|from) (\w+)", cell, re.M)}
        third_party = imported - set(sys.stdlib_module_names) - {
            "keras_bnp", "keras"}
        assert third_party <= provided, (path.name, third_party - provided)
        # The extra's modules: those keras_bnp does not install.
        for module in (third_party - base) | {"keras_bnp"}:
            assert f'"{module}"' in install, (path.name, module)
