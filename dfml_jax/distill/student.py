"""The student side of single-teacher distillation: the student's state, a supervised epoch over
a fixed dataset (teacher, real-data reference) and one pass over a growing synthetic pool
(:func:`make_pool_pass`: ONE compiled function whatever the pool size, a ``fori_loop`` with a
dynamic trip count over a capacity-padded pool). The optimisers are :mod:`dfml_jax.training.optim`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dfml_jax.distill.label_cache import dequantize
from dfml_jax.losses import cross_entropy, kd_kl
from dfml_jax.training.augment import augment_images
from dfml_jax.training.compile_cache import memoize_builder
from dfml_jax.training.optim import multistep_schedule, torch_sgd

__all__ = ["StudentState", "init_student", "make_supervised_epoch", "train_supervised",
           "POOL_LOSSES", "pool_class_prior", "balanced_loss", "make_pool_pass",
           # moved to dfml_jax.training.optim; re-exported so that old imports keep working
           "torch_sgd", "multistep_schedule"]


# ----------------------------------------------------------------------------- student
class StudentState(NamedTuple):
    """Explicit training state of a classifier.

    Attributes:
      params: ``nnx.State`` of parameters.
      bn: ``nnx.State`` of BatchNorm running statistics (may be empty).
      opt_state: optax state.
    """

    params: Any
    bn: Any
    opt_state: Any


def init_student(fm, tx: optax.GradientTransformation, key: jax.Array) -> StudentState:
    """Fresh student from a :class:`~dfml_jax.models.FunctionalModel` and an optimiser."""
    params, bn = fm.init(key)
    return StudentState(params, bn, tx.init(params))


def _loss_for(targets_kind: str) -> Callable:
    if targets_kind == "hard":
        return cross_entropy
    if targets_kind == "soft":
        return kd_kl
    raise ValueError(f"targets_kind must be 'hard' or 'soft', got {targets_kind!r}")


def _train_step(fm, tx, loss_fn, state: StudentState, x, y):
    def loss(params):
        logits, new_bn = fm.apply(params, state.bn, x, train=True)
        return loss_fn(logits, y), new_bn

    (value, new_bn), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return StudentState(optax.apply_updates(state.params, updates), new_bn, opt_state), value


def make_supervised_epoch(fm, tx, *, batch_size: int, augment: str = "none", pad: int = 4,
                          targets_kind: str = "hard") -> Callable:
    """Jitted ``epoch(state, x, y, key) -> (state, mean_loss)``: one shuffled pass (drop last).

    Args:
      fm: the classifier's :class:`~dfml_jax.models.FunctionalModel`.
      tx: its optimiser.
      batch_size: minibatch size.
      augment: a name in :data:`AUGMENTATIONS`.
      pad: crop padding.
      targets_kind: ``"hard"`` (integer labels, cross-entropy) or ``"soft"`` (probabilities, KL).
    """
    loss_fn = _loss_for(targets_kind)
    return memoize_builder("supervised_epoch", (fm.apply, tx), (batch_size, augment, pad,
                                                                targets_kind),
                           lambda: _build_supervised_epoch(fm, tx, batch_size, augment, pad,
                                                           loss_fn))


def _build_supervised_epoch(fm, tx, batch_size, augment, pad, loss_fn):
    @jax.jit
    def epoch(state: StudentState, x, y, key):
        n = x.shape[0]
        nb = n // batch_size
        kp, ka = jax.random.split(key)
        perm = jax.random.permutation(kp, n)[: nb * batch_size].reshape(nb, batch_size)

        def body(st, inp):
            idx, k = inp
            xb = augment_images(dequantize(x[idx]), k, augment, pad)
            return _train_step(fm, tx, loss_fn, st, xb, y[idx])

        state, losses = jax.lax.scan(body, state, (perm, jax.random.split(ka, nb)))
        return state, jnp.mean(losses)

    return epoch


def train_supervised(fm, tx, x, y, *, epochs: int, batch_size: int, key: jax.Array,
                     augment: str = "none", pad: int = 4, evaluator: Optional[Any] = None,
                     select_on_val: bool = False, progress: Optional[Callable] = None):
    """Trains a classifier on labelled data (teachers, the real-data reference student).

    Args:
      fm: :class:`~dfml_jax.models.FunctionalModel`.
      tx: optimiser.
      x, y: training images ``(N, H, W, C)`` in [0, 1] and integer labels.
      epochs: number of passes.
      batch_size: minibatch size.
      key: PRNG key (initialisation, shuffling, augmentation).
      augment: augmentation name.
      pad: crop padding.
      evaluator: if given, validation/test accuracy is recorded after every epoch.
      select_on_val: return the epoch with the best validation accuracy (needs ``evaluator`` with a
        validation split) instead of the last one.
      progress: optional callable ``progress(epoch, loss, accs)`` for logging.

    Returns:
      ``(params, bn, history)``; ``history`` is a list of dicts (epoch, loss, val_acc, test_acc).
    """
    kinit, ktrain = jax.random.split(key)
    state = init_student(fm, tx, kinit)
    epoch_fn = make_supervised_epoch(fm, tx, batch_size=min(batch_size, len(x)), augment=augment,
                                     pad=pad)
    x, y = jnp.asarray(x), jnp.asarray(y)
    history, best, best_val = [], (state.params, state.bn), -1.0
    for e in range(epochs):
        state, loss = epoch_fn(state, x, y, jax.random.fold_in(ktrain, e))
        rec = {"epoch": e + 1, "loss": float(loss)}
        if evaluator is not None:
            rec.update(evaluator(state.params, state.bn))
            if select_on_val and rec.get("val_acc", -1.0) >= best_val:
                best_val, best = rec["val_acc"], (state.params, state.bn)
        history.append(rec)
        if progress is not None:
            progress(rec)
    if not select_on_val:
        best = (state.params, state.bn)
    return best[0], best[1], history


# ----------------------------------------------------------------------------- pool pass
#: Losses of the pool pass on hard labels: plain cross-entropy, or a form that corrects for the
#: pool's class imbalance (class frequencies of the labels in the pool, recomputed every pass).
POOL_LOSSES = ("ce", "balanced_ce", "logit_adjusted")


def pool_class_prior(pool_y: jax.Array, n, num_classes: int) -> jax.Array:
    """Class frequencies of the first ``n`` hard labels of a capacity-padded pool (traceable).

    >>> pool_class_prior(jnp.array([0, 0, 1, 2, 9]), 4, 3).tolist()
    [0.5, 0.25, 0.25]
    """
    valid = (jnp.arange(pool_y.shape[0]) < n).astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(pool_y, num_classes) * valid[:, None], axis=0)
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def balanced_loss(kind: str, logits: jax.Array, labels: jax.Array, prior: jax.Array) -> jax.Array:
    """Cross-entropy on hard labels corrected for a class ``prior`` (the pool's label frequencies).

    ``"ce"``: plain mean cross-entropy. ``"balanced_ce"``: every sample weighted by the inverse
    frequency of its label (weighted mean; each class then counts equally). ``"logit_adjusted"``:
    cross-entropy of ``logits + log prior`` (Menon et al. 2021; the class-count-aware "max-margin"
    loss left commented out in the released IDEAL code): the student learns the balanced
    posterior, and predicts with its plain logits.

    >>> lg, y, pr = jnp.zeros((2, 2)), jnp.array([0, 1]), jnp.array([0.5, 0.5])
    >>> [round(float(balanced_loss(k, lg, y, pr)), 4) for k in POOL_LOSSES]
    [0.6931, 0.6931, 0.6931]
    """
    if kind == "ce":
        return cross_entropy(logits, labels)
    logprior = jnp.log(jnp.maximum(prior, 1e-8))
    if kind == "logit_adjusted":
        return cross_entropy(logits + logprior, labels)
    if kind == "balanced_ce":
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
        w = jnp.exp(-logprior)[labels]
        return jnp.sum(w * nll) / jnp.sum(w)
    raise ValueError(f"pool loss must be one of {POOL_LOSSES}, got {kind!r}")


def make_pool_pass(fm, tx, *, batch_size: int, augment: str = "none", pad: int = 4,
                   targets_kind: str = "hard", max_batches: Optional[int] = None,
                   pool_loss: str = "ce", num_classes: Optional[int] = None,
                   min_batches: int = 0) -> Callable:
    """Jitted ``pool_pass(state, pool_x, pool_y, n, key) -> (state, mean_loss, num_steps)``.

    One shuffled pass over the first ``n`` samples of a capacity-padded pool (minibatches of
    ``batch_size``, the remainder of ``n`` skipped this pass), as IDEAL's ``kd_train`` does each
    epoch. ``n`` is dynamic: ONE compiled function serves every pool size up to the capacity.

    Args:
      fm, tx: student model and optimiser.
      batch_size: minibatch size.
      augment: augmentation name (IDEAL: ``"flip"`` for MNIST/SVHN in the code, ``"crop_flip"`` for
        CIFAR).
      pad: crop padding.
      targets_kind: ``"hard"`` (labels, cross-entropy) or ``"soft"`` (teacher probabilities, KL).
      max_batches: optional cap on the minibatches per pass (a CPU-scaling knob; None = the whole
        pool, the paper's protocol). With a cap, the minibatches are a uniformly random subset of
        the pool.
      pool_loss: one of :data:`POOL_LOSSES` (hard labels only; ``"ce"`` is the paper's loss).
      num_classes: K (needed by the class-balanced losses).
      min_batches: at least this many minibatches per pass: a pool smaller than
        ``min_batches * batch_size`` is cycled through (one permutation, repeated) until they are
        done (0: one pass, the paper). Raises the early student's (IDEAL's proxy's) training.
    """
    if pool_loss not in POOL_LOSSES:
        raise ValueError(f"pool_loss must be one of {POOL_LOSSES}, got {pool_loss!r}")
    if pool_loss != "ce":
        if targets_kind != "hard" or not num_classes:
            raise ValueError(f"pool_loss={pool_loss!r} needs hard labels and num_classes")
        kind, k = pool_loss, int(num_classes)

        def loss_factory(pool_y, n):
            prior = pool_class_prior(pool_y, n, k)
            return lambda logits, y: balanced_loss(kind, logits, y, prior)
    else:
        loss_fn = _loss_for(targets_kind)

        def loss_factory(pool_y, n):
            return loss_fn
    return memoize_builder("pool_pass", (fm.apply, tx), (batch_size, augment, pad, targets_kind,
                                                         max_batches, pool_loss, num_classes,
                                                         min_batches),
                           lambda: _build_pool_pass(fm, tx, batch_size, augment, pad,
                                                    loss_factory, max_batches, min_batches))


def _build_pool_pass(fm, tx, batch_size, augment, pad, loss_factory, max_batches, min_batches=0):
    @jax.jit
    def pool_pass(state: StudentState, pool_x, pool_y, n, key):
        cap = pool_x.shape[0]
        kp, ka = jax.random.split(key)
        # A uniformly random permutation of the valid indices [0, n) first, padding after.
        scores = jnp.where(jnp.arange(cap) < n, jax.random.uniform(kp, (cap,)), 2.0)
        perm = jnp.argsort(scores)
        nb = n // batch_size
        if max_batches is not None:
            nb = jnp.minimum(nb, max_batches)
        if min_batches:
            nb = jnp.where(n > 0, jnp.maximum(nb, min_batches), nb)
        loss_fn = loss_factory(pool_y, n)

        def body(i, carry):
            st, total = carry
            if min_batches:     # wraps around the n valid entries when cycling a small pool
                idx = perm[(i * batch_size + jnp.arange(batch_size)) % jnp.maximum(n, 1)]
            else:
                idx = jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))
            xb = augment_images(dequantize(pool_x[idx]), jax.random.fold_in(ka, i), augment, pad)
            st, loss = _train_step(fm, tx, loss_fn, st, xb, pool_y[idx])
            return st, total + loss

        state, total = jax.lax.fori_loop(0, nb, body, (state, jnp.zeros((), jnp.float32)))
        return state, total / jnp.maximum(nb, 1), nb

    return pool_pass
