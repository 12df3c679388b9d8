"""Moved to :mod:`dfml_jax.api.group`; this shim keeps old imports working."""
from dfml_jax.api.group import APIGroup, group_apis

__all__ = ["APIGroup", "group_apis"]
