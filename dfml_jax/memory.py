"""Task memory for BiDf-MKD's replay: a per-class ring buffer of recovered images.

Each class owns ``slots`` slots of ``per_slot`` images. Every inversion writes its images of a
class into that class's next slot, overwriting the oldest one (official code: 20 slots of 30
images). Images are stored as uint8 with truncation ``(x * 255).astype(uint8)``, like the official
PNG round-trip. Replay tasks recombine classes recovered from *different* APIs ("interpolated
tasks"): ``ways`` distinct classes among all classes ever written, ``shots + query`` distinct
images of each.

The memory is a pytree (:class:`MemoryState`) updated by pure functions, so it lives on device,
is checkpointed with the run and is sampled inside ``jit``. Rows are indexed by a compact *memory
row*, not the absolute class id; :func:`row_of_classes` maps absolute ids to rows given the sorted
list of classes the memory can hold (the union of the pool's classes).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MemoryState", "PlateauTrigger", "init_memory", "write", "sample_tasks", "row_of_classes",
           "num_filled"]


class MemoryState(NamedTuple):
    images: jax.Array     # (rows, slots, per_slot, H, W, C) uint8
    filled: jax.Array     # (rows, slots) bool
    next_slot: jax.Array  # (rows,) int32: the slot the next write of that row goes to


def init_memory(rows: int, slots: int, per_slot: int, image_shape: Sequence[int]) -> MemoryState:
    """Empty memory for ``rows`` classes.

    >>> m = init_memory(3, 2, 4, (8, 8, 1))
    >>> m.images.shape, int(num_filled(m))
    ((3, 2, 4, 8, 8, 1), 0)
    """
    return MemoryState(jnp.zeros((rows, slots, per_slot, *image_shape), jnp.uint8),
                       jnp.zeros((rows, slots), bool), jnp.zeros((rows,), jnp.int32))


def row_of_classes(memory_classes: Sequence[int], classes) -> np.ndarray:
    """Memory rows of absolute class ids (host side).

    Args:
      memory_classes: sorted absolute class ids the memory holds, row i = memory_classes[i].
      classes: absolute class ids to look up.

    Returns:
      int32 array of rows. Raises ValueError for a class the memory does not hold.
    """
    memory_classes = np.asarray(memory_classes)
    classes = np.asarray(classes)
    rows = np.searchsorted(memory_classes, classes)
    ok = (rows < len(memory_classes)) & (memory_classes[np.minimum(rows, len(memory_classes) - 1)] == classes)
    if not ok.all():
        raise ValueError(f"classes {classes[~ok].tolist()} are not held by this memory "
                         f"(it holds {len(memory_classes)} classes)")
    return rows.astype(np.int32)


def write(mem: MemoryState, rows: jax.Array, images: jax.Array,
          keep: jax.Array | None = None) -> MemoryState:
    """Write one slot of images for each row.

    Args:
      mem: the memory.
      rows: (N,) memory rows (distinct).
      images: (N, per_slot, H, W, C) images in [0, 1].
      keep: optional (N, per_slot) bool, the images worth keeping (e.g. those the API assigns to
        their target class). A row's slot is then filled with its kept images only, repeated in
        order to fill the ``per_slot`` positions (``[a, b, a, b, ...]``), so the layout and the
        sampling stay static; a row with no kept image is written unfiltered. ``None``: keep all
        (the official code).

    Returns:
      The updated memory (the oldest slot of each row overwritten).

    >>> m = init_memory(1, 2, 4, (1, 1, 1))
    >>> imgs = jnp.array([0.0, 0.2, 0.4, 0.6]).reshape(1, 4, 1, 1, 1)
    >>> m = write(m, jnp.array([0]), imgs, keep=jnp.array([[False, True, False, True]]))
    >>> m.images[0, 0, :, 0, 0, 0].tolist()   # 0.2 and 0.6, truncated to uint8, repeated
    [51, 153, 51, 153]
    """
    if keep is not None:
        images = jax.vmap(_fill_with_kept)(images, jnp.asarray(keep, bool))
    q = (jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)  # truncation, like the PNG round-trip
    slot = mem.next_slot[rows]
    slots = mem.filled.shape[1]
    return MemoryState(mem.images.at[rows, slot].set(q), mem.filled.at[rows, slot].set(True),
                       mem.next_slot.at[rows].set((slot + 1) % slots))


def _fill_with_kept(images: jax.Array, keep: jax.Array) -> jax.Array:
    """(per_slot, ...) images -> the kept ones repeated cyclically (all of them if none is kept)."""
    n = images.shape[0]
    order = jnp.argsort(~keep, stable=True)          # kept images first, in their order
    count = jnp.sum(keep)
    idx = jnp.where(count > 0, order[jnp.arange(n) % jnp.maximum(count, 1)], jnp.arange(n))
    return images[idx]


def num_filled(mem: MemoryState) -> jax.Array:
    """Number of rows (classes) with at least one filled slot."""
    return jnp.sum(jnp.any(mem.filled, axis=1))


def sample_tasks(mem: MemoryState, key: jax.Array, num_tasks: int, *, ways: int, shots: int,
                 query: int):
    """Sample replay tasks from the memory (jittable; ``num_tasks, ways, shots, query`` static).

    Classes: ``ways`` distinct rows uniformly among rows with data. Images: ``shots + query``
    distinct images uniformly among the filled slots of each class. Labels are relative
    (0..ways-1, class order as sampled), support and query blocked by class.

    Returns:
      ``(support_x (T, ways*shots, H, W, C) float32 in [0,1], support_y (T, ways*shots) int32,
      query_x (T, ways*query, ...), query_y, rows (T, ways))``. The caller must make sure at least
      ``ways`` classes are present (``num_filled``); otherwise rows without data may be drawn.
    """
    rows_total, slots, per_slot = mem.images.shape[:3]
    has = jnp.any(mem.filled, axis=1)
    img_ok = jnp.repeat(mem.filled, per_slot, axis=1)  # (rows, slots*per_slot)

    def one(k):
        kc, ki = jax.random.split(k)
        rows = jax.random.choice(kc, rows_total, (ways,), replace=False, p=has / jnp.sum(has))

        def pick(kk, r):
            p = img_ok[r] / jnp.sum(img_ok[r])
            return jax.random.choice(kk, slots * per_slot, (shots + query,), replace=False, p=p)

        idx = jax.vmap(pick)(jax.random.split(ki, ways), rows)  # (ways, shots+query)
        flat = mem.images[rows].reshape((ways, slots * per_slot) + mem.images.shape[3:])
        imgs = jnp.take_along_axis(flat, idx.reshape(idx.shape + (1,) * (flat.ndim - 2)), axis=1)
        imgs = imgs.astype(jnp.float32) / 255.0
        labels = jnp.broadcast_to(jnp.arange(ways)[:, None], idx.shape)
        sx = imgs[:, :shots].reshape((ways * shots,) + imgs.shape[2:])
        qx = imgs[:, shots:].reshape((ways * query,) + imgs.shape[2:])
        return sx, labels[:, :shots].reshape(-1), qx, labels[:, shots:].reshape(-1), rows

    return jax.vmap(one)(jax.random.split(key, num_tasks))


class PlateauTrigger:
    """BiDf-MKD's rule for visiting the next API: a plateau of the replay training accuracy.

    After each meta-iteration call :meth:`update` with the batch-mean training accuracy; it returns
    True when the accuracy has not reached a new maximum for ``patience`` consecutive updates (then
    the best value is forgotten and counting restarts).
    """

    def __init__(self, patience: int):
        self.patience = int(patience)
        self.best = None
        self.stall = 0

    def update(self, acc: float) -> bool:
        if self.best is None or acc > self.best:
            self.best, self.stall = float(acc), 0
            return False
        self.stall += 1
        if self.stall >= self.patience:
            self.best, self.stall = None, 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "stall": self.stall, "patience": self.patience}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.stall, self.patience = d["best"], int(d["stall"]), int(d["patience"])
