"""One process of a multi-process run on this CPU, as each host of a pod runs it.

    python tests/multiprocess_worker.py SETTINGS_JSON

SETTINGS_JSON holds "config" (tiny_kd or tiny_ppow), "overrides" ({dotted key: value}),
"distributed" (the config's block, or null for a single-process run) and optionally "entry"
("train", the default, or "distill") and "stop_at" (a scheduled interruption of training after
that step's checkpoint). The target is the tests' tiny random model with the real tokenizer.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from conftest import load_config, tiny_config, tiny_params  # noqa: E402  (sets XLA_FLAGS before jax starts)


def main(settings: dict) -> None:
    from conftest_weights import smollm2_gguf_path
    from ppow_jax import multihost
    from ppow_jax.distill import run_distillation
    from ppow_jax.text.tokenizer import Tokenizer
    from ppow_jax.train import run_ppow_training, run_training
    from ppow_jax.weights.registry import LoadedModel

    config = load_config(settings["config"])
    for dotted, value in settings["overrides"].items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    if settings["distributed"]:
        config.distributed.update(settings["distributed"])
    multihost.initialize(config.distributed)  # before the target's parameters touch a device
    tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
    model_config = tiny_config(vocab_size=tokenizer.vocab_size, num_layers=3)
    target = LoadedModel(config=model_config, params=tiny_params(model_config, std=0.3), tokenizer=tokenizer,
                         path=pathlib.Path("tiny"))
    if settings.get("entry") == "distill":
        run_distillation(config, target, progress=False)
        return
    train = run_ppow_training if config.stage == "ppow" else run_training
    train(config, target, progress=False, stop_at=settings.get("stop_at"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
