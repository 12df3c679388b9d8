"""API pools: pre-trained black-box teachers for the SS / SH / MH scenarios.

A pool (``shared/specs/bidf_mkd.md`` section 1.1) is a set of teachers, each an N-way classifier
(N = 5 by default) on N classes drawn uniformly without replacement from the meta-train split of
its dataset, independently per teacher (so classes overlap across teachers). Each class's images
are split 80/20 in order: the first 80 % train the teacher, the last 20 % measure its held-out
accuracy. Scenarios:

* ``SS``: one dataset, one architecture (e.g. 100 Conv4 teachers);
* ``SH``: one dataset, several architectures (default Conv4, ResNet-10, ResNet-18);
* ``MH``: several datasets and architectures.

``num_apis`` teachers are trained for every (dataset, architecture) group, as in the official
code's ``--APInum`` (an SH pool with 3 architectures and ``num_apis=100`` holds 300 teachers).
Teachers of one group train together as a population, one jitted epoch for up to
``max_population`` of them (:func:`dfml_jax.train_teacher.train_population`; vectorised with
``vmap`` on accelerators, a compiled loop on CPU where that is faster). ``devices`` splits each
population's teacher axis over several devices (``shard_map`` on a ``"teachers"`` mesh; default:
all local devices, lowered per population to the largest count that divides it).

On disk (``directory/``)::

    pool.json                 format name + version, build key + spec, scenario, recipes, groups,
                              teachers
    checkpoints/<group>/      orbax checkpoint of the group's stacked parameters and BN statistics

``pool.json`` records per teacher: architecture, dataset, absolute classes (indices into the
dataset's meta-train split, in output order), class names, held-out and train accuracy, seed.
Per group it records the model configuration, normalisation statistics and a SHA-256 of the
stored arrays, which :func:`load_pool` verifies: a pool that is missing files, was written by an
incompatible version or holds corrupted arrays raises :class:`PoolError` and nothing is returned.

:func:`load_pool` returns an :class:`APIPool` of :class:`~dfml_jax.blackbox.BlackBoxAPI` objects
(output mode chosen at load time); algorithms never see parameters. White-box access for
baselines is the separate :func:`load_white_box_teachers`.

Pools describe themselves: :func:`build_pool` records in ``pool.json`` its ``build_spec``
(:func:`pool_spec`: scenario, datasets, architectures, teachers per group, way, seed, train
fraction, model and dataset options, every group's training recipe with its augmentation, the
content key of every dataset (:func:`dfml_jax.data.content_key`, which for Glyphs covers the
rendering and the font bytes), the pool format and trainer versions) and ``build_key``, its
SHA-256 (:func:`pool_key`). Whoever reuses a pool automatically compares keys
(:func:`check_pool_key`; :func:`obtain_pool` builds into ``<parent>/pool-<key>`` and reuses only
an equal key, as the BiDf-MKD experiment runner does): a pool built from other inputs is never
silently reused. Pools written
before keys existed record none; :func:`load_pool` still reads them, but their key is unknown.
How the teachers are split into populations, over devices and the strategy do not enter the key
(the weights do not depend on them beyond float reassociation).

Input convention of the APIs (``input_space``): ``"normalized"`` (default, as in BiDf-MKD: the
caller normalises with ``pool.mean``/``pool.std`` after augmentation and queries with the result)
or ``"raw"`` (the API takes [0, 1] images and normalises internally; needed for MH pools whose
datasets use different statistics).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dfml_jax import __version__ as _LIB_VERSION
from dfml_jax.blackbox import BlackBoxAPI
from dfml_jax.models import CLASSIFIERS, create_model, functional, stack_trees
from dfml_jax.models.preprocess import compute_stats, normalize, stats_for_dataset
from dfml_jax.train_teacher import TRAINER_VERSION, augment_pad_for, evaluate_population, \
    recipe_for, resolve_devices, train_population
from dfml_jax.data import content_key, get_class_splits

__all__ = [
    "POOL_FORMAT", "POOL_FORMAT_VERSION", "SCENARIOS", "DEFAULT_ARCHS", "PoolError", "APIPool",
    "WhiteBoxTeacher", "TrainedGroup", "build_pool", "train_group", "write_pool", "load_pool",
    "load_white_box_teachers", "read_manifest", "format_summary", "check_devices",
    "population_sizes", "pool_spec", "pool_key", "spec_differences", "check_pool_key",
    "PoolKeyError", "POOL_KEY_VERSION", "obtain_pool",
]

POOL_FORMAT = "dfml_jax.api_pool"
POOL_FORMAT_VERSION = 1
#: Version of the build key's layout (:func:`pool_spec`); part of the key.
POOL_KEY_VERSION = 1
SCENARIOS = ("SS", "SH", "MH")
#: Architectures of the SH/MH scenarios when none are given (spec section 1.1).
DEFAULT_ARCHS = ("conv4", "resnet10", "resnet18")
INPUT_SPACES = ("normalized", "raw")
_MANIFEST = "pool.json"
_CKPT_DIR = "checkpoints"


class PoolError(ValueError):
    """A pool directory is missing files, has an incompatible format or corrupted arrays."""


class PoolKeyError(PoolError):
    """A pool was built from other inputs than the ones asked for (or records no build key)."""


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
      apis: the :class:`~dfml_jax.blackbox.BlackBoxAPI` objects, in teacher order.
      records: per teacher, the JSON record of ``pool.json`` (architecture, dataset, classes,
        held-out accuracy, seed, ...).
      classes: per teacher, the absolute meta-train class of each output index.
      scenario: ``"SS"``, ``"SH"`` or ``"MH"``.
      input_space: ``"normalized"`` or ``"raw"`` (see the module docstring).
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
        """A copy with ``white_box_teachers`` attached (see :func:`load_white_box_teachers`)."""
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


# ----------------------------------------------------------------------------- building

def _default_split_loader(name: str, **kwargs):
    return get_class_splits(name, **kwargs)[0]


def _check_choices(kind: str, values: Sequence[str], valid: Sequence[str]) -> None:
    for v in values:
        if v not in valid:
            raise ValueError(f"Unknown {kind} {v!r}; valid: {', '.join(valid)}.")


def _validate_scenario(scenario: str, datasets: Sequence[str], archs: Sequence[str]) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"Unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)} (SS: same "
                         f"dataset and architecture, SH: same dataset, mixed architectures, MH: "
                         f"mixed datasets and architectures).")
    _check_choices("architecture", archs, CLASSIFIERS)
    if len(set(datasets)) != len(datasets) or len(set(archs)) != len(archs):
        raise ValueError(f"Datasets and architectures must not repeat: {datasets}, {archs}.")
    if not datasets or not archs:
        raise ValueError("Give at least one dataset and one architecture.")
    if scenario == "SS" and (len(datasets) != 1 or len(archs) != 1):
        raise ValueError(f"Scenario SS needs exactly one dataset and one architecture, got "
                         f"datasets={list(datasets)}, archs={list(archs)} (use SH or MH).")
    if scenario == "SH" and (len(datasets) != 1 or len(archs) < 2):
        raise ValueError(f"Scenario SH needs one dataset and at least two architectures, got "
                         f"datasets={list(datasets)}, archs={list(archs)}.")
    if scenario == "MH" and len(datasets) < 2:
        raise ValueError(f"Scenario MH needs at least two datasets, got {list(datasets)}.")


def _group_name(dataset: str, arch: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{dataset}-{arch}")


def _teacher_seed(seed: int, group: int, member: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(group), int(member)]).generate_state(1)[0])


class TrainedGroup(NamedTuple):
    """The teachers of one (dataset, architecture) group after training (white-box, in memory).

    Attributes:
      dataset, arch: names.
      model_config: ``create_model`` arguments (without name/key) of the architecture.
      mean, std: input normalisation of the dataset.
      recipe: the :class:`~dfml_jax.train_teacher.TrainRecipe` used (as a dict).
      params, state: stacked ``(P, ...)`` parameters and BN running statistics (final epoch).
      teachers: one JSON record per teacher (classes, accuracies, seed, ...), without ``index``.
      class_offset, dataset_num_classes: position of the dataset's classes in the pool's global
        class numbering (MH) and the size of its meta-train split.
    """
    dataset: str
    arch: str
    model_config: dict
    mean: tuple
    std: tuple
    recipe: dict
    params: Any
    state: Any
    teachers: list
    class_offset: int
    dataset_num_classes: int


def population_sizes(num_apis: int, max_population: int) -> list[int]:
    """Sizes of the populations ``num_apis`` teachers are trained in (chunks of at most
    ``max_population``), e.g. ``population_sizes(20, 8) == [8, 8, 4]``."""
    return [min(max_population, num_apis - c0) for c0 in range(0, num_apis, max_population)]


def check_devices(devices: int | Sequence[Any] | None, num_apis: int, max_population: int) -> None:
    """Raises ``ValueError`` unless ``devices`` can split every population of a group.

    Args:
      devices: ``None`` (all local devices, lowered per population: always valid), a device count
        or a sequence of devices.
      num_apis: teachers of the group.
      max_population: most teachers per population.

    Raises:
      ValueError: more devices than exist (listing them), or a count that does not divide a
        population's size (naming both and the valid counts).
    """
    if devices is None:
        return
    sizes = population_sizes(num_apis, max_population)
    n = len(resolve_devices(devices))
    bad = sorted({s for s in sizes if s % n})
    if bad:
        n_local = len(jax.local_devices())
        valid = [k for k in range(1, n_local + 1) if all(s % k == 0 for s in sizes)]
        raise ValueError(
            f"{n} devices do not divide the {bad[0]} teachers of a population (num_apis="
            f"{num_apis} in populations of {sizes} with max_population={max_population}; each "
            f"device trains an equal share). Valid device counts here (of {n_local} local "
            f"devices): {valid}; or change --max-population / --num-apis.")


def train_group(split, *, dataset: str, arch: str, num_apis: int, way: int = 5, seed: int = 0,
                group_index: int = 0, model_kwargs: Mapping[str, Any] | None = None,
                recipe=None, train_fraction: float = 0.8, max_population: int = 20,
                class_offset: int = 0, progress: bool = True,
                devices: int | Sequence[Any] | None = None,
                strategy: str | None = None) -> TrainedGroup:
    """Trains ``num_apis`` teachers of one architecture on one dataset (vmapped populations).

    Teacher ``m`` uses the seed ``SeedSequence([seed, group_index, m])``: it draws its ``way``
    classes (without replacement, in drawn order = output order), initialises its weights and
    shuffles its data from it, so the result does not depend on ``max_population`` or ``devices``.

    Args:
      split: the meta-train :class:`~dfml_jax.data.ClassDataset` (``images_of``, ``num_classes``,
        ``per_class``, ``image_shape``, ``class_names``).
      dataset, arch: names (``arch`` in :data:`dfml_jax.models.CLASSIFIERS`).
      num_apis: number of teachers.
      way: classes per teacher.
      seed, group_index: seed derivation (see above).
      model_kwargs: ``create_model`` options, e.g. ``{"width": 8}``.
      recipe: :class:`~dfml_jax.train_teacher.TrainRecipe` (default: the architecture's, with
        the dataset's domain-faithful augmentation, ``recipe_for(arch, dataset)``). A crop
        augmentation pads with black (``-mean / std`` after normalisation); the recorded recipe
        holds the resolved ``augment_pad``.
      train_fraction: first fraction of each class's images used for training; the rest is the
        held-out set.
      max_population: most teachers per vmapped population.
      class_offset: offset of this dataset's classes in the pool's global numbering.
      progress: tqdm bars.
      devices: split each population's teacher axis over devices: a count (the first N local
        devices) or a sequence of devices, which must divide every population's size; ``None``
        (default): all local devices, lowered per population to the largest count dividing it.
      strategy: population strategy (``"vmap"``/``"map"``; default ``"map"`` on CPU).

    Returns:
      :class:`TrainedGroup`.

    Raises:
      ValueError: unknown architecture, ``way`` larger than the split, no training images, a
        device count that does not divide a population (or exceeds the local devices).
    """
    _check_choices("architecture", [arch], CLASSIFIERS)
    check_devices(devices, num_apis, max_population)
    if way > split.num_classes:
        raise ValueError(f"way={way} classes per teacher, but the meta-train split of {dataset!r} "
                         f"has only {split.num_classes} classes; lower way (--way).")
    n_tr = int(math.floor(split.per_class * train_fraction + 1e-9))
    if n_tr < 1:
        raise ValueError(f"{dataset!r} has {split.per_class} images per class: train_fraction="
                         f"{train_fraction} leaves no training image.")
    n_ho = split.per_class - n_tr
    recipe = recipe or recipe_for(arch, dataset)
    shape = tuple(int(s) for s in split.image_shape)
    if recipe.augment != "none":
        recipe = dataclasses.replace(recipe, augment_pad=augment_pad_for(recipe, shape[0]))
    stats = stats_for_dataset(dataset, shape[-1])
    if stats is None:
        stats = compute_stats(split.images_of(list(range(min(split.num_classes, 64)))))
    mean, std = stats
    black = tuple(-float(m) / float(d) for m, d in zip(mean, std))  # 0 after normalisation
    cfg = dict(num_classes=way, input_shape=shape, **dict(model_kwargs or {}))
    fm = functional(create_model(arch, rngs_or_key=0, **cfg))
    seeds = [_teacher_seed(seed, group_index, m) for m in range(num_apis)]
    # output index j of teacher m <-> absolute class classes[m][j] (drawn order, not sorted)
    classes = [[int(c) for c in np.random.default_rng(s).choice(split.num_classes, way,
                                                                   replace=False)]
               for s in seeds]
    chunks_p, chunks_s, ho_acc, tr_acc, final_loss = [], [], [], [], []
    for c0 in range(0, num_apis, max_population):
        members = list(range(c0, min(num_apis, c0 + max_population)))
        xs, xh = [], []
        for m in members:
            imgs = np.asarray(split.images_of(classes[m]), np.float32)
            if imgs.shape != (way, split.per_class, *shape):
                raise ValueError(f"{dataset!r}.images_of returned {imgs.shape}, expected "
                                 f"{(way, split.per_class, *shape)}.")
            xs.append(imgs[:, :n_tr].reshape(-1, *shape))
            xh.append(imgs[:, n_tr:].reshape(-1, *shape))
        y = np.tile(np.repeat(np.arange(way), n_tr), (len(members), 1))
        yh = np.tile(np.repeat(np.arange(way), n_ho), (len(members), 1))
        x = normalize(jnp.asarray(np.stack(xs)), mean, std)
        xh = normalize(jnp.asarray(np.stack(xh)), mean, std)
        inits = [fm.init(jax.random.key(seeds[m])) for m in members]
        keys = jnp.stack([jax.random.fold_in(jax.random.key(seeds[m]), 1) for m in members])
        devs = resolve_devices(len(jax.local_devices()) if devices is None else devices,
                               len(members), strict=devices is not None)
        res = train_population(fm, stack_trees([p for p, _ in inits]),
                               stack_trees([st for _, st in inits]), x, y, keys, recipe,
                               progress=progress, devices=devs, strategy=strategy, fill=black,
                               desc=f"{dataset}/{arch} teachers {members[0]}-{members[-1]}")
        # gather a split population on one device (evaluation, storage and loading are unsharded)
        res = res._replace(params=jax.device_put(res.params, devs[0]),
                           state=jax.device_put(res.state, devs[0]))
        tr_acc += list(evaluate_population(fm, res.params, res.state, x, y))
        ho_acc += list(evaluate_population(fm, res.params, res.state, xh, yh))
        final_loss += (list(res.losses[-1]) if len(res.losses) else [float("nan")] * len(members))
        chunks_p.append(res.params)
        chunks_s.append(res.state)
    params = jax.tree.map(lambda *p: jnp.concatenate(p), *chunks_p)
    state = jax.tree.map(lambda *p: jnp.concatenate(p), *chunks_s)
    records = [{
        "name": f"{dataset}/{arch}/{m}", "member": m, "arch": arch, "dataset": dataset,
        "classes": classes[m], "class_names": [str(split.class_names[c]) for c in classes[m]],
        "global_classes": [c + int(class_offset) for c in classes[m]],
        "heldout_acc": _f(ho_acc[m]), "train_acc": _f(tr_acc[m]),
        "final_train_loss": _f(final_loss[m]), "seed": seeds[m], "num_train": n_tr * way,
        "num_heldout": n_ho * way, "input_shape": list(shape), "num_classes": way,
        "mean": list(mean), "std": list(std),
    } for m in range(num_apis)]
    model_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    return TrainedGroup(dataset, arch, model_config, tuple(mean), tuple(std), recipe.to_json(),
                        params, state, records, int(class_offset), int(split.num_classes))


def write_pool(directory: str, groups: Sequence[TrainedGroup], *, scenario: str,
               extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict:
    """Writes trained groups as a pool directory (atomically: temp directory, then rename).

    Args:
      directory: pool directory to create.
      groups: :class:`TrainedGroup` s; teacher indices follow their order.
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
    _validate_scenario(scenario, list(dict.fromkeys(g.dataset for g in groups)),
                       list(dict.fromkeys(g.arch for g in groups)))
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise ValueError(f"Pool directory {directory} exists; pass overwrite=True (--overwrite) or "
                         f"choose another directory.")
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
        with open(os.path.join(tmp, _MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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

    Takes the arguments of :func:`build_pool` that change the teachers; the population size,
    devices, strategy and progress bars do not.

    Args:
      scenario, datasets, archs, num_apis, way, epochs, seed, model_kwargs, recipe_overrides,
        dataset_kwargs, train_fraction: as :func:`build_pool`.
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
    archs = tuple(archs) if archs else (("conv4",) if scenario == "SS" else DEFAULT_ARCHS)
    datasets = tuple(datasets)
    _validate_scenario(scenario, datasets, archs)
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
      The manifest (:func:`read_manifest`).

    Raises:
      PoolKeyError: the pool records no build key (written before keys existed), a key that
        does not match its own recorded spec (an edited ``pool.json``) or another key; the
        message names both keys and every differing field.
      PoolError: as :func:`read_manifest`.
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


def obtain_pool(build: Mapping[str, Any], *, directory: str | None = None,
                parent: str | None = None, check_key: bool = True, fix: str | None = None,
                log: Callable[[str], None] | None = None) -> str:
    """A pool built from ``build``: reused if one with the same build key exists, else built.

    * ``directory`` given and holding a pool: its build key must equal the requested one
      (:func:`check_pool_key`; :class:`PoolKeyError` otherwise) unless ``check_key`` is False
      (then it is used as it is, and a log line says so);
    * ``directory`` given, no pool there: the pool is built into it;
    * no ``directory``: ``<parent>/pool-<first 12 hex digits of the build key>``, reused only when
      its recorded key equals the requested one, else (re)built. A ``<parent>/pool`` written by
      older code (no key) is never reused; a log line says so.

    Args:
      build: keyword arguments of :func:`build_pool` (without ``directory``).
      directory: an explicit pool directory, or ``None``.
      parent: where key-named pools live when ``directory`` is ``None``.
      check_key: check an existing explicit ``directory``'s key.
      fix: the remedy named by a key mismatch error (see :func:`check_pool_key`).
      log: receives one line per decision (default: ``print``).

    Returns:
      The pool directory.

    Raises:
      PoolKeyError: an explicit ``directory`` built from other inputs (or without a key).
      ValueError: neither ``directory`` nor ``parent``; as :func:`build_pool`.
    """
    log = log or (lambda line: print(line, flush=True))
    build = dict(build)
    if build.get("split_loader") is not None and build.get("data_keys") is None:
        dkw = dict(build.get("dataset_kwargs") or {})
        build["data_keys"] = {d: {"dataset": d, "loader": "custom", "split_sha256":
                                  _split_fingerprint(build["split_loader"](d, **dkw))}
                              for d in build["datasets"]}
    spec_args = {k: v for k, v in build.items() if k in (
        "scenario", "datasets", "archs", "num_apis", "way", "epochs", "seed", "model_kwargs",
        "recipe_overrides", "dataset_kwargs", "train_fraction", "data_keys")}
    spec = pool_spec(**spec_args)
    key = pool_key(spec)
    if directory is not None and os.path.isfile(os.path.join(directory, _MANIFEST)):
        if check_key:
            check_pool_key(directory, spec, fix=fix)
            log(f"[pool] reusing {directory} (build key {key[:12]} matches)")
        else:
            log(f"[pool] using {directory} without checking its build key (check disabled)")
        return directory
    if directory is None:
        if parent is None:
            raise ValueError("obtain_pool: give a pool directory or a parent directory.")
        directory = os.path.join(parent, f"pool-{key[:12]}")
        legacy = os.path.join(parent, "pool")
        if os.path.isfile(os.path.join(legacy, _MANIFEST)):
            log(f"[pool] {legacy} was written by older code (no build key): not reused")
    recorded = None
    if os.path.isfile(os.path.join(directory, _MANIFEST)):
        try:
            recorded = read_manifest(directory).get("build_key")
        except PoolError:
            recorded = None
    if recorded == key:
        log(f"[pool] reusing {directory} (build key {key[:12]} matches)")
        return directory
    augments = sorted({r["augment"] for r in spec["recipes"].values()})
    log(f"[pool] building {directory} (build key {key[:12]}: {spec['scenario']} "
        f"{'+'.join(spec['datasets'])} {'+'.join(spec['archs'])} x {spec['num_apis']}, "
        f"augment {'/'.join(augments)})")
    build_pool(directory, **{**build, "overwrite": True})
    return directory


def _split_fingerprint(split) -> str:
    """SHA-256 of a split's images (in [0, 1], float32), shape and class names."""
    h = hashlib.sha256()
    h.update(json.dumps([list(map(int, split.image_shape)), int(split.per_class),
                         [str(c) for c in split.class_names]]).encode())
    for c0 in range(0, split.num_classes, 64):
        block = np.asarray(split.images_of(list(range(c0, min(split.num_classes, c0 + 64)))),
                           np.float32)
        h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def build_pool(directory: str, *, scenario: str, datasets: Sequence[str],
               archs: Sequence[str] | None = None, num_apis: int = 100, way: int = 5,
               epochs: int | None = None, seed: int = 0,
               model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
               recipe_overrides: Mapping[str, Any] | None = None,
               dataset_kwargs: Mapping[str, Any] | None = None, train_fraction: float = 0.8,
               max_population: int = 20, split_loader: Callable[..., Any] | None = None,
               overwrite: bool = False, progress: bool = True,
               devices: int | Sequence[Any] | None = None, strategy: str | None = None,
               data_keys: Mapping[str, Any] | None = None) -> dict:
    """Trains a pool of teachers and writes it to ``directory`` (atomically).

    ``pool.json`` records the build spec and key (:func:`pool_spec`, :func:`pool_key`), so the
    pool can be checked against a request (:func:`check_pool_key`).

    Args:
      directory: pool directory to create.
      scenario: ``"SS"``, ``"SH"`` or ``"MH"``.
      datasets: dataset names (``dfml_jax.data.get_class_splits`` names), one for SS/SH.
      archs: classifier names; default ``("conv4",)`` for SS and :data:`DEFAULT_ARCHS` otherwise.
      num_apis: teachers per (dataset, architecture) group.
      way: classes per teacher.
      epochs: training epochs (default: the recipe's, 60).
      seed: master seed; teacher seeds are derived from (seed, group, member) and recorded.
      model_kwargs: per-architecture ``create_model`` options, e.g. ``{"conv4": {"width": 8}}``.
      recipe_overrides: :class:`~dfml_jax.train_teacher.TrainRecipe` fields applied to every
        architecture (e.g. ``{"batch_size": 32}``). ``augment`` not given (or ``None``): each
        dataset's domain-faithful augmentation (``"crop"`` for glyphs and digits, ``"crop_flip"``
        for natural images: :func:`~dfml_jax.train_teacher.default_augment`); ``"none"`` or
        ``"paper"``: the paper's recipe, no augmentation.
      dataset_kwargs: extra arguments of the split loader (e.g. ``image_size``, ``channels``),
        the same for every dataset.
      train_fraction: fraction of each class's images (first ones) used for training.
      max_population: most teachers trained in one vmapped population (memory bound).
      split_loader: ``(name, **dataset_kwargs) -> ClassDataset`` of the meta-train split; default
        ``dfml_jax.data.get_class_splits(name, **kw)[0]``.
      overwrite: replace an existing pool directory.
      progress: tqdm progress bars.
      devices: split each population's teacher axis over devices (``jax.shard_map``, see
        :func:`dfml_jax.train_teacher.train_population`): a count (the first N local devices) or
        a sequence of devices; it must divide every population's size (``max_population`` and
        the remainder of ``num_apis``). ``None`` (default): all local devices, lowered per
        population to the largest count dividing it. The trained weights do not depend on it
        (up to float reassociation).
      strategy: population strategy, ``"vmap"`` or ``"map"`` (default: ``"map"`` on CPU).
      data_keys: per dataset, the content key of its split for the build key; default: with the
        default loader :func:`dfml_jax.data.content_key`, with a custom ``split_loader`` a
        SHA-256 of the loaded split's images and class names.

    Returns:
      The manifest written to ``pool.json`` (a dict).

    Raises:
      ValueError: unknown scenario/architecture (valid ones listed), ``way`` larger than a split's
        number of classes, too few images per class, existing directory without ``overwrite``,
        a device count that does not divide a population's size or exceeds the local devices.
    """
    archs = tuple(archs) if archs else (("conv4",) if scenario == "SS" else DEFAULT_ARCHS)
    datasets = tuple(datasets)
    _validate_scenario(scenario, datasets, archs)
    if num_apis < 1:
        raise ValueError(f"num_apis must be >= 1, got {num_apis}.")
    if way < 2:
        raise ValueError(f"way must be >= 2, got {way}.")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}.")
    if max_population < 1:
        raise ValueError(f"max_population must be >= 1, got {max_population}.")
    check_devices(devices, num_apis, max_population)
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise ValueError(f"Pool directory {directory} exists; pass overwrite=True (--overwrite) or "
                         f"choose another directory.")
    model_kwargs = {k: dict(v) for k, v in (model_kwargs or {}).items()}
    _check_choices("architecture in model_kwargs", list(model_kwargs), CLASSIFIERS)
    recipe_overrides = dict(recipe_overrides or {})
    if epochs is not None:
        recipe_overrides["epochs"] = int(epochs)
    recipes = {(d, a): recipe_for(a, d, **recipe_overrides) for d in datasets for a in archs}
    dataset_kwargs = dict(dataset_kwargs or {})
    loader = split_loader or _default_split_loader

    splits, offsets, offset = {}, {}, 0
    for d in datasets:  # load and check every split before training anything
        split = loader(d, **dataset_kwargs)
        if way > split.num_classes:
            raise ValueError(f"way={way} classes per teacher, but the meta-train split of {d!r} "
                             f"has only {split.num_classes} classes; lower way (--way).")
        if math.floor(split.per_class * train_fraction + 1e-9) < 1:
            raise ValueError(f"{d!r} has {split.per_class} images per class: train_fraction="
                             f"{train_fraction} leaves no training image.")
        splits[d], offsets[d] = split, offset
        offset += split.num_classes
    if data_keys is None and split_loader is not None:
        data_keys = {d: {"dataset": d, "loader": "custom", "split_sha256": _split_fingerprint(s)}
                     for d, s in splits.items()}
    spec = pool_spec(scenario=scenario, datasets=datasets, archs=archs, num_apis=num_apis, way=way,
                     seed=seed, model_kwargs=model_kwargs, recipe_overrides=recipe_overrides,
                     dataset_kwargs=dataset_kwargs, train_fraction=train_fraction,
                     data_keys=data_keys)

    pairs = [(d, a) for d in datasets for a in archs]
    groups = []
    bar = tqdm(pairs, desc="API pool", disable=not progress)
    for gi, (d, a) in enumerate(bar):
        bar.set_postfix(group=f"{d}/{a}")
        groups.append(train_group(
            splits[d], dataset=d, arch=a, num_apis=num_apis, way=way, seed=seed, group_index=gi,
            model_kwargs=model_kwargs.get(a), recipe=recipes[d, a], train_fraction=train_fraction,
            max_population=max_population, class_offset=offsets[d], progress=progress,
            devices=devices, strategy=strategy))
    extra = {"build_key": pool_key(spec), "build_spec": spec, "num_apis_per_group": num_apis,
             "way": way, "seed": seed, "train_fraction": train_fraction,
             "dataset_kwargs": dataset_kwargs}
    return write_pool(directory, groups, scenario=scenario, extra=extra, overwrite=overwrite)


def _list_files(root: str) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file below ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
    return dict(sorted(out.items()))


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


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
    path = os.path.join(os.path.abspath(directory), _MANIFEST)
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
      directory: pool directory written by :func:`build_pool`.
      output: what the APIs reveal: ``"logits"``, ``"probs"``, ``"label"`` or ``"topk"``.
      k: classes revealed with ``output="topk"``.
      budget: per-API query budget in samples (``None``: unlimited).
      decimals: round revealed scores, as real APIs do.
      input_space: ``"normalized"`` (callers normalise with ``pool.mean``/``pool.std``) or
        ``"raw"`` (APIs take [0, 1] images).
      conv_impl: convolution back-end of the teachers' forward pass. ``"lax"`` (default) is ~5x
        faster than im2col for the forward-only, single-model evaluations an API performs on CPU
        (``experiments/bench_conv.py``, case ``api_forward``); ``None`` keeps the process default.

    Returns:
      :class:`APIPool`. The APIs of one (dataset, architecture) group share one ``apply_fn``, so
      :class:`~dfml_jax.blackbox.APIGroup` can answer them from one compiled graph.

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
      One :class:`WhiteBoxTeacher` ``(apply, params)`` per teacher, in pool order; teachers of a
      group share ``apply``. Records are in ``read_manifest(directory)["teachers"]``.

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


# ----------------------------------------------------------------------------- reporting

def format_summary(manifest: Mapping[str, Any]) -> str:
    """A plain-text table of the teachers (held-out accuracy) and per-group statistics.

    Args:
      manifest: the dict returned by :func:`build_pool` / :func:`read_manifest` (only
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
