"""The black-box API boundary: the one object through which algorithms reach a teacher.

A :class:`BlackBoxAPI` answers batches of images with scores (logits, probabilities, top-k
probabilities or hard labels). It exposes no parameters and no gradients; every answered sample is
counted on the host by a thread-safe :class:`QueryLedger`, optionally against a budget.

Constructors:

* :meth:`BlackBoxAPI.from_host` wraps any host callable (NumPy, PyTorch, an HTTP client) mapping a
  ``(n, *input_shape)`` float32 batch to ``(n, num_classes)`` scores. Inside ``jax.jit`` it is a
  ``jax.pure_callback(..., vmap_method="expand_dims")``, so a vmapped (even nested) batch of queries
  is ONE host call.
* :func:`dfml_jax.remote.from_http` reaches a model served over the Open Inference Protocol
  (Triton, KServe, MLServer, ``python -m dfml_jax.serve``) through the same host path, with
  batching, bounded retries and pending-answer caching (the client layer sits above this module).
* :meth:`BlackBoxAPI.from_jax` is the in-graph fast path for simulated teachers: the teacher's
  forward pass is compiled into the caller's graph and only the final ``(n, K)`` outputs pass through
  a tiny host callback that charges the ledger (so counting is identical to the host path).

Differentiating through an API raises :class:`BlackBoxGradientError` at trace time: use a
zero-order estimator (``dfml_jax.estimators.zo_objective`` / ``zo_api_outputs``) instead.

Errors raised inside a host callback under ``jit`` surface from XLA as ``JaxRuntimeError``; wrap
the call in :func:`surface_api_errors` (decorator or context manager) to get the original
exception back (``QueryBudgetExceeded``, ``BlackBoxError``...). Eager calls raise it directly.

Example:
  >>> import numpy as np, jax.numpy as jnp
  >>> api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1)[:, :3] * 2.0,
  ...                             input_shape=(2, 2, 1), num_classes=3, output="label", budget=10)
  >>> api(jnp.ones((4, 2, 2, 1))).shape, api.queries
  ((4,), 4)
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections import deque
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "APIGroup",
    "group_apis",
    "BlackBoxAPI",
    "BlackBoxError",
    "BlackBoxGradientError",
    "OUTPUT_MODES",
    "QueryBudgetExceeded",
    "QueryLedger",
    "record_api_error",
    "scores_to_outputs",
    "surface_api_errors",
]

OUTPUT_MODES = ("logits", "probs", "label", "topk")
SCORE_KINDS = ("logits", "probs")


class BlackBoxError(RuntimeError):
    """A black-box API failed: the host function raised or returned an invalid answer."""


class BlackBoxGradientError(TypeError):
    """Raised when an algorithm tries to differentiate through a black-box API."""


class QueryBudgetExceeded(RuntimeError):
    """The query budget of an API does not cover a request.

    Attributes:
      api: name of the API.
      asked: samples requested by the refused call or reservation.
      answered: samples answered (charged) so far.
      left: samples still available (budget - answered - reserved by others).
    """

    def __init__(self, api: str, asked: int, answered: int, left: int, budget: int):
        self.api, self.asked, self.answered, self.left, self.budget = api, asked, answered, left, budget
        super().__init__(
            f"query budget of API '{api}' exceeded: asked for {asked} samples, {answered} of the "
            f"budget of {budget} already answered, {left} left. Raise the budget or stop the run "
            "(nothing was answered or charged for this request).")


# Original exceptions raised inside host callbacks, kept so that `surface_api_errors` can re-raise
# them with their real type instead of XLA's JaxRuntimeError.
_PENDING_ERRORS: deque = deque(maxlen=64)
_PENDING_LOCK = threading.Lock()


def record_api_error(err: BaseException) -> None:
    """Remember an error raised inside a host callback so that :func:`surface_api_errors` can
    re-raise it with its own type (for host-side checks outside this module, e.g. estimators)."""
    with _PENDING_LOCK:
        _PENDING_ERRORS.append(err)


def _pop_error() -> Optional[BaseException]:
    with _PENDING_LOCK:
        err = _PENDING_ERRORS.pop() if _PENDING_ERRORS else None
        _PENDING_ERRORS.clear()
        return err


class _SurfaceErrors(contextlib.ContextDecorator):
    def __enter__(self):
        _pop_error()  # forget stale errors from earlier, unrelated failures
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (BlackBoxError, QueryBudgetExceeded)):
            return False
        original = _pop_error()
        if original is not None and isinstance(exc, jax.errors.JaxRuntimeError):
            raise original from exc
        return False


def surface_api_errors(fn: Optional[Callable] = None):
    """Re-raise errors from black-box host callbacks with their original type.

    Use as a decorator (``@surface_api_errors``) or a context manager
    (``with surface_api_errors(): step(...)``) around jitted code that queries APIs.

    Args:
      fn: optional function to decorate.

    Returns:
      The decorated function, or a context manager when ``fn`` is None.
    """
    if fn is None:
        return _SurfaceErrors()
    return functools.wraps(fn)(_SurfaceErrors()(fn))


class QueryLedger:
    """Thread-safe host-side count of answered samples, with an optional budget and reservations.

    A jitted step that knows how many samples it will query calls :meth:`reserve` first; the budget
    check then happens at the step boundary, before any work, and the step's callbacks draw on the
    reservation. Unreserved queries are checked against the budget when they arrive.
    """

    def __init__(self, name: str, budget: Optional[int] = None):
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        self.name = name
        self.budget = None if budget is None else int(budget)
        self._answered = 0
        self._reserved = 0
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def answered(self) -> int:
        return self._answered

    @property
    def host_calls(self) -> int:
        return self._calls

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def remaining(self) -> Optional[int]:
        """Samples that can still be asked for (None without a budget)."""
        if self.budget is None:
            return None
        return self.budget - self._answered - self._reserved

    def check(self, n: int) -> None:
        """Raise :class:`QueryBudgetExceeded` if ``n`` new unreserved samples do not fit."""
        with self._lock:
            self._check_locked(n, use_reservation=True)

    def _check_locked(self, n: int, use_reservation: bool) -> None:
        if self.budget is None:
            return
        avail = self.budget - self._answered - self._reserved
        if use_reservation:
            avail += self._reserved
        if n > avail:
            raise QueryBudgetExceeded(self.name, n, self._answered, max(avail, 0), self.budget)

    def charge(self, n: int) -> None:
        """Count ``n`` answered samples (reservation first, then budget)."""
        with self._lock:
            self._check_locked(n, use_reservation=True)
            take = min(self._reserved, n)
            self._reserved -= take
            self._answered += n
            self._calls += 1

    def reserve(self, n: int) -> "_Reservation":
        """Reserve ``n`` samples for the next step; raises before any work if they do not fit.

        Returns a handle that is also a context manager: on exit, whatever the step did not use is
        released (so a failed step costs nothing). JAX dispatches asynchronously and callbacks
        charge when they run: block on the step's outputs (``jax.block_until_ready``) inside the
        ``with`` block so that the ledger is complete when the reservation is settled.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of queries ({n})")
        with self._lock:
            self._check_locked(n, use_reservation=False)
            self._reserved += n
            start = self._answered
        return _Reservation(self, n, start)

    def _release(self, n: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - n)

    def state_dict(self) -> dict:
        return {"answered": self._answered, "host_calls": self._calls, "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        """Restore counts from a checkpoint (queries already paid for stay paid for)."""
        with self._lock:
            self._answered = int(state["answered"])
            self._calls = int(state.get("host_calls", 0))


class _Reservation:
    def __init__(self, ledger: QueryLedger, n: int, start: int):
        self.ledger, self.n, self._start = ledger, n, start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        used = self.ledger.answered - self._start
        self.ledger._release(max(self.n - used, 0))
        return False


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
            raise BlackBoxGradientError(
                f"tried to differentiate through black-box API '{api.name}'. A black box gives no "
                "gradients: wrap the objective with a zero-order estimator "
                "(dfml_jax.estimators.zo_objective / zo_api_outputs), or jax.lax.stop_gradient the "
                "API's input if no gradient through it is needed.")

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


def _refusal(name: str) -> BlackBoxGradientError:
    return BlackBoxGradientError(
        f"tried to differentiate through black-box API '{name}'. A black box gives no gradients: "
        "wrap the objective with a zero-order estimator (dfml_jax.estimators.zo_objective / "
        "zo_api_outputs), or jax.lax.stop_gradient the API's input if no gradient through it is "
        "needed.")


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
            raise _refusal(group.apis[0].name)

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
