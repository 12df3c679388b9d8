"""Benchmark: im2col vs ``lax.conv_general_dilated`` convolution, and NNX-merge vs hand-written
functional forward passes, on the hot paths of dfml_jax (CPU).

Cases (Conv4, 32 channels, batch-statistics BN as for the meta-model unless noted):

* ``forward``: logits of 256 images 32x32x3 (samples/s).
* ``api_forward``: eval-mode (running-statistics) logits of one teacher on 1024 images 32x32x3,
  the shape of black-box API queries (samples/s).
* ``grad1``: first-order CE gradient on 128 images 32x32x3.
* ``maml_replay``: one replay meta-iteration: 4 tasks (vmapped), 5-way 1-shot, 15 queries per
  class, 5 inner second-order SGD steps, gradient of the summed query loss w.r.t. the meta-params.
* ``maml_kd``: one KD task: 150 support + 150 query images 32x32x3, 10 inner second-order steps,
  KD loss against fixed teacher logits.
* ``population``: one Adam step of 20 teachers (running-stat BN, train mode) trained as a vmapped
  population on 80 images 28x28x1 each (the API-pool builder's step).
* ``functional``: ``maml_replay`` with the NNX ``merge`` view (:func:`dfml_jax.models.functional`)
  vs a hand-written pure Conv4 forward on the same parameters: trace+compile time and run time.

Every case reports the median of ``--reps`` timed runs after one warm-up/compile call, and the
ratio lax/im2col. Output: one JSON object on stdout. Example::

    python experiments/bench/bench_conv.py --reps 5

Measured (jax 0.10.2, 2 shared CPU cores; other jobs kept the load average at 7-9, so absolute
times are inflated, ratios are what matters; an earlier run at load 4-5 gave similar ratios,
in brackets). Median seconds, im2col vs lax, and lax/im2col:

==============  ========  ========  ===============
case            im2col    lax       lax / im2col
==============  ========  ========  ===============
forward         0.656     0.227     0.35  [0.47]
api_forward     2.736     0.596     0.22  [0.20]
grad1           0.898     0.399     0.44  [0.46]
maml_replay     2.104     20.65     9.8   [12.7]
maml_kd         12.58     20.60     1.64  [1.31]
population      4.404     30.18     6.9   [9.6]
==============  ========  ========  ===============

So im2col wins wherever kernels are batched by ``vmap`` (meta-batches of MAML tasks, teacher
populations: lax's batching rule makes them grouped convolutions) and for second-order MAML on
one task; lax wins for single-model forward passes and first-order gradients. The library
default is im2col; black-box APIs (:func:`dfml_jax.teachers.load_pool`) are built with lax.
``functional``: the NNX-merge view and the hand-written forward give the same primitive sequence
(6,894 jaxpr equations), bit-identical gradients and the same run time (ratio 1.04, noise);
trace 4.2 s vs 4.4 s, compile 33 s for both.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _REPO)
from dfml_jax.models import create_model, functional, layers  # noqa: E402


def _block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def timeit(fn, *args, reps: int) -> dict:
    t0 = time.perf_counter()
    _block(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_call_s": first,
            "reps": reps}


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def kd(s, t):
    pt = jax.nn.softmax(t)
    return jnp.mean(pt * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s)))


def maml_outer(apply_bs, params, xs, ys, xq, yq, *, steps, lr, loss):
    def inner_loss(p):
        return loss(apply_bs(p, xs), ys)

    fast = params
    for _ in range(steps):
        g = jax.grad(inner_loss)(fast)
        fast = jax.tree.map(lambda p, gg: p - lr * gg, fast, g)
    return loss(apply_bs(fast, xq), yq)


def make_cases(impl: str, key):
    k = jax.random.split(key, 8)
    meta = create_model("conv4", num_classes=5, input_shape=(32, 32, 3), rngs_or_key=k[0],
                        track_running_stats=False, conv_impl=impl)
    fm = functional(meta)
    x256 = jax.random.uniform(k[1], (256, 32, 32, 3))
    y256 = jax.random.randint(k[2], (256,), 0, 5)

    fwd = jax.jit(fm.apply_batchstats)
    grad1 = jax.jit(jax.grad(lambda p, x, y: ce(fm.apply_batchstats(p, x), y)))

    # replay meta-iteration: 4 tasks, 5-way 1-shot, 15 queries/class, 5 inner steps.
    xs = jax.random.uniform(k[3], (4, 5, 32, 32, 3))
    ys = jnp.tile(jnp.arange(5), (4, 1))
    xq = jax.random.uniform(k[4], (4, 75, 32, 32, 3))
    yq = jnp.tile(jnp.repeat(jnp.arange(5), 15), (4, 1))

    def replay_loss(p, xs, ys, xq, yq):
        per_task = jax.vmap(functools.partial(maml_outer, fm.apply_batchstats, steps=5, lr=0.01,
                                              loss=ce), in_axes=(None, 0, 0, 0, 0))
        return per_task(p, xs, ys, xq, yq).sum()

    replay = jax.jit(jax.grad(replay_loss))

    # KD task: 150 support + 150 query, 10 inner steps, teacher logits fixed.
    xs_kd = jax.random.uniform(k[5], (150, 32, 32, 3))
    xq_kd = jax.random.uniform(k[6], (150, 32, 32, 3))
    ts = jax.random.normal(k[7], (150, 5))
    tq = jax.random.normal(k[0], (150, 5))
    kd_task = jax.jit(jax.grad(functools.partial(maml_outer, fm.apply_batchstats, steps=10, lr=0.01,
                                                 loss=kd)))

    # population teacher step: 20 conv4 teachers, 80 images 28x28x1 each, Adam.
    P = 20
    teachers = [functional(create_model("conv4", num_classes=5, input_shape=(28, 28, 1),
                                        rngs_or_key=i, conv_impl=impl)) for i in range(P)]
    tfm = teachers[0]
    pp = jax.tree.map(lambda *a: jnp.stack(a), *[t.params for t in teachers])
    ss = jax.tree.map(lambda *a: jnp.stack(a), *[t.state for t in teachers])
    tx = optax.chain(optax.clip_by_global_norm(50.0), optax.adam(0.01))
    oo = jax.vmap(tx.init)(pp)
    xp = jax.random.uniform(k[1], (P, 80, 28, 28, 1))
    yp = jax.random.randint(k[2], (P, 80), 0, 5)

    def one(p, s, o, x, y):
        def loss(p):
            logits, ns = tfm.apply(p, s, x, train=True)
            return ce(logits, y), ns
        (l, ns), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), ns, o, l

    pop_step = jax.jit(jax.vmap(one))

    # API query: one teacher (running-stat BN, eval mode), 1024 images 32x32x3, forward only.
    teacher = functional(create_model("conv4", num_classes=5, input_shape=(32, 32, 3),
                                      rngs_or_key=k[2], conv_impl=impl))
    x1024 = jax.random.uniform(k[3], (1024, 32, 32, 3))
    api_fwd = jax.jit(lambda p, s, x: teacher.apply(p, s, x, train=False)[0])

    return {
        "forward": (fwd, (fm.params, x256), 256),
        "api_forward": (api_fwd, (teacher.params, teacher.state, x1024), 1024),
        "grad1": (grad1, (fm.params, x256[:128], y256[:128]), 128),
        "maml_replay": (replay, (fm.params, xs, ys, xq, yq), None),
        "maml_kd": (kd_task, (fm.params, xs_kd, ts, xq_kd, tq), None),
        "population": (pop_step, (pp, ss, oo, xp, yp), P * 80),
    }, fm, (xs, ys, xq, yq)


def handwritten_conv4(params, x):
    """Pure Conv4 forward on the same parameter State, written without NNX."""
    for i in range(4):
        c = params["convs"][i]
        b = params["bns"][i]
        x = layers.conv2d(x, c["kernel"][...], c["bias"][...], padding=1, impl="im2col")
        x, _ = layers.batch_norm(x, b["scale"][...], b["bias"][...], None, None,
                                 use_batch_stats=True)
        x = layers.max_pool2(jax.nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    return x @ params["classifier"]["kernel"][...] + params["classifier"]["bias"][...]


def bench_functional(fm, data, reps: int) -> dict:
    """NNX-merge view vs hand-written forward: same program? trace/compile/run times."""
    out, compiled, texts = {}, {}, {}
    for name, apply_bs in (("nnx_merge", fm.apply_batchstats), ("handwritten", handwritten_conv4)):
        def replay_loss(p, xs, ys, xq, yq, apply_bs=apply_bs):
            per_task = jax.vmap(functools.partial(maml_outer, apply_bs, steps=5, lr=0.01, loss=ce),
                                in_axes=(None, 0, 0, 0, 0))
            return per_task(p, xs, ys, xq, yq).sum()

        f = jax.jit(jax.grad(replay_loss))
        t0 = time.perf_counter()
        lowered = f.lower(fm.params, *data)
        trace_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled[name] = lowered.compile()
        compile_s = time.perf_counter() - t0
        jaxpr = jax.make_jaxpr(jax.grad(replay_loss))(fm.params, *data)
        texts[name] = [str(e.primitive) for e in jaxpr.eqns]
        out[name] = {"trace_s": trace_s, "compile_s": compile_s, "jaxpr_eqns": len(jaxpr.eqns),
                     "times_s": []}
    for _ in range(reps):  # interleaved, so that load changes hit both alike
        for name in compiled:
            t0 = time.perf_counter()
            _block(compiled[name](fm.params, *data))
            out[name]["times_s"].append(time.perf_counter() - t0)
    for name in compiled:
        out[name]["median_s"] = statistics.median(out[name]["times_s"])
    out["same_primitive_sequence"] = texts["nnx_merge"] == texts["handwritten"]
    g = [jax.tree.leaves(compiled[n](fm.params, *data)) for n in compiled]
    out["max_abs_grad_diff"] = float(max(jnp.max(jnp.abs(a - b)) for a, b in zip(*g)))
    out["runtime_ratio_merge_over_handwritten"] = (out["nnx_merge"]["median_s"]
                                                   / out["handwritten"]["median_s"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed runs per case (median reported)")
    ap.add_argument("--heavy-reps", type=int, default=3,
                    help="timed runs for the slow second-order cases with lax")
    ap.add_argument("--cases", default="forward,api_forward,grad1,maml_replay,maml_kd,population,functional")
    args = ap.parse_args(argv)
    wanted = args.cases.split(",")
    key = jax.random.key(0)
    results = {"jax": jax.__version__, "backend": jax.default_backend(),
               "cpu_count": os.cpu_count(), "machine": platform.machine(), "cases": {}}
    per_impl = {}
    fm_data = None
    for impl in ("im2col", "lax"):
        cases, fm, data = make_cases(impl, key)
        if impl == "im2col":
            fm_data = (fm, data)
        for name, (fn, a, n) in cases.items():
            if name not in wanted:
                continue
            reps = args.heavy_reps if (impl == "lax" and name.startswith("maml")) else args.reps
            r = timeit(fn, *a, reps=reps)
            if n:
                r["samples_per_s"] = n / r["median_s"]
            per_impl.setdefault(name, {})[impl] = r
            print(f"[bench_conv] {name:12s} {impl:7s} median {r['median_s']:.4f}s "
                  f"(first call {r['first_call_s']:.2f}s)", file=sys.stderr, flush=True)
    for name, d in per_impl.items():
        d["ratio_lax_over_im2col"] = d["lax"]["median_s"] / d["im2col"]["median_s"]
        results["cases"][name] = d
    if "functional" in wanted:
        results["cases"]["functional"] = bench_functional(fm_data[0], fm_data[1], args.reps)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
