"""Prefill and decode speed of the target model, ppow_jax vs Hugging Face transformers, one run.

    python benchmarks/decode.py [--model smollm2-135m-instruct] [--prompt-len 128] [--new-tokens 64]
                                [--repeats 5] [--out results.json]

For each dtype (float32, bfloat16) and batch size (1, 8) it measures, after a warm-up run of the
same shapes (so compilation is excluded):
  - prefill tokens/s: prompt tokens processed per second by the prefill pass;
  - decode ms/token: wall time of the decode loop divided by the tokens generated per row
    (EOS ignored, so every run generates exactly --new-tokens).
transformers runs `generate` (greedy, same prompts, same budget) on the same GGUF dequantised by
transformers; its decode time is (t(N tokens) - t(1 token)) / (N - 1), its prefill a forward pass.

The memory-bandwidth floor of batch-1 decoding is the bytes of weights every token must read
divided by the bandwidth measured here with a jitted reduction over a 512 MiB array.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.inference.autoregressive import AutoregressiveDecoder
from ppow_jax.weights.registry import load_model, resolve_model_path

DTYPES = ("float32", "bfloat16")
BATCHES = (1, 8)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_bandwidth_gbs() -> float:
    array = jnp.ones((128 * 1024 * 1024,), jnp.float32)  # 512 MiB: far beyond any cache
    total = jax.jit(jnp.sum)
    total(array).block_until_ready()
    seconds = min(median_seconds(lambda: total(array).block_until_ready(), 5) for _ in range(2))
    return array.nbytes / seconds / 1e9


def bench_ppow(model_name: str, dtype: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    model = load_model(model_name, param_dtype=dtype)
    decoder = AutoregressiveDecoder(model.config, model.params, eos_token_ids=model.tokenizer.eos_token_ids,
                                    pad_token_id=model.tokenizer.pad_token_id)
    tokens, lengths, cache_len = decoder.prepare(prompts, new_tokens)
    decoder.generate(prompts, new_tokens, ignore_eos=True)  # warm-up: compiles both programs

    def prefill():
        jax.block_until_ready(decoder.prefill(tokens, lengths, cache_len))

    prefill_s = median_seconds(prefill, repeats)
    decode_times = [decoder.generate(prompts, new_tokens, ignore_eos=True).decode_seconds for _ in range(repeats)]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    return {"prefill_tok_s": len(prompts) * int(lengths[0]) / prefill_s,
            "decode_ms_per_token": 1e3 * statistics.median(decode_times) / new_tokens,
            "weight_bytes": weight_bytes}


def bench_transformers(model_name: str, dtype: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model_path(model_name)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    model.eval()
    input_ids = torch.tensor(prompts)
    attention_mask = torch.ones_like(input_ids)

    def generate(n):
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    def prefill():
        with torch.inference_mode():
            model(input_ids, attention_mask=attention_mask)

    generate(2)
    prefill_s = median_seconds(prefill, repeats)
    one = median_seconds(lambda: generate(1), repeats)
    full = median_seconds(lambda: generate(new_tokens), repeats)
    return {"prefill_tok_s": input_ids.numel() / prefill_s,
            "decode_ms_per_token": 1e3 * (full - one) / (new_tokens - 1)}


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return f"{os.cpu_count()} cores ({cpu}); jax {jax.__version__} on {devices}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # Real token ids of the vocabulary's common range; content does not change the speed.
    base = rng.integers(100, 20000, (max(BATCHES), args.prompt_len)).tolist()
    bandwidth = measured_bandwidth_gbs()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for dtype in DTYPES:
        for batch in BATCHES:
            prompts = base[:batch]
            ours = bench_ppow(args.model, dtype, prompts, args.new_tokens, args.repeats)
            theirs = None if args.skip_transformers else bench_transformers(
                args.model, dtype, prompts, args.new_tokens, args.repeats)
            rows.append({"dtype": dtype, "batch": batch, "ppow_jax": ours, "transformers": theirs})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"machine: {machine_description()}; commit {commit}; measured bandwidth {bandwidth:.1f} GB/s")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats} runs\n")
    print("| dtype | batch | ppow_jax prefill tok/s | ppow_jax decode ms/token | transformers prefill tok/s "
          "| transformers decode ms/token | bandwidth floor ms/token | ppow_jax / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ours, theirs = row["ppow_jax"], row["transformers"]
        floor_ms = 1e3 * ours["weight_bytes"] / (bandwidth * 1e9)
        t_prefill = f"{theirs['prefill_tok_s']:.0f}" if theirs else "-"
        t_decode = f"{theirs['decode_ms_per_token']:.1f}" if theirs else "-"
        print(f"| {row['dtype']} | {row['batch']} | {ours['prefill_tok_s']:.0f} | {ours['decode_ms_per_token']:.1f} "
              f"| {t_prefill} | {t_decode} | {floor_ms:.1f} | {ours['decode_ms_per_token'] / floor_ms:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine_description(), "commit": commit, "bandwidth_gbs": bandwidth,
                       "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
