"""The BiDf-MKD smoke experiment end to end: every method, results files, a finished run is kept."""
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
from configs.bidf_mkd_configs import CONFIGS, get_config  # noqa: E402

from dfml_jax.bidf_mkd.experiment import run_experiment  # noqa: E402
from dfml_jax.experiment import apply_overrides  # noqa: E402


def test_configs_are_consistent():
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        assert cfg.inv_per_class >= cfg.shots + cfg.query, name
    with pytest.raises(ValueError, match="available"):
        get_config("nope")


def test_smoke_run_end_to_end(tmp_path):
    work = str(tmp_path / "run")
    cfg = get_config("smoke")
    out = run_experiment(cfg, work, progress=False)
    assert os.path.exists(os.path.join(work, "DONE"))
    methods = [r["method"] for r in out["rows"]]
    assert methods == list(cfg.methods)
    for r in out["rows"]:
        for s in ("1-shot acc (%)", "5-shot acc (%)"):
            mean, ci = r[s]
            assert 0 <= mean <= 100 and ci >= 0
    q = {r["method"]: r["API queries"] for r in out["rows"]}
    assert q["bidf_mkd"] > 0 and q["white_box"] > 0 and q["random"] == q["average"] == q["maml_real"] == 0
    # the fine-tuning lr of every method and shot is the best of the grid on meta-validation
    for m, r in out["methods"].items():
        for s in cfg.test_shots:
            table = r[f"{s}-shot_val_by_lr"]
            assert set(table) == {str(v) for v in cfg.finetune_lrs}, m
            assert r[f"{s}-shot_lr"] == max(sorted(cfg.finetune_lrs), key=lambda v: table[str(v)]), m
    md = open(os.path.join(work, "results.md")).read()
    assert "| bidf_mkd |" in md and "±" in md
    assert os.path.exists(os.path.join(work, "val_acc_vs_iteration.png"))
    assert os.path.exists(os.path.join(work, "val_acc_vs_queries.png"))
    pools = [d for d in os.listdir(work) if d.startswith("pool-")]  # <workdir>/pool-<build key>
    assert len(pools) == 1
    pool = json.load(open(os.path.join(work, pools[0], "pool.json")))
    assert len(pool["teachers"]) == cfg.num_apis and pools[0] == f"pool-{pool['build_key'][:12]}"
    assert pool["groups"][0]["recipe"]["augment"] == "crop"  # glyphs: shifts, no flips
    # a finished run is not redone
    t0 = time.time()
    assert run_experiment(cfg, work, progress=False) == out
    assert time.time() - t0 < 5
    # the same workdir with a different config is refused
    with pytest.raises(ValueError, match="different config"):
        run_experiment(apply_overrides(cfg, ["meta_iterations=7"]), work, progress=False)
