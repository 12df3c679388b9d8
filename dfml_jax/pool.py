"""Moved to :mod:`dfml_jax.teachers` (the pool type: :mod:`dfml_jax.api.pool`); this shim keeps old
imports working."""
from dfml_jax.teachers import (DEFAULT_ARCHS, POOL_FORMAT, POOL_FORMAT_VERSION, POOL_KEY_VERSION,
                               SCENARIOS, APIPool, PoolError, PoolKeyError, TrainedGroup,
                               WhiteBoxTeacher, build_pool, check_devices, check_pool_key,
                               format_summary, load_pool, load_white_box_teachers, obtain_pool,
                               pool_key, pool_spec, population_sizes, read_manifest,
                               spec_differences, split_fingerprint, train_group, write_pool)

__all__ = [
    "POOL_FORMAT", "POOL_FORMAT_VERSION", "SCENARIOS", "DEFAULT_ARCHS", "PoolError", "APIPool",
    "WhiteBoxTeacher", "TrainedGroup", "build_pool", "train_group", "write_pool", "load_pool",
    "load_white_box_teachers", "read_manifest", "format_summary", "check_devices",
    "population_sizes", "pool_spec", "pool_key", "spec_differences", "check_pool_key",
    "PoolKeyError", "POOL_KEY_VERSION", "obtain_pool",
]

#: Former private name of :func:`dfml_jax.teachers.keys.split_fingerprint` (kept for importers).
_split_fingerprint = split_fingerprint
