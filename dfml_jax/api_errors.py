"""Moved to :mod:`dfml_jax.api.errors`; this shim keeps old imports working."""
from dfml_jax.api.errors import (BlackBoxError, BlackBoxGradientError, QueryBudgetExceeded,
                                 gradient_refusal, record_api_error, surface_api_errors)

__all__ = [
    "BlackBoxError", "BlackBoxGradientError", "QueryBudgetExceeded", "gradient_refusal",
    "record_api_error", "surface_api_errors",
]
