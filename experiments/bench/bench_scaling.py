"""Scaling with the device count: a BiDf-MKD inversion and a replay meta-iteration on 1..N devices.

For every device count n (a :func:`dfml_jax.parallel.make_mesh` mesh of the first n devices):

1. **Inversion**: one jitted inversion call (``--inv-iters`` iterations) with its B samples, API
   queries and zero-order directions sharded over n devices (``make_inverter(..., mesh=)``);
   reported as ms per inversion iteration and API samples answered per second. Checked against
   n = 1 in the same run: identical query counts, max abs difference of the recovered images.
2. **Meta-iteration**: one replay meta-step (``--tasks`` MAML tasks, second order) with the tasks
   sharded over n devices (``make_meta_steps(..., mesh=)``); reported as ms per meta-iteration.

``speedup = time(n = 1) / time(n)``, both measured in this run, medians over ``--repeats`` after
compilation. Writes ``scaling.json`` and ``scaling.png`` into ``--out``.

On emulated CPU devices (``--cpu-devices 8``) all "devices" share the same cores, so the numbers
prove that the sharded code is correct and show its overhead (speed-up <= 1 is expected there); on
a machine with several GPUs or a TPU slice the same command shows the speed-up.

Measured (2026-11-21, 2 shared CPU cores with ``jax_num_cpu_devices=8``, load average 20-27 from
other jobs, so +-30% noise; medians of 3 after compilation; meta = 8 tasks, 5 inner steps, 2nd order):

=====================  ========  ========  ========  ========
default sizes           1 dev     2 dev     4 dev     8 dev
=====================  ========  ========  ========  ========
inversion ms/iter        2297      2024      1438      1504
meta-iteration ms        4015      2423      2934      3527
max |images - 1 dev|     0         1.2e-7    1.2e-7    1.2e-7
=====================  ========  ========  ========  ========

(default: B = 5 x 16 = 80, q = 20, chunk 10, Conv4 width 32 API and meta-model, 28x28x1, DCGAN
nz 64 ngf 16; 5,040 queries per 3-iteration call on every device count.) The smoke sizes (B = 40,
q = 4, 16x16, width 8) gave inversion 27.8 / 40.6 / 30.0 / 28.8 ms per iteration and
meta-iterations of 95 / 74 / 65 / 172 ms on 1 / 2 / 4 / 8 emulated devices, same query counts, max
image difference 1.2e-7. Emulated devices share the 2 cores, so these ratios measure overhead and
XLA's per-device threading, not a multi-device speed-up.

Command lines::

    python experiments/bench/bench_scaling.py --cpu-devices 8 --smoke --out runs/bench_scaling_smoke
    python experiments/bench/bench_scaling.py --cpu-devices 8 --out runs/bench_scaling_cpu
    python experiments/bench/bench_scaling.py --devices 1 2 4 8 --out runs/bench_scaling_gpu   # 8 GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import time


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=None,
                   help="device counts to measure (default: 1, 2, 4, ... up to all devices)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="emulate this many CPU devices (set before JAX starts)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds per device count)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--per-class", type=int, default=16, help="B = ways x per-class samples")
    p.add_argument("--q", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=10)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--width", type=int, default=32, help="Conv4 width (API and meta-model)")
    p.add_argument("--nz", type=int, default=64)
    p.add_argument("--ngf", type=int, default=16)
    p.add_argument("--inv-iters", type=int, default=3, help="inversion iterations per timed call")
    p.add_argument("--tasks", type=int, default=8, help="replay tasks per meta-iteration")
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-meta", action="store_true")
    p.add_argument("--out", default="runs/bench_scaling")
    args = p.parse_args(argv)
    if args.smoke:
        args.per_class, args.q, args.chunk_size, args.image_size = 8, 4, None, 16
        args.width, args.nz, args.ngf, args.inv_iters, args.inner_steps = 8, 16, 8, 2, 2
    return args


def median_time(fn, repeats):
    import jax
    import numpy as np

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return out, float(np.median(ts)), first


def main(argv=None):
    args = parse(argv)
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dfml_jax.bidf_mkd import InversionConfig, ReplayTasks, make_inverter
    from dfml_jax.bidf_mkd.metastep import make_meta_steps
    from dfml_jax.api import APIGroup, BlackBoxAPI
    from dfml_jax.models import create_model, functional
    from dfml_jax.parallel import make_mesh, replicate

    have = len(jax.devices())
    counts = args.devices or [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= have]
    if 1 not in counts:
        counts = [1] + list(counts)
    s, k = args.image_size, args.ways
    shape = (s, s, 1)
    b = k * args.per_class
    teacher = functional(create_model("conv4", num_classes=k, input_shape=shape, rngs_or_key=0,
                                      width=args.width))
    apply_eval = lambda prm, x: teacher.apply(prm[0], prm[1], x, train=False)[0]
    gen = functional(create_model("dcgan", nz=args.nz, ngf=args.ngf, img_size=s, nc=1,
                                  rngs_or_key=0))
    cfg = InversionConfig(iterations=args.inv_iters, per_class=args.per_class,
                          num_directions=args.q, chunk_size=args.chunk_size, pad=2)
    meta = functional(create_model("conv4", num_classes=k, input_shape=shape, rngs_or_key=1,
                                   width=args.width))
    x = jax.random.uniform(jax.random.key(0), (args.tasks, k * 16) + shape)
    y = jnp.tile(jnp.repeat(jnp.arange(k), 16)[None], (args.tasks, 1))
    tasks = ReplayTasks(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    rows, ref_images = [], None
    for n in counts:
        mesh = make_mesh(n)
        api = BlackBoxAPI.from_jax(apply_eval, shape, k, params=(teacher.params, teacher.state))
        group = APIGroup([api])
        inv = make_inverter(group, gen.apply_batchstats, nz=args.nz, cfg=cfg,
                            mean=(0.5,), std=(0.25,), image_size=s, mesh=mesh)
        gp, operand = replicate((gen.init(jax.random.key(1))[0], group.operand), mesh)
        res, inv_s, inv_first = median_time(lambda: inv(jax.random.key(0), 0, gp, operand),
                                            args.repeats)
        per_call = api.queries // (args.repeats + 1)
        images = np.asarray(res.images)
        ref_images = images if ref_images is None else ref_images
        row = {"devices": n, "inversion_ms_per_iter": 1e3 * inv_s / args.inv_iters,
               "inversion_compile_s": inv_first - inv_s,
               "api_samples_per_s": per_call / inv_s, "queries_per_call": per_call,
               "max_abs_diff_vs_1_device": float(np.max(np.abs(images - ref_images)))}
        if not args.skip_meta:
            steps = make_meta_steps(meta.apply_batchstats, optax.adam(1e-3),
                                    replay_steps=args.inner_steps, kd_steps=args.inner_steps,
                                    inner_lr=0.01, mesh=mesh)
            params = replicate(meta.params, mesh)   # as the loop state: already on the mesh
            opt = replicate(optax.adam(1e-3).init(meta.params), mesh)
            (_, _, loss, _), meta_s, meta_first = median_time(
                lambda: steps.replay(params, opt, tasks), args.repeats)
            row.update(meta_ms_per_iteration=1e3 * meta_s, meta_compile_s=meta_first - meta_s,
                       meta_loss=float(loss))
        rows.append(row)
        print(json.dumps(row))
    base = rows[0]
    for r in rows:
        r["inversion_speedup"] = base["inversion_ms_per_iter"] / r["inversion_ms_per_iter"]
        if "meta_ms_per_iteration" in r:
            r["meta_speedup"] = base["meta_ms_per_iteration"] / r["meta_ms_per_iteration"]
    out = {"platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
           "emulated_cpu_devices": args.cpu_devices, "host_cpus": os.cpu_count(),
           "load_avg_1min": os.getloadavg()[0],
           "config": {k_: v for k_, v in vars(args).items() if k_ not in ("out",)},
           "batch": b, "rows": rows,
           "note": ("speedup = time(1 device) / time(n devices), medians, same run. On emulated "
                    "CPU devices every device shares the same cores: expect <= 1 (overhead); on "
                    "real devices this is the speed-up.")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump(out, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    ns = [r["devices"] for r in rows]
    ax.plot(ns, ns, "k:", label="ideal")
    ax.plot(ns, [r["inversion_speedup"] for r in rows], "o-", label="inversion iteration")
    if not args.skip_meta:
        ax.plot(ns, [r["meta_speedup"] for r in rows], "s-", label="replay meta-iteration")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("speed-up vs 1 device")
    ax.set_title(f"BiDf-MKD scaling ({out['platform']}, B={b}, q={args.q})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "scaling.png"))
    print(json.dumps({"out": args.out, "rows": [{k_: (round(v, 3) if isinstance(v, float) else v)
                                                 for k_, v in r.items()} for r in rows]}))
    return out


if __name__ == "__main__":
    main()
