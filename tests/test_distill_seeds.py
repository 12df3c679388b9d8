"""experiments/distill_seeds.py: several seeds of a distillation run in one table and plot."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import distill_seeds  # noqa: E402


def _run(path, seed, ideal_25k, name="default", dfme=None):
    os.makedirs(path)
    rows = [{"method": "teacher (real data, all training images)", "budget": "-", "queries": 0,
             "test_acc": 95.6, "seed": 0, "run_wall_s": 20},
            {"method": "IDEAL", "budget": 5000, "queries": 5000, "test_acc": 70.0 + seed,
             "seed": seed, "run_wall_s": 300},
            {"method": "IDEAL", "budget": 25000, "queries": 24000, "test_acc": ideal_25k,
             "seed": seed, "run_wall_s": 300},
            {"method": "DFME", "budget": 25000, "queries": 22400, "test_acc": 60.0,
             "seed": seed, "run_wall_s": 20}]
    res = {"rows": rows, "config": {"name": name, "seed": seed, "budgets": [5000, 25000],
                                    "dfme": dfme or {"num_directions": 1, "smoothing": 0.001}},
           "teacher": {"test_acc": 0.956},
           "runs": {"ideal": {"seed": seed, "class_histogram": [10, 30, 60]},
                    "dfme@25000": {"seed": seed}}}
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(res, f)
    open(os.path.join(path, "DONE"), "w").close()


def test_seeds_table_plot_and_json(tmp_path):
    _run(str(tmp_path / "s0"), 0, 94.0)
    _run(str(tmp_path / "s1"), 1, 90.0)
    out = distill_seeds.main(["--workdirs", str(tmp_path / "s0"), str(tmp_path / "s1"),
                              "--out", str(tmp_path / "agg")])
    cell = out["methods"]["IDEAL"]["25000"]
    assert cell["test_acc"] == [94.0, 90.0] and cell["mean"] == 92.0
    assert (cell["min"], cell["max"]) == (90.0, 94.0) and cell["queries"] == [24000, 24000]
    assert out["methods"]["IDEAL"]["5000"]["mean"] == 70.5
    assert out["pool_class_shares"]["ideal"][0] == {"seed": 0, "queries": 100, "min_pct": 10.0,
                                                    "max_pct": 60.0}
    for ext in (".json", ".md", ".png"):
        assert (tmp_path / f"agg{ext}").exists()
    md = (tmp_path / "agg.md").read_text()
    assert "92.0 [90.0, 94.0] (94.0 / 90.0)" in md


def test_runs_from_before_the_dfme_rename_aggregate_with_newer_ones(tmp_path):
    _run(str(tmp_path / "s0"), 0, 94.0, dfme={"grad_m": 1, "grad_epsilon": 0.001})
    _run(str(tmp_path / "s1"), 1, 90.0)
    out = distill_seeds.main(["--workdirs", str(tmp_path / "s0"), str(tmp_path / "s1"),
                              "--out", str(tmp_path / "agg")])
    assert out["seeds"] == [0, 1]
    _run(str(tmp_path / "s2"), 2, 90.0, dfme={"grad_m": 2, "grad_epsilon": 0.001})
    with pytest.raises(SystemExit, match="different configs"):
        distill_seeds.main(["--workdirs", str(tmp_path / "s1"), str(tmp_path / "s2"),
                            "--out", str(tmp_path / "x")])


def test_unfinished_or_mixed_runs_are_refused(tmp_path):
    _run(str(tmp_path / "a"), 0, 94.0)
    _run(str(tmp_path / "b"), 1, 90.0, name="code_recipe")
    with pytest.raises(SystemExit, match="different configs"):
        distill_seeds.main(["--workdirs", str(tmp_path / "a"), str(tmp_path / "b"),
                            "--out", str(tmp_path / "x")])
    os.makedirs(tmp_path / "c")
    with pytest.raises(SystemExit, match="no finished distillation run"):
        distill_seeds.main(["--workdirs", str(tmp_path / "c"), "--out", str(tmp_path / "x")])
