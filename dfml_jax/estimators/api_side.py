"""Query once, reuse for every loss: the API's Jacobian along sampled directions.

:func:`zo_api_outputs` queries a black-box API at ``x`` and at ``x +- mu u_j`` (``j = 1..q``, every
sample with its own directions) and returns a :class:`ZOProbe` holding only OUTPUTS: the clean
``(B, K)`` outputs and the perturbed ``(B, q, K)`` outputs. The directions are not stored; they are
regenerated from the probe's key when a gradient is asked for. From one probe:

* :func:`probe_grad` with a per-sample loss of the outputs (CE of probabilities, BiDf-MKD's masked
  L1 boundary term whose mask is recomputed at the perturbed outputs, KL, anything): evaluates the
  loss on the perturbed outputs (``loss(y_plus) - loss(y_clean)``, no new queries) and returns the
  zero-order gradient estimate w.r.t. ``x``. Exactly what a scalar estimator on ``loss(api(x))``
  would give with the same key.
* :func:`probe_vjp` with a cotangent ``dloss/doutputs`` ``(B, K)``: the first-order chain rule
  through the estimated Jacobian-along-directions ``(y(x + mu u_j) - y(x)) / mu`` (``(B, q, K)``,
  :attr:`ZOProbe.output_jvps`).

Any number of losses can be differentiated from the same probe without new queries.

Example:
  >>> import numpy as np
  >>> from dfml_jax.api import BlackBoxAPI
  >>> W = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
  >>> api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1) @ W, (2, 2, 3), 5, output="probs")
  >>> x, y = jnp.zeros((4, 2, 2, 3)), jnp.arange(4)
  >>> probe = zo_api_outputs(api, x, jax.random.key(0), num_directions=8, smoothing=0.1)
  >>> ce = lambda p, y: -jnp.log(p[jnp.arange(len(y)), y])
  >>> g_ce = probe_grad(probe, ce, y)                         # CE gradient, no new query
  >>> g_lin = probe_vjp(probe, jnp.ones((4, 5)))             # any cotangent, no new query
  >>> g_ce.shape, api.queries == probe.num_queries == 4 * (8 + 1)
  ((4, 2, 2, 3), True)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from .core import (_check_static, contract_directions, for_each_chunk, num_queries,
                   perturbed_points, resolve_estimator)
from .directions import sample_directions
from .precision import DEFAULT_THRESHOLD, report_zero_differences

__all__ = ["ZOProbe", "probe_differences", "probe_grad", "probe_vjp", "zo_api_outputs"]

_SCORE_OUTPUTS = ("logits", "probs", "topk")


@dataclasses.dataclass(frozen=True)
class ZOProbe:
    """One set of black-box queries around ``x``, reusable for the gradient of any loss.

    A pytree (can be returned from ``jit``); the static fields are metadata.

    Attributes:
      outputs: ``(B, K)`` API outputs at ``x``.
      outputs_plus: ``(B, q, K)`` outputs at ``x + mu u_j``.
      outputs_minus: ``(B, q, K)`` outputs at ``x - mu u_j`` (central schemes), else None.
      key: PRNG key the directions are regenerated from.
      smoothing: the step ``mu``.
      zero_difference_fraction: fraction of (sample, direction) pairs whose output vector did not
        change at all (precision diagnostic; close to 1 means the step is below output precision).
      estimator: registry name (static).
      chunk_size: chunking used (static; blockwise families need it to regenerate directions).
      sample_shape: shape of one input sample (static).
      num_queries: samples this probe cost (static Python int).
      sample_offset: global index of the first sample (device shards of a batch).
    """

    outputs: jax.Array
    outputs_plus: jax.Array
    outputs_minus: Optional[jax.Array]
    key: jax.Array
    smoothing: jax.Array
    zero_difference_fraction: jax.Array
    estimator: str = dataclasses.field(metadata=dict(static=True), default="sphere-forward")
    chunk_size: Optional[int] = dataclasses.field(metadata=dict(static=True), default=None)
    sample_shape: tuple = dataclasses.field(metadata=dict(static=True), default=())
    num_queries: int = dataclasses.field(metadata=dict(static=True), default=0)
    sample_offset: jax.Array = 0

    @property
    def num_directions(self) -> int:
        return self.outputs_plus.shape[1]

    @property
    def scheme(self) -> str:
        return resolve_estimator(self.estimator).scheme

    @property
    def output_jvps(self) -> jax.Array:
        """``(B, q, K)`` finite-difference estimates of ``J(x) u_j`` (Jacobian along directions)."""
        mu = self.smoothing
        if self.scheme == "forward":
            return (self.outputs_plus - self.outputs[:, None]) / mu
        return (self.outputs_plus - self.outputs_minus) / (2.0 * mu)


jax.tree_util.register_dataclass(ZOProbe)


def _query_fn(api):
    if hasattr(api, "require_output"):
        api.require_output(_SCORE_OUTPUTS, "zero-order gradient estimation")
    return lambda pts: api(jax.lax.stop_gradient(pts))


def zo_api_outputs(api, x: jax.Array, key: jax.Array, *, estimator="sphere-forward",
                   num_directions: int, smoothing, chunk_size: Optional[int] = None,
                   outputs: Optional[jax.Array] = None, on_zero_differences: str = "warn",
                   zero_difference_threshold: float = DEFAULT_THRESHOLD,
                   sample_offset=0) -> ZOProbe:
    """Query ``api`` around every sample of ``x`` once; return the outputs as a :class:`ZOProbe`.

    Cost (``probe.num_queries``, what the ledger charges): ``B`` clean queries (skipped when
    ``outputs`` is given; central schemes also query them, for the loss value) plus ``B * q``
    (forward schemes) or ``2 * B * q`` (central schemes).
    Each chunk of directions is ONE vmapped API call (one host round-trip).

    Args:
      api: a :class:`~dfml_jax.api.BlackBoxAPI` returning scores (logits, probs or top-k), or
        any callable ``(n, *shape) -> (n, K)``.
      x: ``(B, *shape)`` inputs (no gradient flows into them).
      key: PRNG key of the directions (kept in the probe).
      estimator: registry name (:data:`~dfml_jax.estimators.ESTIMATOR_SPECS`).
      num_directions: q (static).
      smoothing: step length ``mu`` in input units (may be traced).
      chunk_size: directions per API call (static); None: all at once.
      outputs: already-known clean outputs ``api(x)`` ``(B, K)`` (saves ``B`` queries).
      on_zero_differences: ``"warn"``, ``"raise"`` or ``"ignore"`` when the fraction of unchanged
        output vectors reaches ``zero_difference_threshold``.
      zero_difference_threshold: see above.
      sample_offset: global index of ``x[0]`` in the whole batch (may be traced; a device holding
        a shard passes its offset and draws the single-device directions). Gradients from the
        probe must then be contracted with the same offset (:func:`probe_grad` reads it from the
        probe).

    Returns:
      A :class:`ZOProbe`.
    """
    spec = resolve_estimator(estimator)
    _check_static(num_directions, chunk_size)
    query = _query_fn(api)
    x = jax.lax.stop_gradient(jnp.asarray(x))
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = math.prod(shape)
    q = num_directions
    mu = jax.lax.stop_gradient(jnp.asarray(smoothing, jnp.float32))
    xf = x.reshape(b, d).astype(jnp.float32)
    y0 = query(x) if outputs is None else jax.lax.stop_gradient(jnp.asarray(outputs))
    if y0.ndim != 2 or y0.shape[0] != b:
        raise ValueError(f"the API must return (B, K) scores for (B, *shape) inputs; got {y0.shape}")
    y0 = y0.astype(jnp.float32)

    def body(carry, ci, start, count):
        u = sample_directions(spec.family, key, ci, start, count, b, d, sample_offset)
        return carry, jax.vmap(query)(perturbed_points(xf, u, mu, spec.scheme, shape, x.dtype))

    _, ys = for_each_chunk(q, chunk_size, body, None)    # (q, B, K) or per-chunk [plus; minus]
    ys = ys.astype(jnp.float32)
    if spec.scheme == "forward":
        plus, minus = jnp.swapaxes(ys, 0, 1), None
        unchanged = jnp.all(plus == y0[:, None], axis=-1)
    else:
        plus, minus = _split_central(ys, q, chunk_size)
        unchanged = jnp.all(plus == minus, axis=-1)
    zero_frac = jnp.mean(unchanged.astype(jnp.float32))
    report_zero_differences(zero_frac, mu, action=on_zero_differences,
                            threshold=zero_difference_threshold, context=f"{spec.name} API probe")
    cost = num_queries(spec, b, q, include_clean=False) + (b if outputs is None else 0)
    return ZOProbe(y0, plus, minus, key, mu, zero_frac, spec.name, chunk_size, shape, cost,
                   jnp.asarray(sample_offset, jnp.int32))


def _split_central(ys, q, chunk_size):
    """Central chunks return ``[plus(c); minus(c)]`` stacked per chunk; unstack to (B, q, K) each."""
    c = q if chunk_size is None else min(chunk_size, q)
    n_full, rem = divmod(q, c)
    plus, minus, off = [], [], 0
    if n_full:
        full = ys[: 2 * c * n_full].reshape((n_full, 2, c) + ys.shape[1:])
        plus.append(full[:, 0].reshape((n_full * c,) + ys.shape[1:]))
        minus.append(full[:, 1].reshape((n_full * c,) + ys.shape[1:]))
        off = 2 * c * n_full
    if rem:
        plus.append(ys[off: off + rem])
        minus.append(ys[off + rem:])
    cat = lambda a: a[0] if len(a) == 1 else jnp.concatenate(a, axis=0)   # noqa: E731
    return jnp.swapaxes(cat(plus), 0, 1), jnp.swapaxes(cat(minus), 0, 1)


def probe_differences(probe: ZOProbe, loss_fn: Callable, *loss_args) -> jax.Array:
    """Finite-difference quotients of a per-sample loss of the outputs, from a probe (no queries).

    Args:
      probe: a :class:`ZOProbe`.
      loss_fn: ``loss_fn(outputs (B, K), *loss_args) -> (B,)``; row ``i`` of ``outputs`` belongs
        to sample ``i`` (so targets, student logits... in ``loss_args`` align by position).
      *loss_args: extra arguments of ``loss_fn``.

    Returns:
      ``(B, q)``: ``(loss(y_plus_j) - loss(y)) / mu`` (forward) or
      ``(loss(y_plus_j) - loss(y_minus_j)) / (2 mu)`` (central).
    """
    per_dir = jax.vmap(lambda y: loss_fn(y, *loss_args), in_axes=1, out_axes=1)
    lp = per_dir(probe.outputs_plus)
    if probe.scheme == "forward":
        return (lp - loss_fn(probe.outputs, *loss_args)[:, None]) / probe.smoothing
    return (lp - per_dir(probe.outputs_minus)) / (2.0 * probe.smoothing)


def _contract(probe: ZOProbe, weights: jax.Array) -> jax.Array:
    return contract_directions(probe.key, weights, estimator=probe.estimator,
                               sample_shape=probe.sample_shape, chunk_size=probe.chunk_size,
                               sample_offset=probe.sample_offset)


def probe_vjp(probe: ZOProbe, cotangent: jax.Array) -> jax.Array:
    """Estimated ``J(x)^T cotangent`` per sample: the chain rule through the probed Jacobian.

    Args:
      probe: a :class:`ZOProbe`.
      cotangent: ``(B, K)`` gradient of a loss w.r.t. the API outputs (e.g. ``jax.grad`` of the
        loss at ``probe.outputs``).

    Returns:
      ``(B, *sample_shape)`` gradient estimate (no new queries).
    """
    w = jnp.einsum("bqk,bk->bq", probe.output_jvps, jnp.asarray(cotangent, jnp.float32))
    return _contract(probe, w)


def probe_grad(probe: ZOProbe, loss_or_cotangent: Union[Callable, jax.Array], *loss_args) -> jax.Array:
    """Zero-order gradient of a loss of the API outputs w.r.t. ``x``, from a probe (no queries).

    Args:
      probe: a :class:`ZOProbe`.
      loss_or_cotangent: either a per-sample loss ``loss_fn(outputs (B, K), *loss_args) -> (B,)``,
        evaluated on the perturbed outputs (exact for losses that are nonlinear or discontinuous in
        the outputs, e.g. masks recomputed at the perturbed points), or a ``(B, K)`` cotangent
        ``dloss/doutputs`` for the linear chain rule (:func:`probe_vjp`).
      *loss_args: extra arguments of ``loss_fn``.

    Returns:
      ``(B, *sample_shape)`` estimate of the per-sample gradients ``grad_x loss_i``.
    """
    if callable(loss_or_cotangent):
        return _contract(probe, probe_differences(probe, loss_or_cotangent, *loss_args))
    if loss_args:
        raise TypeError("loss_args are only used with a loss function, not with a cotangent")
    return probe_vjp(probe, loss_or_cotangent)
