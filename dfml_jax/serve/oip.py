"""KServe's OIP v2 pieces as the teacher server uses them: the ``kserve.Model``, a zero-copy
binary data plane, and the HTTP (ASGI) and gRPC guards (API key, hidden repository endpoints,
the truncation fault, the server's errors as gRPC status codes).

KServe is imported here once, without letting it parse this process's command line (``_K`` holds
its pieces). The guards and the model read the settings and counters of a
:class:`dfml_jax.serve.TeacherServer` at every request.
"""
from __future__ import annotations

import hmac
import json
import sys
from typing import Dict, Optional

__all__ = ["TeacherModel", "INPUT_NAME", "OUTPUT_NAME"]


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

import grpc  # noqa: E402  (installed with kserve)
from grpc import aio as grpc_aio  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

#: Tensor names in the model metadata.
INPUT_NAME, OUTPUT_NAME = "input", "output"
_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/v2", "/")


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
      server: the :class:`~dfml_jax.serve.TeacherServer` whose settings (output mode, limits,
        faults) and counters it uses; they are read at every request, so a test can change them
        on a live server.
    """

    def __init__(self, server):
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

    def __init__(self, app, server):
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

    def __init__(self, server):
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
