"""Per-call overhead of the black-box API paths: host callback vs in-graph, vs the raw forward pass.

For each batch size the same teacher (a Conv4 API, or an MLP with ``--teacher mlp``) is timed three
ways, all jitted and measured in the same process:

* ``raw``: the teacher's forward pass alone (no API, no counting): the reference;
* ``in_graph``: ``BlackBoxAPI.from_jax`` (forward compiled in the graph, outputs charged on host);
* ``host``: ``BlackBoxAPI.from_host`` (inputs cross to the host, a jitted forward runs there).

Prints one JSON line per (path, batch) with the median and IQR over repeats, the overhead over
``raw`` in ms and as a ratio, and the speed-up of the in-graph path over the host path.

Command line (the numbers in the Foundation issue's closing note)::

    python experiments/bench/bench_blackbox.py --batches 1 150 15000 --repeats 20
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from dfml_jax.api import BlackBoxAPI


def make_teacher(kind: str, shape, num_classes: int, key):
    """Returns a jittable forward ``x -> logits`` closed over random parameters."""
    if kind == "conv4":
        from dfml_jax.models import create_model, functional

        model = create_model("conv4", num_classes=num_classes, input_shape=shape, rngs_or_key=key)
        fm = functional(model)
        return lambda x: fm.apply(fm.params, fm.state, x, train=False)[0]
    d = int(np.prod(shape))
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (d, 256)) / np.sqrt(d)
    w2 = jax.random.normal(k2, (256, num_classes)) / 16.0
    return lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2


def time_fn(fn, x, repeats: int):
    fn(x).block_until_ready()  # compile + warm up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    ts = np.asarray(ts) * 1e3
    return float(np.median(ts)), float(np.percentile(ts, 75) - np.percentile(ts, 25))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 150, 15000])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--teacher", choices=["conv4", "mlp"], default="conv4")
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)

    shape = (args.image_size, args.image_size, 3)
    forward = make_teacher(args.teacher, shape, 5, jax.random.key(0))
    raw = jax.jit(forward)
    host_forward = jax.jit(forward)
    host_api = BlackBoxAPI.from_host(lambda x: np.asarray(host_forward(x)), shape, 5, name="host")
    graph_api = BlackBoxAPI.from_jax(forward, shape, 5, name="in_graph")
    paths = {"raw": raw, "in_graph": jax.jit(graph_api), "host": jax.jit(host_api)}
    rows = []
    for b in args.batches:
        x = jax.random.uniform(jax.random.key(b), (b,) + shape)
        res = {name: time_fn(fn, x, args.repeats) for name, fn in paths.items()}
        raw_ms = res["raw"][0]
        for name, (med, iqr) in res.items():
            row = {"path": name, "teacher": args.teacher, "batch": b, "input_shape": list(shape),
                   "ms_per_call_median": round(med, 4), "ms_iqr": round(iqr, 4),
                   "overhead_ms_vs_raw": round(med - raw_ms, 4),
                   "ratio_vs_raw": round(med / raw_ms, 3)}
            if name == "in_graph":
                row["speedup_vs_host"] = round(res["host"][0] / med, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    expected = sum(args.batches) * (args.repeats + 1)
    assert host_api.queries == expected and graph_api.queries == expected, "ledger mismatch"
    return rows


if __name__ == "__main__":
    main()
