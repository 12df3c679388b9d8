"""The BiDf-MKD training loop: API visits, bi-level KD, memory replay, plateau rule, evaluation.

BiDf-MKD is a :class:`~dfml_jax.training.run_loop.Method` (:func:`bidf_mkd_method`) run by the shared run
loop (:func:`dfml_jax.training.run_loop.run`), which owns the evaluation points, the checkpoints (orbax, so
a killed run resumes without losing work or re-buying queries), the query ledgers and the bar.
A step is a meta-iteration over explicit state (:class:`BiDfState`: the arrays
:class:`LoopState` and the host-side visits, plateau rule and model selection) made of jitted
pure steps (:mod:`.inversion`, :mod:`.metastep`); the API visits (inversion, queries, memory
writes) are in :mod:`.visits`. The method follows the official code (spec ``bidf_mkd.md``
section 6):

* the first task is a KD task; later a new API is visited when the batch-mean replay training
  accuracy has not reached a new maximum for ``plateau_patience`` meta-iterations;
* a meta-batch with a KD task is 1 KD task + ``meta_batch - 1`` replay tasks, losses summed;
* the initial meta-model (iteration 0) and then every ``eval_every`` meta-iterations the
  meta-model is evaluated on meta-validation tasks (model selection: the best of these, the
  initial parameters included, is returned) and, if ``paper_eval_tasks > 0``, on meta-test tasks
  with the paper's fine-tuning (``paper_lr``, ``paper_steps``) to report the paper's "best over
  test evaluations" number, labelled as such.

``replay_source="real"`` replaces the memory by real meta-train tasks and skips the APIs: the
"MAML on real data" upper bound. ``white_box=True`` uses true gradients through the teachers in the
inversion: the white-box upper bound.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, ClassVar, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfml_jax.api import BlackBoxAPI
from dfml_jax.memory import MemoryState, PlateauTrigger, init_memory, sample_tasks
from dfml_jax.meta import evaluate_tasks
from dfml_jax.parallel import replicate
from dfml_jax.training.augment import normalize
from dfml_jax.training.run_loop import LOG, STEP_COUNT, STOP, EvalAt, Method, run

from .inversion import InversionConfig
from .metastep import KDTask, ReplayTasks, cached_meta_steps
from .visits import ApiVisits, store_recovered

__all__ = ["BiDfMKDConfig", "TeacherPool", "LoopState", "BiDfState", "bidf_mkd_method",
           "train_bidf_mkd", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class BiDfMKDConfig:
    """Everything the loop needs; paper values in comments (spec section 8).

    The inversion's settings are the nested :class:`~.inversion.InversionConfig` ``inversion``
    (``--set inversion.lr=0.1``); its zero-order estimate takes ``inversion.num_directions``
    random directions (q) per sample and steps of ``inversion.smoothing`` (mu), as in
    :func:`dfml_jax.estimators.zo_gradient`. Until issue 17 they were flat fields mirroring the
    inversion's (``inv_lr``, ``inv_per_class``, ..., ``num_directions``, ``smoothing``, before
    that ``q`` and ``mu``): ``--set`` refuses the old names with the new key in the error and
    saved configs are read under the new ones (``RENAMED_FIELDS``, dotted targets).

    Learning rates of the meta-model: ``inner_lr`` is the SGD step of the inner loops of
    meta-training (the replay and KD tasks' adaptation, :mod:`.metastep`); ``finetune_lr`` is the
    fine-tuning step of the evaluations (the meta-validation tasks of model selection here, and
    in :mod:`.experiment` the test-time fine-tuning when no ``finetune_lrs`` grid is given); None
    (the default, as in the paper) fine-tunes at ``inner_lr`` (:attr:`eval_lr`). The paper
    protocol's test evaluations have their own ``paper_lr``.
    """
    RENAMED_FIELDS: ClassVar[Dict[str, str]] = {
        "q": "inversion.num_directions", "mu": "inversion.smoothing",
        **{k: f"inversion.{k}" for k in ("estimator", "num_directions", "smoothing", "chunk_size",
                                          "boundary_weight")},
        **{f"inv_{k}": f"inversion.{k}" for k in (
            "iterations", "per_class", "lr", "select", "pad", "flip", "tv_weight", "l1_weight",
            "repulsion_weight", "class_jitter", "direction_resolution", "direction_upsample",
            "zo_space")}}
    ways: int = 5
    shots: int = 1                  # num_sup_train (= test shot)
    query: int = 15
    meta_iterations: int = 60000    # episode_train / meta_batch
    meta_batch: int = 4
    outer_lr: float = 1e-3
    inner_lr: float = 0.01
    replay_inner_steps: int = 5
    kd_inner_steps: int = 10
    first_order: bool = False
    # the inner loops' lax.scan unrolled into straight-line code (the same arithmetic up to
    # float rounding; faster on XLA:CPU, see experiments/bench/bench_torch_reference.py)
    inner_unroll: bool = False
    kd_loss: str = "kl"             # "paper": the official softmax quirk
    # inversion (``--set inversion.lr=...``); ``inversion.flip=None``: the paper's True here, the
    # experiment resolves it per dataset
    inversion: InversionConfig = InversionConfig(flip=None)
    boundary_start: int = 4000      # meta-iteration after which the boundary term is on
    nz: int = 256
    ngf: int = 64
    white_box: bool = False
    # memory and schedule
    memory_slots: int = 20
    # departure (None = the paper): "api_agree" stores only the recovered images whose KD query
    # answer (already paid for) assigns them to their target class (memory.write's ``keep``)
    memory_filter: Optional[str] = None
    plateau_patience: int = 200
    apis_per_visit: int = 1         # >1: visit (invert) this many distinct APIs at once
    inv_shard: str = "samples"      # with a mesh: split "samples" or "directions" of an inversion
    replay_source: str = "memory"   # or "real": MAML on the real meta-train split
    # evaluation
    eval_every: int = 500
    val_tasks: int = 100
    paper_eval_tasks: int = 0       # >0: also track max-over-test evaluations (paper protocol)
    paper_lr: float = 0.01          # fine-tuning lr of the paper protocol's test evaluations
    paper_steps: int = 10           # fine-tuning steps of the paper protocol's test evaluations
    finetune_steps: int = 10
    finetune_lr: Optional[float] = None  # fine-tuning lr of the evaluations (None: inner_lr)
    query_budget: Optional[int] = None
    checkpoint_every: int = 50
    seed: int = 2022

    @property
    def eval_lr(self) -> float:
        """The evaluations' fine-tuning learning rate: ``finetune_lr``, or ``inner_lr`` if None."""
        return self.inner_lr if self.finetune_lr is None else self.finetune_lr

    @property
    def flip(self) -> bool:
        """Whether inversion and KD augmentation flip images (``inversion.flip``; None: True)."""
        return True if self.inversion.flip is None else bool(self.inversion.flip)

    def inversion_config(self) -> InversionConfig:
        """:attr:`inversion` with its ``flip`` resolved (:attr:`flip`): what the inverter runs."""
        return dataclasses.replace(self.inversion, flip=self.flip)


class TeacherPool(NamedTuple):
    """What the loop knows of a pool: black-box APIs and their public metadata.

    Attributes:
      apis: the black-box APIs.
      classes: per API, the absolute meta-train class of each output index.
      mean, std: the APIs' input normalisation (shared by the meta-model).
      image_size: input side of the APIs.
      white_box_teachers: optional per-API ``(apply(params, x) -> logits, params)`` pairs
        (white-box baselines only).
    """
    apis: Sequence[BlackBoxAPI]
    classes: Sequence[Sequence[int]]
    mean: Sequence[float]
    std: Sequence[float]
    image_size: int
    white_box_teachers: Optional[Sequence[Callable]] = None


class LoopState(NamedTuple):
    """Array part of the loop state (checkpointed with orbax)."""
    params: Any
    opt_state: Any
    memory: MemoryState
    key: jax.Array
    best_params: Any


class TrainResult(NamedTuple):
    best_params: Any       # selected on meta-validation (the initial parameters included)
    final_params: Any
    history: List[Dict[str, Any]]
    api_queries: int
    visits: int
    wall_s: float
    paper_best_test: Optional[float]  # max over test evaluations (paper protocol), if tracked
    stopped_by_budget: bool


_store = store_recovered  # the memory write of a visit (now in .visits), under its former name


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _sample_memory(m, k, n, ways, shots, query):
    return sample_tasks(m, k, n, ways=ways, shots=shots, query=query)

def _validate(cfg: BiDfMKDConfig, pool: Optional[TeacherPool]):
    if cfg.memory_filter not in (None, "api_agree"):
        raise ValueError(f"memory_filter must be None (the paper: keep every recovered image) or "
                         f"'api_agree', got {cfg.memory_filter!r}")
    if cfg.replay_source not in ("memory", "real"):
        raise ValueError(f"replay_source must be 'memory' or 'real', got {cfg.replay_source!r}")
    if cfg.replay_source == "memory":
        if pool is None or not pool.apis:
            raise ValueError("BiDf-MKD needs a non-empty pool of APIs (replay_source='memory')")
        if cfg.inversion.per_class < cfg.shots + cfg.query:
            raise ValueError(
                f"inversion.per_class={cfg.inversion.per_class} recovered images per class cannot "
                f"fill replay tasks of shots+query={cfg.shots + cfg.query} distinct images; raise "
                "inversion.per_class or lower shots/query.")
        if cfg.white_box and pool.white_box_teachers is None:
            raise ValueError("white_box=True needs pool.white_box_teachers (white-box access)")
        for i, (api, cls) in enumerate(zip(pool.apis, pool.classes)):
            if api.num_classes < cfg.ways:
                raise ValueError(f"API {i} has {api.num_classes} classes < ways={cfg.ways}")
            if len(cls) != api.num_classes:
                raise ValueError(f"API {i}: {len(cls)} class ids for {api.num_classes} outputs")
        if not 1 <= cfg.apis_per_visit <= len(pool.apis):
            raise ValueError(f"apis_per_visit={cfg.apis_per_visit} must be between 1 and the "
                             f"pool size {len(pool.apis)}")
        if cfg.apis_per_visit > 1 and (cfg.white_box or len({a.num_classes for a in pool.apis}) > 1):
            raise ValueError("apis_per_visit > 1 needs black-box inversion (white_box=False) and "
                             "APIs with the same number of classes; visit one API at a time")


@dataclasses.dataclass
class _Host:
    """Host-side state of a run, checkpointed as JSON metadata (:meth:`to_meta`); keys this
    version does not know are carried over in ``other``."""
    need_api: bool = True
    visits: int = 0
    best_val: float = -1.0
    paper_best_test: Optional[float] = None
    plateau: Optional[PlateauTrigger] = None
    other: Dict[str, Any] = dataclasses.field(default_factory=dict)

    _FIELDS = ("need_api", "visits", "best_val", "paper_best_test")
    _RETIRED = ("train_accs", "stopped_by_budget")   # written by earlier versions, now unused

    def to_meta(self) -> Dict[str, Any]:
        """The checkpoint metadata: the fields, the plateau rule's state, then ``other``."""
        return {**{k: getattr(self, k) for k in self._FIELDS},
                "plateau": self.plateau.state_dict(), **self.other}

    def load_meta(self, meta: Dict[str, Any]) -> None:
        """Takes a checkpoint's metadata over the current values (as ``dict.update``)."""
        for k, v in meta.items():
            if k in self._FIELDS:
                setattr(self, k, v)
            elif k == "plateau":
                self.plateau.load_state_dict(v)
            elif k not in self._RETIRED:
                self.other[k] = v


class BiDfState(NamedTuple):
    """BiDf-MKD's state in the run loop: the arrays (:class:`LoopState`, with the key chain of
    the run) and the host-side state (visits, the plateau rule, model selection)."""
    arrays: LoopState
    host: _Host


def _initial_state(cfg: BiDfMKDConfig, optimizer, meta_init_params, image_shape, rows: int,
                   real: bool, key) -> LoopState:
    """The loop state before training (a one-slot dummy memory with ``real``)."""
    opt_state = optimizer.init(meta_init_params)
    memory = init_memory(rows if not real else 1, cfg.memory_slots if not real else 1,
                         cfg.inversion.per_class if not real else 1, image_shape)
    return LoopState(meta_init_params, opt_state, memory, key, meta_init_params)


def _evaluate(meta_apply: Callable, norm: Callable, params, tasks, lr: float, steps: int):
    """Fine-tunes ``params`` on each task's (normalised) support set, scores its query set."""
    sx, sy, qx, qy = tasks
    return evaluate_tasks(meta_apply, params, norm(sx), sy, norm(qx), qy,
                          steps=steps, lr=lr, batch_size=25)


class _BiDfMKD:
    """The pieces of one run (arguments of :func:`train_bidf_mkd`) and the method's functions
    over :class:`BiDfState` (:meth:`init`, :meth:`step`, :meth:`evaluate`, :meth:`checkpoint`,
    :meth:`restore`)."""

    def __init__(self, cfg: BiDfMKDConfig, *, meta_apply, meta_init_params, gen_init, gen_apply,
                 pool, val_tasks, test_tasks, real_tasks, mesh, t_start: float):
        self.cfg, self.pool, self.meta_apply, self.real_tasks = cfg, pool, meta_apply, real_tasks
        self.meta_init_params, self.mesh, self.t_start = meta_init_params, mesh, t_start
        self.mean, self.std = (pool.mean, pool.std) if pool is not None else ((0.0,), (1.0,))
        self.optimizer = optax.adam(cfg.outer_lr)
        self.steps = cached_meta_steps(
            meta_apply, cfg.outer_lr, replay_steps=cfg.replay_inner_steps,
            kd_steps=cfg.kd_inner_steps, inner_lr=cfg.inner_lr, kd_loss=cfg.kd_loss,
            first_order=cfg.first_order, mesh=mesh, unroll=cfg.inner_unroll)
        self.image_shape = tuple(val_tasks[0].shape[2:])
        self.real = real = cfg.replay_source == "real"
        self.memory_classes = np.unique(np.concatenate([np.asarray(c) for c in pool.classes])) \
            if not real else np.arange(1)
        self.apis = None if pool is None else ApiVisits(
            cfg, pool, inv_cfg=cfg.inversion_config(), gen_init=gen_init, gen_apply=gen_apply,
            meta_apply=meta_apply, steps=self.steps, mean=self.mean, std=self.std,
            memory_classes=self.memory_classes, mesh=mesh)
        self.val = tuple(jnp.asarray(a) for a in val_tasks)
        self.paper_test = None if not (cfg.paper_eval_tasks and test_tasks is not None) else tuple(
            jnp.asarray(a)[:cfg.paper_eval_tasks] for a in test_tasks)

    def norm(self, x):
        return normalize(x, self.mean, self.std)

    def total_queries(self) -> int:
        return 0 if self.pool is None else int(sum(a.queries for a in self.pool.apis))

    def init(self, key) -> BiDfState:
        """The initial meta-model, its optimiser, an empty memory and the key chain ``key``."""
        arrays = _initial_state(self.cfg, self.optimizer, self.meta_init_params, self.image_shape,
                                len(self.memory_classes), self.real, key)
        return BiDfState(arrays, _Host(need_api=not self.real,
                                       plateau=PlateauTrigger(self.cfg.plateau_patience)))

    def checkpoint(self, s: BiDfState):
        return s.arrays, s.host.to_meta()

    def restore(self, s: BiDfState, saved) -> BiDfState:
        """The checkpointed arrays and host state (if any), replicated on the mesh (if any)."""
        arrays = s.arrays
        if saved is not None:
            arrays = saved[0] if isinstance(saved[0], LoopState) else LoopState(*saved[0])
            s.host.load_meta(saved[1])
        if self.mesh is not None:  # the state lives replicated on the mesh (whatever wrote it)
            arrays = replicate(arrays, self.mesh)
        return BiDfState(arrays, s.host)

    def evaluate(self, s: BiDfState, at: EvalAt):
        """Scores the meta-model on the meta-validation tasks (and, for the paper protocol, on
        the test tasks with ``paper_lr`` / ``paper_steps``); keeps it as ``best_params`` if its
        validation accuracy is the best so far. Returns the state and the ``eval`` record."""
        cfg, host, arrays = self.cfg, s.host, s.arrays
        r = _evaluate(self.meta_apply, self.norm, arrays.params, self.val, cfg.eval_lr,
                      cfg.finetune_steps)
        info = {"train_acc": at.metrics["train_acc"]} if at.kind == "step" else {}
        rec = {"event": "eval", "iteration": at.steps, "val_acc": r.mean, "val_ci": r.ci95,
               "queries": at.queries, "visits": host.visits, **info,
               "wall_s": time.time() - self.t_start}
        if r.mean > host.best_val:
            host.best_val = r.mean
            arrays = arrays._replace(best_params=arrays.params)
        if self.paper_test is not None:
            tr = _evaluate(self.meta_apply, self.norm, arrays.params, self.paper_test,
                           cfg.paper_lr, cfg.paper_steps)
            rec.update(test_acc_paper_protocol=tr.mean, test_ci_paper_protocol=tr.ci95)
            prev = host.paper_best_test
            host.paper_best_test = tr.mean if prev is None else max(prev, tr.mean)
        return BiDfState(arrays, host), [rec]

    def replay_batch(self, memory, key, n: int) -> ReplayTasks:
        """``n`` normalised replay tasks: from the memory, or real meta-train tasks."""
        cfg = self.cfg
        if self.real:
            t = self.real_tasks(key)
            t = ReplayTasks(*(a[:n] for a in t))
        else:
            sx, sy, qx, qy, _ = _sample_memory(memory, key, n, cfg.ways, cfg.shots, cfg.query)
            t = ReplayTasks(sx, sy, qx, qy)
        return ReplayTasks(self.norm(t.support_x), t.support_y, self.norm(t.query_x), t.query_y)

    def meta_step(self, arrays: LoopState, kd: Optional[KDTask], k_rep, key):
        """One outer step on a meta-batch (``kd`` and replay tasks, or replay tasks only);
        ``key`` becomes the state's key. Returns ``(arrays, loss, mean replay accuracy)``."""
        cfg = self.cfg
        if kd is not None:
            tasks = self.replay_batch(arrays.memory, k_rep,
                                      max(cfg.meta_batch - cfg.apis_per_visit, 1))
            params, opt, loss, accs = self.steps.kd_replay(arrays.params, arrays.opt_state, kd,
                                                           tasks)
        else:
            tasks = self.replay_batch(arrays.memory, k_rep, cfg.meta_batch)
            params, opt, loss, accs = self.steps.replay(arrays.params, arrays.opt_state, tasks)
        return arrays._replace(params=params, opt_state=opt, key=key), loss, float(jnp.mean(accs))

    def step(self, s: BiDfState, _key, it: int):
        """Meta-iteration ``it``: a visit if the plateau rule asked for one (its record is
        logged; a budget that cannot pay for it raises ``QueryBudgetExceeded``), then the outer
        step and the plateau rule. The keys come from the state's own key chain."""
        cfg, host = self.cfg, s.host
        key, k_visit, k_rep = jax.random.split(s.arrays.key, 3)
        arrays, log, kd = s.arrays, [], None
        if host.need_api:
            kd, memory, info = self.apis.visit(arrays.params, arrays.memory, k_visit, it)
            arrays = arrays._replace(memory=memory)
            host.visits += cfg.apis_per_visit
            host.need_api = False
            info.update(iteration=it, queries=self.total_queries())
            log.append({"event": "visit", **info})
        if cfg.query_budget is not None and self.total_queries() > cfg.query_budget:
            return BiDfState(arrays, host), {LOG: log, STOP: "budget"}
        arrays, loss, train_acc = self.meta_step(arrays, kd, k_rep, key)
        if not self.real and host.plateau.update(train_acc):
            host.need_api = True
        return BiDfState(arrays, host), {LOG: log, "loss": float(loss), "train_acc": train_acc,
                                         "visits": host.visits}

    def method(self) -> Method:
        return Method(
            name="BiDf-MKD" if not self.real else "MAML (real data)", init=self.init,
            step=self.step, checkpoint=self.checkpoint, restore=self.restore,
            evaluate=self.evaluate, num_steps=self.cfg.meta_iterations,
            limit_reason="iterations", step_key="iteration", unit="it",
            show=("loss", "train_acc", "visits"), layout=STEP_COUNT, eval_initial=True,
            checkpoint_at_stop=True)


def bidf_mkd_method(cfg: BiDfMKDConfig, *, meta_apply: Callable, meta_init_params,
                    gen_init: Callable, gen_apply: Callable, pool: Optional[TeacherPool],
                    val_tasks, test_tasks=None, real_tasks: Optional[Callable] = None,
                    mesh=None, t_start: Optional[float] = None) -> Method:
    """BiDf-MKD (or MAML on real data, ``replay_source="real"``) as a run-loop method.

    A step is a meta-iteration; the state is :class:`BiDfState` and its key chain starts from
    :func:`run`'s key (``jax.random.key(cfg.seed)`` in :func:`train_bidf_mkd`); run it on the
    pool's APIs. It evaluates its initial parameters (they compete in model selection),
    checkpoints whenever the run stops and keeps the
    :data:`~dfml_jax.training.run_loop.STEP_COUNT` checkpoint layout.

    Args:
      cfg, meta_apply, meta_init_params, gen_init, gen_apply, pool, val_tasks, test_tasks,
        real_tasks, mesh: as :func:`train_bidf_mkd`.
      t_start: ``time.time()`` from which the records' ``wall_s`` count (default: now).

    Returns:
      The :class:`~dfml_jax.training.run_loop.Method`.
    """
    _validate(cfg, pool)
    return _BiDfMKD(cfg, meta_apply=meta_apply, meta_init_params=meta_init_params,
                    gen_init=gen_init, gen_apply=gen_apply, pool=pool, val_tasks=val_tasks,
                    test_tasks=test_tasks, real_tasks=real_tasks, mesh=mesh,
                    t_start=time.time() if t_start is None else t_start).method()


def train_bidf_mkd(cfg: BiDfMKDConfig, *, meta_apply: Callable, meta_init_params,
                   gen_init: Callable, gen_apply: Callable, pool: Optional[TeacherPool],
                   val_tasks, test_tasks=None, real_tasks: Optional[Callable] = None,
                   checkpoint_dir: Optional[str] = None, progress: bool = True,
                   stop_after: Optional[int] = None, mesh=None) -> TrainResult:
    """Runs (or resumes) BiDf-MKD meta-training.

    Args:
      cfg: :class:`BiDfMKDConfig`.
      meta_apply: the meta-model's ``(params, x) -> logits`` (batch-statistics BN).
      meta_init_params: initial meta-model parameters.
      gen_init, gen_apply: the generator's re-initialisation and ``(params, z) -> [0,1] images``.
      pool: the :class:`TeacherPool` (None with ``replay_source="real"``).
      val_tasks: fixed meta-validation tasks ``(sx, sy, qx, qy)`` in [0, 1] (model selection).
      test_tasks: fixed meta-test tasks, used only if ``cfg.paper_eval_tasks > 0`` (the first
        ``paper_eval_tasks`` of them, fine-tuned with ``cfg.paper_lr`` for ``cfg.paper_steps``
        steps at every evaluation; the maximum is ``TrainResult.paper_best_test``).
      real_tasks: ``key -> ReplayTasks`` in [0, 1] of real meta-train data (``replay_source="real"``).
      checkpoint_dir: orbax directory; the run resumes from its latest checkpoint.
      progress: show a tqdm bar.
      stop_after: stop (after checkpointing) once this meta-iteration is reached: for tests that
        simulate a kill.
      mesh: optional device mesh (:func:`dfml_jax.parallel.make_mesh`): every inversion shards
        its samples (and API queries) over the devices, the meta-batch shards its tasks, the loop
        state is replicated. Checkpoints restore on any device count. None: one device, the
        unchanged single-device computation.

    Returns:
      :class:`TrainResult`. ``best_params`` are the parameters with the best meta-validation
      accuracy among the evaluations, the initial parameters (iteration 0, evaluated before
      training) included: training that only degrades the model returns ``meta_init_params``.
    """
    t_start = time.time()
    method = bidf_mkd_method(cfg, meta_apply=meta_apply, meta_init_params=meta_init_params,
                             gen_init=gen_init, gen_apply=gen_apply, pool=pool,
                             val_tasks=val_tasks, test_tasks=test_tasks, real_tasks=real_tasks,
                             mesh=mesh, t_start=t_start)
    out = run(method, pool.apis if pool is not None else (), key=jax.random.key(cfg.seed),
              checkpoint_dir=checkpoint_dir, eval_every=cfg.eval_every,
              checkpoint_every=cfg.checkpoint_every, max_steps=stop_after, progress=progress)
    arrays, host = out.state
    return TrainResult(arrays.best_params, arrays.params, out.curve, out.queries, host.visits,
                       time.time() - t_start, host.paper_best_test, out.stopped == "budget")
