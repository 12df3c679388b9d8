"""Build (or load) the Glyphs cache, print class counts per split and save a sample grid PNG.

Command line::

    python experiments/build_glyphs.py --image-size 28 --png glyphs.png
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np

from dfml_jax.data.glyphs import SPLIT_ALPHABETS, cache_dir, load_glyphs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--png", default=None, help="save a grid of 12 classes x 6 instances per split")
    args = p.parse_args(argv)
    t0 = time.time()
    d = load_glyphs(args.image_size, seed=args.seed, cache_dir=args.cache_dir)
    secs = time.time() - t0
    counts = collections.Counter(d["split"].tolist())
    per_alpha = collections.Counter(d["alphabets"].tolist())
    print(json.dumps({"classes": int(len(d["codepoints"])), "per_split": dict(counts),
                      "per_alphabet": dict(per_alpha), "splits": {k: list(v) for k, v in SPLIT_ALPHABETS.items()},
                      "image_size": args.image_size, "seconds": round(secs, 2),
                      "cache_dir": cache_dir(args.cache_dir)}, indent=1))
    if args.png:
        from PIL import Image

        rng = np.random.default_rng(0)
        rows = []
        for s in ("train", "validation", "test"):
            idx = rng.choice(np.nonzero(d["split"] == s)[0], 12, replace=False)
            rows.append(np.concatenate([np.concatenate(list(d["images"][c, :6]), 0) for c in idx], 1))
        Image.fromarray(np.concatenate(rows, 0)).save(args.png)
        print(f"wrote {args.png} (rows of 6: train, validation, test)")


if __name__ == "__main__":
    main()
