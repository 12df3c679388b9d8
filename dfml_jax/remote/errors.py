"""Errors of the remote black-box client (:mod:`dfml_jax.remote`).

The public errors are :class:`~dfml_jax.api.BlackBoxError` s, so callers that handle a
black-box failure handle a remote one too; :class:`RemoteAPIError` is the family's base.
The two private exceptions steer the client's retry loop and never leave it.
"""
from __future__ import annotations

from typing import Optional

from dfml_jax.api import BlackBoxError

__all__ = [
    "RemoteAPIError",
    "RemoteAuthError",
    "RemoteRequestTooLarge",
    "RemoteRequestError",
    "RemoteProtocolError",
    "RemoteUnavailable",
]


class RemoteAPIError(BlackBoxError):
    """A remote black-box API failed. Subclasses say how; nothing was charged for the query.

    Attributes:
      url: the endpoint's base URL.
      status: the last HTTP status (None for transport failures).
      attempts: HTTP attempts made for the failing request.
      pending_samples: samples of this query the server answered (and billed) before the failure;
        they are kept in the client's pending cache and delivered without re-buying on retry.
    """

    def __init__(self, message: str, *, url: str = "", status: Optional[int] = None,
                 attempts: int = 0, pending_samples: int = 0):
        super().__init__(message)
        self.url, self.status, self.attempts = url, status, attempts
        self.pending_samples = pending_samples


class RemoteAuthError(RemoteAPIError):
    """The server rejected the API key (HTTP 401/403)."""


class RemoteRequestTooLarge(RemoteAPIError):
    """The server refused a request above its batch limit (HTTP 413).

    Attributes:
      max_batch: the server's limit, when it said.
    """
    max_batch: Optional[int] = None


class RemoteRequestError(RemoteAPIError):
    """The server refused the request (another 4xx: unknown model, wrong input shape, ...)."""


class RemoteProtocolError(RemoteAPIError):
    """The server's answer was malformed: wrong shape or dtype, NaN/inf, truncated body."""


class RemoteUnavailable(RemoteAPIError):
    """The server could not be reached or kept failing (timeouts, refused connections, 5xx)
    after all retries."""


class _Retryable(Exception):
    """Internal: a failure worth retrying.

    ``ambiguous``: the request may have been answered (and billed) although the answer was lost.
    """

    def __init__(self, what: str, status: Optional[int] = None, retry_after: float = 0.0,
                 truncated: bool = False, ambiguous: bool = False):
        super().__init__(what)
        self.what, self.status, self.retry_after = what, status, retry_after
        self.truncated, self.ambiguous = truncated, ambiguous


class _Cancelled(Exception):
    """Internal: another request of the same query failed for good."""

