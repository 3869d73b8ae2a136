"""Training across hosts, run as two CPU processes (gloo collectives) that share a workdir, as a
pod's hosts share storage: it must give what one process gives on the same two devices."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(config: str, overrides: dict, processes: int, log_dir: pathlib.Path) -> list[str]:
    """Runs `processes` workers (one device each; a single process gets two) -> each one's stderr."""
    port = _free_port()
    workers = []
    for process_id in range(processes):
        distributed = None if processes == 1 else {
            "enabled": True, "coordinator_address": f"127.0.0.1:{port}", "num_processes": processes,
            "process_id": process_id}
        settings = {"config": config, "overrides": overrides, "distributed": distributed}
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // processes}"}
        log = open(log_dir / f"{config}-{processes}-{process_id}.log", "w+")
        workers.append((subprocess.Popen([sys.executable, str(WORKER), json.dumps(settings)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=log), log))
    deadline = time.monotonic() + 400
    try:  # a worker that fails leaves the other blocked in a collective: stop them all
        while any(w.poll() is None for w, _ in workers) and all(w.poll() in (None, 0) for w, _ in workers):
            assert time.monotonic() < deadline, "multi-process run timed out"
            time.sleep(0.5)
    finally:
        for worker, _ in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    outputs = []
    for worker, log in workers:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for worker, output in zip(workers, outputs):
        assert worker[0].returncode == 0, f"worker exited {worker[0].returncode}:\n{output[-3000:]}"
    return outputs


def _history(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("train_seconds", "tokens_per_s")} for row in rows]


def _assert_same_history(one: list[dict], two: list[dict]) -> None:
    assert [row["step"] for row in one] == [row["step"] for row in two]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")


def _drafter_params(directory: pathlib.Path) -> dict:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory / "drafter" / "params")


@pytest.fixture(scope="module")
def kd_runs(distilled, tmp_path_factory):
    """The tiny KD config for 12 steps on a data=2 mesh: one process with two devices, and two processes."""
    config, _, _ = distilled
    root = tmp_path_factory.mktemp("multihost")
    runs = {}
    for processes in (1, 2):
        overrides = {"data.cache_dir": config.data.cache_dir, "data.dev_cache_dir": config.data.dev_cache_dir,
                     "workdir": str(root / f"kd-{processes}"), "train.steps": 12, "train.checkpoint_every": 6,
                     "train.eval_every": 6, "train.mesh": "data=2"}
        runs[processes] = (overrides, _train("tiny_kd", overrides, processes, root))
    return root, runs


def test_two_processes_train_as_one_does_on_two_devices(kd_runs):
    root, runs = kd_runs
    (_, (single_log,)), (overrides, (primary_log, secondary_log)) = runs[1], runs[2]
    one, two = root / "kd-1", root / "kd-2"
    history = _history(one)
    assert any("dev/accept_length" in row for row in history)  # the dev probe ran (on every process)
    _assert_same_history(history, _history(two))  # also: the primary alone wrote the metrics, once
    a, b = _drafter_params(one), _drafter_params(two)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # The primary logs and exports; the other process stays quiet.
    assert "drafter exported" in primary_log and "drafter exported" not in secondary_log
    assert re.search(r"\(train\): \d+ sequences", primary_log) and "sequences" not in secondary_log
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["12", "6"]


def test_two_processes_resume_from_their_checkpoint(kd_runs, tmp_path):
    root, runs = kd_runs
    overrides, _ = runs[2]
    primary_log, _ = _train("tiny_kd", {**overrides, "train.steps": 18}, 2, tmp_path)
    assert "resumed from step 12" in primary_log
    assert [row["step"] for row in _history(root / "kd-2") if "loss" in row][-1] == 18


def test_two_processes_ppow_as_one_does_on_two_devices(kd_runs, tmp_path):
    root, runs = kd_runs
    kd_overrides, _ = runs[1]
    for processes in (1, 2):
        overrides = {**kd_overrides, "init_from": str(root / "kd-1" / "drafter"),
                     "workdir": str(tmp_path / f"{processes}"), "train.steps": 4, "train.checkpoint_every": 4}
        _train("tiny_ppow", overrides, processes, tmp_path)
    history = _history(tmp_path / "1")
    assert any("reward" in row for row in history)
    _assert_same_history(history, _history(tmp_path / "2"))


def test_distributed_without_a_cluster_or_settings_is_a_clear_error(tmp_path):
    from conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "ppow_jax.train", "--config", "configs/tiny_kd.py",
                             "--config.distributed.enabled=True", f"--config.workdir={tmp_path}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "set distributed.coordinator_address, num_processes and process_id" in result.stderr
