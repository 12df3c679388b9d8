"""BiDf-MKD: meta-learn from a pool of black-box APIs, with baselines, in one resumable run.

Command lines (configs in ``experiments/configs/bidf_mkd_configs.py``)::

    python experiments/bidf_mkd.py --config smoke   --workdir runs/bidf_smoke
    python experiments/bidf_mkd.py --config default --workdir runs/bidf_default
    python experiments/bidf_mkd.py --config default --workdir runs/x --set meta_iterations=600 --set methods='["bidf_mkd","random"]'

Writes ``results.json``, ``results.md`` and PNG curves into the workdir. Rerunning the same command
after a kill resumes from the last checkpoint; a finished run prints its results.

A pool of remote teachers (one ``python -m dfml_jax.serve --pool DIR --api I --port P`` each; key
from ``$DFML_API_KEY``) replaces the local pool with ``--pool-urls URL [URL ...]`` (black-box
methods only)::

    python experiments/bidf_mkd.py --config smoke --workdir runs/bidf_remote \
        --pool-urls http://127.0.0.1:8500 http://127.0.0.1:8501 \
        --set methods='["bidf_mkd","random","maml_real"]'
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs.bidf_mkd_configs import CONFIGS, get_config  # noqa: E402

from dfml_jax.bidf_mkd.experiment import run_experiment  # noqa: E402
from dfml_jax.experiment import apply_overrides  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help=f"one of {sorted(CONFIGS)}")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pool-urls", nargs="+", default=None, metavar="URL",
                   help="query these remote teachers (python -m dfml_jax.serve) as the pool")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_config(args.config), args.set + ([f"seed={args.seed}"] if args.seed is not None else []))
    run_experiment(cfg, args.workdir, progress=not args.no_progress, pool_urls=args.pool_urls)
    with open(os.path.join(args.workdir, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
