"""Per-dataset input normalisation (part of every model's input pipeline).

Datasets deliver NHWC float32 images in [0, 1]. Models (teachers, meta-model) see
``normalize(x, mean, std) = (x - mean) / std`` with per-channel statistics. Named statistics:

* ``"cifar"``: CIFAR-FS/CIFAR-100 (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761);
* ``"imagenet"``: MiniImageNet, CUB (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225);
* ``"grayscale"`` (alias ``"glyphs"``, ``"half"``): 0.5 / 0.5, i.e. [0, 1] -> [-1, 1];
* ``"none"``: 0 / 1 (identity).

Single-channel statistics broadcast to any number of channels. :func:`compute_stats` computes
them from data instead.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NORM_STATS", "DATASET_STATS", "normalize", "denormalize", "get_stats",
           "stats_for_dataset", "compute_stats"]

#: name -> (mean, std), per channel.
NORM_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "grayscale": ((0.5,), (0.5,)),
    "glyphs": ((0.5,), (0.5,)),
    "half": ((0.5,), (0.5,)),
    "none": ((0.0,), (1.0,)),
}

#: dataset name -> entry of :data:`NORM_STATS` (datasets not listed: compute or pass stats).
DATASET_STATS: dict[str, str] = {
    "cifar_fs": "cifar", "cifarfs": "cifar", "cifar-fs": "cifar", "cifar100": "cifar",
    "cifar10": "cifar", "miniimagenet": "imagenet", "mini_imagenet": "imagenet",
    "mini-imagenet": "imagenet", "cub": "imagenet", "glyphs": "grayscale", "omniglot": "grayscale",
    "digits": "grayscale", "mnist": "grayscale", "mnist5k": "grayscale", "fmnist": "grayscale",
}


def normalize(x: jax.Array, mean: Sequence[float] | jax.Array, std: Sequence[float] | jax.Array
              ) -> jax.Array:
    """Per-channel ``(x - mean) / std`` on NHWC (or HWC) images.

    Args:
      x: images with channels last.
      mean, std: per-channel statistics of length 1 or ``C``.

    Returns:
      Normalised images, same shape and dtype as ``x``.
    """
    mean = jnp.asarray(mean, x.dtype)
    std = jnp.asarray(std, x.dtype)
    _check_channels(mean, std, x.shape[-1])
    return (x - mean) / std


def denormalize(x: jax.Array, mean, std) -> jax.Array:
    """Inverse of :func:`normalize`."""
    mean = jnp.asarray(mean, x.dtype)
    std = jnp.asarray(std, x.dtype)
    _check_channels(mean, std, x.shape[-1])
    return x * std + mean


def _check_channels(mean, std, c: int) -> None:
    for name, a in (("mean", mean), ("std", std)):
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] not in (1, c)):
            raise ValueError(f"normalize: {name} has shape {a.shape}, expected (1,) or ({c},) for "
                             f"{c}-channel images.")


def get_stats(name: str, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Named statistics, optionally broadcast to ``channels``.

    Args:
      name: key of :data:`NORM_STATS`.
      channels: if given, the returned tuples have this length (1-channel stats are repeated;
        3-channel stats for 1-channel images are averaged).

    Returns:
      ``(mean, std)`` tuples of floats.

    Raises:
      ValueError: unknown name (lists the valid ones).
    """
    if name not in NORM_STATS:
        raise ValueError(f"Unknown normalisation stats {name!r}; valid: "
                         f"{', '.join(sorted(NORM_STATS))}.")
    mean, std = NORM_STATS[name]
    if channels is None or len(mean) == channels:
        return tuple(mean), tuple(std)
    if len(mean) == 1:
        return tuple(mean) * channels, tuple(std) * channels
    if channels == 1:
        return (float(np.mean(mean)),), (float(np.mean(std)),)
    raise ValueError(f"Stats {name!r} have {len(mean)} channels, cannot use them for {channels}.")


def stats_for_dataset(dataset: str, channels: int | None = None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Statistics registered for a dataset name, or ``None`` if the dataset is not listed."""
    key = DATASET_STATS.get(str(dataset).lower())
    return None if key is None else get_stats(key, channels)


def compute_stats(images: np.ndarray | jax.Array, *, min_std: float = 1e-3
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of images ``(..., H, W, C)``.

    Args:
      images: any array with channels last.
      min_std: lower bound on the returned std (constant channels).

    Returns:
      ``(mean, std)`` tuples of floats of length ``C``.
    """
    a = np.asarray(images, np.float64).reshape(-1, np.shape(images)[-1])
    return (tuple(float(m) for m in a.mean(0)),
            tuple(float(max(s, min_std)) for s in a.std(0)))
