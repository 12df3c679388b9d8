"""Shared machinery of the single-teacher distillation methods (IDEAL, DFME, NaiveKD).

* Student optimisers with PyTorch semantics (:func:`torch_sgd`: weight decay added to the gradient
  before momentum, as ``torch.optim.SGD(weight_decay=...)`` does) and step-wise schedules.
* Per-sample image augmentation (:func:`random_crop_flip`, re-exported from
  :mod:`dfml_jax.augment`, which the teacher trainer shares): kornia's ``RandomCrop(padding)`` and
  ``RandomHorizontalFlip`` draw a fresh offset / flip for every image; here one ``dynamic_slice``
  per image under ``vmap``. Differentiable w.r.t. the images.
* :class:`StudentState` (parameters, BatchNorm running statistics, optimiser state) and the jitted
  training steps: a supervised epoch over a fixed dataset (teachers, the real-data reference) and
  one pass over a growing synthetic pool (:func:`make_pool_pass`: ONE compiled function whatever
  the pool size, a ``fori_loop`` with a dynamic trip count over a capacity-padded pool).
* :class:`Evaluator`: accuracy on the validation and test splits (BatchNorm in eval mode).
* :class:`PoolStore`: the label cache of IDEAL / NaiveKD. Every synthetic sample is written, with
  the teacher's answer, to an append-only on-disk log the moment it is bought, so the teacher is
  queried exactly once per sample, even across a kill and a resume.
* :class:`RunTracker`: the bookkeeping every budgeted, resumable run loop shares (IDEAL / NaiveKD
  rounds, DFME iterations): orbax checkpoints with the curve and the query ledger, restore after a
  kill, the curve of evaluated ``(queries, val_acc, test_acc)`` points with evaluation at budget
  crossings, the tqdm bar and ``result.json``.
* :func:`make_generator`: the DCGAN generator both IDEAL and DFME use.
* Validation-based model selection within a budget (:func:`select_within_budget`).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfml_jax.augment import AUGMENTATIONS, augment_images, random_crop_flip
from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.losses import cross_entropy, kd_kl
from dfml_jax.models import create_model, functional, get_default_conv_impl

__all__ = [
    "StudentState",
    "torch_sgd",
    "multistep_schedule",
    "random_crop_flip",
    "augment_images",
    "AUGMENTATIONS",
    "init_student",
    "make_supervised_epoch",
    "train_supervised",
    "make_pool_pass",
    "POOL_LOSSES",
    "pool_class_prior",
    "balanced_loss",
    "Evaluator",
    "PoolStore",
    "quantize_uint8",
    "dequantize",
    "select_within_budget",
    "split_validation",
    "atomic_write_json",
    "memoize_builder",
    "uncommitted",
    "RunTracker",
    "make_generator",
    "config_dict",
]


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


# ----------------------------------------------------------------------------- optimisers
def torch_sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 0.0
              ) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)``: decay added to the gradient, then momentum.

    Args:
      learning_rate: a float or an optax schedule (a function of the step count).
      momentum: heavy-ball momentum (PyTorch convention, no dampening, not Nesterov).
      weight_decay: L2 coefficient added to the gradient of every parameter (biases and BN too,
        like PyTorch's default parameter group).

    Calls with the same hashable arguments return the same object (so jitted steps closing over
    it are shared between runs).
    """
    try:
        return _torch_sgd_cached(learning_rate, momentum, weight_decay)
    except TypeError:  # unhashable learning rate (an array)
        return _torch_sgd(learning_rate, momentum, weight_decay)


@functools.lru_cache(maxsize=64)
def _torch_sgd_cached(learning_rate, momentum, weight_decay):
    return _torch_sgd(learning_rate, momentum, weight_decay)


def _torch_sgd(learning_rate, momentum, weight_decay):
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum or None))
    return optax.chain(*parts)


def multistep_schedule(base: float, boundaries: Sequence[int], scale: float) -> Callable:
    """``base * scale ** #{b in boundaries: step >= b}`` (PyTorch ``MultiStepLR`` on steps).

    >>> s = multistep_schedule(0.1, [2, 4], 0.5)
    >>> [round(float(s(i)), 4) for i in range(5)]
    [0.1, 0.1, 0.05, 0.05, 0.025]
    """
    if not boundaries:
        return lambda count: jnp.asarray(base, jnp.float32)
    bounds = jnp.asarray(sorted(int(b) for b in boundaries), jnp.int32)

    def schedule(count):
        passed = jnp.sum((count >= bounds).astype(jnp.int32))
        return jnp.asarray(base, jnp.float32) * jnp.asarray(scale, jnp.float32) ** passed

    return schedule


# ----------------------------------------------------------------------------- quantisation
def quantize_uint8(x: jax.Array) -> jax.Array:
    """Images in [0, 1] to uint8 levels (the official IDEAL code's PNG round-trip)."""
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def dequantize(x: jax.Array) -> jax.Array:
    """uint8 levels back to float32 in [0, 1]; float inputs pass through as float32."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


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
                     augment: str = "none", pad: int = 4, evaluator: Optional["Evaluator"] = None,
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


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Accuracy of a classifier (BatchNorm in eval mode) on named splits.

    Args:
      fm: the classifier's :class:`~dfml_jax.models.FunctionalModel`.
      splits: ``{"val": (x, y), "test": (x, y)}``; result keys are ``"<name>_acc"``.
      chunk: evaluation batch size (the last chunk is padded, so one compiled shape).
    """

    def __init__(self, fm, splits: Dict[str, tuple], chunk: int = 1000):
        self.splits = {k: (np.asarray(x, np.float32), np.asarray(y)) for k, (x, y) in splits.items()
                       if x is not None and len(x)}
        self.chunk = chunk

        @jax.jit
        def correct(params, bn, x, y, valid):
            logits, _ = fm.apply(params, bn, x, train=False)
            return jnp.sum((jnp.argmax(logits, -1) == y) & valid)

        self._correct = correct
        self._chunks = {}
        for name, (x, y) in self.splits.items():
            c = min(self.chunk, len(x))
            pieces = []
            for s in range(0, len(x), c):
                xb, yb = x[s:s + c], y[s:s + c]
                valid = np.ones(len(xb), bool)
                if len(xb) < c:
                    padn = c - len(xb)
                    xb = np.concatenate([xb, np.zeros((padn,) + xb.shape[1:], xb.dtype)])
                    yb = np.concatenate([yb, np.zeros((padn,), yb.dtype)])
                    valid = np.concatenate([valid, np.zeros(padn, bool)])
                pieces.append((jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(valid)))
            self._chunks[name] = (pieces, len(x))

    def accuracy(self, params, bn, split: str) -> float:
        pieces, n = self._chunks[split]
        total = sum(int(self._correct(params, bn, x, y, v)) for x, y, v in pieces)
        return total / n

    def __call__(self, params, bn) -> Dict[str, float]:
        return {f"{name}_acc": self.accuracy(params, bn, name) for name in self._chunks}


# ----------------------------------------------------------------------------- label cache
def atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- selection
def select_within_budget(curve: Sequence[Dict[str, Any]], budget: int) -> Optional[Dict[str, Any]]:
    """Validation-based model selection among the evaluated points with ``queries <= budget``.

    Returns a dict with the selected point (``selected``: highest ``val_acc``; ties go to the later
    point), the last point within the budget (``final``) and, labelled as the papers' protocol, the
    best test accuracy over those points (``best_on_test``). None when no point is within budget.
    """
    pts = [p for p in curve if p["queries"] <= budget and "val_acc" in p]
    if not pts:
        return None
    best = pts[0]
    for p in pts:
        if p["val_acc"] >= best["val_acc"]:
            best = p
    return {"selected": best, "final": pts[-1], "best_on_test": max(p["test_acc"] for p in pts)}


def split_validation(x: np.ndarray, y: np.ndarray, val_size: int, seed: int = 0):
    """Stratified split of labelled training data into ``(x_tr, y_tr, x_val, y_val)``.

    Each class contributes ``round(val_size * share)`` samples (the total is then adjusted to
    exactly ``val_size``); the split depends only on ``seed``.
    """
    if val_size <= 0:
        return x, y, x[:0], y[:0]
    if val_size >= len(x):
        raise ValueError(f"val_size={val_size} must be smaller than the training set ({len(x)})")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    idx_by_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    quota = {c: int(round(val_size * len(idx_by_class[c]) / len(y))) for c in classes}
    diff = val_size - sum(quota.values())
    for c in list(classes)[: abs(diff)]:
        quota[c] += 1 if diff > 0 else -1
    val_idx = np.concatenate([idx_by_class[c][: quota[c]] for c in classes])
    mask = np.zeros(len(x), bool)
    mask[val_idx] = True
    val_idx = np.flatnonzero(mask)
    tr_idx = np.flatnonzero(~mask)
    return x[tr_idx], y[tr_idx], x[val_idx], y[val_idx]


def config_dict(cfg) -> Dict[str, Any]:
    """A JSON-friendly dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ----------------------------------------------------------------------------- generator
def make_generator(cfg, image_shape: Sequence[int], *, key: Any = 0, head: Optional[str] = None,
                   conv_impl: Optional[str] = None):
    """The DCGAN generator for ``image_shape`` (square, side a multiple of 4) and its functional view.

    Its initialisation is redone from a key whenever it is used (``functional.init``), so the
    module is shared between calls with the same settings (and an int ``key``).

    Args:
      cfg: any config with ``nz`` and ``ngf`` (and optionally IDEAL's ``gen_head``).
      image_shape: ``(H, W, C)`` of the API's inputs.
      key: initialisation key or int seed of the module.
      head: the generator's output head (``"sigmoid"`` or ``"tanh_bn"``); None: from
        ``cfg.gen_head`` (IDEAL's ``"bn_sigmoid"`` builds the ``tanh_bn`` module, whose
        pre-activation output IDEAL passes through a sigmoid).
      conv_impl: convolution back-end (default: the library default).

    Returns:
      ``(module, functional_model)``.
    """
    conv_impl = conv_impl or get_default_conv_impl()
    h, w, c = image_shape
    if h != w or h % 4:
        raise ValueError(f"the DCGAN generator makes square images with a side that is a multiple of "
                         f"4; the API expects {tuple(image_shape)}")
    head = head or ("tanh_bn" if getattr(cfg, "gen_head", "sigmoid") == "bn_sigmoid" else "sigmoid")

    def build():
        gen = create_model("dcgan", nz=cfg.nz, ngf=cfg.ngf, img_size=h, nc=c, head=head,
                           conv_impl=conv_impl, rngs_or_key=key)
        return gen, functional(gen)

    if isinstance(key, int):
        return memoize_builder("generator", (), (cfg.nz, cfg.ngf, h, c, head, key, conv_impl),
                               build)
    return build()


# ----------------------------------------------------------------------------- run bookkeeping
class RunTracker:
    """Bookkeeping of a budgeted, resumable distillation loop (the algorithm stays in the loop).

    IDEAL / NaiveKD (steps are rounds) and DFME (steps are iterations) share it: checkpoints under
    ``workdir/checkpoints`` that carry the curve and the API's query ledger with the arrays, the
    restore after a kill, the curve of evaluated points (evaluation also when a step crosses one of
    ``eval_budgets``, so each budget gets its own model selection), the tqdm bar and
    ``result.json``.

    Args:
      api: the teacher API whose ledger is checkpointed and restored.
      workdir: run directory (None: nothing on disk, no resume).
      evaluator: an :class:`Evaluator` (None: no curve).
      eval_budgets: query counts at which the student is evaluated as well.
      step_key: name of the step counter in the curve's points (``"round"``, ``"iteration"``).

    >>> from dfml_jax.blackbox import BlackBoxAPI
    >>> api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1), (2, 2, 1), 4)
    >>> t = RunTracker(api, workdir=None, evaluator=None, eval_budgets=(100,), step_key="round")
    >>> t.crosses_budget(step_cost=40), t.start
    (False, 0)
    """

    def __init__(self, api, *, workdir: Optional[str], evaluator: Optional[Evaluator],
                 eval_budgets: Sequence[int] = (), step_key: str = "step"):
        self.api = api
        self.workdir = workdir
        self.evaluator = evaluator
        self.budgets = sorted(int(b) for b in eval_budgets)
        self.step_key = step_key
        self.ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints")) if workdir else None
        self.curve: List[Dict[str, Any]] = []
        self.start = 0                   # first step to run (after a restore: the next one)
        self.last_eval = -1              # index of the last evaluated step
        self.bar = None

    def restore(self, template: Any):
        """Restores the latest checkpoint, if any.

        Args:
          template: pytree with the structure of the saved arrays.

        Returns:
          ``(arrays, meta)`` with fresh uncommitted arrays, or None (nothing saved). The curve,
          the API's ledger and :attr:`start` are restored as a side effect.
        """
        if self.ckpt is None:
            return None
        restored = self.ckpt.restore_latest(template)
        if restored is None:
            return None
        step, arrays, meta = restored
        self.curve = meta["curve"]
        self.api.ledger.load_state_dict(meta["ledger"])
        self.start = step + 1
        self.last_eval = self.curve[-1][self.step_key] - 1 if self.curve else -1
        return uncommitted(arrays), meta

    def open_progress(self, enabled: bool, total: Optional[int], desc: str, unit: str) -> None:
        """Opens a tqdm bar at :attr:`start` when ``enabled``."""
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=self.start, desc=desc, unit=unit, leave=True)

    def crosses_budget(self, step_cost: int) -> bool:
        """Whether the next step (``step_cost`` queries) cannot be bought within an eval budget.

        True when the queries spent so far are within one of ``eval_budgets`` and one more step
        would pass it: the current student is the last one of that budget.
        """
        q = self.api.queries
        return any(q <= b < q + step_cost for b in self.budgets)

    def evaluate(self, step: int, params, bn, **fields) -> Dict[str, Any]:
        """Appends the point of step index ``step`` (``step + 1`` steps done) to the curve."""
        point = {self.step_key: step + 1, "queries": self.api.queries, **fields}
        point.update(self.evaluator(params, bn))
        self.curve.append(point)
        self.last_eval = step
        return point

    def save(self, step: int, arrays: Any, **meta) -> None:
        """Checkpoints step index ``step``: the arrays, the curve, the ledger and ``meta``."""
        if self.ckpt is not None:
            self.ckpt.save(step, arrays, {"curve": self.curve,
                                          "ledger": self.api.ledger.state_dict(), **meta})

    def tick(self, point: Optional[Dict[str, Any]], **post) -> None:
        """Advances the bar by one step, showing ``post`` and the point's accuracies."""
        if self.bar is None:
            return
        if point is not None:
            post["val"] = f"{point.get('val_acc', float('nan')):.3f}"
            post["test"] = f"{point.get('test_acc', float('nan')):.3f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        """Closes the bar and the checkpointer."""
        if self.bar is not None:
            self.bar.close()
        if self.ckpt is not None:
            self.ckpt.close()

    def evaluate_end(self, steps_done: int, stopped: str, params, bn, **fields) -> None:
        """Evaluates the last completed step unless it was evaluated or the run was interrupted
        (a budget stop is found out only when the next step cannot be bought)."""
        if (self.evaluator is not None and steps_done > 0 and self.last_eval != steps_done - 1
                and stopped != "interrupted"):
            self.evaluate(steps_done - 1, params, bn, **fields)

    def write_result(self, summary: Dict[str, Any], finished: bool, cfg, seed: int,
                     name: str) -> None:
        """Writes ``workdir/result.json`` for a finished run (an interrupted one writes nothing)."""
        if self.workdir and finished:
            atomic_write_json(os.path.join(self.workdir, "result.json"),
                              {**summary, "config": config_dict(cfg), "seed": seed,
                               "method": name})
