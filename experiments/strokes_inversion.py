"""Invert a small Glyphs teacher with the DCGAN and the stroke generator; save both batches as PNG.

Command line::

    python experiments/strokes_inversion.py --png /tmp/strokes_inversion.png

Trains a Conv4 teacher (width 32) on ``--ways`` random meta-train Glyphs classes (its 20
instances per class, all used for training; a few hundred full-batch Adam steps), then runs ONE
BiDf-MKD inversion call (:func:`dfml_jax.bidf_mkd.make_inverter`, white-box by default: the
teacher's true gradient, the upper bound; ``--black-box`` uses the zero-order estimate) for each
generator setting in ``--settings`` (``name:lr``, names ``dcgan``, ``strokes`` (linear latent),
``strokes_direct``). Prints one JSON line per setting: final clean CE, teacher accuracy on the
targets, seconds. The PNG has one block per setting (rows: classes; columns: instances) above
the teacher's training glyphs.

Measured (seed 0: the same teacher in every run; 5 classes x 8 images, 150 iterations, q = 50
directions; 2 CPU cores shared with other jobs, so seconds are rough; CE = mean clean CE of the
last 10 iterates, acc = the teacher's accuracy on the selected batch)::

    setting              white-box      black-box (784-d dirs)   black-box (7x7 dirs)
                         CE     acc     CE     acc               CE     acc
    dcgan:0.001          0.027  1.00    0.476  0.88              0.236  0.98
    strokes:0.001        0.835  0.78
    strokes:0.01         0.510  0.90    1.746  0.48              0.968  0.75
    strokes_direct:0.05  0.393  0.98    1.480  0.45              0.815  0.78

With ``--black-box --zo-space latent`` (the 50 directions search each image's 32 stroke
parameters; same queries) ``strokes_direct:0.05`` reaches CE 0.442, acc 0.975: close to
white-box. This is the BiDf-MKD default since issue 21.

Look (PNG): the DCGAN paints textures, near-identical within a class; every stroke image is a
drawing, diverse within a class, some with class features (the dot and hook of Canadian
syllabics CWE, the L corner). The stroke generator's CE stays above the DCGAN's: it cannot paint
arbitrary textures, and in black-box mode its image-space gradient estimate is noisier
(ink moves only near stroke edges), so low-resolution directions (``--direction-resolution 7``)
matter more for it. ``strokes_direct`` wants a learning rate of a few 1e-2 (it moves stroke
parameters directly). One call per setting and one seed: indicative, not a benchmark.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfml_jax.api import BlackBoxAPI
from dfml_jax.bidf_mkd import InversionConfig, make_inverter
from dfml_jax.bidf_mkd.inversion import ZO_SPACES
from dfml_jax.data.glyphs import glyph_splits
from dfml_jax.models import create_model, functional


def train_teacher(x, y, ways, steps, seed):
    fm = functional(create_model("conv4", num_classes=ways, input_shape=x.shape[1:],
                                 rngs_or_key=seed, conv_impl="lax"))
    tx = optax.adam(1e-3)

    def loss(p, s):
        out, s2 = fm.apply(p, s, (x - 0.5) / 0.5, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), s2

    @jax.jit
    def step(p, s, o):
        (l, s), g = jax.value_and_grad(loss, has_aux=True)(p, s)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), s, o, l

    p, s, o = fm.params, fm.state, tx.init(fm.params)
    for _ in range(steps):
        p, s, o, l = step(p, s, o)
    fwd = lambda xx: fm.apply(p, s, xx, train=False)[0]  # noqa: E731
    acc = float(jnp.mean(jnp.argmax(fwd((x - 0.5) / 0.5), -1) == y))
    return fwd, float(l), acc


def make_gen(name, size, seed):
    if name == "dcgan":
        return functional(create_model("dcgan", nz=256, ngf=64, img_size=size, nc=1,
                                       rngs_or_key=seed)), 256
    latent = "direct" if name == "strokes_direct" else "linear"
    return functional(create_model("strokes", nz=32, img_size=size, nc=1, latent=latent,
                                   rngs_or_key=seed)), 32


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--png", default="/tmp/strokes_inversion.png")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--settings", default="dcgan:0.001,strokes:0.001,strokes:0.01,"
                                         "strokes_direct:0.05")
    p.add_argument("--black-box", action="store_true")
    p.add_argument("--num-directions", type=int, default=50)
    p.add_argument("--direction-resolution", type=int, default=None,
                   help="low-resolution zero-order directions (r x r), black-box only")
    p.add_argument("--zo-space", default="image", choices=ZO_SPACES,
                   help="black-box directions over the pixels or over each image's latent")
    p.add_argument("--smoothing", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    from PIL import Image

    train = glyph_splits(28, 1, cache_dir=args.cache_dir, progress=False)[0]
    rng = np.random.default_rng(args.seed)
    classes = np.sort(rng.choice(train.num_classes, args.ways, replace=False))
    imgs = train.images[classes].astype(np.float32) / 255.0  # (ways, 20, 28, 28, 1)
    x = jnp.asarray(imgs.reshape(-1, 28, 28, 1))
    y = jnp.repeat(jnp.arange(args.ways), imgs.shape[1])
    t0 = time.time()
    fwd, loss, acc = train_teacher(x, y, args.ways, args.teacher_steps, args.seed)
    print(json.dumps({"teacher_train_loss": round(loss, 4), "teacher_train_acc": acc,
                      "classes": [train.class_names[c] for c in classes],
                      "seconds": round(time.time() - t0, 1)}), flush=True)
    cfg = InversionConfig(iterations=args.iterations, per_class=args.per_class,
                          num_directions=args.num_directions, smoothing=args.smoothing, pad=2,
                          direction_resolution=args.direction_resolution,
                          zo_space=args.zo_space)
    blocks = []
    for setting in args.settings.split(","):
        name, lr = setting.split(":")
        gen, nz = make_gen(name, 28, args.seed)
        c = InversionConfig(**{**cfg.__dict__, "lr": float(lr)})
        api = BlackBoxAPI.from_jax(fwd, (28, 28, 1), args.ways, name="teacher")
        inv = make_inverter(api, gen.apply_batchstats, nz=nz, cfg=c, mean=(0.5,), std=(0.5,),
                            image_size=28,
                            teacher_fn=None if args.black_box else (lambda _, xx: fwd(xx)))
        t0 = time.time()
        res = inv(jax.random.key(args.seed + 1), 0, gen.init(jax.random.key(args.seed + 2))[0],
                  None)
        ce = np.asarray(res.clean_ce)
        imgs_out = np.asarray(res.images)[..., 0]
        sel_acc = float(jnp.mean(jnp.argmax(fwd((res.images - 0.5) / 0.5), -1) == res.targets))
        print(json.dumps({"setting": setting, "ce_first": round(float(ce[0]), 4),
                          "ce_last10": round(float(ce[-10:].mean()), 4),
                          "ce_min": round(float(ce.min()), 4), "selected_acc": sel_acc,
                          "mean_ink": round(float(imgs_out.mean()), 4),
                          "seconds": round(time.time() - t0, 1)}), flush=True)
        # rows: classes (targets are interleaved 0..K-1), columns: instances
        order = imgs_out.reshape(args.per_class, args.ways, 28, 28).transpose(1, 0, 2, 3)
        blocks.append(order)
    blocks.append(imgs[:, :args.per_class, ..., 0])
    rows = []
    for b in blocks:
        for r in b:
            rows.append(np.concatenate([np.pad(t, 1, constant_values=0.4) for t in r], 1))
        rows.append(np.ones((3, rows[-1].shape[1])))
    g = (np.concatenate(rows[:-1], 0) * 255).round().astype(np.uint8)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(args.png)
    print(json.dumps({"png": args.png, "blocks": args.settings.split(",") + ["teacher data"]}))


if __name__ == "__main__":
    main()
