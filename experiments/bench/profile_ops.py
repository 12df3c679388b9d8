"""Where a hot loop's time goes: one JAX step traced with ``jax.profiler``, time per kind of op.

    python experiments/bench/profile_ops.py --row kd_task --unroll --out docs/profile_kd_nhwc.json
    python experiments/bench/profile_ops.py --row kd_task --unroll --layout CNHW
    python experiments/bench/profile_ops.py --row generator_b50 --upsample subpixel
    python experiments/bench/profile_ops.py --row replay_meta_iteration --smoke   # tiny sizes

The meta rows' step is the one ``bench_torch_reference.py`` times (same sizes, model, loss and
Adam update; ``--layout`` / ``--unroll`` select the meta-model variants); the generator rows
are the inversion rows' DCGAN generator, forward and pull-back (``--upsample``). After compilation and a
warm-up call, one call runs under ``jax.profiler.trace(create_perfetto_trace=True)``; every
XLA:CPU op event of the trace is attributed to its HLO instruction (from the compiled module's
text) and grouped by kind: the fusion's name prefix and the opcode of its root, e.g.
``copy_bitcast_fusion:bitcast`` (a materialised transpose), ``ynn_fusion:dot`` (a matmul run by
YNNPACK), ``ynn_fusion:reduce-window`` (a reduction XLA split into windows). The JSON lists each
kind's summed milliseconds, count and largest instance (name and shape), the summed op time and
the wall time of the traced call (ops of the two cores may overlap, so the sum can exceed it).
Needs PyTorch only because it imports the benchmark module's setup.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_torch_reference as bench  # noqa: E402

from dfml_jax.models import create_model, functional  # noqa: E402
from dfml_jax.models.layers import LAYOUTS, UPSAMPLE_CONV_IMPLS  # noqa: E402

ROWS = ("replay_meta_iteration", "kd_task", "generator_b50", "generator_b150")


def generator_step(row: str, cfg: dict, upsample: str):
    """``(step, args)``: the inversion rows' DCGAN generator, forward and pull-back of a fixed
    image cotangent (the part of an inversion iteration that is not the API's queries)."""
    b = cfg["inversion"]["inversion_b50_q20" if row == "generator_b50" else "inversion_b150_q100"][0]
    s, c, nz = cfg["image_size"], cfg["channels"], cfg["nz"]
    g = functional(create_model("dcgan", nz=nz, ngf=cfg["ngf"], img_size=s, nc=c,
                                rngs_or_key=0, upsample=upsample))
    p = g.init(jax.random.key(1))[0]
    z = jax.random.normal(jax.random.key(2), (b, nz))
    ct = jax.random.normal(jax.random.key(3), (b, s, s, c))

    @jax.jit
    def step(p, z):
        _, vjp = jax.vjp(g.apply_batchstats, p, z)
        return vjp(ct)

    return step, (p, z)


def meta_step(row: str, cfg: dict, layout: str, unroll: bool):
    """``(step, args)``: the row's jitted value_and_grad + Adam step on the benchmark's own data
    (:func:`bench_torch_reference.kd_row` / ``replay_row``)."""
    meta = bench.meta_model(cfg, layout=layout)
    _, data, make_loss = (bench.kd_row if row == "kd_task" else bench.replay_row)(cfg)
    tx, step = bench.jax_step(make_loss(meta.apply_batchstats, unroll=unroll), cfg["outer_lr"])
    return step, (meta.params, tx.init(meta.params), data)


def _instructions(hlo_text: str) -> dict:
    """HLO instruction name -> (shape, kind): kind is the opcode, or for a fusion the opcode of
    its computation's root."""
    roots = {}
    for m in re.finditer(r"^%(\S+) \(.*?\n(.*?)\n\}", hlo_text, re.M | re.S):
        r = re.search(r"ROOT %\S+ = \S+ ([\w-]+)\(", m.group(2))
        roots[m.group(1)] = r.group(1) if r else "?"
    out = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*)$", hlo_text, re.M):
        name, shape, op, rest = m.groups()
        if op == "fusion":
            called = re.search(r"calls=%([\w.-]+)", rest)
            op = "fusion:" + roots.get(called.group(1), "?") if called else op
        out[name] = (shape, op)
    return out


def op_profile(step, args) -> dict:
    """Per-kind op times of one traced call of ``step(*args)`` (see the module docstring)."""
    jax.block_until_ready(step(*args))
    jax.block_until_ready(step(*args))
    hlo = step.lower(*args).compile().as_text()
    inst = _instructions(hlo)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            jax.block_until_ready(step(*args))
            wall = time.perf_counter() - t0
        trace = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"),
                                              recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, count, biggest = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("ph") != "X" or e["name"] not in inst:
            continue
        shape, op = inst[e["name"]]
        prefix = re.sub(r"\.\d+$", "", e["name"])
        kind = prefix + op[len("fusion"):] if op.startswith("fusion:") else prefix
        total[kind] += e["dur"]
        count[kind] += 1
        if e["dur"] > biggest.get(kind, (0,))[0]:
            biggest[kind] = (e["dur"], e["name"], shape)
    ops_ms = sum(total.values()) / 1e3
    kinds = [{"kind": k, "ms": round(v / 1e3, 1), "share": round(v / 1e3 / ops_ms, 3),
              "count": count[k], "largest": {"name": biggest[k][1], "shape": biggest[k][2],
                                             "ms": round(biggest[k][0] / 1e3, 2)}}
             for k, v in total.most_common()]
    return {"wall_ms": round(wall * 1e3, 1), "ops_ms": round(ops_ms, 1), "kinds": kinds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", choices=ROWS, default="kd_task")
    p.add_argument("--layout", choices=LAYOUTS, default="NHWC", help="the meta-model's layout")
    p.add_argument("--unroll", action="store_true", help="the inner lax.scan fully unrolled")
    p.add_argument("--upsample", choices=UPSAMPLE_CONV_IMPLS, default="upsample_then_conv",
                   help="the generator rows' upsample-conv form")
    p.add_argument("--top", type=int, default=25, help="kinds kept in the JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a test, not a profile)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = dict(bench.SMOKE if args.smoke else bench.REAL)
    if args.row.startswith("generator"):
        step, step_args = generator_step(args.row, cfg, args.upsample)
        settings = {"upsample": args.upsample}
    else:
        step, step_args = meta_step(args.row, cfg, args.layout, args.unroll)
        settings = {"layout": args.layout, "unroll": bool(args.unroll)}
    prof = op_profile(step, step_args)
    res = {"bench": "profile_ops", "row": args.row, **settings, "smoke": bool(args.smoke),
           "environment": bench.environment(), "load": bench.loadavg(),
           **prof, "kinds": prof["kinds"][: args.top]}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
