"""Class balance of what a hard-label distillation run pays for.

A generator driven by a proxy student aims at the *proxy's* classes, which early on are not the
teacher's: left alone, the pool of teacher answers collapses onto a few classes
(``docs/ideal_diagnosis.md``). Three levers, each free of extra queries:

* :func:`pool_balancing_targets`: the generator's targets lean towards the classes the pool lacks;
* :func:`balanced_selection`: buy, among candidate images, a class-balanced set by the proxy's
  predictions;
* :func:`class_floor_images` (with :func:`class_floor_deficit`): part of a round is spent on
  mixtures of pool images the TEACHER answered with a rare class, which acts on the teacher's
  classes directly.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.distill.common import PoolStore, dequantize
from dfml_jax.training.augment import augment_images

__all__ = ["pool_balancing_targets", "balanced_selection", "near_duplicates", "low_contrast",
           "class_floor_deficit", "class_floor_images", "with_floor_images"]


def pool_balancing_targets(counts: jax.Array, batch_size: int) -> jax.Array:
    """The generator's targets for one round, aimed at the classes the pool lacks.

    Class k gets a share of the ``batch_size`` targets proportional to ``1 / (count_k + B/K)``
    (``count_k``: the teacher's answers of class k in the pool; the ``B/K`` prior keeps an empty
    pool balanced), rounded so that the shares add up to exactly ``batch_size`` (static shape).

    Args:
      counts: (K,) label counts of the pool.
      batch_size: B.

    Returns:
      (B,) int32 targets, sorted by class.

    >>> pool_balancing_targets(jnp.zeros(4), 8).tolist()       # empty pool: balanced
    [0, 0, 1, 1, 2, 2, 3, 3]
    >>> pool_balancing_targets(jnp.array([30., 2., 2., 6.]), 8).tolist()
    [1, 1, 1, 2, 2, 2, 3, 3]
    """
    k = counts.shape[0]
    w = 1.0 / (counts.astype(jnp.float32) + batch_size / k)
    edges = jnp.round(jnp.cumsum(w / jnp.sum(w)) * batch_size)       # (K,), last = B
    return jnp.searchsorted(edges, jnp.arange(batch_size) + 0.5).astype(jnp.int32)


def balanced_selection(pred: jax.Array, score: jax.Array, quotas: jax.Array,
                       batch_size: int) -> jax.Array:
    """Indices of ``batch_size`` candidates that fill per-class quotas (static shapes).

    Candidate i is predicted class ``pred[i]`` with ``score[i]`` in [0, 1]. Within each class the
    ``quotas[k]`` highest-scoring candidates are chosen; if a class has too few candidates, the
    remaining places go to the highest-scoring candidates not yet chosen, whatever their class.
    A negative score marks a candidate taken only when all others are (e.g.
    :func:`near_duplicates`).

    Args:
      pred: (N,) int predicted classes. score: (N,) scores in [0, 1].
      quotas: (K,) int, summing to ``batch_size``. batch_size: number to select (<= N).

    Returns:
      (batch_size,) int32 distinct indices into the candidates.

    >>> pred = jnp.array([0, 0, 0, 1, 2, 2]); score = jnp.array([.9, .5, .7, .2, .8, .1])
    >>> sorted(balanced_selection(pred, score, jnp.array([1, 1, 1]), 3).tolist())
    [0, 3, 4]
    >>> sorted(balanced_selection(pred, score, jnp.array([0, 2, 1]), 3).tolist())   # 1 lacks one
    [0, 3, 4]
    >>> sorted(balanced_selection(pred, score.at[3].set(-1.), jnp.array([1, 1, 1]), 3).tolist())
    [0, 2, 4]
    """
    n = pred.shape[0]
    if batch_size > n:
        raise ValueError(f"cannot select {batch_size} of {n} candidates")
    k = quotas.shape[0]
    order = jnp.lexsort((-score, pred))                 # by class, then by score (descending)
    counts = jnp.bincount(pred, length=k)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(n) - starts[pred[order]]
    rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    chosen = (rank < quotas[pred]) & (score >= 0)
    priority = jnp.where(score < 0, score, 2.0 * chosen + jnp.clip(score, 0.0, 1.0))
    return jax.lax.top_k(priority, batch_size)[1].astype(jnp.int32)


def near_duplicates(x: jax.Array, score: jax.Array, min_dist: float) -> jax.Array:
    """Which candidates are near-copies of a better-scoring candidate (static shapes).

    Candidate i is a duplicate when some candidate j with a higher score (ties: the lower index
    wins) lies within root-mean-square pixel distance ``min_dist`` of it, so each cluster of
    near-identical images keeps only its best-scoring member. Buying the rest would pay the
    teacher again for the same answer (an uncertainty score ranks a whole cluster alike, e.g.
    the blank images a generator can collapse to).

    Args:
      x: (N, ...) candidate images. score: (N,) scores (higher is better).
      min_dist: RMS distance below which two images count as the same (0: none are).

    Returns:
      (N,) bool, True for the candidates to demote.

    >>> x = jnp.array([[0., 0.], [0., 0.01], [1., 1.]]); s = jnp.array([.5, .9, .1])
    >>> near_duplicates(x, s, 0.05).tolist()
    [True, False, False]
    """
    n = x.shape[0]
    flat = x.reshape(n, -1).astype(jnp.float32)
    sq = jnp.sum(flat * flat, axis=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T) / flat.shape[1]
    idx = jnp.arange(n)
    better = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None])
                                                   & (idx[None, :] < idx[:, None]))
    return jnp.any(better & (d2 < min_dist ** 2), axis=1)


def low_contrast(x: jax.Array, min_range: float) -> jax.Array:
    """Which images have a pixel range (max - min) below ``min_range`` (e.g. blank images).

    >>> low_contrast(jnp.array([[0., 0.001], [0., 0.8]]), 0.1).tolist()
    [True, False]
    """
    flat = x.reshape(x.shape[0], -1)
    return jnp.max(flat, axis=1) - jnp.min(flat, axis=1) < min_range


def class_floor_deficit(counts, pool_size: int, batch_size: int, floor: float, max_images: int):
    """How many of the next round's images go to each class below the floor (host side).

    Class k lacks ``floor * (pool_size + batch_size) - counts[k]`` answers (never negative; 0 for
    a class the pool has fewer than two images of, since a mixture needs two). The round spends
    ``min(max_images, total deficit)`` images, rounded up to a multiple of 5 (few compiled
    shapes).

    Returns:
      ``(m, deficit)``: the number of floor images and the (K,) deficits (weights of the classes).

    >>> m, d = class_floor_deficit([50, 2, 48, 0], 100, 20, 0.1, 10)
    >>> m, d.tolist()
    (10, [0.0, 10.0, 0.0, 0.0])
    >>> class_floor_deficit([30, 30, 30, 30], 120, 20, 0.1, 10)[0]
    0
    """
    counts = np.asarray(counts, np.float64)
    deficit = np.maximum(floor * (pool_size + batch_size) - counts, 0.0) * (counts > 1)
    total = float(deficit.sum())
    if total < 1.0:
        return 0, deficit
    m = min(max_images, int(np.ceil(total / 5.0)) * 5)
    return m, deficit


def class_floor_images(key: jax.Array, pool_x: jax.Array, pool_y: jax.Array, n,
                       deficit: jax.Array, m: int, pad: int = 0,
                       mix: Tuple[float, float] = (0.75, 0.95)) -> jax.Array:
    """``m`` new images for the classes below the floor, made from the teacher's own answers.

    Each image: a class ``c`` drawn in proportion to ``deficit``, two random pool images ``a, b``
    (of the first ``n``) the teacher answered ``c``, mixed as ``lam * a + (1 - lam) * b`` with
    ``lam ~ U[mix]``, then shifted by up to ``pad`` pixels. No query is made here; the caller pays
    for them. Near one known image, the teacher mostly answers ``c`` again: on the mnist5k
    teacher, 70-77% for ``mix=(0.8, 1)`` against 34% for even mixtures and 20% with a 2-pixel
    shift (``docs/ideal_diagnosis.md``).

    Args:
      key: PRNG key. pool_x: (cap, H, W, C) stored pool images (uint8 levels or float).
      pool_y: (cap,) teacher labels. n: valid entries. deficit: (K,) class weights (> 0 somewhere;
        a class with weight > 0 must have two pool images). m: images to make. pad: largest shift.

    Returns:
      (m, H, W, C) float32 images in [0, 1].

    >>> px = jnp.stack([jnp.zeros((4, 4, 1)), jnp.ones((4, 4, 1)), jnp.full((4, 4, 1), 0.5)])
    >>> x = class_floor_images(jax.random.key(0), px, jnp.array([0, 1, 1]), 3,
    ...                        jnp.array([0.0, 1.0]), 3)
    >>> x.shape, bool(x.min() > 0.5) and bool(x.max() < 1.0)   # mixtures of the two 1s only
    ((3, 4, 4, 1), True)
    """
    return _class_floor_images(key, pool_x, pool_y, jnp.asarray(n, jnp.int32),
                               jnp.asarray(deficit, jnp.float32), m, pad,
                               tuple(float(v) for v in mix))


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _class_floor_images(key, pool_x, pool_y, n, deficit, m, pad, mix):
    kc, ka, kb, kl, ks = jax.random.split(key, 5)
    cls = jax.random.categorical(kc, jnp.log(deficit), shape=(m,))
    valid = jnp.arange(pool_x.shape[0]) < n

    def pick(k, c, other):      # a random pool image of class c, other than index `other`
        ok = valid & (pool_y == c) & (jnp.arange(valid.shape[0]) != other)
        return jnp.argmax(jnp.where(ok, jax.random.uniform(k, valid.shape), -1.0))

    ia = jax.vmap(pick)(jax.random.split(ka, m), cls, jnp.full((m,), -1))
    ib = jax.vmap(pick)(jax.random.split(kb, m), cls, ia)
    lam = jax.random.uniform(kl, (m,) + (1,) * (pool_x.ndim - 1), minval=mix[0], maxval=mix[1])
    x = lam * dequantize(pool_x[ia]) + (1.0 - lam) * dequantize(pool_x[ib])
    return augment_images(x, ks, "crop" if pad else "none", pad)


def with_floor_images(x, pool: PoolStore, cfg, k: int, key):
    """The round's images ``x`` with up to ``cfg.floor_share * B`` replaced by class-floor images.

    ``cfg`` is an :class:`~dfml_jax.distill.ideal.IDEALConfig` (``class_floor``, ``floor_share``,
    ``batch_size``, ``floor_shift``, ``floor_mix``); ``pool`` holds the teacher's answers so far; the replaced images are a random
    subset. Returns ``x`` itself when no class is below the floor.
    """
    m, deficit = class_floor_deficit(pool.class_histogram(k), pool.size, cfg.batch_size,
                                     cfg.class_floor, int(cfg.floor_share * cfg.batch_size))
    if m == 0:
        return x
    kf, kp = jax.random.split(key)
    keep = jax.random.permutation(kp, x.shape[0])[: x.shape[0] - m]
    extra = class_floor_images(kf, pool.x, pool.y, pool.size, deficit, m, pad=cfg.floor_shift,
                               mix=cfg.floor_mix)
    return jnp.concatenate([x[keep], extra.astype(x.dtype)])
