"""Moved to :mod:`dfml_jax.api`; this shim keeps old imports working."""
from dfml_jax.api import (OUTPUT_MODES, APIGroup, BlackBoxAPI, BlackBoxError, BlackBoxGradientError,
                          QueryBudgetExceeded, QueryLedger, group_apis, record_api_error,
                          scores_to_outputs, surface_api_errors)

__all__ = [
    "APIGroup", "group_apis", "BlackBoxAPI", "BlackBoxError", "BlackBoxGradientError",
    "OUTPUT_MODES", "QueryBudgetExceeded", "QueryLedger", "record_api_error", "scores_to_outputs",
    "surface_api_errors",
]
