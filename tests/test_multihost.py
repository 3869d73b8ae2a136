"""Training, its feature cache and self-distillation across hosts, run as two CPU processes (gloo
collectives) that share a workdir, as a pod's hosts share storage: they must give what one process gives."""

import dataclasses
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

from conftest import REPO_ROOT, tiny_distillation
from ppow_jax.data.distill import read_manifest, read_records, self_distill, shard_paths

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(config: str, overrides: dict, processes: int, log_dir: pathlib.Path, *, entry: str = "train", stop_at=None,
         per_process=lambda process_id: {}, expect_success: bool = True) -> list[str]:
    """Runs `processes` workers of `entry` (one device each; a single process gets two) -> each one's stderr."""
    port = _free_port()
    workers = []
    for process_id in range(processes):
        distributed = None if processes == 1 else {
            "enabled": True, "coordinator_address": f"127.0.0.1:{port}", "num_processes": processes,
            "process_id": process_id}
        settings = {"config": config, "overrides": {**overrides, **per_process(process_id)},
                    "distributed": distributed, "entry": entry, "stop_at": stop_at}
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // processes}",
               "PYTHONPATH": str(REPO_ROOT)}  # this checkout's package, whichever one is installed
        log = open(log_dir / f"{config}-{processes}-{process_id}-{port}.log", "w+")
        workers.append((subprocess.Popen([sys.executable, str(WORKER), json.dumps(settings)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT), log))
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
        if expect_success:
            assert worker.returncode == 0, f"worker exited {worker.returncode}:\n{outputs[-1][-3000:]}"
    return outputs


def _history(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("train_seconds", "wall_seconds", "tokens_per_s")} for row in rows]


def _assert_same_run(one: pathlib.Path, two: pathlib.Path) -> None:
    """Same metrics at the same steps, and the same exported drafter."""
    a, b = _history(one), _history(two)
    assert [row["step"] for row in a] == [row["step"] for row in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-6, err_msg=f"step {x['step']} {key}")
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        pa, pb = (checkpointer.restore(d / "drafter" / "params") for d in (one, two))
    assert jax.tree_util.tree_structure(pa) == jax.tree_util.tree_structure(pb)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def kd_runs(distilled, tmp_path_factory):
    """The tiny KD config, 12 steps on a data=2 mesh: one process with two devices straight through;
    two processes interrupted after step 6, then resumed -> (root, overrides, the two processes' logs)."""
    config, _, _ = distilled
    root = tmp_path_factory.mktemp("multihost")
    overrides = {"data.cache_dir": config.data.cache_dir, "data.dev_cache_dir": config.data.dev_cache_dir,
                 "train.steps": 12, "train.checkpoint_every": 6, "train.eval_every": 6, "train.mesh": "data=2"}
    _run("tiny_kd", {**overrides, "workdir": str(root / "kd-1")}, 1, root)
    interrupted = _run("tiny_kd", {**overrides, "workdir": str(root / "kd-2")}, 2, root, stop_at=6)
    resumed = _run("tiny_kd", {**overrides, "workdir": str(root / "kd-2")}, 2, root)
    return root, overrides, interrupted, resumed


def test_two_processes_train_and_resume_as_one_process_on_two_devices(kd_runs):
    root, _, interrupted, (primary_log, secondary_log) = kd_runs
    assert "stopped at step 6" in interrupted[0] and "resumed from step 6" in primary_log
    assert any("dev/accept_length" in row for row in _history(root / "kd-1"))  # the dev probe ran
    _assert_same_run(root / "kd-1", root / "kd-2")  # metrics written once, by the primary
    # The primary logs and exports; the other process stays quiet.
    assert "drafter exported" in primary_log and "drafter exported" not in secondary_log
    assert re.search(r"\(train\): \d+ sequences", interrupted[0]) and "sequences" not in interrupted[1]
    # Both processes computed target features: the cache is the one-process run's (the same metrics above).
    features = json.loads((root / "kd-2" / "features" / "manifest.json").read_text())
    assert {shard["process"] for shard in features["shards"]} == {0, 1}


def test_two_processes_ppow_as_one_process_on_two_devices(kd_runs, tmp_path):
    root, kd_overrides, _, _ = kd_runs
    overrides = {**kd_overrides, "init_from": str(root / "kd-1" / "drafter"), "train.steps": 4,
                 "train.checkpoint_every": 4}
    for processes in (1, 2):
        _run("tiny_ppow", {**overrides, "workdir": str(tmp_path / f"{processes}")}, processes, tmp_path)
    assert any("reward" in row for row in _history(tmp_path / "1"))
    _assert_same_run(tmp_path / "1", tmp_path / "2")


def test_two_processes_share_a_self_distillation_into_the_cache_one_process_makes(distilled, tiny_target,
                                                                               shared_data_root, tmp_path):
    config, _, _ = distilled
    overrides = {"data.folders": ["alpaca_seed_tasks", "gsm8k_train"], "data.max_prompts": 16,
                 "data.temperature": 0.8, "data.cache_dir": str(tmp_path / "train"),
                 "data.dev_cache_dir": str(tmp_path / "dev"), "target": "tiny"}
    primary_log, secondary_log = _run("tiny_kd", overrides, 2, tmp_path, entry="distill")
    # The same run in this process, on one device: sampled, so each shard's seed shows.
    prompts, decoder, settings = tiny_distillation(tiny_target, shared_data_root)
    for split in ("train", "dev"):
        alone = self_distill(decoder, tiny_target.tokenizer, prompts, tmp_path / f"alone-{split}",
                             dataclasses.replace(settings, temperature=0.8), batch_size=4, max_prompts=16,
                             dev_prompts=config.data.dev_prompts, split=split, progress=False)
        shared = read_manifest(tmp_path / split)
        assert [{k: v for k, v in s.items() if k != "process"} for s in shared["shards"]] == alone["shards"]
        assert read_records(shard_paths(tmp_path / split)) == read_records(shard_paths(tmp_path / f"alone-{split}"))
        assert f"({split}): {sum(len(s['keys']) for s in alone['shards'])} responses" in primary_log
    assert [shard["process"] for shard in read_manifest(tmp_path / "train")["shards"]] == [0, 1, 0, 1]
    assert "responses" not in secondary_log  # the primary reports


AGREEMENT = """
import sys
import jax
from ppow_jax import multihost
multihost.initialize({"enabled": True, "coordinator_address": sys.argv[1], "num_processes": 2,
                      "process_id": int(sys.argv[2])})
me = jax.process_index()
print("agreed", multihost.agree(me == 1), repr(multihost.broadcast_from_primary(1 / 3 + me)))
"""


def test_processes_take_the_primary_decision_and_value(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    workers = [subprocess.Popen([sys.executable, "-c", AGREEMENT, address, str(i)], env=env, cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    for output in outputs:  # process 1's own flag and value differ; the primary's are exact on both
        assert f"agreed False {1 / 3!r}" in output, output


def test_two_processes_stop_on_the_time_budget_with_a_measured_gamma_on_the_default_mesh(kd_runs, tmp_path):
    root, kd_overrides, _, _ = kd_runs
    overrides = {**kd_overrides, "init_from": str(root / "kd-1" / "drafter"), "workdir": str(tmp_path / "run"),
                 "ppow.gamma": 0.0, "train.max_seconds": 1e-3, "train.mesh": ""}  # default: data over both hosts
    primary_log, _ = _run("tiny_ppow", overrides, 2, tmp_path)
    assert re.search(r"time budget reached at iteration 1: \d+ s of updates \(train.max_seconds 0.001\)", primary_log)
    exported = json.loads((tmp_path / "run" / "drafter" / "drafter.json").read_text())
    assert exported["train_steps"] == 1 and exported["gamma"] > 0


def test_a_workdir_the_hosts_do_not_share_is_refused(kd_runs, tmp_path):
    _, overrides, _, _ = kd_runs
    logs = _run("tiny_kd", overrides, 2, tmp_path, expect_success=False,
                  per_process=lambda process_id: {"workdir": str(tmp_path / f"host{process_id}")})
    for log in logs:
        assert "is not shared by all hosts: processes [1] cannot see it" in log


def test_distributed_without_a_cluster_or_settings_is_a_clear_error(tmp_path):
    # Without the variables JAX would detect a cluster from (SLURM, Open MPI, Kubernetes, Cloud TPU).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_", "JAX_COORDINATOR"))}
    result = subprocess.run([sys.executable, "-m", "ppow_jax.train", "--config", "configs/tiny_kd.py",
                             "--config.distributed.enabled=True", f"--config.workdir={tmp_path}"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "set distributed.coordinator_address, num_processes and process_id" in result.stderr
