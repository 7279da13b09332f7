"""BNP under tf.distribute: synchronized statistics, on CPU only.

Each scenario runs `distributed_run.py` in fresh processes, because logical
devices and multi-worker clusters must be configured before TensorFlow
starts.
"""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_allclose
from helpers import subprocess_env

# End-to-end runs of the tools: in the full tier only.
pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).parent / "distributed_run.py"
ENV = subprocess_env()


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    subprocess.run([sys.executable, str(SCRIPT), "mirrored", str(out)],
                   check=True, env=ENV, timeout=300)
    return {name: _load(out / f"{name}.npz") for name in
            ("single", "mirrored", "reloaded", "checkpoint", "single_uneven",
             "mirrored_uneven", "single_first", "mirrored_first")}


def _statistics(state, replica):
    return {k.rsplit("_replica", 1)[0]: v for k, v in state.items()
            if k.endswith(f"_replica{replica}")}


def test_mirrored_matches_single_device(mirrored):
    single, run = mirrored["single"], mirrored["mirrored"]
    weights = sorted(k for k in single if k.startswith("weight_"))
    assert len(weights) == 4
    assert single["iterations"] == run["iterations"] == 12
    for key in weights:  # after 12 steps
        assert_allclose(run[key], single[key], atol=1e-5, rtol=0)
    for replica in (0, 1):
        for name, value in _statistics(single, 0).items():
            assert_allclose(_statistics(run, replica)[name], value,
                            atol=1e-5, rtol=1e-5)


def test_replicas_hold_identical_statistics(mirrored):
    run = mirrored["mirrored"]
    first, second = _statistics(run, 0), _statistics(run, 1)
    assert sorted(first) == sorted(second) and len(first) == 6
    for name in first:
        assert_allclose(first[name], second[name], atol=0, rtol=0)


def test_uneven_last_batch_is_weighted_by_example_counts(mirrored):
    # 43 examples in global batches of 8: the last batch of 3 is split
    # unevenly between the replicas; the count-weighted all-reduce still
    # gives the single-device statistics.
    single = _statistics(mirrored["single_uneven"], 0)
    for replica in (0, 1):
        run = _statistics(mirrored["mirrored_uneven"], replica)
        for name, value in single.items():
            assert_allclose(run[name], value, atol=1e-5, rtol=1e-5)
    # 43 values in total per channel of the head layer's counter, decayed:
    # five batches of 8 then one of 3 with momentum 0.99.
    expected = sum(8 * 0.99**k for k in range(1, 6)) + 3
    assert_allclose(single["head_moving_count"], expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["single_first", "mirrored_first"])
def test_first_update_is_the_global_batch_on_every_replica(name, mirrored):
    # Inputs with a channel near 1000: each replica's first update, centred
    # on values all-reduced from both replicas' batches, gives NumPy's
    # moments of the global batch. (Before, a replica could pool the other
    # replica's inputs, recorded while it waited in an all-reduce.)
    run = mirrored[name]
    x = run["x"].astype("float64")
    replicas = 2 if name == "mirrored_first" else 1
    for replica in range(replicas):
        stats = _statistics(run, replica)
        assert_allclose(stats["first_moving_count"], 8.0, atol=0, rtol=0)
        assert_allclose(stats["first_moving_mean"], x.mean(0), atol=0,
                        rtol=1e-6)
        assert_allclose(stats["first_moving_variance"], x.var(0), atol=0,
                        rtol=1e-5)


def test_saved_under_mirrored_reloads_the_statistics(mirrored):
    # A .keras file (loaded without a strategy), and a tf.train.Checkpoint
    # restored into a new model under the strategy, on both replicas.
    run = mirrored["mirrored"]
    for name, value in _statistics(run, 0).items():
        assert_allclose(_statistics(mirrored["reloaded"], 0)[name], value,
                        atol=0, rtol=0)
        for replica in (0, 1):
            assert_allclose(_statistics(mirrored["checkpoint"], replica)[name],
                            value, atol=0, rtol=0)
    assert mirrored["checkpoint"]["iterations"] == 12


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_keeps_workers_identical(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers},
                  "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), "worker", str(tmp_path)],
            env=dict(ENV, TF_CONFIG=json.dumps(config),
                     BNP_WORKER_INDEX=str(index)),
        ))
    try:
        codes = [p.wait(timeout=240) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0]
    first, second = (_load(tmp_path / f"worker{i}.npz") for i in (0, 1))
    assert sorted(first) == sorted(second)
    assert len(_statistics(first, 0)) == 6
    for key in first:
        assert_allclose(first[key], second[key], atol=0, rtol=0)
    # 6 steps of a global batch of 8, split between the workers.
    assert first["iterations"] == 6
    assert _statistics(first, 0)["head_moving_count"] > 0


def test_readme_scaling_out_example_runs_on_two_replicas(tmp_path):
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(
        encoding="utf-8")
    section = readme.split("## Scaling out", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(\n"
        "    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        + code +
        "\nassert strategy.num_replicas_in_sync == 2\n"
        "bnp = model.optimizer\n"
        "for slot in bnp._slots.values():\n"
        "    for v in slot.variables:\n"
        "        a, b = (r.numpy() for r in v.value.values)\n"
        "        assert (a == b).all(), v.name\n"
        "print('replicas', len(bnp._slots))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, env=ENV,
                         capture_output=True, text=True, timeout=300,
                         cwd=tmp_path).stdout
    assert "replicas 2" in out
