"""Matmul + convolution FLOPs of a JAX function, counted on its jaxpr (benchmarks' bounds).

XLA's compiled ``cost_analysis()`` counts the body of a loop once; here a ``lax.scan`` counts
``length`` times, ``cond`` its most expensive branch, and a ``while`` loop (trip count unknown)
once, with ``exact=False``. Elementwise work is not counted: the number is what the row's
matmuls and convolutions need, the part no implementation of the same mathematics avoids.

    >>> import jax, jax.numpy as jnp
    >>> a = jnp.ones((8, 4)); w = jnp.ones((4, 3))
    >>> step_flops(lambda a, w: jax.lax.scan(lambda c, _: (c, a @ w), 0, None, length=5)[1], a, w)
    (960.0, True)
"""
from __future__ import annotations

import math

import jax

__all__ = ["jaxpr_flops", "step_flops"]


def _eqn_flops(eqn) -> tuple[float, bool]:
    """Matmul/convolution FLOPs (2 x multiply-adds) of one jaxpr equation, sub-jaxprs included."""
    name, prm = eqn.primitive.name, eqn.params
    if name == "dot_general":
        (lc, _), _ = prm["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc), True
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_dim = prm["dimension_numbers"].rhs_spec[0]
        per_out = math.prod(rhs) / rhs[out_dim]
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out, True
    if name == "scan":
        f, exact = jaxpr_flops(prm["jaxpr"])
        return f * prm["length"], exact
    if name == "while":
        f, _ = jaxpr_flops(prm["body_jaxpr"])
        return f, False             # trip count unknown: counted once
    if name == "cond":
        counts = [jaxpr_flops(b) for b in prm["branches"]]
        return max(c[0] for c in counts), all(c[1] for c in counts)
    total, exact = 0.0, True
    for v in prm.values():
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
            if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                f, e = jaxpr_flops(sub)
                total, exact = total + f, exact and e
    return total, exact


def jaxpr_flops(jaxpr) -> tuple[float, bool]:
    """``(flops, exact)``: matmul + convolution FLOPs of a (closed) jaxpr, scans times their
    length (XLA's cost analysis counts a loop body once); ``exact`` is False if a while loop was
    counted once."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total, exact = 0.0, True
    for eqn in jaxpr.eqns:
        f, e = _eqn_flops(eqn)
        total, exact = total + f, exact and e
    return total, exact


def step_flops(fn, *args):
    """Matmul + convolution FLOPs of one call of ``fn(*args)`` (traced, nothing executed)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))
