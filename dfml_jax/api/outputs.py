"""What a black-box API reveals: its output modes, and raw scores converted to them.

:data:`OUTPUT_MODES` are ``"logits"``, ``"probs"``, ``"label"`` and ``"topk"``;
:func:`scores_to_outputs` turns a teacher's raw scores (logits or probabilities) into one of them,
with NumPy on the host or ``jax.numpy`` in a compiled graph. Every API path
(:class:`~dfml_jax.api.BlackBoxAPI`, :class:`~dfml_jax.api.APIGroup`) and the server
(:mod:`dfml_jax.serve`) use it, so a served teacher reveals exactly what a local API would.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["OUTPUT_MODES", "SCORE_KINDS", "scores_to_outputs"]

#: What an API may reveal.
OUTPUT_MODES = ("logits", "probs", "label", "topk")
#: What a teacher's raw scores may be.
SCORE_KINDS = ("logits", "probs")


def scores_to_outputs(scores: np.ndarray, scores_kind: str, output: str, k: Optional[int],
                decimals: Optional[int], xp):
    """Raw scores ``(n, K)`` in the API's output mode, with NumPy (host) or jnp (in graph).

    Shared by every API path and by the server (``dfml_jax.serve``), so a served teacher reveals
    exactly what a local API would.

    Args:
      scores: ``(n, K)`` raw scores. scores_kind: ``"logits"`` or ``"probs"`` (what ``scores`` are).
      output: one of :data:`OUTPUT_MODES`. k: classes kept by ``"topk"``.
      decimals: round the scores to this many decimals (None: no rounding).
      xp: ``numpy`` or ``jax.numpy``.

    Returns:
      ``(n,)`` int32 labels for ``"label"``, else ``(n, K)`` float scores.

    >>> scores_to_outputs(np.array([[0.0, 2.0, 1.0]]), "logits", "label", None, None, np).tolist()
    [1]
    """
    if output == "label":
        return xp.argmax(scores, axis=-1).astype(xp.int32)
    if scores_kind == "logits":
        logits = scores
        z = logits - xp.max(logits, axis=-1, keepdims=True)
        e = xp.exp(z)
        probs = e / xp.sum(e, axis=-1, keepdims=True)
    else:
        probs = scores
        logits = xp.log(xp.clip(probs, 1e-30, None))
    if output == "logits":
        out = logits
    elif output == "probs":
        out = probs
    else:  # topk: probabilities of the k most likely classes, zeros elsewhere
        kth = -xp.sort(-probs, axis=-1)[..., k - 1:k]
        out = xp.where(probs >= kth, probs, 0.0)
    if decimals is not None:
        out = xp.round(out, decimals)
    return out.astype(xp.float32)
