"""One run loop for every method: budgets, evaluation points, checkpoints, progress, results.

A method is a :class:`Method`: functions over its own state, ``init(key) -> state`` and
``step(state, key, index) -> (state, metrics)`` (optax's ``init``/``update`` pairs, evosax's
``ask``/``tell``), plus a few declarations: the queries a step reserves, when the method stops on
its own, how it is evaluated and what of its state is checkpointed. :func:`run` owns the rest,
the same for every method:

* **stopping**: on the method's own step limit (``num_steps``), on the query budget (the step's
  queries are reserved before it runs; a step that cannot be paid for ends the run cleanly, and
  so does :class:`~dfml_jax.api.QueryBudgetExceeded` raised inside a step), or after
  ``max_steps`` steps in total (an interruption, e.g. a simulated kill);
* **evaluation points**: before the first step (``Method.eval_initial``), after the first step
  (``Method.eval_first``), every ``eval_every`` steps, after the last step within each of
  ``eval_budgets`` (so each budget gets its own model selection), after the last step the run can
  make, and once more at the end if the last step was not evaluated; ``on_budget`` adds points at
  the budget crossings (e.g. a copy of the model trained further, no query);
* **checkpoint and resume**: orbax checkpoints (:class:`~dfml_jax.checkpoint.RunCheckpointer`)
  holding the method's arrays, the curve and the API ledgers; a rerun with the same directory
  resumes from the latest one;
* **progress**: a tqdm bar; **results**: the curve and ``result.json`` of a finished run.

Host-side effects a method needs (a purchase log that makes a resume never re-buy a query, a
memory of recovered images) stay inside its ``step`` and state; the loop knows none of them.

Two on-disk layouts are kept, so that checkpoints written before this loop still resume
(:class:`CheckpointLayout`): :data:`STEP_INDEX` (the distillation runs: the orbax step is the index
of the last step, the metadata holds ``curve`` and ``ledger``) and :data:`STEP_COUNT` (BiDf-MKD:
the orbax step is the number of steps done, also stored as ``iteration``; ``history`` and
``ledgers``).

Example (a counter that buys two queries a step from an API with a budget of five):
  >>> import jax.numpy as jnp
  >>> from dfml_jax.api import BlackBoxAPI
  >>> api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1), (1, 1, 2), 2, budget=5)
  >>> def step(state, key, index):
  ...     api(jnp.zeros((2, 1, 1, 2)))
  ...     return state + 1, {}
  >>> m = Method(name="count", init=lambda key: 0, step=step, step_cost=lambda s, i: 2,
  ...            evaluate=lambda s, at: (s, [{"step": at.steps, "queries": at.queries}]))
  >>> out = run(m, api, key=jax.random.key(0))
  >>> out.steps, out.stopped, api.queries, out.curve
  (2, 'budget', 4, [{'step': 1, 'queries': 2}, {'step': 2, 'queries': 4}])
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
from tqdm.auto import tqdm

from dfml_jax import __version__
from dfml_jax.api import BlackBoxAPI, QueryBudgetExceeded, surface_api_errors
from dfml_jax.checkpoint import CheckpointError, RunCheckpointer

__all__ = ["Method", "EvalAt", "RunOutcome", "CheckpointLayout", "STEP_INDEX", "STEP_COUNT",
           "STOP", "LOG", "run", "step_key", "atomic_write_json"]

STOP = "stop"   # metrics key: the step could not complete; the run ends with this reason
LOG = "log"     # metrics key: records (e.g. ``{"event": "visit", ...}``) appended to the curve


class EvalAt(NamedTuple):
    """Where an evaluation happens.

    Attributes:
      steps: steps done.
      queries: queries charged so far (all APIs of the run).
      kind: ``"initial"`` (before the first step), ``"step"`` (after a step) or ``"end"`` (the
        last step, evaluated once the run has stopped because its schedule skipped it).
      metrics: the step's metrics (``"step"``), the last metrics of this call (``"end"``, ``{}``
        if it made no step) or ``{}`` (``"initial"``).
      key: the step's key (``"step"``), else None.
      last_of_budget: the step is the last within an evaluation budget or the last the run can
        make.
    """
    steps: int
    queries: int
    kind: str
    metrics: Dict[str, Any]
    key: Any = None
    last_of_budget: bool = False


class CheckpointLayout(NamedTuple):
    """How the loop's own state is laid out in a checkpoint.

    Attributes:
      curve_key: metadata key of the curve.
      step_offset: orbax step = steps done - ``step_offset`` (1: the index of the last step).
      count_key: metadata key that also holds the steps done (None: none).
    """
    curve_key: str = "curve"
    step_offset: int = 1
    count_key: Optional[str] = None


STEP_INDEX = CheckpointLayout("curve", 1, None)
STEP_COUNT = CheckpointLayout("history", 0, "iteration")


class Method(NamedTuple):
    """A method as the run loop sees it.

    Attributes:
      name: label of the progress bar and of ``result.json``.
      init: ``key -> state``: the state before the first step.
      step: ``(state, key, index) -> (state, metrics)``: step ``index`` (0-based, restored on
        resume) with its key. ``metrics`` may hold :data:`LOG` (records for the curve) and
        :data:`STOP` (a reason: the step did not complete, the run ends; its state is kept).
      checkpoint: ``state -> (arrays, meta)``: the arrays (a pytree) and JSON metadata to save.
      restore: ``(state, (arrays, meta) or None) -> state``: the state from a checkpoint (None:
        nothing saved), called once before the first step; ``state`` is the initial one.
      evaluate: ``(state, EvalAt) -> (state, points)`` (None: no evaluation).
      on_budget: ``(state, EvalAt) -> points`` added after an evaluation of the last step within
        a budget (None: nothing).
      step_cost: ``(state, index) -> queries`` reserved on the run's one API before step
        ``index`` (None: the method reserves its own queries, or makes none).
      query_cost: queries of a buying step (budget crossings, the bar's length); None: unknown.
      num_steps: the method's own number of steps (None: until the budget ends it).
      limit_reason: why the run stopped when it reached ``num_steps``.
      step_key: name of the step count in the curve's points.
      unit: unit of the progress bar.
      show: metrics shown on the progress bar.
      layout: the checkpoint layout (:data:`STEP_INDEX` or :data:`STEP_COUNT`).
      eval_first: evaluate after the first step.
      eval_initial: evaluate before the first step.
      checkpoint_at_stop: checkpoint whenever the run stops, interrupted or not.
      info: extra ``result.json`` fields (the config, the seed).
    """
    name: str
    init: Callable[[Any], Any]
    step: Callable[[Any, Any, int], Tuple[Any, Dict[str, Any]]]
    checkpoint: Callable[[Any], Tuple[Any, Dict[str, Any]]] = lambda s: (s, {})
    restore: Callable[[Any, Optional[tuple]], Any] = lambda s, c: s if c is None else c[0]
    evaluate: Optional[Callable[[Any, EvalAt], Tuple[Any, List[dict]]]] = None
    on_budget: Optional[Callable[[Any, EvalAt], List[dict]]] = None
    step_cost: Optional[Callable[[Any, int], Optional[int]]] = None
    query_cost: Optional[int] = None
    num_steps: Optional[int] = None
    limit_reason: str = "steps"
    step_key: str = "step"
    unit: str = "step"
    show: Tuple[str, ...] = ()
    layout: CheckpointLayout = STEP_INDEX
    eval_first: bool = False
    eval_initial: bool = False
    checkpoint_at_stop: bool = False
    info: Optional[Dict[str, Any]] = None


class RunOutcome(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      state: the method's state after the last step.
      curve: evaluated points and logged records, resumes included.
      steps: steps done (resumes included).
      stopped: ``num_steps``' reason (``Method.limit_reason``), ``"budget"``,
        ``"interrupted"`` (``max_steps``) or a step's :data:`STOP` reason.
      finished: False only when interrupted.
      queries: queries charged over the run (all APIs, resumes included).
      seconds: wall time of this call.
    """
    state: Any
    curve: List[Dict[str, Any]]
    steps: int
    stopped: str
    finished: bool
    queries: int
    seconds: float


def step_key(key, index: int):
    """The key of step ``index`` of a run with ``key``.

    Args:
      key: the run's key.
      index: the step's index (0-based).

    Returns:
      ``fold_in(fold_in(key, 1), index)``.
    """
    return jax.random.fold_in(jax.random.fold_in(key, 1), index)


def atomic_write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file (never half-written).

    Args:
      path: the file.
      obj: a JSON-serialisable object (other numbers as floats).
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def _is_point(record: Dict[str, Any]) -> bool:
    return record.get("event", "eval") == "eval"


def run(method: Method, apis: Any = (), *, key, workdir: Optional[str] = None,
        checkpoint_dir: Optional[str] = None, eval_every: int = 1, eval_budgets: Sequence[int] = (),
        checkpoint_every: int = 1, max_steps: Optional[int] = None, progress: bool = False,
        summary: Optional[Callable[[RunOutcome], Dict[str, Any]]] = None,
        started: Optional[float] = None) -> RunOutcome:
    """Runs (or resumes) ``method`` until it stops, evaluating and checkpointing on the way.

    Args:
      method: the :class:`Method`.
      apis: the API whose ledger (budget, queries) the run owns, or a sequence of APIs (their
        ledgers are checkpointed; queries are their sum).
      key: the run's key: ``init(key)``, and step ``i`` gets :func:`step_key` ``(key, i)``.
      workdir: run directory: checkpoints in ``workdir/checkpoints`` and ``result.json``
        (None: nothing on disk unless ``checkpoint_dir``).
      checkpoint_dir: the checkpoints' directory instead (no ``result.json`` without workdir).
      eval_every: evaluate every this many steps.
      eval_budgets: query counts whose last step is evaluated too.
      checkpoint_every: checkpoint every this many steps (and after every evaluation and the
        last step the run can make).
      max_steps: stop (unfinished) once this many steps are done in total.
      progress: show a tqdm bar.
      summary: ``RunOutcome -> dict`` written to ``workdir/result.json`` (with ``method.info``
        and the method's name) when the run finished.
      started: ``time.perf_counter()`` from which ``seconds`` counts (default: now).

    Returns:
      :class:`RunOutcome`.
    """
    started = time.perf_counter() if started is None else started
    loop = _Loop(method, apis, checkpoint_dir or (os.path.join(workdir, "checkpoints")
                                                  if workdir else None))
    sched = dict(eval_every=eval_every, budgets=sorted(int(b) for b in eval_budgets),
                 checkpoint_every=checkpoint_every)
    try:
        loop.start(key)
        loop.open_bar(progress)
        try:
            stopped, last = loop.steps(key, max_steps, sched)
        finally:
            loop.close_bar()
        loop.evaluate_end(stopped, last)
        if method.checkpoint_at_stop:
            loop.save()
    finally:
        loop.close()
    out = RunOutcome(loop.state, loop.curve, loop.done, stopped, stopped != "interrupted",
                     loop.queries(), time.perf_counter() - started)
    if workdir and out.finished and summary is not None:
        atomic_write_json(os.path.join(workdir, "result.json"),
                          {**summary(out), **(method.info or {}), "method": method.name})
    return out


class _Loop:
    """The loop's own state: steps done, curve, the method's state, the bar and checkpointer."""

    def __init__(self, method: Method, apis, directory: Optional[str]):
        self.m = method
        self.single = isinstance(apis, BlackBoxAPI)
        self.apis = [apis] if self.single else list(apis or ())
        self.ckpt = RunCheckpointer(directory) if directory else None
        self.curve: List[Dict[str, Any]] = []
        self.done = 0
        self.state = None
        self.bar = None

    def queries(self) -> int:
        return int(sum(a.queries for a in self.apis))

    def remaining(self) -> Optional[int]:
        return self.apis[0].remaining if self.single else None

    def last_eval(self) -> Optional[int]:
        """Steps done at the evaluation that is the curve's last record (None: not a point)."""
        if self.curve and _is_point(self.curve[-1]):
            return self.curve[-1].get(self.m.step_key)
        return None

    def start(self, key) -> None:
        """The initial state, restored from the latest checkpoint; the initial evaluation."""
        state = self.m.init(key)
        restored = None
        if self.ckpt is not None:
            latest = self.ckpt.restore_latest(self.m.checkpoint(state)[0])
            if latest is not None:
                restored = self._unpack(*latest)
        self.state = self.m.restore(state, restored)
        if (self.m.eval_initial and self.done == 0 and self.m.evaluate is not None
                and not any(_is_point(p) for p in self.curve)):
            self.evaluate(EvalAt(0, self.queries(), "initial", {}))

    def _unpack(self, step: int, arrays, meta: Dict[str, Any]):
        """Takes the loop's part of a checkpoint (curve, steps, ledgers); returns the method's."""
        lay = self.m.layout
        if lay.curve_key not in meta:
            raise CheckpointError(
                f"the checkpoint {step} in {self.ckpt.directory} has no '{lay.curve_key}': it was "
                f"not written by the run loop of {self.m.name} (dfml_jax {__version__}); resume it "
                "with the dfml_jax version that wrote it, or delete the directory to start over")
        meta = dict(meta)
        self.curve = list(meta.pop(lay.curve_key))
        self.done = int(meta.pop(lay.count_key)) if lay.count_key else step + lay.step_offset
        ledger, ledgers = meta.pop("ledger", None), meta.pop("ledgers", None)
        for api, led in zip(self.apis, [ledger] if ledger is not None else (ledgers or ())):
            api.ledger.load_state_dict(led)
        return arrays, meta

    def save(self) -> None:
        """Checkpoints the method's arrays and metadata with the curve, steps and ledgers."""
        lay = self.m.layout
        step = self.done - lay.step_offset
        if self.ckpt is None or step < 0:
            return
        arrays, meta = self.m.checkpoint(self.state)
        own: Dict[str, Any] = {lay.count_key: self.done} if lay.count_key else {}
        own[lay.curve_key] = self.curve
        if self.single:
            own["ledger"] = self.apis[0].ledger.state_dict()
        else:
            own["ledgers"] = [a.ledger.state_dict() for a in self.apis] if self.apis else None
        self.ckpt.save(step, arrays, {**own, **meta})

    def evaluate(self, at: EvalAt) -> Optional[Dict[str, Any]]:
        """Appends the method's points at ``at`` (and ``on_budget``'s); returns the first."""
        self.state, points = self.m.evaluate(self.state, at)
        self.curve.extend(points)
        if at.last_of_budget and self.m.on_budget is not None:
            self.curve.extend(self.m.on_budget(self.state, at))
        return points[0] if points else None

    def open_bar(self, progress: bool) -> None:
        if not progress:
            return
        total, rem, cost = self.m.num_steps, self.remaining(), self.m.query_cost
        if total is None and rem is not None and cost:
            total = (self.queries() + rem) // cost
        self.bar = tqdm(total=total, initial=self.done, desc=self.m.name, unit=self.m.unit,
                        leave=True, dynamic_ncols=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()

    def tick(self, metrics: Dict[str, Any], point: Optional[Dict[str, Any]]) -> None:
        """Advances the bar, showing the queries, ``Method.show`` metrics and the accuracies."""
        if self.bar is None:
            return
        post: Dict[str, Any] = {"queries": self.queries()}
        for name in self.m.show:
            v = metrics.get(name)
            post[name] = f"{v:.3f}" if isinstance(v, float) else v
        for name in ("val_acc", "test_acc"):
            if point is not None and name in point:
                post[name[:-4]] = f"{point[name]:.3f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def one_step(self, key, index: int):
        """Step ``index`` with its queries reserved: ``(metrics, None)`` or ``(None, reason)``."""
        cost = None if self.m.step_cost is None else self.m.step_cost(self.state, index)
        try:
            if cost is None:
                state, metrics = self.m.step(self.state, key, index)
            else:
                with self.apis[0].reserve(cost), surface_api_errors():
                    state, metrics = self.m.step(self.state, key, index)
                    jax.block_until_ready((state, metrics))
        except QueryBudgetExceeded as e:
            if cost is None:
                tqdm.write(f"{self.m.name}: query budget exhausted at step {index}: {e}")
            return None, "budget"
        self.state = state
        metrics = dict(metrics)
        self.curve.extend(metrics.pop(LOG, ()))
        reason = metrics.pop(STOP, None)
        return (None, reason) if reason else (metrics, None)

    def steps(self, key, max_steps: Optional[int], sched: Dict[str, Any]):
        """Steps until a stop: ``(reason, the last metrics of this call)``."""
        last: Dict[str, Any] = {}
        while True:
            if self.m.num_steps is not None and self.done >= self.m.num_steps:
                return self.m.limit_reason, last
            if max_steps is not None and self.done >= max_steps:
                return "interrupted", last
            k = step_key(key, self.done)
            metrics, reason = self.one_step(k, self.done)
            if reason is not None:
                return reason, last
            self.done += 1
            last = metrics
            self.after_step(k, metrics, sched)

    def after_step(self, key, metrics: Dict[str, Any], sched: Dict[str, Any]) -> None:
        """Evaluates and checkpoints on schedule, then ticks the bar."""
        n, q = self.done, self.queries()
        cost, rem = self.m.query_cost, self.remaining()
        crosses = cost is not None and any(q <= b < q + cost for b in sched["budgets"])
        nxt = None
        if self.m.num_steps is None or n < self.m.num_steps:
            nxt = self.m.step_cost(self.state, n) if self.m.step_cost is not None else None
        last_step = ((self.m.num_steps is not None and n >= self.m.num_steps)
                     or (rem is not None and nxt is not None and rem < nxt))
        last_of_budget = crosses or last_step
        point = None
        if self.m.evaluate is not None and (n % sched["eval_every"] == 0 or last_of_budget
                                            or (self.m.eval_first and n == 1)):
            point = self.evaluate(EvalAt(n, q, "step", metrics, key, last_of_budget))
        if n % sched["checkpoint_every"] == 0 or point is not None or last_step:
            self.save()
        self.tick(metrics, point)

    def evaluate_end(self, stopped: str, last: Dict[str, Any]) -> None:
        """Evaluates the last step unless it was, or the run was interrupted."""
        if (self.m.evaluate is not None and stopped != "interrupted"
                and (self.done > 0 or self.m.eval_initial) and self.last_eval() != self.done):
            self.evaluate(EvalAt(self.done, self.queries(), "end", last))
