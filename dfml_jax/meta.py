"""MAML as pure functions: inner adaptation by ``lax.scan``, meta-losses, few-shot evaluation.

Everything works on a pure ``apply_fn(params, x) -> logits`` (for the Conv4 meta-model, batch-
statistics BN: ``FunctionalModel.apply_batchstats``). Inner loops are plain SGD over all
parameters; second order by default (gradients flow through the inner steps), first order with
``first_order=True`` (inner gradients are treated as constants).

References:
  Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
  arXiv:1703.03400.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.losses import accuracy, cross_entropy

__all__ = ["adapt", "maml_task_loss", "finetune_accuracy", "evaluate_tasks", "mean_ci", "EvalResult",
           "select_finetune_lr"]

ApplyFn = Callable[[object, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def adapt(apply_fn: ApplyFn, params, x: jax.Array, targets: jax.Array, *, steps: int, lr: float,
          loss_fn: LossFn = cross_entropy, first_order: bool = False, unroll: int | bool = 1):
    """Inner-loop adaptation: ``steps`` plain SGD steps of ``loss_fn(apply_fn(p, x), targets)``.

    Args:
      apply_fn: pure model function ``(params, x) -> logits``.
      params: initial (meta) parameters, any pytree.
      x: support inputs (n, ...).
      targets: support targets, whatever ``loss_fn`` takes (labels or teacher probabilities).
      steps: number of SGD steps (static).
      lr: inner learning rate.
      loss_fn: ``(logits, targets) -> scalar``.
      first_order: if True, inner gradients are constants for the outer gradient (FOMAML).
      unroll: ``lax.scan``'s ``unroll`` for the inner loop (``True``: fully unrolled; the same
        steps, compiled as straight-line code: equal up to float rounding).

    Returns:
      The adapted parameters (same structure as ``params``).
    """
    grad_fn = jax.grad(lambda p: loss_fn(apply_fn(p, x), targets))

    def step(p, _):
        g = grad_fn(p)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return jax.tree.map(lambda a, b: a - lr * b, p, g), None

    params, _ = jax.lax.scan(step, params, None, length=steps, unroll=unroll)
    return params


def maml_task_loss(apply_fn: ApplyFn, params, support_x, support_t, query_x, query_t, *, steps: int,
                   lr: float, loss_fn: LossFn = cross_entropy, first_order: bool = False,
                   query_labels=None, unroll: int | bool = 1):
    """Outer loss of one task: adapt on the support set, evaluate ``loss_fn`` on the query set.

    Args:
      apply_fn, params, steps, lr, loss_fn, first_order, unroll: as in :func:`adapt`.
      support_x, support_t: support inputs and targets.
      query_x, query_t: query inputs and targets.
      query_labels: optional int labels of the query set for the reported accuracy (defaults to
        ``query_t`` when it holds labels, else the argmax of the targets).

    Returns:
      ``(loss, (accuracy, adapted_params))``.
    """
    fast = adapt(apply_fn, params, support_x, support_t, steps=steps, lr=lr, loss_fn=loss_fn,
                 first_order=first_order, unroll=unroll)
    logits = apply_fn(fast, query_x)
    loss = loss_fn(logits, query_t)
    if query_labels is None:
        query_labels = query_t if query_t.ndim == 1 else jnp.argmax(query_t, -1)
    return loss, (accuracy(logits, query_labels), fast)


def finetune_accuracy(apply_fn: ApplyFn, params, support_x, support_y, query_x, query_y, *,
                      steps: int = 10, lr: float = 0.01) -> jax.Array:
    """Few-shot test protocol for one task: fine-tune all parameters on the support set with CE
    for ``steps`` SGD steps, return the query accuracy."""
    fast = adapt(apply_fn, params, support_x, support_y, steps=steps, lr=lr, first_order=True)
    return accuracy(apply_fn(fast, query_x), query_y)


class EvalResult(NamedTuple):
    mean: float
    ci95: float
    accuracies: np.ndarray


def mean_ci(accs) -> EvalResult:
    """Mean accuracy and 95% confidence half-width ``1.96 * std / sqrt(n)`` (in %)."""
    a = np.asarray(accs, np.float64) * 100.0
    ci = 1.96 * a.std() / np.sqrt(len(a)) if len(a) > 1 else float("nan")
    return EvalResult(float(a.mean()), float(ci), a)


def evaluate_tasks(apply_fn: ApplyFn, params, support_x, support_y, query_x, query_y, *,
                   steps: int = 10, lr: float = 0.01, batch_size: int = 50) -> EvalResult:
    """Accuracy (mean and 95% CI over tasks) of fine-tuning ``params`` on each task.

    Tasks are stacked along the leading axis (T, ...); they are processed ``batch_size`` at a time
    with ``vmap`` inside ``lax.map``, so any T works with bounded memory.
    """
    t = support_x.shape[0]
    batch_size = min(batch_size, t)
    idx = np.arange(t + (-t) % batch_size) % t  # pad cyclically to a multiple of batch_size

    def padded(a):
        return a[idx] if len(idx) != t else a

    arrays = [padded(jnp.asarray(a)) for a in (support_x, support_y, query_x, query_y)]
    arrays = [a.reshape((-1, batch_size) + a.shape[1:]) for a in arrays]
    accs = _eval_chunks(apply_fn, params, *arrays, steps=steps, lr=lr)
    return mean_ci(np.asarray(accs).reshape(-1)[:t])


def _eval_chunks(apply_fn, params, sx, sy, qx, qy, *, steps, lr):
    # lr is traced: evaluating a grid of learning rates compiles once
    return _eval_chunks_jit(apply_fn, steps, params, jnp.asarray(lr, jnp.float32), sx, sy, qx, qy)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_chunks_jit(apply_fn, steps, params, lr, sx, sy, qx, qy):
    one = lambda a, b, c, d: finetune_accuracy(apply_fn, params, a, b, c, d, steps=steps, lr=lr)
    return jax.lax.map(lambda args: jax.vmap(one)(*args), (sx, sy, qx, qy))


def select_finetune_lr(apply_fn: ApplyFn, params, support_x, support_y, query_x, query_y, *,
                       lrs, steps: int = 10, batch_size: int = 50):
    """Picks the test-time fine-tuning learning rate on VALIDATION tasks.

    Each candidate learning rate is evaluated with :func:`evaluate_tasks` on the same tasks; the
    one with the highest mean accuracy wins (ties: the smallest learning rate). Use meta-validation
    tasks, never the test split: the chosen rate is then applied unchanged to the test tasks.

    Args:
      apply_fn, params, steps, batch_size: as in :func:`evaluate_tasks`.
      support_x, support_y, query_x, query_y: stacked validation tasks (T, ...).
      lrs: candidate learning rates (non-empty, positive).

    Returns:
      ``(best_lr, {lr: EvalResult})``.

    >>> import jax.numpy as jnp
    >>> apply = lambda p, x: x @ p
    >>> x = jnp.eye(3)[None].repeat(4, 0); y = jnp.arange(3)[None].repeat(4, 0)
    >>> best, table = select_finetune_lr(apply, jnp.zeros((3, 3)), x, y, x, y, lrs=(0.0, 1.0), steps=1)
    >>> best, round(table[0.0].mean), round(table[1.0].mean)
    (1.0, 33, 100)
    """
    lrs = tuple(float(v) for v in lrs)
    if not lrs or any(not v >= 0 for v in lrs):
        raise ValueError(f"lrs must be a non-empty sequence of non-negative learning rates, got {lrs}")
    table = {lr: evaluate_tasks(apply_fn, params, support_x, support_y, query_x, query_y,
                                steps=steps, lr=lr, batch_size=batch_size) for lr in lrs}
    best = max(sorted(lrs), key=lambda v: table[v].mean)  # max keeps the first (smallest) on ties
    return best, table
