"""Moved to :mod:`dfml_jax.teachers.build`; this shim keeps old imports working."""
from dfml_jax.teachers.build import (build_pool, check_devices, obtain_pool, population_sizes,
                                     train_group)

__all__ = ["build_pool", "train_group", "obtain_pool", "check_devices", "population_sizes"]
