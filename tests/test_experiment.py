"""Experiment plumbing: overrides, run directories, results files, plots."""
import dataclasses
import json

from typing import Optional

import pytest

from dfml_jax.experiment import RunDir, apply_overrides, plot_curves, select_config, write_results


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 3
    lr: float = 0.1
    first_order: bool = False
    budgets: tuple = (5000, 25000)
    name: str = "x"
    res: Optional[int] = 7


def test_overrides_types_and_errors():
    c = apply_overrides(Cfg(), ["steps=7", "lr=0.5", "first_order=true", "budgets=[1,2,3]", "name=y"])
    assert c == Cfg(7, 0.5, True, (1, 2, 3), "y")
    assert apply_overrides(Cfg(), ["res=None"]).res is None         # Optional fields accept none
    assert apply_overrides(Cfg(), ["res=14"]).res == 14
    assert apply_overrides(Cfg(), ["name=none"]).name == "none"     # not for plain str fields
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(Cfg(), ["steps=none"])
    with pytest.raises(ValueError, match="unknown config key 'stepz'.*steps"):
        apply_overrides(Cfg(), ["stepz=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(Cfg(), ["steps=abc"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(Cfg(), ["steps"])
    with pytest.raises(ValueError, match="available: \\['default', 'smoke'\\]"):
        select_config({"smoke": 1, "default": 2}, "paper")


def test_run_dir_refuses_a_different_config_and_marks_done(tmp_path):
    run = RunDir(str(tmp_path / "r"), Cfg())
    assert not run.done
    RunDir(str(tmp_path / "r"), Cfg())  # same config: fine (resume)
    with pytest.raises(ValueError, match=r"different config \(keys \['steps'\]"):
        RunDir(str(tmp_path / "r"), Cfg(steps=4))
    run.mark_done()
    assert RunDir(str(tmp_path / "r")).done


@dataclasses.dataclass(frozen=True)
class CfgV2(Cfg):
    new_option: int = 4  # a field added after a run started


def test_run_dir_resumes_across_a_new_field_at_its_default(tmp_path):
    RunDir(str(tmp_path), Cfg())
    RunDir(str(tmp_path), CfgV2())  # new field at its default: the same run
    with pytest.raises(ValueError, match="new_option"):
        RunDir(str(tmp_path), CfgV2(new_option=5))


def test_results_and_plot(tmp_path):
    run = RunDir(str(tmp_path))
    rows = [{"method": "a", "acc": (51.234, 1.5), "queries": 100}, {"method": "b", "acc": (40.0, 2.0), "queries": 0}]
    jp, mp = write_results(run, rows, title="T", notes=["selected on validation"])
    assert json.load(open(jp))["rows"][0]["acc"] == [51.234, 1.5]
    md = open(mp).read()
    assert "| method | acc | queries |" in md and "51.23 ± 1.50" in md and "selected on validation" in md
    p = plot_curves(str(tmp_path / "c.png"), {"a": ([1, 2], [3, 4])}, xlabel="x", ylabel="y", title="t",
                    bands={"a": [0.5, 0.5]})
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
