"""Why does hard-label distillation on mnist5k stay far below the field? Cheap separating probes.

Each probe labels a FIXED pool of images with the ``default`` teacher (LeNet-5 16/32 trained on
the 4,000 mnist5k training digits; the same teacher ``experiments/distill.py --config default``
trains) and trains the default student (LeNet-5 6/16) on that pool to convergence, so that the
pool's information and the student's optimisation are measured separately from IDEAL's online
loop. Written up in ``docs/ideal_diagnosis.md``.

Probes (``--probe``):

* ``pools``: pools of N images of one kind, labelled by the teacher (each image queried once):
  ``uniform`` (NaiveKD's U[0,1] noise), ``gauss`` (N(0,1) in the normalised space of MNIST,
  i.e. 0.1307 + 0.3081 z, clipped to [0,1]), ``lowfreq`` (7x7 uniform noise upsampled),
  ``sparse`` (U^6: mostly dark), ``strokesS`` (random drawings of S pen strokes, NaiveKD's
  ``noise="strokes"``), ``real`` (training digits, each once, repeated),
  ``real_aug`` (random training digits, random shift of up to 3 pixels), ``real_mix``
  (convex mixtures of two training digits), ``ideal`` (the pool an IDEAL run bought, read from
  ``--ideal-pool DIR``). Prints the teacher's label histogram and the student's best
  validation accuracy (and test accuracy at that epoch) after training on the pool.
* ``proxy``: IDEAL's generation phase against a FIXED proxy (the student architecture trained on
  the real training digits, or the teacher-sized one with ``--proxy-channels 16 32``) instead of
  the online student: the label histogram of what the generator makes when its proxy shares the
  teacher's classes, and the student trained on that pool.

* ``loop``: the online IDEAL / NaiveKD loop (``run_pool_distillation``) for config variants
  (``--variants`` JSON ``{name: {IDEALConfig_field: value, "synth": "noise"?}}``) at
  one budget (``--budget``), the teacher shared: best VALIDATION accuracy within 5K and within
  the budget, the pool's label histogram, and the curve of (queries, val %, student/teacher
  agreement on the round's new images).

Commands (from the repository root, ``PYTHONPATH=.``)::

    python experiments/diagnose_ideal.py --probe pools --kinds uniform gauss real_aug --n 25000
    python experiments/diagnose_ideal.py --probe pools --kinds strokes2 strokes3 real_aug gauss \
        --n 25000 --steps 2000
    python experiments/diagnose_ideal.py --probe proxy --n 5000 --gen-bias -2
    python experiments/diagnose_ideal.py --probe loop --budget 25000 --seed 0 \
        --variants '{"bias-2": {"gen_bias": -2.0, "targets": "pool_balancing"}}'
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs.distill_configs import get_config  # noqa: E402

from dfml_jax.distill.common import (Evaluator, augment_images, make_generator,  # noqa: E402
                                     torch_sgd, train_supervised)
from dfml_jax.distill.experiment import build, get_teacher, load_data  # noqa: E402
from dfml_jax.distill.generation import make_generation_phase, noise_images  # noqa: E402
from dfml_jax.distill.ideal import IDEALConfig  # noqa: E402
from dfml_jax.experiment import RunDir  # noqa: E402
from dfml_jax.models import set_default_conv_impl  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def make_pool(kind, n, data, key):
    """``n`` unlabelled images of one kind, float32 in [0, 1]."""
    shape = data["input_shape"]
    x_fit = jnp.asarray(data["x_fit"])
    k1, k2, k3 = jax.random.split(key, 3)
    if kind == "uniform":
        return jax.random.uniform(k1, (n,) + shape)
    if kind == "gauss":
        return jnp.clip(MEAN + STD * jax.random.normal(k1, (n,) + shape), 0.0, 1.0)
    if kind == "lowfreq":           # smooth blobs: 7x7 uniform noise upsampled bilinearly
        small = jax.random.uniform(k1, (n, 7, 7) + shape[2:])
        return jax.image.resize(small, (n,) + shape, "bilinear")
    if kind == "sparse":            # mostly black, a few bright pixels (digit-like statistics)
        return jax.random.uniform(k1, (n,) + shape) ** 6
    if kind.startswith("strokes"):  # "strokesS": random drawings of S pen strokes (S: 3)
        icfg = IDEALConfig(noise="strokes", num_strokes=int(kind[len("strokes"):] or 3))
        return jnp.concatenate([noise_images(icfg, jax.random.fold_in(k1, i), min(2500, n - i),
                                             shape) for i in range(0, n, 2500)])
    if kind == "real":
        idx = jnp.arange(n) % x_fit.shape[0]
        return x_fit[idx]
    if kind == "real_aug":
        idx = jax.random.randint(k1, (n,), 0, x_fit.shape[0])
        return augment_images(x_fit[idx], k2, "crop", 3)
    if kind == "real_mix":
        i = jax.random.randint(k1, (n,), 0, x_fit.shape[0])
        j = jax.random.randint(k2, (n,), 0, x_fit.shape[0])
        lam = jax.random.uniform(k3, (n, 1, 1, 1))
        return lam * x_fit[i] + (1 - lam) * x_fit[j]
    raise ValueError(kind)


def label(teacher, x, chunk=2500):
    fm, params, bn = teacher[:3]
    f = jax.jit(lambda xb: jnp.argmax(fm.apply(params, bn, xb, train=False)[0], -1))
    return jnp.concatenate([f(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def fit_student(cfg, data, x, y, steps, lr, batch, seed):
    """Student trained on a fixed labelled pool for about ``steps`` SGD steps (val-selected)."""
    student = build(cfg.student_arch, cfg.student_kw, data, seed)
    ev = Evaluator(student, {"val": (data["x_val"], data["y_val"]),
                             "test": (data["x_test"], data["y_test"])})
    epochs = max(1, round(steps * batch / x.shape[0]))
    t0 = time.perf_counter()
    _, _, hist = train_supervised(student, torch_sgd(lr, 0.9, 5e-4), np.asarray(x),
                                  np.asarray(y), epochs=epochs, batch_size=batch,
                                  key=jax.random.key(seed), evaluator=ev)
    best = max(hist, key=lambda h: h["val_acc"])
    return {"epochs": epochs, "best_val": 100 * best["val_acc"],
            "test_at_best_val": 100 * best["test_acc"], "best_epoch": best["epoch"],
            "final_val": 100 * hist[-1]["val_acc"], "final_train_loss": hist[-1]["loss"],
            "fit_seconds": round(time.perf_counter() - t0)}


def hist_of(y, k=10):
    return np.bincount(np.asarray(y), minlength=k).tolist()


def load_ideal_pool(d):
    xs, ys = [], []
    for f in sorted(glob.glob(os.path.join(d, "round_*.npz"))):
        z = np.load(f)
        xs.append(z[[k for k in z.files if k.startswith("x")][0]])
        ys.append(z[[k for k in z.files if k.startswith("y") or k.startswith("ans")][0]])
    x = np.concatenate(xs)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    return jnp.asarray(x), jnp.asarray(np.concatenate(ys))


def proxy_pool(cfg, data, teacher, n, seed, channels, g_steps, lr, log, gen_bias=0.0):
    """IDEAL's generation against a fixed proxy trained on real data; the teacher labels it."""
    pcfg = dataclasses.replace(cfg, student_kw={"channels": list(channels)})
    proxy = build(pcfg.student_arch, pcfg.student_kw, data, seed)
    pparams, pbn, _ = train_supervised(proxy, torch_sgd(0.05, 0.9, 5e-4), data["x_fit"],
                                       data["y_fit"], epochs=10, batch_size=128,
                                       key=jax.random.key(seed))
    pacc = Evaluator(proxy, {"val": (data["x_val"], data["y_val"])})(pparams, pbn)["val_acc"]
    log(f"proxy {channels} trained on real digits: val {100 * pacc:.1f}")
    icfg = IDEALConfig(batch_size=cfg.ideal.batch_size, g_steps=g_steps, nz=cfg.ideal.nz,
                       ngf=cfg.ideal.ngf, gen_head=cfg.ideal.gen_head, gen_bias=gen_bias)
    gen_fm = make_generator(icfg, data["input_shape"])[1]
    phase = make_generation_phase(proxy, gen_fm, icfg, data["num_classes"], data["input_shape"])
    xs = []
    for r in range(n // icfg.batch_size):
        x, _, _ = phase(pparams, pbn, jax.random.fold_in(jax.random.key(seed + 7), r))
        xs.append(x)
    x = jnp.concatenate(xs)
    yp = label((proxy, pparams, pbn), x)
    return x, yp, pacc


def run_loop(base, data, teacher, budget, variants, seed, log):
    """The online loop for each variant; validation only (the test split is not read here)."""
    from dfml_jax.distill.experiment import ideal_config, make_api
    from dfml_jax.distill.ideal import run_pool_distillation

    out = []
    for name, over in variants.items():
        over = dict(over)
        synth = over.pop("synth", "generator")
        cfg = dataclasses.replace(base, seed=seed, ideal=dataclasses.replace(base.ideal, **over))
        student = build(cfg.student_arch, cfg.student_kw, data, cfg.seed)
        ev = Evaluator(student, {"val": (data["x_val"], data["y_val"])})
        icfg = dataclasses.replace(ideal_config(cfg, synth), eval_every=2)
        api = make_api(teacher[:3], data, "label", budget, "teacher")
        t0 = time.perf_counter()
        r = run_pool_distillation(api, student, icfg, seed=seed, evaluator=ev,
                                  eval_budgets=(5000, budget))
        pts = [p for p in r.curve if "val_acc" in p]
        best5 = max((p for p in pts if p["queries"] <= 5000), key=lambda p: p["val_acc"])
        best = max(pts, key=lambda p: p["val_acc"])
        h = np.array(r.class_histogram)
        rec = {"probe": "loop", "variant": name, "synth": synth, "over": over, "seed": seed,
               "budget": budget, "queries": r.queries,
               "best_val_5k": round(100 * best5["val_acc"], 1),
               "best_val": round(100 * best["val_acc"], 1), "at": best["queries"],
               "hist": h.tolist(), "hist_pct": (100 * h / h.sum()).round(1).tolist(),
               "seconds": round(time.perf_counter() - t0),
               "curve": [(p["queries"], round(100 * p["val_acc"], 1),
                          round(p.get("student_teacher_agree", float("nan")), 2)) for p in pts]}
        log(json.dumps(rec))
        out.append(rec)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", choices=("pools", "proxy", "loop"), required=True)
    p.add_argument("--budget", type=int, default=5000, help="loop: queries")
    p.add_argument("--variants", default='{"default": {}}', help="loop: JSON of variants")
    p.add_argument("--kinds", nargs="+", default=["uniform", "gauss", "real", "real_aug",
                                                  "real_mix"])
    p.add_argument("--n", type=int, nargs="+", default=[25_000])
    p.add_argument("--steps", type=int, default=400, help="student SGD steps per fit")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--no-fit", action="store_true", help="label histograms only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ideal-pool", default=None, help="pool/ directory of an IDEAL run")
    p.add_argument("--proxy-channels", type=int, nargs=2, default=[6, 16])
    p.add_argument("--g-steps", type=int, default=5)
    p.add_argument("--gen-bias", type=float, default=0.0, help="IDEALConfig.gen_bias (proxy)")
    p.add_argument("--teacher-dir", default="/tmp/ideal_teacher")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)

    cfg = get_config("default")
    set_default_conv_impl(cfg.conv_impl)

    def log(m):
        print(m, flush=True)

    data = load_data(cfg)
    teacher = get_teacher(cfg, RunDir(args.teacher_dir, cfg), data, log)
    key = jax.random.key(args.seed)
    results = []
    if args.probe == "loop":
        results = run_loop(cfg, data, teacher, args.budget, json.loads(args.variants), args.seed,
                           log)
    elif args.probe == "pools":
        for kind in args.kinds:
            for n in args.n:
                if kind == "ideal":
                    x, y = load_ideal_pool(args.ideal_pool)
                    x, y = x[:n], y[:n]
                else:
                    x = make_pool(kind, n, data, jax.random.fold_in(key, hash(kind) % 1000))
                    y = label(teacher, x)
                rec = {"probe": "pools", "kind": kind, "n": int(x.shape[0]), "hist": hist_of(y)}
                if not args.no_fit:
                    rec.update(fit_student(cfg, data, x, y, args.steps, args.lr, args.batch,
                                           args.seed))
                log(json.dumps(rec))
                results.append(rec)
    else:
        for n in args.n:
            x, yp, pacc = proxy_pool(cfg, data, teacher, n, args.seed, args.proxy_channels,
                                     args.g_steps, args.lr, log, args.gen_bias)
            y = label(teacher, x)
            rec = {"probe": "proxy", "proxy_channels": args.proxy_channels, "n": n,
                   "g_steps": args.g_steps, "gen_bias": args.gen_bias, "proxy_val": 100 * pacc,
                   "hist": hist_of(y),
                   "proxy_hist": hist_of(yp),
                   "teacher_proxy_agree": 100 * float(jnp.mean(y == yp))}
            if not args.no_fit:
                rec.update(fit_student(cfg, data, x, y, args.steps, args.lr, args.batch,
                                       args.seed))
            log(json.dumps(rec))
            results.append(rec)
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
