"""API-pool build keys: everything a pool's teachers depend on, and its SHA-256.

Pools describe themselves: :func:`~dfml_jax.teachers.build.build_pool` records in ``pool.json`` its
``build_spec`` (:func:`pool_spec`: scenario, datasets, architectures, teachers per group, way,
seed, train fraction, model and dataset options, every group's training recipe with its
augmentation, the content key of every dataset (:func:`dfml_jax.data.content_key`, which for
Glyphs covers the rendering and the font bytes), the pool format and trainer versions) and
``build_key``, its SHA-256 (:func:`pool_key`). Whoever reuses a pool automatically compares keys
(:func:`check_pool_key`; :func:`~dfml_jax.teachers.build.obtain_pool` builds into
``<parent>/pool-<key>`` and reuses only an equal key, as the BiDf-MKD experiment runner does): a
pool built from other inputs is never silently reused. Pools written before keys existed record
none; :func:`~dfml_jax.teachers.store.load_pool` still reads them, but their key is unknown. How the
teachers are split into populations, over devices and the strategy do not enter the key (the
weights do not depend on them beyond float reassociation).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dfml_jax.api.pool import PoolError
from dfml_jax.data import content_key
from dfml_jax.teachers.population import TRAINER_VERSION, recipe_for
from dfml_jax.teachers.store import POOL_FORMAT_VERSION, read_manifest
from dfml_jax.teachers.types import resolve_archs, validate_scenario

__all__ = [
    "POOL_KEY_VERSION", "PoolKeyError", "pool_spec", "pool_key", "spec_differences",
    "check_pool_key", "split_fingerprint", "custom_data_key",
]

#: Version of the build key's layout (:func:`pool_spec`); part of the key.
POOL_KEY_VERSION = 1


class PoolKeyError(PoolError):
    """A pool was built from other inputs than the ones asked for (or records no build key)."""


#: ``dataset_kwargs`` that do not change a split's content (left out of build keys).
_NON_CONTENT_DATASET_KWARGS = ("cache_dir", "progress", "rebuild", "data_dir", "download")


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True))


def pool_spec(*, scenario: str, datasets: Sequence[str], archs: Sequence[str] | None = None,
              num_apis: int = 100, way: int = 5, epochs: int | None = None, seed: int = 0,
              model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
              recipe_overrides: Mapping[str, Any] | None = None,
              dataset_kwargs: Mapping[str, Any] | None = None, train_fraction: float = 0.8,
              data_keys: Mapping[str, Any] | None = None) -> dict:
    """Everything a pool's trained teachers depend on (its build key, as a JSON dict).

    Takes the arguments of :func:`~dfml_jax.teachers.build.build_pool` that change the teachers; the
    population size, devices, strategy and progress bars do not.

    Args:
      scenario, datasets, archs, num_apis, way, epochs, seed, model_kwargs, recipe_overrides,
        dataset_kwargs, train_fraction: as :func:`~dfml_jax.teachers.build.build_pool`.
      data_keys: per dataset, the content key of its meta-train split; default
        :func:`dfml_jax.data.content_key` of ``(name, **dataset_kwargs)`` (Glyphs: the rendering
        cache key, font bytes included).

    Returns:
      ``{"key_version", "pool_format_version", "trainer_version", "scenario", "datasets",
      "archs", "num_apis", "way", "seed", "train_fraction", "model_kwargs", "dataset_kwargs",
      "recipes" ({"<dataset>/<arch>": TrainRecipe fields, augmentation included}), "data"}``.

    Raises:
      ValueError: an invalid scenario, architecture, augmentation or dataset name.
    """
    archs = resolve_archs(scenario, archs)
    datasets = tuple(datasets)
    validate_scenario(scenario, datasets, archs)
    overrides = dict(recipe_overrides or {})
    if epochs is not None:
        overrides["epochs"] = int(epochs)
    dkw = dict(dataset_kwargs or {})
    if data_keys is None:
        data_keys = {d: content_key(d, **dkw) for d in datasets}
    missing = [d for d in datasets if d not in data_keys]
    if missing:
        raise ValueError(f"pool_spec: data_keys lacks the dataset(s) {missing}.")
    mk = dict(model_kwargs or {})
    return _jsonable({
        "key_version": POOL_KEY_VERSION, "pool_format_version": POOL_FORMAT_VERSION,
        "trainer_version": TRAINER_VERSION, "scenario": scenario, "datasets": list(datasets),
        "archs": list(archs), "num_apis": int(num_apis), "way": int(way), "seed": int(seed),
        "train_fraction": float(train_fraction),
        "model_kwargs": {a: dict(mk.get(a) or {}) for a in archs},
        "dataset_kwargs": {k: v for k, v in dkw.items() if k not in _NON_CONTENT_DATASET_KWARGS},
        "recipes": {f"{d}/{a}": recipe_for(a, d, **overrides).to_json()
                    for d in datasets for a in archs},
        "data": {d: data_keys[d] for d in datasets},
    })


def pool_key(spec: Mapping[str, Any]) -> str:
    """SHA-256 (64 hex digits) of a :func:`pool_spec` dict (canonical JSON)."""
    return hashlib.sha256(json.dumps(_jsonable(dict(spec)), sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


def spec_differences(recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """``"path: recorded -> requested"`` for every leaf where two build specs differ.

    Args:
      recorded: a pool's ``build_spec``.
      requested: the spec asked for.

    Returns:
      The differences, sorted by path (dotted keys).
    """
    def short(v):
        t = json.dumps(v, sort_keys=True)
        return t if len(t) <= 80 else t[:77] + "..."

    out = []

    def walk(a, b, path):
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path}: {short(a)} -> {short(b)}")

    walk(_jsonable(dict(recorded)), _jsonable(dict(requested)), "")
    return out


def check_pool_key(directory: str, spec: Mapping[str, Any], *, fix: str | None = None) -> dict:
    """Checks that the pool in ``directory`` was built from ``spec``; returns its manifest.

    Args:
      directory: a pool directory.
      spec: the requested :func:`pool_spec`.
      fix: how to resolve a mismatch, for the error message (default: rebuild or pick a
        matching pool).

    Returns:
      The manifest (:func:`~dfml_jax.teachers.store.read_manifest`).

    Raises:
      PoolKeyError: the pool records no build key (written before keys existed), a key that
        does not match its own recorded spec (an edited ``pool.json``) or another key; the
        message names both keys and every differing field.
      PoolError: as :func:`~dfml_jax.teachers.store.read_manifest`.
    """
    manifest = read_manifest(directory)
    want = pool_key(spec)
    got = manifest.get("build_key")
    recorded = manifest.get("build_spec")
    if got == want and recorded is not None and pool_key(recorded) == got:
        return manifest
    fix = fix or ("rebuild the pool with the requested settings (experiments/build_api_pool.py "
                  "or build_pool) or use a pool built with them")
    if got is None:
        raise PoolKeyError(f"Pool {os.path.abspath(directory)} records no build key (written "
                           f"before pools described themselves), so it cannot be checked against "
                           f"the requested build key {want[:12]}; {fix}.")
    if recorded is None or pool_key(recorded) != got:
        raise PoolKeyError(f"Pool {os.path.abspath(directory)}: its recorded build key {got[:12]} "
                           f"does not match its recorded build spec (pool.json was edited); {fix}.")
    diffs = spec_differences(recorded, spec)
    raise PoolKeyError(f"Pool {os.path.abspath(directory)} was built from other inputs (build key "
                       f"{got[:12]}) than requested (build key {want[:12]}); differing fields "
                       f"(pool -> requested): {'; '.join(diffs)}. Fix: {fix}.")


def split_fingerprint(split) -> str:
    """SHA-256 of a split's images (in [0, 1], float32), shape and class names."""
    h = hashlib.sha256()
    h.update(json.dumps([list(map(int, split.image_shape)), int(split.per_class),
                         [str(c) for c in split.class_names]]).encode())
    for c0 in range(0, split.num_classes, 64):
        block = np.asarray(split.images_of(list(range(c0, min(split.num_classes, c0 + 64)))),
                           np.float32)
        h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def custom_data_key(dataset: str, split) -> dict:
    """The build key's data entry of a split from a custom loader (a SHA-256 of its content)."""
    return {"dataset": dataset, "loader": "custom", "split_sha256": split_fingerprint(split)}
