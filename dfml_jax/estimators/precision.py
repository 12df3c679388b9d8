"""Output precision vs smoothing step: detect finite differences that round to zero.

Real APIs round what they return (probabilities to 4 decimals, bf16 logits). When the smoothing step
``mu`` is too small for that precision, ``f(x + mu u) == f(x)`` exactly for every direction and a
zero-order estimate is silently zero (DFME's default ``mu = 1e-3`` does this on probabilities
rounded to 4 decimals). Every estimator in :mod:`dfml_jax.estimators` reports the fraction of
exactly-zero differences and, by default, warns when it reaches a threshold.

Choosing the step. A difference along a unit direction ``u`` is about
``mu * |u . grad f| ~ mu * ||grad f|| / sqrt(d)``; it must be many output quanta ``delta`` (the
rounding step: ``10**-decimals``; ``2**-8 * |y|`` for bf16; ``~1e-7 * |y|`` for fp32) for the estimate
to carry signal::

    smoothing >> delta * sqrt(d) / ||grad f||        (see :func:`smoothing_for_precision`)

Measured at d = 3072 on a CNN (``../shared/specs/zo_estimators.md`` section 4.2): fp32 outputs work
for any ``mu >= 1e-4`` (``1e-5`` and below collapse); probabilities rounded to 4 decimals need
``mu ~ 0.3 .. 1`` (``mu = 1e-3`` gives exactly 0); 2 decimals need ``mu ~ 10``; bf16 outputs need
``mu >= 1``. Larger steps smooth the objective (bias of order ``mu * curvature``), so take the smallest
step whose zero-difference fraction is ~0 and whose differences span many quanta.

Re-measured with this module (random-init Conv4 API, 32x32x3, CE of the revealed probabilities,
sphere-forward, q = 100, 16 samples; mean cosine to the true gradient / zero-difference fraction;
the ideal is 0.177):

==============  ============  ============  ============  ============  ============
smoothing       1e-3          1e-2          0.1           0.3           1
==============  ============  ============  ============  ============  ============
fp32 probs      0.172 / 0.01  0.171 / 0.00  0.169 / 0.00  0.164 / 0.00  0.146 / 0.00
4 decimals      0.004 / 1.00  0.024 / 0.94  0.139 / 0.57  0.160 / 0.22  0.146 / 0.07
2 decimals      0.000 / 1.00  0.000 / 1.00  0.000 / 1.00  0.000 / 1.00  0.001 / 1.00
==============  ============  ============  ============  ============  ============

(2 decimals reach only 0.025 at ``mu = 3 .. 10`` with this network, whose curvature already costs
a third of the cosine at ``mu = 3`` in fp32.) The default warning threshold (half of the
differences exactly zero) fires at ``mu <= 0.1`` for 4 decimals and everywhere for 2 decimals.
"""
from __future__ import annotations

import math
import warnings
import jax
import jax.numpy as jnp

from dfml_jax.api import record_api_error

__all__ = [
    "ZERO_DIFFERENCE_ACTIONS",
    "ZeroDifferenceError",
    "ZeroDifferenceWarning",
    "check_zero_differences",
    "report_zero_differences",
    "smoothing_for_precision",
    "zero_difference_fraction",
]

ZERO_DIFFERENCE_ACTIONS = ("ignore", "warn", "raise")
DEFAULT_THRESHOLD = 0.5


class ZeroDifferenceError(FloatingPointError):
    """Too many finite differences were exactly zero: the smoothing step is below output precision."""


class ZeroDifferenceWarning(RuntimeWarning):
    """Warning category for finite differences that round to zero (see :class:`ZeroDifferenceError`)."""


def zero_difference_fraction(differences: jax.Array, axis=None) -> jax.Array:
    """Fraction of finite differences that are exactly zero.

    Args:
      differences: raw differences ``f(x + mu u) - f(x)`` (any shape).
      axis: axes to average over (None: all).

    Returns:
      float32 fraction(s) in ``[0, 1]``.

    Example:
      >>> float(zero_difference_fraction(jnp.array([0.0, 1e-3, 0.0, 2.0])))
      0.5
    """
    return jnp.mean((jnp.asarray(differences) == 0).astype(jnp.float32), axis=axis)


def _message(fraction: float, smoothing, context: str) -> str:
    mu = "?" if smoothing is None else f"{float(smoothing):.3g}"
    where = f" in {context}" if context else ""
    return (
        f"zero-order estimate{where}: {fraction:.0%} of the finite differences are exactly zero at "
        f"smoothing={mu}. The step is below the output precision of the black box (rounded "
        "probabilities, bf16 or flat outputs), so the gradient estimate is mostly or entirely zero. "
        "Increase `smoothing` until differences span many output quanta: smoothing >> "
        "quantum * sqrt(d) / ||grad f|| (typically fp32 outputs 1e-3..1e-1, probabilities rounded to "
        "4 decimals 0.3..1, bf16 >= 1, 2 decimals ~10; see dfml_jax.estimators.precision). "
        "Hard-label APIs give no differences at all: use a label-only method instead.")


def check_zero_differences(fraction, *, threshold: float = DEFAULT_THRESHOLD, action: str = "warn",
                           smoothing=None, context: str = "") -> bool:
    """Host-side check of a zero-difference fraction: warn or raise when it reaches ``threshold``.

    Call it on the ``zero_difference_fraction`` an estimator returned (outside ``jit``), or let the
    estimators call it in-graph with ``on_zero_differences=``.

    Args:
      fraction: the fraction of exactly-zero differences (scalar; an array is reduced with max).
      threshold: trigger when ``fraction >= threshold``.
      action: ``"ignore"``, ``"warn"`` (:class:`ZeroDifferenceWarning`) or ``"raise"``
        (:class:`ZeroDifferenceError`).
      smoothing: the step used, for the message.
      context: what was estimated, for the message.

    Returns:
      True when the check triggered (and did not raise).

    Raises:
      ZeroDifferenceError: with ``action="raise"`` when triggered.
    """
    if action not in ZERO_DIFFERENCE_ACTIONS:
        raise ValueError(f"on_zero_differences must be one of {ZERO_DIFFERENCE_ACTIONS}, got {action!r}")
    frac = float(jnp.max(jnp.asarray(fraction)))
    if action == "ignore" or not frac >= threshold:
        return False
    if smoothing is not None:
        smoothing = float(jnp.max(jnp.asarray(smoothing)))
    msg = _message(frac, smoothing, context)
    if action == "raise":
        raise ZeroDifferenceError(msg)
    warnings.warn(msg, ZeroDifferenceWarning, stacklevel=3)
    return True


def report_zero_differences(fraction: jax.Array, smoothing, *, action: str = "warn",
                            threshold: float = DEFAULT_THRESHOLD, context: str = "") -> None:
    """In-graph version of :func:`check_zero_differences` (a ``jax.debug.callback``).

    Works under ``jit``, ``vmap`` and ``scan``. With ``action="raise"`` the error surfaces from XLA
    as ``JaxRuntimeError``; inside :func:`dfml_jax.api.surface_api_errors` it is re-raised as
    :class:`ZeroDifferenceError`. ``action="ignore"`` adds nothing to the graph.
    """
    if action not in ZERO_DIFFERENCE_ACTIONS:
        raise ValueError(f"on_zero_differences must be one of {ZERO_DIFFERENCE_ACTIONS}, got {action!r}")
    if action == "ignore":
        return

    def host(frac, mu):
        try:
            check_zero_differences(frac, threshold=threshold, action=action, smoothing=mu,
                                   context=context)
        except ZeroDifferenceError as e:
            record_api_error(e)   # so that surface_api_errors re-raises the original type
            raise

    jax.debug.callback(host, fraction, jnp.asarray(smoothing, jnp.float32))


def smoothing_for_precision(output_quantum: float, dim: int, grad_norm: float = 1.0,
                            factor: float = 30.0) -> float:
    """A smoothing step large enough for outputs quantised to ``output_quantum``.

    Returns ``factor * output_quantum * sqrt(dim) / grad_norm``: the step at which a typical
    difference along a random unit direction spans about ``factor`` quanta. ``grad_norm`` is the
    (rough) norm of the objective's gradient w.r.t. the input; 1 is a reasonable guess for losses of
    logits/probabilities of image classifiers with inputs of order 1.

    Args:
      output_quantum: rounding step of the outputs (``10**-decimals``; ``2**-8 * |y|`` for bf16).
      dim: input dimension d.
      grad_norm: expected gradient norm of the objective.
      factor: how many quanta a typical difference should span.

    Returns:
      The suggested smoothing (a Python float).

    Example:
      >>> round(smoothing_for_precision(1e-4, 3072), 3)   # probabilities rounded to 4 decimals
      0.166
    """
    return float(factor * output_quantum * math.sqrt(dim) / grad_norm)
