"""Build a pool of pre-trained black-box teachers (API pool) for the SS / SH / MH scenarios.

Examples::

    # 20 Conv4 teachers on Glyphs (SS), 60 epochs (the spec's recipe)
    python experiments/build_api_pool.py --dataset glyphs --scenario SS --arch conv4 \
        --num-apis 20 --workdir runs/pools

    # SH: Conv4 + ResNet-10 + ResNet-18 (width 16) on Glyphs, 10 per architecture
    python experiments/build_api_pool.py --dataset glyphs --scenario SH \
        --arch conv4,resnet10,resnet18 --width resnet10=16,resnet18=16 --num-apis 10 --workdir DIR

    # split every population of 20 over 4 devices (GPUs, or emulated CPU devices: one thread each)
    python experiments/build_api_pool.py --dataset glyphs --scenario SS --arch conv4 \
        --num-apis 20 --workdir DIR --cpu-devices 4 --devices 4

Teachers are trained with their dataset's domain-faithful augmentation by default (``crop``: random
shifts, no flips, for glyphs and digits; ``crop_flip`` for natural images); ``--augment paper``
(= ``none``) trains them as the paper's official code does, without augmentation. ``pool.json``
records the pool's build key (every setting above, the data's content key, the trainer version).

The pool is written to ``WORKDIR/NAME`` (NAME defaults to ``<scenario>-<datasets>-<archs>-<n>``);
a progress bar follows the training and a table of held-out accuracies is printed at the end.
Load it with ``dfml_jax.teachers.load_pool(path, output=...)``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dfml_jax.models import CLASSIFIERS  # noqa: E402
from dfml_jax.teachers import SCENARIOS, build_pool, format_summary  # noqa: E402


def _widths(spec: str | None, archs: list[str]) -> dict:
    """``"8"`` (every architecture) or ``"conv4=32,resnet10=16"`` -> per-architecture kwargs."""
    if not spec:
        return {}
    out = {}
    if "=" not in spec:
        return {a: {"width": int(spec)} for a in archs if a in ("conv4", "resnet10", "resnet18")}
    for part in spec.split(","):
        a, w = part.split("=")
        out[a.strip()] = {"width": int(w)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True,
                    help="dataset name, or comma-separated names for MH (e.g. glyphs)")
    ap.add_argument("--scenario", required=True, help=f"one of {', '.join(SCENARIOS)}")
    ap.add_argument("--arch", default=None,
                    help=f"architecture(s), comma-separated; valid: {', '.join(CLASSIFIERS)} "
                         f"(default conv4 for SS, conv4,resnet10,resnet18 otherwise)")
    ap.add_argument("--num-apis", type=int, default=100,
                    help="teachers per (dataset, architecture) group (default 100)")
    ap.add_argument("--workdir", required=True, help="directory that receives the pool")
    ap.add_argument("--name", default=None, help="pool directory name inside --workdir")
    ap.add_argument("--way", type=int, default=5, help="classes per teacher (default 5)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default: recipe's, 60)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    ap.add_argument("--augment", default=None,
                    choices=["paper", "none", "crop", "crop_flip", "flip"],
                    help="teachers' per-sample augmentation (default: the dataset's "
                         "domain-faithful one: crop (shifts, no flips) for glyphs and digits, "
                         "crop_flip for natural images; paper = none, the official recipe)")
    ap.add_argument("--augment-pad", type=int, default=None,
                    help="largest crop shift in pixels (default: image side / 8)")
    ap.add_argument("--width", default=None,
                    help="model width: N for all conv models or arch=N,... (default: spec's)")
    ap.add_argument("--image-size", type=int, default=None, help="resize images (loader option)")
    ap.add_argument("--channels", type=int, default=None, help="force 1 or 3 channels")
    ap.add_argument("--max-classes", type=int, default=None,
                    help="glyphs only: build a smaller subset (quick runs and tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-population", type=int, default=20,
                    help="teachers trained together in one vmapped population (memory bound)")
    ap.add_argument("--devices", type=int, default=None,
                    help="devices to split each population's teachers over (must divide every "
                         "population size; default: all local devices, lowered per population to "
                         "the largest count that divides it)")
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="number of emulated CPU devices to create (CPU only; one thread each)")
    ap.add_argument("--strategy", default=None, choices=["vmap", "map"],
                    help="population strategy (default: map on CPU, vmap on accelerators)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing pool")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import jax
    if args.cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    archs = [a.strip() for a in args.arch.split(",")] if args.arch else None
    name = args.name or "-".join([args.scenario.lower(), "+".join(datasets),
                                  "+".join(archs or ["default"]), str(args.num_apis)])
    out = os.path.join(os.path.abspath(args.workdir), name)
    dataset_kwargs = {k: v for k, v in (("image_size", args.image_size),
                                        ("channels", args.channels),
                                        ("max_classes", args.max_classes)) if v is not None}
    recipe = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                                ("augment", args.augment), ("augment_pad", args.augment_pad))
              if v is not None}
    t0 = time.perf_counter()
    try:
        manifest = build_pool(
            out, scenario=args.scenario, datasets=datasets, archs=archs, num_apis=args.num_apis,
            way=args.way, epochs=args.epochs, seed=args.seed,
            model_kwargs=_widths(args.width, archs or ["conv4", "resnet10", "resnet18"]),
            recipe_overrides=recipe, dataset_kwargs=dataset_kwargs,
            max_population=args.max_population, overwrite=args.overwrite,
            progress=not args.no_progress, devices=args.devices, strategy=args.strategy)
    except ValueError as e:
        print(f"build_api_pool: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    print(f"\nPool written to {out} in {time.perf_counter() - t0:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
