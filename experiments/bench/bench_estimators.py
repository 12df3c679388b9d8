"""Benchmark of the zero-order estimators: cosine to the true gradient, speed, memory.

The black box is a random-init Conv4 teacher (``dfml_jax.models``, eval-mode BN) wrapped as a
``BlackBoxAPI.from_jax`` (in-graph forward, outputs charged on the host ledger); the objective is
the per-sample cross-entropy toward a target class (MAZE / BiDf-MKD). The true gradient comes from
``jax.grad`` through the white-box forward. Inputs are generator-like ``sigmoid(N(0, 1))`` images.
Sizes (d = H*W*C): 64 = 8x8x1 (Conv4 of depth 3: 8x8 is too small for 4 poolings), 784 = 28x28x1,
3072 = 32x32x3, 21168 = 84x84x3.

Two kinds of rows, one JSON object per line on stdout (fields ``estimator, d, q, batch,
cosine_mean, cosine_std, cosine_theory, rel_error, ms_per_estimate, queries_per_s, compile_s,
peak_mem_mb, overhead_vs_api_forward`` and a few more):

* grid rows (``kind="grid"``): every estimator x d x q at a small batch (``--grid-batch`` = 16
  samples, 8 at d = 21168; each sample is an independent estimate for the cosine statistics), all
  directions in one chunk;
* protocol rows (``kind="protocol"``): the issue's targets at B = 150, q = 100: d = 3072 for every
  estimator (overhead ratio; ``--chunk-3072`` = 10 directions per API call, i.e. 1,500 images) and
  d = 21168, the MiniImageNet size (peak memory with ``--chunk-21168`` = 5: 750 images per call),
  for ``--big-estimators`` (sphere-forward, the BiDf-MKD estimator, by default).

Measurement (all in one process, jitted, AOT-compiled first):

* ``ms_per_estimate``: median over ``--repeats`` (protocol) / ``--grid-repeats`` (grid) runs of
  the compiled estimate (all chunks), after one untimed execution; ``queries_per_s =
  num_queries / time``.
* ``overhead_vs_api_forward``: that time over the median time of a jitted baseline that makes the
  SAME API forward passes in the same batches (the clean batch, then one call per chunk of
  ``B * chunk`` (forward) or ``2 * B * chunk`` (central) points of ``x`` shifted by the chunk
  index) through the same API, runs interleaved with the estimate's. 1.0 is the physical limit.
* ``compile_s``: ``jax.jit(...).lower(...).compile()`` wall time.
* ``peak_mem_mb``: peak memory of one execution of the compiled estimate (the first). On CPU: the
  resident-set high-water mark, reset before the run, minus the resident set before it
  (``peak_mem_method="rss_hwm_delta"``; XLA's CPU ``memory_analysis()`` reports no temporaries);
  on GPU the allocator's ``peak_bytes_in_use``. ``peak_mem_api_forward_mb`` is the same for the
  baseline (the API forward passes alone).
* ``cosine_*`` / ``rel_error``: per-sample cosine and ``||g_hat - g|| / ||g||`` to the true
  gradient (mean, std over the batch); ``cosine_theory`` is the exact E[cos] for exact
  directional derivatives (Beta distributions of zo_estimators.md section 3.1).

Outputs under ``--out DIR``: ``bench_estimators.jsonl``, ``bench_estimators.md`` (markdown table),
``cosine_vs_q.png`` (cosine vs q per d, with the exact theory curves).

Command lines::

    python experiments/bench/bench_estimators.py --quick --out runs/bench_estimators_quick   # < 1 min
    python experiments/bench/bench_estimators.py --out runs/bench_estimators                  # full grid
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.api import BlackBoxAPI
from dfml_jax.estimators import ESTIMATOR_SPECS, num_queries, zo_gradient

REQUIRED = ("sphere-forward", "gaussian-forward", "gaussian-central", "orthogonal-central",
            "coordinate-central")
SHAPES = {64: (8, 8, 1), 784: (28, 28, 1), 3072: (32, 32, 3), 21168: (84, 84, 3)}
NUM_CLASSES = 5


# ----------------------------------------------------------------------------- theory
def expected_cosine(d: int, q: int, family: str) -> float:
    """Exact E[cos] with exact directional derivatives (zo_estimators.md section 3.1).

    i.i.d. directions: cos^2 ~ Beta(q/2, (d-1)/2). Orthonormal / coordinate blocks (all q
    directions in one chunk): cos^2 ~ Beta(q/2, (d-q)/2) for q < d; for q = k d + r the estimate is
    proportional to ``k g + P_r g`` with ``P_r`` a Haar rank-r projection, so
    ``cos = (k + t) / sqrt(k^2 + (2k + 1) t)``, ``t ~ Beta(r/2, (d-r)/2)`` (1 when r = 0).
    """
    lg = math.lgamma
    if family in ("orthogonal", "coordinate"):
        if q >= d:
            k, r = divmod(q, d)
            if r == 0:
                return 1.0
            t = np.random.default_rng(0).beta(r / 2, (d - r) / 2, size=200_000)
            return float(np.mean((k + t) / np.sqrt(k * k + (2 * k + 1) * t)))
        a, b = q / 2, (d - q) / 2
    else:
        a, b = q / 2, (d - 1) / 2
    # E[sqrt(X)], X ~ Beta(a, b) = B(a + 1/2, b) / B(a, b)
    return math.exp(lg(a + 0.5) + lg(a + b) - lg(a) - lg(a + b + 0.5))


# ----------------------------------------------------------------------------- black box
def make_teacher(shape, key, conv_impl: str):
    """Returns ``(forward, model_name)``: a jittable ``x -> logits`` of a random-init Conv4."""
    try:
        from dfml_jax.models import create_model, functional
    except ImportError:  # pragma: no cover - stand-in while dfml_jax.models is not available
        return _standin_cnn(shape, key), "standin-cnn"
    depth = 4 if min(shape[:2]) >= 16 else 3
    model = create_model("conv4", num_classes=NUM_CLASSES, input_shape=shape, rngs_or_key=key,
                         depth=depth, conv_impl=conv_impl)
    fm = functional(model)
    return (lambda x: fm.apply(fm.params, fm.state, x, train=False)[0]), f"conv4-d{depth}-{conv_impl}"


def _standin_cnn(shape, key):
    h, w, c = shape
    ks = jax.random.split(key, 3)
    k1 = jax.random.normal(ks[0], (3, 3, c, 16)) * math.sqrt(2 / (9 * c))
    k2 = jax.random.normal(ks[1], (3, 3, 16, 32)) * math.sqrt(2 / (9 * 16))
    wl = jax.random.normal(ks[2], (32, NUM_CLASSES)) / math.sqrt(32)

    def fwd(x):
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.nn.relu(jax.lax.conv_general_dilated(x, k1, (1, 1), "SAME", dimension_numbers=dn))
        y = jax.nn.relu(jax.lax.conv_general_dilated(y, k2, (2, 2), "SAME", dimension_numbers=dn))
        return jnp.max(y, axis=(1, 2)) @ wl

    return fwd


def ce_objective(logits, y):
    return -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), y]


# ----------------------------------------------------------------------------- timing helpers
def _block(x):
    return jax.block_until_ready(x)


def _compiled(fn, *args):
    t0 = time.perf_counter()
    c = jax.jit(fn).lower(*args).compile()
    return c, time.perf_counter() - t0


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_memory_mb(run) -> tuple:
    """Peak extra memory while ``run()`` executes, and how it was measured.

    Accelerators: the device allocator's ``peak_bytes_in_use`` (``memory_stats()``; a high-water
    mark of the process, not reset). CPU (Linux): the resident-set high-water mark is reset
    (``/proc/self/clear_refs``), ``run()`` executes, and the result is ``VmHWM - VmRSS`` before:
    the working memory of that execution (XLA's CPU buffers are allocated per execution and large
    ones are returned to the OS, so this is the buffer peak; CPU ``memory_analysis()`` reports 0
    temporaries, so it cannot be used).
    """
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        out = _block(run())
        return out, jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2 ** 20, "device_peak"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_mb("VmRSS")
        out = _block(run())
        return out, _proc_status_mb("VmHWM") - before, "rss_hwm_delta"
    except OSError:
        return _block(run()), float("nan"), "unavailable"


def interleaved_medians(fns, repeats: int, warm=None):
    """Median wall time (ms) of each zero-argument function, runs interleaved to share load drift.

    ``warm[i]`` False skips the warm-up run of function ``i`` (it already ran once compiled).
    """
    for i, fn in enumerate(fns):
        if warm is None or warm[i]:
            _block(fn())
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            _block(fn())
            ts[i].append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in ts]


def baseline_forward(api, name: str, num_directions: int, chunk_size):
    """The API forward passes an estimate makes, with the same batches, and nothing else."""
    spec = ESTIMATOR_SPECS[name]
    q = num_directions
    c = q if chunk_size is None else min(chunk_size, q)
    n_full, rem = divmod(q, c)
    mult = 1 if spec.scheme == "forward" else 2

    def run(x):
        acc = jnp.sum(api(x)) if spec.scheme == "forward" else jnp.float32(0.0)

        def call(i, count):
            pts = x[None] + (1e-3 * (i + 1)) * jnp.ones((mult * count,) + (1,) * x.ndim, x.dtype)
            return jnp.sum(jax.vmap(api)(pts))

        if n_full == 1:
            acc = acc + call(0, c)
        else:
            acc = acc + jax.lax.scan(lambda a, i: (a + call(i, c), None), jnp.float32(0.0),
                                     jnp.arange(n_full))[0]
        if rem:
            acc = acc + call(n_full, rem)
        return acc

    return run


# ----------------------------------------------------------------------------- one row
def bench_row(*, name, d, q, batch, smoothing, chunk_size, repeats, conv_impl, seed, kind,
              time_it=True):
    shape = SHAPES[d]
    key = jax.random.key(seed)
    k_model, k_x, k_est = jax.random.split(key, 3)
    forward, model_name = make_teacher(shape, k_model, conv_impl)
    api = BlackBoxAPI.from_jax(forward, shape, NUM_CLASSES, name=f"conv4-{d}")
    x = jax.nn.sigmoid(jax.random.normal(k_x, (batch,) + shape))
    y = jnp.arange(batch) % NUM_CLASSES

    def estimate(x, y, k):
        r = zo_gradient(lambda p: ce_objective(api(p), y), x, k, estimator=name, num_directions=q,
                        smoothing=smoothing, chunk_size=chunk_size, on_zero_differences="ignore")
        return r.grad, r.zero_difference_fraction

    est_c, compile_s = _compiled(estimate, x, y, k_est)
    # first execution: also gives the estimate for the cosine statistics
    (g_hat, zero_frac), peak, peak_how = peak_memory_mb(lambda: est_c(x, y, k_est))
    g_true = jax.jit(jax.grad(lambda p: ce_objective(forward(p), y).sum()))(x)
    gh, gt = np.asarray(g_hat).reshape(batch, -1), np.asarray(g_true).reshape(batch, -1)
    nt = np.linalg.norm(gt, axis=1)
    cos = np.sum(gh * gt, 1) / (np.linalg.norm(gh, axis=1) * nt)
    rel = np.linalg.norm(gh - gt, axis=1) / nt
    nq = num_queries(name, batch, q)

    row = dict(kind=kind, estimator=name, d=d, q=q, batch=batch, chunk_size=chunk_size,
               smoothing=smoothing, model=model_name,
               cosine_mean=float(cos.mean()), cosine_std=float(cos.std()),
               cosine_theory=expected_cosine(d, q, ESTIMATOR_SPECS[name].family),
               rel_error=float(rel.mean()), zero_difference_fraction=float(zero_frac),
               num_queries=nq, compile_s=compile_s, peak_mem_mb=peak, peak_mem_method=peak_how)
    if time_it:
        base = jax.jit(baseline_forward(api, name, q, chunk_size))
        _, row["peak_mem_api_forward_mb"], _ = peak_memory_mb(lambda: base(x))   # also warms up
        t_est, t_base = interleaved_medians([lambda: est_c(x, y, k_est), lambda: base(x)], repeats,
                                            warm=[False, False])
        row.update(ms_per_estimate=t_est, ms_api_forward=t_base,
                   queries_per_s=nq / (t_est / 1e3), overhead_vs_api_forward=t_est / t_base)
    else:
        row.update(ms_per_estimate=None, ms_api_forward=None, queries_per_s=None,
                   overhead_vs_api_forward=None)
    row.update(repeats=repeats if time_it else 0)
    return row


# ----------------------------------------------------------------------------- outputs
COLUMNS = ["kind", "estimator", "d", "q", "batch", "chunk_size", "cosine_mean", "cosine_std",
           "cosine_theory", "rel_error", "ms_per_estimate", "queries_per_s", "compile_s",
           "peak_mem_mb", "overhead_vs_api_forward"]


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def write_markdown(path, rows, meta):
    lines = ["# Zero-order estimator benchmark", "",
             f"Device: {meta['device']}; jax {meta['jax']}; {meta['note']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["kind"] == "grid"]
    ds = sorted({r["d"] for r in grid})
    if not ds:
        return
    fig, axes = plt.subplots(1, len(ds), figsize=(4.2 * len(ds), 3.6), squeeze=False)
    for ax, d in zip(axes[0], ds):
        sub = [r for r in grid if r["d"] == d]
        for name in sorted({r["estimator"] for r in sub}):
            pts = sorted((r["q"], r["cosine_mean"], r["cosine_std"] / math.sqrt(r["batch"]))
                         for r in sub if r["estimator"] == name)
            qs, cs, es = zip(*pts)
            ax.errorbar(qs, cs, yerr=es, marker="o", ms=3, capsize=2, label=name)
        qq = np.unique(np.geomspace(1, max(r["q"] for r in sub), 40).round().astype(int))
        ax.plot(qq, [expected_cosine(d, int(v), "sphere") for v in qq], "k--", lw=1,
                label="theory i.i.d.")
        ax.plot(qq, [expected_cosine(d, int(v), "orthogonal") for v in qq], "k:", lw=1,
                label="theory orthogonal")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"d = {d}")
        ax.set_xlabel("directions q")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("mean cosine to true gradient")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid (smoke test, ~1 minute)")
    p.add_argument("--out", default="runs/bench_estimators", help="directory for .md/.png/.jsonl")
    p.add_argument("--estimators", nargs="+", default=list(REQUIRED))
    p.add_argument("--ds", type=int, nargs="+", default=None, help="grid dimensions")
    p.add_argument("--qs", type=int, nargs="+", default=None, help="grid direction counts")
    p.add_argument("--grid-batch", type=int, default=None, help="samples per grid row (16)")
    p.add_argument("--grid-batch-big", type=int, default=8, help="samples per grid row, d=21168")
    p.add_argument("--grid-repeats", type=int, default=1, help="timed runs per grid row (0: none)")
    p.add_argument("--protocol-batch", type=int, default=150)
    p.add_argument("--protocol-q", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per d=3072 protocol row")
    p.add_argument("--repeats-big", type=int, default=1, help="timed runs per d=21168 protocol row")
    p.add_argument("--chunk-3072", type=int, default=10,
                   help="chunk_size of the d=3072 protocol rows (0: all q at once)")
    p.add_argument("--chunk-21168", type=int, default=5,
                   help="chunk_size of the d=21168 protocol rows (memory bound)")
    p.add_argument("--big-estimators", nargs="*", default=None,
                   help="estimators run at d=21168, B=150 (default: sphere-forward)")
    p.add_argument("--no-protocol", action="store_true")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--smoothing", type=float, default=1e-2)
    p.add_argument("--conv-impl", default="lax", choices=["lax", "im2col"])
    p.add_argument("--from-jsonl", default=None,
                   help="rebuild the markdown table and plot from an earlier JSONL (no runs)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    # protocol entries: (d, batch, q, chunk_size, estimators, timed repeats)
    big = a.big_estimators if a.big_estimators is not None else ["sphere-forward"]
    if a.quick:
        ds = a.ds or [64, 784]
        qs = a.qs or [1, 10]
        prot = [(784, 8, 4, 2, a.estimators[:2], 1)]
    else:
        ds = a.ds or [64, 784, 3072, 21168]
        qs = a.qs or [1, 10, 20, 100]
        prot = [(3072, a.protocol_batch, a.protocol_q, a.chunk_3072 or None, a.estimators,
                 a.repeats),
                (21168, a.protocol_batch, a.protocol_q, a.chunk_21168 or None, big, a.repeats_big)]
    gb = a.grid_batch or (8 if a.quick else 16)
    gb_big = a.grid_batch_big or gb
    if a.no_protocol:
        prot = []
    if a.no_grid:
        ds = []

    os.makedirs(a.out, exist_ok=True)
    if a.from_jsonl:
        with open(a.from_jsonl) as f:
            rows = [json.loads(line) for line in f if line.startswith('{"kind"')]
        for r in rows:
            r["cosine_theory"] = expected_cosine(r["d"], r["q"], ESTIMATOR_SPECS[r["estimator"]].family)
        meta = dict(device=f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores)",
                    jax=jax.__version__, note=f"rebuilt from {a.from_jsonl}")
        write_markdown(os.path.join(a.out, "bench_estimators.md"), rows, meta)
        plot(os.path.join(a.out, "cosine_vs_q.png"), rows)
        return rows
    meta = dict(device=f"{jax.devices()[0].device_kind} x{jax.device_count()} "
                       f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                jax=jax.__version__,
                note=f"grid batch {gb}, smoothing {a.smoothing}, conv {a.conv_impl}")
    rows = []
    jsonl = open(os.path.join(a.out, "bench_estimators.jsonl"), "w")

    def emit(row):
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        jsonl.write(line + "\n")
        jsonl.flush()

    t_start = time.perf_counter()
    for d in ds:
        for q in qs:
            for name in a.estimators:
                emit(bench_row(name=name, d=d, q=q, batch=gb_big if d >= 10000 else gb,
                               smoothing=a.smoothing, chunk_size=None, repeats=a.grid_repeats,
                               conv_impl=a.conv_impl, seed=a.seed, kind="grid",
                               time_it=a.grid_repeats > 0))
    for d, b, q, chunk, names, reps in prot:
        for name in names:
            emit(bench_row(name=name, d=d, q=q, batch=b, smoothing=a.smoothing, chunk_size=chunk,
                           repeats=reps, conv_impl=a.conv_impl, seed=a.seed, kind="protocol",
                           time_it=reps > 0))
    jsonl.close()
    meta["note"] += f"; total {time.perf_counter() - t_start:.0f} s"
    write_markdown(os.path.join(a.out, "bench_estimators.md"), rows, meta)
    plot(os.path.join(a.out, "cosine_vs_q.png"), rows)
    print(json.dumps(dict(summary=meta, out=a.out)), flush=True)
    return rows


if __name__ == "__main__":
    main()
