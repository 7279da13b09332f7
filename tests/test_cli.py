"""The command-line tools: `--help` before TensorFlow (the measurement tools
in `benchmarks/`), defaults in the help, and missing optional dependencies
reported before any work starts."""

import re
import subprocess
import sys

import pytest
from helpers import subprocess_env

from benchmarks import benchmark
from benchmarks import experiment
from keras_bnp import demo

# command: strings its --help must show (defaults, the extra it needs).
HELP = {
    "coverage": ["--models", "--brief", "vgg16 resnet50"],
    "experiment": [
        "(default: 0.001 0.003 0.01 0.03 0.1)", "(default: BNP's own)",
        # The example's line continuation, as typed.
        "--batch-sizes 1 2 4 \\\n        --learning-rates 0.001 0.01",
    ],
    "benchmark": [
        "--timing-inputs", "--timing-jit-compile", "(default: 128)",
        "(default: 0 1 2; with --full: 0 1 2 3 4; with --deep: 0 1 2)",
        '`pip install "keras-bnp[benchmark]"`',
        '`pip install -e ".[benchmark]"`',
    ],
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_shows_defaults_without_importing_tensorflow(command):
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"benchmarks.{command}",
         "--help"],
        check=True, capture_output=True, text=True, timeout=120,
        env=subprocess_env(COLUMNS="200"))  # one line per option
    # -X importtime lists every module imported, one per line.
    imported = set(re.findall(r"^import time:.*\|\s*(\S+)$", run.stderr,
                              re.M))
    assert "benchmarks._cli" in imported
    assert not {m.split(".")[0] for m in imported} & {
        "tensorflow", "keras", "keras_bnp"}
    for text in HELP[command]:
        assert text in run.stdout


@pytest.mark.parametrize(
    "main, argv, missing, extra",
    [(benchmark.main, [], "matplotlib", "benchmark"),
     (benchmark.main, ["--data", "tfds"], "tensorflow_datasets", "data"),
     (experiment.main, ["--source", "tfds"], "tensorflow_datasets", "data"),
     (benchmark.main, ["--zoo", "--models", "tabular", "vit_image"],
      "keras_hub", "benchmark")],
    ids=["benchmark", "benchmark-tfds", "experiment-tfds", "zoo-keras-hub"])
def test_missing_extra_stops_before_any_run(main, argv, missing, extra,
                                            tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    out = tmp_path / "out"
    if main is experiment.main:
        options = ["--out", str(out)]
    else:
        options = ["--out-dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + options)
    message = str(exit_info.value.code)
    assert f"needs `{missing}`" in message
    assert f'`pip install "keras-bnp[{extra}]"`' in message
    assert f'`pip install -e ".[{extra}]"`' in message
    assert not (out / "results.json").exists() and not out.is_file()


def test_demo_help_and_missing_extra(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for text in ("--batch-sizes", "(default: 32 2)", "(default: bundled)"):
        assert text in shown
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--source", "tfds"])
    assert exit_info.value.code == 2
    error = capsys.readouterr()
    assert not error.out  # no table started
    message = " ".join(error.err.split())
    assert "--source tfds: Loading through tensorflow_datasets needs " \
        "`tensorflow_datasets`." in message
    assert '`pip install "keras-bnp[data]"`' in message
    assert '`pip install -e ".[data]"`' in message
