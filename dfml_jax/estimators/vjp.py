"""``jax.custom_vjp`` wrappers: black-box objectives differentiable by zero-order estimation.

``jax.grad`` of ``loss(api, G(w, z))`` w.r.t. ``(w, z)`` then flows through the generator ``G`` by
the true chain rule and through the API by the chosen estimator (how DFME, MAZE and BiDf-MKD train
generators, written as one differentiable function). Both wrappers work under ``jit``, ``vmap`` and
``scan``.

* :func:`zo_objective` (recommended; BiDf-MKD's inversion step): ``objective(x, key, *loss_args)
  -> (B,)`` per-sample values of ``loss_fn(api(x), *loss_args)``. The forward pass queries the clean
  outputs (``B`` queries: the loss value); the backward pass queries ``x + mu u_j`` (``B * q``) and
  evaluates the loss on the perturbed outputs, so nonlinear / discontinuous losses (CE of
  probabilities, BiDf-MKD's masked L1 boundary term with the mask recomputed at the perturbed
  point) are estimated exactly as the reference code does. One gradient step costs
  ``B * (q + 1)`` queries: 1 clean + q perturbed per sample, the spec's accounting (bidf_mkd.md
  section 1.3); a call without differentiation costs ``B``. Gradients w.r.t. ``loss_args`` (e.g.
  student logits) are exact: the loss itself is white-box.
* :func:`zo_api`: ``outputs(x, key) -> (B, K)`` API outputs whose VJP is the linear chain rule
  through the estimated Jacobian along the directions (``cotangent . (y(x + mu u) - y(x)) / mu``).
  Same query cost; any downstream loss composes, but only to first order in ``mu``.

Central schemes query ``2 * B * q`` in the backward pass (the clean ``B`` of the forward pass still
give the loss value).

Example:
  >>> import numpy as np
  >>> from dfml_jax.api import BlackBoxAPI
  >>> W = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
  >>> api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1) @ W, (2, 2, 3), 5)
  >>> ce = lambda logits, y: -jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]
  >>> objective = zo_objective(api, ce, num_directions=10, smoothing=0.01)
  >>> G = lambda w, z: jnp.tanh(z @ w).reshape(-1, 2, 2, 3)       # a toy generator
  >>> loss = lambda w, z, key, y: objective(G(w, z), key, y).mean()
  >>> gw = jax.jit(jax.grad(loss))(jnp.ones((3, 12)), jnp.ones((4, 3)), jax.random.key(0),
  ...                              jnp.arange(4))
  >>> gw.shape, api.queries                                         # 4 * (10 + 1)
  ((3, 12), 44)
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .api_side import _query_fn, probe_differences, zo_api_outputs
from .core import _check_static, contract_directions, num_queries, resolve_estimator
from .precision import DEFAULT_THRESHOLD, report_zero_differences, zero_difference_fraction

__all__ = ["zo_api", "zo_objective"]


def zo_objective(api, loss_fn: Callable, *, estimator="sphere-forward", num_directions: int,
                 smoothing, chunk_size: Optional[int] = None, on_zero_differences: str = "warn",
                 zero_difference_threshold: float = DEFAULT_THRESHOLD) -> Callable:
    """Make ``x -> loss_fn(api(x), ...)`` differentiable w.r.t. ``x`` by zero-order estimation.

    Args:
      api: a :class:`~dfml_jax.api.BlackBoxAPI` returning scores, or any callable
        ``(n, *shape) -> (n, K)``.
      loss_fn: ``loss_fn(outputs (B, K), *loss_args) -> (B,)`` per-sample loss; row ``i`` belongs
        to sample ``i``. Pass traced data it needs (targets, student logits) as ``loss_args``, not
        via closures.
      estimator: registry name (default ``"sphere-forward"``, the BiDf-MKD / DFME estimator).
      num_directions: q (static).
      smoothing: step ``mu`` in input units (float or array).
      chunk_size: directions per API call in the backward pass (static).
      on_zero_differences: ``"warn"``, ``"raise"`` or ``"ignore"``: precision check on the loss
        differences of every backward pass.
      zero_difference_threshold: fraction of zero differences that triggers the check.

    Returns:
      ``objective(x, key, *loss_args) -> (B,)``, with attribute ``objective.num_queries(B)`` giving
      the queries of one differentiated call (clean + perturbed).
    """
    spec = resolve_estimator(estimator)
    _check_static(num_directions, chunk_size)
    query = _query_fn(api)

    @jax.custom_vjp
    def _objective(x, key, mu, *loss_args):
        return loss_fn(query(x), *loss_args)

    def _fwd(x, key, mu, *loss_args):
        y0 = query(x)
        return loss_fn(y0, *loss_args), (x, key, mu, y0, loss_args)

    def _bwd(res, ct):
        x, key, mu, y0, loss_args = res
        probe = zo_api_outputs(api, x, key, estimator=spec, num_directions=num_directions,
                               smoothing=mu, chunk_size=chunk_size, outputs=y0,
                               on_zero_differences="ignore")
        diffs = probe_differences(probe, loss_fn, *loss_args)                 # (B, q)
        report_zero_differences(zero_difference_fraction(diffs), mu, action=on_zero_differences,
                                threshold=zero_difference_threshold,
                                context=f"zo_objective ({spec.name})")
        ct = jnp.asarray(ct, jnp.float32)
        gx = contract_directions(key, ct[:, None] * diffs, estimator=spec,
                                 sample_shape=tuple(x.shape[1:]), chunk_size=chunk_size)
        if loss_args:
            _, vjp_args = jax.vjp(lambda *a: loss_fn(y0, *a), *loss_args)
            g_args = vjp_args(ct.astype(jnp.result_type(loss_fn(y0, *loss_args))))
        else:
            g_args = ()
        return (gx.astype(x.dtype), None, None, *g_args)

    _objective.defvjp(_fwd, _bwd)

    def objective(x, key, *loss_args):
        return _objective(x, key, jnp.asarray(smoothing, jnp.float32), *loss_args)

    objective.num_queries = lambda batch_size: num_queries(spec, batch_size, num_directions) + (
        batch_size if spec.scheme == "central" else 0)
    objective.__doc__ = (
        f"Per-sample black-box loss, differentiable w.r.t. x by {spec.name} estimation "
        f"(q={num_directions}). objective(x, key, *loss_args) -> (B,).")
    return objective


def zo_api(api, *, estimator="sphere-forward", num_directions: int, smoothing,
           chunk_size: Optional[int] = None, on_zero_differences: str = "warn",
           zero_difference_threshold: float = DEFAULT_THRESHOLD) -> Callable:
    """API outputs differentiable w.r.t. the input through an estimated Jacobian (linear chain rule).

    ``outputs(x, key)`` returns ``api(x)`` ``(B, K)`` (``B`` queries). Under ``jax.grad`` the
    backward pass queries ``B * q`` (forward schemes) or ``2 * B * q`` (central) perturbed points and
    returns ``(d / q) sum_j (cotangent . Delta y_j) u_j`` per sample, where
    ``Delta y_j = (y(x + mu u_j) - y(x)) / mu``. Use :func:`zo_objective` instead when the loss is
    strongly nonlinear in the outputs at the scale of ``mu`` (masks, argmax).

    Args:
      api: a :class:`~dfml_jax.api.BlackBoxAPI` returning scores, or a callable
        ``(n, *shape) -> (n, K)``.
      estimator, num_directions, smoothing, chunk_size, on_zero_differences,
      zero_difference_threshold: as in :func:`zo_objective` (the check counts unchanged output
        vectors).

    Returns:
      ``outputs(x, key) -> (B, K)``.
    """
    spec = resolve_estimator(estimator)
    _check_static(num_directions, chunk_size)
    query = _query_fn(api)

    @jax.custom_vjp
    def _outputs(x, key, mu):
        return query(x)

    def _fwd(x, key, mu):
        y0 = query(x)
        return y0, (x, key, mu, y0)

    def _bwd(res, ct):
        x, key, mu, y0 = res
        probe = zo_api_outputs(api, x, key, estimator=spec, num_directions=num_directions,
                               smoothing=mu, chunk_size=chunk_size, outputs=y0,
                               on_zero_differences=on_zero_differences,
                               zero_difference_threshold=zero_difference_threshold)
        w = jnp.einsum("bqk,bk->bq", probe.output_jvps, jnp.asarray(ct, jnp.float32))
        gx = contract_directions(key, w, estimator=spec, sample_shape=tuple(x.shape[1:]),
                                 chunk_size=chunk_size)
        return (gx.astype(x.dtype), None, None)

    _outputs.defvjp(_fwd, _bwd)

    def outputs(x, key):
        return _outputs(x, key, jnp.asarray(smoothing, jnp.float32))

    outputs.num_queries = lambda batch_size: num_queries(spec, batch_size, num_directions) + (
        batch_size if spec.scheme == "central" else 0)
    return outputs
