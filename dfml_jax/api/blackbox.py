"""The :class:`BlackBoxAPI`: a teacher reachable only by queries, counted by its ledger.

Built with :meth:`BlackBoxAPI.from_host` (any host callable, a ``jax.pure_callback`` under
``jit``) or :meth:`BlackBoxAPI.from_jax` (an in-graph forward pass whose outputs alone cross to
the host to be charged). See :mod:`dfml_jax.api` for the whole boundary; several APIs of one
signature are answered by one compiled graph through :class:`dfml_jax.api.group.APIGroup`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.api.errors import (BlackBoxError, QueryBudgetExceeded, gradient_refusal,
                                 record_api_error)
from dfml_jax.api.ledger import QueryLedger
from dfml_jax.api.outputs import OUTPUT_MODES, SCORE_KINDS, scores_to_outputs

__all__ = ["BlackBoxAPI"]


class BlackBoxAPI:
    """A teacher reachable only by queries. Build with :meth:`from_host` or :meth:`from_jax`.

    Attributes:
      name: human-readable name used in errors and logs.
      input_shape: shape of one input sample, e.g. ``(32, 32, 3)``.
      num_classes: number of output classes K.
      output: the output mode, one of :data:`OUTPUT_MODES`.
      k: for ``output="topk"``, how many classes are revealed.
      ledger: the :class:`QueryLedger` counting answered samples.
    """

    def __init__(self, *, name: str, input_shape: Sequence[int], num_classes: int, output: str,
                 k: Optional[int], decimals: Optional[int], budget: Optional[int],
                 host_fn: Optional[Callable] = None, scores_kind: str = "logits",
                 jax_fn: Optional[Callable] = None, params=None):
        if output not in OUTPUT_MODES:
            raise ValueError(f"unknown output mode {output!r}; valid: {OUTPUT_MODES}")
        if output == "topk":
            if k is None or not 1 <= int(k) <= num_classes:
                raise ValueError(f"output='topk' needs 1 <= k <= num_classes={num_classes}, got k={k}")
        elif k is not None:
            raise ValueError(f"k is only used with output='topk' (got output={output!r}, k={k})")
        if scores_kind not in SCORE_KINDS:
            raise ValueError(f"scores must be one of {SCORE_KINDS}, got {scores_kind!r}")
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.output = output
        self.k = None if k is None else int(k)
        self.decimals = decimals
        self.ledger = QueryLedger(name, budget)
        self._host_fn = host_fn
        self._scores_kind = scores_kind
        self._params = params  # private: only read by the in-graph forward and by APIGroup
        self._jax_fn = jax_fn if params is None else (lambda x: jax_fn(params, x))
        self._shared_fn = jax_fn if params is not None else None
        self._call = self._build_call()

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_host(cls, fn: Callable[[np.ndarray], np.ndarray], input_shape: Sequence[int],
                  num_classes: int, *, output: str = "logits", k: Optional[int] = None,
                  scores: str = "logits", decimals: Optional[int] = None,
                  budget: Optional[int] = None, name: Optional[str] = None) -> "BlackBoxAPI":
        """Wrap a host callable as a black-box API.

        Args:
          fn: maps a float32 NumPy batch ``(n, *input_shape)`` to scores ``(n, num_classes)``.
          input_shape: shape of one sample.
          num_classes: number of classes K.
          output: what the API reveals: ``"logits"``, ``"probs"``, ``"label"`` or ``"topk"``.
          k: number of classes revealed with ``output="topk"``.
          scores: what ``fn`` returns, ``"logits"`` (default) or ``"probs"``.
          decimals: round revealed scores to this many decimals, as real APIs do.
          budget: maximum number of answered samples (None: unlimited).
          name: name for errors and logs.

        Returns:
          A :class:`BlackBoxAPI`.
        """
        name = name or getattr(fn, "__name__", "host_api")
        return cls(name=name, input_shape=input_shape, num_classes=num_classes, output=output, k=k,
                   decimals=decimals, budget=budget, host_fn=fn, scores_kind=scores)


    @classmethod
    def from_jax(cls, apply_fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int],
                 num_classes: int, *, output: str = "logits", k: Optional[int] = None,
                 scores: str = "logits", decimals: Optional[int] = None,
                 budget: Optional[int] = None, name: Optional[str] = None,
                 params=None) -> "BlackBoxAPI":
        """Wrap a jittable teacher forward pass (a closure over parameters) as a black-box API.

        The forward pass is compiled into the caller's graph (fast path for simulated teachers);
        only the final outputs cross to the host, where the ledger charges them. Same counting,
        output modes and gradient refusal as :meth:`from_host`.

        Args:
          apply_fn: maps ``(n, *input_shape)`` float32 to scores ``(n, num_classes)``; or, with
            ``params``, ``apply_fn(params, x)``. Teachers that share one ``apply_fn`` and hold
            their own ``params`` can be answered by one compiled graph through :class:`APIGroup`.
          input_shape, num_classes, output, k, scores, decimals, budget, name: as in
            :meth:`from_host`.
          params: the teacher's parameters, held privately by the API (never returned).

        Returns:
          A :class:`BlackBoxAPI`.
        """
        name = name or getattr(apply_fn, "__name__", "jax_api")
        return cls(name=name, input_shape=input_shape, num_classes=num_classes, output=output, k=k,
                   decimals=decimals, budget=budget, jax_fn=apply_fn, scores_kind=scores,
                   params=params)

    # ----------------------------------------------------------------- ledger shortcuts
    @property
    def queries(self) -> int:
        """Samples answered so far (complete once the outputs of earlier calls are ready)."""
        return self.ledger.answered

    @property
    def host_calls(self) -> int:
        """Number of host round-trips that answered samples."""
        return self.ledger.host_calls

    @property
    def budget(self) -> Optional[int]:
        return self.ledger.budget

    @property
    def remaining(self) -> Optional[int]:
        return self.ledger.remaining

    def reserve(self, n: int):
        """Reserve ``n`` queries before a jitted step (see :meth:`QueryLedger.reserve`)."""
        return self.ledger.reserve(n)

    @property
    def is_hard_label(self) -> bool:
        return self.output == "label"

    def require_output(self, allowed: Sequence[str], algorithm: str) -> None:
        """Refuse an API whose output mode an algorithm cannot work with.

        Args:
          allowed: output modes the algorithm supports.
          algorithm: the algorithm's name, for the message.
        """
        if self.output not in allowed:
            raise ValueError(
                f"{algorithm} cannot work with API '{self.name}', which returns {self.output!r}; "
                f"it needs one of {tuple(allowed)}. Build the API with output={allowed[0]!r} or "
                "choose an algorithm for this output mode.")

    @property
    def output_shape(self) -> tuple:
        return () if self.output == "label" else (self.num_classes,)

    @property
    def output_dtype(self):
        return jnp.int32 if self.output == "label" else jnp.float32

    def __repr__(self):
        b = "unlimited" if self.budget is None else self.budget
        return (f"BlackBoxAPI(name={self.name!r}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, output={self.output!r}, queries={self.queries}, "
                f"budget={b})")

    # ----------------------------------------------------------------- calling
    def __call__(self, x) -> jax.Array:
        """Query the API on ``x`` of shape ``(..., *input_shape)``.

        Returns ``(..., num_classes)`` float32 scores, or ``(...,)`` int32 labels for
        ``output="label"``. Works eagerly and under ``jit``, ``vmap`` (nested) and ``lax.scan``.
        """
        x = self._check_input(x)
        return self._call(x)

    def _check_input(self, x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        nd = len(self.input_shape)
        if tuple(x.shape[x.ndim - nd:]) != self.input_shape or x.ndim < nd:
            raise ValueError(
                f"API '{self.name}' expects inputs of shape (..., {', '.join(map(str, self.input_shape))})"
                f" but got {tuple(x.shape)}; resize or reshape the batch (NHWC, float32).")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"API '{self.name}' expects floating-point inputs but got dtype {x.dtype}; "
                "convert images with x.astype(jnp.float32) / 255.")
        return x

    def _validate(self, out: np.ndarray, n: int) -> np.ndarray:
        out = np.asarray(out)
        expected = (n, self.num_classes)
        if out.shape != expected:
            raise BlackBoxError(
                f"API '{self.name}' returned scores of shape {out.shape} for a batch of {n} "
                f"samples; expected {expected}. Check the wrapped function's output.")
        if not np.all(np.isfinite(out)):
            bad = int(np.sum(~np.isfinite(out).all(axis=-1)))
            raise BlackBoxError(
                f"API '{self.name}' returned NaN or inf for {bad} of {n} samples; nothing was "
                "charged. Check the inputs' range and the service's health.")
        return out.astype(np.float32)

    def _host_answer(self, x: np.ndarray) -> np.ndarray:
        """Host side: flatten leading dims, ask the wrapped function, validate, charge, convert."""
        lead = x.shape[: x.ndim - len(self.input_shape)]
        n = int(np.prod(lead, dtype=np.int64)) if lead else 1
        try:
            self.ledger.check(n)
            flat = np.ascontiguousarray(np.asarray(x, np.float32).reshape((n,) + self.input_shape))
            try:
                raw = self._host_fn(flat)
            except BlackBoxError:  # already names the API (e.g. remote errors): keep its type
                raise
            except Exception as e:  # surfaces with the API's name; not charged
                raise BlackBoxError(f"API '{self.name}' failed: {type(e).__name__}: {e}") from e
            scores = self._validate(raw, n)
            out = scores_to_outputs(scores, self._scores_kind, self.output, self.k, self.decimals, np)
            self.ledger.charge(n)
        except (BlackBoxError, QueryBudgetExceeded) as e:
            record_api_error(e)
            raise
        return out.reshape(lead + self.output_shape)

    def _build_call(self):
        api = self

        def host_path(x):
            lead = x.shape[: x.ndim - len(api.input_shape)]
            shape = jax.ShapeDtypeStruct(lead + api.output_shape, api.output_dtype)
            x = x.astype(jnp.float32)
            if not isinstance(x, jax.core.Tracer):  # eager: call directly, clean Python errors
                return jnp.asarray(api._host_answer(np.asarray(x)))
            return jax.pure_callback(api._host_answer, shape, x, vmap_method="expand_dims")

        def forward(x):
            lead = x.shape[: x.ndim - len(api.input_shape)]
            flat = x.astype(jnp.float32).reshape((-1,) + api.input_shape)
            scores = api._jax_fn(flat)
            out = scores_to_outputs(scores, api._scores_kind, api.output, api.k, api.decimals, jnp)
            return out.reshape(lead + api.output_shape)

        eager_forward = jax.jit(forward)

        def jax_path(x):
            if not isinstance(x, jax.core.Tracer):  # eager: compiled forward, then charge
                return jnp.asarray(api._charge_outputs(np.asarray(eager_forward(x))))
            out = forward(x)
            # Only the small (.., K) outputs cross to the host, where every answered sample is
            # charged; the teacher's forward pass stays in the caller's compiled graph.
            shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
            return jax.pure_callback(api._charge_outputs, shape, out, vmap_method="expand_dims")

        fn = jax_path if self._jax_fn is not None else host_path

        @jax.custom_jvp
        def call(x):
            return fn(x)

        @call.defjvp
        def _refuse(primals, tangents):
            raise gradient_refusal(api.name)

        return call

    def _charge_outputs(self, out: np.ndarray) -> np.ndarray:
        """Host side of the in-graph path: validate and charge already-computed outputs."""
        out = np.asarray(out)
        lead = out.shape[: out.ndim - len(self.output_shape)]
        n = int(np.prod(lead, dtype=np.int64)) if lead else 1
        try:
            if out.dtype != np.int32 and not np.all(np.isfinite(out)):
                raise BlackBoxError(f"API '{self.name}' produced NaN or inf outputs; nothing was charged.")
            self.ledger.charge(n)
        except (BlackBoxError, QueryBudgetExceeded) as e:
            record_api_error(e)
            raise
        return out
