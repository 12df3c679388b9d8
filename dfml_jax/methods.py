"""The registry of methods: ``METHODS[name]`` says how to configure, build and run each one.

Every method is a :class:`~dfml_jax.training.run_loop.Method` run by the shared run loop
(:func:`dfml_jax.training.run_loop.run`); an entry gives its config class, the changes that make the
method out of that config (NaiveKD is IDEAL with noise images, ``white_box`` is BiDf-MKD with true
gradients), the builder ``config -> Method`` and the public function that runs it. The experiment
runners (:mod:`dfml_jax.distill.experiment`, :mod:`dfml_jax.bidf_mkd.experiment`) configure and
run their methods through it:

==============  =========  ========================  ==========================================
name            family     builder                   run
==============  =========  ========================  ==========================================
ideal           distill    ``ideal_method``          ``run_pool_distillation``
naive_kd        distill    ``ideal_method``          ``run_naive_kd``
dfme            distill    ``dfme_method``           ``run_dfme``
bidf_mkd        meta       ``bidf_mkd_method``       ``train_bidf_mkd``
white_box       meta       ``bidf_mkd_method``       ``train_bidf_mkd``
maml_real       meta       ``bidf_mkd_method``       ``train_bidf_mkd``
maml_pool_data  meta       ``bidf_mkd_method``       ``train_bidf_mkd``
random          baseline   ``baseline_method``       ``run_baseline``
random_scaled   baseline   ``baseline_method``       ``run_baseline``
average         baseline   ``baseline_method``       ``run_baseline``
==============  =========  ========================  ==========================================

A family fixes the builder's arguments: ``distill``: ``(api, student_fm, cfg, *, seed,
evaluator, workdir)``, one teacher API; ``meta``: ``(cfg, *, meta_apply, meta_init_params,
gen_init, gen_apply, pool, val_tasks, ...)``, a pool of APIs (none for the ``maml_*`` bounds);
``baseline``: ``(init_params, cfg, *, teachers, records)``, no step and no query.

Example:
  >>> from dfml_jax.methods import METHODS
  >>> METHODS["naive_kd"].configure().synth, METHODS["white_box"].configure().white_box
  ('noise', True)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, NamedTuple

from dfml_jax.bidf_mkd.baselines import baseline_method, run_baseline
from dfml_jax.bidf_mkd.config import BiDfExperimentConfig
from dfml_jax.bidf_mkd.train import BiDfMKDConfig, bidf_mkd_method, train_bidf_mkd
from dfml_jax.distill.dfme import DFMEConfig, dfme_method, run_dfme
from dfml_jax.distill.ideal import IDEALConfig, ideal_method, run_pool_distillation
from dfml_jax.distill.naive import run_naive_kd

__all__ = ["MethodEntry", "METHODS", "FAMILIES"]

FAMILIES = ("distill", "meta", "baseline")


class MethodEntry(NamedTuple):
    """How to configure, build and run one method.

    Attributes:
      name: the registry key.
      family: ``"distill"``, ``"meta"`` or ``"baseline"`` (the builder's arguments).
      config: the config class.
      changes: config fields that make this method out of its config.
      build: the builder (arguments by family) returning a :class:`~dfml_jax.training.run_loop.Method`.
      run: the public function that builds and runs it.
      description: one line.
    """
    name: str
    family: str
    config: type
    changes: Dict[str, Any]
    build: Callable[..., Any]
    run: Callable[..., Any]
    description: str

    def configure(self, base: Any = None, **overrides):
        """The method's config: ``base`` (default: the config class's defaults) with this
        entry's ``changes`` and then ``overrides`` applied.

        Args:
          base: a config of :attr:`config`'s class, or None.
          overrides: further field values.

        Returns:
          The config.
        """
        base = self.config() if base is None else base
        return dataclasses.replace(base, **{**self.changes, **overrides})


def _entry(name, family, config, build, run, description, **changes) -> MethodEntry:
    return MethodEntry(name, family, config, changes, build, run, description)


METHODS: Dict[str, MethodEntry] = {e.name: e for e in (
    _entry("ideal", "distill", IDEALConfig, ideal_method, run_pool_distillation,
           "IDEAL: generator against the student, each synthetic sample's label bought once",
           synth="generator"),
    _entry("naive_kd", "distill", IDEALConfig, ideal_method, run_naive_kd,
           "NaiveKD: noise images labelled by the teacher", synth="noise"),
    _entry("dfme", "distill", DFMEConfig, dfme_method, run_dfme,
           "DFME: min-max game on recovered logits, zero-order generator gradients"),
    _entry("bidf_mkd", "meta", BiDfMKDConfig, bidf_mkd_method, train_bidf_mkd,
           "BiDf-MKD: zero-order inversion of a pool of APIs, bi-level KD, memory replay"),
    _entry("white_box", "meta", BiDfMKDConfig, bidf_mkd_method, train_bidf_mkd,
           "BiDf-MKD with true gradients through the teachers (upper bound)", white_box=True),
    _entry("maml_real", "meta", BiDfMKDConfig, bidf_mkd_method, train_bidf_mkd,
           "MAML on real meta-train tasks (upper bound), no API", replay_source="real"),
    _entry("maml_pool_data", "meta", BiDfMKDConfig, bidf_mkd_method, train_bidf_mkd,
           "MAML on real tasks of the classes the pool's teachers saw (upper bound), no API",
           replay_source="real"),
    *(_entry(n, "baseline", BiDfExperimentConfig, functools.partial(baseline_method, n),
             functools.partial(run_baseline, n), d) for n, d in (
        ("random", "the randomly initialised meta-model"),
        ("random_scaled", "the random init, every kernel scaled by 1/sqrt(num_apis)"),
        ("average", "the average of the teachers' weights (white-box)"))),
)}
