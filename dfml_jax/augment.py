"""Differentiable, batch-shared image augmentation (BiDf-MKD's inversion pipeline).

One random draw (crop offset, flip) is shared by the whole batch, as torchvision transforms on a
4-D tensor do in the official code; zero padding happens in [0, 1] space before normalisation.
Everything is differentiable with respect to the images, so generator gradients flow through it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

__all__ = ["normalize", "batch_shared_augment"]


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Per-channel ``(x - mean) / std`` for NHWC images."""
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def batch_shared_augment(x: jax.Array, key: jax.Array, *, pad: int = 4, flip: bool = True,
                         out_size: Optional[int] = None, mean: Sequence[float] = (0.0,),
                         std: Sequence[float] = (1.0,)) -> jax.Array:
    """Zero-pad, random crop, random horizontal flip, normalise; one draw for the whole batch.

    Args:
      x: (B, H, W, C) images in [0, 1].
      key: PRNG key for this draw.
      pad: zero padding on each side before cropping.
      flip: flip horizontally with probability 0.5.
      out_size: crop size (default H); a smaller size takes a random window, as the official code
        does for 32x32 APIs fed 84x84 generator outputs.
      mean, std: per-channel normalisation statistics.

    Returns:
      (B, out_size, out_size, C) augmented, normalised images.

    >>> y = batch_shared_augment(jnp.ones((2, 8, 8, 1)), jax.random.key(0), pad=2)
    >>> y.shape
    (2, 8, 8, 1)
    """
    b, h, w, c = x.shape
    s = out_size or h
    kx, ky, kf = jax.random.split(key, 3)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = jax.random.randint(ky, (), 0, h + 2 * pad - s + 1)
    ox = jax.random.randint(kx, (), 0, w + 2 * pad - s + 1)
    crop = jax.lax.dynamic_slice(xp, (0, oy, ox, 0), (b, s, s, c))
    if flip:
        crop = jnp.where(jax.random.bernoulli(kf), crop[:, :, ::-1, :], crop)
    return normalize(crop, mean, std)
