"""BiDf-MKD: meta-learn from a pool of black-box APIs, with baselines, in one resumable run.

Command lines (configs in ``experiments/configs/bidf_mkd_configs.py``)::

    python experiments/bidf_mkd.py --config smoke   --workdir runs/bidf_smoke
    python experiments/bidf_mkd.py --config default --workdir runs/bidf_default
    python experiments/bidf_mkd.py --config default --workdir runs/x --set loop.meta_iterations=600 --set methods='["bidf_mkd","random"]'

Writes ``results.json``, ``results.md`` and PNG curves into the workdir. Rerunning the same command
after a kill resumes from the last checkpoint; a finished run prints its results.

A pool of remote teachers, one Open Inference Protocol endpoint each
(``http://HOST:PORT/v2/models/NAME``, e.g. ``python -m dfml_jax.serve --pool DIR --api I --port P``,
which publishes the teacher's classes and normalisation in its model configuration; key from
``$DFML_API_KEY``) replaces the local pool with ``--pool-urls URL [URL ...]`` (black-box methods
only)::

    python experiments/bidf_mkd.py --config smoke --workdir runs/bidf_remote \
        --pool-urls http://127.0.0.1:8500/v2/models/cifar10-conv4-0 \
        http://127.0.0.1:8501/v2/models/cifar10-conv4-1 \
        --set methods='["bidf_mkd","random","maml_real"]'

Devices: ``--devices N`` runs every inversion (its samples, API queries and zero-order directions)
and every meta-batch sharded over N devices (default: all local devices, reduced to the largest
count that divides the inversion batch ``loop.ways * loop.inversion.per_class``; an explicit N
that does not divide it is an error naming the valid counts). ``--set loop.inv_shard=directions``
splits the ``loop.inversion.num_directions`` zero-order directions of each inversion instead of its
samples (for small batches with many directions; the device count must then divide
``loop.inversion.num_directions``). Results equal the 1-device run up to float reduction order, with identical query counts. To try it on a CPU,
emulate devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python experiments/bidf_mkd.py --config smoke --workdir runs/bidf_8dev --devices 8

Multi-host (a TPU slice, several GPU nodes): run the same command on every host with
``--multihost`` (calls ``jax.distributed.initialize()``: no argument needed on Cloud TPU; on GPU
clusters set ``JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i``). Each
host builds its data splits from its own disk and answers the API queries of its own devices'
shards; ``--devices`` then counts devices over all hosts. On a TPU VM slice::

    gcloud compute tpus tpu-vm ssh NAME --worker=all --command \
        "cd dfml_jax && python experiments/bidf_mkd.py --config paper_cifar_fs_ss --multihost \
         --workdir gs-fuse-or-shared-dir/cifar_fs_ss --set loop.inversion.per_class=32"
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs.bidf_mkd_configs import CONFIGS, get_config  # noqa: E402

from dfml_jax.bidf_mkd.experiment import run_experiment  # noqa: E402
from dfml_jax.experiment import apply_overrides  # noqa: E402


def choose_mesh(devices, cfg):
    """The run's mesh: ``devices`` (None: all, reduced to divide the inversion batch) or None
    for one device (the unchanged single-device computation)."""
    import jax

    from dfml_jax.parallel import check_divisible, largest_valid_count, make_mesh

    have = len(jax.devices())
    loop = cfg.loop
    if loop.inv_shard == "directions":
        size = loop.inversion.num_directions
        what = ("the zero-order directions loop.inversion.num_directions = "
                f"{loop.inversion.num_directions}")
        fix = "--set loop.inversion.num_directions=..."
    else:
        size = loop.ways * loop.inversion.per_class
        what = (f"the inversion batch loop.ways x loop.inversion.per_class = {loop.ways} x "
                f"{loop.inversion.per_class}")
        fix = "--set loop.inversion.per_class=..."
    if devices is None:
        n = largest_valid_count([size], have)
        if n < have:
            print(f"[devices] using {n} of {have} devices: {what} splits evenly over {n} at most "
                  f"(change it with {fix} to use all)")
    else:
        n = devices
        make_mesh(n)  # more devices than exist: an error listing them
        check_divisible(size, n, what=what, fix=f"change --devices or {fix}")
    return None if n == 1 else make_mesh(n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help=f"one of {sorted(CONFIGS)}")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pool-urls", nargs="+", default=None, metavar="URL",
                   help="query these OIP endpoints (http://HOST:PORT/v2/models/NAME, e.g. "
                        "python -m dfml_jax.serve --pool) as the pool")
    p.add_argument("--devices", type=int, default=None,
                   help="devices to shard over (default: all, reduced to divide the inversion batch)")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() first (TPU slices, GPU clusters)")
    args = p.parse_args(argv)
    if args.multihost:
        from dfml_jax.parallel import initialize_multihost

        print(f"[multihost] {initialize_multihost()}")
    seed = [f"loop.seed={args.seed}"] if args.seed is not None else []
    cfg = apply_overrides(get_config(args.config), args.set + seed)
    mesh = choose_mesh(args.devices, cfg)
    run_experiment(cfg, args.workdir, progress=not args.no_progress, pool_urls=args.pool_urls,
                   mesh=mesh)
    with open(os.path.join(args.workdir, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    from dfml_jax.training.host_malloc import reuse_freed_memory

    reuse_freed_memory()  # large buffers kept for reuse: faster, bit-identical results
    main()
