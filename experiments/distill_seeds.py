"""Several seeds of ``experiments/distill.py`` in one table and one plot (mean and spread).

Reads the ``results.json`` of finished distillation runs (one work directory per seed, same config)
and writes ``OUT.json`` (per method and budget: the per-seed test accuracies of the
validation-selected students, mean, min, max; IDEAL's and NaiveKD's pool class shares),
``OUT.md`` (the table) and ``OUT.png`` (test accuracy vs TRUE teacher queries: mean line,
min-max band)::

    python experiments/distill_seeds.py --workdirs runs/distill_s0 runs/distill_s1 \\
        runs/distill_s2 --out docs/distill_default
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs.distill_configs import DistillExperimentConfig  # noqa: E402

from dfml_jax.experiment import markdown_table, plot_curves, upgrade_saved_config  # noqa: E402

METHOD_ORDER = ("IDEAL", "NaiveKD", "DFME")


def load_runs(workdirs: Sequence[str]) -> List[dict]:
    """The ``results.json`` of each work directory; an unfinished or mixed set is an error."""
    runs = []
    for w in workdirs:
        path = os.path.join(w, "results.json")
        if not os.path.exists(os.path.join(w, "DONE")) or not os.path.exists(path):
            raise SystemExit(f"{w} holds no finished distillation run (results.json and DONE); "
                             "run experiments/distill.py there first.")
        with open(path) as f:
            runs.append(json.load(f))
    names = {r["config"]["name"] for r in runs}
    strip = ("seed",)
    # runs from before a config rename (DFME's grad_m -> num_directions) compare under the new names
    current = DistillExperimentConfig()
    cfgs = {json.dumps({k: v for k, v in upgrade_saved_config(current, r["config"])[0].items()
                        if k not in strip}, sort_keys=True) for r in runs}
    if len(cfgs) != 1:
        raise SystemExit(f"the runs use different configs ({sorted(names)}); aggregate runs that "
                         "differ in their seed only.")
    return runs


def summarise(runs: Sequence[dict]) -> Dict[str, dict]:
    """``{method: {budget: {"seeds", "test_acc", "queries", "mean", "min", "max"}}}``."""
    out: Dict[str, dict] = {}
    for r in runs:
        for row in r["rows"]:
            if row["budget"] == "-":
                continue
            cell = out.setdefault(row["method"], {}).setdefault(str(row["budget"]), {
                "seeds": [], "test_acc": [], "queries": []})
            cell["seeds"].append(row["seed"])
            cell["test_acc"].append(round(float(row["test_acc"]), 2))
            cell["queries"].append(int(row["queries"]))
    for cells in out.values():
        for cell in cells.values():
            a = np.asarray(cell["test_acc"])
            cell.update(mean=round(float(a.mean()), 2), min=round(float(a.min()), 2),
                        max=round(float(a.max()), 2))
    return out


def pool_shares(runs: Sequence[dict]) -> Dict[str, List[dict]]:
    """Per method and seed: the smallest and largest class share (%) of the paid-for pool."""
    out: Dict[str, List[dict]] = {}
    for r in runs:
        for name, res in r["runs"].items():
            h = np.asarray(res.get("class_histogram") or [], np.float64)
            if h.size and h.sum():
                out.setdefault(name, []).append(
                    {"seed": res.get("seed"), "queries": int(h.sum()),
                     "min_pct": round(100 * float(h.min() / h.sum()), 1),
                     "max_pct": round(100 * float(h.max() / h.sum()), 1)})
    return out


def table(summary: Dict[str, dict]) -> List[dict]:
    budgets = sorted({int(b) for cells in summary.values() for b in cells})
    rows = []
    for b in budgets:
        row = {"queries": f"{b:,}"}
        for m in [m for m in METHOD_ORDER if m in summary] + sorted(set(summary) -
                                                                    set(METHOD_ORDER)):
            c = summary[m].get(str(b))
            row[m] = "-" if c is None else (
                f"{c['mean']:.1f} [{c['min']:.1f}, {c['max']:.1f}] "
                f"({' / '.join(f'{a:.1f}' for a in c['test_acc'])})")
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdirs", nargs="+", required=True, help="one finished run per seed")
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args(argv)
    runs = load_runs(args.workdirs)
    seeds = [r["config"]["seed"] for r in runs]
    summary = summarise(runs)
    teacher = [r["teacher"]["test_acc"] * 100 for r in runs]
    shares = pool_shares(runs)
    result = {"config": runs[0]["config"]["name"], "seeds": seeds, "workdirs": args.workdirs,
              "teacher_test_acc": teacher, "methods": summary, "pool_class_shares": shares,
              "wall_s": {r["config"]["seed"]: {row["method"]: row["run_wall_s"]
                                                for row in r["rows"] if row["budget"] != "-"}
                         for r in runs}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    rows = table(summary)
    md = [f"# Distillation from one black box: {result['config']}, seeds {seeds}", "",
          "Test accuracy (%) of the student selected on validation within each budget of TRUE "
          "teacher queries: mean [min, max] (seed by seed). Teacher: "
          + " / ".join(f"{t:.1f}" for t in teacher) + ".", "", markdown_table(rows), ""]
    for name, per_seed in shares.items():
        md.append(f"- {name}: pool class share (min / max %) per seed: " + ", ".join(
            f"seed {s['seed']}: {s['min_pct']} / {s['max_pct']}" for s in per_seed))
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    bands = {}
    for m, cells in summary.items():
        bs = sorted(cells, key=int)
        bands[m] = ([int(b) for b in bs], [cells[b]["mean"] for b in bs],
                    [cells[b]["min"] for b in bs], [cells[b]["max"] for b in bs])
    lo, hi = min(min(b[0]) for b in bands.values()), max(max(b[0]) for b in bands.values())
    t = float(np.mean(teacher))
    bands["teacher"] = ([lo, hi], [t, t], [min(teacher)] * 2, [max(teacher)] * 2)
    plot_curves(args.out + ".png", {m: (b[0], b[1]) for m, b in bands.items()},
                ranges={m: (b[2], b[3]) for m, b in bands.items()},
                xlabel="teacher queries (true count)", ylabel="test accuracy (%)", logx=True,
                title=f"{result['config']}: mean and min-max over seeds {seeds}")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
