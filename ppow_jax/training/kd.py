"""Token-level training of an EAGLE-3-style drafter from the target's cached features (METHOD.md §2).

The loss, at each of S unrolled steps, is the cross-entropy from the target's next-token
distribution (restricted to the draft vocabulary and renormalised, as EAGLE-3 does) to the
drafter's; it equals the KL up to the target's entropy, which does not depend on the drafter.
Step j at position i is counted when i predicts a response token and its chain's anchor i - j
is a real position. AdamW with warm-up and cosine decay and global-norm clipping; one jitted train
step with explicit shardings (params by `sharding.PARAM_AXES`, the batch over the data axes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ppow_jax import multihost, sharding
from ppow_jax.drafters.eagle import Eagle3Drafter, unrolled_hidden

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable drafter parameters (everything but `d2t`)
    opt_state: Any
    rng: jax.Array  # key data (uint32), saved with checkpoints


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    warmup_steps: int
    total_steps: int
    end_learning_rate_factor: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 0.5


def learning_rate_schedule(c: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=max(c.warmup_steps, 1),
        decay_steps=max(c.total_steps, c.warmup_steps + 1), end_value=c.learning_rate * c.end_learning_rate_factor)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                       optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))


def split_params(params: dict) -> tuple[dict, jax.Array]:
    """Drafter params -> (trainable, d2t)."""
    return {k: v for k, v in params.items() if k != "d2t"}, params["d2t"]


def output_head(target_params: dict) -> jax.Array:
    """The target's output head as [V, D] rows (the embedding when they are tied)."""
    return target_params["lm_head"].T if "lm_head" in target_params else target_params["embed"]


@flax.struct.dataclass
class TargetConstants:
    """What the loss needs from the frozen target: its embedding and its head's draft-vocabulary rows."""

    embed: jax.Array  # [V, D]
    head_rows: jax.Array  # [N, D] output-head rows of the draft vocabulary
    d2t: jax.Array  # [N] draft id -> target id

    @classmethod
    def from_target(cls, target_params: dict, d2t: np.ndarray) -> "TargetConstants":
        return cls(embed=target_params["embed"], head_rows=jnp.take(output_head(target_params), jnp.asarray(d2t), axis=0),
                   d2t=jnp.asarray(d2t, jnp.int32))


def kd_loss(trainable: dict, target: TargetConstants, batch: Batch, *, drafter: Eagle3Drafter,
            unroll_steps: int, loss_positions: int = 0) -> tuple[jax.Array, dict]:
    """-> (mean loss over steps, metrics with per-step loss, KL and top-1 agreement).

    The output head and the loss run only at `loss_positions` gathered response positions of the
    batch (0: all B*L positions); the head over the draft vocabulary is about half of the drafter's
    FLOPs, and prompt and padding positions carry no loss. Positions beyond that number are left out
    (counted in `loss_tokens` only when used).
    """
    d2t = target.d2t
    params = {**trainable, "d2t": d2t}
    tokens = batch["tokens"]
    batch_size, seq = tokens.shape
    hidden = unrolled_hidden(drafter, params, target.embed, tokens, batch["features"], unroll_steps)  # [S, B, L, D]

    flat_mask = batch["loss_mask"].reshape(-1).astype(bool)
    size = loss_positions or batch_size * seq
    (index,) = jnp.nonzero(flat_mask, size=size, fill_value=0)
    used = jnp.arange(size) < jnp.sum(flat_mask)  # [P] real positions among the gathered ones
    position_in_row = index % seq
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).reshape(-1)[index]

    draft_logprobs = jax.nn.log_softmax(
        drafter.draft_logits(params, hidden.reshape(unroll_steps, -1, hidden.shape[-1])[:, index]), axis=-1)  # [S, P, N]
    # The target's logits over the draft vocabulary: its final-normed hidden times those rows of its head.
    target_hidden = batch["target_hidden"].reshape(-1, batch["target_hidden"].shape[-1])[index].astype(jnp.float32)
    target_logits = target_hidden @ target.head_rows.astype(jnp.float32).T  # [P, N]
    target_logprobs = jax.nn.log_softmax(target_logits, axis=-1)
    target_probs = jnp.exp(target_logprobs)
    cross_entropy = -jnp.sum(target_probs[None] * draft_logprobs, axis=-1)  # [S, P]
    target_entropy = -jnp.sum(target_probs * target_logprobs, axis=-1)  # [P]
    draft_choice = jnp.take(d2t, jnp.argmax(draft_logprobs, axis=-1))  # [S, P] target ids

    losses, kls, agreements, counts = [], [], [], []
    for step in range(unroll_steps):
        # Step j at position i continues the chain anchored at i - j, which must be a real position.
        weight = (used & (position_in_row >= step)).astype(jnp.float32)
        count = jnp.maximum(weight.sum(), 1.0)
        losses.append(jnp.sum(cross_entropy[step] * weight) / count)
        kls.append(jnp.sum((cross_entropy[step] - target_entropy) * weight) / count)
        # With greedy self-distillation the data's next token is the target's argmax.
        agreements.append(jnp.sum((draft_choice[step] == next_tokens) * weight) / count)
        counts.append(weight.sum())
    loss = jnp.mean(jnp.stack(losses))
    return loss, {"loss": loss, "kl": jnp.mean(jnp.stack(kls)), "step_loss": jnp.stack(losses),
                  "agreement": jnp.stack(agreements), "loss_tokens": counts[0]}


def gradient_step(loss_fn, state: TrainState, *args, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule) -> tuple[TrainState, dict]:
    """One optimiser step on `loss_fn(params, *args) -> (loss, metrics)`; metrics gain the gradient norm
    and the learning rate."""
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, *args)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _train_step(state: TrainState, batch: Batch, target: TargetConstants, *, drafter: Eagle3Drafter,
                optimizer: optax.GradientTransformation, unroll_steps: int, loss_positions: int,
                schedule: optax.Schedule) -> tuple[TrainState, dict]:
    loss_fn = functools.partial(kd_loss, drafter=drafter, unroll_steps=unroll_steps, loss_positions=loss_positions)
    return gradient_step(loss_fn, state, target, batch, optimizer=optimizer, schedule=schedule)


class KDTrainer:
    """Builds the sharded train state and the jitted train step for one drafter and target."""

    def __init__(self, drafter: Eagle3Drafter, target_params: dict, d2t: np.ndarray, optim: OptimConfig, *,
                 unroll_steps: int, loss_positions: int = 0, mesh: Optional[Mesh] = None):
        self.drafter, self.unroll_steps, self.loss_positions = drafter, unroll_steps, loss_positions
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        self.optimizer, self.schedule = make_optimizer(optim), learning_rate_schedule(optim)
        self.d2t = np.asarray(drafter.check_d2t(d2t))  # a host copy: the device one may span several hosts
        target = TargetConstants.from_target(target_params, self.d2t)
        self.target_shardings = TargetConstants(
            embed=sharding.named_sharding(self.mesh, sharding.PARAM_AXES["embed"], target.embed.shape),
            head_rows=sharding.named_sharding(self.mesh, ("vocab", "embed"), target.head_rows.shape),
            d2t=sharding.replicated(self.mesh))
        self.target = multihost.put(target, self.target_shardings)
        self._step_fn = None

    def init_state(self, key: jax.Array, params: Optional[dict] = None) -> TrainState:
        """A fresh train state: random parameters, or `params` (trainable leaves) to continue from."""
        init_key, rng = jax.random.split(key)
        if params is None:
            params, _ = split_params(self.drafter.init_params(init_key, d2t=self.d2t))
        params = multihost.put(params, sharding.param_shardings(params, self.mesh))
        # Optimiser moments follow their parameters' shardings (propagated through jit).
        opt_state = jax.jit(self.optimizer.init)(params)
        return on_mesh(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(rng)), self.mesh)

    def state_shardings(self, state: TrainState) -> TrainState:
        return jax.tree_util.tree_map(lambda x: x.sharding, state)

    def jitted_step(self, state: TrainState, batch: dict[str, np.ndarray]):
        """The sharded, jitted step `(state, global batch, self.target) -> (state, metrics)`, built on first use
        for the shapes of `state` and `batch` (this process's rows)."""
        if self._step_fn is None:
            state_sh = self.state_shardings(state)
            replicated = sharding.replicated(self.mesh)
            fn = functools.partial(_train_step, drafter=self.drafter, optimizer=self.optimizer,
                                   unroll_steps=self.unroll_steps, loss_positions=self.loss_positions,
                                   schedule=self.schedule)
            self._step_fn = jax.jit(fn, in_shardings=(state_sh, multihost.global_batch_shardings(self.mesh, batch),
                                                      self.target_shardings),
                                    out_shardings=(state_sh, replicated), donate_argnums=(0,))
        return self._step_fn

    def step(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
        step_fn = self.jitted_step(state, batch)
        batch = multihost.local_to_global(batch, self.mesh)
        with jax.set_mesh(self.mesh):
            return step_fn(state, batch, self.target)

    def drafter_params(self, state: TrainState) -> dict:
        return {**state.params, "d2t": self.target.d2t}


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Leaves not laid out over `mesh` yet (the step, the RNG, optimiser counters: created on one device)
    are replicated over it, so that the jitted step gets every argument on the same devices."""
    devices, replicated = set(mesh.devices.flat), sharding.replicated(mesh)
    return jax.tree_util.tree_map(lambda x: x if x.sharding.device_set == devices else multihost.put(x, replicated),
                                  tree)


def draft_vocabulary(token_counts: np.ndarray, size: int) -> np.ndarray:
    """The `size` most frequent target ids (ties by id), sorted: EAGLE-3's reduced draft vocabulary."""
    order = np.lexsort((np.arange(len(token_counts)), -token_counts))
    return np.sort(order[:size]).astype(np.int32)
