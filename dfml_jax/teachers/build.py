"""API-pool building: training the teachers of the SS / SH / MH scenarios and writing the pool.

A pool (``shared/specs/bidf_mkd.md`` section 1.1) is a set of teachers, each an N-way classifier
(N = 5 by default) on N classes drawn uniformly without replacement from the meta-train split of
its dataset, independently per teacher (so classes overlap across teachers). Each class's images
are split 80/20 in order: the first 80 % train the teacher, the last 20 % measure its held-out
accuracy. ``num_apis`` teachers are trained for every (dataset, architecture) group
(:func:`train_group`); teachers of one group train together as a population, one jitted epoch
for up to ``max_population`` of them (:func:`dfml_jax.teachers.population.train_population`), and
``devices`` splits each population's teacher axis over several devices.

:func:`build_pool` trains every group and writes the pool with its build key
(:mod:`dfml_jax.teachers.store`, :mod:`dfml_jax.teachers.keys`); :func:`obtain_pool` reuses a
pool with the requested build key or builds one.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dfml_jax.api.pool import PoolError
from dfml_jax.data import get_class_splits
from dfml_jax.models import CLASSIFIERS, create_model, functional, stack_trees
from dfml_jax.models.preprocess import compute_stats, normalize, stats_for_dataset
from dfml_jax.teachers.keys import check_pool_key, custom_data_key, pool_key, pool_spec
from dfml_jax.teachers.population import (augment_pad_for, evaluate_population, recipe_for,
                                          resolve_devices, train_population)
from dfml_jax.teachers.store import MANIFEST, check_new_directory, read_manifest, write_pool
from dfml_jax.teachers.types import TrainedGroup, check_choices, resolve_archs, validate_scenario

__all__ = ["build_pool", "train_group", "obtain_pool", "check_devices", "population_sizes"]


def _default_split_loader(name: str, **kwargs):
    return get_class_splits(name, **kwargs)[0]


def _teacher_seed(seed: int, group: int, member: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(group), int(member)]).generate_state(1)[0])


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


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


# ----------------------------------------------------------------------------- one group

def _check_split(split, dataset: str, way: int, train_fraction: float) -> int:
    """Training images per class of ``split``; ``ValueError`` if ``way`` classes or
    ``train_fraction`` do not fit it."""
    if way > split.num_classes:
        raise ValueError(f"way={way} classes per teacher, but the meta-train split of {dataset!r} "
                         f"has only {split.num_classes} classes; lower way (--way).")
    n_tr = int(math.floor(split.per_class * train_fraction + 1e-9))
    if n_tr < 1:
        raise ValueError(f"{dataset!r} has {split.per_class} images per class: train_fraction="
                         f"{train_fraction} leaves no training image.")
    return n_tr


class _Group(NamedTuple):
    """What the populations of one group share (see :func:`train_group`)."""
    split: Any
    dataset: str
    arch: str
    way: int
    n_tr: int  # training images per class (the rest are held out)
    shape: tuple
    mean: Any
    std: Any
    recipe: Any
    cfg: dict  # create_model arguments
    fm: Any
    seeds: list  # per teacher
    classes: list  # per teacher: output index j <-> absolute class classes[m][j]


def _prepare_group(split, *, dataset: str, arch: str, num_apis: int, way: int, seed: int,
                   group_index: int, model_kwargs, recipe, train_fraction: float) -> _Group:
    """Checks the split, resolves the recipe and normalisation, draws seeds and classes."""
    n_tr = _check_split(split, dataset, way, train_fraction)
    recipe = recipe or recipe_for(arch, dataset)
    shape = tuple(int(s) for s in split.image_shape)
    if recipe.augment != "none":
        recipe = dataclasses.replace(recipe, augment_pad=augment_pad_for(recipe, shape[0]))
    stats = stats_for_dataset(dataset, shape[-1])
    if stats is None:
        stats = compute_stats(split.images_of(list(range(min(split.num_classes, 64)))))
    mean, std = stats
    cfg = dict(num_classes=way, input_shape=shape, **dict(model_kwargs or {}))
    fm = functional(create_model(arch, rngs_or_key=0, **cfg))
    seeds = [_teacher_seed(seed, group_index, m) for m in range(num_apis)]
    # output index j of teacher m <-> absolute class classes[m][j] (drawn order, not sorted)
    classes = [[int(c) for c in np.random.default_rng(s).choice(split.num_classes, way,
                                                                   replace=False)]
               for s in seeds]
    return _Group(split, dataset, arch, way, n_tr, shape, mean, std, recipe, cfg, fm, seeds,
                  classes)


def _population_data(g: _Group, members: Sequence[int]):
    """Normalised training and held-out images and labels ``(x, y, xh, yh)`` of ``members``."""
    split, shape, way, n_tr = g.split, g.shape, g.way, g.n_tr
    xs, xh = [], []
    for m in members:
        imgs = np.asarray(split.images_of(g.classes[m]), np.float32)
        if imgs.shape != (way, split.per_class, *shape):
            raise ValueError(f"{g.dataset!r}.images_of returned {imgs.shape}, expected "
                             f"{(way, split.per_class, *shape)}.")
        xs.append(imgs[:, :n_tr].reshape(-1, *shape))
        xh.append(imgs[:, n_tr:].reshape(-1, *shape))
    y = np.tile(np.repeat(np.arange(way), n_tr), (len(members), 1))
    yh = np.tile(np.repeat(np.arange(way), split.per_class - n_tr), (len(members), 1))
    x = normalize(jnp.asarray(np.stack(xs)), g.mean, g.std)
    xh = normalize(jnp.asarray(np.stack(xh)), g.mean, g.std)
    return x, y, xh, yh


def _train_members(g: _Group, members: Sequence[int], *, progress: bool, devices,
                   strategy: str | None):
    """Trains one population; returns ``(params, state, train_acc, heldout_acc, final_loss)``."""
    x, y, xh, yh = _population_data(g, members)
    black = tuple(-float(m) / float(d) for m, d in zip(g.mean, g.std))  # 0 after normalisation
    inits = [g.fm.init(jax.random.key(g.seeds[m])) for m in members]
    keys = jnp.stack([jax.random.fold_in(jax.random.key(g.seeds[m]), 1) for m in members])
    devs = resolve_devices(len(jax.local_devices()) if devices is None else devices,
                           len(members), strict=devices is not None)
    res = train_population(g.fm, stack_trees([p for p, _ in inits]),
                           stack_trees([st for _, st in inits]), x, y, keys, g.recipe,
                           progress=progress, devices=devs, strategy=strategy, fill=black,
                           desc=f"{g.dataset}/{g.arch} teachers {members[0]}-{members[-1]}")
    # gather a split population on one device (evaluation, storage and loading are unsharded)
    params = jax.device_put(res.params, devs[0])
    state = jax.device_put(res.state, devs[0])
    tr_acc = list(evaluate_population(g.fm, params, state, x, y))
    ho_acc = list(evaluate_population(g.fm, params, state, xh, yh))
    loss = list(res.losses[-1]) if len(res.losses) else [float("nan")] * len(members)
    return params, state, tr_acc, ho_acc, loss


def _teacher_records(g: _Group, class_offset: int, ho_acc, tr_acc, final_loss) -> list:
    """The JSON record of every teacher of the group (``pool.json``, without ``index``)."""
    split, n_tr, n_ho, way = g.split, g.n_tr, g.split.per_class - g.n_tr, g.way
    dataset, arch, classes = g.dataset, g.arch, g.classes
    return [{
        "name": f"{dataset}/{arch}/{m}", "member": m, "arch": arch, "dataset": dataset,
        "classes": classes[m], "class_names": [str(split.class_names[c]) for c in classes[m]],
        "global_classes": [c + int(class_offset) for c in classes[m]],
        "heldout_acc": _f(ho_acc[m]), "train_acc": _f(tr_acc[m]),
        "final_train_loss": _f(final_loss[m]), "seed": g.seeds[m], "num_train": n_tr * way,
        "num_heldout": n_ho * way, "input_shape": list(g.shape), "num_classes": way,
        "mean": list(g.mean), "std": list(g.std),
    } for m in range(len(g.seeds))]


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
      recipe: :class:`~dfml_jax.teachers.population.TrainRecipe` (default: the architecture's, with
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
      :class:`~dfml_jax.teachers.types.TrainedGroup`.

    Raises:
      ValueError: unknown architecture, ``way`` larger than the split, no training images, a
        device count that does not divide a population (or exceeds the local devices).
    """
    check_choices("architecture", [arch], CLASSIFIERS)
    check_devices(devices, num_apis, max_population)
    g = _prepare_group(split, dataset=dataset, arch=arch, num_apis=num_apis, way=way, seed=seed,
                       group_index=group_index, model_kwargs=model_kwargs, recipe=recipe,
                       train_fraction=train_fraction)
    chunks_p, chunks_s, ho_acc, tr_acc, final_loss = [], [], [], [], []
    for c0 in range(0, num_apis, max_population):
        members = list(range(c0, min(num_apis, c0 + max_population)))
        p, st, tr, ho, loss = _train_members(g, members, progress=progress, devices=devices,
                                             strategy=strategy)
        tr_acc, ho_acc, final_loss = tr_acc + tr, ho_acc + ho, final_loss + loss
        chunks_p.append(p)
        chunks_s.append(st)
    params = jax.tree.map(lambda *p: jnp.concatenate(p), *chunks_p)
    state = jax.tree.map(lambda *p: jnp.concatenate(p), *chunks_s)
    records = _teacher_records(g, class_offset, ho_acc, tr_acc, final_loss)
    model_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.cfg.items()}
    return TrainedGroup(dataset, arch, model_config, tuple(g.mean), tuple(g.std),
                        g.recipe.to_json(), params, state, records, int(class_offset),
                        int(split.num_classes))


# ----------------------------------------------------------------------------- a pool

def _check_build_args(scenario: str, datasets, archs, *, num_apis: int, way: int,
                      train_fraction: float, max_population: int, devices) -> None:
    """Raises ``ValueError`` for arguments of :func:`build_pool` that cannot build a pool."""
    validate_scenario(scenario, datasets, archs)
    if num_apis < 1:
        raise ValueError(f"num_apis must be >= 1, got {num_apis}.")
    if way < 2:
        raise ValueError(f"way must be >= 2, got {way}.")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}.")
    if max_population < 1:
        raise ValueError(f"max_population must be >= 1, got {max_population}.")
    check_devices(devices, num_apis, max_population)


def _resolve_options(datasets, archs, model_kwargs, recipe_overrides, dataset_kwargs, epochs):
    """``(model_kwargs, recipe_overrides, dataset_kwargs, recipes)``: checked copies of the
    options and each group's recipe."""
    model_kwargs = {k: dict(v) for k, v in (model_kwargs or {}).items()}
    check_choices("architecture in model_kwargs", list(model_kwargs), CLASSIFIERS)
    recipe_overrides = dict(recipe_overrides or {})
    if epochs is not None:
        recipe_overrides["epochs"] = int(epochs)
    recipes = {(d, a): recipe_for(a, d, **recipe_overrides) for d in datasets for a in archs}
    return model_kwargs, recipe_overrides, dict(dataset_kwargs or {}), recipes


def _load_splits(datasets, split_loader, dataset_kwargs, way: int, train_fraction: float,
                 data_keys):
    """Loads and checks every split before training anything.

    Returns ``(splits, offsets, data_keys)``: ``offsets`` place each dataset's classes in the
    pool's global class numbering; ``data_keys`` is the one given, or with a custom
    ``split_loader`` and none given, each split's :func:`~dfml_jax.teachers.keys.custom_data_key`.
    """
    loader = split_loader or _default_split_loader
    splits, offsets, offset = {}, {}, 0
    for d in datasets:
        split = loader(d, **dataset_kwargs)
        _check_split(split, d, way, train_fraction)
        splits[d], offsets[d] = split, offset
        offset += split.num_classes
    if data_keys is None and split_loader is not None:
        data_keys = {d: custom_data_key(d, s) for d, s in splits.items()}
    return splits, offsets, data_keys


def _train_groups(splits, offsets, archs, recipes, *, model_kwargs, progress: bool,
                  **group_kwargs) -> list:
    """Trains every (dataset, architecture) group, datasets outer; group index = position."""
    pairs = [(d, a) for d in splits for a in archs]
    groups = []
    bar = tqdm(pairs, desc="API pool", disable=not progress)
    for gi, (d, a) in enumerate(bar):
        bar.set_postfix(group=f"{d}/{a}")
        groups.append(train_group(
            splits[d], dataset=d, arch=a, group_index=gi, model_kwargs=model_kwargs.get(a),
            recipe=recipes[d, a], class_offset=offsets[d], progress=progress, **group_kwargs))
    return groups


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

    ``pool.json`` records the build spec and key (:func:`~dfml_jax.teachers.keys.pool_spec`,
    :func:`~dfml_jax.teachers.keys.pool_key`), so the pool can be checked against a request
    (:func:`~dfml_jax.teachers.keys.check_pool_key`).

    Args:
      directory: pool directory to create.
      scenario: ``"SS"``, ``"SH"`` or ``"MH"``.
      datasets: dataset names (``dfml_jax.data.get_class_splits`` names), one for SS/SH.
      archs: classifier names; default ``("conv4",)`` for SS and
        :data:`~dfml_jax.teachers.types.DEFAULT_ARCHS` otherwise.
      num_apis: teachers per (dataset, architecture) group.
      way: classes per teacher.
      epochs: training epochs (default: the recipe's, 60).
      seed: master seed; teacher seeds are derived from (seed, group, member) and recorded.
      model_kwargs: per-architecture ``create_model`` options, e.g. ``{"conv4": {"width": 8}}``.
      recipe_overrides: :class:`~dfml_jax.teachers.population.TrainRecipe` fields applied to every
        architecture (e.g. ``{"batch_size": 32}``). ``augment`` not given (or ``None``): each
        dataset's domain-faithful augmentation (``"crop"`` for glyphs and digits, ``"crop_flip"``
        for natural images: :func:`~dfml_jax.teachers.population.default_augment`); ``"none"`` or
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
        :func:`dfml_jax.teachers.population.train_population`): a count (the first N local
        devices) or a sequence of devices; it must divide every population's size
        (``max_population`` and the remainder of ``num_apis``). ``None`` (default): all local
        devices, lowered per population to the largest count dividing it. The trained weights do
        not depend on it (up to float reassociation).
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
    archs, datasets = resolve_archs(scenario, archs), tuple(datasets)
    _check_build_args(scenario, datasets, archs, num_apis=num_apis, way=way, devices=devices,
                      train_fraction=train_fraction, max_population=max_population)
    directory = check_new_directory(directory, overwrite)
    model_kwargs, recipe_overrides, dataset_kwargs, recipes = _resolve_options(
        datasets, archs, model_kwargs, recipe_overrides, dataset_kwargs, epochs)
    splits, offsets, data_keys = _load_splits(datasets, split_loader, dataset_kwargs, way,
                                              train_fraction, data_keys)
    spec = pool_spec(scenario=scenario, datasets=datasets, archs=archs, num_apis=num_apis, way=way,
                     seed=seed, model_kwargs=model_kwargs, recipe_overrides=recipe_overrides,
                     dataset_kwargs=dataset_kwargs, train_fraction=train_fraction,
                     data_keys=data_keys)
    groups = _train_groups(splits, offsets, archs, recipes, model_kwargs=model_kwargs,
                           progress=progress, num_apis=num_apis, way=way, seed=seed,
                           train_fraction=train_fraction, max_population=max_population,
                           devices=devices, strategy=strategy)
    extra = {"build_key": pool_key(spec), "build_spec": spec, "num_apis_per_group": num_apis,
             "way": way, "seed": seed, "train_fraction": train_fraction,
             "dataset_kwargs": dataset_kwargs}
    return write_pool(directory, groups, scenario=scenario, extra=extra, overwrite=overwrite)


def obtain_pool(build: Mapping[str, Any], *, directory: str | None = None,
                parent: str | None = None, check_key: bool = True, fix: str | None = None,
                log: Callable[[str], None] | None = None) -> str:
    """A pool built from ``build``: reused if one with the same build key exists, else built.

    * ``directory`` given and holding a pool: its build key must equal the requested one
      (:func:`~dfml_jax.teachers.keys.check_pool_key`; :class:`~dfml_jax.teachers.keys.PoolKeyError`
      otherwise) unless ``check_key`` is False (then it is used as it is, and a log line says
      so);
    * ``directory`` given, no pool there: the pool is built into it;
    * no ``directory``: ``<parent>/pool-<first 12 hex digits of the build key>``, reused only when
      its recorded key equals the requested one, else (re)built. A ``<parent>/pool`` written by
      older code (no key) is never reused; a log line says so.

    Args:
      build: keyword arguments of :func:`build_pool` (without ``directory``).
      directory: an explicit pool directory, or ``None``.
      parent: where key-named pools live when ``directory`` is ``None``.
      check_key: check an existing explicit ``directory``'s key.
      fix: the remedy named by a key mismatch error (see
        :func:`~dfml_jax.teachers.keys.check_pool_key`).
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
        build["data_keys"] = {d: custom_data_key(d, build["split_loader"](d, **dkw))
                              for d in build["datasets"]}
    spec_args = {k: v for k, v in build.items() if k in (
        "scenario", "datasets", "archs", "num_apis", "way", "epochs", "seed", "model_kwargs",
        "recipe_overrides", "dataset_kwargs", "train_fraction", "data_keys")}
    spec = pool_spec(**spec_args)
    key = pool_key(spec)
    if directory is not None and os.path.isfile(os.path.join(directory, MANIFEST)):
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
        if os.path.isfile(os.path.join(legacy, MANIFEST)):
            log(f"[pool] {legacy} was written by older code (no build key): not reused")
    recorded = None
    if os.path.isfile(os.path.join(directory, MANIFEST)):
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
