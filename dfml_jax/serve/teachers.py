"""The teachers a server can answer with: a pool teacher, a distillation run's teacher, a seeded
linear teacher.

Each loader returns a host forward pass ``(n, *input_shape) float32 -> (n, K)`` logits; the server
(:class:`dfml_jax.serve.TeacherServer`) is the API owner, so it runs this forward pass itself
(white-box access on the server side is legitimate) and callers only ever see the answers.

Example:
  >>> import numpy as np
  >>> make_linear_teacher((2, 2, 1), 3)(np.zeros((5, 2, 2, 1), np.float32)).shape
  (5, 3)
  >>> model_name_of("cifar10/resnet/0")
  'cifar10-resnet-0'
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.data import load_single_task
from dfml_jax.models import create_model, functional
from dfml_jax.teachers import load_white_box_teachers, read_manifest

__all__ = ["make_linear_teacher", "pool_teacher", "distill_teacher", "model_name_of"]


def make_linear_teacher(input_shape: Sequence[int], num_classes: int, seed: int = 0) -> Callable:
    """A seeded random linear teacher ``x -> flatten(x) @ W`` (logits), for tests and benchmarks.

    Args:
      input_shape: shape of one sample.
      num_classes: number of classes K.
      seed: seed of ``W``.

    Returns:
      A function ``(n, *input_shape) float32 -> (n, K) float32`` logits.
    """
    d = int(np.prod(input_shape))
    w = np.random.default_rng(seed).normal(size=(d, num_classes)).astype(np.float32)
    w *= 3.0 / np.sqrt(d)

    def linear_teacher(x):
        return np.asarray(x, np.float32).reshape(len(x), -1) @ w

    return linear_teacher


def pool_teacher(directory: str, index: int, *, input_space: str = "normalized",
                 conv_impl: Optional[str] = "lax"):
    """The forward pass of teacher ``index`` of a pool (server side: the owner's white-box view).

    Args:
      directory: pool directory (:func:`dfml_jax.teachers.build_pool`).
      index: teacher index.
      input_space: ``"normalized"`` (callers normalise with the pool's mean/std, the default of
        :func:`dfml_jax.teachers.load_pool`) or ``"raw"`` ([0, 1] images).
      conv_impl: convolution back-end of the forward pass (``"lax"``: fastest forward-only).

    Returns:
      ``(fn, input_shape, num_classes, metadata)``: ``fn`` maps ``(n, *input_shape)`` float32 to
      ``(n, K)`` logits (batches padded to powers of two); ``metadata`` is the teacher's public
      record (name, dataset, arch, classes, class names, mean, std, held-out accuracy,
      input_space).

    Raises:
      ValueError: index out of range; :class:`dfml_jax.teachers.PoolError` for a broken pool.
    """
    records = read_manifest(directory)["teachers"]
    if not 0 <= index < len(records):
        raise ValueError(f"--api {index} is out of range: the pool in {directory} has "
                         f"{len(records)} teachers (0..{len(records) - 1}).")
    teacher = load_white_box_teachers(directory, input_space=input_space,
                                      conv_impl=conv_impl)[index]
    rec = records[index]
    shape = tuple(int(s) for s in rec["input_shape"])
    fwd = jax.jit(teacher.apply)
    params = teacher.params

    def pool_forward(x):
        n = len(x)
        b = 1 << max(n - 1, 0).bit_length()
        if b > n:
            x = np.concatenate([x, np.zeros((b - n,) + shape, np.float32)])
        return np.asarray(fwd(params, x))[:n]

    meta = {k: rec.get(k) for k in ("name", "dataset", "arch", "classes", "class_names",
                                     "global_classes", "mean", "std", "heldout_acc")}
    meta["input_space"] = input_space
    meta["pool_index"] = int(index)
    return pool_forward, shape, int(rec["num_classes"]), meta


def distill_teacher(workdir: str):
    """The teacher trained by a distillation experiment (``experiments/distill.py``) in ``workdir``.

    Lets ``experiments/distill.py --api-url`` distil from exactly the teacher an earlier local
    run trained: ``python -m dfml_jax.serve --distill-run runs/distill_default --port 8500``.

    Args:
      workdir: the experiment's work directory (``config.json`` and the ``teacher/`` checkpoint).

    Returns:
      ``(fn, input_shape, num_classes, metadata)`` as :func:`pool_teacher`; inputs are [0, 1]
      images, as in the experiment.

    Raises:
      ValueError: no trained teacher in ``workdir``.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "teacher")):
        raise ValueError(f"{workdir} holds no trained distillation teacher (config.json and "
                         "teacher/); run experiments/distill.py there first.")
    with open(path) as f:
        cfg = json.load(f)
    d = load_single_task(cfg["dataset"])
    shape = tuple(int(s) for s in np.asarray(d.x_train).shape[1:])
    k = int(d.num_classes)
    fm = functional(create_model(cfg["teacher_arch"], num_classes=k, input_shape=shape,
                                 rngs_or_key=cfg["teacher_seed"], **cfg["teacher_kw"]))
    with RunCheckpointer(os.path.join(workdir, "teacher"), max_to_keep=1) as ck:
        restored = ck.restore_latest({"params": fm.params, "bn": fm.state})
    if restored is None:
        raise ValueError(f"{workdir}/teacher has no checkpoint; the teacher is not trained yet.")
    _, arrays, tmeta = restored
    fwd = jax.jit(lambda p, b, x: fm.apply(p, b, x, train=False)[0])
    params, bn = arrays["params"], arrays["bn"]

    def distill_forward(x):
        n = len(x)
        b = 1 << max(n - 1, 0).bit_length()
        if b > n:
            x = np.concatenate([x, np.zeros((b - n,) + shape, np.float32)])
        return np.asarray(fwd(params, bn, x))[:n]

    meta = {"name": f"{cfg['dataset']}/{cfg['teacher_arch']}/teacher", "dataset": cfg["dataset"],
            "arch": cfg["teacher_arch"], "test_acc": tmeta.get("test_acc"), "input_space": "raw"}
    return distill_forward, shape, k, meta


def model_name_of(teacher_name: str) -> str:
    """A URL-safe model name for a teacher name (``cifar10/resnet/0`` -> ``cifar10-resnet-0``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", teacher_name).strip("-.")
    return name or "teacher"
