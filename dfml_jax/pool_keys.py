"""Moved to :mod:`dfml_jax.teachers.keys`; this shim keeps old imports working."""
from dfml_jax.teachers.keys import (POOL_KEY_VERSION, PoolKeyError, check_pool_key, custom_data_key,
                                    pool_key, pool_spec, spec_differences, split_fingerprint)

__all__ = [
    "POOL_KEY_VERSION", "PoolKeyError", "pool_spec", "pool_key", "spec_differences",
    "check_pool_key", "split_fingerprint", "custom_data_key",
]
