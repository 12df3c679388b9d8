"""NaiveKD: uniform-noise images labelled by the teacher (the sanity baseline of the IDEAL spec).

Same loop, label cache, accounting and student training as IDEAL
(:func:`dfml_jax.distill.ideal.run_pool_distillation`), with the generator replaced by
``U[0, 1]`` noise: every round draws ``B`` noise images, buys the teacher's labels once, and makes
one pass over the pool. On MNIST-like data it comes close to IDEAL (``ideal_dfme.md`` section 0.6).
"""
from __future__ import annotations

import dataclasses

from dfml_jax.distill.ideal import IDEALConfig, PoolRunResult, run_pool_distillation

__all__ = ["naive_config", "run_naive_kd"]


def naive_config(cfg: IDEALConfig | None = None, **overrides) -> IDEALConfig:
    """An :class:`IDEALConfig` with ``synth="noise"`` (generator settings are then unused)."""
    return dataclasses.replace(cfg or IDEALConfig(), synth="noise", **overrides)


def run_naive_kd(api, student_fm, cfg: IDEALConfig | None = None, **kwargs) -> PoolRunResult:
    """Runs NaiveKD; arguments as :func:`~dfml_jax.distill.ideal.run_pool_distillation`."""
    kwargs.setdefault("name", "NaiveKD")
    return run_pool_distillation(api, student_fm, naive_config(cfg), **kwargs)
