"""Differentiable image augmentation: batch-shared (BiDf-MKD's inversion pipeline) and per-sample.

* :func:`batch_shared_augment`: one random draw (crop offset, flip) shared by the whole batch, as
  torchvision transforms on a 4-D tensor do in the official code; zero padding happens in [0, 1]
  space before normalisation.
* :func:`random_crop_flip` / :func:`augment_images`: a fresh draw per image (kornia's
  ``RandomCrop(padding)`` + ``RandomHorizontalFlip``), used by the distillation students and the
  teacher trainer (:mod:`dfml_jax.teachers.population`). The named variants are
  :data:`AUGMENTATIONS`; ``"crop"`` (random shift, never a flip) is the domain-faithful one for glyphs and digits, whose
  identity changes under a mirror image.

Everything is differentiable with respect to the images, so generator gradients flow through it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normalize", "batch_shared_augment", "random_crop_flip", "augment_images",
           "AUGMENTATIONS"]


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


def random_crop_flip(x: jax.Array, key: jax.Array, *, pad: int = 4, crop: bool = True,
                     flip: bool = True, fill: Union[float, Sequence[float]] = 0.0) -> jax.Array:
    """Per-sample random crop of the padded image (back to full size) and horizontal flip.

    Equivalent to kornia / torchvision ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip()``
    applied with a fresh draw per image: a random integer translation in ``[-pad, pad]`` on each
    axis, the uncovered border filled with ``fill``, then (``flip``) a Bernoulli(0.5) mirror
    image. Differentiable w.r.t. ``x``.

    Args:
      x: ``(B, H, W, C)`` images.
      key: PRNG key.
      pad: padding / maximal shift in pixels.
      crop: apply the random crop.
      flip: apply the random horizontal flip.
      fill: value of the uncovered border, a constant or one per channel: 0 for images in
        [0, 1]; for normalised images the normalised black, ``-mean / std``.

    Returns:
      Augmented images, same shape as ``x``.

    >>> y = random_crop_flip(jnp.ones((3, 8, 8, 1)), jax.random.key(0), pad=2)
    >>> y.shape
    (3, 8, 8, 1)
    """
    b, h, w, c = x.shape
    kc, kf = jax.random.split(key)
    if crop and pad > 0:
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offs = jax.random.randint(kc, (b, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(xp, offs)
        if np.any(np.asarray(fill) != 0):  # replace the zero border by ``fill``
            rows = jnp.arange(h)[None, :] + offs[:, :1] - pad  # source row of each output row
            cols = jnp.arange(w)[None, :] + offs[:, 1:] - pad
            inside = (((rows >= 0) & (rows < h))[:, :, None, None]
                      & ((cols >= 0) & (cols < w))[:, None, :, None])
            x = jnp.where(inside, x, jnp.asarray(fill, x.dtype))
    if flip:
        do = jax.random.bernoulli(kf, 0.5, (b, 1, 1, 1))
        x = jnp.where(do, x[:, :, ::-1, :], x)
    return x


#: Augmentation names: name -> (crop, flip). ``"crop"`` never mirrors an image.
AUGMENTATIONS = {"none": (False, False), "flip": (False, True), "crop": (True, False),
                 "crop_flip": (True, True)}


def augment_images(x: jax.Array, key: jax.Array, name: str, pad: int = 4,
                   fill: Union[float, Sequence[float]] = 0.0) -> jax.Array:
    """Applies the named per-sample augmentation of :data:`AUGMENTATIONS` (``"none"``: ``x``).

    Args:
      x: ``(B, H, W, C)`` images.
      key: PRNG key.
      name: a key of :data:`AUGMENTATIONS`.
      pad: maximal shift of the crop, in pixels.
      fill: border value of the crop (see :func:`random_crop_flip`).

    Returns:
      Augmented images, same shape as ``x``.

    Raises:
      ValueError: unknown ``name`` (the valid ones are listed).
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid: {sorted(AUGMENTATIONS)}")
    crop, flip = AUGMENTATIONS[name]
    if not (crop or flip):
        return x
    return random_crop_flip(x, key, pad=pad, crop=crop, flip=flip, fill=fill)
