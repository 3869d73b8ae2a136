"""`python -m ppow_jax.generate`: generate text with a target model, plainly or with a drafter.

Only the generated text goes to stdout; diagnostics go to stderr. Plain decoding streams the text
of a single prompt as it comes. With `--drafter`, the speculative engine runs the whole answer in
one compiled loop (the text comes at the end), with the same output distribution (greedy: the same
tokens), and reports τ, the tokens per target verify pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from ppow_jax.cli import add_matmul_precision_argument, matmul_precision, run_entry_point
from ppow_jax.drafters.specs import (DRAFTER_HELP, add_window_arguments, check_drafter_spec, load_drafter,
                                     target_for, window_policy, with_cycle_costs)
from ppow_jax.errors import InputError
from ppow_jax.weights.registry import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ppow_jax.generate", description=__doc__)
    parser.add_argument("--model", help=f"registered name ({DEFAULT_MODEL}), a .gguf file or a Hugging Face "
                        f"directory (default: the target a trained --drafter records, else {DEFAULT_MODEL})")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat the flag for a batch of prompts")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k filtering")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 disables nucleus filtering")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_matmul_precision_argument(parser)
    parser.add_argument("--mesh", default="", help="device mesh, e.g. 'data=2,tensor=4' (default: one device)")
    parser.add_argument("--drafter", default="", help="speculative decoding with this drafter: " + DRAFTER_HELP)
    add_window_arguments(parser, k_max=3)
    return parser


def parse_mesh(spec: str):
    """'data=2,tensor=4' -> a (data, fsdp, tensor) mesh, or None for the default single device."""
    from ppow_jax import sharding

    if not spec:
        return None
    sizes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in sharding.MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"bad --mesh entry {part!r}; expected NAME=N with NAME in {sharding.MESH_AXES}")
        sizes[name.strip()] = int(value)
    try:
        return sharding.make_mesh(**sizes)
    except ValueError as err:
        raise InputError(str(err)) from None


class TextStreamer:
    """Writes the newly decoded text of one row as tokens arrive.

    Decodes the whole row each time and prints the new suffix, holding back a trailing
    replacement character (a multi-byte character whose bytes have not all arrived yet).
    """

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.printed = tokenizer, out, ""

    def __call__(self, rows: list[list[int]], final: bool = False) -> None:
        text = self.tokenizer.decode(rows[0])
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def run(args: argparse.Namespace) -> int:
    with matmul_precision(args.matmul_precision):
        return generate_text(args)


def generate_text(args: argparse.Namespace) -> int:
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder
    from ppow_jax.inference.sampling import SamplingParams
    from ppow_jax.weights.registry import load_model

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise InputError(f"prompt {i} is empty")
    mesh = parse_mesh(args.mesh)
    if args.drafter:
        window = window_policy(args)
        window.check_sampling(sampling.greedy)
        check_drafter_spec(args.drafter)
    else:
        window = None
        defaults = build_parser()
        if given := [f"--{name.replace('_', '-')}" for name in ("window", "k_max", "threshold", "branches", "cycle_costs")
                     if getattr(args, name) != defaults.get_default(name)]:
            raise InputError(f"{', '.join(given)} set the speculative window: they need --drafter")

    start = time.perf_counter()
    model = load_model(target_for(args.drafter, args.model), param_dtype=args.dtype)
    tokenizer = model.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    prompts = [tokenizer.encode(t) for t in texts]
    if args.drafter:
        return speculative_generate(args, model, prompts, sampling, window, mesh, loaded_at=start)
    decoder = AutoregressiveDecoder(model.config, model.params, eos_token_ids=tokenizer.eos_token_ids,
                                    pad_token_id=tokenizer.pad_token_id, mesh=mesh)
    print(f"loaded {model.path} in {time.perf_counter() - start:.1f}s", file=sys.stderr)

    streamer = TextStreamer(tokenizer) if len(prompts) == 1 else None
    result = decoder.generate(prompts, args.max_new_tokens, sampling, seed=args.seed, ignore_eos=args.ignore_eos,
                              on_tokens=streamer)
    if streamer is not None:
        streamer(result.tokens, final=True)
        sys.stdout.write("\n")
    else:
        for row in result.tokens:
            sys.stdout.write(tokenizer.decode(row) + "\n\n")
    sys.stdout.flush()
    new_tokens = sum(len(r) for r in result.tokens)
    print(f"{new_tokens} new tokens; prefill {result.prefill_seconds:.2f}s; decode {result.decode_seconds:.2f}s "
          f"(includes compilation on first use)", file=sys.stderr)
    return 0


def speculative_generate(args: argparse.Namespace, model, prompts: list[list[int]], sampling, window, mesh, *,
                         loaded_at: float) -> int:
    from ppow_jax.eval import format_tau
    from ppow_jax.inference.speculative import SpeculativeDecoder

    drafter, drafter_params = load_drafter(args.drafter, model)
    window = with_cycle_costs(window, model, drafter, drafter_params, batch=len(prompts))
    tokenizer = model.tokenizer
    decoder = SpeculativeDecoder(model.config, model.params, drafter, drafter_params,
                                 eos_token_ids=tokenizer.eos_token_ids, pad_token_id=tokenizer.pad_token_id, mesh=mesh)
    print(f"loaded {model.path} and drafter {args.drafter} in {time.perf_counter() - loaded_at:.1f}s",
          file=sys.stderr)
    result = decoder.generate(prompts, args.max_new_tokens, sampling, window, seed=args.seed,
                              ignore_eos=args.ignore_eos)
    for row in result.tokens:  # laid out as plain decoding lays them out
        sys.stdout.write(tokenizer.decode(row) + ("\n" if len(result.tokens) == 1 else "\n\n"))
    sys.stdout.flush()
    new_tokens = sum(len(r) for r in result.tokens)
    print(f"{new_tokens} new tokens; {sum(result.cycles)} verify passes, tau {format_tau(result.tau)} "
          f"({args.window} window, K_max {window.k_max}); prefill {result.prefill_seconds:.2f}s; "
          f"decode {result.decode_seconds:.2f}s (includes compilation on first use)", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
