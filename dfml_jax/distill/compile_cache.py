"""Moved to :mod:`dfml_jax.training.compile_cache`; this shim keeps old imports working."""
from dfml_jax.training.compile_cache import memoize_builder, uncommitted

__all__ = ["memoize_builder", "uncommitted"]
