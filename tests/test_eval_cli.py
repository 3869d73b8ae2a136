"""`python -m ppow_jax.eval`: question files, results layout, and clear errors for bad input."""

import collections
import json
import math
import types

import pytest

import jax
import jax.numpy as jnp

from conftest import REPO_ROOT, tiny_config, tiny_params
from ppow_jax import eval as eval_cli
from ppow_jax.cli import matmul_precision
from ppow_jax.errors import InputError
from ppow_jax.evaluation.questions import load_questions


def test_reads_every_shared_question_set(shared_data_root):
    for name in ("mt_bench", "humaneval", "gsm8k", "alpaca"):
        questions = load_questions(shared_data_root / "eval" / name / "question.jsonl")
        assert len(questions) == 80 and all(q.category.startswith(name) for q in questions)
    mt_bench = load_questions(shared_data_root / "eval" / "mt_bench" / "question.jsonl", limit=3)
    assert len(mt_bench) == 3 and len(mt_bench[0].turns) == 2 and mt_bench[0].category == "mt_bench/writing"


@pytest.mark.parametrize("content,message", [
    ('{"question_id": 1, "category": "x", "turns": ["hi"]}\n{not json}\n', ":2: not valid JSON"),
    ('{"question_id": 1, "turns": []}\n', ":1: 'turns' must be"),
    ('{"category": "x", "turns": ["hi"]}\n', ":1: missing 'question_id'"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ('\n\n', "holds no questions"),
])
def test_malformed_question_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "question.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_questions(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("extra,message", [
    (["--drafter", "self:8", "--questions", "/no/such/file.jsonl"], "does not exist"),
    (["--drafter", "eagle-magic", "--questions", "{q}"], "does not exist: expected self:N"),
    (["--drafter", "self:x", "--questions", "{q}"], "self:N"),
    (["--drafter", "self:30", "--questions", "{q}"], "1 <= N < 30"),
    (["--drafter", "self:8", "--questions", "{q}", "--k-max", "0"], "k_max"),
    (["--drafter", "self:8", "--questions", "{q}", "--window", "psychic"], "unknown window policy"),
    (["--drafter", "self:8", "--questions", "{q}", "--temperature", "-1"], "temperature"),
    (["--drafter", "self:8", "--questions", "{q}", "--window", "cost"], "--window cost needs a trained drafter"),
    (["--drafter", "{kd}", "--questions", "{q}", "--window", "cost", "--k-max", "3",
      "--cycle-costs", "1,1.4,0.05"], "k_max + 2 = 5 numbers"),
    (["--drafter", "{kd}", "--questions", "{q}", "--window", "cost", "--k-max", "1",
      "--cycle-costs", "1,fast,0.05"], "comma-separated numbers"),
    (["--drafter", "self:8", "--questions", "{q}", "--branches", "2", "--temperature", "0.7"], "greedy only"),
    (["--drafter", "self:8", "--questions", "{q}", "--branches", "2", "--window", "divergence"],
     "needs the fixed window"),
    (["--drafter", "self:8", "--questions", "{q}", "--branches", "4;2"], "comma-separated counts"),
    (["--drafter", "self:8", "--questions", "{q}", "--branches", "2,2,2", "--k-max", "2"], "at most k_max = 2"),
])
def test_bad_input_gets_a_clear_error(tmp_path, capsys, extra, message):
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say hi."]}) + "\n")
    committed = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct" / "kd"
    args = [a.replace("{q}", str(questions)).replace("{kd}", str(committed)) for a in extra]
    args += ["--out", str(tmp_path / "out")]
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err


def test_an_out_path_that_is_a_file_is_refused_before_the_run(tmp_path, capsys):
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say hi."]}) + "\n")
    (tmp_path / "taken").write_text("not a directory")
    assert eval_cli.main(["--drafter", "self:8", "--questions", str(questions), "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert eval_cli.main(["--drafter", "self:8", "--questions", str(questions),
                          "--out", str(tmp_path / "taken" / "results")]) == 2
    assert "cannot create the directory" in capsys.readouterr().err


def test_a_calibration_without_weights_names_the_drafter(tmp_path, capsys):
    (tmp_path / "drafter.json").write_text(json.dumps({"kind": "eagle3", "window_calibration": {"drafts": 3}}))
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say hi."]}) + "\n")
    assert eval_cli.main(["--drafter", str(tmp_path), "--window", "adaptive", "--questions", str(questions),
                          "--out", str(tmp_path / "out")]) == 2
    assert "window_calibration has no list of weights" in capsys.readouterr().err


def test_the_target_defaults_to_the_one_a_trained_drafter_records(tmp_path, capsys):
    (tmp_path / "drafter").mkdir()
    (tmp_path / "drafter" / "drafter.json").write_text(json.dumps({"kind": "eagle3", "target": {"name": "my-target"}}))
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say hi."]}) + "\n")
    run = lambda drafter: eval_cli.main(["--drafter", str(drafter), "--questions", str(questions),
                                         "--out", str(tmp_path / "out")])
    assert run(tmp_path / "drafter") == 2
    assert "model 'my-target' does not exist" in capsys.readouterr().err  # not the default SmolLM2
    assert run(tmp_path) == 2  # the training workdir, not its exported drafter
    assert f"{tmp_path} is a training workdir; its exported drafter is {tmp_path / 'drafter'}" in capsys.readouterr().err


def test_turns_without_a_verify_cycle_have_no_tau():
    """An answer that ends at its first token (prefill) has no cycle: τ is undefined, shown as '-'."""
    turn = {"category": "c", "question_id": 1, "ar_new_tokens": 1, "spec_new_tokens": 1, "ar_seconds": 0.1,
            "spec_seconds": 0.1, "accept_hist": [0, 0, 0], "match": True}
    metrics = eval_cli.summarize([turn], greedy=True)
    assert metrics["tau"] is None and eval_cli.format_tau(metrics["tau"]) == "-"
    assert eval_cli.format_tau(1.456) == "1.46"


def test_drafter_vocabulary_must_match(tmp_path, capsys):
    """A drafter checkpoint over another vocabulary is refused (tiny safetensors model, 101 tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "drafter", safe_serialization=True)
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say hi."]}) + "\n")
    code = eval_cli.main(["--drafter", str(tmp_path / "drafter"), "--questions", str(questions),
                          "--out", str(tmp_path / "out")])
    assert code == 2 and "vocabulary" in capsys.readouterr().err


def test_end_to_end_results_layout(tmp_path, shared_data_root):
    out = tmp_path / "results"
    code = eval_cli.main(["--drafter", "self:10", "--questions",
                          str(shared_data_root / "eval" / "mt_bench" / "question.jsonl"),
                          str(shared_data_root / "eval" / "gsm8k" / "question.jsonl"), "--limit", "1",
                          "--max-new-tokens", "12", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["categories"]) == {"mt_bench/writing", "gsm8k/math"}
    for metrics in list(results["categories"].values()) + [results["overall"]]:
        assert set(eval_cli.METRIC_KEYS) <= set(metrics)
        assert metrics["greedy_match"] is True and metrics["tau"] >= 1.0
    assert results["categories"]["mt_bench/writing"]["n_questions"] == 1
    assert len([t for t in results["turns"] if t["category"] == "mt_bench/writing"]) == 2  # both turns
    assert all((out / name).is_file() for name in ("results.md", "tau.png", "speedup.png", "accept_hist.png"))
    assert results["config"]["matmul_precision"] == "highest"
    assert "matmul precision highest" in (out / "results.md").read_text()
    assert results["config"]["branches"] == [1] * 5 and "(k_max 5, chain)" in (out / "results.md").read_text()


@pytest.mark.parametrize("name, marker", [("highest", "HIGHEST"), ("default", "DEFAULT")])
def test_matmul_precision_reaches_every_dot_of_the_model(name, marker):
    """Every dot of the traced target forward carries the precision, over any precision set around it."""
    from ppow_jax.models import llama

    config = tiny_config()
    params, cache = tiny_params(config), llama.init_cache(config, 1, 16)
    forward = jax.jit(lambda p, tokens, c: llama.forward(p, tokens, c, config).logits)
    with jax.default_matmul_precision("bfloat16"), matmul_precision(name):  # as JAX_DEFAULT_MATMUL_PRECISION would
        text = forward.lower(params, jnp.ones((1, 4), jnp.int32), cache).as_text()
    dots = text.count("stablehlo.dot_general")
    assert dots > 0 and text.count(f"precision = [{marker}, {marker}]") == dots
    assert jax.config.jax_default_matmul_precision is None  # restored after the context


@pytest.mark.parametrize("flags, expected", [([], "highest"), (["--matmul-precision", "default"], "default")])
def test_the_eval_and_the_generator_run_under_the_chosen_precision(flags, expected, monkeypatch):
    from ppow_jax import generate as generate_cli

    seen = []
    record = lambda args: seen.append(jax.config.jax_default_matmul_precision) or 0
    monkeypatch.setattr(eval_cli, "evaluate", record)
    monkeypatch.setattr(generate_cli, "generate_text", record)
    assert eval_cli.main(["--drafter", "self:1", "--questions", "q.jsonl", "--out", "o", *flags]) == 0
    assert generate_cli.main(["--prompt", "hi", *flags]) == 0
    assert seen == [expected, expected]


def test_sampled_outputs_are_not_reported_as_mismatches(tmp_path, shared_data_root):
    """At T > 0 the two decodes draw different samples: no turn claims a failed equality check."""
    out = tmp_path / "sampled"
    code = eval_cli.main(["--drafter", "self:10", "--questions", str(shared_data_root / "eval" / "gsm8k" / "question.jsonl"),
                          "--limit", "1", "--max-new-tokens", "8", "--temperature", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["overall"]["greedy_match"] is None and all(t["match"] is None for t in results["turns"])
    assert "not checked for equality" in (out / "results.md").read_text()


def _results(tmp_path, window: str, turns: list[dict]) -> None:
    """An eval_sets output directory as `benchmarks/ppow_table.py` reads it: DIR/<window>/T0/results.json."""
    out = tmp_path / window / "T0"
    out.mkdir(parents=True)
    overall = eval_cli.summarize(turns, greedy=True)
    (out / "results.json").write_text(json.dumps(
        {"config": {"temperature": 0, "window": window, "k_max": 3}, "turns": turns, "overall": overall}))


def test_the_ppow_table_gives_tau_per_set_and_refuses_a_run_without_results(tmp_path):
    """τ per question set and overall, speedup and greedy match, one row per --run; a --run whose
    directory holds no results is an error (exit 2), not a silently missing row."""
    import subprocess
    import sys

    def turn(category, hist, spec_seconds):
        return {"category": category, "question_id": 1, "accept_hist": hist, "spec_new_tokens": 10,
                "ar_new_tokens": 10, "spec_seconds": spec_seconds, "ar_seconds": 1.0, "match": True,
                "empty_windows": 0}

    # mt_bench: 2 cycles accepting 0 and 2 drafts: τ (1 + 3) / 2 = 2.00; gsm8k: 1 cycle accepting 3: τ 4.00;
    # overall (1 + 3 + 4) / 3 = 2.67; speed: 20 tokens in 0.8 s against 20 in 2 s: 2.50x.
    _results(tmp_path / "run", "fixed", [turn("mt_bench/writing", [1, 0, 1, 0], 0.5), turn("gsm8k/math", [0, 0, 0, 1], 0.3)])
    script = [sys.executable, str(REPO_ROOT / "benchmarks" / "ppow_table.py")]
    done = subprocess.run(script + ["--run", f"PPOW={tmp_path / 'run'}"], capture_output=True, text=True, check=True,
                          cwd=REPO_ROOT, timeout=600)
    assert "#### T = 0, fixed window, K_max 3" in done.stdout
    assert "| PPOW | 2.00 | - | 4.00 | - | **2.67** | 2.50x | yes |" in done.stdout
    missing = subprocess.run(script + ["--run", f"PPOW={tmp_path / 'run'}", "--run", f"CST={tmp_path / 'none'}"],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert missing.returncode == 2 and "'CST'" in missing.stderr and "no results.json" in missing.stderr


def _paired_run(directory, turns: list[dict], shard: str = "0/1", max_new_tokens: int = 8) -> str:
    """A `benchmarks/paired_speedup.py` output directory with these turns."""
    directory.mkdir(parents=True)
    config = {"drafters": {"A": "a", "B": "b"}, "window": "fixed", "k_max": 3, "temperature": 0,
              "max_new_tokens": max_new_tokens, "limit": 0, "shard": shard, "seed": 0, "matmul_precision": "highest"}
    (directory / "results.json").write_text(json.dumps({"config": config, "machine": "cpu", "turns": turns}))
    return str(directory)


def _paired_turn(set_name, question_id, plain, a, b, match_b=True) -> dict:
    return {"set": set_name, "question_id": question_id, "turn": 0, "seconds": {"plain": plain, "A": a, "B": b},
            "new_tokens": {"plain": 8, "A": 8, "B": 8}, "accept_hist": {"A": [1, 0, 0, 1], "B": [2, 0, 0, 0]},
            "match": {"A": True, "B": match_b}}


def _benchmark_module(name: str) -> types.ModuleType:
    """A script of benchmarks/ (not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_the_paired_speedup_balances_who_goes_first_and_who_follows_whom(count):
    names = [f"d{k}" for k in range(count)]
    orders = _benchmark_module("paired_speedup").decoder_orders(names, 2 * count)
    cycle = orders[:count if count % 2 == 0 else 2 * count]
    assert all(sorted(order) == names for order in orders)
    firsts = [order[0] for order in cycle]
    assert all(firsts.count(name) == len(cycle) // count for name in names)
    follows = collections.Counter((x, y) for order in cycle for x, y in zip(order, order[1:]))
    assert set(follows) == {(x, y) for x in names for y in names if x != y} and len(set(follows.values())) <= 1


def test_the_paired_speedup_shares_one_baseline_across_shards_and_refuses_mixed_runs(tmp_path, capsys):
    """Speedups are plain decoding's seconds over each drafter's (equal greedy answers), summed over
    every shard's turns; the paired difference comes with its bootstrap interval over questions within
    each set; shards of different runs, a shard twice, or a greedy mismatch, fail."""
    paired = _benchmark_module("paired_speedup")
    first = _paired_run(tmp_path / "0", [_paired_turn("mt_bench", 1, 2.0, 1.0, 2.0), _paired_turn("gsm8k", 2, 2.0, 1.0, 1.5)],
                        shard="0/2")
    second = _paired_run(tmp_path / "1", [_paired_turn("gsm8k", 3, 2.0, 2.0, 2.5)], shard="1/2")
    assert paired.main(["--report", first, second, "--compare", "A", "B"]) == 0
    out = capsys.readouterr().out
    # τ: A (1 + 4) / 2 = 2.5, B 1.0, in every set. 24 tokens: plain in 6 s; A in 4 s, 6.0 tokens/s, 1.5x
    # (mt_bench 2/1, gsm8k 4/3); B in 6 s, 1.0x.
    assert "3 questions, 3 turns" in out
    assert "| A | 2.500 | 2.500 | 2.500 | 6.0 | 1.500x | 2.000x | 1.333x | yes |" in out
    assert "| B | 1.000 | 1.000 | 1.000 | 4.0 | 1.000x | 1.000x | 1.000x | yes |" in out
    # mt_bench's one question is always drawn; gsm8k's two give plain 6 s, A 3, 4 or 5 s and B 5, 6 or 7 s
    # with chances 1/4, 1/2, 1/4: differences 0.8, 0.5 and 6/5 - 6/7 = 0.343.
    assert "speedup A - B: +0.500x (95% interval +0.343 to +0.800" in out
    assert paired.main(["--report", first, first]) == 2
    assert "distinct shards" in capsys.readouterr().err

    other = _paired_run(tmp_path / "other", [_paired_turn("gsm8k", 3, 2.0, 2.0, 2.5)], shard="1/2", max_new_tokens=16)
    assert paired.main(["--report", first, other]) == 2
    assert "differ in their settings" in capsys.readouterr().err
    mismatch = _paired_run(tmp_path / "mismatch", [_paired_turn("gsm8k", 3, 2.0, 2.0, 2.5, match_b=False)])
    assert paired.main(["--report", mismatch]) == 1
    assert "| **NO** |" in capsys.readouterr().out
    assert paired.main(["--drafter", "plain=self:1", "--out", str(tmp_path / "x")]) == 2
    assert "NAME other than 'plain'" in capsys.readouterr().err
    assert paired.main(["--drafter", "A=self:1", "--drafter", "B=self:2", "--compare", "A", "A", "--out", str(tmp_path / "x")]) == 2
    assert "two different drafters" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_paired_speedup_times_drafters_of_different_cache_margins_on_smollm2(tmp_path, shared_data_root, capsys):
    """A trained feature drafter and a self-speculative one (each with its own cache margin) beside
    plain decoding, on MT-bench's first question (two turns): every greedy answer equals plain decoding's."""
    out = tmp_path / "paired"
    code = _benchmark_module("paired_speedup").main([
        "--drafter", f"kd={REPO_ROOT / 'checkpoints' / 'smollm2-135m-instruct' / 'kd'}", "--drafter", "self=self:6",
        "--limit", "1", "--shard", "0/4", "--max-new-tokens", "8", "--data-root", str(shared_data_root),
        "--compare", "kd", "self", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(t["set"], t["turn"]) for t in results["turns"]] == [("mt_bench", 0), ("mt_bench", 1)]
    assert results["config"]["target"] == "smollm2-135m-instruct"
    for t in results["turns"]:
        assert t["match"] == {"kd": True, "self": True} and set(t["seconds"]) == {"plain", "kd", "self"}
        assert len({n for n in t["new_tokens"].values()}) == 1 and all(s > 0 for s in t["seconds"].values())
    assert "speedup kd - self:" in capsys.readouterr().out


def test_the_data_scaling_fit_recovers_a_log_linear_law_and_refuses_what_it_cannot_fit(capsys):
    scaling = _benchmark_module("data_scaling")

    def law(responses: float) -> float:
        return 0.25 + 0.125 * math.log2(responses)

    exact = scaling.fit([scaling.Measurement(n, law(n)) for n in (500, 2000, 8000)])
    assert exact.intercept == pytest.approx(0.25) and exact.per_doubling == pytest.approx(0.125)
    assert exact.per_doubling_se == pytest.approx(0.0, abs=1e-9)
    assert exact.responses_for(law(64000)) == pytest.approx(64000)
    # Noisy points: the slope's standard error by hand (residuals +-0.01 at log2 sizes 1, 2, 3, 4).
    noisy = scaling.fit([scaling.Measurement(2.0 ** k, k / 10 + (0.01 if k % 2 else -0.01)) for k in (1, 2, 3, 4)])
    assert noisy.per_doubling == pytest.approx(0.1 - 0.004)
    residuals = [k / 10 + (0.01 if k % 2 else -0.01) - noisy.predict(2.0 ** k) for k in (1, 2, 3, 4)]
    assert noisy.per_doubling_se == pytest.approx(math.sqrt(sum(r * r for r in residuals) / 2 / 5))

    args = [f"--point={n:g}:{law(n)!r}" for n in (500, 2000, 8000)]
    assert scaling.main(args + ["--check", "16000:1.0", "--target", f"{law(32000)!r}", "--seconds-per-response", "2"]) == 0
    out = capsys.readouterr().out
    assert f"| 16,000 | 1.000 | {law(16000):.3f} | {1.0 - law(16000):+.3f} | no (a check) |" in out
    assert "at 32,000 responses: 1.0 doublings past the largest measured (16,000)" in out
    assert "making the 16,000 more at 2 s each: 9 hours" in out
    assert scaling.main(args + ["--target", f"{law(1000)!r}"]) == 0
    assert "at 1,000 responses, within the data measured (500 to 8,000)" in capsys.readouterr().out
    assert scaling.main(args + ["--target", f"{law(100)!r}"]) == 0
    assert "at 100 responses, below the data measured (500 to 8,000)" in capsys.readouterr().out
    # Two measurements: no standard error, so no optimistic bound.
    assert scaling.main(args[:2] + ["--target", f"{law(8000)!r}"]) == 0
    out = capsys.readouterr().out
    assert "(s.e. nan)" in out and "at 8,000 responses: 2.0 doublings" in out and "steeper" not in out
    # Noisy points: the data at the slope two standard errors steeper, through the points' centre.
    noisy_args = [f"--point={2.0 ** k:g}:{k / 10 + (0.01 if k % 2 else -0.01)!r}" for k in (1, 2, 3, 4)]
    assert scaling.main(noisy_args + ["--target", "1.0"]) == 0
    steeper = noisy.per_doubling + 2 * noisy.per_doubling_se
    fewest = 2.0 ** (2.5 + (1.0 - 0.25) / steeper)  # centre: log2 size 2.5, accept 0.25
    assert f"with the slope two standard errors steeper: {fewest:,.0f} responses" in capsys.readouterr().out
    for bad, message in [(["--point", "500:1.0", "--point", "2000:0.9"], "does not rise with the data"),
                         (["--point", "500:1.0", "--point", "500:1.1"], "two or more data sizes"),
                         (args + ["--target", "5000"], "beyond any data size")]:
        assert scaling.main(bad) == 2
        assert message in capsys.readouterr().err
    for bad, message in [(["--point", "0:1.0"], "RESPONSES must be positive"),
                         (["--point", "1:2:3"], "is not RESPONSES:ACCEPT_LENGTH"),
                         (["--point", "abc:1"], "is not RESPONSES:ACCEPT_LENGTH"),
                         (args + ["--seconds-per-response", "2"], "give a --target too"),
                         (args + ["--target", "nan"], "--target must be a finite"),
                         (args + ["--target", "3", "--seconds-per-response", "-1"], "--seconds-per-response must be a positive")]:
        with pytest.raises(SystemExit) as exit_info:
            scaling.main(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
