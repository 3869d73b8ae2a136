"""Self-distillation throughput: batch by batch against continuous batching, on the same prompts.

Batch by batch (`AutoregressiveDecoder.generate`, how `ppow_jax.distill` answered until session
32): every batch of `--batch` prompts decodes until its longest answer ends. Continuously
(`generate_continuously`, what it does now): `--batch` rows, refilled `--refill` prompts at a
time as answers end. Both see the planned batches of the real distillation (same order, same
prompt-length sorting), greedy, and the answers are compared.

"Row use" is the share of row-steps that produced a token: answer tokens / (decode steps × rows).
Compilation falls inside each timing (the programs depend on the prompts' lengths), so the time
JAX reports spending on tracing and compiling (`jax.monitoring`'s "/jax/core/compile/" events) is
shown and taken out of the per-prompt and per-token rates.

    python benchmarks/distill_throughput.py --prompts 128 --batch 32 --refill 4 8
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from ppow_jax.cli import load_config_file, run_entry_point


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_kd.py")
    parser.add_argument("--prompts", type=int, default=128, help="training prompts answered by each method")
    parser.add_argument("--batch", type=int, default=32, help="batch size / number of rows")
    parser.add_argument("--refill", type=int, nargs="+", default=[8], help="continuous: prompts prefilled at a time")
    parser.add_argument("--skip", type=int, default=0,
                        help="start this many prompts into the training split (to avoid prompts already cached)")
    return run_entry_point(parser, run)


def run(args: argparse.Namespace) -> int:
    from ppow_jax.data.distill import _batches, encode_prompt, select_prompts
    from ppow_jax.data.sources import read_training_prompts
    from ppow_jax.distill import data_root
    from ppow_jax.errors import InputError
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder, Request
    from ppow_jax.inference.sampling import SamplingParams
    from ppow_jax.weights.registry import load_model

    if args.prompts < 1 or args.batch < 1 or any(r < 1 for r in args.refill):
        raise InputError("--prompts, --batch and --refill must be >= 1")
    config = load_config_file(args.config)
    target = load_model(config.target, param_dtype=config.param_dtype)
    tok = target.tokenizer
    prompts, _ = read_training_prompts(data_root(config), config.data.folders, config.data.tfds.to_dict())
    split = select_prompts(prompts, config.seed, dev_prompts=config.data.dev_prompts)[args.skip:]
    encoded = [(p.key, ids) for p in split if len(ids := encode_prompt(tok, p)) <= config.data.max_prompt_tokens]
    encoded = encoded[:args.prompts]
    batches = list(_batches(encoded, args.batch, sort_window=args.batch * 16))
    budget = config.data.max_new_tokens
    decoder = AutoregressiveDecoder(target.config, target.params, eos_token_ids=tok.eos_token_ids,
                                    pad_token_id=tok.pad_token_id or 0)
    steps = _count_decode_steps(decoder)
    print(f"{len(encoded)} prompts in {len(batches)} batches of {args.batch}, up to {budget} new tokens, greedy; "
          f"target {config.target} ({config.param_dtype})\n", flush=True)

    compiling = _count_compile_seconds()
    rows = []
    steps[0] = compiling[0] = 0
    start = time.perf_counter()
    by_batch: dict[str, list[int]] = {}
    for batch in batches:
        result = decoder.generate([ids for _, ids in batch], budget, SamplingParams())
        by_batch.update({key: out for (key, _), out in zip(batch, result.tokens)})
    rows.append(("batch by batch", time.perf_counter() - start, compiling[0], by_batch, steps[0]))
    for refill in args.refill:
        steps[0] = compiling[0] = 0
        start = time.perf_counter()
        requests = (Request(key, ids) for batch in batches for key, ids in batch)
        answers = {a.request.id: a.tokens for a in decoder.generate_continuously(
            requests, budget, SamplingParams(), max_prompt_len=max(len(ids) for _, ids in encoded), slots=args.batch,
            refill=refill)}
        rows.append((f"continuous, refill {refill}", time.perf_counter() - start, compiling[0], answers, steps[0]))

    print("| method | wall s | of it compiling s | s / prompt | answer tokens / s | row use | "
          "answers equal to batch by batch |")
    print("|---|---|---|---|---|---|---|")
    for name, seconds, compile_seconds, answers, row_steps in rows:
        tokens = sum(len(a) for a in answers.values())
        same = sum(answers[key] == by_batch[key] for key in by_batch)
        running = seconds - compile_seconds
        print(f"| {name} | {seconds:.1f} | {compile_seconds:.1f} | {running / len(answers):.3f} | "
              f"{tokens / running:.1f} | {tokens / row_steps:.1%} | {same} of {len(by_batch)} |", flush=True)
    return 0


def _count_decode_steps(decoder) -> list[int]:
    """Wraps `decoder.decode` to count the row-steps it runs (decode steps × rows): [count] since the
    last reset."""
    count = [0]
    plain = decoder.decode

    def counted(state, *args, **kwargs):
        before, rows = int(state.step), state.tokens.shape[0]
        state = plain(state, *args, **kwargs)
        count[0] += (int(state.step) - before) * rows
        return state

    decoder.decode = counted
    return count


def _count_compile_seconds() -> list[float]:
    """[seconds JAX spent tracing, lowering and compiling] since the last reset."""
    total = [0.0]

    def listen(event: str, seconds: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return total


if __name__ == "__main__":
    sys.exit(main())
