"""Serve one teacher over the Open Inference Protocol (KServe v2 / Triton HTTP REST) with KServe.

Command line::

    python -m dfml_jax.serve --pool DIR --api INDEX --port PORT [--model-name NAME]
        [--output probs|logits|label|topk] [--k K] [--decimals D] [--max-batch N]
        [--latency-ms L] [--fail-rate P] [--api-key KEY] [--seed S]
        [--input-space normalized|raw] [--host HOST] [--grpc-port G] [--port-file PATH]

``--port 0`` picks a free port (printed, and written to ``--port-file``). Instead of ``--pool``,
``--distill-run WORKDIR`` serves the teacher trained by ``experiments/distill.py`` in WORKDIR (for
``experiments/distill.py --api-url``), and ``--linear-teacher 8,8,1:10`` a seeded random linear
teacher (tests, benchmarks). The API key may also come from the ``DFML_API_KEY`` environment
variable (keeps it out of the process list). Fault injection for tests: ``--fail-rate`` answers
that fraction of infer requests with a 503 (seeded by ``--seed``, so the failure sequence is
reproducible), ``--latency-ms`` delays every answer, ``--corrupt nan|shape|truncate`` sends
malformed answers.

The model is a ``kserve.Model`` served by KServe's own OIP v2 pieces, the ones
``kserve.ModelServer`` assembles (its ``DataPlane``, its v2 REST endpoints on uvicorn, its gRPC
servicer); any OIP client reads it, e.g. NVIDIA's ``tritonclient.http``. ``ModelServer.start``
itself is not used: it binds every interface (``0.0.0.0``), serves one process-wide FastAPI app
(so two servers cannot share a process, as the tests need) and installs signal handlers (main
thread only). Endpoints:

* ``GET /v2/health/live``, ``GET /v2/health/ready`` (open, for probes),
* ``GET /v2/models/NAME``: model metadata: input ``input`` FP32 ``[-1, *input_shape]``, output
  ``output`` FP32 ``[-1, K]`` (INT32 ``[-1]`` for labels),
* ``POST /v2/models/NAME/infer``: JSON tensors or the binary tensor data extension,
* ``GET /v2/models/NAME/config``: Triton's model-configuration extension: ``max_batch_size``, and
  the teacher's public record (output mode, classes, mean, std, input space, ...) as the JSON
  string parameter ``dfml_jax`` (what :func:`dfml_jax.remote.load_remote_pool` reads),
* ``GET /v2/models/NAME/stats``: Triton's statistics extension; ``inference_count`` is the bill
  (answered samples), ``execution_count`` the answered requests, ``dfml_jax`` all counters,
* ``GET /metrics``: Prometheus metrics (KServe's latency histograms and
  ``dfml_answered_samples_total``).

With ``--grpc-port`` the same model is also served by KServe's OIP v2 gRPC servicer
(``inference.GRPCInferenceService``: ServerLive/Ready, ModelReady, ModelMetadata, ModelInfer with
``raw_input_contents``), the key read from the ``authorization: Bearer KEY`` metadata.

With an API key every endpoint but the health checks needs ``Authorization: Bearer KEY`` (401
otherwise). The repository (load/unload) endpoints are not exposed. Requests above
``--max-batch`` samples get HTTP 413 naming the limit. OIP has no idempotency: a request answered
twice (e.g. a client retrying after its timeout) is billed twice, as by any provider; see
:mod:`dfml_jax.remote`.

The server is the API owner, so it runs the teacher's forward pass itself (white-box access on the
server side is legitimate); callers only ever see the answers. Batches are answered one at a time
(a lock around the forward pass, run in a worker thread, keeps CPU use bounded); the simulated
latency is spent outside the lock, so concurrent clients overlap it, as with a real service. A pool
teacher pads each batch to the next power of two, so the forward pass compiles at most
``log2(max_batch) + 1`` times.

Example:
  >>> import numpy as np
  >>> import tritonclient.http as triton
  >>> with TeacherServer(make_linear_teacher((2, 2, 1), 3), (2, 2, 1), 3, name="lin") as srv:
  ...     tc = triton.InferenceServerClient(srv.url.split("//")[1])
  ...     inp = triton.InferInput("input", [2, 2, 2, 1], "FP32")
  ...     _ = inp.set_data_from_numpy(np.zeros((2, 2, 2, 1), np.float32), binary_data=True)
  ...     out = tc.infer("lin", [inp]).as_numpy("output")
  ...     tc.close()
  >>> out.shape, bool(np.allclose(out.sum(1), 1.0))
  ((2, 3), True)
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Dict, Optional, Sequence

import jax
import numpy as np

from dfml_jax.blackbox import scores_to_outputs
from dfml_jax.remote import CONFIG_PARAMETER, SERVER_OUTPUTS
from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.data import load_single_task
from dfml_jax.models import create_model, functional
from dfml_jax.pool import load_white_box_teachers, read_manifest


def _import_kserve():
    """Import KServe's pieces without letting it parse this process's command line.

    ``kserve.model_server`` runs ``argparse.parse_known_args()`` on ``sys.argv`` at import (its
    own flags); the import is done with ``sys.argv`` reduced to the program name.
    """
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        from kserve import Model
        from kserve import errors as kerrors
        from kserve.model_repository import ModelRepository
        from kserve.protocol.dataplane import DataPlane
        from kserve.protocol.infer_type import (InferInput, InferOutput, InferRequest,
                                                InferResponse, RequestedOutput)
        from kserve.protocol.model_repository_extension import ModelRepositoryExtension
        from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
        from kserve.protocol.grpc.servicer import InferenceServicer
    finally:
        sys.argv = argv
    return dict(Model=Model, errors=kerrors, ModelRepository=ModelRepository, DataPlane=DataPlane,
                InferInput=InferInput, InferOutput=InferOutput, InferRequest=InferRequest,
                InferResponse=InferResponse, RequestedOutput=RequestedOutput,
                ModelRepositoryExtension=ModelRepositoryExtension,
                register_v2_endpoints=register_v2_endpoints,
                add_grpc_servicer=(
                    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server),
                InferenceServicer=InferenceServicer)


_K = _import_kserve()

import fastapi  # noqa: E402  (installed with kserve)
import grpc  # noqa: E402
from grpc import aio as grpc_aio  # noqa: E402
import prometheus_client  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

__all__ = ["TeacherServer", "TeacherModel", "make_linear_teacher", "pool_teacher",
           "distill_teacher", "CORRUPTIONS", "INPUT_NAME", "OUTPUT_NAME", "main"]

#: Malformed-answer modes for testing clients.
CORRUPTIONS = ("nan", "shape", "truncate")
#: Tensor names in the model metadata.
INPUT_NAME, OUTPUT_NAME = "input", "output"
_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/v2", "/")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ANSWERED = prometheus_client.Counter(
    "dfml_answered_samples", "Samples answered by a dfml_jax teacher (the bill)", ["model"])


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
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "teacher")):
        raise ValueError(f"{workdir} holds no trained distillation teacher (config.json and "
                         "teacher/); run experiments/distill.py there first.")
    with open(path) as f:
        cfg = json.load(f)
    d = load_single_task(cfg["dataset"])
    shape = tuple(int(s) for s in np.asarray(d.x_train).shape[1:])
    k = int(d.num_classes)
    fm = functional(create_model(cfg["teacher_arch"], num_classes=k, input_shape=shape,
                                 rngs_or_key=cfg["teacher_seed"], **cfg["teacher_kw"]))
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


class _HTTPStatus(Exception):
    """Internal: answer the request with this HTTP status and JSON error body."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None,
                 **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


async def _http_status_handler(_request, exc: _HTTPStatus):
    return JSONResponse(status_code=exc.status, headers=exc.headers,
                        content={"error": exc.message, **exc.extra})


class _BinaryDataPlane(_K["DataPlane"]):
    """KServe's v2 data plane with a zero-copy reader for binary-extension requests.

    KServe 0.21's ``InferRequest.from_bytes`` turns every binary input into a Python list, one
    ``.item()`` per element (about 0.8 s for a 128 x 32 x 32 x 3 float batch on this project's
    test machine). This reader keeps the raw bytes (``np.frombuffer`` on use), as KServe's gRPC
    path does; requests that mix JSON ``data`` into a binary body go to KServe's reader.
    """

    def decode_inference_request(self, body, headers, model_name):
        """Decode one REST v2 request (see ``kserve.protocol.dataplane.DataPlane``)."""
        if not isinstance(body, bytes):
            return super().decode_inference_request(body, headers, model_name)
        hl = headers.get("inference-header-content-length")
        try:
            json_len = int(hl)
            head = json.loads(body[:json_len])
            inputs = head["inputs"]
            sizes = [int(i["parameters"]["binary_data_size"]) for i in inputs]
        except (TypeError, ValueError, KeyError):
            return super().decode_inference_request(body, headers, model_name)
        if json_len + sum(sizes) != len(body):
            raise _K["errors"].InvalidInput(
                f"the body has {len(body)} bytes but its JSON header ({json_len} bytes) announces "
                f"{sum(sizes)} bytes of binary inputs")
        infer_inputs, offset = [], json_len
        for spec, size in zip(inputs, sizes):
            inp = _K["InferInput"](name=spec["name"], shape=spec["shape"],
                                   datatype=spec["datatype"], parameters=spec.get("parameters"))
            inp._raw_data = body[offset:offset + size]     # what KServe's own readers set
            offset += size
            infer_inputs.append(inp)
        outputs = [_K["RequestedOutput"](name=o["name"], parameters=o.get("parameters"))
                   for o in head.get("outputs") or []] or None
        return _K["InferRequest"](model_name=model_name, infer_inputs=infer_inputs,
                                  request_id=head.get("id"), parameters=head.get("parameters"),
                                  request_outputs=outputs)


class TeacherModel(_K["Model"]):
    """The ``kserve.Model`` of a :class:`TeacherServer`: metadata and ``predict`` (OIP v2 only).

    Args:
      server: the server whose settings (output mode, limits, faults) and counters it uses; they
        are read at every request, so a test can change them on a live server.
    """

    def __init__(self, server: "TeacherServer"):
        super().__init__(server.name)
        self.server = server
        self.ready = True

    def get_input_types(self):
        """Input metadata: one FP32 tensor ``[-1, *input_shape]``."""
        return [{"name": INPUT_NAME, "datatype": "FP32",
                 "shape": [-1, *self.server.input_shape]}]

    def get_output_types(self):
        """Output metadata: FP32 scores ``[-1, K]``, or INT32 labels ``[-1]``."""
        s = self.server
        if s.output == "label":
            return [{"name": OUTPUT_NAME, "datatype": "INT32", "shape": [-1]}]
        return [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, s.num_classes]}]

    async def predict(self, payload, headers=None):
        """Answer one OIP v2 inference request (see :meth:`TeacherServer.answer`)."""
        return await self.server.answer(payload)


class _Guard:
    """ASGI middleware: bearer-key check, hidden repository endpoints, truncation fault."""

    def __init__(self, app, server: "TeacherServer"):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        srv, path = self.server, scope["path"].rstrip("/") or "/"
        if path.startswith("/v2/repository") or path.startswith("/v1/"):
            return await self._json(send, 404, {"error": f"no such endpoint {path}; this server "
                                                         "speaks OIP v2 inference only"})
        if srv.api_key is not None and path not in _OPEN_PATHS:
            h = dict(scope["headers"])
            auth = h.get(b"authorization", b"").decode("latin-1")
            given = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if given is None and b"x-api-key" in h:
                given = h[b"x-api-key"].decode("latin-1")
            if given is None or not hmac.compare_digest(given.encode(), srv.api_key.encode()):
                srv._count("rejected_auth")
                return await self._json(send, 401, {
                    "error": "missing API key (send Authorization: Bearer KEY)" if given is None
                    else "the API key was rejected"}, [(b"www-authenticate", b"Bearer")])
        if srv.corrupt == "truncate" and path.endswith("/infer"):
            return await self.app(scope, receive, self._truncating(send))
        return await self.app(scope, receive, send)

    @staticmethod
    async def _json(send, status, obj, headers=()):
        body = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    def _truncating(self, send):
        state = {"ok": True}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                state["ok"] = message["status"] == 200
            elif message["type"] == "http.response.body" and state["ok"]:
                body = message.get("body", b"")
                self.server._count("corrupted_answers")
                # announce the whole body, send half, hang up (the connection is closed)
                await send({"type": "http.response.body", "body": body[: len(body) // 2],
                            "more_body": True})
                raise ConnectionAbortedError("truncate fault: connection cut mid-answer")
            await send(message)

        return wrapped


_GRPC_OPEN = ("/inference.GRPCInferenceService/ServerLive",
              "/inference.GRPCInferenceService/ServerReady")
_GRPC_HIDDEN = ("/inference.GRPCInferenceService/RepositoryModelLoad",
                "/inference.GRPCInferenceService/RepositoryModelUnload")
_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
               413: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL,
               503: grpc.StatusCode.UNAVAILABLE}


class _GrpcGuard(grpc_aio.ServerInterceptor):
    """gRPC counterpart of :class:`_Guard`: bearer key (``authorization`` metadata), hidden
    repository methods, and the server's errors as gRPC status codes."""

    def __init__(self, server: "TeacherServer"):
        self.server = server

    async def intercept_service(self, continuation, details):
        srv, method = self.server, details.method
        if method in _GRPC_HIDDEN:
            return self._deny(grpc.StatusCode.UNIMPLEMENTED, "the repository API is not exposed")
        if srv.api_key is not None and method not in _GRPC_OPEN:
            md = {k.lower(): v for k, v in (details.invocation_metadata or ())}
            auth = md.get("authorization", "")
            given = auth[len("Bearer "):] if auth.startswith("Bearer ") else md.get("x-api-key")
            if given is None or not hmac.compare_digest(str(given).encode(),
                                                        srv.api_key.encode()):
                srv._count("rejected_auth")
                return self._deny(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing API key (metadata authorization: Bearer KEY)"
                                  if given is None else "the API key was rejected")
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, e = handler.unary_unary, _K["errors"]

        async def behaviour(request, context):
            try:
                return await inner(request, context)
            except _HTTPStatus as x:
                await context.abort(_GRPC_CODES.get(x.status, grpc.StatusCode.INTERNAL),
                                    x.message)
            except e.InvalidInput as x:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(x))
            except e.ModelNotFound as x:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(x))
            except (e.ModelNotReady, e.ServerNotReady, e.ServerNotLive) as x:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(x))

        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    @staticmethod
    def _deny(code, message):
        async def deny(request, context):
            await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(deny)


class TeacherServer:
    """One teacher served over OIP v2 REST by KServe (in a background thread or in the foreground).

    Args:
      answer_fn: ``(n, *input_shape) float32 -> (n, K)`` raw scores (``scores`` says which kind).
      input_shape: shape of one sample.
      num_classes: number of classes K.
      output: what the API reveals: ``"probs"`` (default), ``"logits"``, ``"label"`` or
        ``"topk"`` (probabilities of the ``k`` most likely classes, zeros elsewhere).
      scores: what ``answer_fn`` returns, ``"logits"`` (default) or ``"probs"``.
      k: classes revealed with ``output="topk"``.
      max_batch: most samples per request (larger requests get HTTP 413 with the limit).
      latency_ms: simulated latency added to every infer request.
      fail_rate: fraction of infer requests answered with a 503 (seeded by ``seed``).
      api_key: if set, every endpoint but the health checks needs it (401 otherwise).
      seed: seed of the failure injection.
      host: address to bind (loopback by default).
      port: port (0: a free one, see :attr:`port`).
      grpc_port: also serve KServe's OIP v2 gRPC service (``inference.GRPCInferenceService``) on
        this port of ``host`` (0: a free one, see :attr:`grpc_port`; None: REST only). The key is
        read from the ``authorization: Bearer KEY`` metadata.
      name: the model name in URLs (letters, digits, ``_``, ``.``, ``-``).
      metadata: extra public fields for the model configuration (classes, mean, std, ...).
      decimals: round revealed scores to this many decimals.
      corrupt: testing only: one of :data:`CORRUPTIONS` to send malformed answers.
      verbose: log every request to stderr.

    Raises:
      ValueError: an invalid option or model name.
    """

    def __init__(self, answer_fn: Callable[[np.ndarray], np.ndarray], input_shape: Sequence[int],
                 num_classes: int, *, output: str = "probs", scores: str = "logits",
                 k: Optional[int] = None, max_batch: int = 256, latency_ms: float = 0.0,
                 fail_rate: float = 0.0, api_key: Optional[str] = None, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0, grpc_port: Optional[int] = None,
                 name: str = "teacher",
                 metadata: Optional[dict] = None, decimals: Optional[int] = None,
                 corrupt: Optional[str] = None, verbose: bool = False):
        if output not in SERVER_OUTPUTS:
            raise ValueError(f"output must be one of {SERVER_OUTPUTS}, got {output!r}")
        if output == "topk" and (k is None or not 1 <= k <= num_classes):
            raise ValueError(f"output='topk' needs 1 <= k <= {num_classes} (--k), got {k}")
        if scores not in ("logits", "probs"):
            raise ValueError(f"scores must be 'logits' or 'probs', got {scores!r}")
        if max_batch < 1 or latency_ms < 0 or not 0.0 <= fail_rate < 1.0:
            raise ValueError(f"need max_batch >= 1, latency_ms >= 0 and 0 <= fail_rate < 1 (got "
                             f"{max_batch}, {latency_ms}, {fail_rate})")
        if corrupt is not None and corrupt not in CORRUPTIONS:
            raise ValueError(f"corrupt must be one of {CORRUPTIONS} or None, got {corrupt!r}")
        if not _MODEL_NAME.fullmatch(name):
            raise ValueError(f"model name {name!r} cannot appear in a URL path; use letters, "
                             "digits, '_', '.' and '-' (--model-name)")
        self.answer_fn = answer_fn
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.output, self.scores, self.k = output, scores, k
        self.max_batch, self.latency_ms = int(max_batch), float(latency_ms)
        self.fail_rate = float(fail_rate)
        self.api_key = api_key
        self.name, self.metadata, self.decimals = name, dict(metadata or {}), decimals
        self.corrupt, self.verbose = corrupt, verbose
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()          # counters, RNG
        self._model_lock = threading.Lock()    # one forward pass at a time
        self._in_forward = threading.local()
        self._counts = {"answered_samples": 0, "answered_requests": 0, "infer_requests": 0,
                        "injected_failures": 0, "rejected_auth": 0, "rejected_oversize": 0,
                        "bad_requests": 0, "errors": 0, "corrupted_answers": 0}
        self._started = time.time()
        self._forward_ns = 0
        self._last_inference_ms = 0
        self._workers = cf.ThreadPoolExecutor(1, thread_name_prefix=f"dfml-teacher-{name}")
        self.model = TeacherModel(self)
        self.app = self._build_app()
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only for those (without
        # it, a response's headers and body are two writes and the second waits ~40 ms for the
        # client's delayed ACK).
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                   socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, int(port)))
        self._sock.listen(128)
        self._sock.setblocking(False)
        self._uv = uvicorn.Server(uvicorn.Config(
            self.app, log_config=None, log_level="info" if verbose else "critical",
            access_log=verbose, lifespan="off", timeout_keep_alive=60,
            timeout_graceful_shutdown=5))
        self._host, self._grpc_request = host, grpc_port
        self._grpc: Optional[grpc_aio.Server] = None
        self._grpc_bound: Optional[int] = None
        self.announce_grpc = False      # print the gRPC address once bound (the CLI)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    # ------------------------------------------------------------------ app
    def _build_app(self) -> fastapi.FastAPI:
        repo = _K["ModelRepository"]()
        repo.update(self.model)
        app = fastapi.FastAPI(title=f"dfml_jax teacher {self.name}", docs_url=None,
                              redoc_url=None, openapi_url=None,
                              default_response_class=JSONResponse)
        name = self.name

        def check(model_name: str):
            if model_name != name:
                raise _HTTPStatus(404, f"no model named '{model_name}'; this server serves "
                                       f"'{name}'")

        async def config(model_name: str):
            check(model_name)
            return self.config()

        async def stats(model_name: str):
            check(model_name)
            return self.model_stats()

        async def metrics(request: fastapi.Request):
            enc, ctype = prometheus_client.exposition.choose_encoder(
                request.headers.get("accept"))
            return Response(content=enc(prometheus_client.REGISTRY),
                            headers={"content-type": ctype})

        app.add_api_route("/v2/models/{model_name}/config", config, methods=["GET"])
        app.add_api_route("/v2/models/{model_name}/stats", stats, methods=["GET"])
        app.add_api_route("/metrics", metrics, methods=["GET"])
        self._dataplane = _BinaryDataPlane(model_registry=repo)
        self._repo_ext = _K["ModelRepositoryExtension"](model_registry=repo)
        _K["register_v2_endpoints"](app, self._dataplane, self._repo_ext)
        e = _K["errors"]
        app.add_exception_handler(_HTTPStatus, _http_status_handler)
        for exc, handler in ((e.InvalidInput, e.invalid_input_handler),
                             (e.InferenceError, e.inference_error_handler),
                             (e.ModelNotFound, e.model_not_found_handler),
                             (e.ModelNotReady, e.model_not_ready_handler),
                             (NotImplementedError, e.not_implemented_error_handler),
                             (e.ServerNotLive, e.server_not_live_handler),
                             (e.ServerNotReady, e.server_not_ready_handler),
                             (Exception, e.generic_exception_handler)):
            app.add_exception_handler(exc, handler)
        app.add_middleware(_Guard, server=self)
        return app

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def from_pool(cls, directory: str, index: int, *, input_space: str = "normalized",
                  **kwargs) -> "TeacherServer":
        """A server for teacher ``index`` of a pool (see :func:`pool_teacher`).

        Args:
          directory: pool directory.
          index: teacher index.
          input_space: ``"normalized"`` or ``"raw"``.
          **kwargs: the other :class:`TeacherServer` arguments (``name`` defaults to the
            teacher's name with ``/`` replaced by ``-``, e.g. ``cifar10-resnet-0``).

        Returns:
          The (not yet started) server.
        """
        fn, shape, k, meta = pool_teacher(directory, index, input_space=input_space)
        kwargs.setdefault("name", model_name_of(meta["name"]))
        return cls(fn, shape, k, scores="logits", metadata=meta, **kwargs)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """The base URL (``http://host:port``)."""
        host = self._sock.getsockname()[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def model_url(self) -> str:
        """The model's endpoint URL (``http://host:port/v2/models/NAME``), for ``--api-url``."""
        return f"{self.url}/v2/models/{self.name}"

    @property
    def grpc_port(self) -> Optional[int]:
        """The bound gRPC port (None: no gRPC service, or not started yet)."""
        return self._grpc_bound

    async def _start_grpc(self) -> None:
        server = grpc_aio.server(interceptors=(_GrpcGuard(self),))
        _K["add_grpc_servicer"](_K["InferenceServicer"](self._dataplane, self._repo_ext), server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        port = server.add_insecure_port(f"{host}:{int(self._grpc_request)}")
        if not port:
            raise OSError(f"could not bind the gRPC port {host}:{self._grpc_request}")
        await server.start()
        self._grpc, self._grpc_bound = server, port
        if self.announce_grpc:
            print(f"dfml_jax.serve: gRPC (inference.GRPCInferenceService) at {host}:{port}",
                  flush=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._grpc_request is not None:
            await self._start_grpc()
        try:
            await self._uv.serve(sockets=[self._sock])
        finally:
            if self._grpc is not None:
                await self._grpc.stop(grace=None)

    def start(self) -> "TeacherServer":
        """Serve in a background (daemon) thread until :meth:`stop`; returns self once ready."""
        if self._thread is None:
            self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()),
                                            name=f"dfml-serve-{self.port}", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 30
            while not self._uv.started or (self._grpc_request is not None and
                                           self._grpc_bound is None):
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the server for '{self.name}' did not start")
                time.sleep(0.005)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (the CLI)."""
        asyncio.run(self._serve())

    def stop(self) -> None:
        """Stop serving at once: stop accepting, cut every open connection, end the thread.

        Safe to call twice and from the teacher's forward pass (a simulated crash).
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._uv.should_exit = self._uv.force_exit = True
        if self._loop is not None and self._loop.is_running():
            try:
                self._loop.call_soon_threadsafe(self._cut)
            except RuntimeError:             # the loop closed meanwhile
                pass
        if (self._thread is not None and threading.current_thread() is not self._thread
                and not getattr(self._in_forward, "on", False)):
            self._thread.join(timeout=10)
            self._workers.shutdown(wait=True)
        else:
            self._workers.shutdown(wait=False)
        try:
            self._sock.close()
        except OSError:
            pass

    def _cut(self) -> None:
        for s in self._uv.servers:
            s.close()
        for conn in list(self._uv.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # ------------------------------------------------------------------ descriptions
    def stats(self) -> dict:
        """Copy of the counters (``answered_samples`` is the bill)."""
        with self._lock:
            return {**self._counts, "uptime_s": time.time() - self._started}

    def record(self) -> dict:
        """The teacher's public record (published in the model configuration)."""
        rec = {k: v for k, v in self.metadata.items() if k != "name"}
        rec.update(teacher=self.metadata.get("name", self.name), output=self.output,
                   num_classes=self.num_classes, input_shape=list(self.input_shape),
                   max_batch=self.max_batch, decimals=self.decimals, k=self.k,
                   input_name=INPUT_NAME, output_name=OUTPUT_NAME,
                   auth=self.api_key is not None)
        return rec

    def config(self) -> dict:
        """The Triton-style model configuration served at ``/v2/models/NAME/config``."""
        label = self.output == "label"
        return {"name": self.name, "platform": "dfml_jax", "backend": "kserve",
                "max_batch_size": self.max_batch,
                "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32",
                           "dims": list(self.input_shape)}],
                "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_INT32" if label else
                            "TYPE_FP32", "dims": [1] if label else [self.num_classes]}],
                "parameters": {CONFIG_PARAMETER: {"string_value": json.dumps(self.record())}}}

    def model_stats(self) -> dict:
        """Triton-style statistics served at ``/v2/models/NAME/stats`` (the bill)."""
        st = self.stats()
        failed = st["injected_failures"] + st["errors"] + st["rejected_oversize"] + \
            st["bad_requests"]
        return {"model_stats": [{
            "name": self.name, "version": "1", "last_inference": self._last_inference_ms,
            "inference_count": st["answered_samples"], "execution_count": st["answered_requests"],
            "inference_stats": {"success": {"count": st["answered_requests"],
                                            "ns": self._forward_ns},
                                "fail": {"count": failed, "ns": 0}},
            CONFIG_PARAMETER: st}]}

    # ------------------------------------------------------------------ answering
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self._in_forward.on = True
        try:
            t0 = time.perf_counter_ns()
            with self._model_lock:
                raw = np.asarray(self.answer_fn(x))
            self._forward_ns += time.perf_counter_ns() - t0
            return raw
        finally:
            self._in_forward.on = False

    async def answer(self, payload):
        """Answer one inference request: checks, faults, the forward pass, the output mode.

        Args:
          payload: the decoded ``kserve`` ``InferRequest``.

        Returns:
          The ``InferResponse`` (binary or JSON as the request asked).

        Raises:
          kserve.errors.InvalidInput: not one FP32 input of shape ``(n, *input_shape)`` (400).
          _HTTPStatus: 413 above ``max_batch``, 503 for an injected failure, 500 if the teacher
            fails.
        """
        self._count("infer_requests")
        if not isinstance(payload, _K["InferRequest"]):
            self._count("bad_requests")
            raise _K["errors"].InvalidInput("this server speaks the Open Inference Protocol v2: "
                                            f"POST /v2/models/{self.name}/infer")
        if len(payload.inputs) != 1:
            self._count("bad_requests")
            raise _K["errors"].InvalidInput(f"expected one input tensor '{INPUT_NAME}', got "
                                            f"{[i.name for i in payload.inputs]}")
        try:
            x = np.asarray(payload.inputs[0].as_numpy())
        except Exception as e:  # noqa: BLE001 - the client's data: a 400
            self._count("bad_requests")
            raise _K["errors"].InvalidInput(f"could not read input '{payload.inputs[0].name}': "
                                            f"{e}")
        want = ", ".join(map(str, self.input_shape))
        if not np.issubdtype(x.dtype, np.floating) or x.ndim != 1 + len(self.input_shape) or \
                tuple(x.shape[1:]) != self.input_shape:
            self._count("bad_requests")
            raise _K["errors"].InvalidInput(
                f"input of shape {tuple(x.shape)} and dtype {x.dtype}; this teacher takes FP32 "
                f"(n, {want})")
        x = np.ascontiguousarray(x, np.float32)
        n = len(x)
        if n > self.max_batch:
            self._count("rejected_oversize")
            raise _HTTPStatus(413, f"{n} samples in one request; this server answers at most "
                                   f"max_batch={self.max_batch}", max_batch=self.max_batch)
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000.0)
        with self._lock:
            fail = self.fail_rate > 0 and self._rng.random() < self.fail_rate
            if fail:
                self._counts["injected_failures"] += 1
        if fail:
            raise _HTTPStatus(503, f"injected failure (fail_rate={self.fail_rate:g}); retry",
                              {"Retry-After": "0"})
        try:
            raw = await asyncio.get_running_loop().run_in_executor(self._workers, self._forward, x)
        except Exception as e:  # noqa: BLE001 - a server error, reported as 500
            self._count("errors")
            raise _HTTPStatus(500, f"teacher failed: {type(e).__name__}: {e}")
        out = scores_to_outputs(raw.astype(np.float32), self.scores, self.output, self.k,
                          self.decimals, np)
        out = self._maybe_corrupt(out)
        with self._lock:       # the bill: counted once the answer exists
            self._counts["answered_samples"] += n
            self._counts["answered_requests"] += 1
            self._last_inference_ms = int(time.time() * 1000)
        _ANSWERED.labels(model=self.name).inc(n)
        tensor = _K["InferOutput"](name=OUTPUT_NAME, shape=list(out.shape),
                                   datatype="INT32" if out.dtype == np.int32 else "FP32")
        # Raw bytes, not an array in ``data``: KServe 0.21's gRPC encoder tests ``data`` for
        # truth (ambiguous for arrays); its REST encoder turns raw bytes into JSON when asked.
        tensor.set_data_from_numpy(out, binary_data=True)
        return _K["InferResponse"](response_id=payload.id or uuid.uuid4().hex,
                                   model_name=self.name, infer_outputs=[tensor],
                                   use_binary_outputs=payload.use_binary_outputs,
                                   requested_outputs=payload.request_outputs)

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


def model_name_of(teacher_name: str) -> str:
    """A URL-safe model name for a teacher name (``cifar10/resnet/0`` -> ``cifar10-resnet-0``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", teacher_name).strip("-.")
    return name or "teacher"


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
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve OIP v2 over gRPC on this port (0: a free one; default: none)")
    p.add_argument("--model-name", default=None,
                   help="model name in the URLs (default: the teacher's name, URL-safe)")
    p.add_argument("--output", default="probs", choices=SERVER_OUTPUTS)
    p.add_argument("--k", type=int, default=None, help="classes revealed with --output topk")
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
    common = dict(output=a.output, k=a.k, max_batch=a.max_batch, latency_ms=a.latency_ms,
                  fail_rate=a.fail_rate, api_key=a.api_key, seed=a.seed, host=a.host,
                  port=a.port, grpc_port=a.grpc_port, decimals=a.decimals, corrupt=a.corrupt,
                  verbose=a.verbose)
    if a.model_name:
        common["name"] = a.model_name
    try:
        if a.pool:
            srv = TeacherServer.from_pool(a.pool, a.api, input_space=a.input_space, **common)
        elif a.distill_run:
            fn, shape, k, meta = distill_teacher(a.distill_run)
            common.setdefault("name", model_name_of(meta["name"]))
            srv = TeacherServer(fn, shape, k, metadata=meta, **common)
        else:
            shape, k = _parse_linear(a.linear_teacher)
            common.setdefault("name", model_name_of(f"linear-{a.linear_teacher}"))
            srv = TeacherServer(make_linear_teacher(shape, k, a.seed), shape, k, **common)
    except (ValueError, OSError) as e:
        raise SystemExit(f"dfml_jax.serve: {type(e).__name__}: {e}")
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(srv.port))
        os.replace(tmp, a.port_file)
    # uvicorn catches SIGINT/SIGTERM, stops gracefully, then re-raises the signal to the handler
    # found before it started: this no-op one, so that the final stats are printed and the exit
    # status is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    if not a.verbose:
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    print(f"dfml_jax.serve: serving '{srv.name}' (output={srv.output}, max_batch={srv.max_batch}, "
          f"latency_ms={srv.latency_ms:g}, fail_rate={srv.fail_rate:g}, "
          f"key={'required' if srv.api_key else 'none'}) at {srv.model_url}", flush=True)
    srv.announce_grpc = True
    srv.serve_forever()
    srv.stop()
    print(f"dfml_jax.serve: stopped; stats {json.dumps(srv.stats())}", flush=True)


if __name__ == "__main__":
    main()
