"""The convergence study: a tiny configuration run through the benchmark
command, its plan and report checked against the runs it recorded."""

import json

import numpy as np
import pytest

from benchmarks import benchmark
from benchmarks import convergence

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow

RATES = {"bnp": (0.003, 0.03), "batchnorm90": (0.01, 0.1)}
ARGS = ["--task", "mlp", "--train-size", "64", "--epochs", "3",
        "--seeds", "0", "1", "--schedules", "cosine"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convergence, "RATES", RATES)
        benchmark.main(["--convergence", *ARGS, "--out-dir", str(out)])
    return out, json.loads((out / "results.json").read_text())


def _accuracy(record, epoch):
    return record["progress"][epoch - 1][2]


SEQUENCE = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def _tuned(results, method, schedule):
    """The rates tried on seed 0 and the best: the grid, extended by up to
    two neighbours in `SEQUENCE` while the best is at an edge."""
    rates = sorted(RATES[method])
    for _ in range(3):
        best = max(rates, key=lambda r: (_accuracy(
            results[f"{method}/{schedule}/{r}/0"], 3), -r))
        if len(rates) == len(RATES[method]) + 2 or best not in (
                rates[0], rates[-1]):
            return rates, best
        step = -1 if best == rates[0] else 1
        rates = sorted(rates + [SEQUENCE[SEQUENCE.index(best) + step]])


def test_every_run_is_recorded_once_with_the_tuned_rate_for_seed_1(
        tiny_study):
    _, results = tiny_study
    expected = set()
    for schedule in ("cosine",):
        for method in RATES:
            tried, best = _tuned(results, method, schedule)
            expected |= {f"{method}/{schedule}/{r}/0" for r in tried}
            expected.add(f"{method}/{schedule}/{best}/1")
            other = results[f"{method}/{schedule}/{best}/1"]
            if other["diverged"] or _accuracy(other, 3) < 0.5 * _accuracy(
                    results[f"{method}/{schedule}/{best}/0"], 3):
                lower = [r for r in tried if r < best]
                if lower:  # seed 1 also at the next lower rate
                    expected.add(f"{method}/{schedule}/{lower[-1]}/1")
            if (method, schedule) == ("batchnorm90", "cosine"):
                expected |= {f"batchnorm/cosine/{best}/{s}" for s in (0, 1)}
    assert set(results) == expected
    for key, record in results.items():
        method, schedule, rate, seed = key.split("/")
        assert (record["method"], record["schedule"], record["seed"],
                record["learning_rate"], record["epochs"],
                record["train_size"], record["batch_size"]) == (
            method, schedule, int(seed), float(rate), 3, 64, 32)
        assert [p[0] for p in record["progress"]] == [2, 4, 6]  # steps


def test_report_states_the_recorded_numbers(tiny_study):
    out, results = tiny_study
    text = (out / "report.md").read_text()
    assert ("Command: `python -m benchmarks.benchmark --convergence "
            + " ".join(ARGS) + f" --out-dir {out}`") in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[3] in ("1", "2"):
            rows[tuple(cells[:3])] = cells[3:]
    # Every rate tried on seed 0, and Keras' BatchNorm.
    assert len(rows) == 1 + sum(len(_tuned(results, m, s)[0])
                                for m in RATES for s in ("cosine",))
    for (method, schedule, rate), cells in rows.items():
        records = [r for k, r in results.items()
                   if k.startswith(f"{method}/{schedule}/{float(rate)}/")]
        assert cells[0] == str(len(records))
        for cell, epoch in zip(cells[1:4], (1, 2, 3)):
            values = [_accuracy(r, epoch) for r in records]
            assert cell == (f"{np.mean(values):.4f} ± {np.std(values):.4f}"
                            if len(values) == 2 else f"{values[0]:.4f}")
    # Time to target: BatchNorm(0.99)'s row, re-derived from its runs.
    tuned = {}
    for key, record in results.items():
        method, schedule, rate, _ = key.split("/")
        tuned.setdefault((method, schedule, rate), []).append(record)
    tuned = {k: v for k, v in tuned.items() if len(v) == 2}
    best = max(np.mean([_accuracy(r, 3) for r in v]) for v in tuned.values())
    (key, records), = [(k, v) for k, v in tuned.items()
                       if k[0] == "batchnorm"]
    cells = []
    for fraction in (0.95, 0.98, 0.99):
        hits = [next(((e + 1, p[1]) for e, p in enumerate(r["progress"])
                      if p[2] >= fraction * best), None) for r in records]
        cells.append("-" if None in hits else
                     f"{np.mean([h[0] for h in hits]):.1f}, "
                     f"{np.mean([h[1] for h in hits]):.0f}")
    assert (f"| batchnorm (cosine, {float(key[2]):g}) | "
            + " | ".join(cells) + " |") in text


def test_report_only_reproduces_the_report(tiny_study, monkeypatch):
    out, _ = tiny_study
    before = (out / "report.md").read_text()
    monkeypatch.setattr(convergence, "RATES", RATES)
    monkeypatch.setattr(convergence.experiment, "run",
                        lambda *a, **k: pytest.fail("ran"))
    convergence.main([*ARGS, "--out-dir", str(out), "--report-only"])
    assert (out / "report.md").read_text() == before


def test_a_study_split_by_method_merges_into_the_same_report(
        tiny_study, tmp_path, monkeypatch):
    out, results = tiny_study
    for method in RATES:  # as two processes, one per method, would write
        folder = tmp_path / method
        folder.mkdir()
        part = {k: r for k, r in results.items() if k.split("/")[0] in (
            method, "batchnorm" if method == "batchnorm90" else method)}
        (folder / "results.json").write_text(json.dumps(part))
    monkeypatch.setattr(convergence, "RATES", RATES)
    monkeypatch.setattr(convergence.experiment, "run",
                        lambda *a, **k: pytest.fail("ran"))
    merged = tmp_path / "merged"
    # Nothing left to run: the plan sees the merged runs.
    convergence.main([*ARGS, "--out-dir", str(merged), "--merge",
                      *(str(tmp_path / m) for m in RATES)])
    tables = [(p / "report.md").read_text().split("\n", 4)[4]
              for p in (out, merged)]
    assert tables[0] == tables[1]
    assert not (merged / "results.json").exists()


def test_a_seed_failing_at_the_tuned_rate_adds_the_next_lower_rate(
        monkeypatch):
    monkeypatch.setattr(convergence, "RATES", {"bnp": (0.003, 0.01, 0.03)})

    def record(accuracy, diverged=False):
        return {"progress": [[1, 1.0, accuracy]], "diverged": diverged}

    config = {**convergence.DEFAULTS, "methods": ["bnp"],
              "schedules": ["cosine"]}
    results = {"bnp/cosine/0.003/0": record(0.97),
               "bnp/cosine/0.01/0": record(0.98),  # the tuned rate
               "bnp/cosine/0.03/0": record(0.10, diverged=True),
               "bnp/cosine/0.01/1": record(0.98)}
    assert convergence.plan(results, config, False) == [
        ("bnp", "cosine", 0.01, 2)]
    # Seed 2 ends at 0.12, below half of seed 0's 0.98 (no NaN needed).
    results["bnp/cosine/0.01/2"] = record(0.12)
    assert convergence.plan(results, config, False) == [
        ("bnp", "cosine", 0.003, 1), ("bnp", "cosine", 0.003, 2)]
    results["bnp/cosine/0.01/2"] = record(0.50)  # above half: no failure
    assert convergence.plan(results, config, False) == []
