"""The notebooks run top to bottom in fast mode (KERAS_BNP_FAST=1)."""

import pathlib

import nbformat
import pytest
from helpers import repository_url
from nbclient import NotebookClient

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _outputs(notebook):
    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            text.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BNP_FAST", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    notebook = nbformat.read(path, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells
                   if cell.cell_type == "code"), "commit without outputs"
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _outputs(notebook)
    assert "bundled" in text  # fast mode uses the offline sample
    images = [o for c in notebook.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "every notebook draws at least one plot"
    if path.name.startswith("03"):
        assert "optimizer state restored exactly: True" in text


def test_three_notebooks_with_colab_badges_to_the_repository():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_small_batches.ipynb", "03_cnn.ipynb"]
    repository = repository_url().removeprefix("https://github.com/")
    for path in NOTEBOOKS:
        first = nbformat.read(path, as_version=4).cells[0].source
        link = (f"https://colab.research.google.com/github/{repository}/blob/"
                f"main/notebooks/{path.name}")
        # Where setup.py's REPOSITORY_URL changes, the badges change with it.
        assert f"colab-badge.svg)]({link})" in first, link
