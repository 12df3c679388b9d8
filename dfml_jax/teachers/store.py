"""API-pool storage: the on-disk format, writing and (all-or-nothing) loading.

On disk (``directory/``)::

    pool.json                 format name + version, build key + spec, scenario, recipes, groups,
                              teachers
    checkpoints/<group>/      orbax checkpoint of the group's stacked parameters and BN statistics

``pool.json`` records per teacher: architecture, dataset, absolute classes (indices into the
dataset's meta-train split, in output order), class names, held-out and train accuracy, seed.
Per group it records the model configuration, normalisation statistics and a SHA-256 of the
stored arrays, which :func:`load_pool` verifies: a pool that is missing files, was written by an
incompatible version or holds corrupted arrays raises :class:`~dfml_jax.api.pool.PoolError`
and nothing is returned.

:func:`load_pool` returns an :class:`~dfml_jax.api.pool.APIPool` of
:class:`~dfml_jax.api.BlackBoxAPI` objects (output mode chosen at load time); algorithms
never see parameters. White-box access for baselines is the separate
:func:`load_white_box_teachers`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax import __version__ as _LIB_VERSION
from dfml_jax.api.blackbox import BlackBoxAPI
from dfml_jax.api.pool import INPUT_SPACES, APIPool, PoolError, WhiteBoxTeacher
from dfml_jax.models import create_model, functional
from dfml_jax.models.preprocess import normalize
from dfml_jax.teachers.types import TrainedGroup, validate_scenario

__all__ = [
    "POOL_FORMAT", "POOL_FORMAT_VERSION", "MANIFEST", "write_pool", "read_manifest", "load_pool",
    "load_white_box_teachers", "check_new_directory",
]

POOL_FORMAT = "dfml_jax.api_pool"
POOL_FORMAT_VERSION = 1
#: File name of a pool's manifest inside its directory.
MANIFEST = "pool.json"
_CKPT_DIR = "checkpoints"


# ----------------------------------------------------------------------------- array trees

def _path_str(path) -> list[str]:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value":
                continue
            out.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        else:
            out.append(str(k))
    return out


def _to_nested(tree) -> dict:
    """An nnx.State (or any pytree) as a nested dict with string keys (orbax-friendly)."""
    nested: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = _path_str(path)
        d = nested
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = leaf
    return nested


def _from_nested(template, nested: dict, what: str):
    """Fills ``template``'s leaves (in flatten order) from a nested string-key dict."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, ref in flat:
        d = nested
        keys = _path_str(path)
        for k in keys:
            if not isinstance(d, Mapping) or k not in d:
                raise PoolError(f"{what}: stored arrays lack '{'/'.join(keys)}' (the checkpoint "
                                f"does not match the architecture recorded in pool.json).")
            d = d[k]
        if tuple(d.shape) != tuple(ref.shape):
            raise PoolError(f"{what}: array '{'/'.join(keys)}' has shape {tuple(d.shape)}, the "
                            f"architecture needs {tuple(ref.shape)}.")
        leaves.append(jnp.asarray(d, ref.dtype))
    n_stored = len(jax.tree.leaves(nested))
    if n_stored != len(leaves):
        raise PoolError(f"{what}: checkpoint holds {n_stored} arrays, the architecture has "
                        f"{len(leaves)}.")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _digest(tree) -> str:
    """SHA-256 over the paths, shapes, dtypes and bytes of a pytree's arrays."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update("/".join(_path_str(path)).encode())
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing

def _group_name(dataset: str, arch: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{dataset}-{arch}")


def _list_files(root: str) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file below ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
    return dict(sorted(out.items()))


def check_new_directory(directory: str, overwrite: bool) -> str:
    """``directory`` made absolute; ``ValueError`` if it exists and ``overwrite`` is False."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise ValueError(f"Pool directory {directory} exists; pass overwrite=True (--overwrite) or "
                         f"choose another directory.")
    return directory


def write_pool(directory: str, groups: Sequence[TrainedGroup], *, scenario: str,
               extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict:
    """Writes trained groups as a pool directory (atomically: temp directory, then rename).

    Args:
      directory: pool directory to create.
      groups: :class:`~dfml_jax.teachers.types.TrainedGroup` s; teacher indices follow their order.
      scenario: ``"SS"``, ``"SH"`` or ``"MH"`` (recorded; checked against the groups).
      extra: additional JSON fields for ``pool.json`` (e.g. the build arguments).
      overwrite: replace an existing directory.

    Returns:
      The manifest written to ``pool.json``.

    Raises:
      ValueError: existing directory without ``overwrite``, scenario inconsistent with groups.
    """
    import orbax.checkpoint as ocp

    if not groups:
        raise ValueError("write_pool: no groups to write.")
    validate_scenario(scenario, list(dict.fromkeys(g.dataset for g in groups)),
                       list(dict.fromkeys(g.arch for g in groups)))
    directory = check_new_directory(directory, overwrite)
    tmp = f"{directory}.tmp-{os.getpid()}-{time.time_ns()}"
    os.makedirs(os.path.join(tmp, _CKPT_DIR))
    try:
        checkpointer = ocp.StandardCheckpointer()
        teachers, entries, names = [], [], set()
        for g in groups:
            name = _group_name(g.dataset, g.arch)
            if name in names:
                raise ValueError(f"write_pool: two groups for {g.dataset}/{g.arch}.")
            names.add(name)
            tree = {"params": _to_nested(g.params), "state": _to_nested(g.state)}
            rel = f"{_CKPT_DIR}/{name}"
            checkpointer.save(os.path.join(tmp, rel), tree)
            checkpointer.wait_until_finished()
            first = len(teachers)
            for rec in g.teachers:
                teachers.append({"index": len(teachers), "group": name, **rec})
            entries.append({
                "name": name, "dataset": g.dataset, "arch": g.arch, "checkpoint": rel,
                "files": _list_files(os.path.join(tmp, rel)),
                "model_config": g.model_config, "members": list(range(first, len(teachers))),
                "sha256": _digest(tree), "recipe": g.recipe, "mean": list(g.mean),
                "std": list(g.std), "class_offset": g.class_offset,
                "dataset_num_classes": g.dataset_num_classes,
            })
        manifest = {
            "format": POOL_FORMAT, "format_version": POOL_FORMAT_VERSION,
            "library_version": _LIB_VERSION, "created_unix": time.time(), "scenario": scenario,
            "datasets": list(dict.fromkeys(g.dataset for g in groups)),
            "archs": list(dict.fromkeys(g.arch for g in groups)),
            **dict(extra or {}), "groups": entries, "teachers": teachers,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest





# ----------------------------------------------------------------------------- loading

def read_manifest(directory: str) -> dict:
    """Reads and validates ``pool.json`` (format name, version, required fields).

    Args:
      directory: pool directory.

    Returns:
      The manifest dict.

    Raises:
      PoolError: missing/unreadable ``pool.json``, another format or version, missing fields.
    """
    path = os.path.join(os.path.abspath(directory), MANIFEST)
    if not os.path.isdir(directory):
        raise PoolError(f"Pool directory {directory} does not exist; build one with "
                        f"experiments/build_api_pool.py.")
    if not os.path.isfile(path):
        raise PoolError(f"{path} is missing: {directory} is not a complete API pool (rebuild it "
                        f"with experiments/build_api_pool.py).")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PoolError(f"{path} is unreadable or not valid JSON ({e}); rebuild the pool.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != POOL_FORMAT:
        raise PoolError(f"{path} is not a dfml_jax API pool manifest (format "
                        f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {POOL_FORMAT!r}).")
    version = manifest.get("format_version")
    if version != POOL_FORMAT_VERSION:
        raise PoolError(f"{path} was written by an incompatible version (format_version {version!r}"
                        f", library {manifest.get('library_version')!r}); this library reads "
                        f"format_version {POOL_FORMAT_VERSION}. Rebuild the pool with "
                        f"experiments/build_api_pool.py.")
    for key in ("scenario", "groups", "teachers"):
        if key not in manifest:
            raise PoolError(f"{path} lacks the field {key!r}; rebuild the pool.")
    for g in manifest["groups"]:
        for key in ("name", "arch", "checkpoint", "model_config", "members", "sha256"):
            if key not in g:
                raise PoolError(f"{path}: group {g.get('name')!r} lacks the field {key!r}.")
    n = len(manifest["teachers"])
    covered = sorted(i for g in manifest["groups"] for i in g["members"])
    if covered != list(range(n)):
        raise PoolError(f"{path}: the groups do not cover teachers 0..{n - 1} exactly once.")
    return manifest


def _restore_groups(directory: str, manifest: dict, conv_impl: str | None):
    """Restores and verifies every group; returns ``[(group, fm, params, state)]`` or raises."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    checkpointer = ocp.StandardCheckpointer()
    out = []
    for g in manifest["groups"]:
        path = os.path.join(directory, g["checkpoint"])
        what = f"pool {directory}, group {g['name']!r} ({path})"
        if not os.path.isdir(path):
            raise PoolError(f"{what}: checkpoint directory is missing; the pool is incomplete "
                            f"(rebuild it).")
        expected = g.get("files") or {}
        missing = [f for f in expected if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise PoolError(f"{what}: missing checkpoint file(s) {missing}; the pool is incomplete "
                            f"(rebuild it).")
        resized = [f for f, n in expected.items() if os.path.getsize(os.path.join(path, f)) != n]
        if resized:
            raise PoolError(f"{what}: checkpoint file(s) {resized} changed size since the pool was "
                            f"written (truncated or corrupted); rebuild the pool.")
        cfg = dict(g["model_config"])
        if conv_impl is not None and g["arch"] != "mlp":
            cfg["conv_impl"] = conv_impl
        try:
            fm = functional(create_model(g["arch"], rngs_or_key=0, **cfg))
        except (TypeError, ValueError) as e:
            raise PoolError(f"{what}: cannot rebuild architecture {g['arch']!r} with "
                            f"{g['model_config']} ({e}).") from e
        P = len(g["members"])
        template = {
            "params": jax.tree.map(lambda a: jax.ShapeDtypeStruct((P, *a.shape), a.dtype), fm.params),
            "state": jax.tree.map(lambda a: jax.ShapeDtypeStruct((P, *a.shape), a.dtype), fm.state),
        }
        try:
            restored = checkpointer.restore(path)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise PoolError(f"{what}: checkpoint cannot be read ({type(e).__name__}: {e}); the "
                            f"pool is corrupted or incomplete (rebuild it).") from e
        if not isinstance(restored, Mapping) or set(restored) != {"params", "state"}:
            raise PoolError(f"{what}: checkpoint does not hold 'params' and 'state'.")
        params = _from_nested(template["params"], restored["params"] or {}, what)
        state = _from_nested(template["state"], restored.get("state") or {}, what)
        digest = _digest({"params": _to_nested(params), "state": _to_nested(state)})
        if digest != g["sha256"]:
            raise PoolError(f"{what}: arrays do not match the SHA-256 recorded in pool.json (the "
                            f"checkpoint is corrupted); rebuild the pool.")
        out.append((g, fm, params, state))
    return out


def _make_apply(fm, mean, std, input_space: str):
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)

    def teacher_apply(bundle, x):
        if input_space == "raw":
            x = normalize(x, mean, std)
        return fm.apply(bundle["params"], bundle["state"], x, train=False)[0]

    return teacher_apply


def _check_load_args(input_space: str):
    if input_space not in INPUT_SPACES:
        raise ValueError(f"Unknown input_space {input_space!r}; valid: {', '.join(INPUT_SPACES)}.")


def load_pool(directory: str, *, output: str = "logits", k: int | None = None,
              budget: int | None = None, decimals: int | None = None,
              input_space: str = "normalized", conv_impl: str | None = "lax") -> APIPool:
    """Loads a pool as black-box APIs (all-or-nothing: any problem raises, nothing half-loaded).

    Args:
      directory: pool directory written by :func:`~dfml_jax.teachers.build.build_pool`.
      output: what the APIs reveal: ``"logits"``, ``"probs"``, ``"label"`` or ``"topk"``.
      k: classes revealed with ``output="topk"``.
      budget: per-API query budget in samples (``None``: unlimited).
      decimals: round revealed scores, as real APIs do.
      input_space: ``"normalized"`` (callers normalise with ``pool.mean``/``pool.std``) or
        ``"raw"`` (APIs take [0, 1] images).
      conv_impl: convolution back-end of the teachers' forward pass. ``"lax"`` (default) is ~5x
        faster than im2col for the forward-only, single-model evaluations an API performs on CPU
        (``experiments/bench/bench_conv.py``, case ``api_forward``); ``None`` keeps the process
        default.

    Returns:
      :class:`~dfml_jax.api.pool.APIPool`. The APIs of one (dataset, architecture) group share
      one ``apply_fn``, so :class:`~dfml_jax.api.APIGroup` can answer them from one compiled
      graph.

    Raises:
      PoolError: missing files, incompatible version, corrupted checkpoint.
      ValueError: invalid output mode / input space.
    """
    _check_load_args(input_space)
    manifest = read_manifest(directory)
    restored = _restore_groups(directory, manifest, conv_impl)
    records = manifest["teachers"]
    apis: list = [None] * len(records)
    for g, fm, params, state in restored:
        apply_fn = _make_apply(fm, g["mean"], g["std"], input_space)
        for j, t in enumerate(g["members"]):
            rec = records[t]
            bundle = {"params": jax.tree.map(lambda a: a[j], params),
                      "state": jax.tree.map(lambda a: a[j], state)}
            apis[t] = BlackBoxAPI.from_jax(apply_fn, tuple(rec["input_shape"]), rec["num_classes"],
                                           output=output, k=k, budget=budget, decimals=decimals,
                                           name=rec["name"], params=bundle)
    return APIPool(apis=tuple(apis), records=tuple(records),
                   classes=tuple(tuple(r["classes"]) for r in records),
                   scenario=manifest["scenario"], input_space=input_space,
                   directory=os.path.abspath(directory))


def load_white_box_teachers(directory: str, *, input_space: str = "normalized",
                            conv_impl: str | None = None) -> list[WhiteBoxTeacher]:
    """WHITE-BOX access to a pool's teachers, for baselines that need parameters or gradients.

    Black-box algorithms must use :func:`load_pool`. Typical uses: averaging the weights of
    same-architecture teachers, white-box inversion upper bounds.

    Args:
      directory: pool directory.
      input_space: as in :func:`load_pool`.
      conv_impl: convolution back-end (``None``: process default, im2col, which is faster for
        gradients through vmapped models).

    Returns:
      One :class:`~dfml_jax.api.pool.WhiteBoxTeacher` ``(apply, params)`` per teacher, in pool
      order; teachers of a group share ``apply``. Records are in
      ``read_manifest(directory)["teachers"]``.

    Raises:
      PoolError: as :func:`load_pool`.
    """
    _check_load_args(input_space)
    manifest = read_manifest(directory)
    restored = _restore_groups(directory, manifest, conv_impl)
    out: list = [None] * len(manifest["teachers"])
    for g, fm, params, state in restored:
        apply_fn = _make_apply(fm, g["mean"], g["std"], input_space)
        for j, t in enumerate(g["members"]):
            out[t] = WhiteBoxTeacher(apply_fn, {"params": jax.tree.map(lambda a: a[j], params),
                                                "state": jax.tree.map(lambda a: a[j], state)})
    return out
