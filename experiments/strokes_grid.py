"""Save a PNG grid of random initial stroke-generator images, next to real Glyphs for comparison.

Command line::

    python experiments/strokes_grid.py --png /tmp/strokes_init.png
    python experiments/strokes_grid.py --png /tmp/strokes_init.png --glyphs-cache-dir /tmp/glyphs

The stroke images are drawn as the BiDf-MKD inverter starts an inversion call: a fresh generator
``functional(create_model("strokes", ...)).init(key)`` and latents ``z ~ N(0, I)``. The top block
is ``--rows x --cols`` of them; with ``--glyphs`` (default on, if the Glyphs cache can be loaded or
built: about half a minute) a block of random real 28 px glyphs follows below a white separator,
at the same scale. Prints one JSON line with the mean ink of both blocks.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from dfml_jax.models import create_model, functional


def stroke_images(n: int, *, seed: int = 0, img_size: int = 28, **kw) -> np.ndarray:
    """``n`` initial stroke images ``(n, H, W)`` in [0, 1] (fresh weights, ``z ~ N(0, I)``)."""
    model = create_model("strokes", img_size=img_size, nc=1, rngs_or_key=seed, **kw)
    gen = functional(model)
    k_w, k_z = jax.random.split(jax.random.key(seed))
    params, _ = gen.init(k_w)
    z = jax.random.normal(k_z, (n, model.nz))
    return np.asarray(gen.apply_batchstats(params, z))[..., 0]


def grid(images: np.ndarray, cols: int) -> np.ndarray:
    """Tiles ``(n, H, W)`` images (values in [0, 1]) into rows of ``cols`` with grey borders."""
    tiles = [np.pad(t, 1, constant_values=0.4) for t in images]
    rows = [np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--png", default="/tmp/strokes_init.png")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-strokes", type=int, default=4)
    p.add_argument("--latent", default="linear", choices=("linear", "direct"))
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling")
    p.add_argument("--no-glyphs", action="store_true", help="no real-glyph block")
    p.add_argument("--glyphs-cache-dir", default=None)
    args = p.parse_args(argv)
    from PIL import Image

    n = args.rows * args.cols
    strokes = stroke_images(n, seed=args.seed, num_strokes=args.num_strokes, latent=args.latent)
    blocks = [grid(strokes, args.cols)]
    info = {"stroke_mean_ink": round(float(strokes.mean()), 4)}
    if not args.no_glyphs:
        from dfml_jax.data.glyphs import load_glyphs

        data = load_glyphs(28, cache_dir=args.glyphs_cache_dir, progress=False)
        imgs = data["images"]
        rng = np.random.default_rng(args.seed)
        pick = imgs[rng.choice(imgs.shape[0], n), rng.choice(imgs.shape[1], n)] / 255.0
        blocks += [np.ones((3, blocks[0].shape[1])), grid(pick, args.cols)]
        info["glyph_mean_ink"] = round(float(pick.mean()), 4)
    g = (np.concatenate(blocks, 0) * 255).round().astype(np.uint8)
    Image.fromarray(g).resize((g.shape[1] * args.scale, g.shape[0] * args.scale),
                              Image.NEAREST).save(args.png)
    info["png"] = args.png
    print(json.dumps(info))


if __name__ == "__main__":
    main()
