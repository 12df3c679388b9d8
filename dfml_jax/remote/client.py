"""The HTTP client of one Open Inference Protocol model: :class:`OIPClient`.

Transport (httpx, one pooled client), retries (tenacity), the model's description, splitting a
query into concurrent requests, and validating the answers. The retry, billing and pending-cache
rules are documented in :mod:`dfml_jax.remote`; the wire format is :mod:`dfml_jax.remote.wire`,
the cache :mod:`dfml_jax.remote.pending`.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import threading
import urllib.parse
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import httpx
import numpy as np
import tenacity

from dfml_jax.remote.errors import (RemoteAPIError, RemoteAuthError, RemoteProtocolError,
                                    RemoteRequestError, RemoteRequestTooLarge, RemoteUnavailable,
                                    _Cancelled, _Retryable)
from dfml_jax.remote.pending import PendingCache
from dfml_jax.remote.wire import (CONFIG_PARAMETER, SERVER_OUTPUTS, _RETRY_STATUS, _error_text,
                                  decode_infer_response, encode_infer_request, parse_endpoint)

__all__ = ["OIPClient"]

_DEFAULT_MAX_BATCH = 64


class OIPClient:
    """Host-side client of one OIP model: a callable ``(n, *input_shape) -> (n, K)`` scores.

    Use it through :func:`~dfml_jax.remote.api.from_http` (which adds the ledger, output
    modes and the jit/vmap path); see :mod:`dfml_jax.remote` for the retry, billing and cache
    rules.

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
        self._pending = PendingCache(cache_dir)
        self._client_id = uuid.uuid4().hex[:12]
        self._calls = itertools.count()
        self._info: Optional[dict] = None
        self.counters = {"queries": 0, "failed_queries": 0, "requests": 0, "retries": 0,
                         "ambiguous_retries": 0, "ambiguous_samples": 0, "answered_samples": 0,
                         "cached_samples": 0}

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
        return self._pending.samples

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Answer a batch: ``(n, *input_shape)`` float32 -> ``(n, K)`` float32 scores.

        A label server's answers come back one-hot (the API then reveals their argmax).

        Args:
          x: the batch.

        Returns:
          The scores, in input order.

        Raises:
          RemoteAuthError, RemoteRequestTooLarge, RemoteRequestError, RemoteProtocolError,
          RemoteUnavailable: see :mod:`dfml_jax.remote`. Nothing is returned partially.
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
        keys = ([self._pending.key(self._info, x[s:e]) for s, e in bounds]
                if self._pending.has_pending() else None)
        answers, from_cache = self._take_cached(keys)
        todo = [i for i in range(len(bounds)) if i not in answers]
        chunks = {i: (x[bounds[i][0]:bounds[i][1]], f"{self._client_id}-{call}-{i}") for i in todo}
        error = self._request_chunks(chunks, answers) if todo else None
        with self._lock:
            self.counters["queries"] += 1
        if error is not None:
            self._fail(error, x, bounds, keys, answers)
        for i in from_cache:
            self._pending.drop_file(keys[i])
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

    # ------------------------------------------------------------------ one query
    def _take_cached(self, keys: Optional[List[str]]) -> Tuple[Dict[int, np.ndarray], List[int]]:
        """Answers of a query's chunks from the pending cache: ``({chunk: answer}, [chunk])``."""
        answers: Dict[int, np.ndarray] = {}
        from_cache = []
        for i, key in enumerate(keys or ()):
            hit = self._pending.take(key)
            if hit is not None:
                answers[i] = hit
                from_cache.append(i)
        return answers, from_cache

    def _request_chunks(self, chunks: Dict[int, Tuple[np.ndarray, str]],
                        answers: Dict[int, np.ndarray]) -> Optional[BaseException]:
        """Request ``{chunk: (inputs, request_id)}``, at most ``concurrency`` at once, into
        ``answers``; the first failure for good cancels the rest and is returned (None: all
        answered)."""
        cancel = threading.Event()
        error: Optional[BaseException] = None
        if len(chunks) == 1 or self.concurrency == 1:
            for i, (chunk, request_id) in chunks.items():
                try:
                    answers[i] = self._request_chunk(chunk, request_id, cancel)
                except BaseException as e:  # noqa: BLE001 - re-raised by the caller
                    return e
            return None
        pool = self._executor()
        futs = {pool.submit(self._request_chunk, chunk, request_id, cancel): i
                for i, (chunk, request_id) in chunks.items()}
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
        return error

    def _fail(self, error: BaseException, x: np.ndarray, bounds: List[Tuple[int, int]],
              keys: Optional[List[str]], answers: Dict[int, np.ndarray]) -> None:
        """Keep a failed query's answered chunks in the pending cache and raise its error."""
        kept = 0
        for i, a in answers.items():
            s, e = bounds[i]
            self._pending.put(keys[i] if keys else self._pending.key(self._info, x[s:e]), a)
            kept += len(a)
        with self._lock:
            self.counters["failed_queries"] += 1
        n = len(x)
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

