"""The black-box API boundary: the one object through which algorithms reach a teacher.

A :class:`BlackBoxAPI` answers batches of images with scores (logits, probabilities, top-k
probabilities or hard labels). It exposes no parameters and no gradients; every answered sample is
counted on the host by a thread-safe :class:`QueryLedger`, optionally against a budget.

Constructors:

* :meth:`BlackBoxAPI.from_host` wraps any host callable (NumPy, PyTorch, an HTTP client) mapping a
  ``(n, *input_shape)`` float32 batch to ``(n, num_classes)`` scores. Inside ``jax.jit`` it is a
  ``jax.pure_callback(..., vmap_method="expand_dims")``, so a vmapped (even nested) batch of queries
  is ONE host call.
* :func:`dfml_jax.remote.from_http` reaches a model served over the Open Inference Protocol
  (Triton, KServe, MLServer, ``python -m dfml_jax.serve``) through the same host path, with
  batching, bounded retries and pending-answer caching (:mod:`dfml_jax.remote` sits above this
  package and depends on it, never the reverse).
* :meth:`BlackBoxAPI.from_jax` is the in-graph fast path for simulated teachers: the teacher's
  forward pass is compiled into the caller's graph and only the final ``(n, K)`` outputs pass through
  a tiny host callback that charges the ledger (so counting is identical to the host path).

Differentiating through an API raises :class:`BlackBoxGradientError` at trace time: use a
zero-order estimator (``dfml_jax.estimators.zo_objective`` / ``zo_api_outputs``) instead.

Errors raised inside a host callback under ``jit`` surface from XLA as ``JaxRuntimeError``; wrap
the call in :func:`surface_api_errors` (decorator or context manager) to get the original
exception back (``QueryBudgetExceeded``, ``BlackBoxError``...). Eager calls raise it directly.

The package is split by idea (each module imports only the ones above it); every public name is
importable from here:

* :mod:`dfml_jax.api.errors`: the errors, :func:`surface_api_errors`, :func:`record_api_error`
  (the bottom layer: it imports nothing from the package),
* :mod:`dfml_jax.api.ledger`: the :class:`QueryLedger`,
* :mod:`dfml_jax.api.outputs`: :data:`OUTPUT_MODES` and :func:`scores_to_outputs`,
* :mod:`dfml_jax.api.blackbox`: the :class:`BlackBoxAPI`,
* :mod:`dfml_jax.api.group`: :class:`APIGroup` and :func:`group_apis` (many APIs, one graph),
* :mod:`dfml_jax.api.pool`: the pool type :class:`APIPool` (many APIs and their records), built by
  :mod:`dfml_jax.teachers` from disk and by :mod:`dfml_jax.remote` over HTTP.

Example:
  >>> import numpy as np, jax.numpy as jnp
  >>> api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1)[:, :3] * 2.0,
  ...                             input_shape=(2, 2, 1), num_classes=3, output="label", budget=10)
  >>> api(jnp.ones((4, 2, 2, 1))).shape, api.queries
  ((4,), 4)
"""
from dfml_jax.api.blackbox import BlackBoxAPI
from dfml_jax.api.errors import (BlackBoxError, BlackBoxGradientError, QueryBudgetExceeded,
                                 record_api_error, surface_api_errors)
from dfml_jax.api.group import APIGroup, group_apis
from dfml_jax.api.ledger import QueryLedger
from dfml_jax.api.outputs import OUTPUT_MODES, scores_to_outputs
from dfml_jax.api.pool import INPUT_SPACES, APIPool, PoolError, WhiteBoxTeacher, format_summary

__all__ = [
    "APIGroup",
    "group_apis",
    "BlackBoxAPI",
    "BlackBoxError",
    "BlackBoxGradientError",
    "OUTPUT_MODES",
    "QueryBudgetExceeded",
    "QueryLedger",
    "record_api_error",
    "scores_to_outputs",
    "surface_api_errors",
    "APIPool",
    "PoolError",
    "WhiteBoxTeacher",
    "INPUT_SPACES",
    "format_summary",
]
