"""PyTorch-semantics optimisers and schedules shared by the training loops.

:func:`torch_sgd` is ``torch.optim.SGD`` (decay added to the gradient, then heavy-ball momentum)
as an optax transformation; :func:`multistep_schedule` is ``MultiStepLR`` on steps.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax.numpy as jnp
import optax

__all__ = ["torch_sgd", "multistep_schedule"]


def torch_sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 0.0
              ) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)``: decay added to the gradient, then momentum.

    Args:
      learning_rate: a float or an optax schedule (a function of the step count).
      momentum: heavy-ball momentum (PyTorch convention, no dampening, not Nesterov).
      weight_decay: L2 coefficient added to the gradient of every parameter (biases and BN too,
        like PyTorch's default parameter group).

    Calls with the same hashable arguments return the same object (so jitted steps closing over
    it are shared between runs).
    """
    try:
        return _torch_sgd_cached(learning_rate, momentum, weight_decay)
    except TypeError:  # unhashable learning rate (an array)
        return _torch_sgd(learning_rate, momentum, weight_decay)


@functools.lru_cache(maxsize=64)
def _torch_sgd_cached(learning_rate, momentum, weight_decay):
    return _torch_sgd(learning_rate, momentum, weight_decay)


def _torch_sgd(learning_rate, momentum, weight_decay):
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum or None))
    return optax.chain(*parts)


def multistep_schedule(base: float, boundaries: Sequence[int], scale: float) -> Callable:
    """``base * scale ** #{b in boundaries: step >= b}`` (PyTorch ``MultiStepLR`` on steps).

    >>> s = multistep_schedule(0.1, [2, 4], 0.5)
    >>> [round(float(s(i)), 4) for i in range(5)]
    [0.1, 0.1, 0.05, 0.05, 0.025]
    """
    if not boundaries:
        return lambda count: jnp.asarray(base, jnp.float32)
    bounds = jnp.asarray(sorted(int(b) for b in boundaries), jnp.int32)

    def schedule(count):
        passed = jnp.sum((count >= bounds).astype(jnp.int32))
        return jnp.asarray(base, jnp.float32) * jnp.asarray(scale, jnp.float32) ** passed

    return schedule
