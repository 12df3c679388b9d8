"""Groups of black-box APIs answered in one call: :class:`APIGroup` and :func:`group_apis`.

A jitted algorithm written against one :class:`~dfml_jax.api.blackbox.BlackBoxAPI` compiles once
per API; written against an :class:`APIGroup` it compiles once for the whole group and selects
the member by a traced index, each member still charging its own ledger.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.api.blackbox import BlackBoxAPI
from dfml_jax.api.errors import BlackBoxError, gradient_refusal, record_api_error
from dfml_jax.api.outputs import scores_to_outputs

__all__ = ["APIGroup", "group_apis"]


class APIGroup:
    """Several APIs of one signature, answered by ONE compiled graph selected by a traced index.

    A jitted algorithm written against a single :class:`BlackBoxAPI` is compiled once per API
    (each API is a different closure). For a pool of many APIs, write the step against a group
    instead: ``group(index, x, operand)`` with ``index`` a traced int32 and ``operand`` the
    group's opaque :attr:`operand`, passed through unchanged. Every answered sample is charged to
    the selected member's own ledger, and gradients are refused exactly as for a single API.

    * Host APIs (:meth:`BlackBoxAPI.from_host`): one ``pure_callback`` dispatches to the member.
    * In-graph APIs built with ``from_jax(apply_fn, ..., params=p)`` sharing one ``apply_fn``:
      the members' parameters are stacked into :attr:`operand` (an opaque pytree the algorithm
      passes along without reading) and the forward pass gathers the selected member's slice.

    ``jax.vmap`` over the index queries several members at once (one host call in which each
    member answers, and is charged for, its own samples): how BiDf-MKD visits several APIs per
    step.

    Args:
      apis: members; same ``input_shape``, ``num_classes``, ``output``, ``k``, ``decimals``.

    Example:
      >>> import numpy as np, jax, jax.numpy as jnp
      >>> f = lambda p, x: x.reshape(len(x), -1) @ p
      >>> apis = [BlackBoxAPI.from_jax(f, (2,), 3, params=jnp.eye(2, 3) * i) for i in range(3)]
      >>> g = APIGroup(apis)
      >>> step = jax.jit(lambda i, x, op: g(i, x, op))
      >>> step(2, jnp.ones((4, 2)), g.operand).tolist()[0], [a.queries for a in apis]
      ([2.0, 2.0, 0.0], [0, 0, 4])
    """

    def __init__(self, apis: Sequence[BlackBoxAPI]):
        apis = list(apis)
        if not apis:
            raise ValueError("APIGroup needs at least one API")
        sig = lambda a: (a.input_shape, a.num_classes, a.output, a.k, a.decimals)
        for a in apis[1:]:
            if sig(a) != sig(apis[0]):
                raise ValueError(
                    f"APIGroup members must share input shape, classes and output mode: "
                    f"'{a.name}' has {sig(a)}, '{apis[0].name}' has {sig(apis[0])}. Group APIs "
                    "by signature (e.g. one group per architecture/dataset).")
        self.apis = apis
        first = apis[0]
        self.input_shape, self.num_classes, self.output = first.input_shape, first.num_classes, first.output
        self.k = first.k
        if len(apis) == 1 and apis[0]._shared_fn is None:
            self.kind = "single"  # any API: answered by its own call, the index is ignored
            self.operand = None
        elif all(a._host_fn is not None for a in apis):
            self.kind = "host"
            self.operand = None
        elif all(a._shared_fn is not None and a._shared_fn is first._shared_fn for a in apis):
            self.kind = "jax"
            self.operand = jax.tree.map(lambda *xs: jnp.stack(xs), *[a._params for a in apis])
        else:
            raise ValueError(
                "APIGroup members must all be host APIs, or in-graph APIs built with "
                "from_jax(apply_fn, ..., params=...) sharing the same apply_fn.")
        self._call = self._build()

    def __len__(self):
        return len(self.apis)

    def __getitem__(self, i) -> BlackBoxAPI:
        return self.apis[i]

    @property
    def output_shape(self):
        return self.apis[0].output_shape

    @property
    def output_dtype(self):
        return self.apis[0].output_dtype

    @property
    def queries(self) -> int:
        return int(sum(a.queries for a in self.apis))

    def require_output(self, allowed: Sequence[str], algorithm: str) -> None:
        self.apis[0].require_output(allowed, algorithm)

    def __call__(self, index, x, operand=None):
        """Query member ``index`` (traced int) on ``x`` ``(..., *input_shape)``."""
        x = self.apis[0]._check_input(x)
        index = jnp.asarray(index, jnp.int32)
        if index.ndim != 0:
            raise ValueError("APIGroup index must be a scalar (vmap over it if needed)")
        return self._call(index, x, operand)

    def _member_at(self, i) -> BlackBoxAPI:
        if not 0 <= int(i) < len(self.apis):
            raise BlackBoxError(f"APIGroup index {int(i)} out of range [0, {len(self.apis)})")
        return self.apis[int(i)]

    def _dispatch(self, idx, arr, tail_ndim: int, answer: Callable, out_tail: tuple, dtype):
        """Route each sample of one host call to its member (a vmapped index may address several
        members at once: ``vmap`` over the index adds leading axes to ``idx`` and ``arr``).
        Every member answers its own samples in one call and charges its own ledger."""
        idx = np.asarray(idx)
        lead = arr.shape[: arr.ndim - tail_ndim]
        try:
            members = np.unique(idx)
            if len(members) == 1:
                return answer(self._member_at(members[0]), arr)
            if idx.ndim > len(lead):
                raise BlackBoxError(f"APIGroup index of shape {idx.shape} does not match a batch "
                                    f"of shape {lead}")
            idx_b = np.broadcast_to(idx.reshape(idx.shape + (1,) * (len(lead) - idx.ndim)), lead)
            for m in members:
                self._member_at(m)
        except BlackBoxError as e:
            record_api_error(e)
            raise
        out = np.empty(lead + out_tail, dtype)
        for m in members:
            mask = idx_b == m
            out[mask] = answer(self.apis[int(m)], arr[mask])
        return out

    def _host_dispatch(self, idx, x):
        return self._dispatch(idx, x, len(self.input_shape), lambda a, v: a._host_answer(v),
                              self.output_shape, np.dtype(self.output_dtype))

    def _charge_dispatch(self, idx, out):
        return self._dispatch(idx, out, len(self.output_shape), lambda a, v: a._charge_outputs(v),
                              self.output_shape, out.dtype)

    def _build(self):
        group = self
        shape_of = lambda x: x.shape[: x.ndim - len(group.input_shape)] + group.output_shape

        def host_path(index, x, operand):
            shape = jax.ShapeDtypeStruct(shape_of(x), group.output_dtype)
            return jax.pure_callback(group._host_dispatch, shape, index, x.astype(jnp.float32),
                                     vmap_method="expand_dims")

        def jax_path(index, x, operand):
            if operand is None:
                raise ValueError("this APIGroup answers in-graph: pass group.operand as operand")
            first = group.apis[0]
            lead = x.shape[: x.ndim - len(group.input_shape)]
            params = jax.tree.map(lambda a: a[index], operand)
            flat = x.astype(jnp.float32).reshape((-1,) + group.input_shape)
            scores = first._shared_fn(params, flat)
            out = scores_to_outputs(scores, first._scores_kind, group.output, group.k, first.decimals, jnp)
            out = out.reshape(lead + group.output_shape)
            shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
            return jax.pure_callback(group._charge_dispatch, shape, index, out,
                                     vmap_method="expand_dims")

        def single_path(index, x, operand):
            return group.apis[0]._call(x)

        fn = {"host": host_path, "jax": jax_path, "single": single_path}[self.kind]

        @jax.custom_jvp
        def call(index, x, operand):
            return fn(index, x, operand)

        @call.defjvp
        def _refuse(primals, tangents):
            raise gradient_refusal(group.apis[0].name)

        return call


def group_apis(apis: Sequence[BlackBoxAPI]):
    """Partition APIs into the fewest :class:`APIGroup` s (by signature and kind).

    Returns:
      ``(groups, locate)`` with ``locate[i] = (group index, member index)`` for API ``i``.
    """
    buckets: dict = {}
    for i, a in enumerate(apis):
        kind = "host" if a._host_fn is not None else ("jax", id(a._shared_fn)) if a._shared_fn else ("own", i)
        sig = (a.input_shape, a.num_classes, a.output, a.k, a.decimals, kind)
        buckets.setdefault(sig, []).append(i)
    groups, locate = [], [None] * len(apis)
    for members in buckets.values():
        for m, i in enumerate(members):
            locate[i] = (len(groups), m)
        groups.append(APIGroup([apis[i] for i in members]))
    return groups, locate
