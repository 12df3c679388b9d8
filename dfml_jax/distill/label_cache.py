"""IDEAL's / NaiveKD's label cache: every bought sample and the teacher's answer, on disk.

Every synthetic sample is written, with the teacher's answer, to an append-only on-disk log the
moment it is bought, so the teacher is queried exactly once per sample, even across a kill and a
resume. Images are stored as uint8 levels (the released code's PNG round-trip).
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.training.run_loop import atomic_write_json

__all__ = ["PoolStore", "quantize_uint8", "dequantize", "atomic_write_json"]


# ----------------------------------------------------------------------------- quantisation
def quantize_uint8(x: jax.Array) -> jax.Array:
    """Images in [0, 1] to uint8 levels (the official IDEAL code's PNG round-trip)."""
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def dequantize(x: jax.Array) -> jax.Array:
    """uint8 levels back to float32 in [0, 1]; float inputs pass through as float32."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- label cache
class PoolStore:
    """The synthetic pool and its label cache: images + teacher answers, each bought exactly once.

    The pool lives on the device in a capacity-padded buffer (grown by doubling, so the jitted pool
    pass recompiles only ``O(log n)`` times). With a ``directory``, every round's new samples and
    answers are appended to ``round_XXXXXX.npz`` the moment they are bought; a resumed run reloads
    them and never queries those samples again.

    Args:
      image_shape: ``(H, W, C)``.
      label_shape: ``()`` for hard labels, ``(K,)`` for soft answers.
      quantize: store uint8 levels (IDEAL's PNG round-trip) instead of float32.
      directory: optional on-disk log.
      initial_capacity: first buffer size (samples).
    """

    def __init__(self, image_shape: Sequence[int], label_shape: Sequence[int] = (), *,
                 quantize: bool = True, directory: Optional[str] = None,
                 initial_capacity: int = 1024):
        self.image_shape = tuple(image_shape)
        self.label_shape = tuple(label_shape)
        self.quantize = quantize
        self.directory = directory
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.size = 0
        self._x_dtype = jnp.uint8 if quantize else jnp.float32
        self._y_dtype = jnp.int32 if not self.label_shape else jnp.float32
        cap = max(int(initial_capacity), 1)
        self.x = jnp.zeros((cap,) + self.image_shape, self._x_dtype)
        self.y = jnp.zeros((cap,) + self.label_shape, self._y_dtype)
        self.rounds: List[int] = []

    @property
    def capacity(self) -> int:
        return int(self.x.shape[0])

    def _ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = self.capacity
        while cap < n:
            cap *= 2
        grow = cap - self.capacity
        self.x = jnp.concatenate([self.x, jnp.zeros((grow,) + self.image_shape, self._x_dtype)])
        self.y = jnp.concatenate([self.y, jnp.zeros((grow,) + self.label_shape, self._y_dtype)])

    def prepare(self, x: jax.Array) -> jax.Array:
        """The stored form of new images (uint8 levels when quantising)."""
        return quantize_uint8(x) if self.quantize else jnp.clip(x, 0.0, 1.0).astype(jnp.float32)

    def _path(self, round_index: int) -> str:
        return os.path.join(self.directory, f"round_{round_index:06d}.npz")

    def has_round(self, round_index: int) -> bool:
        """Whether round ``round_index`` was bought (and logged) already."""
        return bool(self.directory) and os.path.exists(self._path(round_index))

    def cached_round(self, round_index: int):
        """``(x_stored, answers, ledger_answered)`` of a round already bought, or None."""
        if not self.directory or not os.path.exists(self._path(round_index)):
            return None
        with np.load(self._path(round_index)) as z:
            return z["x"], z["y"], int(z["answered"])

    def append(self, round_index: int, x_stored, answers, ledger_answered: int) -> None:
        """Adds a bought round (logged to disk first, then to the device buffer)."""
        x_stored = np.asarray(x_stored)
        answers = np.asarray(answers)
        if self.directory and not os.path.exists(self._path(round_index)):
            tmp = self._path(round_index) + ".tmp.npz"
            np.savez(tmp, x=x_stored, y=answers, answered=np.int64(ledger_answered))
            os.replace(tmp, self._path(round_index))
        n = len(x_stored)
        self._ensure(self.size + n)
        self.x = jax.lax.dynamic_update_slice_in_dim(self.x, jnp.asarray(x_stored, self._x_dtype),
                                                     self.size, 0)
        self.y = jax.lax.dynamic_update_slice_in_dim(self.y, jnp.asarray(answers, self._y_dtype),
                                                     self.size, 0)
        self.size += n
        self.rounds.append(round_index)

    def reload(self, round_indices: Sequence[int]) -> None:
        """Rebuilds the buffer from the on-disk log (resume)."""
        for r in round_indices:
            cached = self.cached_round(r)
            if cached is None:
                raise FileNotFoundError(
                    f"pool log {self._path(r)} is missing: the run directory is incomplete; delete it "
                    "to start over")
            self.append(r, cached[0], cached[1], cached[2])

    def discard_rounds_after(self, round_index: int) -> None:
        """Removes on-disk rounds newer than ``round_index`` (never needed while resuming: kept)."""
        if not self.directory:
            return
        for p in glob.glob(os.path.join(self.directory, "round_*.npz")):
            r = int(os.path.basename(p)[6:12])
            if r > round_index:
                os.remove(p)

    def class_histogram(self, num_classes: int) -> List[int]:
        """Counts of the teacher's (arg-max) labels in the pool."""
        y = np.asarray(self.y[: self.size])
        if self.label_shape:
            y = y.argmax(-1)
        return np.bincount(y, minlength=num_classes).tolist()
