"""Moved to :mod:`dfml_jax.teachers.store`; this shim keeps old imports working."""
from dfml_jax.teachers.store import (MANIFEST, POOL_FORMAT, POOL_FORMAT_VERSION,
                                     check_new_directory, load_pool, load_white_box_teachers,
                                     read_manifest, write_pool)

__all__ = [
    "POOL_FORMAT", "POOL_FORMAT_VERSION", "MANIFEST", "write_pool", "read_manifest", "load_pool",
    "load_white_box_teachers", "check_new_directory",
]
