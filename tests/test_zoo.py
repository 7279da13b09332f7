"""The zoo benchmark: a tiny configuration run through the command, its
report checked against the runs it recorded."""

import json

import numpy as np
import pytest

from benchmarks import benchmark
from benchmarks import zoo

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow


SEQUENCE = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    rates = {"bnp": (0.003, 0.03), "sgd": (0.003, 0.03), "adam": (0.001,)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zoo, "RATES", rates)
        patch.setattr(zoo, "EDGE_STEPS", 1)
        benchmark.main(["--zoo", "--models", "tabular", "--seeds", "0", "1",
                        "--train-size", "96", "--epochs", "2",
                        "--out-dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    return out, results, rates


def test_seeds_after_the_first_run_at_its_best_rate(tiny_zoo):
    _, results, rates = tiny_zoo
    for method, grid in rates.items():
        runs = [r for r in results if r["method"] == method]
        first = {r["learning_rate"]: r for r in runs if r["seed"] == 0}

        def best(rates, first=first):  # re-derived: lowest final val. loss
            return min(rates, key=lambda rate: (
                first[rate]["val_loss"][-1]
                if np.isfinite(first[rate]["val_loss"][-1]) else np.inf,
                rate))

        # The grid, and at most one rate past each edge while the best is
        # there (the lower edge first).
        tried = sorted(grid)
        while True:
            edge = best(tried)
            if edge == tried[0] and min(tried) == min(grid):
                tried.insert(0, SEQUENCE[SEQUENCE.index(edge) - 1])
            elif edge == tried[-1] and max(tried) == max(grid):
                tried.append(SEQUENCE[SEQUENCE.index(edge) + 1])
            else:
                break
        assert sorted(first) == pytest.approx(tried)
        assert [r["learning_rate"] for r in runs if r["seed"] == 1] == [
            best(list(first))]
        for run in runs:
            assert len(run["val_loss"]) == len(run["seconds"]) == 2
            assert np.all(np.diff(run["seconds"]) > 0)


def _rate(cell):
    """The learning rate in a report cell: `mean ± std (rate[, edge])`."""
    return float(cell.split("(")[1].split(")")[0].split(",")[0])


def test_report_states_the_recorded_numbers(tiny_zoo):
    out, results, _ = tiny_zoo
    text = (out / "report.md").read_text()
    row = next(line for line in text.splitlines()
               if line.startswith("| tabular |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    means = {}
    for column, method in zip(cells[1:4], ("bnp", "sgd", "adam")):
        rate = _rate(column)
        tried = [r["learning_rate"] for r in results
                 if (r["method"], r["seed"]) == (method, 0)]
        assert (", edge)" in column) == (rate in (min(tried), max(tried)))
        test = np.array([r["test_loss"] for r in results if (
            r["method"], r["learning_rate"]) == (method, rate)])
        assert len(test) == 2  # seed 0 and seed 1 at the tuned rate
        assert column.startswith(f"{test.mean():.4g} ± {test.std():.2g} (")
        means[method] = (test.mean(), test.std())
    (bnp, bnp_std), (sgd, sgd_std) = means["bnp"], means["sgd"]
    assert np.isfinite(bnp)  # BNP trains on the raw year and price columns
    assert cells[4] == (f"{(bnp - sgd) / max(bnp_std, sgd_std):+.1f}"
                        if np.isfinite(sgd) else "SGD diverged")
    # The raw year and price columns: BNP's scaling acts on all 3 layers.
    assert cells[5] == "3"
    assert cells[7] == "2"  # seeds
    sgd_runs = [r for r in results if (r["method"], r["learning_rate"]) == (
        "sgd", _rate(cells[2]))]
    curve = np.mean([r["val_loss"] for r in sgd_runs], 0)
    last = np.mean([r["train_loss"][-1] for r in sgd_runs])
    assert ("sgd " + ", ".join(f"{v:.4g}" for v in curve)
            + f" (training {last:.4g}, ") in text
    assert (out / "zoo.png").stat().st_size > 1000


def test_report_only_reproduces_the_report(tiny_zoo, monkeypatch):
    out, _, rates = tiny_zoo
    before = (out / "report.md").read_text()
    monkeypatch.setattr(zoo, "RATES", rates)
    monkeypatch.setattr(zoo, "run", lambda *args: pytest.fail("ran"))
    zoo.main(["--models", "tabular", "--seeds", "0", "1", "--train-size",
              "96", "--epochs", "2", "--out-dir", str(out), "--report-only"])
    after = (out / "report.md").read_text()
    assert after.split("\n", 3)[3] == before.split("\n", 3)[3]


def test_sliced_wasserstein_distance_by_hand():
    a = np.array([[0.0, 0.0], [1.0, 1.0]], "float32")
    b = np.array([[3.0, 3.0], [0.0, 0.0]], "float32")
    axes = np.eye(2, dtype="float32")
    # Along each axis: {0, 1} against {0, 3}, sorted: |0-0| and |1-3|.
    assert float(zoo.sliced_wasserstein(a, b, axes)) == pytest.approx(1.0)
    # The diagonal: {0, sqrt 2} against {0, 3 sqrt 2}: |2 sqrt 2| / 2.
    diagonal = np.array([[1.0], [1.0]], "float32") / np.sqrt(2.0)
    assert float(zoo.sliced_wasserstein(a, b, diagonal)) == pytest.approx(
        np.sqrt(2.0), rel=1e-6)
    # The order of the examples does not matter.
    assert float(zoo.sliced_wasserstein(a, a[::-1], axes)) == 0.0
