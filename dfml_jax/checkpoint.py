"""Run checkpoints with orbax: array pytrees plus JSON metadata, atomic, resumable.

A run saves ``(step, arrays, meta)``: ``arrays`` is any pytree of arrays (parameters, optimiser
state, memory bank, typed PRNG keys), ``meta`` a JSON-serialisable dict (query ledgers, plateau
counters, results so far). Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> ck = RunCheckpointer(tempfile.mkdtemp())
  >>> ck.save(3, {"w": jnp.ones(2)}, {"queries": 10})
  >>> step, arrays, meta = ck.restore_latest({"w": jnp.zeros(2)})
  >>> step, meta["queries"], arrays["w"].tolist()
  (3, 10, [1.0, 1.0])
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["RunCheckpointer", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the expected structure."""


def _abstract(tree, sharding=None):
    def leaf(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            if isinstance(x, np.ndarray) or np.isscalar(x):
                x = jax.numpy.asarray(x)
            x = ocp.utils.to_shape_dtype_struct(x)
        if sharding is not None:
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x

    return jax.tree.map(leaf, tree)


class RunCheckpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a run in ``directory``.

    Args:
      directory: where step directories are written (created if missing).
      max_to_keep: number of most recent checkpoints kept.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("arrays", "meta"),
        )

    def save(self, step: int, arrays: Any, meta: Optional[dict] = None) -> None:
        """Saves ``arrays`` and ``meta`` as ``step`` and waits until it is on disk.

        Saving a step that already exists replaces it (the older checkpoints kept by
        ``max_to_keep`` remain as a fallback while it is rewritten).
        """
        if int(step) in self._mngr.all_steps():
            self._mngr.delete(int(step))
        self._mngr.save(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta or {})), force=True)
        self._mngr.wait_until_finished()

    @property
    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def restore(self, step: int, like: Any, sharding=None):
        """Restores checkpoint ``step``, on the current devices whatever wrote it.

        Arrays come back with the shardings of ``like`` (or ``sharding``): a checkpoint written
        on 8 devices restores on 1, or on a mesh of another size (orbax reshards on read).

        Args:
          step: the step to restore.
          like: a pytree with the structure, shapes and dtypes of the saved arrays (concrete
            arrays or ``jax.ShapeDtypeStruct``s); their shardings are the restore targets.
          sharding: optional :class:`jax.sharding.Sharding` for every array instead (e.g.
            ``dfml_jax.parallel.replicated_sharding(mesh)``).

        Returns:
          ``(arrays, meta)``.

        Raises:
          CheckpointError: if the step is missing or its structure differs from ``like``.
        """
        if step not in self._mngr.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available: {sorted(self._mngr.all_steps())}")
        try:
            out = self._mngr.restore(int(step), args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(_abstract(like, sharding)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for structure mismatches / corruption
            raise CheckpointError(
                f"could not restore step {step} from {self.directory}: {type(e).__name__}: {e}. "
                "The checkpoint is corrupted or was written by a different configuration; delete "
                "the directory to start over.") from e
        return out["arrays"], dict(out["meta"])

    def restore_latest(self, like: Any, sharding=None):
        """Returns ``(step, arrays, meta)`` of the newest checkpoint, or None if there is none."""
        step = self.latest_step
        if step is None:
            return None
        arrays, meta = self.restore(step, like, sharding)
        return step, arrays, meta

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
