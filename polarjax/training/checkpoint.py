"""Checkpoints with orbax: the latest and the best training state, saved atomically.

Layout inside a run directory::

    checkpoints/latest/<step>/   the most recent state (kept: ``keep_latest``)
    checkpoints/best/<step>/     the state with the best validation metric (kept: 1)

Each checkpoint holds the full training state pytree (parameters, optimizer state, EMA
parameters, step, RNG key, data-order counters) and a JSON ``meta`` record. Orbax writes into
a temporary directory and renames it when complete, so an interrupted save (SIGINT, SIGKILL)
never leaves a half-written checkpoint that would be picked up on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """The latest/best checkpoint pair of one run directory."""

    def __init__(self, run_dir: str | Path, keep_latest: int = 2):
        root = Path(run_dir).resolve() / "checkpoints"
        options = dict(enable_async_checkpointing=False, create=True)
        self.latest = ocp.CheckpointManager(
            root / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, **options),
            item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(
            root / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, **options),
            item_names=("state", "meta"))

    @staticmethod
    def _args(state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save_latest(self, step: int, state: Any, meta: dict) -> None:
        if self.latest.latest_step() == step:
            return
        self.latest.save(step, args=self._args(state, meta), force=True)
        self.latest.wait_until_finished()

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        if self.best.latest_step() == step:
            return
        self.best.save(step, args=self._args(state, meta), force=True)
        self.best.wait_until_finished()

    @staticmethod
    def _restore(manager, template, step: Optional[int]):
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_latest(self, template: Any):
        """(state, meta) of the latest checkpoint, or None when there is none."""
        return self._restore(self.latest, template, None)

    def restore_best(self, template: Any):
        """(state, meta) of the best checkpoint, or None."""
        return self._restore(self.best, template, None)

    def close(self):
        self.latest.close()
        self.best.close()
