"""`python -m ppow_jax.eval` with the target's tied output head computed from an untied [D, V] copy.

Takes the same arguments as `ppow_jax.eval`. With YNNPACK's dot fusion off, XLA:CPU's own dot
emitter needs the head in that layout (`verify_cost.py --untied-head` shows the tied one about ten
times slower), so this is how that setting is measured end to end. The products, and so the
outputs, are the same; both decoders of the eval use the untied head.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce python benchmarks/eval_untied_head.py \\
        --drafter checkpoints/smollm2-135m-instruct/kd --window fixed --k-max 2 --limit 5 --max-new-tokens 64 \\
        --questions $PPOW_DATA_ROOT/eval/{mt_bench,humaneval,gsm8k,alpaca}/question.jsonl --out runs/untied
"""

from __future__ import annotations

import sys

from ppow_jax import eval as eval_entry
from ppow_jax.weights import registry
from verify_cost import untie_head

load_tied = registry.load_model


def load_untied(*args, **kwargs) -> registry.LoadedModel:
    model = load_tied(*args, **kwargs)
    if not model.config.tie_word_embeddings:
        return model
    config, params = untie_head(model.config, model.params)
    return model._replace(config=config, params=params)


if __name__ == "__main__":
    registry.load_model = load_untied  # ppow_jax.eval imports load_model from the registry when it runs
    sys.exit(eval_entry.main())
