"""`python -m ppow_jax.generate`: real generation with SmolLM2, and clear errors for bad input."""

import os
import pathlib
import subprocess
import sys

import pytest

from ppow_jax import generate
from ppow_jax.weights.registry import DEFAULT_MODEL

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user would run it
    return subprocess.run([sys.executable, "-m", "ppow_jax.generate", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=600)


def test_generates_real_text_with_smollm2():
    proc = run_cli("--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "loaded" not in proc.stdout and "loaded" in proc.stderr  # diagnostics stay on stderr


def test_ignore_eos_generates_exactly_n_tokens_and_errors_exit_cleanly():
    proc = run_cli("--prompt", "Hi", "--chat", "--max-new-tokens", "20", "--ignore-eos", "--temperature", "0.8",
                   "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert "20 new tokens" in proc.stderr
    proc = run_cli("--prompt", "Hi", "--top-p", "2")
    assert proc.returncode == 2
    assert "top_p" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "empty"),
    (["--prompt", "   "], "empty"),
    (["--prompt", "hi", "--temperature", "-0.5"], "temperature"),
    (["--prompt", "hi", "--temperature", "nan"], "temperature"),
    (["--prompt", "hi", "--top-k", "-1"], "top_k"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "hi", "--mesh", "data=two"], "--mesh"),
    (["--prompt", "hi", "--mesh", "data=64"], "needs 64 devices"),
    (["--prompt", "hi", "--model", "no-such-model"], "no-such-model"),
    (["--prompt", "hi", "--drafter", "self:8", "--k-max", "0"], "k_max"),
    (["--prompt", "hi", "--drafter", "self:8", "--window", "psychic"], "unknown window policy"),
    (["--prompt", "hi", "--drafter", "self:x"], "self:N"),
    (["--prompt", "hi", "--drafter", "no/such/drafter"], "does not exist: expected self:N"),
    (["--prompt", "hi", "--k-max", "5", "--window", "confidence"], "--window, --k-max set the speculative window"),
    (["--prompt", "hi", "--cycle-costs", "1,1.4,0.1"], "--cycle-costs set the speculative window"),
    (["--prompt", "hi", "--branches", "2"], "--branches set the speculative window"),
    (["--prompt", "hi", "--drafter", "self:8", "--branches", "2", "--window", "confidence"], "needs the fixed window"),
    (["--prompt", "hi", "--drafter", "self:8", "--branches", "2", "--temperature", "1"], "greedy only"),
])
def test_bad_input_gets_a_clear_error(args, message, capsys):
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_greedy_generation_with_the_committed_drafter_equals_plain_generation(capsys):
    """Two prompts in one batch, the committed SmolLM2 drafter: the same text, and τ reported."""
    prompts = ["--prompt", "What is the capital of France?", "--prompt", "Name three colours.", "--chat",
               "--max-new-tokens", "24"]
    assert generate.main(prompts) == 0
    plain = capsys.readouterr().out
    assert generate.main([*prompts, "--drafter", str(REPO_ROOT / "checkpoints/smollm2-135m-instruct/kd")]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "Paris" in plain
    assert "verify passes, tau" in captured.err
    assert generate.main([*prompts, "--drafter", str(REPO_ROOT / "checkpoints/smollm2-135m-instruct/kd"),
                          "--k-max", "3", "--branches", "3,2"]) == 0  # a tree of drafts: the same text too
    assert capsys.readouterr().out == plain


def test_bad_checkpoint_files_get_a_clear_error(tmp_path, capsys):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.gguf"
    from ppow_jax.weights.registry import resolve_model_path
    with open(resolve_model_path(DEFAULT_MODEL), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    for path in (text, truncated, tmp_path / "missing.gguf", tmp_path):
        assert generate.main(["--prompt", "hi", "--model", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path.name) in err


def test_prompt_longer_than_the_context_window(capsys):
    long_prompt = "word " * 9000  # SmolLM2's window is 8192 tokens
    assert generate.main(["--prompt", long_prompt, "--max-new-tokens", "4"]) == 2
    assert "context window" in capsys.readouterr().err
