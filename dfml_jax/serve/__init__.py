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
import json
import logging
import os
import signal
from typing import Optional, Sequence

from dfml_jax.remote import SERVER_OUTPUTS
# The package (the docstring above is also the command line's --help): teachers.py (what can be
# served: a pool teacher, a distillation run's teacher, a linear teacher), oip.py (KServe's OIP v2
# pieces: the kserve.Model, the binary data plane, the HTTP and gRPC guards), server.py
# (TeacherServer), process.py (stop_server_process: the teardown of a server started as a
# subprocess), and here the command line (main, run by ``python -m dfml_jax.serve``).
from dfml_jax.serve.oip import INPUT_NAME, OUTPUT_NAME, TeacherModel
from dfml_jax.serve.process import stop_server_process
from dfml_jax.serve.server import CORRUPTIONS, TeacherServer
from dfml_jax.serve.teachers import (distill_teacher, make_linear_teacher, model_name_of,
                                     pool_teacher)

__all__ = ["TeacherServer", "TeacherModel", "make_linear_teacher", "pool_teacher",
           "distill_teacher", "CORRUPTIONS", "INPUT_NAME", "OUTPUT_NAME", "main",
           "stop_server_process"]


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
