"""Build (or load) the Glyphs cache, print class counts per split and save a sample grid PNG.

Command line::

    python experiments/build_glyphs.py --image-size 28 --png glyphs.png
    python experiments/build_glyphs.py --image-size 84 --channels 3 --cache-dir /tmp/glyphs

Prints one JSON object: classes per split and alphabet, the split image shapes, the build (or
load) time and the cache file. ``--png`` writes a grid (rows: 8 instances of one class; blocks of
rows: train, validation, test) to check by eye that glyphs are centred, legible and not boxes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dfml_jax.data.glyphs import SPLIT_ALPHABETS, cache_file, glyph_split_counts, glyph_splits, load_glyphs


def save_grid(data: dict, path: str, classes_per_split: int = 6, instances: int = 8, seed: int = 0,
              scale: int = 2) -> str:
    """Save a PNG grid of sample glyphs.

    Args:
      data: the dict of :func:`load_glyphs`.
      path: output PNG.
      classes_per_split: rows per split.
      instances: columns (instances of the row's class).
      seed: which classes are drawn.
      scale: nearest-neighbour upscaling factor.

    Returns:
      ``path``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for s in ("train", "validation", "test"):
        members = np.nonzero(data["split"] == s)[0]
        for c in np.sort(rng.choice(members, min(classes_per_split, len(members)), replace=False)):
            tiles = [np.pad(t, 1, constant_values=96) for t in data["images"][c, :instances]]
            rows.append(np.concatenate(tiles, 1))
        rows.append(np.full((4, rows[-1].shape[1]), 255, np.uint8))  # separator between splits
    grid = np.concatenate(rows[:-1], 0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=28, help="image side (28 default; 32, 84)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3),
                   help="channels of the split views (the cache always stores 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="default: $DFML_JAX_CACHE or ~/.cache/dfml_jax")
    p.add_argument("--max-classes", type=int, default=None, help="small build (about this many classes)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--png", default=None, help="save a grid of sample glyphs to this PNG")
    args = p.parse_args(argv)
    kw = dict(seed=args.seed, cache_dir=args.cache_dir, max_classes=args.max_classes)
    path = cache_file(args.image_size, **kw)
    cached = os.path.exists(path) and not args.rebuild
    t0 = time.perf_counter()
    d = load_glyphs(args.image_size, progress=not args.no_progress, rebuild=args.rebuild, **kw)
    secs = time.perf_counter() - t0
    splits = glyph_splits(args.image_size, args.channels, progress=False, **kw)
    print(json.dumps({"classes": int(len(d["codepoints"])),
                      "per_split": glyph_split_counts(d),
                      "split_shapes": {s.name: "x".join(map(str, s.images.shape)) for s in splits},
                      "split_alphabets": {k: list(v) for k, v in SPLIT_ALPHABETS.items()},
                      "merged_duplicates": int(sum(len(a.split()) for a in d["aliases"])),
                      "image_size": args.image_size, "seed": args.seed,
                      ("load_seconds" if cached else "build_seconds"): round(secs, 3),
                      "cache_file": path}, indent=1))
    if args.png:
        save_grid(d, args.png)
        print(f"wrote {args.png} (rows: 8 instances of a class; blocks: train, validation, test)")


if __name__ == "__main__":
    main()
