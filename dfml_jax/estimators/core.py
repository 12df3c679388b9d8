"""Zero-order gradient estimators of per-sample black-box objectives (the ``ESTIMATORS`` registry).

Uniform contract of every registry entry::

    grad, num_queries = estimator(f, x, key, *, num_directions, smoothing, chunk_size=None)

* ``f`` maps points ``(B, *shape)`` to per-point values ``(B,)``. It is always called on arrays whose
  row ``i`` is ``x[i]`` or a perturbation of ``x[i]``, so per-sample data (targets, student logits)
  can be closed over and indexed by position. The estimator calls ``jax.vmap(f)`` over the
  directions of a chunk: ONE call of ``f`` (one host round-trip of a :class:`BlackBoxAPI`) per chunk.
* ``x`` is ``(B, *shape)``; every sample is perturbed independently with its own directions; ``grad``
  has the shape of ``x`` and is an estimate of ``grad_x sum_i f(x)_i`` (row ``i``: ``grad f_i(x_i)``).
* ``num_queries`` is a Python int that depends only on shapes: the samples one call asks ``f`` for,
  which is exactly what a :class:`~dfml_jax.api.BlackBoxAPI` ledger charges when ``f`` queries
  the API once per point: ``B * (q + 1)`` for forward differences (``B * q`` when the clean values
  are passed as ``fx``), ``2 * B * q`` for central differences (see :func:`num_queries`).
* ``smoothing`` (``mu``) is the step length in input units for every family (RMS length for
  Gaussian directions) and may be traced; ``num_directions`` (``q``), ``chunk_size`` and ``f`` are
  static. ``chunk_size`` is the number of directions evaluated per call of ``f`` (each call evaluates
  ``B * chunk_size`` points, ``2 * B * chunk_size`` for central differences); chunks run in a
  ``lax.scan`` and regenerate their directions from ``fold_in(key, .)``, so memory is
  ``O(B * chunk_size * d)`` and nothing per direction is stored.

All estimators share the formula ``g_hat = (d / q) * sum_j Delta_j u_j`` with ``E[u u^T] = I / d``
(:mod:`.directions`) and are unbiased for linear ``f``. Forward differences spend ``q + 1`` queries
per sample and reach ``E[cos^2] = q / (q + d - 1)`` (i.i.d. directions) or ``q / d`` (orthogonal,
coordinate); central differences spend ``2q`` and remove the curvature term, which wins near
stationary points (zo_estimators.md sections 0, 3, 4.3).

References:
  Nesterov & Spokoiny, FoCM 2017 (Gaussian smoothing); Duchi et al., IEEE TIT 2015 (two-point);
  Spall, IEEE TAC 1992 (SPSA); Choromanski et al., ICML 2018, arXiv 1804.02395 (orthogonal);
  Truong et al. (DFME), arXiv 2011.14779; Kariyappa et al. (MAZE), arXiv 2005.03161;
  Hu et al. (BiDf-MKD), arXiv 2305.18413.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .directions import DIRECTION_FAMILIES, sample_directions
from .precision import DEFAULT_THRESHOLD, report_zero_differences

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_SPECS",
    "EstimatorSpec",
    "ZOGradient",
    "contract_directions",
    "coordinate_central",
    "gaussian_central",
    "gaussian_forward",
    "num_queries",
    "orthogonal_central",
    "sphere_forward",
    "zo_gradient",
]

SCHEMES = ("forward", "central")


class EstimatorSpec(NamedTuple):
    """What a registry name means: a direction family and a difference scheme."""

    name: str
    family: str   # key of DIRECTION_FAMILIES
    scheme: str   # "forward" (q + 1 queries per sample) or "central" (2q)


ESTIMATOR_SPECS = {
    f"{fam}-{scheme}": EstimatorSpec(f"{fam}-{scheme}", fam, scheme)
    for fam in DIRECTION_FAMILIES for scheme in SCHEMES
}


def resolve_estimator(estimator) -> EstimatorSpec:
    """Turn a registry name (or an :class:`EstimatorSpec`) into an :class:`EstimatorSpec`."""
    if isinstance(estimator, EstimatorSpec):
        return estimator
    spec = ESTIMATOR_SPECS.get(estimator)
    if spec is None:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {sorted(ESTIMATOR_SPECS)}")
    return spec


class ZOGradient(NamedTuple):
    """Result of :func:`zo_gradient`.

    Attributes:
      grad: ``(B, *shape)`` gradient estimate.
      num_queries: samples asked of ``f`` (Python int, static; an array if returned from ``jit``).
      values: ``f(x)`` ``(B,)`` for forward schemes (queried, or the ``fx`` passed in); None for
        central schemes, which never evaluate the clean points.
      differences: ``(B, q)`` finite-difference quotients ``Delta_j`` (directional derivatives).
      zero_difference_fraction: fraction of ``Delta_j`` that are exactly zero (precision diagnostic).
    """

    grad: jax.Array
    num_queries: int
    values: Optional[jax.Array]
    differences: jax.Array
    zero_difference_fraction: jax.Array


def num_queries(estimator, batch_size: int, num_directions: int, *, include_clean: bool = True) -> int:
    """Samples one estimate asks for (what the black-box ledger charges), from shapes alone.

    Args:
      estimator: registry name or :class:`EstimatorSpec`.
      batch_size: B.
      num_directions: q.
      include_clean: forward schemes only: whether the clean values ``f(x)`` are queried (False
        when they are passed in, e.g. ``fx=`` or a forward pass that already has them).

    Returns:
      ``B * (q + 1)`` (forward, clean included), ``B * q`` (forward, clean given) or ``2 * B * q``.

    Example:
      >>> num_queries("sphere-forward", 150, 100), num_queries("gaussian-central", 150, 100)
      (15150, 30000)
    """
    spec = resolve_estimator(estimator)
    b, q = int(batch_size), int(num_directions)
    if spec.scheme == "central":
        return 2 * b * q
    return b * q + (b if include_clean else 0)


def _check_static(num_directions, chunk_size):
    if not isinstance(num_directions, int) or num_directions < 1:
        raise ValueError(f"num_directions must be a positive Python int (static), got {num_directions!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive Python int (static), got {chunk_size!r}")


def for_each_chunk(num_directions: int, chunk_size: Optional[int], body: Callable, carry):
    """Run ``body(carry, chunk_index, start, count) -> (carry, out)`` over the direction chunks.

    Full chunks of ``chunk_size`` directions run in one ``lax.scan`` (one compiled body); a
    remainder chunk, if any, runs once after it. ``count`` is static; ``chunk_index`` and ``start``
    may be traced. Per-chunk outputs (leading axis ``count``) are concatenated to a leading axis
    ``num_directions``.
    """
    c = num_directions if chunk_size is None else min(chunk_size, num_directions)
    n_full, rem = divmod(num_directions, c)
    outs = []
    if n_full == 1:
        carry, out = body(carry, 0, 0, c)
        outs.append(out)
    else:
        def step(carry, i):
            return body(carry, i, i * c, c)

        carry, out = jax.lax.scan(step, carry, jnp.arange(n_full))
        outs.append(jax.tree_util.tree_map(lambda a: a.reshape((n_full * c,) + a.shape[2:]), out))
    if rem:
        carry, out = body(carry, n_full, n_full * c, rem)
        outs.append(out)
    if len(outs) == 1:
        return carry, outs[0]
    return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *outs)


def perturbed_points(xf: jax.Array, u: jax.Array, mu, scheme: str, sample_shape, dtype) -> jax.Array:
    """Points ``x + mu u`` (forward) or ``[x + mu u; x - mu u]`` (central), shaped ``(n, B, *shape)``."""
    step = mu * u
    pts = xf[None] + step if scheme == "forward" else jnp.concatenate([xf[None] + step, xf[None] - step])
    return pts.reshape(pts.shape[:2] + tuple(sample_shape)).astype(dtype)


def contract_directions(key: jax.Array, weights: jax.Array, *, estimator="sphere-forward",
                        sample_shape, chunk_size: Optional[int] = None,
                        sample_offset=0) -> jax.Array:
    """``(d / q) * sum_j weights[:, j] * u_j``, regenerating the directions ``u_j`` from ``key``.

    This is the second half of every estimator: given per-sample, per-direction weights (finite
    difference quotients of any loss), it returns the gradient estimate. The directions are exactly
    those an estimator (or :func:`~dfml_jax.estimators.zo_api_outputs`) with the same ``key``,
    ``estimator``, ``num_directions = weights.shape[1]`` and ``chunk_size`` used.

    Args:
      key: the estimate's PRNG key.
      weights: ``(B, q)`` weights.
      estimator: registry name (its direction family matters).
      sample_shape: shape of one sample.
      chunk_size: the chunking used when querying (matters for blockwise families only).
      sample_offset: global index of the first sample (may be traced; see :func:`zo_gradient`).

    Returns:
      ``(B, *sample_shape)`` float32.
    """
    spec = resolve_estimator(estimator)
    b, q = weights.shape
    d = math.prod(sample_shape)
    _check_static(q, chunk_size)
    w = jnp.swapaxes(weights.astype(jnp.float32), 0, 1)   # (q, B)

    def body(acc, ci, start, count):
        u = sample_directions(spec.family, key, ci, start, count, b, d, sample_offset)
        wc = jax.lax.dynamic_slice_in_dim(w, start, count, axis=0) if count < q else w
        return acc + jnp.einsum("cb,cbd->bd", wc, u), None

    acc, _ = for_each_chunk(q, chunk_size, body, jnp.zeros((b, d), jnp.float32))
    return (acc * (d / q)).reshape((b,) + tuple(sample_shape))


def zo_gradient(f: Callable[[jax.Array], jax.Array], x: jax.Array, key: jax.Array, *,
                estimator="sphere-forward", num_directions: int, smoothing,
                chunk_size: Optional[int] = None, fx: Optional[jax.Array] = None,
                on_zero_differences: str = "warn",
                zero_difference_threshold: float = DEFAULT_THRESHOLD,
                sample_offset=0, direction_offset=0) -> ZOGradient:
    """Zero-order estimate of the per-sample gradients of ``f`` at ``x``, with diagnostics.

    One pass: each chunk draws its directions, evaluates ``f`` on all perturbed points of the chunk
    in one vmapped call, and accumulates ``Delta_j u_j``; the directions are never stored.

    Args:
      f: ``(B, *shape) -> (B,)`` per-sample objective (row ``i`` is always a copy or perturbation of
        ``x[i]``). Typically closes over a :class:`~dfml_jax.api.BlackBoxAPI`.
      x: ``(B, *shape)`` points (treated as constants: no gradient flows into ``x``).
      key: PRNG key of the directions.
      estimator: a name in :data:`ESTIMATOR_SPECS` (``"sphere-forward"``, ``"gaussian-central"``...).
      num_directions: q, static.
      smoothing: step length ``mu`` in input units (may be traced). Must be large against the
        output precision (see :mod:`dfml_jax.estimators.precision`).
      chunk_size: directions per call of ``f`` (static); None: all q in one call.
      fx: optional precomputed ``f(x)`` ``(B,)`` (forward schemes): saves B queries.
      on_zero_differences: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when the fraction of
        exactly-zero differences reaches ``zero_difference_threshold`` (an in-graph check).
      zero_difference_threshold: see above.
      sample_offset: global index of ``x[0]`` in the whole batch (may be traced, e.g.
        ``lax.axis_index("data") * B`` inside ``jax.shard_map``): a device holding a shard of a
        batch draws exactly the directions one device would draw for those samples, so the
        sharded estimate equals the single-device one.
      direction_offset: global index of this call's first direction (may be traced) when the
        ``Q`` directions of one estimate are split over ``n`` devices, each estimating with
        ``num_directions = Q / n`` from ``direction_offset = device * Q / n``: each device draws
        exactly its share of the single-device directions, and the mean of the ``n`` estimates is
        the ``Q``-direction estimate. Blockwise families (orthogonal, coordinate) need
        ``chunk_size`` to divide ``num_directions`` so that chunks line up.

    Returns:
      A :class:`ZOGradient`.

    Example:
      >>> f = lambda p: jnp.sum(p * jnp.arange(3.0), axis=-1)          # linear, gradient (0, 1, 2)
      >>> r = zo_gradient(f, jnp.zeros((2, 3)), jax.random.key(0),
      ...                 estimator="coordinate-central", num_directions=3, smoothing=0.1)
      >>> r.grad.round(4).tolist(), r.num_queries
      ([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]], 12)
    """
    spec = resolve_estimator(estimator)
    _check_static(num_directions, chunk_size)
    x = jax.lax.stop_gradient(jnp.asarray(x))
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = math.prod(shape)
    q = num_directions
    mu = jax.lax.stop_gradient(jnp.asarray(smoothing, jnp.float32))
    xf = x.reshape(b, d).astype(jnp.float32)
    forward = spec.scheme == "forward"

    f0 = _clean_values(f, x, fx) if forward else None
    chunk_offset = _chunk_offset(spec, q, chunk_size, direction_offset)

    def body(acc, ci, start, count):
        u = sample_directions(spec.family, key, ci + chunk_offset, start + direction_offset, count,
                              b, d, sample_offset)                                  # (c, B, d)
        vals = jax.vmap(f)(perturbed_points(xf, u, mu, spec.scheme, shape, x.dtype))
        if vals.shape != (u.shape[0] * (1 if forward else 2), b):
            raise ValueError(f"f must map (B, *shape) to per-sample values (B,) = ({b},); got "
                             f"{vals.shape[1:]}")
        vals = vals.astype(jnp.float32)
        delta = (vals - f0[None]) / mu if forward else (vals[:count] - vals[count:]) / (2.0 * mu)
        return acc + jnp.einsum("cb,cbd->bd", delta, u), delta

    acc, deltas = for_each_chunk(q, chunk_size, body, jnp.zeros((b, d), jnp.float32))
    grad = (acc * (d / q)).reshape(x.shape).astype(x.dtype)
    differences = jnp.swapaxes(deltas, 0, 1)                                  # (B, q)
    zero_frac = jnp.mean((differences == 0).astype(jnp.float32))
    report_zero_differences(zero_frac, mu, action=on_zero_differences,
                            threshold=zero_difference_threshold, context=spec.name)
    return ZOGradient(grad, num_queries(spec, b, q, include_clean=fx is None), f0, differences,
                      zero_frac)


def _clean_values(f, x, fx):
    """``f(x)`` (or the given ``fx``) as float32 ``(B,)``: the forward schemes' reference."""
    b = x.shape[0]
    f0 = f(x) if fx is None else jax.lax.stop_gradient(jnp.asarray(fx))
    if f0.shape != (b,):
        raise ValueError(f"f must map (B, *shape) to per-sample values (B,) = ({b},); got {f0.shape}")
    return f0.astype(jnp.float32)


def _chunk_offset(spec, q: int, chunk_size: Optional[int], direction_offset):
    """Index of this call's first chunk among all chunks of a direction-split estimate."""
    if isinstance(direction_offset, int) and direction_offset == 0:
        return 0
    if DIRECTION_FAMILIES[spec.family].blockwise and (chunk_size is None or q % chunk_size):
        raise ValueError(
            f"direction_offset with the blockwise estimator {spec.name!r} needs a chunk_size "
            f"that divides num_directions (got chunk_size={chunk_size}, num_directions={q}) "
            "so that chunks line up across devices")
    return direction_offset // (q if chunk_size is None else min(chunk_size, q))


# ----------------------------------------------------------------------------- registry
_DOCS = {
    "sphere-forward": (
        "Unit-sphere directions, forward differences, ``d/q`` scaling: the DFME / MAZE / BiDf-MKD "
        "estimator. ``q + 1`` queries per sample; ``E[cos^2] ~ q / (q + d - 1)``, ``E[cos] ~ "
        "sqrt(q / (d + q))``; norm ratio ``sqrt((d + q - 1) / q)``."),
    "sphere-central": "Unit-sphere directions, central differences (``2q`` queries per sample).",
    "gaussian-forward": (
        "Gaussian smoothing (Nesterov-Spokoiny) with forward differences: ``u ~ N(0, I/d)``, so "
        "``smoothing`` is the RMS step length (``sigma = mu / sqrt(d)`` in N-S terms). ``q + 1`` "
        "queries per sample; relative MSE ``(d + 1) / q``."),
    "gaussian-central": (
        "Antithetic (mirrored) Gaussian central differences: ``2q`` queries per sample; the "
        "curvature term cancels (bias ``O(mu^2)``), robust near stationary points."),
    "rademacher-forward": "Rademacher (SPSA) directions ``{+-1}^d / sqrt(d)``, forward differences.",
    "rademacher-central": "Rademacher (SPSA) directions ``{+-1}^d / sqrt(d)``, central differences.",
    "orthogonal-forward": "Blockwise-orthonormal directions (Choromanski et al.), forward differences.",
    "orthogonal-central": (
        "Blockwise-orthonormal unit directions (Choromanski et al. 2018), central differences: "
        "directions of a chunk are exactly orthonormal (blocks of at most d), ``E[cos^2] = q / d``, "
        "relative MSE ``(d - q) / q``; ``2q`` queries per sample."),
    "coordinate-forward": "Random coordinate subsets, forward differences.",
    "coordinate-central": (
        "Random coordinate subsets (distinct within a chunk), central differences, ``d/q`` scaling: "
        "``2q`` queries per sample; ``E[cos^2] = q / d`` for an isotropic gradient, exact gradient "
        "when ``q = d`` and ``chunk_size=None``."),
}


def _make_estimator(name: str):
    spec = ESTIMATOR_SPECS[name]

    def estimator(f, x, key, *, num_directions: int, smoothing, chunk_size: Optional[int] = None,
                  fx: Optional[jax.Array] = None, on_zero_differences: str = "warn"):
        r = zo_gradient(f, x, key, estimator=spec, num_directions=num_directions,
                        smoothing=smoothing, chunk_size=chunk_size, fx=fx,
                        on_zero_differences=on_zero_differences)
        return r.grad, r.num_queries

    estimator.__name__ = estimator.__qualname__ = name.replace("-", "_")
    estimator.__doc__ = f"""{_DOCS[name]}

    Registry entry ``ESTIMATORS[{name!r}]``; see :func:`zo_gradient` for the diagnostics form.

    Args:
      f: ``(B, *shape) -> (B,)`` per-sample objective.
      x: ``(B, *shape)`` points.
      key: PRNG key.
      num_directions: q (static).
      smoothing: step length ``mu`` in input units (may be traced).
      chunk_size: directions per call of ``f`` (static); None: all at once.
      fx: optional precomputed ``f(x)`` (forward schemes; saves ``B`` queries).
      on_zero_differences: ``"warn"``, ``"raise"`` or ``"ignore"`` (precision check).

    Returns:
      ``(grad, num_queries)``: ``grad`` shaped like ``x``; ``num_queries`` a Python int equal to
      what a black-box ledger charges for this call (:func:`num_queries`).
    """
    return estimator


ESTIMATORS = {name: _make_estimator(name) for name in ESTIMATOR_SPECS}

sphere_forward = ESTIMATORS["sphere-forward"]
gaussian_forward = ESTIMATORS["gaussian-forward"]
gaussian_central = ESTIMATORS["gaussian-central"]
orthogonal_central = ESTIMATORS["orthogonal-central"]
coordinate_central = ESTIMATORS["coordinate-central"]
