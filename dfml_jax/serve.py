"""Serve one teacher as a remote black-box API over HTTP (loopback by default).

Command line::

    python -m dfml_jax.serve --pool DIR --api INDEX --port PORT [--output probs|label|logits]
        [--max-batch N] [--latency-ms L] [--fail-rate P] [--api-key KEY] [--seed S]
        [--decimals D] [--input-space normalized|raw] [--port-file PATH]

``--port 0`` picks a free port (printed, and written to ``--port-file``). Instead of ``--pool``,
``--distill-run WORKDIR`` serves the teacher trained by ``experiments/distill.py`` in WORKDIR (for
``experiments/distill.py --api-url``), and ``--linear-teacher 8,8,1:10`` a seeded random linear
teacher (tests, benchmarks). The API key
may also come from the ``DFML_API_KEY`` environment variable (keeps it out of the process list).
Fault injection for tests: ``--fail-rate`` answers that fraction of predict requests with a 503
(seeded by ``--seed``, so the failure sequence is reproducible); ``--corrupt nan|shape|truncate``
sends malformed answers.

The server is the API owner, so it runs the teacher's forward pass itself (white-box access on the
server side is legitimate); callers only ever see the answers. Endpoints and the wire format are
described in :mod:`dfml_jax.remote`. Counters (``GET /stats``) are thread-safe; ``answered_samples``
is the bill: samples answered by ``/v1/predict`` (an idempotent replay of an already answered
request is not billed again, a 503/4xx is not billed).

Batches are answered one at a time (a lock around the forward pass keeps CPU use bounded); the
simulated latency is spent outside the lock, so concurrent clients overlap it, as with a real
service. A pool teacher pads each batch to the next power of two, so the forward pass compiles at
most ``log2(max_batch) + 1`` times.

Example:
  >>> import json, urllib.request
  >>> import numpy as np
  >>> with TeacherServer(make_linear_teacher((2, 2, 1), 3), (2, 2, 1), 3) as srv:
  ...     req = urllib.request.Request(srv.url + "/v1/predict", method="POST",
  ...                                  data=json.dumps({"inputs": np.zeros((2, 2, 2, 1)).tolist()}).encode(),
  ...                                  headers={"Content-Type": "application/json"})
  ...     out = json.load(urllib.request.urlopen(req, timeout=5))
  >>> out["output"], np.asarray(out["outputs"]).shape
  ('probs', (2, 3))
"""
from __future__ import annotations

import argparse
import collections
import hmac
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from dfml_jax.blackbox import _to_outputs
from dfml_jax.remote import (BINARY_CONTENT_TYPE, PROTOCOL, SERVER_OUTPUTS, decode_array,
                             encode_array)

__all__ = ["TeacherServer", "make_linear_teacher", "pool_teacher", "distill_teacher", "CORRUPTIONS",
           "main"]

#: Malformed-answer modes for testing clients.
CORRUPTIONS = ("nan", "shape", "truncate")
_REPLAY_ENTRIES = 1024


def make_linear_teacher(input_shape: Sequence[int], num_classes: int, seed: int = 0) -> Callable:
    """A seeded random linear teacher ``x -> flatten(x) @ W`` (logits), for tests and benchmarks.

    Args:
      input_shape: shape of one sample.
      num_classes: number of classes K.
      seed: seed of ``W``.

    Returns:
      A function ``(n, *input_shape) float32 -> (n, K) float32`` logits.
    """
    d = int(np.prod(input_shape))
    w = np.random.default_rng(seed).normal(size=(d, num_classes)).astype(np.float32)
    w *= 3.0 / np.sqrt(d)

    def linear_teacher(x):
        return np.asarray(x, np.float32).reshape(len(x), -1) @ w

    return linear_teacher


def pool_teacher(directory: str, index: int, *, input_space: str = "normalized",
                 conv_impl: Optional[str] = "lax"):
    """The forward pass of teacher ``index`` of a pool (server side: the owner's white-box view).

    Args:
      directory: pool directory (:func:`dfml_jax.pool.build_pool`).
      index: teacher index.
      input_space: ``"normalized"`` (callers normalise with the pool's mean/std, the default of
        :func:`dfml_jax.pool.load_pool`) or ``"raw"`` ([0, 1] images).
      conv_impl: convolution back-end of the forward pass (``"lax"``: fastest forward-only).

    Returns:
      ``(fn, input_shape, num_classes, metadata)``: ``fn`` maps ``(n, *input_shape)`` float32 to
      ``(n, K)`` logits (batches padded to powers of two); ``metadata`` is the teacher's public
      record (name, dataset, arch, classes, class names, mean, std, held-out accuracy,
      input_space).

    Raises:
      ValueError: index out of range; :class:`dfml_jax.pool.PoolError` for a broken pool.
    """
    import jax

    from dfml_jax.pool import load_white_box_teachers, read_manifest

    records = read_manifest(directory)["teachers"]
    if not 0 <= index < len(records):
        raise ValueError(f"--api {index} is out of range: the pool in {directory} has "
                         f"{len(records)} teachers (0..{len(records) - 1}).")
    teacher = load_white_box_teachers(directory, input_space=input_space,
                                      conv_impl=conv_impl)[index]
    rec = records[index]
    shape = tuple(int(s) for s in rec["input_shape"])
    fwd = jax.jit(teacher.apply)
    params = teacher.params

    def pool_forward(x):
        n = len(x)
        b = 1 << max(n - 1, 0).bit_length()
        if b > n:
            x = np.concatenate([x, np.zeros((b - n,) + shape, np.float32)])
        return np.asarray(fwd(params, x))[:n]

    meta = {k: rec.get(k) for k in ("name", "dataset", "arch", "classes", "class_names",
                                     "global_classes", "mean", "std", "heldout_acc")}
    meta["input_space"] = input_space
    meta["pool_index"] = int(index)
    return pool_forward, shape, int(rec["num_classes"]), meta


def distill_teacher(workdir: str):
    """The teacher trained by a distillation experiment (``experiments/distill.py``) in ``workdir``.

    Lets ``experiments/distill.py --api-url`` distil from exactly the teacher an earlier local
    run trained: ``python -m dfml_jax.serve --distill-run runs/distill_default --port 8500``.

    Args:
      workdir: the experiment's work directory (``config.json`` and the ``teacher/`` checkpoint).

    Returns:
      ``(fn, input_shape, num_classes, metadata)`` as :func:`pool_teacher`; inputs are [0, 1]
      images, as in the experiment.

    Raises:
      ValueError: no trained teacher in ``workdir``.
    """
    import jax

    from dfml_jax.checkpoint import RunCheckpointer
    from dfml_jax.data import load_single_task
    from dfml_jax.distill.experiment import build

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "teacher")):
        raise ValueError(f"{workdir} holds no trained distillation teacher (config.json and "
                         "teacher/); run experiments/distill.py there first.")
    with open(path) as f:
        cfg = json.load(f)
    d = load_single_task(cfg["dataset"])
    shape = tuple(int(s) for s in np.asarray(d.x_train).shape[1:])
    k = int(d.num_classes)
    fm = build(cfg["teacher_arch"], cfg["teacher_kw"], {"num_classes": k, "input_shape": shape},
               cfg["teacher_seed"])
    with RunCheckpointer(os.path.join(workdir, "teacher"), max_to_keep=1) as ck:
        restored = ck.restore_latest({"params": fm.params, "bn": fm.state})
    if restored is None:
        raise ValueError(f"{workdir}/teacher has no checkpoint; the teacher is not trained yet.")
    _, arrays, tmeta = restored
    fwd = jax.jit(lambda p, b, x: fm.apply(p, b, x, train=False)[0])
    params, bn = arrays["params"], arrays["bn"]

    def distill_forward(x):
        n = len(x)
        b = 1 << max(n - 1, 0).bit_length()
        if b > n:
            x = np.concatenate([x, np.zeros((b - n,) + shape, np.float32)])
        return np.asarray(fwd(params, bn, x))[:n]

    meta = {"name": f"{cfg['dataset']}/{cfg['teacher_arch']}/teacher", "dataset": cfg["dataset"],
            "arch": cfg["teacher_arch"], "test_acc": tmeta.get("test_acc"), "input_space": "raw"}
    return distill_forward, shape, k, meta


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, app):
        self.app = app
        self._open = set()
        self._open_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if self.app.verbose:  # a client that went away, a connection cut by stop(): expected
            super().handle_error(request, client_address)

    def drop_connections(self):
        with self._open_lock:
            socks, self._open = list(self._open), set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60  # an idle keep-alive connection is closed after this many seconds
    server_version = "dfml_jax-serve/1"

    def log_message(self, fmt, *args):
        if self.server.app.verbose:
            super().log_message(fmt, *args)

    def do_GET(self):
        self.server.app._handle_get(self)

    def do_POST(self):
        self.server.app._handle_post(self)


class TeacherServer:
    """An HTTP server answering batches of images with one teacher's outputs.

    Args:
      answer_fn: ``(n, *input_shape) float32 -> (n, K)`` raw scores (``scores`` says which kind).
      input_shape: shape of one sample.
      num_classes: number of classes K.
      output: what the API reveals: ``"probs"`` (default), ``"logits"`` or ``"label"``.
      scores: what ``answer_fn`` returns, ``"logits"`` (default) or ``"probs"``.
      max_batch: most samples per request (larger requests get HTTP 413 with the limit).
      latency_ms: simulated latency added to every predict request.
      fail_rate: fraction of predict requests answered with a 503 (seeded by ``seed``).
      api_key: if set, every endpoint but ``/healthz`` needs it (401 otherwise).
      seed: seed of the failure injection.
      host: address to bind (loopback by default).
      port: port (0: a free one, see :attr:`port`).
      name: the teacher's name (in ``/v1/info`` and errors).
      metadata: extra public fields for ``/v1/info`` (classes, mean, std, ...).
      decimals: round revealed scores to this many decimals.
      corrupt: testing only: one of :data:`CORRUPTIONS` to send malformed answers.
      verbose: log every request to stderr.
    """

    def __init__(self, answer_fn: Callable[[np.ndarray], np.ndarray], input_shape: Sequence[int],
                 num_classes: int, *, output: str = "probs", scores: str = "logits",
                 max_batch: int = 256, latency_ms: float = 0.0, fail_rate: float = 0.0,
                 api_key: Optional[str] = None, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0, name: str = "teacher", metadata: Optional[dict] = None,
                 decimals: Optional[int] = None, corrupt: Optional[str] = None,
                 verbose: bool = False):
        if output not in SERVER_OUTPUTS:
            raise ValueError(f"output must be one of {SERVER_OUTPUTS}, got {output!r}")
        if scores not in ("logits", "probs"):
            raise ValueError(f"scores must be 'logits' or 'probs', got {scores!r}")
        if max_batch < 1 or latency_ms < 0 or not 0.0 <= fail_rate < 1.0:
            raise ValueError(f"need max_batch >= 1, latency_ms >= 0 and 0 <= fail_rate < 1 (got "
                             f"{max_batch}, {latency_ms}, {fail_rate})")
        if corrupt is not None and corrupt not in CORRUPTIONS:
            raise ValueError(f"corrupt must be one of {CORRUPTIONS} or None, got {corrupt!r}")
        self.answer_fn = answer_fn
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.output, self.scores = output, scores
        self.max_batch, self.latency_ms, self.fail_rate = int(max_batch), float(latency_ms), float(fail_rate)
        self.api_key = api_key
        self.name, self.metadata, self.decimals = name, dict(metadata or {}), decimals
        self.corrupt, self.verbose = corrupt, verbose
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()          # counters, RNG, replay cache
        self._model_lock = threading.Lock()    # one forward pass at a time
        self._replay: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        self._inflight: Dict[str, threading.Event] = {}
        self._counts = {"answered_samples": 0, "answered_requests": 0, "predict_requests": 0,
                        "injected_failures": 0, "rejected_auth": 0, "rejected_oversize": 0,
                        "bad_requests": 0, "errors": 0, "replayed_requests": 0,
                        "corrupted_answers": 0}
        self._started = time.time()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._httpd = _HTTPServer((host, int(port)), _Handler, self)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def from_pool(cls, directory: str, index: int, *, input_space: str = "normalized",
                  **kwargs) -> "TeacherServer":
        """A server for teacher ``index`` of a pool (see :func:`pool_teacher`).

        Args:
          directory: pool directory.
          index: teacher index.
          input_space: ``"normalized"`` or ``"raw"``.
          **kwargs: the other :class:`TeacherServer` arguments.

        Returns:
          The (not yet started) server.
        """
        fn, shape, k, meta = pool_teacher(directory, index, input_space=input_space)
        kwargs.setdefault("name", meta["name"])
        return cls(fn, shape, k, scores="logits", metadata=meta, **kwargs)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> "TeacherServer":
        """Serve in a background (daemon) thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"dfml-serve-{self.port}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the CLI)."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd.server_close()
            self._httpd.drop_connections()

    def stop(self) -> None:
        """Stop serving at once: close the listening socket and every open connection.

        Safe to call twice and from a request handler (a simulated crash).
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()
        self._httpd.drop_connections()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def stats(self) -> dict:
        """Copy of the counters (``answered_samples`` is the bill)."""
        with self._lock:
            return {**self._counts, "uptime_s": time.time() - self._started}

    def info(self) -> dict:
        """The public description served at ``/v1/info``."""
        return {"protocol": PROTOCOL, "name": self.name, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "output": self.output,
                "output_dtype": "int32" if self.output == "label" else "float32",
                "max_batch": self.max_batch, "decimals": self.decimals,
                "auth": self.api_key is not None, **self.metadata}

    # ------------------------------------------------------------------ handlers
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _send(self, h, status: int, body: bytes, headers: Dict[str, str], close: bool = False):
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        if close:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        h.wfile.write(body)

    def _send_json(self, h, status: int, obj: dict, close: bool = False, **headers):
        self._send(h, status, json.dumps(obj).encode(), {"Content-Type": "application/json",
                                                          **headers}, close)

    def _authorized(self, h) -> bool:
        if self.api_key is None:
            return True
        given = h.headers.get("X-API-Key")
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        if given is not None and hmac.compare_digest(given.encode(), self.api_key.encode()):
            return True
        self._count("rejected_auth")
        self._send_json(h, 401, {"error": "missing or invalid API key" if given is None else
                                 "the API key was rejected", "status": 401},
                        **{"WWW-Authenticate": "Bearer"})
        return False

    def _handle_get(self, h) -> None:
        path = urllib.parse.urlsplit(h.path).path
        if path == "/healthz":
            return self._send_json(h, 200, {"ok": True, "name": self.name})
        if not self._authorized(h):
            return
        if path == "/v1/info":
            return self._send_json(h, 200, self.info())
        if path == "/stats":
            return self._send_json(h, 200, self.stats())
        self._send_json(h, 404, {"error": f"no such endpoint {path}; try /v1/info, /v1/predict, "
                                          "/stats, /healthz", "status": 404})

    def _body_limit(self) -> int:
        # Bodies up to ~8x the largest binary request (or a JSON one) are read, so that the
        # client gets a clean 413 naming the limit; larger ones are refused unread.
        return max(1 << 20, 32 * self.max_batch * int(np.prod(self.input_shape)) + 65536)

    def _handle_post(self, h) -> None:
        path = urllib.parse.urlsplit(h.path).path
        try:
            length = int(h.headers.get("Content-Length", ""))
        except ValueError:
            return self._send_json(h, 411, {"error": "Content-Length required"}, close=True)
        if length > self._body_limit():
            self._count("rejected_oversize")
            return self._send_json(h, 413, {
                "error": f"request body of {length} bytes is above this server's limit "
                         f"(max_batch={self.max_batch} samples)", "max_batch": self.max_batch,
                "status": 413}, close=True)
        body = h.rfile.read(length)
        if path != "/v1/predict":
            return self._send_json(h, 404, {"error": f"no such endpoint {path}; POST "
                                                     "/v1/predict", "status": 404})
        self._count("predict_requests")
        if not self._authorized(h):
            return
        ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        as_json = ctype == "application/json"
        try:
            if as_json:
                x = np.asarray(json.loads(body.decode("utf-8"))["inputs"], np.float32)
            elif ctype == BINARY_CONTENT_TYPE:
                x = decode_array(body, dict(h.headers.items()))
                if x.dtype != np.float32:
                    raise ValueError(f"inputs must be float32, got {x.dtype}")
            else:
                raise ValueError(f"Content-Type must be {BINARY_CONTENT_TYPE} or "
                                 f"application/json, got {ctype!r}")
        except (ValueError, KeyError, TypeError) as e:
            self._count("bad_requests")
            return self._send_json(h, 400, {"error": f"could not read the inputs: {e}",
                                            "status": 400})
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            self._count("bad_requests")
            return self._send_json(h, 400, {
                "error": f"inputs of shape {tuple(x.shape)}; this teacher takes "
                         f"(n, {', '.join(map(str, self.input_shape))})", "status": 400})
        n = len(x)
        if n > self.max_batch:
            self._count("rejected_oversize")
            return self._send_json(h, 413, {
                "error": f"{n} samples in one request; this server answers at most "
                         f"max_batch={self.max_batch}", "max_batch": self.max_batch,
                "status": 413})
        want_json = as_json or "application/json" in (h.headers.get("Accept") or "")
        key = h.headers.get("Idempotency-Key")
        if key:
            key = f"{key}|{int(want_json)}"
            if self._replay_if_known(h, key):
                return
        try:
            if self.latency_ms:
                time.sleep(self.latency_ms / 1000.0)
            with self._lock:
                fail = self.fail_rate > 0 and self._rng.random() < self.fail_rate
                if fail:
                    self._counts["injected_failures"] += 1
            if fail:
                return self._send_json(h, 503, {"error": f"injected failure (fail_rate="
                                                         f"{self.fail_rate:g}); retry",
                                                "status": 503}, **{"Retry-After": "0"})
            try:
                with self._model_lock:
                    raw = np.asarray(self.answer_fn(x))
                out = _to_outputs(raw.astype(np.float32), self.scores, self.output, None,
                                  self.decimals, np)
            except Exception as e:  # noqa: BLE001 - a server error, reported as 500
                self._count("errors")
                return self._send_json(h, 500, {"error": f"teacher failed: {type(e).__name__}: "
                                                         f"{e}", "status": 500})
            out = self._maybe_corrupt(out)
            if want_json:
                rbody = json.dumps({"outputs": out.tolist(), "output": self.output}).encode()
                rheaders = {"Content-Type": "application/json"}
            else:
                rbody, rheaders = encode_array(out)
            with self._lock:       # the bill: counted once the answer exists
                self._counts["answered_samples"] += n
                self._counts["answered_requests"] += 1
                if key:
                    self._replay[key] = (rbody, rheaders)
                    while len(self._replay) > _REPLAY_ENTRIES:
                        self._replay.popitem(last=False)
            self._send_answer(h, rbody, rheaders)
        finally:
            if key:
                with self._lock:
                    ev = self._inflight.pop(key, None)
                if ev is not None:
                    ev.set()

    def _send_answer(self, h, body: bytes, headers: Dict[str, str]) -> None:
        if self.corrupt != "truncate":
            return self._send(h, 200, body, headers)
        h.send_response(200)             # announce the whole body, send half, hang up
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.close_connection = True
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])

    def _replay_if_known(self, h, key: str) -> bool:
        """Answer a repeated Idempotency-Key from the replay cache (waiting for an in-flight one).

        Returns True if answered; otherwise registers ``key`` as in flight.
        """
        deadline = time.monotonic() + 60.0
        while True:
            with self._lock:
                hit = self._replay.get(key)
                if hit is None:
                    ev = self._inflight.get(key)
                    if ev is None:
                        self._inflight[key] = threading.Event()
                        return False
                else:
                    self._counts["replayed_requests"] += 1
            if hit is not None:
                self._send_answer(h, hit[0], {**hit[1], "X-Idempotent-Replay": "1"})
                return True
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                return False  # the first attempt never finished: answer this one afresh

    def _maybe_corrupt(self, out: np.ndarray) -> np.ndarray:
        if self.corrupt in (None, "truncate"):
            return out
        self._count("corrupted_answers")
        if self.corrupt == "shape":
            return out[:-1] if len(out) > 1 else np.concatenate([out, out])
        out = out.copy()
        if out.dtype == np.int32:
            out[0] = self.num_classes      # an impossible label
        else:
            out[0, 0] = np.nan
        return out


def _parse_linear(spec: str):
    try:
        shape, k = spec.split(":")
        return tuple(int(s) for s in shape.split(",")), int(k)
    except ValueError:
        raise SystemExit(f"--linear-teacher expects SHAPE:K such as 8,8,1:10, got {spec!r}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m dfml_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pool", help="pool directory (experiments/build_api_pool.py)")
    src.add_argument("--distill-run", metavar="WORKDIR",
                     help="serve the teacher trained by experiments/distill.py in WORKDIR")
    src.add_argument("--linear-teacher", metavar="SHAPE:K",
                     help="serve a seeded random linear teacher instead, e.g. 8,8,1:10")
    p.add_argument("--api", type=int, default=0, help="teacher index in the pool")
    p.add_argument("--port", type=int, required=True, help="port (0: pick a free one)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--output", default="probs", choices=SERVER_OUTPUTS)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--api-key", default=os.environ.get("DFML_API_KEY"),
                   help="required key (default: $DFML_API_KEY; none: open)")
    p.add_argument("--seed", type=int, default=0, help="seed of the failure injection")
    p.add_argument("--decimals", type=int, default=None)
    p.add_argument("--input-space", default="normalized", choices=("normalized", "raw"))
    p.add_argument("--corrupt", default=None, choices=CORRUPTIONS,
                   help="testing only: send malformed answers")
    p.add_argument("--port-file", default=None, help="write the bound port to this file")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    common = dict(output=a.output, max_batch=a.max_batch, latency_ms=a.latency_ms,
                  fail_rate=a.fail_rate, api_key=a.api_key, seed=a.seed, host=a.host,
                  port=a.port, decimals=a.decimals, corrupt=a.corrupt, verbose=a.verbose)
    try:
        if a.pool:
            srv = TeacherServer.from_pool(a.pool, a.api, input_space=a.input_space, **common)
        elif a.distill_run:
            fn, shape, k, meta = distill_teacher(a.distill_run)
            srv = TeacherServer(fn, shape, k, name=meta["name"], metadata=meta, **common)
        else:
            shape, k = _parse_linear(a.linear_teacher)
            srv = TeacherServer(make_linear_teacher(shape, k, a.seed), shape, k,
                                name=f"linear-{a.linear_teacher}", **common)
    except (ValueError, OSError) as e:
        raise SystemExit(f"dfml_jax.serve: {type(e).__name__}: {e}")
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(srv.port))
        os.replace(tmp, a.port_file)

    def _terminate(*_):          # SIGTERM: stop like Ctrl-C (prints the final stats)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    print(f"dfml_jax.serve: serving '{srv.name}' (output={srv.output}, max_batch={srv.max_batch}, "
          f"latency_ms={srv.latency_ms:g}, fail_rate={srv.fail_rate:g}, "
          f"key={'required' if srv.api_key else 'none'}) at {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    print(f"dfml_jax.serve: stopped; stats {json.dumps(srv.stats())}", flush=True)


if __name__ == "__main__":
    main()
