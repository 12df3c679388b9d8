"""Classification and distillation losses on logits and black-box outputs.

KD losses take the teacher's *probabilities* (see :func:`teacher_probs` to turn any API output
mode into probabilities) and the student's logits.

References:
  Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
  Hu et al., "Learning to Learn from APIs: Black-Box Data-Free Meta-Learning" (BiDf-MKD),
  arXiv:2305.18413 (the official code's KD loss is reproduced by :func:`kd_paper`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "accuracy", "kd_kl", "kd_paper", "KD_LOSSES", "teacher_probs"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer ``labels`` (n,) under ``logits`` (n, K).

    >>> float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log 4
    1.386...
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose argmax equals the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def kd_kl(student_logits: jax.Array, teacher_p: jax.Array) -> jax.Array:
    """Standard distillation loss KL(p_teacher || p_student), summed over classes, batch mean.

    Args:
      student_logits: (n, K) student logits.
      teacher_p: (n, K) teacher probabilities.

    Returns:
      Scalar loss (zero when the student matches the teacher).
    """
    logp_s = jax.nn.log_softmax(student_logits, axis=-1)
    return jnp.mean(jnp.sum(jax.scipy.special.xlogy(teacher_p, teacher_p) - teacher_p * logp_s, -1))


def kd_paper(student_logits: jax.Array, teacher_p: jax.Array) -> jax.Array:
    """The official BiDf-MKD code's KD loss, ``F.kl_div(softmax(s), softmax(t))``.

    PyTorch's ``kl_div`` expects log-probabilities as input; the code passes probabilities, so the
    student enters linearly: ``mean_{n,c} p_t (log p_t - p_s)`` (element-wise mean over n*K). Kept
    for comparison with the paper's numbers; prefer :func:`kd_kl`.
    """
    p_s = jax.nn.softmax(student_logits, axis=-1)
    return jnp.mean(jax.scipy.special.xlogy(teacher_p, teacher_p) - teacher_p * p_s)


KD_LOSSES = {"kl": kd_kl, "paper": kd_paper}


def teacher_probs(outputs: jax.Array, output_mode: str, num_classes: int) -> jax.Array:
    """Probabilities from an API's outputs in any mode.

    Args:
      outputs: API outputs: logits/probs/topk ``(n, K)`` or labels ``(n,)``.
      output_mode: the API's ``output`` attribute.
      num_classes: K.

    Returns:
      ``(n, K)`` probabilities (one-hot for hard labels; top-k mass renormalised).
    """
    if output_mode == "logits":
        return jax.nn.softmax(outputs, axis=-1)
    if output_mode == "probs":
        return outputs
    if output_mode == "topk":
        return outputs / jnp.clip(outputs.sum(-1, keepdims=True), 1e-12, None)
    if output_mode == "label":
        return jax.nn.one_hot(outputs, num_classes)
    raise ValueError(f"unknown output mode {output_mode!r}")
