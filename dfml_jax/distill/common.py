"""Shared machinery of the single-teacher distillation methods (IDEAL, DFME, NaiveKD).

* :class:`Evaluator`: accuracy on the validation and test splits (BatchNorm in eval mode).
* :class:`RunTracker`: the bookkeeping every budgeted, resumable run loop shares (IDEAL / NaiveKD
  rounds, DFME iterations): orbax checkpoints with the curve and the query ledger, restore after a
  kill, the curve of evaluated ``(queries, val_acc, test_acc)`` points with evaluation at budget
  crossings, the tqdm bar and ``result.json``.
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
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.distill.label_cache import PoolStore, atomic_write_json, dequantize, quantize_uint8
from dfml_jax.distill.student import (POOL_LOSSES, StudentState, balanced_loss, init_student,
                                      make_pool_pass, make_supervised_epoch, pool_class_prior,
                                      train_supervised)
from dfml_jax.models import create_model, functional, get_default_conv_impl
from dfml_jax.training.augment import AUGMENTATIONS, augment_images, random_crop_flip
from dfml_jax.training.compile_cache import memoize_builder, uncommitted
from dfml_jax.training.optim import multistep_schedule, torch_sgd

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
    "RunTracker",
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
def make_generator(cfg, image_shape: Sequence[int], *, key: Any = 0, head: Optional[str] = None,
                   conv_impl: Optional[str] = None):
    """The DCGAN generator for ``image_shape`` (square, side a multiple of 4) and its functional view.

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
    if h != w or h % 4:
        raise ValueError(f"the DCGAN generator makes square images with a side that is a multiple of "
                         f"4; the API expects {tuple(image_shape)}")
    head = head or ("tanh_bn" if getattr(cfg, "gen_head", "sigmoid") == "bn_sigmoid" else "sigmoid")

    def build():
        gen = create_model("dcgan", nz=cfg.nz, ngf=cfg.ngf, img_size=h, nc=c, head=head,
                           conv_impl=conv_impl, rngs_or_key=key)
        return gen, functional(gen)

    if isinstance(key, int):
        return memoize_builder("generator", (), (cfg.nz, cfg.ngf, h, c, head, key, conv_impl),
                               build)
    return build()


# ----------------------------------------------------------------------------- run bookkeeping
class RunTracker:
    """Bookkeeping of a budgeted, resumable distillation loop (the algorithm stays in the loop).

    IDEAL / NaiveKD (steps are rounds) and DFME (steps are iterations) share it: checkpoints under
    ``workdir/checkpoints`` that carry the curve and the API's query ledger with the arrays, the
    restore after a kill, the curve of evaluated points (evaluation also when a step crosses one of
    ``eval_budgets``, so each budget gets its own model selection), the tqdm bar and
    ``result.json``.

    Args:
      api: the teacher API whose ledger is checkpointed and restored.
      workdir: run directory (None: nothing on disk, no resume).
      evaluator: an :class:`Evaluator` (None: no curve).
      eval_budgets: query counts at which the student is evaluated as well.
      step_key: name of the step counter in the curve's points (``"round"``, ``"iteration"``).

    >>> from dfml_jax.api import BlackBoxAPI
    >>> api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1), (2, 2, 1), 4)
    >>> t = RunTracker(api, workdir=None, evaluator=None, eval_budgets=(100,), step_key="round")
    >>> t.crosses_budget(step_cost=40), t.start
    (False, 0)
    """

    def __init__(self, api, *, workdir: Optional[str], evaluator: Optional[Evaluator],
                 eval_budgets: Sequence[int] = (), step_key: str = "step"):
        self.api = api
        self.workdir = workdir
        self.evaluator = evaluator
        self.budgets = sorted(int(b) for b in eval_budgets)
        self.step_key = step_key
        self.ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints")) if workdir else None
        self.curve: List[Dict[str, Any]] = []
        self.start = 0                   # first step to run (after a restore: the next one)
        self.last_eval = -1              # index of the last evaluated step
        self.bar = None

    def restore(self, template: Any):
        """Restores the latest checkpoint, if any.

        Args:
          template: pytree with the structure of the saved arrays.

        Returns:
          ``(arrays, meta)`` with fresh uncommitted arrays, or None (nothing saved). The curve,
          the API's ledger and :attr:`start` are restored as a side effect.
        """
        if self.ckpt is None:
            return None
        restored = self.ckpt.restore_latest(template)
        if restored is None:
            return None
        step, arrays, meta = restored
        self.curve = meta["curve"]
        self.api.ledger.load_state_dict(meta["ledger"])
        self.start = step + 1
        self.last_eval = self.curve[-1][self.step_key] - 1 if self.curve else -1
        return uncommitted(arrays), meta

    def open_progress(self, enabled: bool, total: Optional[int], desc: str, unit: str) -> None:
        """Opens a tqdm bar at :attr:`start` when ``enabled``."""
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=self.start, desc=desc, unit=unit, leave=True)

    def crosses_budget(self, step_cost: int) -> bool:
        """Whether the next step (``step_cost`` queries) cannot be bought within an eval budget.

        True when the queries spent so far are within one of ``eval_budgets`` and one more step
        would pass it: the current student is the last one of that budget.
        """
        q = self.api.queries
        return any(q <= b < q + step_cost for b in self.budgets)

    def evaluate(self, step: int, params, bn, **fields) -> Dict[str, Any]:
        """Appends the point of step index ``step`` (``step + 1`` steps done) to the curve."""
        point = {self.step_key: step + 1, "queries": self.api.queries, **fields}
        point.update(self.evaluator(params, bn))
        self.curve.append(point)
        self.last_eval = step
        return point

    def save(self, step: int, arrays: Any, **meta) -> None:
        """Checkpoints step index ``step``: the arrays, the curve, the ledger and ``meta``."""
        if self.ckpt is not None:
            self.ckpt.save(step, arrays, {"curve": self.curve,
                                          "ledger": self.api.ledger.state_dict(), **meta})

    def tick(self, point: Optional[Dict[str, Any]], **post) -> None:
        """Advances the bar by one step, showing ``post`` and the point's accuracies."""
        if self.bar is None:
            return
        if point is not None:
            post["val"] = f"{point.get('val_acc', float('nan')):.3f}"
            post["test"] = f"{point.get('test_acc', float('nan')):.3f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        """Closes the bar and the checkpointer."""
        if self.bar is not None:
            self.bar.close()
        if self.ckpt is not None:
            self.ckpt.close()

    def evaluate_end(self, steps_done: int, stopped: str, params, bn, **fields) -> None:
        """Evaluates the last completed step unless it was evaluated or the run was interrupted
        (a budget stop is found out only when the next step cannot be bought)."""
        if (self.evaluator is not None and steps_done > 0 and self.last_eval != steps_done - 1
                and stopped != "interrupted"):
            self.evaluate(steps_done - 1, params, bn, **fields)

    def write_result(self, summary: Dict[str, Any], finished: bool, cfg, seed: int,
                     name: str) -> None:
        """Writes ``workdir/result.json`` for a finished run (an interrupted one writes nothing)."""
        if self.workdir and finished:
            atomic_write_json(os.path.join(self.workdir, "result.json"),
                              {**summary, "config": config_dict(cfg), "seed": seed,
                               "method": name})
