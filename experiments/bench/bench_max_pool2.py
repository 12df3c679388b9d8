"""Two forms of the 2x2 max pool: correctness of second derivatives under jit, and speed.

``layers.max_pool2`` is the elementwise maximum of the four strided sub-grids, with ``jnp.max``'s
derivative (ties share the tangent equally) as its custom JVP, so its values and gradients are
bit-identical to the replaced form wherever that one is compiled correctly. The form it
replaced (reshape to ``(N, H/2, 2, W/2, 2, C)`` + ``jnp.max``) is kept here only for comparison:
XLA:CPU compiled its second derivative wrongly inside a Conv4 of width 32 on 16x16 inputs.

Prints JSON (``--out`` also writes it):

* ``hvp_rel_diff_jit_vs_eager``: Hessian-vector product of a Conv4 (width 32, 16x16x3, 5 images)
  under ``jit`` and eager, relative L2 difference, per form, each setting in a fresh process:
  float32 and float64 on one CPU device, float32 on 8 emulated CPU devices (as in the tests'
  ``conftest.py``). Where the two differ, the eager value is the right one (it agrees with
  central finite differences in float64).
* ``rows``: interleaved timings (old, new, old, ...; ``--rounds``) at the sizes of
  ``bench_torch_reference.py``: the replay meta-iteration (4 tasks, 5-way 1-shot 15-query, 5
  second-order steps), the KD task (150 + 150 images, 10 second-order steps) and the API forward
  on 3,000 images (what the zero-order inversion spends its time on); medians, ratio old/new
  (above 1: the new form is faster), the load before and after.

Command line::

    python experiments/bench/bench_max_pool2.py --rounds 5 --out docs/bench_max_pool2.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import dfml_jax.models.classifiers as classifiers
from dfml_jax.bidf_mkd.metastep import KDTask, ReplayTasks, kd_task_loss, replay_loss
from dfml_jax.models import create_model, functional, layers


def reshape_max_pool2(x):
    """The replaced form: reshape + jnp.max (miscompiled in second derivatives, see above)."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    return jnp.max(x.reshape(n, h2, 2, w2, 2, c), axis=(2, 4))


FORMS = {"old_reshape_max": reshape_max_pool2, "new_strided_maximum": layers.max_pool2}


def conv4(shape, classes=5, width=32):
    """A Conv4; its blocks look ``classifiers.max_pool2`` up when traced (see :func:`with_pool`)."""
    return functional(create_model("conv4", num_classes=classes, input_shape=shape, rngs_or_key=3,
                                   width=width))


def with_pool(pool, fn):
    """``fn`` run (and so traced) with ``pool`` as the Conv4's max pool, restored afterwards."""
    def run(*args):
        classifiers.max_pool2 = pool
        try:
            return fn(*args)
        finally:
            classifiers.max_pool2 = layers.max_pool2
    return run


def hvp_check(pool) -> float:
    fm = conv4((16, 16, 3))
    rng = np.random.default_rng(0)
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    params = jax.tree.map(lambda a: jnp.asarray(a, dt), fm.params)
    x = jnp.asarray(rng.standard_normal((5, 16, 16, 3)), dt)
    y = jnp.arange(5)
    d = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), dt), params)

    def loss(p):
        logits = fm.apply_batchstats(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    hvp = with_pool(pool, lambda p: jax.jvp(jax.grad(loss), (p,), (d,))[1])
    jitted = jax.jit(hvp)(params)
    with jax.disable_jit():
        eager = hvp(params)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(jitted),
                                                            jax.tree.leaves(eager)))
    den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(eager))
    return (num / den) ** 0.5


HVP_SETTINGS = {"float32, 1 device": {},
                "float64, 1 device": {"JAX_ENABLE_X64": "1"},
                "float32, 8 emulated devices": {
                    "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}}


def hvp_checks() -> dict:
    """:func:`hvp_check` of each form in each setting, one fresh process per setting."""
    out = {}
    for name, env in HVP_SETTINGS.items():
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--hvp-only"],
                              env={**os.environ, **env}, capture_output=True, text=True,
                              check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def timed_rows(pool):
    rng = np.random.default_rng(0)
    s, c, k = 32, 3, 5
    rt = ReplayTasks(jnp.asarray(rng.standard_normal((4, 5, s, s, c)), jnp.float32),
                     jnp.asarray(np.tile(np.arange(5), (4, 1)), jnp.int32),
                     jnp.asarray(rng.standard_normal((4, 75, s, s, c)), jnp.float32),
                     jnp.asarray(np.tile(np.repeat(np.arange(5), 15), (4, 1)), jnp.int32))
    p = jax.nn.softmax(jnp.asarray(rng.standard_normal((150, k)), jnp.float32) * 3)
    kt = KDTask(jnp.asarray(rng.standard_normal((150, s, s, c)), jnp.float32), p,
                jnp.asarray(rng.standard_normal((150, s, s, c)), jnp.float32), p,
                jnp.argmax(p, -1))
    xf = jnp.asarray(rng.standard_normal((3000, s, s, c)), jnp.float32)
    fm = conv4((s, s, c))
    ap = fm.apply_batchstats
    rows = {
        "replay_meta_iteration": jax.jit(with_pool(pool, jax.value_and_grad(
            lambda q: replay_loss(ap, q, rt, steps=5, lr=0.01)[0]))),
        "kd_task": jax.jit(with_pool(pool, jax.value_and_grad(
            lambda q: kd_task_loss(ap, q, kt, steps=10, lr=0.01)[0]))),
        "api_forward_3000": jax.jit(with_pool(pool, lambda q: ap(q, xf)))}
    for f in rows.values():                                  # compile + one warm-up call
        jax.block_until_ready(f(fm.params))
        jax.block_until_ready(f(fm.params))
    return rows, fm.params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--hvp-only", action="store_true",
                    help="print the Hessian-vector-product check of this process's settings")
    args = ap.parse_args(argv)
    if args.hvp_only:
        if os.environ.get("JAX_ENABLE_X64"):
            jax.config.update("jax_enable_x64", True)
        print(json.dumps({n: hvp_check(f) for n, f in FORMS.items()}))
        return
    out = {"hvp_rel_diff_jit_vs_eager": hvp_checks()}
    built = {n: timed_rows(f) for n, f in FORMS.items()}
    load_before = os.getloadavg()
    times = {n: {r: [] for r in built[n][0]} for n in FORMS}
    for _ in range(args.rounds):
        for row in times["old_reshape_max"]:
            for n in FORMS:
                f, params = built[n][0][row], built[n][1]
                t0 = time.perf_counter()
                jax.block_until_ready(f(params))
                times[n][row].append(1e3 * (time.perf_counter() - t0))
    old, new = times["old_reshape_max"], times["new_strided_maximum"]
    out["rows"] = {r: {"old_ms": round(float(np.median(old[r])), 1),
                       "new_ms": round(float(np.median(new[r])), 1),
                       "old_over_new": round(float(np.median(old[r]) / np.median(new[r])), 3)}
                   for r in old}
    load_after = os.getloadavg()
    out.update(rounds=args.rounds, jax=jax.__version__, device=str(jax.devices()[0]),
               cores=len(os.sched_getaffinity(0)), load_before=load_before,
               load_after=load_after,
               loaded=max(load_before[0], load_after[0]) > len(os.sched_getaffinity(0)))
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
