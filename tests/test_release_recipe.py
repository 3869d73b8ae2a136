"""launch/smollm2_ppow_release.sh, the recipe of the committed PPOW drafter, with `python` replaced by a
recorder: the stages run in order, each training run starts from the one before, and a failed stage
stops the script before it touches the released drafter."""

import os
import pathlib
import subprocess

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "launch" / "smollm2_ppow_release.sh"

# Records its arguments; a training run gets an exported drafter in its workdir, or fails when told to.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$CALLS"
for arg in "$@"; do
    case $arg in --config.workdir=*) workdir=${arg#--config.workdir=} ;; esac
done
if [ -n "${workdir:-}" ]; then
    [ "${FAIL_WORKDIR:-}" != "$workdir" ] || exit 1
    mkdir -p "$workdir/drafter" && echo "$workdir" > "$workdir/drafter/drafter.json"
fi
"""


def _run(tmp_path: pathlib.Path, **env: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "RUNS": str(tmp_path / "runs"), "RELEASE_DIR": str(tmp_path / "release"), **env}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    parsed = []
    for line in (calls.read_text().splitlines() if calls.exists() else []):
        args = line.split()
        assert args[:1] == ["-m"] and args[2] == "--config", line
        flags = dict(arg.removeprefix("--config.").split("=", 1) for arg in args[4:])
        parsed.append({**flags, "module": args[1], "config": args[3]})
    return result, parsed


def test_recipe_chains_its_stages(tmp_path):
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    runs = tmp_path / "runs"
    distills = [call for call in calls if call["module"] == "ppow_jax.distill"]
    assert [call["data.skip_prompts"] for call in distills] == ["4096", "5632", "7168", "4096"]
    assert [call.get("data.source_caps.gsm8k_train") for call in distills] == [None, "3241", "3241", "3413"]
    pools = [f"{runs}/distill-{name}" for name in ("unseen", "chat", "chat2", "rest")]
    assert [call.get("data.exclude_caches") for call in distills] == [None, None, None, ",".join(pools[:3])]
    assert {call["data.max_prompts"] for call in distills} == {"1536"}
    assert {call["config"] for call in distills} == {"configs/smollm2_135m_kd.py"}
    assert [call["data.cache_dir"] for call in distills] == pools
    assert {call["data.dev_cache_dir"] for call in distills} == {f"{runs}/distill-dev"}

    trains = [call for call in calls if call["module"] == "ppow_jax.train"]
    assert [(call["train.steps"], call["seed"]) for call in trains] == [
        ("1600", "0"), ("800", "1"), ("1600", "2"), ("800", "3"), ("1600", "4"), ("800", "5")]
    workdirs = [f"{runs}/{name}" for name in
                ("two-pools-1600", "two-pools-2400", "three-pools-1600", "three-pools-2400", "four-pools-1600",
                 "four-pools-2400")]
    assert [call["workdir"] for call in trains] == workdirs
    assert [call["init_from"] for call in trains] == [
        "checkpoints/smollm2-135m-instruct/kd", *(f"{workdir}/drafter" for workdir in workdirs[:-1])]
    chat, chat2, rest = (f"{runs}/distill-{name}:{runs}/features-{name}" for name in ("chat", "chat2", "rest"))
    assert [call["data.extra_caches"] for call in trains] == [chat, chat, *[f"{chat},{chat2}"] * 2,
                                                              *[f"{chat},{chat2},{rest}"] * 2]
    # the cost ratios the original runs measured, so that a rerun's rewards match theirs
    assert [call["ppow.gamma"] for call in trains] == [
        "0.030757320663000225", "0.035790467013908006", "0.03536882543299646", "0.03422735549944404",
        "0.03716231751144343", "0.0334023262693851"]
    for call in trains:
        assert call["config"] == "configs/smollm2_135m_ppow.py"
        assert (call["data.cache_dir"], call["data.features_dir"]) == (f"{runs}/distill-unseen", f"{runs}/features-unseen")
        assert (call["data.dev_cache_dir"], call["data.dev_features_dir"]) == (f"{runs}/distill-dev", f"{runs}/features-dev")
        assert (call["train.max_seconds"], call["train.eval_every"]) == ("0", "0")
        assert (call["ppow.estimator"], call["ppow.window"], call["ppow.adaw"]) == ("exact", "3", "True")
        assert (call["ppow.priority_temperature"], call["train.learning_rate"]) == ("4.0", "1e-4")
    assert (tmp_path / "release" / "drafter.json").read_text().strip() == f"{runs}/four-pools-2400"


def test_failed_stage_keeps_the_released_drafter(tmp_path):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "drafter.json").write_text("earlier\n")
    result, calls = _run(tmp_path, FAIL_WORKDIR=str(tmp_path / "runs" / "two-pools-2400"))
    assert result.returncode != 0
    assert [call["train.steps"] for call in calls if call["module"] == "ppow_jax.train"] == ["1600", "800"]
    assert (tmp_path / "release" / "drafter.json").read_text() == "earlier\n"
