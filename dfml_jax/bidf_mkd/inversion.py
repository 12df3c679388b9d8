"""Data recovery by zero-order generator inversion, and boundary query-set recovery (BiDf-MKD).

One call re-initialises a DCGAN generator and its latents Z, then runs ``iterations`` Adam steps
(b1 = 0.5) on ``(w, Z)`` inside ONE jitted ``lax.scan``:

1. ``x01 = G_w(Z)`` in [0, 1]; ``xa = A(x01)``: batch-shared pad-crop-flip and normalisation.
2. The API answers the clean batch ``xa`` (B queries) and, through a zero-order estimator, the
   perturbed points (B*q queries for forward schemes): the per-sample objective is
   ``f_n = CE(API(x_n), y_n) [+ lambda * b_n]`` with the boundary term
   ``b_n = -1[argmax API(x_n) = argmax s_n] * ||API(x_n) - s_n||_1`` against the adapted student's
   logits ``s_n`` (computed once per iteration at the clean point; the mask is recomputed at every
   perturbed point, as in the official code).
3. The image-space estimate ``g_hat`` is pulled back through ``A`` and ``G`` by the true chain rule
   (``jax.vjp`` with cotangent ``g_hat / B``) and Adam updates ``(w, Z)``.

The returned batch is the generator output (pre-augmentation) of the selected iterate:
``select="clean_ce"`` (default, the lowest clean CE, which is free because the clean outputs are
queried anyway) or ``select="surrogate"`` (the official code's lowest ``<x, g_hat>``, close to
arbitrary; kept to reproduce the paper).

``InversionConfig.direction_resolution = r`` (a departure from the paper, which perturbs every
pixel) draws the directions at ``r x r`` per channel and upsamples them
(:func:`dfml_jax.estimators.zo_gradient_lowres`, AutoZOOM): the same queries per iteration search a
``d' = r * r * C`` subspace, so the estimate's cosine with the (projected) gradient grows from
``~sqrt(q / d)`` to ``~sqrt(q / d')``.

The white-box variant (``teacher_fn`` given) differentiates the same objective through the
teacher: the upper bound of inversion quality, not a black-box method.

Query cost per call: ``iterations * B * (q + 1)`` for forward estimators (``2q`` + 1 for central).

References:
  Hu et al., "Learning to Learn from APIs: Black-Box Data-Free Meta-Learning", ICML 2023,
  arXiv:2305.18413, Sec. 3.1 and 3.2.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dfml_jax.api import APIGroup, BlackBoxAPI
from dfml_jax.estimators import num_queries, zo_gradient, zo_gradient_lowres
from dfml_jax.estimators.subspace import UPSAMPLE_METHODS
from dfml_jax.parallel import (P, check_divisible, constrain_batch, replicate, shard_offset,
                               shard_over)
from dfml_jax.training.augment import batch_shared_augment

ZO_SPACES = ("image", "latent")

__all__ = ["ZO_SPACES", "InversionConfig", "InversionResult", "make_inverter", "inversion_queries",
           "per_sample_objective", "image_prior"]


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """Hyper-parameters of one inversion call (paper values in comments)."""
    iterations: int = 200          # --generate_iterations
    per_class: int = 30            # images per class (B = ways * per_class = 150)
    lr: float = 1e-3               # Adam on (w, Z), betas (0.5, 0.999)
    estimator: str = "sphere-forward"
    num_directions: int = 100      # q
    smoothing: float = 0.005       # mu
    chunk_size: Optional[int] = None
    boundary_weight: float = 1.0   # lambda_adv
    pad: int = 4                   # augmentation: zero padding before the random crop
    flip: Optional[bool] = True    # random horizontal flips (None: True)
    select: str = "clean_ce"       # or "surrogate" (the official code)
    # Departure from the paper (None = the paper's full-resolution directions): draw the
    # zero-order directions at r x r per channel and upsample them (AutoZOOM), same queries.
    direction_resolution: Optional[int] = None
    direction_upsample: str = "nearest"  # or "bilinear"
    # Departures (0 = the paper): image priors on the generator output x in [0, 1], added to the
    # per-sample objective (they read no teacher: their gradient is exact, not estimated).
    tv_weight: float = 0.0         # total variation (mean |horizontal| + |vertical| differences)
    l1_weight: float = 0.0         # mean intensity (pulls the background to 0, as in line drawings)
    repulsion_weight: float = 0.0  # mean squared cosine similarity between the batch's images
    # Departure (None = the paper: one free latent per image): a latent per CLASS plus fixed
    # per-image noise of this scale, z_n = z_class(y_n) + class_jitter * eps_n, so the images of
    # a class are variations of one drawing (as the fonts of one glyph), not unrelated solutions.
    class_jitter: Optional[float] = None
    # Departure ("image" = the paper: directions over the pixels, pulled back through the
    # generator): "latent" estimates the gradient over each image's generator INPUT z_n, the
    # generator becoming part of the black-box objective, and updates Z only (the generator's
    # weights stay as initialised). For a stroke generator with latent="direct" (z = 32 stroke
    # parameters) the q directions then search d = 32 instead of H * W * C dimensions.
    zo_space: str = "image"


class InversionResult(NamedTuple):
    images: jax.Array       # (B, H, W, C) in [0, 1]: the selected generator output
    targets: jax.Array      # (B,) interleaved labels 0..K-1
    clean_ce: jax.Array     # (iterations,) mean clean CE of each iterate
    api_acc: jax.Array      # (iterations,) API accuracy on the targets
    zero_fraction: jax.Array  # (iterations,) fraction of zero finite differences


def inversion_queries(cfg: InversionConfig, num_classes: int, white_box: bool = False) -> int:
    """API samples one inversion call costs (what the ledger will charge)."""
    b = num_classes * cfg.per_class
    if white_box:
        return cfg.iterations * b
    return cfg.iterations * (b + num_queries(cfg.estimator, b, cfg.num_directions,
                                             include_clean=False))


def per_sample_objective(outputs: jax.Array, targets: jax.Array, output_mode: str,
                         student_logits: Optional[jax.Array] = None,
                         boundary_weight: float = 0.0) -> jax.Array:
    """``CE(API(x_n), y_n) + boundary_weight * b_n`` per sample, from API outputs.

    Args:
      outputs: (..., B, K) API outputs (logits or probabilities).
      targets: (B,) target classes.
      output_mode: ``"logits"`` or ``"probs"`` (``"topk"`` is treated as probabilities).
      student_logits: (B, K) adapted student logits at the clean points, or None (no boundary).
      boundary_weight: lambda_adv.

    Returns:
      (..., B) per-sample values.
    """
    if output_mode == "logits":
        logp = jax.nn.log_softmax(outputs, axis=-1)
        student_space = student_logits
    else:
        logp = jnp.log(jnp.clip(outputs, 1e-8, None))
        student_space = None if student_logits is None else jax.nn.softmax(student_logits, -1)
    ce = -jnp.take_along_axis(logp, jnp.broadcast_to(targets[:, None], logp.shape[:-1] + (1,)),
                              axis=-1)[..., 0]
    if student_logits is None:
        return ce
    agree = jnp.argmax(outputs, -1) == jnp.argmax(student_logits, -1)
    l1 = jnp.sum(jnp.abs(outputs - student_space), axis=-1)
    return ce - boundary_weight * agree * l1


def image_prior(x: jax.Array, cfg: InversionConfig) -> jax.Array:
    """The image-prior part of the inversion objective, a scalar (mean over the batch).

    ``tv_weight * TV(x) + l1_weight * mean(x) + repulsion_weight * R(x)`` where ``TV`` is the
    mean absolute difference of horizontally and vertically adjacent pixels, ``mean(x)`` the mean
    intensity (``x`` is in [0, 1], so it is the L1 norm per pixel) and ``R`` the mean squared
    cosine similarity between distinct mean-centred images of the batch (diversity by
    repulsion). These priors read only the generator's output, never the teacher, so their
    gradient is exact. They are the "natural image" priors of DeepInversion (Yin et al., 2020)
    without its BN-statistics term, which needs white-box access.

    Args:
      x: (B, H, W, C) generator output in [0, 1].
      cfg: the weights ``tv_weight``, ``l1_weight``, ``repulsion_weight``.

    Returns:
      A scalar.

    >>> cfg = InversionConfig(tv_weight=1.0)
    >>> float(image_prior(jnp.zeros((2, 4, 4, 1)), cfg))
    0.0
    """
    total = jnp.float32(0.0)
    if cfg.tv_weight:
        tv = (jnp.mean(jnp.abs(jnp.diff(x, axis=1)), axis=(1, 2, 3))
              + jnp.mean(jnp.abs(jnp.diff(x, axis=2)), axis=(1, 2, 3)))
        total = total + cfg.tv_weight * jnp.mean(tv)
    if cfg.l1_weight:
        total = total + cfg.l1_weight * jnp.mean(jnp.abs(x))
    if cfg.repulsion_weight and x.shape[0] > 1:
        f = x.reshape(x.shape[0], -1)
        f = f - f.mean(axis=1, keepdims=True)
        f = f / (jnp.linalg.norm(f, axis=1, keepdims=True) + 1e-6)
        cos2 = jnp.square(f @ f.T)
        n = x.shape[0]
        total = total + cfg.repulsion_weight * (jnp.sum(cos2) - jnp.trace(cos2)) / (n * (n - 1))
    return total


def _uses_prior(cfg: InversionConfig) -> bool:
    return bool(cfg.tv_weight or cfg.l1_weight or cfg.repulsion_weight)


def _validate_config(cfg: InversionConfig, image_size: int, mesh, shard: str) -> None:
    """The configuration checks of :func:`make_inverter` (clear errors, in a fixed order)."""
    if cfg.class_jitter is not None and not cfg.class_jitter >= 0:
        raise ValueError(f"InversionConfig.class_jitter must be None (a latent per image) or a "
                         f"non-negative scale, got {cfg.class_jitter!r}")
    if cfg.zo_space not in ZO_SPACES:
        raise ValueError(f"InversionConfig.zo_space must be one of {ZO_SPACES}, got {cfg.zo_space!r}")
    if cfg.zo_space == "latent" and cfg.direction_resolution is not None:
        raise ValueError("InversionConfig.zo_space='latent' draws full-latent directions: set "
                         "direction_resolution=None (low-resolution directions are for pixels)")
    if cfg.zo_space == "latent" and mesh is not None and shard == "directions":
        raise ValueError("InversionConfig.zo_space='latent' shards the samples over the mesh: use "
                         "shard='samples' (or zo_space='image' to shard the directions)")
    if cfg.select not in ("clean_ce", "surrogate"):
        raise ValueError(f"InversionConfig.select must be 'clean_ce' or 'surrogate', got {cfg.select!r}")
    if cfg.direction_resolution is not None:
        r = cfg.direction_resolution
        if not isinstance(r, int) or not 1 <= r <= image_size:
            raise ValueError(f"InversionConfig.direction_resolution must be None or an int in "
                             f"[1, image_size={image_size}], got {r!r}")
        if cfg.direction_upsample not in UPSAMPLE_METHODS:
            raise ValueError(f"InversionConfig.direction_upsample must be one of {UPSAMPLE_METHODS}, "
                             f"got {cfg.direction_upsample!r}")
        if cfg.direction_upsample == "nearest" and image_size % r:
            raise ValueError(f"InversionConfig.direction_resolution={r} must divide image_size="
                             f"{image_size} for nearest upsampling (or use direction_upsample="
                             f"'bilinear')")


def _validate(group, cfg: InversionConfig, image_size: int, mesh, axis: str, shard: str):
    """All checks of :func:`make_inverter`; returns ``(group, q_local)``: the group (a single
    API wrapped) and, when the directions are sharded, each device's share of ``q`` (else None)."""
    if isinstance(group, BlackBoxAPI):
        group = APIGroup([group])
    group.require_output(("logits", "probs", "topk"), "BiDf-MKD inversion")
    _validate_config(cfg, image_size, mesh, shard)
    k = group.num_classes
    b = k * cfg.per_class
    if shard not in ("samples", "directions"):
        raise ValueError(f"shard must be 'samples' or 'directions', got {shard!r}")
    q_local = None
    if mesh is not None and shard == "directions":
        q_local = check_divisible(
            cfg.num_directions, mesh, what="the zero-order directions q", axis=axis,
            fix="choose num_directions (q) as a multiple of the device count, or shard='samples'")
    elif mesh is not None:
        check_divisible(b, mesh, what=f"the inversion batch B = classes x per_class = {k} x "
                        f"{cfg.per_class}", axis=axis,
                        fix="choose inversion.per_class so that B is a multiple of the device "
                            "count")
    return group, q_local


def _make_zo_grad(group: APIGroup, cfg: InversionConfig) -> Callable:
    """The zero-order estimate closure shared by every black-box variant."""
    def zo_grad(index, operand, xs, tgt, s, k_zo, out0, *, sample_offset=0,
                num_directions=cfg.num_directions, direction_offset=0, to_images=None):
        """Zero-order gradient on (a shard of) the batch, from its clean answers ``out0``;
        full-resolution or low-resolution directions. ``xs`` are the images, or with
        ``to_images`` (latents -> API inputs) the latents the directions perturb.
        Returns (gradient, zero-difference frac)."""
        def objective(outputs):
            return per_sample_objective(outputs, tgt, group.output, s, cfg.boundary_weight)

        kw = dict(estimator=cfg.estimator, num_directions=num_directions,
                  smoothing=cfg.smoothing, chunk_size=cfg.chunk_size, fx=objective(out0),
                  on_zero_differences="ignore", sample_offset=sample_offset,
                  direction_offset=direction_offset)
        if cfg.direction_resolution is not None:
            kw.update(resolution=cfg.direction_resolution, method=cfg.direction_upsample)
        estimate = zo_gradient if cfg.direction_resolution is None else zo_gradient_lowres
        render = (lambda x: x) if to_images is None else to_images
        r = estimate(lambda xp: objective(group(index, render(xp), operand)), xs, k_zo, **kw)
        return r.grad, r.zero_difference_fraction

    return zo_grad


def _black_box_single(group: APIGroup, zo_grad: Callable, white_box: bool) -> Callable:
    """``black_box(index, operand, xs, tgt, s, k_zo) -> (out0, g, zero_frac)`` on one device."""
    def black_box(index, operand, xs, tgt, s, k_zo):
        out0 = group(index, xs, operand)  # the clean answer (charged by the API's ledger)
        if white_box:
            return out0, None, jnp.float32(0.0)
        return (out0,) + zo_grad(index, operand, xs, tgt, s, k_zo, out0)

    return black_box


def _black_box_by_directions(group: APIGroup, zo_grad: Callable, white_box: bool, mesh,
                             axis: str, q_local: int) -> Callable:
    """``black_box`` with the ``q`` directions split over ``axis``: the clean answers are queried
    once, each device estimates from its ``q / n`` directions and the estimates are averaged."""
    def black_box(index, operand, xs, tgt, s, k_zo):
        out0 = group(index, xs, operand)  # clean answers: one host call, charged once
        if white_box:
            return out0, None, jnp.float32(0.0)
        args = {"index": index, "xs": xs, "tgt": tgt, "k_zo": k_zo, "out0": out0}
        if operand is not None:
            args["operand"] = operand
        if s is not None:
            args["s"] = s

        def local(a):
            g, zf = zo_grad(a["index"], a.get("operand"), a["xs"], a["tgt"], a.get("s"),
                            a["k_zo"], a["out0"], num_directions=q_local,
                            direction_offset=jax.lax.axis_index(axis) * q_local)
            return jax.lax.pmean(g, axis), jax.lax.pmean(zf, axis)

        specs = jax.tree.map(lambda _: P(), args)
        g, zf = shard_over(local, mesh, (specs,), (P(), P()))(args)
        return out0, g, zf

    return black_box


def _black_box_by_samples(group: APIGroup, zo_grad: Callable, white_box: bool, mesh,
                          axis: str) -> Callable:
    """``black_box`` with the ``B`` samples split over ``axis``: each device queries and
    estimates its shard (the directions one device would draw for it)."""
    def black_box(index, operand, xs, tgt, s, k_zo):
        # Only non-None arguments enter shard_map; per-sample ones are sharded.
        args = {"index": index, "xs": xs, "tgt": tgt, "k_zo": k_zo}
        specs = {"index": P(), "xs": P(axis), "tgt": P(axis), "k_zo": P()}
        if operand is not None:
            args["operand"], specs["operand"] = operand, P()
        if s is not None:
            args["s"], specs["s"] = s, P(axis)

        def local(a):
            out0 = group(a["index"], a["xs"], a.get("operand"))  # this shard's clean answers
            if white_box:
                return out0, jnp.float32(0.0)
            g, zf = zo_grad(a["index"], a.get("operand"), a["xs"], a["tgt"], a.get("s"),
                            a["k_zo"], out0,
                            sample_offset=shard_offset(a["xs"].shape[0], axis))
            # equal shards: mean of means = global mean
            return out0, g, jax.lax.pmean(zf, axis)

        out_specs = (P(axis), P()) if white_box else (P(axis), P(axis), P())
        res = shard_over(local, mesh, (specs,), out_specs)(args)
        return (res[0], None, res[1]) if white_box else res

    return black_box


def _black_box(group: APIGroup, zo_grad: Callable, white_box: bool, mesh, axis: str,
               q_local: Optional[int]) -> Callable:
    """The black-box variant for the mesh: one device, directions or samples sharded."""
    if mesh is None:
        return _black_box_single(group, zo_grad, white_box)
    if q_local is not None:
        return _black_box_by_directions(group, zo_grad, white_box, mesh, axis, q_local)
    return _black_box_by_samples(group, zo_grad, white_box, mesh, axis)


class _Parts(NamedTuple):
    """What the gradient builders share (all closures are pure functions of their inputs)."""
    group: APIGroup
    cfg: InversionConfig
    targets: jax.Array
    b: int
    synth: Callable            # (w, z, k_aug) -> (xa, x01)
    student_logits: Callable   # (student_params, xs) -> logits or None
    teacher_fn: Optional[Callable]
    white_box_objective: Callable  # (teacher_params, x, s) -> scalar
    black_box: Callable


def _make_parts(group, gen_apply, cfg, mean, std, image_size, student_apply, teacher_fn,
                black_box) -> _Parts:
    targets = jnp.tile(jnp.arange(group.num_classes, dtype=jnp.int32), cfg.per_class)
    b = group.num_classes * cfg.per_class

    def synth(w, z, k_aug):
        """Generator output ``x01`` and its augmented, normalised view ``xa``."""
        x01 = gen_apply(w, z)
        xa = batch_shared_augment(x01, k_aug, pad=cfg.pad, flip=cfg.flip is not False,
                                  out_size=image_size, mean=mean, std=std)
        return xa, x01

    def student_logits(student_params, xs):
        if student_params is None:
            return None
        return jax.lax.stop_gradient(student_apply(student_params, xs))

    def white_box_objective(teacher_params, x, s):
        return per_sample_objective(teacher_fn(teacher_params, x), targets, group.output, s,
                                    cfg.boundary_weight).sum()

    return _Parts(group, cfg, targets, b, synth, student_logits, teacher_fn, white_box_objective,
                  black_box)


def _image_gradient(pt: _Parts) -> Callable:
    """Directions over the pixels, pulled back through augmentation and generator."""
    cfg, b, targets, teacher_fn = pt.cfg, pt.b, pt.targets, pt.teacher_fn

    def image_gradient(params, latents, k_aug, k_zo, index, operand, student_params,
                       teacher_params):
        synth_p = lambda p: pt.synth(p["w"], latents(p["z"]), k_aug)  # noqa: E731
        if _uses_prior(cfg):
            (xa, x01), vjp_pair = jax.vjp(synth_p, params)
            prior_g = jax.grad(lambda x: image_prior(x, cfg))(x01)
            vjp_fn = lambda ga: vjp_pair((ga, prior_g))  # noqa: E731
        else:
            xa, vjp_fn, x01 = jax.vjp(synth_p, params, has_aux=True)
        xs = jax.lax.stop_gradient(xa)
        s = pt.student_logits(student_params, xs)
        out0, g, zero_frac = pt.black_box(index, operand, xs, targets, s, k_zo)
        if teacher_fn is not None:  # white-box upper bound: true gradient through the teacher
            g = jax.grad(lambda x: pt.white_box_objective(teacher_params, x, s))(xs)
        (grads,) = vjp_fn(g / b)
        return grads, x01, xs, out0, g, zero_frac

    return image_gradient


def _latent_zo(pt: _Parts, zo_grad: Callable, mesh, axis: str) -> Callable:
    """``latent_zo(w, z, xs, s, index, operand, k_aug, k_zo) -> (g, out0, zero_frac)``: the
    clean answers and the zero-order latent gradient on one device, or per device on its samples
    under a mesh (each device renders and queries its shard; the directions one device would
    draw)."""
    group, synth, targets = pt.group, pt.synth, pt.targets

    def latent_zo_local(w, z, xs, tgt, s, index, operand, k_aug, k_zo, sample_offset=0):
        out0 = group(index, xs, operand)  # the clean answer (charged by the API's ledger)
        g, zero_frac = zo_grad(index, operand, z, tgt, s, k_zo, out0, sample_offset=sample_offset,
                               to_images=lambda zp: synth(w, zp, k_aug)[0])
        return g, out0, zero_frac

    def latent_zo(w, z, xs, s, index, operand, k_aug, k_zo):
        if mesh is None:
            return latent_zo_local(w, z, xs, targets, s, index, operand, k_aug, k_zo)
        args = {"w": w, "z": z, "xs": xs, "tgt": targets, "index": index, "k_aug": k_aug,
                "k_zo": k_zo}
        specs = {"w": jax.tree.map(lambda _: P(), w), "z": P(axis), "xs": P(axis),
                 "tgt": P(axis), "index": P(), "k_aug": P(), "k_zo": P()}
        if operand is not None:
            args["operand"], specs["operand"] = operand, jax.tree.map(lambda _: P(), operand)
        if s is not None:
            args["s"], specs["s"] = s, P(axis)

        def local(a):
            g, out0, zf = latent_zo_local(
                a["w"], a["z"], a["xs"], a["tgt"], a.get("s"), a["index"], a.get("operand"),
                a["k_aug"], a["k_zo"], sample_offset=shard_offset(a["z"].shape[0], axis))
            return g, out0, jax.lax.pmean(zf, axis)

        return shard_over(local, mesh, (specs,), (P(axis), P(axis), P()))(args)

    return latent_zo


def _latent_gradient(pt: _Parts, latent_zo: Callable) -> Callable:
    """Directions over each image's latent z_n; the generator is inside the objective and only Z
    is updated (``zo_space="latent"``)."""
    cfg, b, targets, synth = pt.cfg, pt.b, pt.targets, pt.synth

    def latent_gradient(params, latents, k_aug, k_zo, index, operand, student_params,
                        teacher_params):
        zl, latent_vjp = jax.vjp(latents, params["z"])
        xa, x01 = synth(params["w"], zl, k_aug)
        xs = jax.lax.stop_gradient(xa)
        s = pt.student_logits(student_params, xs)
        if pt.teacher_fn is not None:
            out0 = pt.black_box(index, operand, xs, targets, s, k_zo)[0]
            zero_frac = jnp.float32(0.0)
            g = jax.grad(lambda z: pt.white_box_objective(
                teacher_params, synth(params["w"], z, k_aug)[0], s))(zl)
        else:
            g, out0, zero_frac = latent_zo(params["w"], jax.lax.stop_gradient(zl), xs, s,
                                           index, operand, k_aug, k_zo)
        g_latent = g / b
        if _uses_prior(cfg):
            g_latent = g_latent + jax.grad(
                lambda z: image_prior(synth(params["w"], z, k_aug)[1], cfg))(zl)
        (gz,) = latent_vjp(g_latent)
        grads = {"w": jax.tree.map(jnp.zeros_like, params["w"]), "z": gz}
        return grads, x01, zl, out0, g, zero_frac

    return latent_gradient


def _make_run(pt: _Parts, gen_apply: Callable, nz: int, gradient: Callable,
              constrain: Callable, return_final: bool = False) -> Callable:
    """The (unjitted) inversion: initial latents, then ``iterations`` Adam steps in a scan."""
    cfg, b, targets, k = pt.cfg, pt.b, pt.targets, pt.group.num_classes
    tx = optax.adam(cfg.lr, b1=0.5, b2=0.999)

    def run(key, index, gen_params, operand, student_params=None, teacher_params=None):
        k_z, k_loop = jax.random.split(key)
        if cfg.class_jitter is None:
            params = {"w": gen_params, "z": constrain(jax.random.normal(k_z, (b, nz)))}
            latents = lambda z: z  # noqa: E731
        else:  # class latents + fixed per-image jitter
            k_c, k_e = jax.random.split(k_z)
            params = {"w": gen_params, "z": jax.random.normal(k_c, (k, nz))}
            eps = constrain(cfg.class_jitter * jax.random.normal(k_e, (b, nz)))
            latents = lambda z: z[targets] + eps  # noqa: E731
        opt = tx.init(params)

        def step(carry, i):
            params, opt, best_img, best_score = carry
            k_aug, k_zo = jax.random.split(jax.random.fold_in(k_loop, i))
            grads, x01, point, out0, g, zero_frac = gradient(
                params, latents, k_aug, k_zo, index, operand, student_params, teacher_params)
            ce = jnp.mean(per_sample_objective(out0, targets, pt.group.output))
            acc = jnp.mean(jnp.argmax(out0, -1) == targets)
            updates, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
            score = ce if cfg.select == "clean_ce" else jnp.mean(
                jnp.sum((point * g).reshape(b, -1), axis=1))
            better = score < best_score
            best_img = jnp.where(better, jax.lax.stop_gradient(x01), best_img)
            best_score = jnp.where(better, score, best_score)
            return (params, opt, best_img, best_score), (ce, acc, zero_frac)

        x0 = gen_apply(params["w"], latents(params["z"]))
        init = (params, opt, jnp.zeros_like(x0), jnp.float32(jnp.inf))
        (final, _, best, _), (ce, acc, zf) = jax.lax.scan(step, init,
                                                          jnp.arange(cfg.iterations))
        result = InversionResult(best, targets, ce, acc, zf)
        return (result, final) if return_final else result

    return run


def _on_mesh(jitted: Callable, mesh, b: int) -> Callable:
    """The returned ``invert``: ``jitted`` itself on one device, else a wrapper replicating the
    arguments on the mesh's devices."""
    if mesh is None:
        jitted.batch_size = b
        return jitted

    def invert(key, index, gen_params, operand, student_params=None, teacher_params=None):
        # Everything enters replicated on the mesh's devices (the mesh may be a subset of the
        # process's devices); the compiler then shards the latents and the images over `axis`.
        args = replicate((key, jnp.asarray(index, jnp.int32), gen_params, operand,
                          student_params, teacher_params), mesh)
        return jitted(*args)

    invert.batch_size = b
    invert.mesh = mesh
    return invert


def make_inverter(group: APIGroup, gen_apply: Callable, *, nz: int, cfg: InversionConfig,
                  mean: Sequence[float], std: Sequence[float], image_size: int,
                  student_apply: Optional[Callable] = None,
                  teacher_fn: Optional[Callable] = None, mesh=None, axis: str = "data",
                  shard: str = "samples", return_final: bool = False):
    """Builds the jitted inversion for a group of same-signature APIs.

    Args:
      group: an :class:`~dfml_jax.api.APIGroup` (``APIGroup([api])`` for one API); output
        mode logits, probs or topk (hard labels are refused).
      gen_apply: ``(gen_params, z) -> images in [0, 1]`` (train-mode BN).
      nz: latent size.
      cfg: :class:`InversionConfig`.
      mean, std: the APIs' input normalisation.
      image_size: side of the APIs' input (crop size).
      student_apply: ``(student_params, x) -> logits`` for the boundary term.
      teacher_fn: white-box ``(teacher_params, x) -> logits`` (upper-bound baseline only).
      mesh: optional device mesh (:func:`dfml_jax.parallel.make_mesh`). The ``B`` samples are
        sharded over ``axis``: every API query and the zero-order estimate run inside
        ``jax.shard_map``, so each device's host callback answers only its ``B / n`` samples (in
        parallel) and draws the directions one device would draw for them (``sample_offset``);
        the generator, its batch-norm statistics and the Adam update on ``(w, Z)`` run under
        ``jit`` with the latents sharded and the compiler all-reducing what needs it. Results
        equal the single-device ones up to float reduction order; query counts are identical.
        ``B`` must divide by the device count (a clear error names the valid counts).
      axis: the mesh axis to shard over.
      shard: with a mesh, what is split over the devices: ``"samples"`` (above) or
        ``"directions"``: every device estimates the gradient of the whole batch from its
        ``q / n`` of the ``q`` zero-order directions (the ones one device would draw:
        ``direction_offset``), its host callback answers ``B x q / n`` perturbed samples, and the
        estimates are averaged (``pmean``); the clean answers are queried once. For small batches
        with many directions. ``q`` must divide by the device count (blockwise estimators also need
        ``chunk_size`` dividing ``q / n``).
      return_final: also return the generator and latents after the last Adam step,
        ``{"w": ..., "z": ...}`` (to warm-start another call, or to time every iteration's
        update: without it no output reads the last update, and XLA skips it).

    Returns:
      ``invert(key, index, gen_params, operand, student_params=None, teacher_params=None)
      -> InversionResult``: ``index`` selects the API of the group (traced: one compile serves
      every member), ``gen_params`` is the freshly initialised generator (the spec re-initialises
      it every call), ``operand`` is ``group.operand``. With ``student_params`` the boundary term
      is on. Compiled once per boundary on/off. ``invert.batch_size`` is ``B``. With
      ``return_final``: ``(InversionResult, final)``.
    """
    group, q_local = _validate(group, cfg, image_size, mesh, axis, shard)
    zo_grad = _make_zo_grad(group, cfg)
    black_box = _black_box(group, zo_grad, teacher_fn is not None, mesh, axis, q_local)
    pt = _make_parts(group, gen_apply, cfg, mean, std, image_size, student_apply, teacher_fn,
                     black_box)
    if cfg.zo_space == "image":
        gradient = _image_gradient(pt)
    else:
        gradient = _latent_gradient(pt, _latent_zo(pt, zo_grad, mesh, axis))

    def constrain(x):
        if mesh is None or q_local is not None:
            return x
        return constrain_batch(x, mesh, axis)

    run = _make_run(pt, gen_apply, nz, gradient, constrain, return_final)
    return _on_mesh(jax.jit(run), mesh, pt.b)
