"""IDEAL's data generation: a generator trained against the proxy student, no teacher query.

:func:`make_generation_phase` compiles one round's generation (``g_steps`` Adam steps of a
freshly initialised generator on ``CE(S(aug(G(z))), y) + info_weight * L_info``) into ONE jitted
``lax.scan``; :func:`noise_images` is NaiveKD's image source; :func:`info_loss` is IDEAL's
information term. None of them can reach the teacher.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from dfml_jax.distill.balance import (balanced_selection, low_contrast, near_duplicates,
                                      pool_balancing_targets)
from dfml_jax.distill.common import GENERATORS, memoize_builder
from dfml_jax.losses import cross_entropy
from dfml_jax.models import create_model, functional
from dfml_jax.models.strokes import PARAMS_PER_STROKE
from dfml_jax.training.augment import augment_images

__all__ = ["INFO_LOSSES", "GEN_HEADS", "GENERATORS", "TARGETS", "NOISES", "SELECTS",
           "SELECT_SCORES", "info_loss", "noise_images", "pair_targets", "uncertain_noise_images",
           "make_generation_phase"]

INFO_LOSSES = ("per_sample", "class_balance", "none")
# The IDEALConfig fields the generation phase depends on (its compiled form is shared otherwise).
_GENERATION_FIELDS = ("batch_size", "g_steps", "lr_g", "betas_g", "generator", "num_strokes",
                      "nz", "ngf", "gen_head", "gen_bias", "select", "select_score",
                      "select_min_dist", "select_min_contrast", "info_loss", "info_weight",
                      "targets", "gen_augment", "aug_pad", "pair_share", "pair_weight")
GEN_HEADS = ("sigmoid", "bn_sigmoid")
TARGETS = ("balanced", "random", "pool_balancing")
NOISES = ("uniform", "gauss", "strokes")
SELECTS = ("best", "balanced")
SELECT_SCORES = ("confidence", "entropy")


def info_loss(probs: jax.Array, kind: str) -> jax.Array:
    """IDEAL's information term on student probabilities ``(B, K)`` (to be *minimised*).

    ``"per_sample"``: ``mean_{i,k} p_ik log p_ik`` (released code). ``"class_balance"``:
    ``sum_k pbar_k log pbar_k`` with ``pbar`` the batch-mean prediction (DAFL). ``"none"``: 0.
    """
    if kind == "per_sample":
        return jnp.mean(jax.scipy.special.xlogy(probs, probs))
    if kind == "class_balance":
        pbar = jnp.mean(probs, axis=0)
        return jnp.sum(jax.scipy.special.xlogy(pbar, pbar))
    if kind == "none":
        return jnp.zeros((), probs.dtype)
    raise ValueError(f"info_loss must be one of {INFO_LOSSES}, got {kind!r}")


def _gen_images(gen_fm, cfg, params, z):
    if cfg.generator == "strokes":
        return gen_fm.apply_batchstats(params, z)
    if cfg.gen_head == "bn_sigmoid" or cfg.gen_bias:
        return jax.nn.sigmoid(gen_fm.apply_batchstats(params, z, pre_activation=True)
                              + cfg.gen_bias)
    return gen_fm.apply_batchstats(params, z)


def noise_images(cfg, key: jax.Array, n: int,
                 image_shape: Sequence[int]) -> jax.Array:
    """NaiveKD's ``n`` noise images in [0, 1] (``cfg.noise``).

    >>> from dfml_jax.distill.ideal import IDEALConfig
    >>> cfg = IDEALConfig(synth="noise", noise="gauss")
    >>> x = noise_images(cfg, jax.random.key(0), 4000, (4, 4, 1))
    >>> 0.15 < float(x.mean()) < 0.25 and float(x.min()) == 0.0
    True
    """
    shape = (n,) + tuple(image_shape)
    if cfg.noise == "strokes":
        return _random_drawings(n, tuple(image_shape), cfg.num_strokes)(key)
    if cfg.noise == "gauss":
        return jnp.clip(cfg.noise_mean + cfg.noise_std * jax.random.normal(key, shape), 0.0, 1.0)
    return jax.random.uniform(key, shape, jnp.float32)


def _random_drawings(n: int, image_shape: tuple, num_strokes: int) -> Callable:
    """Jitted ``key -> n`` drawings of ``num_strokes`` random pen strokes (stroke parameters
    ``u ~ N(0, I)``, decoded as in :mod:`dfml_jax.models.strokes`), built once per setting."""
    h, w, c = image_shape
    if h != w:
        raise ValueError(f"noise='strokes' draws square images; the API expects {image_shape}")

    def build():
        nz = PARAMS_PER_STROKE * num_strokes
        gen = functional(create_model("strokes", nz=nz, img_size=h, nc=c,
                                      num_strokes=num_strokes, latent="direct", rngs_or_key=0))

        @jax.jit
        def draw(key):
            kinit, kz = jax.random.split(key)
            params, _ = gen.init(kinit)       # latent="direct": u = z + b with b = 0
            return gen.apply_batchstats(params, jax.random.normal(kz, (n, nz), jnp.float32))

        return draw

    return memoize_builder("random_drawings", (), (n, image_shape, num_strokes), build)


def uncertain_noise_images(cfg, key: jax.Array, n: int, image_shape: Sequence[int],
                           probs_fn: Callable, candidates: int = 1) -> jax.Array:
    """``n`` noise images (``cfg.noise``), the ones the student is least sure of.

    Draws ``candidates * n`` noise images (no query) and keeps the ``n`` on which the student's
    predictive entropy is highest: a label bought there teaches the student most (uncertainty
    sampling, Lewis & Gale 1994). ``candidates=1`` keeps every draw.

    Args:
      cfg: an :class:`~dfml_jax.distill.ideal.IDEALConfig` (``noise``, ``noise_mean``,
        ``noise_std``).
      key: PRNG key. n: images wanted. image_shape: ``(H, W, C)``.
      probs_fn: ``x -> (N, K)`` the student's probabilities (eval mode).
      candidates: candidates drawn per image kept (>= 1).

    Returns:
      ``(n, H, W, C)`` images in [0, 1].

    >>> from dfml_jax.distill.ideal import IDEALConfig
    >>> cfg = IDEALConfig(noise="gauss")
    >>> sure = lambda x: jax.nn.one_hot((x.mean((1, 2, 3)) > 0.2).astype(int), 2) * 0.98 + 0.01
    >>> x = uncertain_noise_images(cfg, jax.random.key(0), 8, (4, 4, 1), sure, candidates=4)
    >>> x.shape
    (8, 4, 4, 1)
    """
    x = noise_images(cfg, key, candidates * n, image_shape)
    if candidates == 1:
        return x
    p = probs_fn(x)
    entropy = -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)
    return x[jax.lax.top_k(entropy, n)[1]]


def pair_targets(key: jax.Array, y: jax.Array, num_classes: int, share: float,
                 weight: Sequence[float]):
    """Soft generation targets that put a random ``share`` of the images between two classes.

    Image ``i`` of the chosen ones aims at ``w_i`` on its class ``y_i`` and ``1 - w_i`` on a
    random other class, ``w_i ~ U(weight)``: the generator makes images the proxy finds
    ambiguous between two classes (its decision boundary), where the teacher's answer teaches
    the student most. The rest keep their one-hot target. ``share == 0``: None (hard targets).

    >>> t = pair_targets(jax.random.key(0), jnp.arange(4) % 2, 2, 1.0, (0.6, 0.6))
    >>> [round(float(v), 2) for v in t[0]]
    [0.6, 0.4]
    """
    if not share:
        return None
    b = y.shape[0]
    kp, ko, kw = jax.random.split(key, 3)
    chosen = jnp.zeros((b,), bool).at[
        jax.random.permutation(kp, b)[: int(round(share * b))]].set(True)
    other = (y + jax.random.randint(ko, (b,), 1, num_classes)) % num_classes
    w = jax.random.uniform(kw, (b,), jnp.float32, weight[0], weight[1])
    w = jnp.where(chosen, w, 1.0)[:, None]
    return (w * jax.nn.one_hot(y, num_classes) + (1.0 - w) * jax.nn.one_hot(other, num_classes))


def make_generation_phase(student_fm, gen_fm, cfg, num_classes: int,
                          image_shape: Sequence[int]) -> Callable:
    """Jitted ``phase(student_params, student_bn, key) -> (best_x, best_loss, losses)``.

    One IDEAL data-generation stage as a single ``lax.scan`` over ``g_steps``: generator
    re-initialised from ``key``, fresh Adam, fixed latents and targets, the student frozen in eval
    mode; the carry holds ``(generator params, Adam state, best images, best loss)``. Makes no
    teacher query (it has no access to the API at all).
    """
    image_shape = tuple(image_shape)
    relevant = tuple(getattr(cfg, f) for f in _GENERATION_FIELDS)
    return memoize_builder("ideal_generation", (student_fm.apply, gen_fm.apply),
                           (relevant, num_classes, image_shape),
                           lambda: _build_generation_phase(student_fm, gen_fm, cfg, num_classes,
                                                           image_shape))


def _build_generation_phase(student_fm, gen_fm, cfg, num_classes, image_shape):
    b, k = cfg.batch_size, num_classes
    tx = optax.adam(cfg.lr_g, b1=cfg.betas_g[0], b2=cfg.betas_g[1])

    @jax.jit
    def phase(student_params, student_bn, key, pool_counts=None):
        kinit, kz, ky, ksteps = jax.random.split(key, 4)
        gparams, _ = gen_fm.init(kinit)
        opt_state = tx.init(gparams)
        z = jax.random.normal(kz, (b, cfg.nz), jnp.float32)
        if cfg.targets == "balanced":
            y = jnp.arange(b, dtype=jnp.int32) % k
        elif cfg.targets == "pool_balancing":
            if pool_counts is None:
                raise ValueError("targets='pool_balancing' needs the pool's label counts "
                                 "(phase(..., pool_counts=...))")
            y = pool_balancing_targets(pool_counts, b)
        else:
            y = jax.random.randint(ky, (b,), 0, k, jnp.int32)
        soft = pair_targets(jax.random.fold_in(ky, 1), y, k, cfg.pair_share, cfg.pair_weight)

        def loss_fn(gp, key):
            x = _gen_images(gen_fm, cfg, gp, z)
            xa = augment_images(x, key, cfg.gen_augment, cfg.aug_pad)
            logits, _ = student_fm.apply(student_params, student_bn, xa, train=False)
            fit = (cross_entropy(logits, y) if soft is None else
                   jnp.mean(optax.softmax_cross_entropy(logits, soft)))
            loss = fit + cfg.info_weight * info_loss(
                jax.nn.softmax(logits, axis=-1), cfg.info_loss)
            return loss, x

        def step(carry, key):
            gp, os_, best_x, best_l = carry
            (loss, x), grads = jax.value_and_grad(loss_fn, has_aux=True)(gp, key)
            better = loss < best_l
            best_x = jnp.where(better, x, best_x)
            best_l = jnp.where(better, loss, best_l)
            updates, os_ = tx.update(grads, os_, gp)
            out = (loss, x) if cfg.select == "balanced" else (loss, None)
            return (optax.apply_updates(gp, updates), os_, best_x, best_l), out

        carry = (gparams, opt_state, jnp.zeros((b,) + image_shape, jnp.float32),
                 jnp.asarray(jnp.inf, jnp.float32))
        (_, _, best_x, best_l), (losses, xs) = jax.lax.scan(
            step, carry, jax.random.split(ksteps, cfg.g_steps))
        if cfg.select == "balanced":
            if pool_counts is None:
                raise ValueError("select='balanced' needs the pool's label counts "
                                 "(phase(..., pool_counts=...))")
            cand = xs.reshape((-1,) + image_shape)
            logits, _ = student_fm.apply(student_params, student_bn, cand, train=False)
            p = jax.nn.softmax(logits, axis=-1)
            if cfg.select_score == "entropy":
                score = -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1) / jnp.log(k)
            else:
                score = jnp.max(p, axis=-1)
            if cfg.select_min_dist:
                score = jnp.where(near_duplicates(cand, score, cfg.select_min_dist), -1.0, score)
            if cfg.select_min_contrast:
                score = jnp.where(low_contrast(cand, cfg.select_min_contrast), -1.0, score)
            quotas = jnp.bincount(pool_balancing_targets(pool_counts, b), length=k)
            best_x = cand[balanced_selection(jnp.argmax(p, -1), score, quotas, b)]
        return best_x, best_l, losses

    return phase
