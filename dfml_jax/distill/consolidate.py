"""Consolidation: a copy of the student trained further on the pool bought so far, no query.

IDEAL's online student takes one pass over the pool per round, so after a few thousand queries
it has taken only a few hundred SGD steps on the labels it paid for (20 rounds of 250: 210
steps). The released code trains on the pool after generation stops (``stop_gen``: the last
rounds only re-train); a run stopped at budget ``Q`` has no such phase. Consolidation adds it at
every budget the run is evaluated at: a copy of the student makes ``passes`` more passes over the
pool (its learning rate decayed from ``lr`` to 0 on a cosine, a fresh momentum, a small random
shift of each image whose label is kept, since a digit moved by one pixel is the same digit),
evaluated every ``eval_every`` passes. The online student, the generator's proxy, goes on
unchanged, so the queries a run buys do not depend on the budgets it is evaluated at.

Reference: ``shared/specs/ideal_dfme.md`` section 3.7 (``stop_gen``); ``docs/ideal_diagnosis.md``
section 9 (why, and what it buys at 5K and 25K queries).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Iterator, Tuple

import jax
import jax.numpy as jnp
import optax

from dfml_jax.distill.student import StudentState, make_pool_pass
from dfml_jax.training.optim import _torch_sgd

__all__ = ["cosine_pass_lrs", "make_consolidation"]


def cosine_pass_lrs(lr: float, passes: int) -> list:
    """The learning rate of each pass: ``lr`` decayed to 0 on a half cosine, constant in a pass.

    >>> [round(v, 3) for v in cosine_pass_lrs(0.1, 4)]
    [0.1, 0.085, 0.05, 0.015]
    """
    return [lr * 0.5 * (1.0 + math.cos(math.pi * i / passes)) for i in range(passes)]


@functools.lru_cache(maxsize=16)
def _injected_sgd(momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """PyTorch-semantics SGD whose learning rate lives in the optimiser state (set per pass)."""
    return optax.inject_hyperparams(_torch_sgd, static_args=("momentum", "weight_decay"))(
        learning_rate=0.0, momentum=momentum, weight_decay=weight_decay)


def make_consolidation(student_fm, *, lr: float, momentum: float, weight_decay: float,
                       batch_size: int, passes: int, eval_every: int, augment: str, pad: int,
                       pool_loss: str = "ce", num_classes: int = 0,
                       targets_kind: str = "hard") -> Callable:
    """Builds ``consolidate(state, pool_x, pool_y, n, key)``, an iterator over evaluation points.

    Args:
      student_fm: the student's :class:`~dfml_jax.models.FunctionalModel`.
      lr, momentum, weight_decay: SGD of the copy (``lr`` is the first pass's rate).
      batch_size: minibatch size of each pass.
      passes: passes over the pool (> 0).
      eval_every: yield the copy every this many passes (and after the last).
      augment, pad: per-sample augmentation of the pool's images (:data:`AUGMENTATIONS`).
      pool_loss, num_classes, targets_kind: as for :func:`make_pool_pass`.

    Returns:
      ``consolidate(state, pool_x, pool_y, n, key)`` yielding ``(passes_done, params, bn,
      mean_loss)``; ``state`` (the online student) is not changed.
    """
    if passes <= 0 or eval_every <= 0:
        raise ValueError(f"passes and eval_every must be positive, got {passes}, {eval_every}")
    tx = _injected_sgd(float(momentum), float(weight_decay))
    pool_pass = make_pool_pass(student_fm, tx, batch_size=batch_size, augment=augment, pad=pad,
                               targets_kind=targets_kind, pool_loss=pool_loss,
                               num_classes=num_classes or None)
    lrs = cosine_pass_lrs(lr, passes)

    def consolidate(state: StudentState, pool_x, pool_y, n, key
                    ) -> Iterator[Tuple[int, Any, Any, float]]:
        copy = StudentState(state.params, state.bn, tx.init(state.params))
        for i, lr_i in enumerate(lrs):
            copy = copy._replace(opt_state=_with_lr(copy.opt_state, lr_i))
            copy, loss, _ = pool_pass(copy, pool_x, pool_y, n, jax.random.fold_in(key, i))
            if (i + 1) % eval_every == 0 or i + 1 == passes:
                yield i + 1, copy.params, copy.bn, float(loss)

    return consolidate


def _with_lr(opt_state, lr: float):
    hyper: Dict[str, Any] = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state._replace(hyperparams=hyper)
