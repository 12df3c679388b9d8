"""Shared machinery of the single-teacher distillation methods (IDEAL, DFME, NaiveKD).

* :class:`Evaluator`: accuracy on the validation and test splits (BatchNorm in eval mode).
* :func:`accuracy_point`: a point of a run's curve (the budgeted, resumable loop itself, with its
  checkpoints, evaluation points, bar and ``result.json``, is :func:`dfml_jax.training.run_loop.run`).
* :func:`make_generator`: the DCGAN generator both IDEAL and DFME use.
* Validation-based model selection within a budget (:func:`select_within_budget`) and the
  stratified validation split (:func:`split_validation`).

Re-exported for the methods, from the modules that define them: the student's state and training
passes (:mod:`.student`), its optimiser (:mod:`dfml_jax.training.optim`), the label cache
(:mod:`.label_cache`), the compiled-step cache (:mod:`dfml_jax.training.compile_cache`) and
per-sample augmentation (:mod:`dfml_jax.training.augment`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.distill.label_cache import PoolStore, atomic_write_json, dequantize, quantize_uint8
from dfml_jax.distill.student import (POOL_LOSSES, StudentState, balanced_loss, init_student,
                                      make_pool_pass, make_supervised_epoch, pool_class_prior,
                                      train_supervised)
from dfml_jax.models import create_model, functional, get_default_conv_impl
from dfml_jax.training.augment import AUGMENTATIONS, augment_images, random_crop_flip
from dfml_jax.training.compile_cache import memoize_builder, uncommitted
from dfml_jax.training.optim import multistep_schedule, torch_sgd
from dfml_jax.training.run_loop import EvalAt

__all__ = [
    "StudentState",
    "torch_sgd",
    "multistep_schedule",
    "random_crop_flip",
    "augment_images",
    "AUGMENTATIONS",
    "init_student",
    "make_supervised_epoch",
    "train_supervised",
    "make_pool_pass",
    "POOL_LOSSES",
    "pool_class_prior",
    "balanced_loss",
    "Evaluator",
    "PoolStore",
    "quantize_uint8",
    "dequantize",
    "select_within_budget",
    "split_validation",
    "atomic_write_json",
    "memoize_builder",
    "uncommitted",
    "accuracy_point",
    "GENERATORS",
    "make_generator",
    "config_dict",
]


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Accuracy of a classifier (BatchNorm in eval mode) on named splits.

    Args:
      fm: the classifier's :class:`~dfml_jax.models.FunctionalModel`.
      splits: ``{"val": (x, y), "test": (x, y)}``; result keys are ``"<name>_acc"``.
      chunk: evaluation batch size (the last chunk is padded, so one compiled shape).
    """

    def __init__(self, fm, splits: Dict[str, tuple], chunk: int = 1000):
        self.splits = {k: (np.asarray(x, np.float32), np.asarray(y)) for k, (x, y) in splits.items()
                       if x is not None and len(x)}
        self.chunk = chunk

        @jax.jit
        def correct(params, bn, x, y, valid):
            logits, _ = fm.apply(params, bn, x, train=False)
            return jnp.sum((jnp.argmax(logits, -1) == y) & valid)

        self._correct = correct
        self._chunks = {}
        for name, (x, y) in self.splits.items():
            c = min(self.chunk, len(x))
            pieces = []
            for s in range(0, len(x), c):
                xb, yb = x[s:s + c], y[s:s + c]
                valid = np.ones(len(xb), bool)
                if len(xb) < c:
                    padn = c - len(xb)
                    xb = np.concatenate([xb, np.zeros((padn,) + xb.shape[1:], xb.dtype)])
                    yb = np.concatenate([yb, np.zeros((padn,), yb.dtype)])
                    valid = np.concatenate([valid, np.zeros(padn, bool)])
                pieces.append((jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(valid)))
            self._chunks[name] = (pieces, len(x))

    def accuracy(self, params, bn, split: str) -> float:
        pieces, n = self._chunks[split]
        total = sum(int(self._correct(params, bn, x, y, v)) for x, y, v in pieces)
        return total / n

    def __call__(self, params, bn) -> Dict[str, float]:
        return {f"{name}_acc": self.accuracy(params, bn, name) for name in self._chunks}


# ----------------------------------------------------------------------------- selection
def select_within_budget(curve: Sequence[Dict[str, Any]], budget: int) -> Optional[Dict[str, Any]]:
    """Validation-based model selection among the evaluated points with ``queries <= budget``.

    Returns a dict with the selected point (``selected``: highest ``val_acc``; ties go to the later
    point), the last point within the budget (``final``) and, labelled as the papers' protocol, the
    best test accuracy over those points (``best_on_test``). None when no point is within budget.
    """
    pts = [p for p in curve if p["queries"] <= budget and "val_acc" in p]
    if not pts:
        return None
    best = pts[0]
    for p in pts:
        if p["val_acc"] >= best["val_acc"]:
            best = p
    return {"selected": best, "final": pts[-1], "best_on_test": max(p["test_acc"] for p in pts)}


def split_validation(x: np.ndarray, y: np.ndarray, val_size: int, seed: int = 0):
    """Stratified split of labelled training data into ``(x_tr, y_tr, x_val, y_val)``.

    Each class contributes ``round(val_size * share)`` samples (the total is then adjusted to
    exactly ``val_size``); the split depends only on ``seed``.
    """
    if val_size <= 0:
        return x, y, x[:0], y[:0]
    if val_size >= len(x):
        raise ValueError(f"val_size={val_size} must be smaller than the training set ({len(x)})")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    idx_by_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    quota = {c: int(round(val_size * len(idx_by_class[c]) / len(y))) for c in classes}
    diff = val_size - sum(quota.values())
    for c in list(classes)[: abs(diff)]:
        quota[c] += 1 if diff > 0 else -1
    val_idx = np.concatenate([idx_by_class[c][: quota[c]] for c in classes])
    mask = np.zeros(len(x), bool)
    mask[val_idx] = True
    val_idx = np.flatnonzero(mask)
    tr_idx = np.flatnonzero(~mask)
    return x[tr_idx], y[tr_idx], x[val_idx], y[val_idx]


def config_dict(cfg) -> Dict[str, Any]:
    """A JSON-friendly dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ----------------------------------------------------------------------------- generator
#: The generators of :func:`make_generator` (``cfg.generator``; configs without the field: DCGAN).
GENERATORS = ("dcgan", "strokes")


def make_generator(cfg, image_shape: Sequence[int], *, key: Any = 0, head: Optional[str] = None,
                   conv_impl: Optional[str] = None):
    """The generator for ``image_shape`` and its functional view.

    ``cfg.generator`` (default ``"dcgan"``): the DCGAN (square images, side a multiple of 4) or
    ``"strokes"`` (:class:`~dfml_jax.models.strokes.StrokeGenerator` with ``cfg.num_strokes``
    strokes and a learnable linear map from the ``cfg.nz`` latent to the stroke parameters;
    square images of any side >= 4; ``head`` and ``conv_impl`` do not apply).

    Its initialisation is redone from a key whenever it is used (``functional.init``), so the
    module is shared between calls with the same settings (and an int ``key``).

    Args:
      cfg: any config with ``nz`` and ``ngf`` (and optionally IDEAL's ``gen_head``).
      image_shape: ``(H, W, C)`` of the API's inputs.
      key: initialisation key or int seed of the module.
      head: the generator's output head (``"sigmoid"`` or ``"tanh_bn"``); None: from
        ``cfg.gen_head`` (IDEAL's ``"bn_sigmoid"`` builds the ``tanh_bn`` module, whose
        pre-activation output IDEAL passes through a sigmoid).
      conv_impl: convolution back-end (default: the library default).

    Returns:
      ``(module, functional_model)``.
    """
    conv_impl = conv_impl or get_default_conv_impl()
    h, w, c = image_shape
    kind = getattr(cfg, "generator", "dcgan")
    if kind not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {kind!r}")
    if kind == "strokes":
        if h != w:
            raise ValueError(f"the strokes generator draws square images; the API expects "
                             f"{tuple(image_shape)}")
        kwargs = dict(num_strokes=cfg.num_strokes)
        settings = ("strokes", cfg.nz, cfg.num_strokes, h, c, key)
    else:
        if h != w or h % 4:
            raise ValueError(f"the DCGAN generator makes square images with a side that is a "
                             f"multiple of 4; the API expects {tuple(image_shape)}")
        head = head or ("tanh_bn" if getattr(cfg, "gen_head", "sigmoid") == "bn_sigmoid"
                        else "sigmoid")
        kwargs = dict(ngf=cfg.ngf, head=head, conv_impl=conv_impl)
        settings = (cfg.nz, cfg.ngf, h, c, head, key, conv_impl)

    def build():
        gen = create_model(kind, nz=cfg.nz, img_size=h, nc=c, rngs_or_key=key, **kwargs)
        return gen, functional(gen)

    if isinstance(key, int):
        return memoize_builder("generator", (), settings, build)
    return build()


# ----------------------------------------------------------------------------- curve points
def accuracy_point(evaluator: Evaluator, step_key: str, at: EvalAt, params, bn,
                   **fields) -> Dict[str, Any]:
    """A curve point of the distillation methods: the step count, the queries, ``fields`` and the
    evaluator's accuracies.

    Args:
      evaluator: the :class:`Evaluator`.
      step_key: name of the step count (``"round"``, ``"iteration"``).
      at: the run loop's :class:`~dfml_jax.training.run_loop.EvalAt`.
      params, bn: the evaluated student.
      fields: further entries of the point, after the step count and the queries.

    Returns:
      ``{step_key: at.steps, "queries": at.queries, **fields, "val_acc": ..., "test_acc": ...}``.
    """
    return {step_key: at.steps, "queries": at.queries, **fields, **evaluator(params, bn)}
