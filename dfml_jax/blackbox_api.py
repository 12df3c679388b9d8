"""Moved to :mod:`dfml_jax.api.blackbox`; this shim keeps old imports working."""
from dfml_jax.api.blackbox import BlackBoxAPI

__all__ = ["BlackBoxAPI"]
