"""How often the target's next token is among the drafter's k most likely first drafts, on the
held-out dev split: the most a tree that branches the first draft k ways could accept there
(k = 1 is the chain the engine drafts).

Teacher-forced, as the dev probe (`ppow_jax.train.DevProbe`): at every response position the drafter
reads the target's features up to it, and its first-draft distribution is compared with the
target's greedy next token (the argmax of the target's own head on the cached final hidden state).

    python benchmarks/first_draft_topk.py --drafter checkpoints/smollm2-135m-instruct/kd
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.cli import load_config_file, run_entry_point
from ppow_jax.drafters.store import load_drafter
from ppow_jax.train import DevProbe
from ppow_jax.training.ppow import PPOWTarget, context_pass
from ppow_jax.weights.registry import load_model

KS = (1, 2, 3, 4, 6, 8, 16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_ppow.py",
                        help="a training config: its target and dev split")
    parser.add_argument("--drafter", required=True, help="a trained drafter directory")
    return run_entry_point(parser, run)


def run(args: argparse.Namespace) -> int:
    config = load_config_file(args.config)
    target = load_model(config.target, param_dtype=config.param_dtype)
    probe = DevProbe(config, target, progress=False)
    drafter, params = load_drafter(args.drafter, target.config)
    frozen = PPOWTarget.from_target(target.params, np.asarray(params["d2t"]))

    @jax.jit
    def ranks(params, batch):
        """The rank of the target's greedy token among the drafter's first drafts, at each position."""
        context = context_pass(drafter, params, frozen.constants.embed, batch["tokens"], batch["features"])
        draft_logits = drafter.target_logits(params, context.hidden)  # [B, L, V], -inf off the draft vocabulary
        wanted = jnp.argmax(batch["target_hidden"].astype(jnp.float32) @ frozen.head.astype(jnp.float32).T, axis=-1)
        chosen = jnp.take_along_axis(draft_logits, wanted[..., None], axis=-1)
        return jnp.sum(draft_logits > chosen, axis=-1)

    found = []
    for batch in probe.batches:
        rank = np.asarray(ranks(params, batch))
        found.append(rank[batch["loss_mask"].astype(bool)])
    rank = np.concatenate(found)
    print(f"{args.drafter}: {len(rank)} dev positions\n")
    print("| k | " + " | ".join(str(k) for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    print("| target's token in the drafter's top k | " + " | ".join(f"{np.mean(rank < k):.3f}" for k in KS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
