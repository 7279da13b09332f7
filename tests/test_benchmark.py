"""`python -m benchmarks.benchmark` in a tiny configuration."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import benchmark
from benchmarks import experiment
from keras_bnp import data

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow

COMMAND = [
    sys.executable, "-m", "benchmarks.benchmark", "--methods", "bnp",
    "batchnorm", "--batch-sizes", "4", "32", "--seeds", "0",
    "--train-size", "200", "--epochs", "2", "--timing-rounds", "1",
    "--timing-batch-sizes", "16",
]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def test_tiny_benchmark_writes_report_plots_and_json(tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run(
        COMMAND + ["--timing-processes", "2", "--out-dir", str(out)],
        check=True, capture_output=True, text=True, env=ENV, timeout=600)
    # sgd is added as the reference: 3 methods x 2 batch sizes x 3 rates.
    assert run.stdout.count("[") == 18
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 18
    assert {r["method"] for r in results} == {"sgd", "bnp", "batchnorm"}
    assert all(len(r["loss_curve"]) == 2 for r in results)
    # The cost table, once in each of two fresh processes.
    processes = json.loads((out / "timing.json").read_text())["mlp"]["16"]
    assert len(processes) == 2
    for times in processes:
        assert set(times) == {"sgd", "bnp", "batchnorm"}
        assert all(v["train"] > 0 for v in times.values())
    report = (out / "report.md").read_text()
    assert ("One fixed batch of bundled MNIST digits, steps in a TensorFlow "
            "graph (what `fit` runs on CPU by default)." in report)
    # bnp's ratio to SGD: the median of the two processes' ratios, and range.
    cost = report.split("cost per step, batch size 16")[1]
    row = next(line for line in cost.splitlines()
               if line.startswith("| bnp |"))
    ratios = sorted(t["bnp"]["train"] / t["sgd"]["train"] for t in processes)
    assert (f"| {np.median(ratios):.2f}x ({ratios[0]:.2f}–{ratios[1]:.2f}) |"
            in row)
    assert "## MLP: test accuracy at the tuned learning rate" in report
    assert "| method | bs 4 | bs 32 |" in report
    for method in ("sgd", "bnp", "batchnorm"):
        assert f"| {method} | 0." in report
    assert "--train-size 200" in report
    for name in ("mlp_accuracy.png", "mlp_learning_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second call resumes: nothing left to train; it times steps
    # compiled whole with XLA.
    again = subprocess.run(
        COMMAND + ["--timing-jit-compile", "--out-dir", str(out)],
        check=True, capture_output=True, text=True, env=ENV, timeout=600)
    assert "[1/" not in again.stdout
    assert len(json.loads((out / "results.json").read_text())) == 18
    assert ("steps compiled whole with XLA (`jit_compile=True`, what `fit` "
            "picks on a GPU)." in (out / "report.md").read_text())
    processes = json.loads((out / "timing.json").read_text())["mlp"]["16"]
    assert len(processes) == 1 and set(processes[0]) == {
        "sgd", "bnp", "batchnorm"}
    # Another budget in the same folder trains anew and reports only its
    # own runs: sgd and bnp x 3 rates at batch size 32, one epoch.
    other = COMMAND[:4] + ["bnp", "--batch-sizes", "32", "--seeds", "0",
                           "--train-size", "200", "--epochs", "1",
                           "--timing-batch-sizes"]
    third = subprocess.run(other + ["--out-dir", str(out)], check=True,
                           capture_output=True, text=True, env=ENV,
                           timeout=600)
    assert "[6/6]" in third.stdout and "[7/" not in third.stdout
    assert len(json.loads((out / "results.json").read_text())) == 24
    report = (out / "report.md").read_text()
    assert "Data: MLP on MNIST (bundled), 200 training images, 1 epochs" \
        in report
    assert "| method | bs 32 |" in report and "batchnorm" not in report


def test_bad_timing_processes_is_a_usage_error():
    run = subprocess.run(COMMAND + ["--timing-processes", "0"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 2
    assert "--timing-processes: must be at least 1, got 0" in run.stderr


@pytest.mark.parametrize("task, shape", [("mlp", (784,)), ("cnn", (28, 28, 1))])
def test_timing_batch_is_real_digits_or_noise(task, shape):
    (digits, labels), _ = data.load_mnist()
    x, y = benchmark.timing_batch(task, 8001)  # one more than the sample
    assert x.shape == (8001, *shape)
    np.testing.assert_array_equal(x[:8000].reshape(digits.shape), digits)
    np.testing.assert_array_equal(x[8000].reshape(28, 28), digits[0])
    np.testing.assert_array_equal(y[:8000], labels)
    x, y = benchmark.timing_batch(task, 64, "noise")
    assert x.shape == (64, *shape) and 0 <= x.min() and x.max() < 1
    assert 0.4 < x.mean() < 0.6 and set(y) <= set(range(10))
    with pytest.raises(ValueError, match="one of .*Received: inputs='mnist'"):
        benchmark.timing_batch(task, 4, "mnist")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_inference_loop_sums_the_plain_model_outputs(jit_compile):
    x, y = benchmark.timing_batch("mlp", 8)
    model = experiment.compiled_model("bnp", 1e-3, task="mlp")
    model.fit(x, y, batch_size=8, verbose=0)
    one_call = np.sum(model.predict(x, verbose=0), dtype="float64")
    _, infer = benchmark._step_loops(model, x, y, jit_compile)
    # Every call sees the same inputs, however the loop is compiled.
    np.testing.assert_allclose(infer(4), 4 * one_call, rtol=1e-5)


def _run(method, learning_rate, seed, validation, test, batch_size=4):
    return {"task": "mlp", "method": method, "batch_size": batch_size,
            "learning_rate": learning_rate, "seed": seed,
            "validation_accuracy": validation, "test_accuracy": test}


# Two learning rates per method; validation accuracy picks 0.01 for bnp
# (mean 0.85 against 0.80) and 0.03 for sgd (0.82 against 0.81), whatever
# the test accuracies. Seed 2 ran only for bnp.
RESULTS = [
    _run("bnp", 0.01, 0, 0.84, 0.91), _run("bnp", 0.01, 1, 0.86, 0.89),
    _run("bnp", 0.01, 2, 0.85, 0.95),
    _run("bnp", 0.03, 0, 0.80, 0.99), _run("bnp", 0.03, 1, 0.80, 0.99),
    _run("sgd", 0.01, 0, 0.81, 0.99), _run("sgd", 0.01, 1, 0.81, 0.99),
    _run("sgd", 0.03, 0, 0.83, 0.87), _run("sgd", 0.03, 1, 0.81, 0.905),
]


def test_paired_differences_use_each_methods_tuned_rate_and_shared_seeds():
    differences = benchmark.paired_differences(RESULTS, "mlp", "bnp", "sgd", 4)
    np.testing.assert_allclose(differences, [4.0, -1.5], atol=1e-9)
    assert benchmark.paired_differences(RESULTS, "mlp", "bnp", "sgd", 32) == []


def test_plots_are_drawn_from_results_alone(tmp_path):
    config = {"tasks": ["mlp"], "methods": ["sgd", "bnp"],
              "batch_sizes": [4, 32], "source": "bundled"}
    paths = benchmark.plots(config, RESULTS, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "mlp_accuracy.png", "mlp_learning_rate.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tiny_deep_suite_reports_accuracy_and_time_to_batchnorm(tmp_path):
    out = tmp_path / "deep"
    benchmark.main([
        "--deep", "--tasks", "deep_mlp", "--batch-sizes", "64",
        "--seeds", "0", "1", "--train-size", "512", "--methods", "batchnorm",
        "bnp", "--timing-batch-sizes", "64", "--timing-rounds", "1",
        "--out-dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    methods = ("sgd", "batchnorm", "bnp")  # sgd is added as the reference

    def tuned(method):  # the best rate on seed 0, the tuning seed
        return max((r for r in results
                    if r["method"] == method and r["seed"] == 0),
                   key=lambda r: r["validation_accuracy"])

    def accuracy(method, lr):
        return next(r["validation_accuracy"] for r in results if (
            r["method"], r["learning_rate"], r["seed"]) == (method, lr, 0))

    # Seed 0 runs the deep grid, and up to two rates past an edge that was
    # the best; seed 1 only each method's rate from it.
    lower = {0.0003: 0.0001, 0.0001: 0.00003}
    higher = {0.1: 0.3, 0.3: 1.0}
    expected = []
    for method in methods:
        rates = list(benchmark.DEEP_SGD_RATES)
        for _ in range(2):
            best = max(rates, key=lambda lr: accuracy(method, lr))
            if best == min(rates):
                rates.append(lower[best])
            elif best == max(rates):
                rates.append(higher[best])
        expected += [(method, lr, 0) for lr in rates]
        expected.append((method, tuned(method)["learning_rate"], 1))
    assert sorted((r["method"], r["learning_rate"], r["seed"])
                  for r in results) == sorted(expected)
    for r in results:
        # 8 evaluations over 8 steps; training time grows, accuracy is
        # the final one.
        assert [p[0] for p in r["progress"]] == list(range(1, 9))
        assert np.all(np.diff([p[1] for p in r["progress"]]) > 0)
        assert r["validation_accuracy"] == r["progress"][-1][2]
    report = (out / "report.md").read_text()
    assert ("extended by up to 2 rates of the 1-3-10 sequence past an edge "
            "that was a method's best, on seed(s) [0], the other seeds run "
            "at that rate only; seeds [0, 1]") in report
    timing = json.loads((out / "timing.json").read_text())["deep_mlp"]["64"]

    def runs(method):  # both seeds at the tuned rate
        lr = tuned(method)["learning_rate"]
        return [r for r in results
                if r["method"] == method and r["learning_rate"] == lr]

    target = np.mean([r["validation_accuracy"] for r in runs("batchnorm")])
    assert (f"training to BatchNorm's final validation accuracy "
            f"(bs 64: {target:.3f})" in report)
    for method in methods:
        accuracies = [r["validation_accuracy"] for r in runs(method)]
        assert len(accuracies) == 2
        assert (f"| {method} | {np.mean(accuracies):.3f} ± "
                f"{np.std(accuracies):.3f} "
                f"(lr {tuned(method)['learning_rate']:g}) |") in report
        # Steps to the target times the cost table's step time, mean over
        # the seeds that reached it.
        reached = [next((p[0] for p in r["progress"] if p[2] >= target),
                        None) for r in runs(method)]
        reached = [step for step in reached if step is not None]
        if reached:
            step = np.mean(reached)
            seconds = step * timing[0][method]["train"]
            assert (f"| {method} | {step:.0f} steps, {seconds:.1f} s "
                    f"({len(reached)}/2) |" in report)
        else:
            assert f"| {method} | — (0/2) |" in report
        # Every rate of the tuning seed, † where the loss ended at or
        # above a uniform guess's.
        grid = sorted((r for r in results
                       if r["method"] == method and r["seed"] == 0),
                      key=lambda r: r["learning_rate"])
        assert "| {} | {} |".format(method, " · ".join(
            f"{r['learning_rate']:g}: {r['validation_accuracy']:.2f}"
            + ("†" if not r["train_loss"] < np.log(10) else "")
            for r in grid)) in report
    # The same report from another folder that merges this one's runs and
    # cost table, running nothing.
    again = tmp_path / "again"
    benchmark.main([
        "--deep", "--tasks", "deep_mlp", "--batch-sizes", "64",
        "--seeds", "0", "1", "--train-size", "512", "--methods", "batchnorm",
        "bnp", "--report-only", "--merge", str(out), "--out-dir", str(again)])
    assert json.loads((again / "results.json").read_text()) == results
    assert json.loads((again / "timing.json").read_text()) == {
        "deep_mlp": {"64": timing}}

    def without_command(text):
        return [line for line in text.splitlines()
                if not line.startswith("Command:")]

    assert without_command((again / "report.md").read_text()) == (
        without_command(report))
    # Reported again in place, the folder keeps its own cost table.
    benchmark.main([
        "--deep", "--tasks", "deep_mlp", "--batch-sizes", "64",
        "--seeds", "0", "1", "--train-size", "512", "--methods", "batchnorm",
        "bnp", "--report-only", "--out-dir", str(again)])
    assert json.loads((again / "timing.json").read_text()) == {
        "deep_mlp": {"64": timing}}
    assert without_command((again / "report.md").read_text()) == (
        without_command(report))
    assert "![deep_mlp, batch size 64](deep_mlp_bs64_progress.png)" in report
    png = (out / "deep_mlp_bs64_progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_keeps_own_runs_and_adds_the_others():
    def run(method, lr, seed, accuracy, train_size=3000):
        return {"task": "vgg", "method": method, "batch_size": 4,
                "learning_rate": lr, "seed": seed, "dataset": "mnist",
                "train_size": train_size, "epochs": 1,
                "validation_accuracy": accuracy}

    own = [run("bnp", 0.01, 0, 0.9), run("sgd", 0.01, 0, 0.2)]
    other = [run("bnp", 0.01, 0, 0.1),  # the same run: ours is kept
             run("bnp", 0.01, 1, 0.8),  # another seed
             run("bnp", 0.01, 0, 0.7, train_size=500)]  # another budget
    merged = benchmark.merge_results(own, other)
    assert merged == own + other[1:]
    assert benchmark.merge_results(own, own) == own

    timings = {"vgg": {"4": [{"sgd": 1}], "32": [{"sgd": 2}]}}
    newer = {"vgg": {"32": [{"sgd": 3}]}, "resnet": {"32": [{"sgd": 4}]}}
    assert benchmark.merge_timings(timings, newer) == {
        "vgg": {"4": [{"sgd": 1}], "32": [{"sgd": 3}]},
        "resnet": {"32": [{"sgd": 4}]}}
    assert timings == {"vgg": {"4": [{"sgd": 1}], "32": [{"sgd": 2}]}}
