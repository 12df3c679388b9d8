"""Errors of the black-box API boundary, and how they survive ``jax.jit``.

:class:`BlackBoxError` (a host function failed or answered badly), :class:`QueryBudgetExceeded`
(a request the budget does not cover) and :class:`BlackBoxGradientError` (an attempt to
differentiate through an API). Errors raised inside a host callback under ``jit`` surface from XLA
as ``JaxRuntimeError``; the callback records the original with :func:`record_api_error`, and
:func:`surface_api_errors` (decorator or context manager) re-raises it with its own type.

This is the bottom layer of the API boundary: it imports nothing from the package.

Example:
  >>> try:
  ...     with surface_api_errors():
  ...         raise QueryBudgetExceeded("t", asked=5, answered=8, left=2, budget=10)
  ... except QueryBudgetExceeded as e:
  ...     (e.asked, e.left)
  (5, 2)
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections import deque
from typing import Callable, Optional

import jax

__all__ = [
    "BlackBoxError",
    "BlackBoxGradientError",
    "QueryBudgetExceeded",
    "gradient_refusal",
    "record_api_error",
    "surface_api_errors",
]


class BlackBoxError(RuntimeError):
    """A black-box API failed: the host function raised or returned an invalid answer."""


class BlackBoxGradientError(TypeError):
    """Raised when an algorithm tries to differentiate through a black-box API."""


class QueryBudgetExceeded(RuntimeError):
    """The query budget of an API does not cover a request.

    Attributes:
      api: name of the API.
      asked: samples requested by the refused call or reservation.
      answered: samples answered (charged) so far.
      left: samples still available (budget - answered - reserved by others).
    """

    def __init__(self, api: str, asked: int, answered: int, left: int, budget: int):
        self.api, self.asked, self.answered, self.left, self.budget = api, asked, answered, left, budget
        super().__init__(
            f"query budget of API '{api}' exceeded: asked for {asked} samples, {answered} of the "
            f"budget of {budget} already answered, {left} left. Raise the budget or stop the run "
            "(nothing was answered or charged for this request).")


# Original exceptions raised inside host callbacks, kept so that `surface_api_errors` can re-raise
# them with their real type instead of XLA's JaxRuntimeError.
_PENDING_ERRORS: deque = deque(maxlen=64)
_PENDING_LOCK = threading.Lock()


def record_api_error(err: BaseException) -> None:
    """Remember an error raised inside a host callback so that :func:`surface_api_errors` can
    re-raise it with its own type (for host-side checks outside this module, e.g. estimators)."""
    with _PENDING_LOCK:
        _PENDING_ERRORS.append(err)


def _pop_error() -> Optional[BaseException]:
    with _PENDING_LOCK:
        err = _PENDING_ERRORS.pop() if _PENDING_ERRORS else None
        _PENDING_ERRORS.clear()
        return err


class _SurfaceErrors(contextlib.ContextDecorator):
    def __enter__(self):
        _pop_error()  # forget stale errors from earlier, unrelated failures
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (BlackBoxError, QueryBudgetExceeded)):
            return False
        original = _pop_error()
        if original is not None and isinstance(exc, jax.errors.JaxRuntimeError):
            raise original from exc
        return False


def surface_api_errors(fn: Optional[Callable] = None):
    """Re-raise errors from black-box host callbacks with their original type.

    Use as a decorator (``@surface_api_errors``) or a context manager
    (``with surface_api_errors(): step(...)``) around jitted code that queries APIs.

    Args:
      fn: optional function to decorate.

    Returns:
      The decorated function, or a context manager when ``fn`` is None.
    """
    if fn is None:
        return _SurfaceErrors()
    return functools.wraps(fn)(_SurfaceErrors()(fn))


def gradient_refusal(name: str) -> BlackBoxGradientError:
    """The error to raise when something tries to differentiate through a black-box API.

    Args:
      name: the API's name, for the message.

    Returns:
      A :class:`BlackBoxGradientError` naming the API and the zero-order way out.
    """
    return BlackBoxGradientError(
        f"tried to differentiate through black-box API '{name}'. A black box gives no gradients: "
        "wrap the objective with a zero-order estimator (dfml_jax.estimators.zo_objective / "
        "zo_api_outputs), or jax.lax.stop_gradient the API's input if no gradient through it is "
        "needed.")
