"""Small image utilities on ``uint8`` NHWC batches: resizing and channel conversion."""
from __future__ import annotations

import numpy as np
from PIL import Image


def resize_uint8(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a batch of ``uint8`` images with antialiasing (PIL bilinear/box).

    Args:
      images: ``uint8`` ``(N, H, W, C)`` with ``C`` in ``{1, 3}``.
      size: output side (square) or ``(height, width)``.

    Returns:
      ``uint8`` ``(N, size_h, size_w, C)``; the input itself if already that size.
    """
    h, w = (size, size) if isinstance(size, int) else size
    images = np.asarray(images)
    if images.shape[1:3] == (h, w):
        return images
    out = np.empty((images.shape[0], h, w, images.shape[-1]), np.uint8)
    for i, img in enumerate(images):
        out[i] = resize_one(img, (h, w))
    return out


def resize_one(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one ``uint8`` ``(H, W, C)`` image to ``size=(h, w)``; returns ``(h, w, C)``."""
    h, w = size
    image = np.asarray(image, np.uint8)
    if image.shape[:2] == (h, w):
        return image
    resample = Image.Resampling.BOX if (image.shape[0] >= h and image.shape[1] >= w) else Image.Resampling.BILINEAR
    if image.shape[-1] == 1:
        out = Image.fromarray(image[..., 0], mode="L").resize((w, h), resample)
        return np.asarray(out, np.uint8)[..., None]
    out = Image.fromarray(image, mode="RGB").resize((w, h), resample)
    return np.asarray(out, np.uint8)


def set_channels(images: np.ndarray, channels: int, *, view: bool = False) -> np.ndarray:
    """Convert ``uint8`` NHWC-like images (channel last) to 1 or 3 channels.

    Grey to RGB replicates the channel; RGB to grey uses ITU-R 601 luma
    (``0.299 R + 0.587 G + 0.114 B``, as PIL's ``"L"`` mode).

    Args:
      images: ``uint8`` array whose last axis is the channel axis (1 or 3).
      channels: 1 or 3.
      view: when replicating grey to RGB, return a read-only broadcast view
        instead of a copy (saves memory; ``Taskset`` keeps one channel on device).

    Returns:
      ``uint8`` array with ``channels`` channels.

    Raises:
      ValueError: if ``channels`` is not 1 or 3, or the input has another count.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
    c = images.shape[-1]
    if c not in (1, 3):
        raise ValueError(f"expected 1 or 3 input channels, got {c}.")
    if c == channels:
        return images
    if channels == 3:
        if view:
            return np.broadcast_to(images, images.shape[:-1] + (3,))
        return np.repeat(images, 3, axis=-1)
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    grey = images.astype(np.float32) @ weights
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]


def resize_float(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a batch of ``float32`` NHWC images in ``[0, 1]`` to ``size x size`` (PIL, antialiased).

    Args:
      images: ``(N, H, W, C)`` floats.
      size: output side.

    Returns:
      ``float32`` ``(N, size, size, C)`` clipped to ``[0, 1]``; the input if already that size.
    """
    images = np.asarray(images, np.float32)
    if images.shape[1:3] == (size, size):
        return images
    resample = Image.Resampling.BOX if min(images.shape[1:3]) >= size else Image.Resampling.BILINEAR
    out = np.empty((images.shape[0], size, size, images.shape[-1]), np.float32)
    for i, img in enumerate(images):
        for c in range(images.shape[-1]):
            out[i, :, :, c] = np.asarray(Image.fromarray(img[:, :, c], mode="F").resize((size, size), resample))
    return np.clip(out, 0.0, 1.0)


def set_channels_float(images: np.ndarray, channels: int) -> np.ndarray:
    """:func:`set_channels` for ``float32`` images in ``[0, 1]`` (always a copy or the input)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    return (images @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
