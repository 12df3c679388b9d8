"""The untrained baselines of the BiDf-MKD experiment, as run-loop methods that make no step.

* ``random``: the randomly initialised meta-model;
* ``random_scaled``: the same random init with every conv / linear KERNEL (not the biases, not
  the BatchNorm parameters) times :func:`kernel_scale` (default ``1/sqrt(num_apis)``): does
  ``average`` help only by shrinking the weights?;
* ``average``: the element-wise average of the same-architecture teachers' weights (WHITE-BOX).

Each is a :class:`~dfml_jax.training.run_loop.Method` (:func:`baseline_method`) whose state is
``(params, info)`` (``info``: what the method's record states about the parameters); it makes no
step and no query, so :func:`dfml_jax.training.run_loop.run` returns its initial state.
:func:`meta_init_params` gives the meta-trained methods' initial parameters (``cfg.meta_init``).

Example:
  >>> from types import SimpleNamespace
  >>> kernel_scale(SimpleNamespace(random_scale=None, num_apis=4))
  0.5
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dfml_jax.models import scale_kernels
from dfml_jax.training.run_loop import Method, run

__all__ = ["UNTRAINED", "META_INITS", "kernel_scale", "meta_init_params", "untrained_params",
           "average_teachers", "baseline_method", "run_baseline"]

UNTRAINED = ("random", "random_scaled", "average")   # evaluated as they are: no meta-training
META_INITS = ("random", "scaled")


def kernel_scale(cfg) -> float:
    """The ``random_scaled`` factor: ``cfg.random_scale``, or ``1/sqrt(cfg.num_apis)`` if None.

    Args:
      cfg: a config with ``random_scale`` and ``num_apis`` (``BiDfExperimentConfig``).

    Returns:
      The factor.

    Raises:
      ValueError: a non-positive or non-finite scale, or ``num_apis < 1``.
    """
    if cfg.random_scale is None:
        if cfg.num_apis < 1:
            raise ValueError(f"random_scaled: num_apis={cfg.num_apis} gives no default scale "
                             "1/sqrt(num_apis); set random_scale.")
        return 1.0 / math.sqrt(cfg.num_apis)
    if not (math.isfinite(cfg.random_scale) and cfg.random_scale > 0):
        raise ValueError(f"random_scale must be a positive number (or None: 1/sqrt(num_apis)), "
                         f"got {cfg.random_scale}")
    return float(cfg.random_scale)


def meta_init_params(meta, cfg):
    """The meta-trained methods' initial parameters (``cfg.meta_init``).

    ``"scaled"``: the random init with every conv / linear kernel times :func:`kernel_scale` (the
    ``random_scaled`` baseline's parameters); ``"random"``: the random init (the paper).

    Args:
      meta: the meta-model's :class:`~dfml_jax.models.FunctionalModel`.
      cfg: the experiment config (``meta_init``, ``random_scale``, ``num_apis``).

    Returns:
      The parameters.

    Raises:
      ValueError: an unknown ``meta_init``.
    """
    if cfg.meta_init == "random":
        return meta.params
    if cfg.meta_init == "scaled":
        return scale_kernels(meta.params, kernel_scale(cfg))[0]
    raise ValueError(f"meta_init must be one of {META_INITS}, got {cfg.meta_init!r}")


def average_teachers(meta_params, teachers: Sequence[Any], records: Sequence[Dict[str, Any]],
                     cfg):
    """Element-wise average of the teachers whose parameters match the meta-model's structure.

    Args:
      meta_params: the meta-model's parameters (the structure to match).
      teachers: white-box teachers (``.params["params"]``), one per record.
      records: the pool's per-teacher records (``arch``).
      cfg: the experiment config (``meta_arch``, ``meta_width``).

    Returns:
      The averaged parameters.

    Raises:
      ValueError: no teacher shares the meta-model's architecture.
    """
    same = [w.params["params"] for w, r in zip(teachers, records) if r["arch"] == cfg.meta_arch]
    ok = [p for p in same if jax.tree.structure(p) == jax.tree.structure(meta_params) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(meta_params)))]
    if not ok:
        raise ValueError(f"average baseline: no teacher shares the meta-model's architecture "
                         f"({cfg.meta_arch}, width {cfg.meta_width}); drop 'average' from methods")
    return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *ok)


def untrained_params(name: str, init_params, cfg, *, teachers: Optional[Sequence[Any]] = None,
                     records: Optional[Sequence[Dict[str, Any]]] = None) -> Tuple[Any, dict]:
    """Parameters of an untrained baseline (``random``, ``random_scaled``, ``average``).

    Args:
      name: one of :data:`UNTRAINED`.
      init_params: the random init of the meta-model.
      cfg: the experiment config.
      teachers, records: the white-box teachers and the pool's records (``average`` only).

    Returns:
      ``(params, info)``: ``info`` is what the method's record states about them.
    """
    if name == "random":
        return init_params, {}
    if name == "random_scaled":
        f = kernel_scale(cfg)
        params, paths = scale_kernels(init_params, f)
        return params, {"kernel_scale": f, "scaled_leaves": paths,
                        "note": f"random init, every conv / linear kernel x {f:.4g} (biases and "
                                "BatchNorm parameters unchanged)"}
    if name == "average":
        return (average_teachers(init_params, teachers, records, cfg),
                {"note": "white-box: averages teacher weights"})
    raise ValueError(f"{name!r} is not an untrained baseline ({list(UNTRAINED)})")


def _no_step(state, key, index):
    raise RuntimeError("an untrained baseline makes no step")


def baseline_method(name: str, init_params, cfg, *, teachers: Optional[Sequence[Any]] = None,
                    records: Optional[Sequence[Dict[str, Any]]] = None) -> Method:
    """An untrained baseline as a run-loop method: state ``(params, info)``, no step, no query.

    Args:
      name, init_params, cfg, teachers, records: as :func:`untrained_params`.

    Returns:
      The :class:`~dfml_jax.training.run_loop.Method`.
    """
    if name not in UNTRAINED:
        raise ValueError(f"{name!r} is not an untrained baseline ({list(UNTRAINED)})")
    return Method(name=name, step=_no_step, num_steps=0, limit_reason="untrained",
                  init=lambda key: untrained_params(name, init_params, cfg, teachers=teachers,
                                                    records=records))


def run_baseline(name: str, init_params, cfg, *, teachers: Optional[Sequence[Any]] = None,
                 records: Optional[Sequence[Dict[str, Any]]] = None) -> Tuple[Any, dict]:
    """Runs an untrained baseline through the run loop (no step): ``(params, info)``.

    Args:
      name, init_params, cfg, teachers, records: as :func:`untrained_params`.

    Returns:
      ``(params, info)``.
    """
    method = baseline_method(name, init_params, cfg, teachers=teachers, records=records)
    return run(method, key=jax.random.key(0)).state
