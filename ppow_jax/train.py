"""`python -m ppow_jax.train --config configs/X.py [--config.KEY=VALUE ...]`: token-level drafter training.

Stages, each resumable:
  1. the target's features and distributions for every self-distilled sequence, cached once
     (`python -m ppow_jax.distill` must have produced the responses);
  2. the draft vocabulary: the most frequent tokens of the responses;
  3. training with checkpoints (train state, data-iterator state, RNG, draft vocabulary) every
     `train.checkpoint_every` steps, keeping the last `train.keep_checkpoints`; a rerun resumes
     from the latest one exactly;
  4. the trained drafter is exported to `WORKDIR/drafter` for `python -m ppow_jax.eval --drafter`.
Metrics (loss, per-step top-1 agreement, learning rate, tokens/s) go to TensorBoard logs in
`WORKDIR/logs` and a console progress bar.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Optional, Sequence

from ppow_jax.cli import run_config_entry_point


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def token_counts(distill_dir: pathlib.Path, vocab_size: int):
    import numpy as np

    from ppow_jax.data.distill import read_records, shard_paths

    counts = np.zeros((vocab_size,), np.int64)
    for record in read_records(shard_paths(distill_dir)):
        np.add.at(counts, np.asarray(record["response"], np.int64), 1)
    return counts


def run_training(config, target, *, progress: bool = True, stop_at: Optional[int] = None) -> dict:
    """Trains the configured drafter for `target` (a `LoadedModel`); returns the last metrics.

    `stop_at` ends this run early after that step's checkpoint (a scheduled interruption; the
    learning-rate schedule still follows `train.steps`), without exporting the drafter.
    """
    import jax
    import numpy as np
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    from ppow_jax.data.features import build_feature_cache, feature_shards
    from ppow_jax.data.pipeline import feature_dataset
    from ppow_jax.drafters.eagle import Eagle3Drafter
    from ppow_jax.drafters.store import save_drafter
    from ppow_jax.errors import InputError
    from ppow_jax.generate import parse_mesh
    from ppow_jax.training.checkpoints import Checkpointer
    from ppow_jax.training.kd import KDTrainer, OptimConfig, draft_vocabulary

    if config.drafter.kind != "eagle3":
        raise InputError(f"unknown drafter kind {config.drafter.kind!r} (supported: eagle3)")
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    distill_dir = pathlib.Path(config.data.cache_dir)
    pad_id = target.tokenizer.pad_token_id or 0
    tc = config.train

    manifest = build_feature_cache(target.config, target.params, distill_dir, workdir / "features",
                                   feature_layers=tuple(config.drafter.feature_layers), seq_len=config.data.seq_len,
                                   batch_size=config.data.feature_batch_size, pad_token_id=pad_id, progress=progress)
    loss_tokens = sum(s["loss_tokens"] for s in manifest["shards"])
    log(f"feature cache: {sum(s['examples'] for s in manifest['shards'])} sequences, {loss_tokens} response tokens")

    checkpointer = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        d2t = np.asarray(json.loads((workdir / "d2t.json").read_text()), np.int32)
    else:
        d2t = draft_vocabulary(token_counts(distill_dir, target.config.vocab_size), config.drafter.draft_vocab_size)
        (workdir / "d2t.json").write_text(json.dumps(d2t.tolist()))
    drafter = Eagle3Drafter.for_target(target.config, tuple(config.drafter.feature_layers),
                                       config.drafter.draft_vocab_size, config.drafter.intermediate_size)
    optim = OptimConfig(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                        end_learning_rate_factor=tc.end_learning_rate_factor, b1=tc.b1, b2=tc.b2,
                        weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    trainer = KDTrainer(drafter, target.params, d2t, optim, unroll_steps=tc.unroll_steps,
                        loss_positions=tc.loss_positions, mesh=parse_mesh(tc.mesh))
    state = trainer.init_state(jax.random.key(config.seed))
    dataset = feature_dataset(feature_shards(workdir / "features"), batch_size=tc.batch_size, seed=config.seed,
                              num_epochs=config.data.num_epochs)
    iterator = iter(dataset)
    if resume_step is not None:
        _, state, meta = checkpointer.restore(state)
        iterator.set_state(meta["data_iterator"])
        log(f"resumed from step {resume_step} ({checkpointer.directory})")

    writer = SummaryWriter(str(workdir / "logs"))
    start_step = int(state.step)
    bar = tqdm(total=tc.steps, initial=start_step, desc="train", unit="step", disable=not progress)
    metrics, window_tokens, window_start = {}, 0, time.perf_counter()
    end_step = tc.steps if stop_at is None else min(stop_at, tc.steps)
    for step in range(start_step, end_step):
        try:
            batch = next(iterator)
        except StopIteration:
            log(f"data exhausted after {config.data.num_epochs} epochs at step {step}")
            break
        state, metrics = trainer.step(state, batch)
        window_tokens += int(batch["loss_mask"].sum()) if not tc.loss_positions else \
            min(int(batch["loss_mask"].sum()), tc.loss_positions)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            metrics = jax.device_get(metrics)
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {done}; last good checkpoint: "
                                         f"{checkpointer.latest_step()}")
            elapsed = time.perf_counter() - window_start
            scalars = {"loss": float(metrics["loss"]), "kl": float(metrics["kl"]), "learning_rate": float(metrics["learning_rate"]),
                       "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": window_tokens / elapsed}
            scalars.update({f"agreement/step{j}": float(a) for j, a in enumerate(metrics["agreement"])})
            scalars.update({f"loss/step{j}": float(x) for j, x in enumerate(metrics["step_loss"])})
            for name, value in scalars.items():
                writer.add_scalar(name, value, done)
            writer.flush()
            with open(workdir / "metrics.jsonl", "a") as history:  # the same scalars, for scripts
                history.write(json.dumps({"step": done, **scalars}) + "\n")
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", agree0=f"{scalars['agreement/step0']:.3f}",
                            tok_s=f"{scalars['tokens_per_s']:.0f}")
            window_tokens, window_start = 0, time.perf_counter()
        if done % tc.checkpoint_every == 0 or done == end_step:
            checkpointer.save(done, state, {"data_iterator": iterator.get_state(), "config": config.to_dict()})
        bar.update(1)
    bar.close()
    writer.close()
    checkpointer.close()
    if int(state.step) < tc.steps:
        log(f"stopped at step {int(state.step)} of {tc.steps}; rerun to resume")
        return {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}
    exported = save_drafter(workdir / "drafter", drafter, trainer.drafter_params(state), target_name=str(config.target),
                            dtype=config.export_dtype, extra={"train_steps": int(state.step)})
    log(f"drafter exported to {exported}")
    return {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}


def run(config) -> int:
    from ppow_jax.weights.registry import load_model

    target = load_model(config.target, param_dtype=config.param_dtype)
    metrics = run_training(config, target)
    log(json.dumps({"final_metrics": metrics}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_config_entry_point(run, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
