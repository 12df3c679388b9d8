"""Query-efficient data-free distillation of one black-box teacher: IDEAL vs DFME vs NaiveKD.

Trains (or restores) a teacher on the dataset's training images, wraps it as a black-box API (top-1
labels for IDEAL and NaiveKD, probabilities for DFME), distils a student with each method at the
configured query budgets, and writes ``results.json``, ``results.md`` and
``accuracy_vs_queries.png`` into the work directory (:mod:`dfml_jax.distill.experiment`).

Command lines (configs and their notes: ``experiments/configs/distill_configs.py``)::

    python experiments/distill.py --method all --config smoke --workdir /tmp/distill_smoke
    python experiments/distill.py --method all --config default --workdir runs/distill_default
    python experiments/distill.py --method all --config default --workdir runs/distill_s1 --seed 1
    python experiments/distill.py --method ideal --config default --workdir runs/distill_default
    python experiments/distill.py --method dfme --config default --workdir runs/d1 \\
        --set dfme.num_directions=2 --seed 1

Measured results of ``default``: the README and ``docs/results.md``; the IDEAL diagnosis:
``docs/ideal_diagnosis.md``.

The reported accuracy at a budget is the test accuracy of the student selected on the validation
split (carved from the training images), never on the test set; the papers' best-over-test number
is a separate, labelled column. Rerunning the same command after a kill resumes every unfinished
run from its last checkpoint (IDEAL/NaiveKD re-buy no label: the label cache is on disk; DFME redoes
at most ``dfme.checkpoint_every`` iterations and records the queries it bought again); finished runs
are reused, and a finished experiment (``DONE``) only reprints its table.

Remote teacher: ``--api-url`` makes every method query a model served over the Open Inference
Protocol (KServe v2 / Triton HTTP: Triton, KServe, MLServer, ``python -m dfml_jax.serve``) instead
of the in-process one (retries, batching and billing rules: ``dfml_jax/remote.py``). The URL names
the model: ``http://HOST:PORT/v2/models/NAME``. To distil from the very teacher a local run
trained::

    python -m dfml_jax.serve --distill-run /tmp/distill_smoke --port 8500 --output probs \
        --model-name teacher &
    python experiments/distill.py --config smoke --workdir /tmp/distill_remote \
        --api-url http://127.0.0.1:8500/v2/models/teacher

The server must answer probabilities or logits for DFME (IDEAL needs only labels). Answers the
server billed for a step that then failed are kept in ``<workdir>/api_pending`` and delivered
without re-buying when the run is resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.add_argument("--api-url", default=None,
                   help="query a remote teacher over the Open Inference Protocol: "
                        "http://HOST:PORT/v2/models/NAME (Triton, KServe, python -m dfml_jax.serve)")
    p.add_argument("--api-key", default=os.environ.get("DFML_API_KEY"),
                   help="key of the remote teacher (default: $DFML_API_KEY)")
    p.add_argument("--api-timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--api-retries", type=int, default=4, help="retries per request")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_config(args.config), args.set)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    methods = METHODS if args.method == "all" else (args.method,)
    factory = None
    if args.api_url:
        from dfml_jax.remote import remote_api_factory

        _check_teacher_source(args.workdir, args.api_url)
        factory = remote_api_factory(args.api_url, api_key=args.api_key,
                                     cache_dir=os.path.join(args.workdir, "api_pending"),
                                     timeout=args.api_timeout, max_retries=args.api_retries)
    else:
        _check_teacher_source(args.workdir, None)
    out = run_experiment(cfg, args.workdir, methods=methods, progress=not args.no_progress,
                         loader=loader, api_factory=factory)
    with open(os.path.join(args.workdir, "results.md")) as f:
        print(f.read())
    return out


def _check_teacher_source(workdir, url):
    """A work directory distils from one kind of teacher: the local one or a remote one.

    The URL itself may change between invocations (a server restarted on another port).
    """
    path = os.path.join(workdir, "teacher_source.json")
    kind = "local" if url is None else "remote"
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)["teacher"]
    elif os.path.exists(os.path.join(workdir, "config.json")):
        have = "local"                   # a run from before this file existed
    else:
        have = kind
    if have != kind:
        raise SystemExit(f"{workdir} holds a run with a {have} teacher; use another --workdir for "
                         f"a {kind} teacher.")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"teacher": kind, "api_url": url}, f)


if __name__ == "__main__":
    from dfml_jax.training.host_malloc import reuse_freed_memory

    reuse_freed_memory()  # large buffers kept for reuse: faster, bit-identical results
    main()
