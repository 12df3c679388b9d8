"""Transfer probes: which recovery recipe gives images that teach NEW classes? Minutes, not hours.

    python experiments/probe_transfer.py --config smoke --workdir runs/probe_smoke
    python experiments/probe_transfer.py --config default --workdir runs/probe [--recipes zo,real] [--set probe.pool_steps=300]

Builds (or reuses, by build key) a pool of the BiDf-MKD config's first ``num_apis`` teachers in
``<workdir>/pool-<key>``,
then for every recipe (``experiments/configs/probe_configs.py``: ``RECIPES``) recovers one image
set per API at the same query budget and runs the within-task, pool-level and replay-MAML probes
of :mod:`dfml_jax.bidf_mkd.probe`, beside Random, Random with scaled kernels and the Average of
the teachers. Writes ``probe.json``, ``probe.md`` and ``recovered.png`` (recovered vs real images).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs.bidf_mkd_configs import get_config as get_bidf_config  # noqa: E402
from configs.probe_configs import CONFIGS, RECIPES, get_config  # noqa: E402

from dfml_jax.experiment import apply_overrides, markdown_table  # noqa: E402


def _pool(bidf, cfg, workdir):
    """The BiDf-MKD config's first ``num_apis`` teachers, built (or reused, by build key) under
    ``workdir``."""
    from dfml_jax.bidf_mkd.experiment import pool_build_args
    from dfml_jax.teachers import load_pool, load_white_box_teachers, obtain_pool

    build = pool_build_args(bidf, num_apis=cfg.probe.num_apis)
    if cfg.pool_seed is not None:
        build["seed"] = cfg.pool_seed
    pool_dir = obtain_pool(build, parent=workdir)
    return load_pool(pool_dir, output=bidf.api_output), load_white_box_teachers(pool_dir)


def _grid(path, grids):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(grids)
    cols = max(len(v) for v in grids.values())
    fig, axes = plt.subplots(len(rows), 1, figsize=(cols * 0.45, len(rows) * 0.7))
    for ax, name in zip(np.atleast_1d(axes), rows):
        imgs = grids[name]
        strip = np.concatenate([im[..., 0] if im.shape[-1] == 1 else im for im in imgs], axis=1)
        ax.imshow(np.clip(strip, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(results):
    rows = [{"row": name, "within-task (%)": "", "pool-level (%)": f"{r['acc']:.1f} ± {r['ci95']:.1f}",
             "replay-MAML (%)": "", "queries / API": 0, "intensity": ""}
            for name, r in results["references"].items()]
    for name, r in results["recipes"].items():
        p = r["pool_level"]
        rows.append({"row": name, "within-task (%)": f"{r['within_task']['mean']:.1f}",
                     "pool-level (%)": f"{p['acc']:.1f} ± {p['ci95']:.1f}",
                     "replay-MAML (%)": f"{r['replay_maml']['acc']:.1f}",
                     "queries / API": int(r["queries_per_api"]),
                     "intensity": f"{r['mean_intensity']:.2f}"})
    return markdown_table(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help=f"one of {sorted(CONFIGS)}")
    p.add_argument("--workdir", required=True)
    p.add_argument("--recipes", default=None, help=f"comma-separated names of {sorted(RECIPES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_config(args.config), args.set)
    names = args.recipes.split(",") if args.recipes else list(cfg.recipes)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; valid: {sorted(RECIPES)}")
    import jax
    import numpy as np

    from dfml_jax.bidf_mkd.experiment import meta_model_options
    from dfml_jax.bidf_mkd.probe import run_probe
    from dfml_jax.data import get_class_splits
    from dfml_jax.models import create_model, functional

    bidf = apply_overrides(get_bidf_config(cfg.bidf_config), list(cfg.bidf_set))
    loop = bidf.loop_config()
    os.makedirs(args.workdir, exist_ok=True)
    progress = not args.no_progress
    train, val, _ = get_class_splits(bidf.dataset, image_size=bidf.image_size,
                                     channels=bidf.channels, progress=progress)
    pool, wb = _pool(bidf, cfg, args.workdir)
    meta = functional(create_model(bidf.meta_arch, num_classes=loop.ways,
                                   input_shape=train.image_shape, rngs_or_key=cfg.probe.seed,
                                   **meta_model_options(bidf)))
    pcfg = dataclasses.replace(cfg.probe, student_width=bidf.meta_width, inner_lr=loop.inner_lr,
                               ways=loop.ways, shots=loop.shots, query=loop.query,
                               replay_inner_steps=loop.replay_inner_steps,
                               outer_lr=loop.outer_lr, finetune_steps=loop.finetune_steps)
    out = os.path.join(args.workdir, "probe.json")
    done = None
    if os.path.exists(out):
        with open(out) as f:
            done = json.load(f)
        if done.get("pool") != pool.directory:
            done = None  # another pool: nothing to resume

    grid_file = os.path.join(args.workdir, "recovered_images.npz")
    old_grids = dict(np.load(grid_file)) if done and os.path.exists(grid_file) else {}

    def save(results, grids):
        np.savez(grid_file, **{**old_grids, **grids})
        results.update(probe_config=dataclasses.asdict(cfg), bidf_config=bidf.name,
                       base_inversion=dataclasses.asdict(loop.inversion_config()),
                       jax=jax.__version__,
                       pool=pool.directory)
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=1, default=float)
        os.replace(out + ".tmp", out)

    results, grids = run_probe({n: RECIPES[n] for n in names}, pool=pool, train_split=train,
                               val_split=val, meta=meta, cfg=pcfg, base=loop.inversion_config(),
                               nz=loop.nz, ngf=loop.ngf,
                               white_box=[(w.apply, w.params) for w in wb], progress=True,
                               done=done, on_recipe=save)
    save(results, grids)
    grids = {**old_grids, **grids}
    table = _table(results)
    with open(os.path.join(args.workdir, "probe.md"), "w") as f:
        f.write(f"# Transfer probe '{cfg.name}' ({results['num_apis']} APIs of the "
                f"'{bidf.name}' pool)\n\nPool-level: one student distilled on all recovered sets, "
                f"its body fine-tuned on {pcfg.val_tasks} new-class 5-way {loop.shots}-shot "
                "meta-validation tasks (lr chosen on separate validation tasks); references use "
                "the same protocol. Within-task: a student per API scored on that API's held-out "
                "real images. Replay-MAML: best meta-validation accuracy of MAML on the recovered "
                f"images only.\n\n{table}\n")
    _grid(os.path.join(args.workdir, "recovered.png"), grids)
    print(table)


if __name__ == "__main__":
    from dfml_jax.training.host_malloc import reuse_freed_memory

    reuse_freed_memory()  # large buffers kept for reuse: faster, bit-identical results
    main()
