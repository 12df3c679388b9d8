"""Remote black-box APIs over the Open Inference Protocol (KServe v2 / Triton HTTP): the client.

Any server that speaks the Open Inference Protocol (OIP) REST API is a teacher: NVIDIA Triton, a
KServe ``ModelServer`` (``kserve.Model``), Seldon MLServer, or this project's own server
(``python -m dfml_jax.serve``, :mod:`dfml_jax.serve`).
:func:`from_http` wraps an :class:`OIPClient` exactly as
:meth:`~dfml_jax.blackbox.BlackBoxAPI.from_host` wraps any host function: inside ``jit`` / ``vmap``
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
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import os
import tempfile
import threading
import urllib.parse
import uuid
from typing import Dict, Mapping, Optional, Sequence, Tuple

import httpx
import numpy as np
import tenacity

from dfml_jax.blackbox import BlackBoxAPI, BlackBoxError
from dfml_jax.pool import APIPool

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

#: What a server can answer: scores as logits, probabilities or top-k probabilities, or labels.
SERVER_OUTPUTS = ("logits", "probs", "topk", "label")
#: Key of the public teacher record in a ``dfml_jax.serve`` model configuration's ``parameters``.
CONFIG_PARAMETER = "dfml_jax"
#: OIP tensor datatypes and their little-endian NumPy dtypes.
OIP_DTYPES = {"FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
              "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
              "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
              "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "BOOL": np.dtype("?")}
_HEADER_LENGTH = "Inference-Header-Content-Length"
_RETRY_STATUS = (429, 500, 502, 503, 504)
_DEFAULT_MAX_BATCH = 64


# ----------------------------------------------------------------------------- errors
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


# ----------------------------------------------------------------------------- wire format
def parse_endpoint(url: str, model: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """Split an OIP endpoint into its base URL and model name.

    Args:
      url: ``http://host:port`` (with ``model``), or ``http://host:port/v2/models/NAME`` (optionally
        ``/versions/V``, ignored), or ``http://host:port/prefix`` for a server behind a path
        prefix.
      model: the model name; overrides one in the URL.

    Returns:
      ``(base_url, model)``; ``model`` is None when neither names it.

    Raises:
      ValueError: not an ``http(s)://host[:port]`` URL.
    """
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"an OIP endpoint must look like http://HOST:PORT or "
                         f"http://HOST:PORT/v2/models/NAME, got {url!r}")
    path = parsed.path.rstrip("/")
    named = None
    if "/v2/models/" in path:
        path, rest = path.split("/v2/models/", 1)
        named = rest.split("/")[0] or None
    elif path.endswith("/v2"):
        path = path[:-3]
    base = f"{parsed.scheme}://{parsed.netloc}{path}"
    return base, (model or named)


def encode_infer_request(x: np.ndarray, input_name: str, *, output_name: Optional[str] = None,
                         binary: bool = True, request_id: str = "") -> Tuple[bytes, Dict[str, str]]:
    """Encode one OIP v2 inference request for a float32 batch.

    Args:
      x: the batch (cast to float32, sent as ``FP32``).
      input_name: the model's input name (from its metadata).
      output_name: the output to ask for (None: all outputs).
      binary: use the binary tensor data extension (raw bytes after a JSON header) and ask for
        binary answers; False: JSON ``data`` lists both ways.
      request_id: the request ``id`` (echoed by the server).

    Returns:
      ``(body, headers)``: the request body and its ``Content-Type`` (and, for binary,
      ``Inference-Header-Content-Length``) headers.
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=OIP_DTYPES["FP32"]))
    tensor = {"name": input_name, "shape": [int(s) for s in x.shape], "datatype": "FP32"}
    head: Dict = {"id": request_id} if request_id else {}
    if binary:
        raw = x.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head["inputs"] = [tensor]
        head["parameters"] = {"binary_data_output": True}
        if output_name:
            head["outputs"] = [{"name": output_name, "parameters": {"binary_data": True}}]
        js = json.dumps(head, separators=(",", ":")).encode()
        return js + raw, {"Content-Type": "application/octet-stream",
                          _HEADER_LENGTH: str(len(js))}
    tensor["data"] = x.ravel().tolist()
    head["inputs"] = [tensor]
    if output_name:
        head["outputs"] = [{"name": output_name, "parameters": {"binary_data": False}}]
    return json.dumps(head, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def decode_infer_response(body: bytes, headers: Mapping[str, str],
                          output_name: Optional[str] = None) -> np.ndarray:
    """Decode one output tensor of an OIP v2 inference response (binary extension or JSON).

    Args:
      body: the response body.
      headers: the response headers (``Inference-Header-Content-Length`` compared
        case-insensitively; absent: the whole body is JSON).
      output_name: the output to return (None: the only output).

    Returns:
      The tensor as a NumPy array of its datatype (a writable copy).

    Raises:
      ValueError: bad JSON header, missing output, unknown datatype, or data whose length does not
        match the tensor's shape (e.g. a truncated body), with the numbers in the message.
    """
    h = {k.lower(): v for k, v in headers.items()}
    hl = h.get(_HEADER_LENGTH.lower())
    try:
        json_len = len(body) if hl is None else int(hl)
    except ValueError:
        raise ValueError(f"{_HEADER_LENGTH} {hl!r} is not an integer")
    if not 0 <= json_len <= len(body):
        raise ValueError(f"{_HEADER_LENGTH} is {json_len} but the body has only {len(body)} bytes "
                         "(truncated body)")
    try:
        head = json.loads(body[:json_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"the response header is not JSON ({e}); truncated or not an OIP answer")
    outputs = head.get("outputs") if isinstance(head, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise ValueError(f"the response has no 'outputs' list (got keys "
                         f"{sorted(head) if isinstance(head, dict) else type(head).__name__})")
    offset, chosen, chosen_off = json_len, None, None
    for out in outputs:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if output_name is None or out.get("name") == output_name:
            if chosen is None:
                chosen, chosen_off = out, offset
        if size is not None:
            offset += int(size)
    if chosen is None:
        raise ValueError(f"the response has no output named {output_name!r} (outputs: "
                         f"{[o.get('name') for o in outputs]})")
    if output_name is None and len(outputs) > 1:
        raise ValueError(f"the response has {len(outputs)} outputs "
                         f"{[o.get('name') for o in outputs]}; name the one to use")
    dt_name = chosen.get("datatype")
    if dt_name not in OIP_DTYPES:
        raise ValueError(f"output datatype {dt_name!r} is not a numeric OIP datatype "
                         f"({sorted(OIP_DTYPES)})")
    try:
        shape = tuple(int(s) for s in chosen.get("shape"))
    except (TypeError, ValueError):
        raise ValueError(f"output shape {chosen.get('shape')!r} is not a list of integers")
    if any(s < 0 for s in shape):
        raise ValueError(f"output shape {shape} has a negative dimension")
    dt = OIP_DTYPES[dt_name]
    count = int(np.prod(shape, dtype=np.int64))
    size = (chosen.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        size = int(size)
        raw = body[chosen_off:chosen_off + size]
        if size != count * dt.itemsize or len(raw) != size:
            raise ValueError(f"output '{chosen.get('name')}' has {len(raw)} binary bytes "
                             f"(announced {size}) but shape {shape} and datatype {dt_name} need "
                             f"{count * dt.itemsize} (truncated or corrupted body)")
        return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    data = chosen.get("data")
    if data is None:
        raise ValueError(f"output '{chosen.get('name')}' has neither 'data' nor binary data")
    try:
        arr = np.asarray(data, dtype=dt).ravel()
    except (TypeError, ValueError) as e:
        raise ValueError(f"output '{chosen.get('name')}' data is not {dt_name} numbers ({e})")
    if arr.size != count:
        raise ValueError(f"output '{chosen.get('name')}' has {arr.size} values but shape {shape} "
                         f"needs {count}")
    return arr.reshape(shape)


def _error_text(data: bytes) -> str:
    try:
        msg = json.loads(data.decode("utf-8"))
        if isinstance(msg, dict):
            return str(msg.get("error", msg.get("detail", msg)))
        return str(msg)
    except Exception:
        return data[:200].decode("utf-8", "replace")


# ----------------------------------------------------------------------------- client
class OIPClient:
    """Host-side client of one OIP model: a callable ``(n, *input_shape) -> (n, K)`` scores.

    Use it through :func:`from_http` (which adds the ledger, output
    modes and the jit/vmap path); see the module docstring for the retry, billing and cache rules.

    Args:
      url: base URL of the server (``http://127.0.0.1:8000``) or a model URL
        (``http://127.0.0.1:8000/v2/models/NAME``).
      model: the model name (None: from the URL, else the server's only model).
      api_key: sent as ``Authorization: Bearer KEY`` (None: no header).
      timeout: seconds allowed for connecting and for each read of a request.
      max_retries: retries per request after the first attempt (timeouts, connection errors,
        truncated bodies, 429/5xx).
      backoff: scale of the first retry delay in seconds (doubles with every retry, jittered).
      max_backoff: cap on one retry delay in seconds.
      concurrency: most requests (and connections) in flight at once for one query.
      max_batch: samples per request (None: the server's ``max_batch_size`` from the model
        configuration, else 64).
      cache_dir: directory for the on-disk pending cache (None: in memory only).
      name: name used in error messages (default: ``model@host:port``).
      binary: use the binary tensor data extension (False: JSON tensors). A server that refuses
        binary requests (HTTP 400/415/501 on the first one) is switched to JSON automatically.
      input_shape: shape of one sample, for a server whose metadata does not say.
      num_classes: number of classes, for a label server whose metadata does not say.
      server_output: what the model answers (``"logits"``, ``"probs"``, ``"topk"``,
        ``"label"``) when its configuration does not say (default: labels for an integer output,
        else logits).

    Raises:
      ValueError: a malformed URL or option.
    """

    def __init__(self, url: str, *, model: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = 10.0, max_retries: int = 4, backoff: float = 0.05,
                 max_backoff: float = 2.0, concurrency: int = 4, max_batch: Optional[int] = None,
                 cache_dir: Optional[str] = None, name: Optional[str] = None,
                 binary: bool = True, input_shape: Optional[Sequence[int]] = None,
                 num_classes: Optional[int] = None, server_output: Optional[str] = None):
        self.url, self.model = parse_endpoint(url, model)
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_backoff < 0 or concurrency < 1:
            raise ValueError("need timeout > 0, max_retries >= 0, backoff >= 0, max_backoff >= 0 "
                             f"and concurrency >= 1 (got {timeout}, {max_retries}, {backoff}, "
                             f"{max_backoff}, {concurrency})")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if server_output is not None and server_output not in SERVER_OUTPUTS:
            raise ValueError(f"server_output must be one of {SERVER_OUTPUTS}, got "
                             f"{server_output!r}")
        self.api_key = api_key
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.concurrency = int(concurrency)
        self.binary = bool(binary)
        self._user_max_batch = max_batch
        self._hint_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self._hint_k = None if num_classes is None else int(num_classes)
        self._hint_output = server_output
        self.cache_dir = cache_dir
        self._name = name
        self._lock = threading.Lock()
        self._http: Optional[httpx.Client] = None
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._pending: Dict[str, np.ndarray] = {}
        self._client_id = uuid.uuid4().hex[:12]
        self._calls = itertools.count()
        self._info: Optional[dict] = None
        self.counters = {"queries": 0, "failed_queries": 0, "requests": 0, "retries": 0,
                         "ambiguous_retries": 0, "ambiguous_samples": 0, "answered_samples": 0,
                         "cached_samples": 0}
        self._disk_keys: set = set()   # pending chunks on disk (from this or an earlier process)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            self._disk_keys = {f[len("pending-"):-len(".npy")] for f in os.listdir(cache_dir)
                               if f.startswith("pending-") and f.endswith(".npy")}

    # ------------------------------------------------------------------ public
    @property
    def name(self) -> str:
        if self._name:
            return self._name
        host = urllib.parse.urlsplit(self.url).netloc
        return f"{self.model}@{host}" if self.model else self.url

    def info(self, refresh: bool = False) -> dict:
        """What the client knows of the model (fetched once, with retries).

        Reads readiness, the model metadata and, when the server has it, the model configuration.

        Returns:
          A dict with ``name`` (the model), ``input_name``, ``output_name``, ``input_shape``,
          ``num_classes``, ``output`` (one of :data:`SERVER_OUTPUTS`), ``output_dtype``,
          ``max_batch`` (None: unknown), ``decimals``, and the public teacher record a
          ``dfml_jax.serve`` server publishes (``classes``, ``mean``, ``std``, ``input_space``,
          ``dataset``, ``arch``, ...).

        Raises:
          RemoteAPIError: the server is not ready, the model is unknown, or the key is rejected.
          ValueError: the metadata does not give the input shape or number of classes and the
            client was not told them.
        """
        if self._info is None or refresh:
            self._get_json("/v2/health/ready", "the readiness check")
            if self.model is None:
                self.model = self._only_model()
            meta = self._get_json(f"/v2/models/{self.model}", "the model metadata")
            config = self._get_json(f"/v2/models/{self.model}/config", "the model configuration",
                                    missing_ok=True) or {}
            self._info = self._describe(meta, config)
        return self._info

    def stats(self) -> dict:
        """The server's bill: ``GET /v2/models/{model}/stats`` (Triton's statistics extension).

        Returns:
          ``{"answered_samples": inference_count, "answered_requests": execution_count}`` plus
          any counters the server adds (a ``dfml_jax.serve`` server: injected failures, rejected
          keys, ...).

        Raises:
          RemoteRequestError: the server has no statistics endpoint (HTTP 404).
        """
        self.info()
        try:
            st = self._get_json(f"/v2/models/{self.model}/stats", "the model statistics")
        except RemoteRequestError as e:
            if e.status != 404:
                raise
            raise RemoteRequestError(
                f"{self.url} has no statistics endpoint (GET /v2/models/{self.model}/stats: HTTP "
                "404); the bill is only known to the provider (Triton and dfml_jax.serve have "
                "it).", url=self.url, status=404) from e
        try:
            ms = st["model_stats"][0]
        except (KeyError, IndexError, TypeError):
            raise RemoteProtocolError(f"{self.url}/v2/models/{self.model}/stats has no "
                                      "model_stats entry", url=self.url)
        out = {"answered_samples": int(ms.get("inference_count", 0)),
               "answered_requests": int(ms.get("execution_count", 0))}
        out.update(ms.get(CONFIG_PARAMETER) or {})
        return out

    @property
    def max_batch(self) -> int:
        """Samples per request: ``max_batch`` if given, else the server's limit (else 64)."""
        return int(self._user_max_batch or self.info()["max_batch"] or _DEFAULT_MAX_BATCH)

    @property
    def num_classes(self) -> int:
        return int(self.info()["num_classes"])

    @property
    def server_output(self) -> str:
        return self.info()["output"]

    @property
    def pending_samples(self) -> int:
        """Samples answered (billed) by the server for failed queries, not yet delivered."""
        with self._lock:
            return int(sum(len(v) for v in self._pending.values()))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Answer a batch: ``(n, *input_shape)`` float32 -> ``(n, K)`` float32 scores.

        A label server's answers come back one-hot (the API then reveals their argmax).

        Args:
          x: the batch.

        Returns:
          The scores, in input order.

        Raises:
          RemoteAuthError, RemoteRequestTooLarge, RemoteRequestError, RemoteProtocolError,
          RemoteUnavailable: see the module docstring. Nothing is returned partially.
        """
        x = np.ascontiguousarray(np.asarray(x, np.float32))
        n = len(x)
        info = self.info()
        k = int(info["num_classes"])
        if n == 0:
            return np.zeros((0, k), np.float32)
        mb = self.max_batch
        bounds = [(s, min(s + mb, n)) for s in range(0, n, mb)]
        call = next(self._calls)
        # Content keys are only needed while answers are pending (hashing costs ~1 ms/MB).
        keys = ([self._cache_key(x[s:e]) for s, e in bounds] if self._has_pending() else None)
        answers: Dict[int, np.ndarray] = {}
        from_cache = []
        for i, key in enumerate(keys or ()):
            hit = self._take_pending(key)
            if hit is not None:
                answers[i] = hit
                from_cache.append(i)
        todo = [i for i in range(len(bounds)) if i not in answers]
        cancel = threading.Event()
        error: Optional[BaseException] = None
        if todo:
            if len(todo) == 1 or self.concurrency == 1:
                for i in todo:
                    try:
                        answers[i] = self._request_chunk(x[bounds[i][0]:bounds[i][1]],
                                                         f"{self._client_id}-{call}-{i}", cancel)
                    except BaseException as e:  # noqa: BLE001 - re-raised below
                        error = e
                        break
            else:
                pool = self._executor()
                futs = {pool.submit(self._request_chunk, x[bounds[i][0]:bounds[i][1]],
                                    f"{self._client_id}-{call}-{i}", cancel): i for i in todo}
                for fut in cf.as_completed(futs):
                    try:
                        answers[futs[fut]] = fut.result()
                    except (_Cancelled, cf.CancelledError):
                        pass
                    except BaseException as e:  # noqa: BLE001 - the first real failure wins
                        if error is None:
                            error = e
                            cancel.set()
                            for f in futs:
                                f.cancel()
                    # cancelled futures never run: as_completed still yields them
        with self._lock:
            self.counters["queries"] += 1
        if error is not None:
            kept = 0
            for i, a in answers.items():
                s, e = bounds[i]
                self._put_pending(keys[i] if keys else self._cache_key(x[s:e]), a)
                kept += len(a)
            with self._lock:
                self.counters["failed_queries"] += 1
            if isinstance(error, RemoteAPIError):
                error.pending_samples = kept
                if kept:
                    error.args = (f"{error.args[0]} {kept} of the query's {n} samples were "
                                  "answered (and billed) before the failure; they are cached and "
                                  "will be delivered without being bought again when this query is "
                                  "retried.",)
                raise error
            raise RemoteUnavailable(f"API '{self.name}' ({self.url}) failed: "
                                    f"{type(error).__name__}: {error}", url=self.url,
                                    pending_samples=kept) from error
        for i in from_cache:
            self._drop_pending_file(keys[i])
        with self._lock:
            self.counters["cached_samples"] += sum(len(answers[i]) for i in from_cache)
        out = np.concatenate([answers[i] for i in range(len(bounds))])
        if info["output"] == "label":
            return np.eye(k, dtype=np.float32)[out]
        return out

    def close(self) -> None:
        """Close the pooled connections and the request threads (the client stays usable)."""
        with self._lock:
            http, self._http = self._http, None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if http is not None:
            http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"OIPClient({self.url!r}, model={self.model!r}, timeout={self.timeout}, "
                f"max_retries={self.max_retries}, concurrency={self.concurrency})")

    # ------------------------------------------------------------------ metadata
    def _only_model(self) -> str:
        listing = self._get_json("/v2/models", "the model list", missing_ok=True)
        models = (listing or {}).get("models") if isinstance(listing, dict) else None
        if isinstance(models, list) and len(models) == 1:
            m = models[0]
            return m["name"] if isinstance(m, dict) else str(m)
        raise ValueError(f"no model named for {self.url}: pass model=NAME or a URL "
                         f"{self.url}/v2/models/NAME (the server lists "
                         f"{models if models is not None else 'no models at GET /v2/models'}).")

    def _describe(self, meta: dict, config: dict) -> dict:
        where = f"{self.url}/v2/models/{self.model}"
        record = {}
        param = (config.get("parameters") or {}).get(CONFIG_PARAMETER)
        if isinstance(param, dict) and "string_value" in param:
            try:
                record = json.loads(param["string_value"])
            except ValueError:
                record = {}
        inputs = meta.get("inputs") or []
        outputs = meta.get("outputs") or []
        if len(inputs) > 1:
            raise ValueError(f"{where} takes {len(inputs)} inputs "
                             f"{[i.get('name') for i in inputs]}; a teacher takes one image batch.")
        if len(outputs) > 1 and "output_name" not in record:
            raise ValueError(f"{where} has {len(outputs)} outputs "
                             f"{[o.get('name') for o in outputs]}; a teacher answers one tensor.")
        inp = inputs[0] if inputs else {}
        out = outputs[0] if outputs else {}
        mshape = [int(s) for s in inp.get("shape", [])]
        shape = tuple(mshape[1:]) if mshape else None
        if shape is not None and any(s < 0 for s in shape):
            shape = None                             # variable sample shape: need the caller's
        shape = shape or (tuple(record["input_shape"]) if "input_shape" in record else None)
        shape = shape or self._hint_shape
        if shape is None:
            raise ValueError(f"{where} does not state its input shape in its metadata; pass "
                             "input_shape=(H, W, C).")
        if inp.get("datatype", "FP32") not in ("FP32", "FP16", "FP64"):
            raise ValueError(f"{where} takes {inp.get('datatype')} inputs; a teacher here takes "
                             "FP32 images.")
        odt = out.get("datatype")
        oshape = [int(s) for s in out.get("shape", [])]
        server_out = record.get("output") or self._hint_output or (
            "label" if odt and odt.startswith(("INT", "UINT")) else "logits")
        if server_out not in SERVER_OUTPUTS:
            raise ValueError(f"{where} says it answers {server_out!r}, not one of "
                             f"{SERVER_OUTPUTS}")
        k = record.get("num_classes")
        if k is None and server_out != "label" and len(oshape) == 2 and oshape[-1] > 0:
            k = oshape[-1]
        k = k or self._hint_k
        if k is None:
            raise ValueError(f"{where} does not state its number of classes (output shape "
                             f"{oshape or 'unknown'}); pass num_classes=K.")
        max_batch = config.get("max_batch_size") or record.get("max_batch")
        info = {k_: v for k_, v in record.items() if k_ not in ("output_name", "input_name")}
        info.update(name=self.model, input_name=inp.get("name") or record.get("input_name")
                    or "input", output_name=record.get("output_name") or out.get("name"),
                    input_shape=[int(s) for s in shape], num_classes=int(k), output=server_out,
                    output_dtype=odt, max_batch=int(max_batch) if max_batch else None,
                    decimals=record.get("decimals"))
        return info

    # ------------------------------------------------------------------ pending cache
    def _cache_key(self, chunk: np.ndarray) -> str:
        info = self._info or {}
        h = hashlib.sha256()
        h.update(json.dumps([info.get("name"), info.get("output"), info.get("num_classes"),
                             info.get("decimals"), list(chunk.shape)]).encode())
        h.update(chunk.tobytes())
        return h.hexdigest()

    def _has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending or self._disk_keys)

    def _pending_path(self, key: str) -> str:
        return os.path.join(self.cache_dir, f"pending-{key}.npy")

    def _put_pending(self, key: str, a: np.ndarray) -> None:
        with self._lock:
            self._pending[key] = a
        if self.cache_dir:
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, a)
                os.replace(tmp, self._pending_path(key))
                with self._lock:
                    self._disk_keys.add(key)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise

    def _take_pending(self, key: str) -> Optional[np.ndarray]:
        with self._lock:
            a = self._pending.pop(key, None)
        if a is None and self.cache_dir and key in self._disk_keys:
            try:
                a = np.load(self._pending_path(key))
            except FileNotFoundError:      # delivered by another client on the same cache
                with self._lock:
                    self._disk_keys.discard(key)
        return a

    def _drop_pending_file(self, key: str) -> None:
        if self.cache_dir:
            with self._lock:
                self._disk_keys.discard(key)
            try:
                os.remove(self._pending_path(key))
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ transport
    def _executor(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="dfml-oip")
            return self._pool

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = httpx.Client(
                    base_url=self.url, headers={"User-Agent": "dfml_jax-oip-client"},
                    timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=self.concurrency,
                                        max_keepalive_connections=self.concurrency))
            return self._http

    def _auth_headers(self) -> Dict[str, str]:
        # Read at every request, so that a key changed on a live client takes effect.
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key is not None else {}

    def _roundtrip(self, method: str, path: str, body: Optional[bytes],
                   headers: Dict[str, str]) -> httpx.Response:
        """One HTTP exchange; transport failures become :class:`_Retryable`."""
        try:
            resp = self._client().request(method, path, content=body,
                                          headers={**headers, **self._auth_headers()})
            resp.read()
            return resp
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise _Retryable(f"could not connect ({type(e).__name__}: {e})") from e
        except httpx.PoolTimeout as e:
            raise _Retryable(f"no free connection within {self.timeout:g} s") from e
        except httpx.TimeoutException as e:
            raise _Retryable(f"timed out after {self.timeout:g} s waiting for the answer",
                             ambiguous=True) from e
        except httpx.RemoteProtocolError as e:
            text = str(e)
            if "incomplete" in text or "expected" in text or "complete message body" in text:
                raise _Retryable(f"truncated response body ({text})", truncated=True,
                                 ambiguous=True) from e
            raise _Retryable(f"connection lost ({text})", ambiguous=True) from e
        except httpx.TransportError as e:
            raise _Retryable(f"transport error ({type(e).__name__}: {e})", ambiguous=True) from e

    def _with_retries(self, what: str, fn, cancel: Optional[threading.Event] = None,
                      samples: int = 0):
        """Call ``fn(attempt)`` until it stops raising :class:`_Retryable` (tenacity: bounded,
        capped exponential backoff with full jitter, at least the server's ``Retry-After``)."""
        jitter = tenacity.wait_random_exponential(multiplier=self.backoff, max=self.max_backoff)

        def wait(rs):
            exc = rs.outcome.exception()
            ra = exc.retry_after if isinstance(exc, _Retryable) else 0.0
            return max(jitter(rs), min(ra, self.max_backoff))

        def sleep(delay):
            if cancel is not None:
                if cancel.wait(delay):
                    raise _Cancelled()
            elif delay > 0:
                threading.Event().wait(delay)

        def before_sleep(rs):
            exc = rs.outcome.exception()
            with self._lock:
                self.counters["retries"] += 1
                if isinstance(exc, _Retryable) and exc.ambiguous:
                    self.counters["ambiguous_retries"] += 1
                    self.counters["ambiguous_samples"] += samples

        attempts = [0]

        def attempt_once():
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            attempts[0] += 1
            with self._lock:
                self.counters["requests"] += 1
            return fn(attempts[0])

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1), wait=wait, sleep=sleep,
            retry=tenacity.retry_if_exception_type(_Retryable), before_sleep=before_sleep,
            reraise=True)
        try:
            return retrying(attempt_once)
        except _Retryable as e:
            cls = RemoteProtocolError if e.truncated else RemoteUnavailable
            fix = ("the server sends incomplete answers; check its health and logs"
                   if e.truncated else
                   f"check that the server is running and healthy (GET {self.url}/v2/health/"
                   "ready), or raise timeout / max_retries")
            raise cls(f"API '{self.name}' ({self.url}): {what} failed after {attempts[0]} "
                      f"attempts; last error: {e.what}. Nothing was charged for this query; {fix}.",
                      url=self.url, status=e.status, attempts=attempts[0]) from e

    def _check_status(self, resp: httpx.Response, what: str, attempts: int,
                      n: Optional[int] = None) -> None:
        status = resp.status_code
        if status == 200:
            return
        text = _error_text(resp.content)
        if status in _RETRY_STATUS:
            try:
                ra = float(resp.headers.get("retry-after", 0) or 0)
            except ValueError:
                ra = 0.0
            raise _Retryable(f"HTTP {status}: {text}", status=status, retry_after=ra)
        kw = dict(url=self.url, status=status, attempts=attempts)
        if status in (401, 403):
            raise RemoteAuthError(
                f"API '{self.name}' ({self.url}) rejected the API key (HTTP {status}: {text}). "
                "Pass the key the server was started with (--api-key) as api_key=...; nothing was "
                "charged.", **kw)
        if status == 413:
            try:
                limit = int(json.loads(resp.content.decode()).get("max_batch"))
            except Exception:
                limit = None
            err = RemoteRequestTooLarge(
                f"API '{self.name}' ({self.url}) refused a request of {n} samples as too large "
                f"(HTTP 413: {text}); the server's limit is max_batch={limit}. Build the API with "
                f"max_batch<={limit} (or leave max_batch=None to use the server's limit); nothing "
                "was charged.", **kw)
            err.max_batch = limit
            raise err
        if status == 404:
            raise RemoteRequestError(
                f"API '{self.name}' ({self.url}): {what} answered HTTP 404 ({text}). Is the model "
                f"name '{self.model}' right (GET {self.url}/v2/models/{self.model})? Nothing was "
                "charged.", **kw)
        raise RemoteRequestError(f"API '{self.name}' ({self.url}) refused {what} (HTTP {status}: "
                                 f"{text}); nothing was charged.", **kw)

    def _get_json(self, path: str, what: str, missing_ok: bool = False):
        def attempt(attempts):
            resp = self._roundtrip("GET", path, None, {"Accept": "application/json"})
            if missing_ok and resp.status_code in (400, 404, 405, 501):
                return None
            self._check_status(resp, f"{what} (GET {path})", attempts)
            try:
                return json.loads(resp.content.decode("utf-8")) if resp.content else {}
            except ValueError as e:
                raise RemoteProtocolError(f"{self.url}{path} did not answer JSON ({e}); is this an "
                                          "Open Inference Protocol (v2) server?",
                                          url=self.url) from e

        return self._with_retries(f"{what} (GET {path})", attempt)

    def _request_chunk(self, chunk: np.ndarray, request_id: str,
                       cancel: threading.Event) -> np.ndarray:
        info = self._info
        m = len(chunk)
        path = f"/v2/models/{self.model}/infer"
        encoded = {}

        def attempt(attempts):
            binary = self.binary
            if binary not in encoded:
                encoded[binary] = encode_infer_request(
                    chunk, info["input_name"], output_name=info["output_name"], binary=binary,
                    request_id=request_id)
            body, headers = encoded[binary]
            resp = self._roundtrip("POST", path, body, headers)
            if binary and resp.status_code in (400, 415, 501) and attempts == 1 and \
                    self.counters["answered_samples"] == 0 and "binary" in resp.text.lower():
                self.binary = False          # this server does not take the binary extension
                raise _Retryable(f"HTTP {resp.status_code} to a binary request; switching to JSON")
            self._check_status(resp, f"a request of {m} samples", attempts, n=m)
            try:
                out = decode_infer_response(resp.content, resp.headers, info["output_name"])
            except ValueError as e:
                if "truncated" in str(e):
                    raise _Retryable(f"truncated response body ({e})", truncated=True,
                                     ambiguous=True) from e
                raise RemoteProtocolError(
                    f"API '{self.name}' ({self.url}) sent a malformed answer for {m} samples: {e}. "
                    "Nothing was charged for this query; check the server.", url=self.url,
                    status=resp.status_code, attempts=attempts) from e
            out = self._validate_chunk(out, m, attempts)
            with self._lock:
                self.counters["answered_samples"] += m
            return out

        return self._with_retries(f"a request of {m} samples", attempt, cancel, samples=m)

    def _validate_chunk(self, out: np.ndarray, m: int, attempts: int) -> np.ndarray:
        info = self._info
        k = int(info["num_classes"])
        label = info["output"] == "label"
        if label and out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]                  # (n, 1) labels, as some servers answer
        want = (m,) if label else (m, k)
        problem = None
        if out.shape != want:
            problem = f"shape {out.shape}, expected {want}"
        elif label and not np.issubdtype(out.dtype, np.integer):
            problem = f"dtype {out.dtype} for labels, expected an integer type"
        elif label and m and (out.min() < 0 or out.max() >= k):
            problem = f"labels outside [0, {k})"
        elif not label and not np.issubdtype(out.dtype, np.floating):
            problem = f"dtype {out.dtype} for scores, expected a float type"
        elif not label and not np.all(np.isfinite(out)):
            bad = int(np.sum(~np.isfinite(out).all(axis=-1)))
            problem = f"NaN or inf scores for {bad} of {m} samples"
        if problem:
            raise RemoteProtocolError(
                f"API '{self.name}' ({self.url}) sent a malformed answer for {m} samples: "
                f"{problem}. Nothing was charged for this query; check the server.",
                url=self.url, status=200, attempts=attempts)
        return out.astype(np.int32) if label else out.astype(np.float32)


# ----------------------------------------------------------------------------- API wiring
def http_api_kwargs(client: OIPClient, input_shape: Optional[Sequence[int]],
                    num_classes: Optional[int], output: Optional[str]) -> dict:
    """Check a client's model against what the caller expects; the ``from_host`` arguments.

    Args:
      client: the client (its model description is fetched).
      input_shape, num_classes: what the caller expects (None: take the server's).
      output: the output mode the API should reveal (None: the server's; ``"probs"`` for a
        top-k server).

    Returns:
      ``{"input_shape", "num_classes", "output", "scores", "name"}`` for
      :meth:`~dfml_jax.blackbox.BlackBoxAPI.from_host`.

    Raises:
      ValueError: the server's model does not match, or cannot reveal ``output``.
    """
    info = client.info()
    s_shape = tuple(int(s) for s in info["input_shape"])
    s_k = int(info["num_classes"])
    shape = s_shape if input_shape is None else tuple(int(s) for s in input_shape)
    k = s_k if num_classes is None else int(num_classes)
    if shape != s_shape or k != s_k:
        raise ValueError(
            f"the server at {client.url} serves '{info.get('name')}' with input_shape {s_shape} "
            f"and {s_k} classes, but the API was built with input_shape={shape}, "
            f"num_classes={k}. Fix the arguments (GET {client.url}/v2/models/{client.model} shows "
            "the server's; pass None to adopt them).")
    server_out = info["output"]
    output = output or ("topk" if server_out == "topk" else server_out)
    allowed = {"logits": ("logits", "probs", "label", "topk"),
               "probs": ("probs", "logits", "label", "topk"),
               "topk": ("topk", "label"),
               "label": ("label",)}[server_out]
    if output not in allowed:
        raise ValueError(f"the server at {client.url} answers {server_out!r}; an API on it can "
                         f"reveal one of {allowed}, not {output!r}. Restart the server with "
                         f"--output logits/probs or ask for less.")
    scores = "logits" if server_out == "logits" else "probs"
    return {"input_shape": shape, "num_classes": k, "output": output, "scores": scores,
            "name": client.name}


def from_http(url: str, input_shape: Optional[Sequence[int]] = None,
              num_classes: Optional[int] = None, *, model: Optional[str] = None,
              output: Optional[str] = None, k: Optional[int] = None,
              decimals: Optional[int] = None, budget: Optional[int] = None,
              name: Optional[str] = None, api_key: Optional[str] = None,
              timeout: float = 10.0, max_retries: int = 4, backoff: float = 0.05,
              max_backoff: float = 2.0, concurrency: int = 4,
              max_batch: Optional[int] = None, cache_dir: Optional[str] = None,
              binary: bool = True, server_output: Optional[str] = None) -> BlackBoxAPI:
    """A model served over the Open Inference Protocol (Triton, KServe, MLServer, or
    ``python -m dfml_jax.serve``) as a black-box API.

    The client (:class:`OIPClient`, kept as ``api.remote``) reads the model's
    metadata, splits a query into requests of at most the server's batch limit, sends them
    concurrently (binary tensor data extension, JSON fallback), retries timeouts, 429 and 5xx
    with capped exponential backoff, and never returns a partial batch; the ledger charges a
    query once all of it is answered. Chunks the server answered for a query that failed are
    cached and delivered without re-buying when the query is retried (see
    :mod:`dfml_jax.remote`). Under ``jit``/``vmap`` it is the host-callback path of
    :meth:`BlackBoxAPI.from_host`. Errors are :class:`dfml_jax.remote.RemoteAPIError` subclasses
    (``BlackBoxError`` s): wrong key, oversize request, malformed answer, unavailable.

    Args:
      url: the server's base URL (``"http://127.0.0.1:8000"``) or a model URL
        (``"http://127.0.0.1:8000/v2/models/NAME"``).
      input_shape: shape of one sample; None: from the model metadata (checked against it).
      num_classes: number of classes; None: from the model metadata (checked against it).
      model: the model name (None: from the URL, else the server's only model).
      output: what the API reveals (None: what the server answers). A ``"label"`` server
        can only back ``"label"``; a scores server any mode.
      k, decimals, budget, name: as in :meth:`BlackBoxAPI.from_host` (``name`` defaults to
        ``model@host:port``).
      api_key: sent as ``Authorization: Bearer KEY``, if the server requires one.
      timeout: seconds for connecting and for each read of a request.
      max_retries: retries per request (timeouts, connection errors, 429/5xx).
      backoff, max_backoff: retry delay scale and cap, in seconds (doubling, jittered).
      concurrency: most requests (and connections) in flight for one query.
      max_batch: samples per request (None: the server's ``max_batch_size``, else 64).
      cache_dir: keep the pending cache of answered-but-undelivered chunks on disk, so a
        resumed process re-buys nothing (None: in memory).
      binary: use the binary tensor data extension (False: JSON tensors).
      server_output: what the model answers, for a server whose configuration does not say
        (``"logits"``, ``"probs"``, ``"topk"`` or ``"label"``).

    Returns:
      A :class:`BlackBoxAPI` with the client as ``api.remote`` (``.stats()`` reads the
      server's bill, ``.close()`` closes its connections).

    Raises:
      ValueError: the server's model does not match ``input_shape``/``num_classes`` or
        cannot reveal ``output``.
      dfml_jax.remote.RemoteAPIError: the server cannot be reached or rejects the key.
    """
    client = OIPClient(url, model=model, name=name, input_shape=input_shape,
                       num_classes=num_classes, server_output=server_output, api_key=api_key,
                       timeout=timeout, max_retries=max_retries, backoff=backoff,
                       max_backoff=max_backoff,
                       concurrency=concurrency, max_batch=max_batch, cache_dir=cache_dir,
                       binary=binary)
    kw = http_api_kwargs(client, input_shape, num_classes, output)
    if output is None and kw["output"] == "topk" and k is None:
        k = client.info().get("k")
    api = BlackBoxAPI.from_host(client, kw["input_shape"], kw["num_classes"], output=kw["output"],
                                k=k, scores=kw["scores"], decimals=decimals, budget=budget,
                                name=name or kw["name"])
    api.remote = client
    return api


def remote_api_factory(url: str, *, model: Optional[str] = None, api_key: Optional[str] = None,
                       cache_dir: Optional[str] = None, **client_options):
    """A factory of APIs on one remote teacher, for experiment runners (``--api-url``).

    Args:
      url: the endpoint (``http://host:port/v2/models/NAME``, or a base URL with ``model``).
      model: the model name, if not in the URL.
      api_key: the server's key, if any.
      cache_dir: on-disk pending cache shared by the APIs (put it in the run directory so that a
        resumed run re-buys nothing).
      **client_options: ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``concurrency``, ``max_batch``, ``binary`` (see :class:`OIPClient`).

    Returns:
      ``factory(*, output, budget, name, input_shape, num_classes) -> BlackBoxAPI``, with a
      ``description`` attribute for reports.
    """
    def factory(*, output, budget, name, input_shape, num_classes):
        return from_http(url, input_shape, num_classes, model=model, output=output,
                                     budget=budget, name=name, api_key=api_key,
                                     cache_dir=cache_dir, **client_options)

    base, m = parse_endpoint(url, model)
    factory.description = f"remote teacher at {base}" + (f" (model {m})" if m else "")
    return factory


def load_remote_pool(urls: Sequence[str], *, output: str = "logits", k: Optional[int] = None,
                     budget: Optional[int] = None, decimals: Optional[int] = None,
                     api_key: Optional[str] = None, cache_dir: Optional[str] = None,
                     **client_options):
    """A pool of remote teachers, one OIP endpoint each (e.g. ``python -m dfml_jax.serve --pool``).

    The public metadata a pool algorithm needs (absolute classes, normalisation, input shape,
    dataset, architecture) comes from each model's configuration (``GET
    /v2/models/NAME/config``, parameter ``dfml_jax``); white-box access does not exist.

    Args:
      urls: one endpoint per teacher, in pool order: ``http://host:port/v2/models/NAME`` (or a
        base URL of a server with a single model).
      output, k, budget, decimals: as in :func:`dfml_jax.pool.load_pool` (per API).
      api_key: the servers' key, if any.
      cache_dir: on-disk pending cache shared by the APIs.
      **client_options: ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``concurrency``, ``max_batch``, ``binary`` (see :class:`OIPClient`).

    Returns:
      A :class:`dfml_jax.pool.APIPool` (``scenario`` ``"remote"``, ``directory`` the first URL).

    Raises:
      ValueError: no URLs, or a model that does not publish its teacher's classes and
        normalisation (not a pool teacher).
    """
    urls = list(urls)
    if not urls:
        raise ValueError("load_remote_pool needs at least one URL")
    apis, records = [], []
    for u in urls:
        api = from_http(u, None, None, output=output, k=k, budget=budget,
                                    decimals=decimals, api_key=api_key, cache_dir=cache_dir,
                                    **client_options)
        info = api.remote.info()
        missing = [f for f in ("classes", "mean", "std") if info.get(f) is None]
        if missing:
            api.remote.close()
            raise ValueError(f"the model at {u} ('{info.get('name')}') does not publish "
                             f"{missing} in its configuration; serve a pool teacher (python -m "
                             "dfml_jax.serve --pool DIR --api I) to use it in a pool.")
        rec = {f: v for f, v in info.items() if f not in ("input_name", "output_name",
                                                          "output_dtype")}
        rec.update(url=api.remote.url, model=api.remote.model, name=api.name,
                   input_shape=list(api.input_shape), num_classes=api.num_classes)
        rec.setdefault("dataset", "remote")
        rec.setdefault("arch", "remote")
        apis.append(api)
        records.append(rec)
    spaces = {r.get("input_space", "normalized") for r in records}
    if len(spaces) != 1:
        raise ValueError(f"the servers mix input spaces {sorted(spaces)}; start them all with the "
                         "same --input-space.")
    return APIPool(apis=tuple(apis), records=tuple(records),
                   classes=tuple(tuple(int(c) for c in r["classes"]) for r in records),
                   scenario="remote", input_space=spaces.pop(), directory=urls[0])
