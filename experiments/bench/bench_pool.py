"""Benchmark: 20 Conv4 teachers trained as ONE vmapped population vs one at a time.

All modes run in the same process on the same data, with the same recipe (Adam 0.01, batch 128,
clip 50) and the same number of epochs:

* ``population_vmap``: the 20 teachers vectorised with ``jax.vmap`` in one jitted epoch;
* ``population_map``: one jitted epoch looping over the teachers (``lax.map``);
* ``population_map_sharded`` / ``population_vmap_sharded`` (with ``--cpu-devices N``): the
  teacher axis split over N emulated CPU devices (``train_population(devices=N)``: ``shard_map``
  on a ``"teachers"`` mesh, each device looping / vectorising over its 20/N teachers in its own
  thread);
* ``sequential``: one teacher at a time (an unbatched program, compiled once and reused);
* ``sequential_lax`` (with ``--lax-reference``): the same with ``lax.conv`` instead of the default
  im2col convolution. A single jitted ``lax.conv`` train step is faster than the im2col one on
  CPU (``bench_conv.py``), but inside the trainer's compiled epoch (a ``lax.scan`` over
  mini-batches) XLA:CPU runs the ``lax.conv`` gradients several times slower (measured 5.5x
  slower than im2col sequential below), so im2col sequential is the reference.

Each mode is first compiled with a 1-epoch warm-up; the timed runs then train from the same
initial weights. Reported: medians of ``--reps`` runs, compile times, speed-ups over sequential
with and without compilation, and the maximum difference of the training losses between modes
(they must agree up to float reassociation, amplified by Adam).

Data: per teacher 5 Glyphs classes, 16 training images each (80 images 28x28x1; the 80/20 split of
20 images per class). ``--synthetic`` uses random images of the same shape instead (timing does not
depend on the content) when the data package is unavailable.

Example::

    python experiments/bench/bench_pool.py --epochs 10 --reps 3 --cpu-devices 2

Measured on a quiet machine (jax 0.10.2, 2 CPU cores, load average 1.5 at the start; 20 teachers,
10 epochs, width 32, Glyphs, medians of 3 in the same run)::

    python experiments/bench/bench_pool.py --epochs 10 --reps 3 --cpu-devices 2 \
        --modes sequential,population_map,population_map_sharded,population_vmap_sharded

=================================  ===============  ==========================
mode                               time (s)         compile + 1 epoch (s)
=================================  ===============  ==========================
sequential (im2col, reference)     10.78            7.1
population_map (CPU default)       10.96 (0.98x)    6.1
population_map_sharded, 2 devices  12.04 (0.90x)    6.9
population_vmap_sharded, 2 devs    19.96 (0.54x)    7.1
=================================  ===============  ==========================

On quiet cores a population is no faster than one teacher at a time: the speed-ups measured under
heavy load below (1.35-1.54x) came from the sequential run suffering more from the contention.

Measured under load (jax 0.10.2, 2 CPU cores shared with other jobs, load average 21.6 at the start and
25.3 at the end; 20 teachers, 10 epochs, width 32, Glyphs, medians of 3 in the same run; seconds,
speed-up over sequential in brackets)::

    python experiments/bench/bench_pool.py --epochs 10 --reps 3 --cpu-devices 2 --lax-reference

=================================  ===============  ==========================
mode                               time             compile + 1 epoch
=================================  ===============  ==========================
sequential (im2col, reference)     39.6             14.5
population_map (CPU default)       25.7  (1.54x)    12.5   (1.42x incl. compile)
population_map_sharded, 2 devices  25.7  (1.54x)    15.5   (1.32x incl. compile)
population_vmap                    66.9  (0.59x)    34.0
population_vmap_sharded, 2 devs    32.8  (1.21x)    17.8
sequential_lax                     216.7 (0.18x)    21.9
=================================  ===============  ==========================

Max difference of the training losses between modes: 0.011 (Adam amplifying float reassociation).
An earlier run (load 7.5-8.7) gave sequential 31.4, map 23.3 (1.35x), vmap 39.0 (0.80x).

The 3x goal is NOT met on this machine. Profile (``jax.profiler`` trace of one teacher step, 80
images 28x28, width 32, 1.37 GFLOP by XLA's cost analysis): the step is 130-200 ms of XLA:CPU
kernels against ~1-3 ms of dispatch, so a population has no per-call overhead to amortise. Per
teacher-step (load 43, so inflated): matmul/YNN fusions 64 ms, im2col concatenation/padding and
its gradient 30 ms, other elementwise fusions (BatchNorm, ReLU, max-pool and their gradients)
39 ms, layout copies/transposes 15 ms; inside the population's compiled loop 51 / 23 / 21 / 16 ms
(120 ms in all, the 1.5x of ``population_map``); vectorised (``vmap``) 104 / 67 / 73 / 39 ms
(360 ms per teacher-step: every category about twice as slow as unbatched). Achieved 7-10 GFLOP/s vs 50-100 GFLOP/s for a
large matmul on this CPU. Two thirds of the step are memory-bound fusions that do the same work
per teacher whether the teachers run one at a time, in a compiled loop or vectorised; ``vmap``
makes them and the matmuls batched, which XLA:CPU runs slower per byte and per FLOP (grouped
convolutions, batched dots with transposes). A wide network of stacked channels (im2col +
per-teacher einsum) was 1.6-3x slower per teacher than sequential, ``lax.conv`` with
``feature_group_count=20`` did not compile and run a few steps within 5 minutes, and a
Python-unrolled population (20 independent programs in one jit, so that XLA may run teachers
concurrently) gave 0.94-0.98x at 160-190 s compile time. Splitting the population over 2 emulated
devices (one thread each) cannot add speed while the 2 cores are saturated by other jobs (load
20-25); on an idle machine it is the way to use both cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _REPO)
from dfml_jax.models import create_model, functional, normalize, stack_trees  # noqa: E402
from dfml_jax.teachers.population import recipe_for, train_population  # noqa: E402


def load_data(args, P, way):
    rng = np.random.default_rng(0)
    if args.synthetic:
        x = rng.uniform(size=(P, way * 16, 28, 28, 1)).astype(np.float32)
    else:
        from dfml_jax.data import get_class_splits
        train = get_class_splits(args.dataset)[0]
        xs = []
        for _ in range(P):
            cls = rng.choice(train.num_classes, way, replace=False)
            imgs = np.asarray(train.images_of(list(cls)), np.float32)
            n_tr = int(imgs.shape[1] * 0.8)
            xs.append(imgs[:, :n_tr].reshape(-1, *imgs.shape[2:]))
        x = np.stack(xs)
    n = x.shape[1]
    y = np.tile(np.repeat(np.arange(way), n // way), (P, 1))
    return np.asarray(normalize(jnp.asarray(x), (0.5,), (0.5,))), y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-teachers", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dataset", default="glyphs")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--conv-impl", default=None, help="im2col (default) or lax")
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="also time the population split over this many emulated CPU devices")
    ap.add_argument("--lax-reference", action="store_true",
                    help="also time sequential training with lax.conv (best unbatched program)")
    ap.add_argument("--modes", default=None,
                    help="comma-separated subset of modes to run (sequential always runs)")
    args = ap.parse_args(argv)
    if args.cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    P, way = args.num_teachers, 5
    x, y = load_data(args, P, way)
    shape = x.shape[2:]
    kw = {"width": args.width}
    if args.conv_impl:
        kw["conv_impl"] = args.conv_impl
    fms = [functional(create_model("conv4", num_classes=way, input_shape=shape, rngs_or_key=i, **kw))
           for i in range(P)]
    fm = fms[0]
    params = stack_trees([f.params for f in fms])
    state = stack_trees([f.state for f in fms])
    keys = jnp.stack([jax.random.key(100 + i) for i in range(P)])
    recipe = recipe_for("conv4", epochs=args.epochs)
    warm = recipe_for("conv4", epochs=1)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def population(r, strategy, devices=None):  # devices: a count
        out = train_population(fm, params, state, xj, yj, keys, r, progress=False, devices=devices,
                               strategy=strategy)
        jax.block_until_ready(out.params)
        return out.losses

    fm_lax = functional(create_model("conv4", num_classes=way, input_shape=shape, rngs_or_key=0,
                                     **{**kw, "conv_impl": "lax"}))

    def sequential(r, f=fm):
        losses = []
        for i in range(P):
            sl = lambda t: jax.tree.map(lambda a: a[i:i + 1], t)  # noqa: E731
            out = train_population(f, sl(params), sl(state), xj[i:i + 1], yj[i:i + 1],
                                   keys[i:i + 1], r, progress=False)
            jax.block_until_ready(out.params)
            losses.append(out.losses[:, 0])
        return np.stack(losses, 1)

    res = {"jax": jax.__version__, "cpu_count": os.cpu_count(), "teachers": P,
           "devices": len(jax.devices()),
           "epochs": args.epochs, "images_per_teacher": int(x.shape[1]), "image_shape": list(shape),
           "width": args.width, "data": "synthetic" if args.synthetic else args.dataset,
           "load_avg_start": os.getloadavg()}
    losses = {}
    modes = [("population_vmap", lambda r: population(r, "vmap")),
             ("population_map", lambda r: population(r, "map"))]
    if args.cpu_devices > 1:
        modes += [("population_map_sharded", lambda r: population(r, "map", args.cpu_devices)),
                  ("population_vmap_sharded", lambda r: population(r, "vmap", args.cpu_devices))]
    if args.modes:
        keep = set(args.modes.split(","))
        modes = [m for m in modes if m[0] in keep]
    if args.lax_reference:
        modes.append(("sequential_lax", lambda r: sequential(r, fm_lax)))
    modes.append(("sequential", sequential))
    res["modes"] = [m[0] for m in modes]
    for name, fn in modes:
        t0 = time.perf_counter()
        fn(warm)
        res[f"{name}_compile_and_1_epoch_s"] = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            losses[name] = fn(recipe)
            times.append(time.perf_counter() - t0)
        res[f"{name}_s"] = statistics.median(times)
        res[f"{name}_all_s"] = times
        print(f"[bench_pool] {name}: median {res[f'{name}_s']:.2f}s over {args.reps} runs",
              file=sys.stderr, flush=True)
    for name, _ in modes[:-1]:
        res[f"speedup_{name}"] = res["sequential_s"] / res[f"{name}_s"]
        res[f"speedup_{name}_including_compile"] = (
            (res["sequential_s"] + res["sequential_compile_and_1_epoch_s"])
            / (res[f"{name}_s"] + res[f"{name}_compile_and_1_epoch_s"]))
    res["max_abs_loss_diff"] = float(max(np.max(np.abs(losses[m] - losses["sequential"]))
                                         for m in losses))
    res["load_avg_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
