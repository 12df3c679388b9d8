"""Zero-order gradient estimators for black-box objectives: pure, vmapped, chunked.

Three levels, one set of directions (regenerated from a PRNG key, never stored):

* Scalar objectives -- the ``ESTIMATORS`` registry, uniform contract
  ``grad, num_queries = ESTIMATORS[name](f, x, key, *, num_directions, smoothing, chunk_size=None)``
  for a per-sample objective ``f: (B, *shape) -> (B,)`` (:mod:`.core`); :func:`zo_gradient` returns
  the same estimate with diagnostics (:class:`ZOGradient`).
* Query once, reuse for every loss -- :func:`zo_api_outputs` probes the API's outputs around ``x``
  (:class:`ZOProbe`), :func:`probe_grad` / :func:`probe_vjp` turn any loss of the outputs into a
  gradient estimate without new queries (:mod:`.api_side`).
* Differentiable black boxes -- :func:`zo_objective` / :func:`zo_api` are ``jax.custom_vjp``
  wrappers: ``jax.grad`` of ``loss(api, G(w, z))`` flows through ``G`` exactly and through the API by
  estimation (:mod:`.vjp`).

Dimension-reduced directions for images (:mod:`.subspace`): :func:`zo_gradient_lowres` draws the
directions at ``r x r`` per channel and upsamples them (AutoZOOM): same queries, a ``d' = r*r*C``
search space, an estimate of the projected gradient (a departure from DFME / BiDf-MKD).

Precision diagnostics (:mod:`.precision`): every path reports the fraction of finite differences
that are exactly zero (smoothing step below the API's output precision) and warns or raises.

Registry names: ``"{family}-{scheme}"`` with family in sphere, gaussian, rademacher, orthogonal,
coordinate and scheme in forward (``q + 1`` queries per sample), central (``2q``).
"""
from .api_side import ZOProbe, probe_differences, probe_grad, probe_vjp, zo_api_outputs
from .core import (ESTIMATOR_SPECS, ESTIMATORS, EstimatorSpec, ZOGradient, contract_directions,
                   coordinate_central, gaussian_central, gaussian_forward, num_queries,
                   orthogonal_central, resolve_estimator, sphere_forward, zo_gradient)
from .directions import DIRECTION_FAMILIES, DirectionFamily, sample_directions
from .precision import (ZeroDifferenceError, ZeroDifferenceWarning, check_zero_differences,
                        report_zero_differences, smoothing_for_precision, zero_difference_fraction)
from .subspace import UPSAMPLE_METHODS, upsample, zo_gradient_lowres
from .vjp import zo_api, zo_objective

__all__ = [
    "DIRECTION_FAMILIES",
    "DirectionFamily",
    "UPSAMPLE_METHODS",
    "ESTIMATORS",
    "ESTIMATOR_SPECS",
    "EstimatorSpec",
    "ZOGradient",
    "ZOProbe",
    "ZeroDifferenceError",
    "ZeroDifferenceWarning",
    "check_zero_differences",
    "contract_directions",
    "coordinate_central",
    "gaussian_central",
    "gaussian_forward",
    "num_queries",
    "orthogonal_central",
    "probe_differences",
    "probe_grad",
    "probe_vjp",
    "report_zero_differences",
    "resolve_estimator",
    "sample_directions",
    "smoothing_for_precision",
    "sphere_forward",
    "upsample",
    "zero_difference_fraction",
    "zo_api",
    "zo_api_outputs",
    "zo_gradient",
    "zo_gradient_lowres",
    "zo_objective",
]
