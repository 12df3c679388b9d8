"""Compiled-step cache and restored-array hygiene shared by the distillation runs."""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["memoize_builder", "uncommitted"]


def uncommitted(tree):
    """Copies restored arrays to fresh, uncommitted device arrays (like freshly created ones).

    Arrays restored by orbax are committed to a device; passing them to a jitted step that has
    so far seen uncommitted arrays compiles it again. Resumed runs call this once on restore.
    """
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)


_BUILDER_CACHE: Dict[tuple, tuple] = {}


def memoize_builder(kind: str, objects: Sequence[Any], settings: tuple, build: Callable):
    """Returns ``build()`` cached on the identity of ``objects`` and the hashable ``settings``.

    Jitted steps close over models, APIs and configs, so a fresh closure per run would be
    compiled again. Runs that reuse the same functional models / API objects (tests, resumes in
    one process, IDEAL and NaiveKD sharing a student) share the compiled step. The cache keeps
    references to ``objects`` so their ids stay unique.
    """
    key = (kind, tuple(id(o) for o in objects), settings)
    hit = _BUILDER_CACHE.get(key)
    if hit is None:
        hit = (build(), tuple(objects))
        _BUILDER_CACHE[key] = hit
    return hit[0]
