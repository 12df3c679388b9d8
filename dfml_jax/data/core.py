"""Containers shared by every dataset: class-level splits, single-task data, few-shot tasksets.

Images are NHWC ``float32`` in [0, 1] on access (stored as uint8). Few-shot splits are
:class:`ClassDataset` s of shape ``(num_classes, per_class, H, W, C)``; a :class:`Taskset` samples
N-way K-shot tasks from one of them on device, deterministically from a PRNG key, with static
shapes (learn2learn vocabulary: ``ways``, ``shots``, ``query``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ClassDataset", "SingleTaskData", "Task", "Taskset", "Tasksets"]


class ClassDataset:
    """A few-shot split: ``per_class`` images for each of ``num_classes`` classes.

    Args:
      images: uint8 ``(num_classes, per_class, H, W, C)`` (or float in [0, 1]).
      class_names: one name per class.
      groups: optional group (alphabet, superclass...) per class.
      name: e.g. ``"glyphs/train"``.
    """

    def __init__(self, images: np.ndarray, class_names: Sequence[str],
                 groups: Optional[Sequence[str]] = None, name: str = "dataset"):
        images = np.asarray(images)
        if images.ndim != 5:
            raise ValueError(f"{name}: images must be (classes, per_class, H, W, C), got {images.shape}")
        if len(class_names) != images.shape[0]:
            raise ValueError(f"{name}: {len(class_names)} class names for {images.shape[0]} classes")
        self.images = images
        self.class_names = list(class_names)
        self.groups = list(groups) if groups is not None else None
        self.name = name
        self._device = None

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[2:])

    def _as_float(self, a):
        return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)

    def images_of(self, classes) -> np.ndarray:
        """Images of absolute class ids ``classes``: ``(len(classes), per_class, H, W, C)`` float32."""
        classes = np.asarray(classes)
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"{self.name}: class ids must be in [0, {self.num_classes}), got "
                             f"{classes[(classes < 0) | (classes >= self.num_classes)].tolist()}")
        return self._as_float(self.images[classes])

    def device_images(self) -> jax.Array:
        """The uint8 image array on device (cached), for jitted task sampling."""
        if self._device is None:
            self._device = jnp.asarray(self.images)
        return self._device

    def __repr__(self):
        return (f"ClassDataset({self.name!r}, classes={self.num_classes}, per_class={self.per_class}, "
                f"image_shape={self.image_shape})")


class SingleTaskData(NamedTuple):
    """A single-task classification dataset (IDEAL / DFME teachers and students)."""
    x_train: np.ndarray   # (n, H, W, C) float32 in [0, 1]
    y_train: np.ndarray   # (n,) int32
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


class Task(NamedTuple):
    """A stack of few-shot tasks. Labels are relative (0..ways-1), blocked by class: the support
    set is ``[class 0] * shots + [class 1] * shots + ...`` and the query set likewise."""
    support_x: jax.Array  # (T, ways*shots, H, W, C) float32 in [0, 1]
    support_y: jax.Array  # (T, ways*shots) int32
    query_x: jax.Array    # (T, ways*query, H, W, C)
    query_y: jax.Array    # (T, ways*query) int32
    classes: jax.Array    # (T, ways) absolute class ids of the split


def _task_indices(key, num_classes: int, per_class: int, num_tasks: int, ways: int, n: int):
    """Absolute classes ``(T, ways)`` and image indices ``(T, ways, n)``, all distinct per task /
    class: top-k of uniform noise is a uniformly random ordered subset without replacement."""
    kc, ki = jax.random.split(key)
    classes = jax.lax.top_k(jax.random.uniform(kc, (num_tasks, num_classes)), ways)[1]
    idx = jax.lax.top_k(jax.random.uniform(ki, (num_tasks, ways, per_class)), n)[1]
    return classes.astype(jnp.int32), idx.astype(jnp.int32)


_indices = jax.jit(_task_indices, static_argnums=(1, 2, 3, 4, 5))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _sample(images, key, num_tasks, ways, shots, query):
    c, p = images.shape[:2]
    classes, idx = _task_indices(key, c, p, num_tasks, ways, shots + query)
    shape = images.shape[2:]
    flat = images.reshape((c * p,) + shape)

    def gather(ix, k):  # (T, ways, k) -> (T, ways*k, H, W, C) float32, blocked by class
        x = jnp.take(flat, (classes[:, :, None] * p + ix).reshape(-1), axis=0)
        x = x.reshape((num_tasks, ways * k) + shape)
        return x.astype(jnp.float32) * (1.0 / 255.0) if images.dtype == jnp.uint8 else x.astype(jnp.float32)

    def labels(k):
        return jnp.broadcast_to(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), k), (num_tasks, ways * k))

    return Task(gather(idx[:, :, :shots], shots), labels(shots), gather(idx[:, :, shots:], query),
                labels(query), classes)


class Taskset:
    """N-way K-shot tasks of one :class:`ClassDataset`.

    Args:
      dataset: the split.
      ways, shots, query: classes per task, support and query images per class.

    Raises:
      ValueError: too few classes for ``ways`` or too few images for ``shots + query``.
    """

    def __init__(self, dataset: ClassDataset, ways: int, shots: int, query: int):
        if ways < 1 or shots < 1 or query < 0:
            raise ValueError(f"need ways >= 1, shots >= 1, query >= 0 (got {ways}, {shots}, {query})")
        if dataset.num_classes < ways:
            raise ValueError(f"{dataset.name} has {dataset.num_classes} classes, fewer than "
                             f"ways={ways}; use fewer ways or a larger split.")
        if dataset.per_class < shots + query:
            raise ValueError(f"{dataset.name} has {dataset.per_class} images per class, fewer than "
                             f"shots + query = {shots} + {query} = {shots + query}.")
        self.dataset, self.ways, self.shots, self.query = dataset, ways, shots, query

    def sample(self, key: jax.Array, num_tasks: int) -> Task:
        """Samples a stack of tasks (one jitted gather on device).

        Args:
          key: a ``jax.random`` key; the same key gives the same tasks.
          num_tasks: number of tasks ``T`` (static: each new value compiles once).

        Returns:
          :class:`Task` with ``support_x (T, ways*shots, H, W, C)`` and ``query_x
          (T, ways*query, H, W, C)`` float32 in [0, 1], relative labels blocked by class, and the
          absolute ``classes (T, ways)``. Classes within a task are distinct, and so are the
          ``shots + query`` images drawn for each class.
        """
        return _sample(self.dataset.device_images(), key, int(num_tasks), self.ways, self.shots,
                       self.query)

    def sample_indices(self, key: jax.Array, num_tasks: int):
        """The indices :meth:`sample` would draw for ``key``, without gathering images.

        Args:
          key: a ``jax.random`` key.
          num_tasks: number of tasks ``T``.

        Returns:
          ``(classes, images)``: int32 ``(T, ways)`` absolute class ids and int32
          ``(T, ways, shots + query)`` image indices within each class (the first ``shots`` are
          the support set); ``dataset.images[classes[..., None], images]`` are the task's images.
        """
        return _indices(key, self.dataset.num_classes, self.dataset.per_class, int(num_tasks),
                        self.ways, self.shots + self.query)

    def __repr__(self):
        return f"Taskset({self.dataset.name}, ways={self.ways}, shots={self.shots}, query={self.query})"


class Tasksets(NamedTuple):
    train: Taskset
    validation: Taskset
    test: Taskset
