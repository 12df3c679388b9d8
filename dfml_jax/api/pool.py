"""The pool type: what a loaded pool of black-box teachers is, whoever built or served it.

:class:`APIPool` (black-box APIs plus their public records), the white-box view of a teacher for
baselines (:class:`WhiteBoxTeacher`), the pool error and the plain-text summary table. Pools are
trained, stored and loaded by :mod:`dfml_jax.teachers` (which re-exports these names) and reached
over HTTP by :func:`dfml_jax.remote.load_remote_pool`; both build an :class:`APIPool`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from dfml_jax.api.blackbox import BlackBoxAPI

__all__ = ["INPUT_SPACES", "PoolError", "APIPool", "WhiteBoxTeacher", "format_summary"]

#: How an API takes its inputs: normalised by the caller, or raw [0, 1] images.
INPUT_SPACES = ("normalized", "raw")


class PoolError(ValueError):
    """A pool directory is missing files, has an incompatible format or corrupted arrays."""


# ----------------------------------------------------------------------------- public types

class WhiteBoxTeacher(NamedTuple):
    """White-box view of one teacher (baselines only): ``apply(params, x) -> logits``.

    ``params`` is ``{"params": nnx.State, "state": nnx.State}``; ``apply`` runs eval-mode BN and
    expects inputs in the pool's ``input_space``. Teachers of one group share ``apply``.
    """
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any


@dataclasses.dataclass(frozen=True)
class APIPool:
    """A loaded pool: black-box APIs plus their public metadata (no parameters).

    Attributes:
      apis: the :class:`~dfml_jax.api.BlackBoxAPI` objects, in teacher order.
      records: per teacher, the JSON record of ``pool.json`` (architecture, dataset, classes,
        held-out accuracy, seed, ...).
      classes: per teacher, the absolute meta-train class of each output index.
      scenario: ``"SS"``, ``"SH"`` or ``"MH"``.
      input_space: ``"normalized"`` or ``"raw"`` (see :mod:`dfml_jax.teachers`).
      directory: where the pool was loaded from.
      white_box_teachers: ``None`` unless attached with :meth:`with_white_box`.
    """
    apis: tuple
    records: tuple
    classes: tuple
    scenario: str
    input_space: str
    directory: str
    white_box_teachers: tuple | None = None

    def __len__(self) -> int:
        return len(self.apis)

    def __getitem__(self, i: int) -> BlackBoxAPI:
        return self.apis[i]

    def __iter__(self):
        return iter(self.apis)

    def _uniform(self, field: str):
        vals = {json.dumps(r[field]) for r in self.records}
        if len(vals) != 1:
            raise ValueError(f"The teachers of this pool differ in {field!r} ({sorted(vals)}); use "
                             f"the per-teacher records (pool.records[i][{field!r}]) or load the pool "
                             f"with input_space='raw'.")
        return self.records[0][field]

    @property
    def mean(self) -> tuple[float, ...]:
        """Normalisation mean shared by all teachers (ValueError if they differ)."""
        return tuple(self._uniform("mean"))

    @property
    def std(self) -> tuple[float, ...]:
        """Normalisation std shared by all teachers (ValueError if they differ)."""
        return tuple(self._uniform("std"))

    @property
    def image_size(self) -> int:
        """Input side shared by all teachers (ValueError if they differ)."""
        return int(self._uniform("input_shape")[0])

    @property
    def queries(self) -> int:
        """Samples answered by all APIs so far."""
        return int(sum(a.queries for a in self.apis))

    def indices(self, *, dataset: str | None = None, arch: str | None = None) -> list[int]:
        """Teacher indices, optionally restricted to a dataset and/or an architecture."""
        return [i for i, r in enumerate(self.records)
                if (dataset is None or r["dataset"] == dataset) and (arch is None or r["arch"] == arch)]

    def sample_index(self, rng: np.random.Generator) -> int:
        """Draws a teacher as the official code does: dataset ~ U, architecture ~ U, member ~ U.

        For SS this is a uniform draw; for SH/MH the hierarchy matters only if groups differ in
        size. Sampling is with replacement.

        Args:
          rng: NumPy generator (host-side randomness).

        Returns:
          A teacher index.
        """
        datasets = sorted({r["dataset"] for r in self.records})
        d = datasets[int(rng.integers(len(datasets)))]
        archs = sorted({r["arch"] for r in self.records if r["dataset"] == d})
        a = archs[int(rng.integers(len(archs)))]
        members = self.indices(dataset=d, arch=a)
        return members[int(rng.integers(len(members)))]

    def with_white_box(self, teachers: Sequence[WhiteBoxTeacher]) -> "APIPool":
        """A copy with ``white_box_teachers`` attached (see
        :func:`dfml_jax.teachers.load_white_box_teachers`)."""
        if len(teachers) != len(self.apis):
            raise ValueError(f"with_white_box: got {len(teachers)} teachers for {len(self)} APIs.")
        return dataclasses.replace(self, white_box_teachers=tuple(teachers))

    def summary(self) -> str:
        """Table of the teachers and their held-out accuracies."""
        return format_summary({"scenario": self.scenario, "teachers": list(self.records)})

    def __repr__(self) -> str:
        groups = sorted({(r["dataset"], r["arch"]) for r in self.records})
        return (f"APIPool({self.scenario}, {len(self)} APIs, groups="
                f"{['/'.join(g) for g in groups]}, input_space={self.input_space!r})")


# ----------------------------------------------------------------------------- reporting

def format_summary(manifest: Mapping[str, Any]) -> str:
    """A plain-text table of the teachers (held-out accuracy) and per-group statistics.

    Args:
      manifest: the dict returned by :func:`~dfml_jax.teachers.build_pool` /
        :func:`~dfml_jax.teachers.read_manifest` (only
        ``teachers`` and ``scenario`` are used).

    Returns:
      The table as a string.
    """
    rows = manifest["teachers"]
    lines = [f"API pool: scenario {manifest.get('scenario')}, {len(rows)} teachers",
             f"{'idx':>4}  {'dataset':<12} {'arch':<9} {'seed':>10}  {'held-out':>8}  "
             f"{'train':>6}  classes"]
    for r in rows:
        ho = "n/a" if r["heldout_acc"] is None else f"{r['heldout_acc']:.3f}"
        tr = "n/a" if r["train_acc"] is None else f"{r['train_acc']:.3f}"
        lines.append(f"{r['index']:>4}  {r['dataset']:<12} {r['arch']:<9} {r['seed']:>10}  "
                     f"{ho:>8}  {tr:>6}  {r['classes']}")
    lines.append("")
    lines.append(f"{'group':<24} {'n':>4} {'mean':>7} {'min':>7} {'max':>7}   (held-out accuracy)")
    groups: dict = {}
    for r in rows:
        groups.setdefault(f"{r['dataset']}/{r['arch']}", []).append(r["heldout_acc"])
    for name, accs in groups.items():
        a = np.asarray([np.nan if v is None else v for v in accs], np.float64)
        lines.append(f"{name:<24} {len(a):>4} {np.nanmean(a):>7.3f} {np.nanmin(a):>7.3f} "
                     f"{np.nanmax(a):>7.3f}")
    return "\n".join(lines)
