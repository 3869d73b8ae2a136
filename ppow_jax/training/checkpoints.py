"""Training checkpoints with orbax: train state, data-iterator state and RNG, keep-last-N, exact resume.

One `CheckpointManager` per run directory. A step is written to a temporary directory and renamed
when complete (orbax's atomic commit), so an interrupted save never replaces a good checkpoint.
Restoring goes straight into the sharded layout of an abstract target state. A checkpoint that
cannot be read is a `CheckpointError` naming it; the other checkpoints stay untouched.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ppow_jax.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """`state`: a pytree of arrays (params, optimiser state, RNG key data); `meta`: JSON (data iterator, config)."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[int, Any, dict]:
        """-> (step, state laid out like `abstract_state`, meta). Latest step by default."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored "
                                  f"({type(err).__name__}: {str(err)[:300]}); earlier checkpoints: "
                                  f"{[s for s in self.all_steps() if s != step]}") from err
        return step, restored.state, restored.meta

    def restore_meta(self, step: int) -> dict:
        """The JSON metadata of one checkpoint alone (settings a run needs before it can build its state)."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as err:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: cannot read its metadata "
                                  f"({type(err).__name__}: {str(err)[:300]})") from err

    def close(self) -> None:
        self._manager.close()
