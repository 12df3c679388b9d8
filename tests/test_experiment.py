"""Experiment plumbing: overrides, run directories, results files, plots."""
import dataclasses
import json

from typing import ClassVar, Dict, Optional

import pytest

from dfml_jax.experiment import (RunDir, apply_overrides, current_name, plot_curves, select_config,
                                 write_results)


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


@dataclasses.dataclass(frozen=True)
class Renamed:
    RENAMED_FIELDS: ClassVar[Dict[str, str]] = {"q": "num_directions", "mu": "smoothing"}
    num_directions: int = 4
    smoothing: float = 0.01


@dataclasses.dataclass(frozen=True)
class Outer:
    steps: int = 3
    zo: Renamed = Renamed()


def test_overrides_refuse_renamed_keys_naming_the_new_one():
    assert apply_overrides(Renamed(), ["num_directions=9"]).num_directions == 9
    with pytest.raises(ValueError, match=r"'q' was renamed.*'num_directions'.*--set num_directions=50"):
        apply_overrides(Renamed(), ["q=50"])
    with pytest.raises(ValueError, match=r"'zo\.mu' was renamed.*'zo\.smoothing'.*--set zo\.smoothing=0\.1"):
        apply_overrides(Outer(), ["zo.mu=0.1"])
    assert not any("RENAMED" in f.name for f in dataclasses.fields(Renamed))   # a ClassVar


def test_run_dir_resumes_a_config_saved_under_old_names(tmp_path):
    """A config.json written before a rename (top level or nested) is the same run, read under the
    new names with a warning; a different value under the old name is still a different run."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"q": 4, "mu": 0.01}))
    with pytest.warns(UserWarning, match=r"q -> num_directions, mu -> smoothing"):
        RunDir(str(tmp_path / "a"), Renamed())
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == {"q": 4, "mu": 0.01}  # kept
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"keys \['num_directions'\]"):
        RunDir(str(tmp_path / "a"), Renamed(num_directions=5))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"steps": 3, "zo": {"q": 4, "mu": 0.01}}))
    with pytest.warns(UserWarning, match=r"zo\.q -> zo\.num_directions, zo\.mu -> zo\.smoothing"):
        RunDir(str(tmp_path / "b"), Outer())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"q": 4, "num_directions": 4, "mu": 0.01}))
    with pytest.raises(ValueError, match="both 'q' and its new name 'num_directions'"):
        RunDir(str(tmp_path / "c"), Renamed())


@dataclasses.dataclass(frozen=True)
class Moved:
    """``Outer`` after its flat ``zo_q`` (once ``q``) moved into the nested ``zo``."""
    RENAMED_FIELDS: ClassVar[Dict[str, str]] = {"zo_q": "zo.num_directions",
                                                "q": "zo.num_directions"}
    steps: int = 3
    zo: Renamed = Renamed()


def test_renamed_keys_may_move_into_a_nested_config(tmp_path):
    """A dotted new name: ``--set zo_q=`` names ``zo.num_directions``, and a config.json with the
    flat key resumes under the nested one (the nested fields it lacks at their defaults)."""
    assert apply_overrides(Moved(), ["zo.num_directions=9"]).zo.num_directions == 9
    for old in ("zo_q", "q"):
        with pytest.raises(ValueError, match=rf"'{old}' was renamed.*'zo\.num_directions'.*"
                                             r"--set zo\.num_directions=50"):
            apply_overrides(Moved(), [f"{old}=50"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"zo_q": 4, "steps": 3}))
    with pytest.warns(UserWarning, match=r"zo_q -> zo\.num_directions"):
        RunDir(str(tmp_path / "a"), Moved())
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"keys \['zo\.smoothing'\]"):
        RunDir(str(tmp_path / "a"), Moved(zo=Renamed(smoothing=0.5)))
    with pytest.warns(UserWarning), pytest.raises(ValueError,
                                                   match=r"keys \['zo\.num_directions'\]"):
        RunDir(str(tmp_path / "a"), Moved(zo=Renamed(num_directions=5)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"zo_q": 4,
                                                             "zo": {"num_directions": 4}}))
    with pytest.raises(ValueError, match=r"both 'zo_q' and its new name 'zo\.num_directions'"):
        RunDir(str(tmp_path / "b"), Moved())


@dataclasses.dataclass(frozen=True)
class Section:
    """``Outer`` after its flat fields (``steps``, ``zo``) moved into a nested ``section``: the
    moved keys, the old names of the inner config and dotted keys under the old head all name
    the new key, renames chained to the final name."""
    RENAMED_FIELDS: ClassVar[Dict[str, str]] = {k: f"section.{k}" for k in ("steps", "zo")}
    name: str = "x"
    section: Outer = Outer()


def test_a_section_of_moved_keys_chains_the_renames(tmp_path):
    assert current_name(Section(), "steps") == "section.steps"
    assert current_name(Section(), "zo.q") == "section.zo.num_directions"
    assert current_name(Section(), "section.zo.mu") == "section.zo.smoothing"
    assert current_name(Section(), "name") is None and current_name(Section(), "nope") is None
    assert apply_overrides(Section(), ["section.zo.smoothing=0.5"]).section.zo.smoothing == 0.5
    for old, new in [("steps", "section.steps"), ("zo.q", "section.zo.num_directions"),
                     ("zo.smoothing", "section.zo.smoothing")]:
        with pytest.raises(ValueError, match=rf"'{old}' was renamed.*'{new}'.*--set {new}=7"):
            apply_overrides(Section(), [f"{old}=7"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"steps": 3, "zo": {"q": 4},
                                                             "name": "x"}))
    with pytest.warns(UserWarning, match=r"zo\.q -> section\.zo\.num_directions, "
                                         r"steps, zo -> section\.\*"):
        RunDir(str(tmp_path / "a"), Section())
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"keys \['section\.steps'\]"):
        RunDir(str(tmp_path / "a"), Section(section=Outer(steps=4)))


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
