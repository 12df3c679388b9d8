"""Moved to :mod:`dfml_jax.api.outputs`; this shim keeps old imports working."""
from dfml_jax.api.outputs import OUTPUT_MODES, SCORE_KINDS, scores_to_outputs

__all__ = ["OUTPUT_MODES", "SCORE_KINDS", "scores_to_outputs"]
