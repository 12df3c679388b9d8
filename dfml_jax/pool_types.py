"""Moved to :mod:`dfml_jax.api.pool` (the pool type) and :mod:`dfml_jax.teachers.types` (scenarios,
trained groups); this shim keeps old imports working."""
from dfml_jax.api.pool import INPUT_SPACES, APIPool, PoolError, WhiteBoxTeacher, format_summary
from dfml_jax.teachers.types import (DEFAULT_ARCHS, SCENARIOS, TrainedGroup, check_choices,
                                     resolve_archs, validate_scenario)

__all__ = [
    "INPUT_SPACES", "PoolError", "APIPool", "WhiteBoxTeacher", "format_summary", "SCENARIOS",
    "DEFAULT_ARCHS", "TrainedGroup", "check_choices", "validate_scenario", "resolve_archs",
]
