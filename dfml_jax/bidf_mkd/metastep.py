"""Bi-level meta knowledge distillation and memory replay: the meta-update of BiDf-MKD.

A meta-batch holds ``meta_batch`` tasks whose losses are summed (as in the official code) before
one Adam step of the meta-model:

* a **KD task** (one per API visit): inner SGD steps of the meta-model on the recovered support set
  with KD to the API's outputs, outer KD loss on the boundary-recovered query set, second order
  through the inner loop (``lax.scan``) unless ``first_order``;
* **replay tasks**: MAML with cross-entropy on tasks sampled from the task memory.

All functions are pure; :func:`make_meta_steps` returns the two jitted step variants (replay only,
KD + replay), compiled once each.

References:
  Hu et al., "Learning to Learn from APIs: Black-Box Data-Free Meta-Learning", ICML 2023,
  arXiv:2305.18413, Sec. 3.2-3.3.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dfml_jax.losses import KD_LOSSES, cross_entropy
from dfml_jax.meta import adapt, maml_task_loss
from dfml_jax.parallel import constrain_batch, replicate

__all__ = ["KDTask", "ReplayTasks", "kd_task_loss", "replay_loss", "make_meta_steps", "cached_meta_steps",
           "MetaSteps"]


class KDTask(NamedTuple):
    """One API visit's distillation task (images already augmented and normalised)."""
    support_x: jax.Array   # (B, H, W, C)
    support_p: jax.Array   # (B, K) API probabilities on support_x
    query_x: jax.Array     # (B, H, W, C)
    query_p: jax.Array     # (B, K)
    query_y: jax.Array     # (B,) the synthetic target labels (reporting only)


class ReplayTasks(NamedTuple):
    """A stack of replay tasks (normalised images, relative labels)."""
    support_x: jax.Array   # (T, ways*shots, H, W, C)
    support_y: jax.Array   # (T, ways*shots)
    query_x: jax.Array     # (T, ways*query, H, W, C)
    query_y: jax.Array     # (T, ways*query)


def kd_task_loss(apply_fn: Callable, params, task: KDTask, *, steps: int, lr: float,
                 kd_loss: str = "kl", first_order: bool = False, unroll: int | bool = 1):
    """Outer KD loss of one API visit through ``steps`` inner KD steps (``unroll``: the inner
    ``lax.scan``'s, as in :func:`dfml_jax.meta.adapt`).

    Returns:
      ``(loss, accuracy on the synthetic query labels)``.
    """
    kd = KD_LOSSES[kd_loss]
    loss, (acc, _) = maml_task_loss(apply_fn, params, task.support_x, task.support_p, task.query_x,
                                    task.query_p, steps=steps, lr=lr, loss_fn=kd,
                                    first_order=first_order, query_labels=task.query_y,
                                    unroll=unroll)
    return loss, acc


def adapt_on_support(apply_fn: Callable, params, support_x, support_p, *, steps: int, lr: float,
                     kd_loss: str = "kl"):
    """The task-specific model after the inner KD loop (the boundary term's student)."""
    return adapt(apply_fn, params, support_x, support_p, steps=steps, lr=lr,
                 loss_fn=KD_LOSSES[kd_loss], first_order=True)


def replay_loss(apply_fn: Callable, params, tasks: ReplayTasks, *, steps: int, lr: float,
                first_order: bool = False, unroll: int | bool = 1):
    """Summed MAML cross-entropy outer loss of a stack of replay tasks, and their accuracies
    (``unroll``: the inner ``lax.scan``'s, as in :func:`dfml_jax.meta.adapt`)."""
    def one(sx, sy, qx, qy):
        loss, (acc, _) = maml_task_loss(apply_fn, params, sx, sy, qx, qy, steps=steps, lr=lr,
                                        loss_fn=cross_entropy, first_order=first_order,
                                        unroll=unroll)
        return loss, acc

    losses, accs = jax.vmap(one)(*tasks)
    return losses.sum(), accs


class MetaSteps(NamedTuple):
    replay: Callable  # (params, opt_state, ReplayTasks) -> (params, opt_state, loss, accs)
    kd_replay: Callable  # (params, opt_state, KDTask, ReplayTasks) -> (params, opt_state, loss, accs)
    adapt_support: Callable  # (params, support_x, support_p) -> adapted params


@functools.lru_cache(maxsize=32)
def cached_meta_steps(apply_fn: Callable, outer_lr: float, *, replay_steps: int, kd_steps: int,
                      inner_lr: float, kd_loss: str = "kl", first_order: bool = False,
                      mesh=None, unroll: int | bool = 1) -> MetaSteps:
    """:func:`make_meta_steps` with Adam(``outer_lr``), memoised so that runs in one process
    (baselines, resumed runs, tests) share the compiled steps of the same model function."""
    return make_meta_steps(apply_fn, optax.adam(outer_lr), replay_steps=replay_steps,
                           kd_steps=kd_steps, inner_lr=inner_lr, kd_loss=kd_loss,
                           first_order=first_order, mesh=mesh, unroll=unroll)


def make_meta_steps(apply_fn: Callable, optimizer: optax.GradientTransformation, *,
                    replay_steps: int, kd_steps: int, inner_lr: float, kd_loss: str = "kl",
                    first_order: bool = False, mesh=None, axis: str = "data",
                    unroll: int | bool = 1) -> MetaSteps:
    """Builds the jitted meta-update steps.

    Args:
      apply_fn: the meta-model's pure ``(params, x) -> logits`` (batch-statistics BN).
      optimizer: outer optimiser (Adam 1e-3 in the paper).
      replay_steps: inner steps of replay tasks (5).
      kd_steps: inner steps of KD tasks (10).
      inner_lr: inner SGD learning rate (0.01).
      kd_loss: ``"kl"`` (standard) or ``"paper"`` (the official code's softmax quirk).
      first_order: first-order MAML in every inner loop.
      mesh: optional device mesh (:func:`dfml_jax.parallel.make_mesh`): the replay tasks of a
        meta-batch are sharded over ``axis`` (each device adapts its tasks), parameters and
        optimiser state are replicated, and the compiler all-reduces the summed outer loss's
        gradient, so the step equals the single-device one up to float reduction order. No host
        callback runs here (the KD task's API outputs are computed beforehand), so plain ``jit``
        with sharding constraints is enough. A task count that does not divide the device count
        is padded by the compiler (the KD step's ``meta_batch - 1`` replay tasks).
      axis: the mesh axis to shard over.
      unroll: the inner loops' ``lax.scan`` unroll (``True``: straight-line code, the same
        arithmetic; measured faster on XLA:CPU by ``experiments/bench/bench_torch_reference.py``).

    Returns:
      :class:`MetaSteps`; each step returns the summed loss and the per-task training accuracies
      (KD task first when present). ``kd_replay`` also takes a stack of KD tasks (every field
      with a leading axis ``k``: several APIs visited at once); their losses are summed.
    """
    def shard_tasks(tasks):
        if mesh is None:
            return tasks
        return constrain_batch(tasks, mesh, axis)

    def replay_total(params, tasks):
        tasks = shard_tasks(tasks)
        return replay_loss(apply_fn, params, tasks, steps=replay_steps, lr=inner_lr,
                           first_order=first_order, unroll=unroll)

    def kd_total(params, kd: KDTask, tasks):
        one = lambda t: kd_task_loss(apply_fn, params, t, steps=kd_steps, lr=inner_lr,
                                     kd_loss=kd_loss, first_order=first_order, unroll=unroll)
        if kd.support_x.ndim == 5:  # several API visits at once: a stack of KD tasks, summed
            l_kd, a_kd = jax.vmap(one)(shard_tasks(kd))
            l_kd = l_kd.sum()
        else:
            l_kd, a_kd = one(kd)
            a_kd = a_kd[None]
        l_r, a_r = replay_total(params, tasks)
        return l_kd + l_r, jnp.concatenate([a_kd, a_r])

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def replay(params, opt_state, tasks):
        (loss, accs), g = jax.value_and_grad(replay_total, has_aux=True)(params, tasks)
        params, opt_state = update(params, opt_state, g)
        return params, opt_state, loss, accs

    @jax.jit
    def kd_replay(params, opt_state, kd, tasks):
        (loss, accs), g = jax.value_and_grad(kd_total, has_aux=True)(params, kd, tasks)
        params, opt_state = update(params, opt_state, g)
        return params, opt_state, loss, accs

    @jax.jit
    def adapt_support(params, support_x, support_p):
        return adapt_on_support(apply_fn, params, support_x, support_p, steps=kd_steps,
                                lr=inner_lr, kd_loss=kd_loss)

    if mesh is None:
        return MetaSteps(replay, kd_replay, adapt_support)

    def on_mesh(fn):  # inputs replicated on the mesh's devices; the step shards the tasks
        return functools.wraps(fn)(lambda *args: fn(*replicate(args, mesh)))

    return MetaSteps(on_mesh(replay), on_mesh(kd_replay), on_mesh(adapt_support))
