"""Shared experiment plumbing: configs with overrides, results tables, plots, run directories.

Experiment configs are frozen dataclasses registered by name (``smoke`` for CI, ``default`` for the
README's job, ``paper_*`` for the papers' settings); :func:`apply_overrides` applies
``--set key=value`` strings with type checking. A run directory holds ``config.json``,
``results.json``, ``results.md``, PNG plots, checkpoints, and a ``DONE`` marker so a finished run is
not redone.

A config class that renamed a field lists ``{old name: new name}`` in its ``RENAMED_FIELDS`` class
attribute (a ``ClassVar``): ``--set old=...`` is then an error naming the new key, and a
``config.json`` saved under the old name is read under the new one (:func:`upgrade_saved_config`).
A dotted new name moves a field into a nested config (``{"meta_iterations":
"loop.meta_iterations"}``); renames chain, so a key moved into a nested config that renamed it
again is reported under its final name (:func:`current_name`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from dfml_jax import __version__

__all__ = ["apply_overrides", "select_config", "renamed_fields", "current_name",
           "upgrade_saved_config", "RunDir", "write_results", "markdown_table", "plot_curves"]


def renamed_fields(config) -> Dict[str, str]:
    """``{old name: new name}`` of a config dataclass's (or class's) renamed fields: its
    ``RENAMED_FIELDS`` class attribute, ``{}`` if it has none."""
    return dict(getattr(config, "RENAMED_FIELDS", None) or {})


def _renamed_error(key: str, new: str, raw: str, prefix: str) -> ValueError:
    return ValueError(f"--set {prefix}{key}={raw}: config key {prefix + key!r} was renamed; "
                      f"dfml_jax {__version__} calls it {prefix + new!r}: use "
                      f"--set {prefix}{new}={raw}")


def current_name(config, key: str) -> Optional[str]:
    """The current dotted name of a renamed (possibly dotted) config key, or None if ``key`` was
    not renamed. Renames are followed through nested configs and chained: a key moved into a
    nested config whose own ``RENAMED_FIELDS`` renamed it again gets its final name.

    >>> @dataclasses.dataclass(frozen=True)
    ... class Inner:
    ...     RENAMED_FIELDS = {"q": "num_directions"}
    ...     num_directions: int = 3
    >>> @dataclasses.dataclass(frozen=True)
    ... class Outer:
    ...     RENAMED_FIELDS = {"num_directions": "inner.num_directions", "q": "inner.q"}
    ...     inner: Inner = Inner()
    >>> current_name(Outer(), "q"), current_name(Outer(), "inner.q"), current_name(Outer(), "inner")
    ('inner.num_directions', 'inner.num_directions', None)
    """
    head, dot, rest = key.partition(".")
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if head in fields:
        sub = getattr(config, head)
        if not (dot and dataclasses.is_dataclass(sub)):
            return None
        new = current_name(sub, rest)
        return None if new is None else f"{head}.{new}"
    renamed = renamed_fields(config)
    if head not in renamed:
        return None
    target = renamed[head] + (dot + rest)
    return current_name(config, target) or target


def _parse_value(raw: str, current: Any, key: str):
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: expected a boolean (true/false)")
    if current is None or isinstance(current, (list, tuple, dict)):
        try:
            v = json.loads(raw)
        except json.JSONDecodeError:
            v = raw
        return tuple(v) if isinstance(current, tuple) and isinstance(v, list) else v
    try:
        return type(current)(raw)
    except ValueError as e:
        raise ValueError(f"--set {key}={raw}: expected {type(current).__name__}") from e


def apply_overrides(cfg, overrides: Iterable[str]):
    """Returns ``cfg`` (a dataclass) with ``key=value`` overrides applied.

    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     steps: int = 3
    ...     lr: float = 0.1
    >>> apply_overrides(C(), ["steps=5", "lr=1e-2"])
    C(steps=5, lr=0.01)

    Fields annotated ``Optional[...]`` also accept ``none`` / ``null``. A field that is itself a
    dataclass is reached with a dotted key:

    >>> @dataclasses.dataclass(frozen=True)
    ... class Outer:
    ...     inner: C = C()
    ...     name: str = "x"
    >>> apply_overrides(Outer(), ["inner.steps=7"]).inner.steps
    7

    A renamed field (the class's ``RENAMED_FIELDS``) is refused under its old name, with the new
    one in the error.
    """
    return _apply_overrides(cfg, overrides, "")


def _apply_overrides(cfg, overrides: Iterable[str], prefix: str):
    """:func:`apply_overrides` of the sub-config at the dotted key ``prefix`` (for the errors)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    optional = {f.name for f in dataclasses.fields(cfg) if "Optional" in str(f.type)
                or "None" in str(f.type)}
    changes = {}
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        head, dot, rest = key.partition(".")
        if dot and head in fields and dataclasses.is_dataclass(getattr(cfg, head)):
            sub = changes.get(head, getattr(cfg, head))
            changes[head] = _apply_overrides(sub, [f"{rest}={raw}"], f"{prefix}{head}.")
            continue
        new = None if head in fields else current_name(cfg, key)
        if new is not None:
            raise _renamed_error(key, new, raw, prefix)
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; valid keys: {sorted(fields)}")
        if key in optional and raw.strip().lower() in ("none", "null"):
            changes[key] = None
            continue
        changes[key] = _parse_value(raw, getattr(cfg, key), key)
    return dataclasses.replace(cfg, **changes)


def select_config(configs: Mapping[str, Any], name: str):
    """Looks up a named config, with an error listing the valid names."""
    if name not in configs:
        raise ValueError(f"unknown config {name!r}; available: {sorted(configs)}")
    return configs[name]


_MISSING = object()


def upgrade_saved_config(config, saved: Mapping[str, Any], prefix: str = ""
                         ) -> Tuple[Dict[str, Any], List[str]]:
    """A saved config dict (e.g. an older run's ``config.json``) with its renamed keys under the
    names of ``config``'s class (its ``RENAMED_FIELDS``), nested configs included.

    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     RENAMED_FIELDS = {"q": "num_directions"}   # not annotated: not a field
    ...     num_directions: int = 3
    >>> upgrade_saved_config(C(), {"q": 5})
    ({'num_directions': 5}, ['q -> num_directions'])

    A new name may be dotted: a flat field moved into a nested config.

    >>> @dataclasses.dataclass(frozen=True)
    ... class Outer:
    ...     RENAMED_FIELDS = {"zo_q": "zo.num_directions"}
    ...     zo: C = C()
    ...     steps: int = 1
    >>> upgrade_saved_config(Outer(), {"zo_q": 5, "steps": 2})
    ({'zo': {'num_directions': 5}, 'steps': 2}, ['zo_q -> zo.num_directions'])

    Args:
      config: the current config (a dataclass instance): which keys were renamed, and which
        fields are nested configs.
      saved: the saved dict (not modified).
      prefix: dotted path of ``config`` (for the returned descriptions).

    Returns:
      ``(upgraded dict, ["old -> new", ...])``, the key order kept (a moved key goes where its
      nested config is, or where the first key moved into it was).

    Raises:
      ValueError: ``saved`` holds a key under both its old and its new name.
    """
    renamed = renamed_fields(config)
    nested = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if dataclasses.is_dataclass(getattr(config, f.name))} \
        if dataclasses.is_dataclass(config) else {}
    out: Dict[str, Any] = {}
    done: List[str] = []
    for k, v in saved.items():
        path = [k]
        if k in renamed and k not in nested:
            new = renamed[k]
            if _saved_has(saved, new):
                raise ValueError(f"a saved config holds both {prefix + k!r} and its new name "
                                 f"{prefix + new!r}")
            done.append(f"{prefix}{k} -> {prefix}{new}")
            path = new.split(".")
        _put(out, path, v)
    for k in nested:
        if k in out and isinstance(out[k], Mapping):
            out[k], sub = upgrade_saved_config(nested[k], out[k], f"{prefix}{k}.")
            done += sub
    return out, _chained(done)


def _chained(renames: List[str]) -> List[str]:
    """``["a -> b", "b -> c"]`` as ``["a -> c"]``: a key moved into a nested config and renamed
    there is reported under its final name."""
    new = dict(r.split(" -> ") for r in renames)
    out = []
    for old, to in new.items():
        if old in new.values():
            continue                     # a middle name of a chain: reported with its start
        seen = {old}
        while to in new and to not in seen:
            seen.add(to)
            to = new[to]
        out.append(f"{old} -> {to}")
    return out


def _describe_renames(renames: List[str]) -> str:
    """The renames of a saved config in words; keys only moved into a nested config (``k ->
    section.k``) are listed together."""
    moved: Dict[str, List[str]] = {}
    other = []
    for r in renames:
        old, new = r.split(" -> ")
        section, _, last = new.rpartition(".")
        if last == old and section:
            moved.setdefault(section, []).append(old)
        else:
            other.append(r)
    return ", ".join(other + [f"{', '.join(keys)} -> {section}.*"
                              for section, keys in moved.items()])


def _saved_has(saved: Mapping[str, Any], dotted: str) -> bool:
    """Whether the nested dict ``saved`` holds the dotted key."""
    node: Any = saved
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _put(out: Dict[str, Any], path: List[str], value) -> None:
    """``out[path[0]][path[1]]... = value``, creating (copies of) the dicts on the way."""
    for part in path[:-1]:
        out[part] = dict(out.get(part) or {})
        out = out[part]
    out[path[-1]] = value


def _defaults(config) -> dict:
    """JSON-normalised default values of a dataclass config's fields, flattened to dotted keys
    (the fields of a nested config's default, each under its own key)."""
    if not dataclasses.is_dataclass(config):
        return {}
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out.update(_flat(f.name, json.loads(json.dumps(value, default=str))))
    return out


def _flat(key: str, value) -> Dict[str, Any]:
    """``{key: value}``, a dict value flattened to dotted keys (``{"a.b": 1}``)."""
    if isinstance(value, Mapping) and value:
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(f"{key}.{k}", v))
        return out
    return {key: value}


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any]
                 ) -> List[str]:
    """The dotted keys whose values differ between two saved configs; a key missing from ``old``
    (added to the config class since) matches when the new value is that key's default."""
    old = {k: v for key, val in old.items() for k, v in _flat(key, val).items()}
    new = {k: v for key, val in new.items() for k, v in _flat(key, val).items()}
    return sorted(k for k in set(old) | set(new)
                  if (old[k] if k in old else defaults.get(k, _MISSING)) != new.get(k, _MISSING))


class RunDir:
    """A run's working directory.

    Args:
      path: the directory (created if missing).
      config: the run's config (a dataclass); saved as ``config.json``. If the directory already
        holds a different config, an error says so instead of mixing two runs. A saved config
        naming renamed fields under their old names (``RENAMED_FIELDS``) is read under the new
        names, with a warning; the file is left as written.
    """

    def __init__(self, path: str, config=None):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        if config is not None:
            cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
            cfg = json.loads(json.dumps(cfg, default=str))
            p = self.file("config.json")
            if os.path.exists(p):
                with open(p) as f:
                    old = json.load(f)
                old, renames = upgrade_saved_config(config, old)
                if renames:  # a run started before a rename: the same run, keys renamed
                    warnings.warn(f"{p} was written before config keys were renamed "
                                  f"({_describe_renames(renames)} in dfml_jax {__version__}); resuming "
                                  "it under the new names", stacklevel=2)
                # a field added to the config class since the run started matches when the new
                # value is that field's default (older runs keep resuming across versions)
                diff = _config_diff(old, cfg, _defaults(config))
                if diff:
                    raise ValueError(
                        f"{self.path} holds a run with a different config (keys {diff} differ); "
                        "use a new --workdir or delete the old one.")
            else:
                with open(p, "w") as f:
                    json.dump(cfg, f, indent=2)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def done(self) -> bool:
        return os.path.exists(self.file("DONE"))

    def mark_done(self) -> None:
        with open(self.file("DONE"), "w") as f:
            f.write("finished\n")

    @property
    def checkpoint_dir(self) -> str:
        return self.file("checkpoints")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(a, float) for a in v):
        return f"{v[0]:.2f} ± {v[1]:.2f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A markdown table of ``rows`` (dicts); ``(mean, ci)`` pairs print as ``mean ± ci``."""
    if not rows:
        return "(no results)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(run: RunDir, rows: List[Dict[str, Any]], *, title: str,
                  columns: Optional[Sequence[str]] = None, notes: Sequence[str] = (),
                  extra: Optional[Dict[str, Any]] = None) -> Tuple[str, str]:
    """Writes ``results.json`` (rows + extra) and ``results.md`` (title, table, notes).

    Returns:
      The two paths.
    """
    jp, mp = run.file("results.json"), run.file("results.md")
    with open(jp, "w") as f:
        json.dump({"title": title, "rows": rows, **(extra or {})}, f, indent=2, default=float)
    with open(mp, "w") as f:
        f.write(f"# {title}\n\n" + markdown_table(rows, columns))
        for n in notes:
            f.write(f"\n- {n}")
        f.write("\n")
    return jp, mp


def plot_curves(path: str, curves: Mapping[str, Tuple[Sequence[float], Sequence[float]]], *,
                xlabel: str, ylabel: str, title: str, logx: bool = False,
                bands: Optional[Mapping[str, Sequence[float]]] = None,
                ranges: Optional[Mapping[str, Tuple[Sequence[float], Sequence[float]]]] = None
                ) -> str:
    """Saves a PNG line plot, one line per named curve.

    Args:
      path: the PNG file. curves: ``{name: (x, y)}``. xlabel, ylabel, title, logx: axes.
      bands: optional ``{name: half_widths}``, shaded ``y +- half_width`` (e.g. 95% CIs).
      ranges: optional ``{name: (lower, upper)}``, shaded between the two (e.g. min-max over
        seeds).

    Returns:
      ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, (x, y) in curves.items():
        line, = ax.plot(x, y, marker="o", ms=3, label=name)
        if bands and name in bands:
            import numpy as np

            b = np.asarray(bands[name])
            ax.fill_between(x, np.asarray(y) - b, np.asarray(y) + b, alpha=0.2, color=line.get_color())
        if ranges and name in ranges:
            ax.fill_between(x, ranges[name][0], ranges[name][1], alpha=0.2,
                            color=line.get_color())
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
