"""Benchmark of BiDf-MKD's hot loops against references measured in the same run.

1. One full inversion iteration (generator forward/VJP, batch-shared augmentation, zero-order
   estimate with B*(q+1) API queries, Adam) -> ``ms_per_iter``, against the same number of API
   forward passes alone, in the same chunks -> ``api_forward_ms_per_iter``, and against those
   forwards plus the generator's forward+VJP alone (``generator_fwd_bwd_ms``). At the paper's
   sizes the DCGAN generator (ngf=64, ~115 M multiply-adds per 32x32 image, x3 for the VJP) costs
   about as much as the 15,150 Conv4 API forwards, so ``ratio_vs_api_forward`` cannot approach
   1.0; ``ratio_vs_api_forward_plus_generator`` is the overhead of the estimator machinery itself.
2. A replay meta-iteration: 4 tasks, 5-way 1-shot 15-query, 5 inner second-order steps, Conv4.
3. A KD task: 150 images, 10 inner second-order KD steps, outer KD on 150 images, Conv4.

Times are medians over ``--repeats`` after compilation (compile time reported separately). This
script has no PyTorch reference: the comparison with PyTorch, measured in the same run on the same
weights and data, is ``experiments/bench/bench_torch_reference.py`` (JSON in
``docs/bench_torch_reference.json``).

Command line::

    python experiments/bench/bench_inversion.py --batch 150 --q 100 --image-size 32 --iters 3

Measured on a quiet 2-core CPU (load 1, jax 0.10.2, Conv4 width 32, 32x32x3): ``ms_per_iter``
6205, ``api_forward_ms_per_iter`` 4332 (ratio 1.43), generator forward+VJP 1613 ms (ratio to API
forwards + generator 1.04), 15,150 queries per iteration; replay meta-iteration 0.51 s, KD task
4.07 s.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfml_jax.api import APIGroup, BlackBoxAPI
from dfml_jax.bidf_mkd import InversionConfig, KDTask, ReplayTasks, make_inverter
from dfml_jax.bidf_mkd.metastep import make_meta_steps
from dfml_jax.models import create_model, functional


def median_time(fn, repeats):
    out = fn()
    jax.block_until_ready(out)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(np.percentile(ts, 75) - np.percentile(ts, 25))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=150)
    p.add_argument("--q", type=int, default=100)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--iters", type=int, default=3, help="inversion iterations per timed call")
    p.add_argument("--chunk-size", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=32, help="Conv4 width (API and meta-model)")
    p.add_argument("--skip-meta", action="store_true", help="only time the inversion")
    args = p.parse_args(argv)

    s, c, k = args.image_size, args.channels, 5
    shape = (s, s, c)
    teacher = functional(create_model("conv4", num_classes=k, input_shape=shape, rngs_or_key=0,
                                      width=args.width))
    apply_eval = lambda prm, x: teacher.apply(prm[0], prm[1], x, train=False)[0]
    api = BlackBoxAPI.from_jax(apply_eval, shape, k, params=(teacher.params, teacher.state), name="conv4")
    group = APIGroup([api])
    gen = functional(create_model("dcgan", nz=256, ngf=64, img_size=s, nc=c, rngs_or_key=0))
    per_class = args.batch // k
    cfg = InversionConfig(iterations=args.iters, per_class=per_class, num_directions=args.q,
                          chunk_size=args.chunk_size)
    inv = make_inverter(group, gen.apply_batchstats, nz=256, cfg=cfg, mean=(0.5,) * c,
                        std=(0.25,) * c, image_size=s)
    gp = gen.init(jax.random.key(1))[0]
    t0 = time.perf_counter()
    jax.block_until_ready(inv(jax.random.key(0), 0, gp, group.operand))
    compile_s = time.perf_counter() - t0
    q0 = api.queries
    inv_s, inv_iqr = median_time(lambda: inv(jax.random.key(0), 0, gp, group.operand), args.repeats)
    queries_per_iter = (api.queries - q0) // ((args.repeats + 1) * args.iters)  # + warm-up call

    # Reference: the same number of API forward passes, in the same chunks, alone.
    b = per_class * k
    x = jax.random.normal(jax.random.key(2), (args.chunk_size, b) + shape)
    n_chunks = args.q // args.chunk_size

    @jax.jit
    def forwards(x):
        def body(c, i):
            return c + group(0, x + i * 1e-3, group.operand).sum(), None
        clean = group(0, x[0], group.operand).sum()
        return jax.lax.scan(body, clean, jnp.arange(n_chunks))[0]

    for_s, for_iqr = median_time(lambda: forwards(x), args.repeats * args.iters)

    # Second reference: the generator's forward + VJP alone (the part no estimator can avoid).
    z = jax.random.normal(jax.random.key(3), (b, 256))

    @jax.jit
    def gen_fwd_bwd(gp, z):
        out, vjp = jax.vjp(lambda p: gen.apply_batchstats(p, z), gp)
        return vjp(out)[0]

    gen_s, _ = median_time(lambda: gen_fwd_bwd(gp, z), args.repeats * args.iters)
    row = {"bench": "inversion_iteration", "batch": b, "q": args.q, "image_size": s, "channels": c,
           "chunk_size": args.chunk_size, "ms_per_iter": round(1e3 * inv_s / args.iters, 2),
           "ms_per_iter_iqr": round(1e3 * inv_iqr / args.iters, 2),
           "api_forward_ms_per_iter": round(1e3 * for_s, 2),
           "ratio_vs_api_forward": round(inv_s / args.iters / for_s, 3),
           "generator_fwd_bwd_ms": round(1e3 * gen_s, 2),
           "ratio_vs_api_forward_plus_generator": round(inv_s / args.iters / (for_s + gen_s), 3),
           "queries_per_iter": int(queries_per_iter), "expected_queries_per_iter": b * (args.q + 1),
           "compile_s": round(compile_s, 2)}
    print(json.dumps(row), flush=True)
    if args.skip_meta:
        return

    meta = functional(create_model("conv4", num_classes=k, input_shape=shape, rngs_or_key=3,
                                   width=args.width))
    steps = make_meta_steps(meta.apply_batchstats, optax.adam(1e-3), replay_steps=5, kd_steps=10,
                            inner_lr=0.01)
    opt = optax.adam(1e-3).init(meta.params)
    key = jax.random.key(4)
    rx = lambda n: jax.random.normal(key, (4, n) + shape)
    ry = lambda n: jnp.tile(jnp.repeat(jnp.arange(k), n // k)[None], (4, 1))
    tasks = ReplayTasks(rx(5), ry(5), rx(75), ry(75))
    t0 = time.perf_counter()
    jax.block_until_ready(steps.replay(meta.params, opt, tasks))
    c_rep = time.perf_counter() - t0
    rep_s, rep_iqr = median_time(lambda: steps.replay(meta.params, opt, tasks), args.repeats)
    px = jax.nn.softmax(jax.random.normal(key, (150, k)))
    xs = jax.random.normal(key, (150,) + shape)
    kd = KDTask(xs, px, xs * 0.5, px, jnp.tile(jnp.arange(k), 30))
    few = ReplayTasks(*(a[:3] for a in tasks))
    t0 = time.perf_counter()
    jax.block_until_ready(steps.kd_replay(meta.params, opt, kd, few))
    c_kd = time.perf_counter() - t0
    # time the KD task alone: kd_replay minus the 3 replay tasks it carries
    kdr_s, kdr_iqr = median_time(lambda: steps.kd_replay(meta.params, opt, kd, few), args.repeats)
    rep3 = ReplayTasks(*(a[:3] for a in tasks))
    rep3_s, _ = median_time(lambda: steps.replay(meta.params, opt, rep3), args.repeats)
    kd_s = max(kdr_s - rep3_s, 1e-9)
    for name, sec, iqr, comp in (("replay_meta_iteration", rep_s, rep_iqr, c_rep),
                                 ("kd_task", kd_s, kdr_iqr, c_kd)):
        print(json.dumps({"bench": name, "image_size": s, "channels": c, "width": args.width,
                          "s_median": round(sec, 4), "s_iqr": round(iqr, 4),
                          "compile_s": round(comp, 2)}), flush=True)


if __name__ == "__main__":
    main()
