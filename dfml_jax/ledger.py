"""Moved to :mod:`dfml_jax.api.ledger`; this shim keeps old imports working."""
from dfml_jax.api.ledger import QueryLedger

__all__ = ["QueryLedger"]
