"""Remote black-box APIs over HTTP: the wire format, the errors and the client.

A remote teacher is served by ``python -m dfml_jax.serve`` (:mod:`dfml_jax.serve`) and reached
through :meth:`dfml_jax.blackbox.BlackBoxAPI.from_http`, which wraps an :class:`HTTPTeacherClient`
exactly as :meth:`~dfml_jax.blackbox.BlackBoxAPI.from_host` wraps any host function: inside ``jit``
/ ``vmap`` a query is one ``pure_callback``, and the ledger charges answered samples only.

Wire format (protocol ``dfml_jax.blackbox/1``)
  ``GET /v1/info``: JSON description of the teacher (name, input_shape, num_classes, output,
  max_batch, public metadata such as classes/mean/std). ``POST /v1/predict``: a batch of images,
  either compact binary (``Content-Type: application/x-ndarray``, raw little-endian C-order bytes
  described by the headers ``X-Array-Dtype: float32`` and ``X-Array-Shape: n,h,w,c``) or JSON
  (``{"inputs": [[...]]}``); the answer uses the same encoding: ``(n, K)`` float32 scores, or
  ``(n,)`` int32 labels for a label server. ``GET /stats``: the server's own thread-safe counts
  (answered samples = the bill). ``GET /healthz``: liveness (no key needed). With an API key, every
  other endpoint needs ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``).

Client behaviour (:class:`HTTPTeacherClient`)
  * A query of ``n`` samples is split into requests of at most ``max_batch`` (the server's limit,
    read from ``/v1/info``), sent concurrently by at most ``concurrency`` threads over keep-alive
    connections.
  * Timeouts (on connect and on every read), connection failures, truncated bodies and HTTP
    429/5xx are retried with exponential backoff and jitter (``backoff * 2**attempt``, capped at
    ``max_backoff``) at most ``max_retries`` times per request; then the whole query fails with a
    :class:`RemoteUnavailable` (or :class:`RemoteProtocolError` for a body that stayed truncated).
    Wrong key (401/403), oversize request (413), other 4xx and malformed answers (wrong shape or
    dtype, NaN/inf, labels out of range) fail at once with their own error type: retrying cannot
    fix them.
  * Every request of a query carries an ``Idempotency-Key``: a retried request that the server had
    already answered (e.g. the answer was lost to a client timeout) is replayed by the server and
    billed once.
  * A query never returns a partial batch. **Billing on failure:** when some requests of a query
    were answered (and billed by the server) but another failed for good, the query raises and the
    ledger is not charged (the algorithm received nothing); the answered chunks are kept in the
    client's *pending cache*, keyed by a SHA-256 of the teacher and the chunk's bytes. When the
    caller retries the same query (a rerun of the failed step, a resumed run), those chunks are
    delivered from the cache without being bought again, and only then charged. So once every
    failed query has been retried, the ledger equals the server's count of answered samples
    (``ledger.answered + client.pending_samples == server answered`` at all times within a
    process). With ``cache_dir`` the pending cache is also written to disk, so a resume in a new
    process (after a crash, with the server restarted) re-buys nothing either. Only chunks of
    failed queries are cached: a successful query is never served from the cache, so asking the
    same images twice is two purchases, as with any API.

Example (a server in this process; see :mod:`dfml_jax.serve`):
  >>> import numpy as np
  >>> from dfml_jax.blackbox import BlackBoxAPI
  >>> from dfml_jax.serve import TeacherServer
  >>> w = np.arange(12, dtype=np.float32).reshape(4, 3)
  >>> with TeacherServer(lambda x: x.reshape(len(x), -1) @ w, (2, 2, 1), 3, max_batch=2) as srv:
  ...     api = BlackBoxAPI.from_http(srv.url, (2, 2, 1), 3, output="label")
  ...     labels = api(np.ones((5, 2, 2, 1), np.float32))
  ...     answered = srv.stats()["answered_samples"]
  ...     api.remote.close()
  >>> labels.tolist(), api.queries, answered
  ([2, 2, 2, 2, 2], 5, 5)
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import http.client
import itertools
import json
import os
import random
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from dfml_jax.blackbox import BlackBoxError

__all__ = [
    "PROTOCOL",
    "BINARY_CONTENT_TYPE",
    "SERVER_OUTPUTS",
    "RemoteAPIError",
    "RemoteAuthError",
    "RemoteRequestTooLarge",
    "RemoteRequestError",
    "RemoteProtocolError",
    "RemoteUnavailable",
    "HTTPTeacherClient",
    "encode_array",
    "decode_array",
    "http_api_kwargs",
    "remote_api_factory",
    "load_remote_pool",
]

PROTOCOL = "dfml_jax.blackbox/1"
BINARY_CONTENT_TYPE = "application/x-ndarray"
#: What a server can answer: scores as logits or probabilities, or top-1 labels.
SERVER_OUTPUTS = ("logits", "probs", "label")
_DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4")}
_RETRY_STATUS = (429, 500, 502, 503, 504)


# ----------------------------------------------------------------------------- errors
class RemoteAPIError(BlackBoxError):
    """A remote black-box API failed. Subclasses say how; nothing was charged for the query.

    Attributes:
      url: the server's base URL.
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
    """The server refused the request (another 4xx: wrong input shape, bad encoding, ...)."""


class RemoteProtocolError(RemoteAPIError):
    """The server's answer was malformed: wrong shape or dtype, NaN/inf, truncated body."""


class RemoteUnavailable(RemoteAPIError):
    """The server could not be reached or kept failing (timeouts, refused connections, 5xx)
    after all retries."""


class _Retryable(Exception):
    """Internal: a failure worth retrying (carries a description and the status)."""

    def __init__(self, what: str, status: Optional[int] = None, retry_after: float = 0.0,
                 truncated: bool = False):
        super().__init__(what)
        self.what, self.status, self.retry_after, self.truncated = what, status, retry_after, truncated


class _Cancelled(Exception):
    """Internal: another request of the same query failed for good."""


# ----------------------------------------------------------------------------- wire format
def encode_array(a: np.ndarray) -> Tuple[bytes, Dict[str, str]]:
    """Encode an array as the compact binary payload.

    Args:
      a: a float32 or int32 array (other floats are cast to float32, other ints to int32).

    Returns:
      ``(body, headers)``: the raw little-endian C-order bytes and the ``Content-Type``,
      ``X-Array-Dtype`` and ``X-Array-Shape`` headers describing them.
    """
    a = np.asarray(a)
    name = "int32" if np.issubdtype(a.dtype, np.integer) else "float32"
    a = np.ascontiguousarray(a, dtype=_DTYPES[name])
    return a.tobytes(), {"Content-Type": BINARY_CONTENT_TYPE, "X-Array-Dtype": name,
                         "X-Array-Shape": ",".join(str(int(s)) for s in a.shape)}


def parse_shape(text: Optional[str]) -> Tuple[int, ...]:
    """Parse an ``X-Array-Shape`` header (``"n,h,w,c"``; ``""`` is a scalar)."""
    if text is None:
        raise ValueError("missing X-Array-Shape header")
    text = text.strip()
    if not text:
        return ()
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"X-Array-Shape {text!r} is not a comma-separated list of integers")
    if any(s < 0 for s in shape):
        raise ValueError(f"X-Array-Shape {text!r} has a negative dimension")
    return shape


def decode_array(body: bytes, headers: Mapping[str, str]) -> np.ndarray:
    """Decode a binary payload (inverse of :func:`encode_array`).

    Args:
      body: the raw bytes.
      headers: the message headers (keys compared case-insensitively).

    Returns:
      The array (a copy, writable).

    Raises:
      ValueError: unknown dtype, bad shape header, or a body whose length does not match the
        header (e.g. a truncated body), with the numbers in the message.
    """
    h = {k.lower(): v for k, v in headers.items()}
    name = (h.get("x-array-dtype") or "").strip()
    if name not in _DTYPES:
        raise ValueError(f"X-Array-Dtype {name!r} is not one of {sorted(_DTYPES)}")
    shape = parse_shape(h.get("x-array-shape"))
    dt = _DTYPES[name]
    want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(body) != want:
        raise ValueError(f"body has {len(body)} bytes but X-Array-Shape {shape} and dtype {name} "
                         f"need {want} (truncated or corrupted body)")
    return np.frombuffer(body, dtype=dt).reshape(shape).copy()


def _error_text(data: bytes) -> str:
    try:
        msg = json.loads(data.decode("utf-8"))
        return str(msg.get("error", msg)) if isinstance(msg, dict) else str(msg)
    except Exception:
        return data[:200].decode("utf-8", "replace")


# ----------------------------------------------------------------------------- client
class HTTPTeacherClient:
    """Host-side client of one remote teacher: a callable ``(n, *input_shape) -> (n, K)`` scores.

    Use it through :meth:`dfml_jax.blackbox.BlackBoxAPI.from_http` (which adds the ledger, output
    modes and the jit/vmap path); see the module docstring for the retry, billing and cache rules.

    Args:
      url: base URL of the server, e.g. ``"http://127.0.0.1:8500"``.
      api_key: the key the server was started with (``--api-key``), or None.
      timeout: seconds allowed for connecting and for each read of a request.
      max_retries: retries per request after the first attempt (timeouts, connection errors,
        truncated bodies, 429/5xx).
      backoff: first retry delay in seconds; doubles with every retry (with jitter).
      max_backoff: cap on one retry delay in seconds.
      concurrency: most requests in flight at once for one query.
      max_batch: samples per request (None: the server's limit from ``/v1/info``).
      cache_dir: directory for the on-disk pending cache (None: in memory only).
      name: name used in error messages (default: the server's teacher name).
      seed: seed of the backoff jitter.

    Raises:
      ValueError: a URL that is not ``http://host:port``.
    """

    def __init__(self, url: str, *, api_key: Optional[str] = None, timeout: float = 10.0,
                 max_retries: int = 4, backoff: float = 0.05, max_backoff: float = 2.0,
                 concurrency: int = 4, max_batch: Optional[int] = None,
                 cache_dir: Optional[str] = None, name: Optional[str] = None, seed: int = 0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"remote API URL must look like http://127.0.0.1:PORT, got {url!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_backoff < 0 or concurrency < 1:
            raise ValueError("need timeout > 0, max_retries >= 0, backoff >= 0, max_backoff >= 0 "
                             f"and concurrency >= 1 (got {timeout}, {max_retries}, {backoff}, "
                             f"{max_backoff}, {concurrency})")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.url = f"http://{parsed.hostname}:{parsed.port or 80}"
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._prefix = parsed.path.rstrip("/")
        self.api_key = api_key
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.concurrency = int(concurrency)
        self._user_max_batch = max_batch
        self.cache_dir = cache_dir
        self._name = name
        self._rng = random.Random(seed)
        self._local = threading.local()
        self._conns: set = set()
        self._lock = threading.Lock()
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._pending: Dict[str, np.ndarray] = {}
        self._client_id = uuid.uuid4().hex[:12]
        self._calls = itertools.count()
        self._info: Optional[dict] = None
        self.counters = {"queries": 0, "failed_queries": 0, "requests": 0, "retries": 0,
                         "answered_samples": 0, "cached_samples": 0, "replayed_requests": 0}
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
        if self._info is not None and self._info.get("name"):
            return f"{self._info['name']}@{self._host}:{self._port}"
        return self.url

    def info(self, refresh: bool = False) -> dict:
        """The server's ``/v1/info`` description (fetched once, with retries).

        Returns:
          A dict with at least ``name``, ``input_shape``, ``num_classes``, ``output``,
          ``max_batch``.
        """
        if self._info is None or refresh:
            info = self._get_json("/v1/info")
            missing = [k for k in ("input_shape", "num_classes", "output", "max_batch")
                       if k not in info]
            if missing or info.get("output") not in SERVER_OUTPUTS:
                raise RemoteProtocolError(
                    f"{self.url}/v1/info is not a {PROTOCOL} teacher description (missing "
                    f"{missing or 'a valid output mode'}); is the URL right?", url=self.url)
            self._info = info
        return self._info

    def stats(self) -> dict:
        """The server's ``GET /stats`` counters (answered samples = what the server billed)."""
        return self._get_json("/stats")

    @property
    def max_batch(self) -> int:
        """Samples per request: ``max_batch`` if given, else the server's limit."""
        return int(self._user_max_batch or self.info()["max_batch"])

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
        """Close the keep-alive connections and the request threads (the client stays usable)."""
        with self._lock:
            conns, self._conns = list(self._conns), set()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for c in conns:
            try:
                c.close()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"HTTPTeacherClient({self.url!r}, timeout={self.timeout}, "
                f"max_retries={self.max_retries}, concurrency={self.concurrency})")

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
                self._pool = cf.ThreadPoolExecutor(self.concurrency,
                                                   thread_name_prefix="dfml-http")
            return self._pool

    def _headers(self) -> Dict[str, str]:
        h = {"User-Agent": "dfml_jax-http-client", "Accept": BINARY_CONTENT_TYPE}
        if self.api_key is not None:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _connection(self) -> Tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._local.conn = conn
        with self._lock:
            self._conns.add(conn)
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except Exception:
                pass

    def _roundtrip(self, method: str, path: str, body: Optional[bytes],
                   headers: Dict[str, str]) -> Tuple[int, Dict[str, str], bytes]:
        """One HTTP exchange on this thread's keep-alive connection.

        A reused connection that the server had closed while idle is reopened once at no cost
        (the request never reached the server).
        """
        for fresh_try in (0, 1):
            try:
                conn, reused = self._connection()
            except (socket.timeout, TimeoutError) as e:
                raise _Retryable(f"connecting timed out after {self.timeout:g} s") from e
            except OSError as e:
                raise _Retryable(f"could not connect ({type(e).__name__}: {e})") from e
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                status = resp.status
                rh = {k.lower(): v for k, v in resp.getheaders()}
                data = resp.read()
                if resp.will_close:
                    self._drop_connection()
                return status, rh, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop_connection()
                if reused and fresh_try == 0:
                    continue        # stale keep-alive connection: reconnect once, not a retry
                raise _Retryable(f"connection lost ({type(e).__name__}: {e})") from e
            except http.client.IncompleteRead as e:
                self._drop_connection()
                got = len(e.partial)
                want = got + (e.expected or 0)
                raise _Retryable(f"truncated response body (got {got} of {want} bytes)",
                                 truncated=True) from e
            except (socket.timeout, TimeoutError) as e:
                self._drop_connection()
                raise _Retryable(f"timed out after {self.timeout:g} s waiting for the answer") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                raise _Retryable(f"transport error ({type(e).__name__}: {e})") from e
        raise AssertionError("unreachable")

    def _with_retries(self, what: str, fn, cancel: Optional[threading.Event] = None):
        """Call ``fn()`` until it stops raising :class:`_Retryable` (bounded, with backoff)."""
        attempts = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            attempts += 1
            with self._lock:
                self.counters["requests"] += 1
            try:
                return fn(attempts)
            except _Retryable as e:
                if attempts > self.max_retries:
                    cls = RemoteProtocolError if e.truncated else RemoteUnavailable
                    fix = ("the server sends incomplete answers; check its health and logs"
                           if e.truncated else
                           "check that the server is running and healthy (GET /healthz), or raise "
                           "timeout / max_retries")
                    raise cls(f"API '{self.name}' ({self.url}): {what} failed after {attempts} "
                              f"attempts; last error: {e.what}. Nothing was charged for this "
                              f"query; {fix}.", url=self.url, status=e.status,
                              attempts=attempts) from e
                delay = min(self.max_backoff, self.backoff * (2 ** (attempts - 1)))
                delay = delay * (0.5 + 0.5 * self._rng.random())
                delay = max(delay, min(e.retry_after, self.max_backoff))
                with self._lock:
                    self.counters["retries"] += 1
                if cancel is not None:
                    if cancel.wait(delay):
                        raise _Cancelled()
                else:
                    time.sleep(delay)

    def _check_status(self, status: int, rh: Mapping[str, str], data: bytes, what: str,
                      attempts: int, n: Optional[int] = None) -> None:
        if status == 200:
            return
        text = _error_text(data)
        if status in _RETRY_STATUS:
            try:
                ra = float(rh.get("retry-after", 0) or 0)
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
                limit = int(json.loads(data.decode()).get("max_batch"))
            except Exception:
                limit = None
            err = RemoteRequestTooLarge(
                f"API '{self.name}' ({self.url}) refused a request of {n} samples as too large "
                f"(HTTP 413: {text}); the server's limit is max_batch={limit}. Build the API with "
                f"max_batch<={limit} (or leave max_batch=None to use the server's limit); nothing "
                "was charged.", **kw)
            err.max_batch = limit
            raise err
        raise RemoteRequestError(f"API '{self.name}' ({self.url}) refused {what} (HTTP {status}: "
                                 f"{text}); nothing was charged.", **kw)

    def _get_json(self, path: str) -> dict:
        def attempt(attempts):
            status, rh, data = self._roundtrip("GET", path, None, self._headers())
            self._check_status(status, rh, data, f"GET {path}", attempts)
            try:
                return json.loads(data.decode("utf-8"))
            except ValueError as e:
                raise RemoteProtocolError(f"{self.url}{path} did not answer JSON ({e}); is this a "
                                          f"{PROTOCOL} server?", url=self.url) from e

        return self._with_retries(f"GET {path}", attempt)

    def _request_chunk(self, chunk: np.ndarray, idem_key: str,
                       cancel: threading.Event) -> np.ndarray:
        body, headers = encode_array(chunk)
        headers.update(self._headers())
        headers["Idempotency-Key"] = idem_key
        m = len(chunk)

        def attempt(attempts):
            status, rh, data = self._roundtrip("POST", "/v1/predict", body, headers)
            self._check_status(status, rh, data, f"a request of {m} samples", attempts, n=m)
            try:
                out = decode_array(data, rh)
            except ValueError as e:
                raise RemoteProtocolError(
                    f"API '{self.name}' ({self.url}) sent a malformed answer for {m} samples: {e}. "
                    "Nothing was charged for this query; check the server.", url=self.url,
                    status=status, attempts=attempts) from e
            self._validate_chunk(out, m, attempts)
            with self._lock:
                self.counters["answered_samples"] += m
                if rh.get("x-idempotent-replay"):
                    self.counters["replayed_requests"] += 1
            return out

        return self._with_retries(f"a request of {m} samples", attempt, cancel)

    def _validate_chunk(self, out: np.ndarray, m: int, attempts: int) -> None:
        info = self._info
        k = int(info["num_classes"])
        label = info["output"] == "label"
        want = (m,) if label else (m, k)
        problem = None
        if out.shape != want:
            problem = f"shape {out.shape}, expected {want}"
        elif label and out.dtype != np.int32:
            problem = f"dtype {out.dtype} for labels, expected int32"
        elif label and m and (out.min() < 0 or out.max() >= k):
            problem = f"labels outside [0, {k})"
        elif not label and out.dtype != np.float32:
            problem = f"dtype {out.dtype} for scores, expected float32"
        elif not label and not np.all(np.isfinite(out)):
            bad = int(np.sum(~np.isfinite(out).all(axis=-1)))
            problem = f"NaN or inf scores for {bad} of {m} samples"
        if problem:
            raise RemoteProtocolError(
                f"API '{self.name}' ({self.url}) sent a malformed answer for {m} samples: "
                f"{problem}. Nothing was charged for this query; check the server.",
                url=self.url, status=200, attempts=attempts)


# ----------------------------------------------------------------------------- API wiring
def http_api_kwargs(client: HTTPTeacherClient, input_shape: Optional[Sequence[int]],
                    num_classes: Optional[int], output: Optional[str]) -> dict:
    """Check a client's server against what the caller expects; the ``from_host`` arguments.

    Args:
      client: the client (its ``/v1/info`` is fetched).
      input_shape, num_classes: what the caller expects (None: take the server's).
      output: the output mode the API should reveal (None: the server's).

    Returns:
      ``{"input_shape", "num_classes", "output", "scores", "name"}`` for
      :meth:`~dfml_jax.blackbox.BlackBoxAPI.from_host`.

    Raises:
      ValueError: the server's teacher does not match, or cannot reveal ``output``.
    """
    info = client.info()
    s_shape = tuple(int(s) for s in info["input_shape"])
    s_k = int(info["num_classes"])
    shape = s_shape if input_shape is None else tuple(int(s) for s in input_shape)
    k = s_k if num_classes is None else int(num_classes)
    if shape != s_shape or k != s_k:
        raise ValueError(
            f"the server at {client.url} serves '{info.get('name')}' with input_shape {s_shape} and "
            f"{s_k} classes, but the API was built with input_shape={shape}, num_classes={k}. Fix "
            f"the arguments (GET {client.url}/v1/info shows the server's; pass None to adopt them).")
    server_out = info["output"]
    output = output or server_out
    allowed = {"logits": ("logits", "probs", "label", "topk"),
               "probs": ("probs", "logits", "label", "topk"),
               "label": ("label",)}[server_out]
    if output not in allowed:
        raise ValueError(f"the server at {client.url} answers {server_out!r}; an API on it can "
                         f"reveal one of {allowed}, not {output!r}. Restart the server with "
                         f"--output logits/probs or ask for less.")
    scores = "probs" if server_out in ("probs", "label") else "logits"
    return {"input_shape": shape, "num_classes": k, "output": output, "scores": scores,
            "name": client.name}


def remote_api_factory(url: str, *, api_key: Optional[str] = None, cache_dir: Optional[str] = None,
                       **client_options):
    """A factory of APIs on one remote teacher, for experiment runners (``--api-url``).

    Args:
      url: the server's base URL.
      api_key: the server's key, if any.
      cache_dir: on-disk pending cache shared by the APIs (put it in the run directory so that a
        resumed run re-buys nothing).
      **client_options: ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``concurrency``, ``max_batch`` (see :meth:`~dfml_jax.blackbox.BlackBoxAPI.from_http`).

    Returns:
      ``factory(*, output, budget, name, input_shape, num_classes) -> BlackBoxAPI``, with a
      ``description`` attribute for reports.
    """
    from dfml_jax.blackbox import BlackBoxAPI

    def factory(*, output, budget, name, input_shape, num_classes):
        return BlackBoxAPI.from_http(url, input_shape, num_classes, output=output, budget=budget,
                                     name=name, api_key=api_key, cache_dir=cache_dir,
                                     **client_options)

    factory.description = f"remote teacher at {url}"
    return factory


def load_remote_pool(urls: Sequence[str], *, output: str = "logits", k: Optional[int] = None,
                     budget: Optional[int] = None, decimals: Optional[int] = None,
                     api_key: Optional[str] = None, cache_dir: Optional[str] = None,
                     **client_options):
    """A pool of remote teachers (one URL per teacher, each ``python -m dfml_jax.serve --pool``).

    The public metadata a pool algorithm needs (absolute classes, normalisation, input shape,
    dataset, architecture) comes from each server's ``/v1/info``; white-box access does not exist.

    Args:
      urls: one base URL per teacher, in pool order.
      output, k, budget, decimals: as in :func:`dfml_jax.pool.load_pool` (per API).
      api_key: the servers' key, if any.
      cache_dir: on-disk pending cache shared by the APIs.
      **client_options: ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``concurrency``, ``max_batch`` (see :meth:`~dfml_jax.blackbox.BlackBoxAPI.from_http`).

    Returns:
      A :class:`dfml_jax.pool.APIPool` (``scenario`` ``"remote"``, ``directory`` the first URL).

    Raises:
      ValueError: no URLs, or a server that does not describe its teacher's classes and
        normalisation (not a pool teacher).
    """
    from dfml_jax.blackbox import BlackBoxAPI
    from dfml_jax.pool import APIPool

    urls = list(urls)
    if not urls:
        raise ValueError("load_remote_pool needs at least one URL")
    apis, records = [], []
    for u in urls:
        api = BlackBoxAPI.from_http(u, None, None, output=output, k=k, budget=budget,
                                    decimals=decimals, api_key=api_key, cache_dir=cache_dir,
                                    **client_options)
        info = api.remote.info()
        missing = [f for f in ("classes", "mean", "std") if info.get(f) is None]
        if missing:
            raise ValueError(f"the server at {u} ('{info.get('name')}') does not publish "
                             f"{missing}; serve a pool teacher (python -m dfml_jax.serve --pool "
                             "DIR --api I) to use it in a pool.")
        rec = {f: v for f, v in info.items() if f not in ("protocol", "auth")}
        rec.update(url=api.remote.url, name=api.name, input_shape=list(api.input_shape),
                   num_classes=api.num_classes)
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
