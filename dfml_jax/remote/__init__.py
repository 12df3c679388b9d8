"""Remote black-box APIs over the Open Inference Protocol (KServe v2 / Triton HTTP): the client.

Any server that speaks the Open Inference Protocol (OIP) REST API is a teacher: NVIDIA Triton, a
KServe ``ModelServer`` (``kserve.Model``), Seldon MLServer, or this project's own server
(``python -m dfml_jax.serve``, :mod:`dfml_jax.serve`).
:func:`from_http` wraps an :class:`OIPClient` exactly as
:meth:`~dfml_jax.api.BlackBoxAPI.from_host` wraps any host function: inside ``jit`` / ``vmap``
a query is one ``pure_callback``, and the ledger charges answered samples only.

What the client uses of the protocol
  ``GET /v2/health/ready`` (readiness), ``GET /v2/models/{model}`` (model metadata: the input's
  name, datatype and shape ``[-1, *input_shape]``, the output's name, datatype and shape),
  ``GET /v2/models/{model}/config`` (optional, Triton's model-configuration extension:
  ``max_batch_size``, and the public teacher record of a ``dfml_jax.serve`` server in
  ``parameters["dfml_jax"]``), ``POST /v2/models/{model}/infer`` with the binary tensor data
  extension (a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
  little-endian tensor bytes, answers requested binary too) or plain JSON tensors
  (``binary=False``, or automatically when a server refuses binary requests), and
  ``GET /v2/models/{model}/stats`` (Triton's statistics extension: ``inference_count`` is the
  number of answered samples, i.e. the provider's bill) when the server has it.

Client behaviour (:class:`OIPClient`)
  * HTTP is `httpx <https://www.python-httpx.org>`_ (one pooled, keep-alive ``httpx.Client``,
    at most ``concurrency`` connections); retries are `tenacity <https://tenacity.readthedocs.io>`_
    with capped exponential backoff and full jitter (a delay drawn in
    ``[0, min(max_backoff, backoff * 2**attempt)]``, at least the server's ``Retry-After``).
  * A query of ``n`` samples is split into requests of at most ``max_batch`` (the server's
    ``max_batch_size``, or the caller's), sent concurrently by at most ``concurrency`` threads.
  * Timeouts, connection failures, truncated bodies and HTTP 429/5xx are retried at most
    ``max_retries`` times per request; then the whole query fails with :class:`RemoteUnavailable`
    (or :class:`RemoteProtocolError` for a body that stayed truncated). Wrong key (401/403),
    oversize request (413), an unknown model (404), other 4xx and malformed answers (wrong shape
    or dtype, NaN/inf, labels out of range) fail at once with their own error type: retrying
    cannot fix them.
  * **Lost answers are billed again.** OIP has no idempotency key: when a request reached the
    server and the server answered, but the answer was lost (read timeout, connection cut,
    truncated body), a real provider (Triton behind a metering proxy, a KServe deployment billed
    per inference, a cloud endpoint) bills the retried request as a new inference. The client
    cannot know whether the lost attempt was answered, so it counts such *ambiguous retries*:
    ``counters["ambiguous_retries"]`` (requests) and ``counters["ambiguous_samples"]`` (samples
    possibly billed twice). The ledger never counts them (the algorithm received each sample
    once); compare ``ledger.answered + ambiguous_samples`` with the provider's bill.
    Retries after a refused connection, a connect timeout or an HTTP error status are not
    ambiguous (the server did not answer).
  * A query never returns a partial batch. **Billing on failure:** when some requests of a query
    were answered (and billed by the server) but another failed for good, the query raises and the
    ledger is not charged (the algorithm received nothing); the answered chunks are kept in the
    client's *pending cache*, keyed by a SHA-256 of the teacher and the chunk's bytes. When the
    caller retries the same query (a rerun of the failed step, a resumed run), those chunks are
    delivered from the cache without being bought again, and only then charged. So once every
    failed query has been retried, the ledger equals the server's count of answered samples,
    ambiguous retries aside (``ledger.answered + client.pending_samples == server answered`` at
    all times within a process). With ``cache_dir`` the pending cache is also written to disk, so
    a resume in a new process (after a crash, with the server restarted) re-buys nothing either.
    Only chunks of failed queries are cached: a successful query is never served from the cache,
    so asking the same images twice is two purchases, as with any API.

Endpoints are named by a base URL and a model name: ``OIPClient("http://host:8000",
model="resnet")``, or one URL ``"http://host:8000/v2/models/resnet"`` (see
:func:`parse_endpoint`; this form is what ``--api-url`` / ``--pool-urls`` take).

Modules
  :mod:`~dfml_jax.remote.wire` (protocol constants, endpoint URLs, request/answer encoding),
  :mod:`~dfml_jax.remote.errors` (the :class:`RemoteAPIError` family),
  :mod:`~dfml_jax.remote.pending` (the pending cache), :mod:`~dfml_jax.remote.client`
  (:class:`OIPClient`), :mod:`~dfml_jax.remote.api` (:func:`from_http`,
  :func:`remote_api_factory`, :func:`load_remote_pool`). Every public name is importable from
  ``dfml_jax.remote``.

Example (a server in this process; see :mod:`dfml_jax.serve`):
  >>> import numpy as np
  >>> from dfml_jax.serve import TeacherServer
  >>> w = np.arange(12, dtype=np.float32).reshape(4, 3)
  >>> with TeacherServer(lambda x: x.reshape(len(x), -1) @ w, (2, 2, 1), 3, max_batch=2,
  ...                    name="lin") as srv:
  ...     api = from_http(srv.url, model="lin", output="label")
  ...     labels = api(np.ones((5, 2, 2, 1), np.float32))
  ...     answered = srv.stats()["answered_samples"]
  ...     api.remote.close()
  >>> labels.tolist(), api.queries, answered
  ([2, 2, 2, 2, 2], 5, 5)
"""
from dfml_jax.remote.api import from_http, http_api_kwargs, load_remote_pool, remote_api_factory
from dfml_jax.remote.client import OIPClient
from dfml_jax.remote.errors import (RemoteAPIError, RemoteAuthError, RemoteProtocolError,
                                    RemoteRequestError, RemoteRequestTooLarge, RemoteUnavailable)
from dfml_jax.remote.wire import (CONFIG_PARAMETER, OIP_DTYPES, SERVER_OUTPUTS,
                                  decode_infer_response, encode_infer_request, parse_endpoint)

__all__ = [
    "SERVER_OUTPUTS",
    "CONFIG_PARAMETER",
    "OIP_DTYPES",
    "RemoteAPIError",
    "RemoteAuthError",
    "RemoteRequestTooLarge",
    "RemoteRequestError",
    "RemoteProtocolError",
    "RemoteUnavailable",
    "OIPClient",
    "parse_endpoint",
    "encode_infer_request",
    "decode_infer_response",
    "http_api_kwargs",
    "from_http",
    "remote_api_factory",
    "load_remote_pool",
]
