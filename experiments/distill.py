"""Query-efficient data-free distillation of one black-box teacher: IDEAL vs DFME vs NaiveKD.

Trains (or restores) a teacher on the dataset's training images, wraps it as a black-box API (top-1
labels for IDEAL and NaiveKD, probabilities for DFME), distils a student with each method at the
configured query budgets, and writes ``results.json``, ``results.md`` and
``accuracy_vs_queries.png`` into the work directory (:mod:`dfml_jax.distill.experiment`).

Command lines (configs and their notes: ``experiments/configs/distill_configs.py``)::

    python experiments/distill.py --method all --config smoke --workdir /tmp/distill_smoke
    python experiments/distill.py --method all --config default --workdir runs/distill_default
    python experiments/distill.py --method ideal --config default --workdir runs/distill_default
    python experiments/distill.py --method dfme --config default --workdir runs/d1 \\
        --set dfme_grad_m=2 --seed 1

The reported accuracy at a budget is the test accuracy of the student selected on the validation
split (carved from the training images), never on the test set; the papers' best-over-test number
is a separate, labelled column. Rerunning the same command after a kill resumes every unfinished
run from its last checkpoint (IDEAL/NaiveKD re-buy no label: the label cache is on disk; DFME redoes
at most ``dfme_checkpoint_every`` iterations and records the queries it bought again); finished runs
are reused, and a finished experiment (``DONE``) only reprints its table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs.distill_configs import CONFIGS, get_config  # noqa: E402

from dfml_jax.distill.experiment import METHODS, run_experiment  # noqa: E402
from dfml_jax.experiment import apply_overrides  # noqa: E402


def main(argv=None, loader=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="all", choices=METHODS + ("all",))
    p.add_argument("--config", default="default", help=f"one of {sorted(CONFIGS)}")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="the students' seed (overrides the config)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_config(args.config), args.set)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    methods = METHODS if args.method == "all" else (args.method,)
    out = run_experiment(cfg, args.workdir, methods=methods, progress=not args.no_progress,
                         loader=loader)
    with open(os.path.join(args.workdir, "results.md")) as f:
        print(f.read())
    return out


if __name__ == "__main__":
    main()
