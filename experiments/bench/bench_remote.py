"""Throughput of a remote black-box API over the Open Inference Protocol: samples per second vs
request size and concurrency, next to the in-process API's in the same run.

A teacher is served by ``python -m dfml_jax.serve`` (KServe's v2 REST data plane on uvicorn) in a
separate process on 127.0.0.1 (a seeded linear teacher by default, so the numbers measure the
transport: HTTP, the binary tensor data extension, chunking, threads; ``--pool DIR --api I``
serves a real pool teacher instead), once per simulated latency. For every (latency, batch,
concurrency) the client (``from_http`` with ``max_batch=batch``) answers queries of
``batch * concurrency * 2`` samples (two waves of ``concurrency`` requests) for about ``--seconds``
seconds. One JSON line per point:

* ``kind: "local"``: the same teacher called in-process through ``BlackBoxAPI.from_host`` with the
  same query size (``batch * concurrency * 2``), for scale;
* ``kind: "http"``: ``qps``: answered samples per second (what an algorithm sees),
  ``requests_per_s``, ``call_ms``: median wall time of one query, ``local_qps`` and
  ``vs_local`` (the in-process figure for the same query size, and http/local);
* ``server_answered`` / ``ledger``: the server's bill (``GET /v2/models/NAME/stats``) and the
  client's ledger (equal unless an answer was lost and bought again: ``ambiguous_samples``);
  ``json`` rows (``--json-too``) use JSON tensors instead of the binary extension.

Command lines::

    python experiments/bench/bench_remote.py                       # short default grid (~15 s)
    python experiments/bench/bench_remote.py --batches 1 16 128 512 --concurrency 1 2 4 8 \\
        --latencies 0 20 100 --seconds 2
    python experiments/bench/bench_remote.py --pool runs/bidf_default/pool --api 0 --shape 28,28,1 \\
        --classes 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from dfml_jax.api import BlackBoxAPI
from dfml_jax.remote import from_http
from dfml_jax.serve import make_linear_teacher, stop_server_process


def start_server(args, latency_ms: float, fail_rate: float, workdir: str):
    """Start ``python -m dfml_jax.serve`` on a free loopback port.

    Args:
      args: the parsed command line (teacher, shape, classes, batches).
      latency_ms: simulated latency per request.
      fail_rate: injected 503 rate.
      workdir: where the port file goes.

    Returns:
      ``(proc, url)``: the server process and its model URL ``http://127.0.0.1:P/v2/models/bench``.
    """
    port_file = os.path.join(workdir, f"port-{latency_ms:g}-{fail_rate:g}")
    cmd = [sys.executable, "-m", "dfml_jax.serve", "--port", "0", "--port-file", port_file,
           "--output", "probs", "--max-batch", str(max(args.batches)),
           "--latency-ms", str(latency_ms), "--fail-rate", str(fail_rate), "--model-name", "bench"]
    if args.pool:
        cmd += ["--pool", args.pool, "--api", str(args.api)]
    else:
        cmd += ["--linear-teacher", f"{args.shape}:{args.classes}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS",
                                                                               "cpu")})
    deadline = time.time() + 120
    while not os.path.exists(port_file):
        if proc.poll() is not None:
            raise RuntimeError(f"server failed to start: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("server did not start within 120 s")
        time.sleep(0.05)
    with open(port_file) as f:
        return proc, f"http://127.0.0.1:{int(f.read())}/v2/models/bench"


def measure(api, shape, n: int, seconds: float, rng) -> dict:
    """Query ``n`` samples at a time for about ``seconds``.

    Args:
      api: a :class:`~dfml_jax.api.BlackBoxAPI`.
      shape: one sample's shape.
      n: samples per query.
      seconds: time to spend (at least one query).
      rng: NumPy generator of the inputs.

    Returns:
      ``{"qps", "requests_per_s", "call_ms", "calls", "samples"}``.
    """
    x = rng.random((n,) + shape, dtype=np.float32)
    api(x)                                     # connect, compile, warm up
    q0, r0 = api.queries, (api.remote.counters["requests"] if hasattr(api, "remote") else 0)
    times = []
    t_end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        np.asarray(api(x))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() >= t_end:
            break
    total = sum(times)
    answered = api.queries - q0
    reqs = (api.remote.counters["requests"] - r0) if hasattr(api, "remote") else len(times)
    return {"qps": answered / total, "requests_per_s": reqs / total,
            "call_ms": 1e3 * float(np.median(times)), "calls": len(times), "samples": answered}


def main(argv=None):
    """Command-line entry point (see the module docstring); prints one JSON line per point."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128],
                   help="samples per request (the client's max_batch)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--latencies", type=float, nargs="+", default=[0.0, 20.0],
                   help="simulated server latency per request, ms")
    p.add_argument("--fail-rate", type=float, default=0.0, help="injected 5xx rate")
    p.add_argument("--seconds", type=float, default=0.5, help="time per point")
    p.add_argument("--shape", default="32,32,3", help="input shape of the linear teacher")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--pool", default=None, help="serve teacher --api of this pool instead")
    p.add_argument("--api", type=int, default=0)
    p.add_argument("--json-too", action="store_true",
                   help="also measure JSON tensors (no binary extension)")
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    meta = {"bench": "remote", "kind": "meta", "input_shape": list(shape),
            "classes": args.classes, "teacher": f"pool {args.pool}[{args.api}]" if args.pool
            else "linear", "cpu_count": os.cpu_count(), "seconds_per_point": args.seconds,
            "fail_rate": args.fail_rate}
    print(json.dumps(meta), flush=True)
    local_qps = {}
    if not args.pool:
        local = BlackBoxAPI.from_host(make_linear_teacher(shape, args.classes), shape,
                                      args.classes, output="probs")
        for n in sorted({b * c * 2 for b in args.batches for c in args.concurrency}):
            r = measure(local, shape, n, args.seconds, rng)
            local_qps[n] = r["qps"]
            print(json.dumps({"bench": "remote", "kind": "local", "query": n, **r}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for lat in args.latencies:
            proc, url = start_server(args, lat, args.fail_rate, tmp)
            try:
                for binary in (True, False) if args.json_too else (True,):
                    for b in args.batches:
                        for c in args.concurrency:
                            api = from_http(url, shape, args.classes, output="probs",
                                                        max_batch=b, concurrency=c, timeout=30.0,
                                                        max_retries=8, binary=binary)
                            before = api.remote.stats()["answered_samples"]
                            r = measure(api, shape, b * c * 2, args.seconds, rng)
                            billed = api.remote.stats()["answered_samples"] - before
                            counters = dict(api.remote.counters)
                            api.remote.close()
                            lq = local_qps.get(b * c * 2)
                            print(json.dumps({
                                "bench": "remote", "kind": "http" if binary else "json",
                                "latency_ms": lat, "batch": b, "concurrency": c, **r,
                                "local_qps": lq, "vs_local": r["qps"] / lq if lq else None,
                                "server_answered": billed, "ledger": api.queries,
                                "retries": counters["retries"],
                                "ambiguous_samples": counters["ambiguous_samples"]}), flush=True)
            finally:
                stop_server_process(proc)


if __name__ == "__main__":
    main()
