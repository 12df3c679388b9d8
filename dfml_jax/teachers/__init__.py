"""Teachers: pools of pre-trained black-box teachers for the SS / SH / MH scenarios.

A pool (``shared/specs/bidf_mkd.md`` section 1.1) is a set of teachers, each an N-way classifier
(N = 5 by default) on N classes drawn uniformly without replacement from the meta-train split of
its dataset, independently per teacher (so classes overlap across teachers). Each class's images
are split 80/20 in order: the first 80 % train the teacher, the last 20 % measure its held-out
accuracy. Scenarios:

* ``SS``: one dataset, one architecture (e.g. 100 Conv4 teachers);
* ``SH``: one dataset, several architectures (default Conv4, ResNet-10, ResNet-18);
* ``MH``: several datasets and architectures.

``num_apis`` teachers are trained for every (dataset, architecture) group, as in the official
code's ``--APInum`` (an SH pool with 3 architectures and ``num_apis=100`` holds 300 teachers).
Teachers of one group train together as a population, one jitted epoch for up to
``max_population`` of them (:func:`dfml_jax.teachers.population.train_population`; vectorised with
``vmap`` on accelerators, a compiled loop on CPU where that is faster). ``devices`` splits each
population's teacher axis over several devices (``shard_map`` on a ``"teachers"`` mesh; default:
all local devices, lowered per population to the largest count that divides it).

The on-disk format (``pool.json`` and the per-group orbax checkpoints, verified on load) is
described in :mod:`dfml_jax.teachers.store`.

:func:`load_pool` returns an :class:`APIPool` of :class:`~dfml_jax.api.BlackBoxAPI` objects
(output mode chosen at load time); algorithms never see parameters. White-box access for
baselines is the separate :func:`load_white_box_teachers`.

Pools describe themselves: :func:`build_pool` records in ``pool.json`` its ``build_spec``
(:func:`pool_spec`: scenario, datasets, architectures, teachers per group, way, seed, train
fraction, model and dataset options, every group's training recipe with its augmentation, the
content key of every dataset (:func:`dfml_jax.data.content_key`, which for Glyphs covers the
rendering and the font bytes), the pool format and trainer versions) and ``build_key``, its
SHA-256 (:func:`pool_key`). Whoever reuses a pool automatically compares keys
(:func:`check_pool_key`; :func:`obtain_pool` builds into ``<parent>/pool-<key>`` and reuses only
an equal key, as the BiDf-MKD experiment runner does): a pool built from other inputs is never
silently reused. Pools written
before keys existed record none; :func:`load_pool` still reads them, but their key is unknown.
How the teachers are split into populations, over devices and the strategy do not enter the key
(the weights do not depend on them beyond float reassociation).

Input convention of the APIs (``input_space``): ``"normalized"`` (default, as in BiDf-MKD: the
caller normalises with ``pool.mean``/``pool.std`` after augmentation and queries with the result)
or ``"raw"`` (the API takes [0, 1] images and normalises internally; needed for MH pools whose
datasets use different statistics).

This package is the public entry point and re-exports the names of its modules, whose imports
point one way: :mod:`dfml_jax.teachers.types` (scenarios, trained groups) <-
:mod:`dfml_jax.teachers.store` (on-disk format, write, load) <- :mod:`dfml_jax.teachers.keys`
(build spec and key) <- :mod:`dfml_jax.teachers.build` (training the groups, building and
obtaining pools); :mod:`dfml_jax.teachers.recipe` (training recipes) <-
:mod:`dfml_jax.teachers.population` (population training). The pool type itself,
:class:`~dfml_jax.api.APIPool`, lives in :mod:`dfml_jax.api` (re-exported here).
"""
from __future__ import annotations

from dfml_jax.api.pool import APIPool, PoolError, WhiteBoxTeacher, format_summary
from dfml_jax.teachers.build import (build_pool, check_devices, obtain_pool, population_sizes,
                                     train_group)
from dfml_jax.teachers.keys import (POOL_KEY_VERSION, PoolKeyError, check_pool_key, pool_key,
                                    pool_spec, spec_differences, split_fingerprint)
from dfml_jax.teachers.store import (POOL_FORMAT, POOL_FORMAT_VERSION, load_pool,
                                     load_white_box_teachers, read_manifest, write_pool)
from dfml_jax.teachers.types import DEFAULT_ARCHS, SCENARIOS, TrainedGroup

__all__ = [
    "POOL_FORMAT", "POOL_FORMAT_VERSION", "SCENARIOS", "DEFAULT_ARCHS", "PoolError", "APIPool",
    "WhiteBoxTeacher", "TrainedGroup", "build_pool", "train_group", "write_pool", "load_pool",
    "load_white_box_teachers", "read_manifest", "format_summary", "check_devices",
    "population_sizes", "pool_spec", "pool_key", "spec_differences", "check_pool_key",
    "PoolKeyError", "POOL_KEY_VERSION", "obtain_pool", "split_fingerprint",
]
