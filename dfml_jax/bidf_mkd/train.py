"""The BiDf-MKD training loop: API visits, bi-level KD, memory replay, plateau rule, evaluation.

Host-side orchestration of jitted pure steps (:mod:`.inversion`, :mod:`.metastep`) over explicit
state (:class:`LoopState`), checkpointed with orbax so a killed run resumes without losing work or
re-buying queries. The API visits (inversion, queries, memory writes) are in :mod:`.visits`;
a run's pieces and its host-side state (``_RunState``: the checkpoint's JSON metadata) are held
by ``_Loop``, one method per step of the loop. The loop follows the official code (spec
``bidf_mkd.md`` section 6):

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
from tqdm.auto import tqdm

from dfml_jax.api import BlackBoxAPI, QueryBudgetExceeded
from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.memory import MemoryState, PlateauTrigger, init_memory, sample_tasks
from dfml_jax.meta import evaluate_tasks
from dfml_jax.parallel import replicate
from dfml_jax.training.augment import normalize

from .inversion import InversionConfig
from .metastep import KDTask, ReplayTasks, cached_meta_steps
from .visits import ApiVisits, store_recovered

__all__ = ["BiDfMKDConfig", "TeacherPool", "LoopState", "train_bidf_mkd", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class BiDfMKDConfig:
    """Everything the loop needs; paper values in comments (spec section 8).

    The zero-order estimate of the inversion takes ``num_directions`` random directions (q) per
    sample and steps of ``smoothing`` (mu), as in :func:`dfml_jax.estimators.zo_gradient`; they
    were named ``q`` and ``mu`` until issue 17 (one name per knob): ``--set`` refuses the old
    names and saved configs are read under the new ones (``RENAMED_FIELDS``).

    Learning rates of the meta-model: ``inner_lr`` is the SGD step of the inner loops of
    meta-training (the replay and KD tasks' adaptation, :mod:`.metastep`); ``finetune_lr`` is the
    fine-tuning step of the evaluations (the meta-validation tasks of model selection here, and
    in :mod:`.experiment` the test-time fine-tuning when no ``finetune_lrs`` grid is given); None
    (the default, as in the paper) fine-tunes at ``inner_lr`` (:attr:`eval_lr`). The paper
    protocol's test evaluations have their own ``paper_lr``.
    """
    RENAMED_FIELDS: ClassVar[Dict[str, str]] = {"q": "num_directions", "mu": "smoothing"}
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
    kd_loss: str = "kl"             # "paper": the official softmax quirk
    # inversion
    inv_iterations: int = 200
    inv_per_class: int = 30
    inv_lr: float = 1e-3
    estimator: str = "sphere-forward"
    num_directions: int = 100       # q
    smoothing: float = 0.005        # mu
    chunk_size: Optional[int] = None
    boundary_weight: float = 1.0
    boundary_start: int = 4000      # meta-iteration after which the boundary term is on
    inv_select: str = "clean_ce"    # "surrogate": the official code's choice
    inv_pad: int = 4
    inv_flip: Optional[bool] = None  # random horizontal flips (None: the paper's True here;
    #                                  the experiment resolves it per dataset)
    inv_tv_weight: float = 0.0       # departures (0 = the paper): image priors of the inversion
    inv_l1_weight: float = 0.0
    inv_repulsion_weight: float = 0.0
    inv_class_jitter: Optional[float] = None  # departure: class latents + per-image jitter
    inv_direction_resolution: Optional[int] = None  # departure: low-res ZO directions (None: paper)
    inv_direction_upsample: str = "nearest"
    inv_zo_space: str = "image"      # departure: "latent" estimates over the generator's input
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
        """Whether inversion and KD augmentation flip images (``inv_flip``; None: True)."""
        return True if self.inv_flip is None else bool(self.inv_flip)

    def inversion(self) -> InversionConfig:
        return InversionConfig(iterations=self.inv_iterations, per_class=self.inv_per_class,
                               lr=self.inv_lr, estimator=self.estimator, num_directions=self.num_directions,
                               smoothing=self.smoothing, chunk_size=self.chunk_size,
                               boundary_weight=self.boundary_weight, pad=self.inv_pad,
                               flip=self.flip, select=self.inv_select,
                               tv_weight=self.inv_tv_weight, l1_weight=self.inv_l1_weight,
                               repulsion_weight=self.inv_repulsion_weight,
                               class_jitter=self.inv_class_jitter,
                               direction_resolution=self.inv_direction_resolution,
                               direction_upsample=self.inv_direction_upsample,
                               zo_space=self.inv_zo_space)


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
        if cfg.inv_per_class < cfg.shots + cfg.query:
            raise ValueError(
                f"inv_per_class={cfg.inv_per_class} recovered images per class cannot fill replay "
                f"tasks of shots+query={cfg.shots + cfg.query} distinct images; raise inv_per_class "
                "or lower shots/query.")
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
class _RunState:
    """Host-side state of a run, checkpointed as the JSON metadata (the keys and their order are
    the checkpoint format: see :meth:`to_meta`; keys this version does not know are carried over
    in ``other``)."""
    iteration: int = 0
    need_api: bool = True
    visits: int = 0
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    best_val: float = -1.0
    paper_best_test: Optional[float] = None
    plateau: Optional[dict] = None        # PlateauTrigger.state_dict() at the last save
    ledgers: Optional[list] = None        # the APIs' ledger state_dicts at the last save
    train_accs: list = dataclasses.field(default_factory=list)  # unused; kept in the format
    stopped_by_budget: bool = False
    other: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_meta(self) -> Dict[str, Any]:
        """The checkpoint metadata: every field but ``other``, in order, then ``other``."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        return {**meta, **self.other}

    def load_meta(self, meta: Dict[str, Any]) -> None:
        """Takes a checkpoint's metadata over the current values (as ``dict.update``)."""
        names = {f.name for f in dataclasses.fields(self)} - {"other"}
        for k, v in meta.items():
            if k in names:
                setattr(self, k, v)
            else:
                self.other[k] = v


def _initial_state(cfg: BiDfMKDConfig, optimizer, meta_init_params, image_shape, rows: int,
                   real: bool) -> LoopState:
    """The loop state before training (a one-slot dummy memory with ``real``)."""
    opt_state = optimizer.init(meta_init_params)
    memory = init_memory(rows if not real else 1, cfg.memory_slots if not real else 1,
                         cfg.inv_per_class if not real else 1, image_shape)
    return LoopState(meta_init_params, opt_state, memory, jax.random.key(cfg.seed),
                     meta_init_params)


def _evaluate(meta_apply: Callable, norm: Callable, params, tasks, lr: float, steps: int):
    """Fine-tunes ``params`` on each task's (normalised) support set, scores its query set."""
    sx, sy, qx, qy = tasks
    return evaluate_tasks(meta_apply, params, norm(sx), sy, norm(qx), qy,
                          steps=steps, lr=lr, batch_size=25)


class _Loop:
    """One run of :func:`train_bidf_mkd` (same arguments): its fixed pieces, its array state
    ``state`` (:class:`LoopState`) and host state ``run`` (:class:`_RunState`), restored from the
    latest checkpoint of ``checkpoint_dir`` if there is one."""

    def __init__(self, cfg: BiDfMKDConfig, *, meta_apply, meta_init_params, gen_init, gen_apply,
                 pool, val_tasks, test_tasks, real_tasks, checkpoint_dir, mesh, t_start: float):
        self.cfg, self.pool, self.meta_apply, self.real_tasks = cfg, pool, meta_apply, real_tasks
        self.t_start = t_start
        self.mean, self.std = (pool.mean, pool.std) if pool is not None else ((0.0,), (1.0,))
        optimizer = optax.adam(cfg.outer_lr)
        self.steps = cached_meta_steps(
            meta_apply, cfg.outer_lr, replay_steps=cfg.replay_inner_steps,
            kd_steps=cfg.kd_inner_steps, inner_lr=cfg.inner_lr, kd_loss=cfg.kd_loss,
            first_order=cfg.first_order, mesh=mesh)
        inv_cfg = cfg.inversion()
        image_shape = tuple(val_tasks[0].shape[2:])
        self.real = real = cfg.replay_source == "real"
        memory_classes = np.unique(np.concatenate([np.asarray(c) for c in pool.classes])) \
            if not real else np.arange(1)
        self.state = _initial_state(cfg, optimizer, meta_init_params, image_shape,
                                    len(memory_classes), real)
        self.run = _RunState(need_api=not real)
        self.plateau = PlateauTrigger(cfg.plateau_patience)
        self.ckpt = RunCheckpointer(checkpoint_dir) if checkpoint_dir else None
        self.restore()
        if mesh is not None:  # the state lives replicated on the mesh (whatever wrote the ckpt)
            self.state = replicate(self.state, mesh)
        self.apis = None if pool is None else ApiVisits(
            cfg, pool, inv_cfg=inv_cfg, gen_init=gen_init, gen_apply=gen_apply,
            meta_apply=meta_apply, steps=self.steps, mean=self.mean, std=self.std,
            memory_classes=memory_classes, mesh=mesh)
        self.val = tuple(jnp.asarray(a) for a in val_tasks)
        self.paper_test = None if not (cfg.paper_eval_tasks and test_tasks is not None) else tuple(
            jnp.asarray(a)[:cfg.paper_eval_tasks] for a in test_tasks)

    def norm(self, x):
        return normalize(x, self.mean, self.std)

    def total_queries(self) -> int:
        return 0 if self.pool is None else int(sum(a.queries for a in self.pool.apis))

    def restore(self) -> None:
        """Resumes from the latest checkpoint, if any: arrays, host state, plateau, ledgers."""
        restored = self.ckpt.restore_latest(self.state) if self.ckpt is not None else None
        if restored is None:
            return
        _, arrays, meta = restored
        self.state = LoopState(*arrays) if not isinstance(arrays, LoopState) else arrays
        self.run.load_meta(meta)
        self.plateau.load_state_dict(self.run.plateau)
        if self.pool is not None and self.run.ledgers:
            for api, led in zip(self.pool.apis, self.run.ledgers):
                api.ledger.load_state_dict(led)

    def save(self) -> None:
        """Checkpoints the state at the current iteration (no-op without a checkpoint dir)."""
        if self.ckpt is None:
            return
        self.run.plateau = self.plateau.state_dict()
        self.run.ledgers = None if self.pool is None else [a.ledger.state_dict()
                                                           for a in self.pool.apis]
        self.ckpt.save(self.run.iteration, self.state, self.run.to_meta())

    def eval_point(self, it: int, **info) -> None:
        """Evaluates ``state.params`` on the meta-validation tasks (and, for the paper protocol, on
        the test tasks with ``paper_lr`` / ``paper_steps``), appends the record to the history and
        keeps the parameters as ``best_params`` if their validation accuracy is the best so far."""
        cfg, run = self.cfg, self.run
        r = _evaluate(self.meta_apply, self.norm, self.state.params, self.val, cfg.eval_lr,
                      cfg.finetune_steps)
        rec = {"event": "eval", "iteration": it, "val_acc": r.mean, "val_ci": r.ci95,
               "queries": self.total_queries(), "visits": run.visits, **info,
               "wall_s": time.time() - self.t_start}
        if r.mean > run.best_val:
            run.best_val = r.mean
            self.state = self.state._replace(best_params=self.state.params)
        if self.paper_test is not None:
            tr = _evaluate(self.meta_apply, self.norm, self.state.params, self.paper_test,
                           cfg.paper_lr, cfg.paper_steps)
            rec.update(test_acc_paper_protocol=tr.mean, test_ci_paper_protocol=tr.ci95)
            prev = run.paper_best_test
            run.paper_best_test = tr.mean if prev is None else max(prev, tr.mean)
        run.history.append(rec)

    def replay_batch(self, key, n: int) -> ReplayTasks:
        """``n`` normalised replay tasks: from the memory, or real meta-train tasks."""
        cfg = self.cfg
        if self.real:
            t = self.real_tasks(key)
            t = ReplayTasks(*(a[:n] for a in t))
        else:
            sx, sy, qx, qy, _ = _sample_memory(self.state.memory, key, n, cfg.ways, cfg.shots,
                                               cfg.query)
            t = ReplayTasks(sx, sy, qx, qy)
        return ReplayTasks(self.norm(t.support_x), t.support_y, self.norm(t.query_x), t.query_y)

    def visit(self, key, it: int) -> Optional[KDTask]:
        """Visits ``apis_per_visit`` APIs at meta-iteration ``it``, stores the recovered sets and
        records the visit; returns the KD task(s), or None if the query budget is exhausted
        (the run then stops)."""
        run = self.run
        try:
            kd, new_mem, info = self.apis.visit(self.state.params, self.state.memory, key, it)
        except QueryBudgetExceeded as e:
            run.stopped_by_budget = True
            tqdm.write(f"query budget exhausted at meta-iteration {it}: {e}")
            return None
        self.state = self.state._replace(memory=new_mem)
        run.visits += self.cfg.apis_per_visit
        run.need_api = False
        info.update(iteration=it, queries=self.total_queries())
        run.history.append({"event": "visit", **info})
        return kd

    def meta_step(self, kd: Optional[KDTask], k_rep, key) -> tuple:
        """One outer step on a meta-batch (``kd`` and replay tasks, or replay tasks only);
        ``key`` becomes the state's key. Returns ``(loss, batch-mean replay training accuracy)``."""
        cfg, st = self.cfg, self.state
        if kd is not None:
            tasks = self.replay_batch(k_rep, max(cfg.meta_batch - cfg.apis_per_visit, 1))
            params, opt, loss, accs = self.steps.kd_replay(st.params, st.opt_state, kd, tasks)
        else:
            tasks = self.replay_batch(k_rep, cfg.meta_batch)
            params, opt, loss, accs = self.steps.replay(st.params, st.opt_state, tasks)
        self.state = st._replace(params=params, opt_state=opt, key=key)
        return loss, float(jnp.mean(accs))

    def iterate(self, bar, stop_after: Optional[int]) -> bool:
        """One meta-iteration (visit if needed, outer step, plateau rule, bar, evaluation,
        checkpoint); False when the run stops here (query budget, ``stop_after``)."""
        cfg, run = self.cfg, self.run
        it = run.iteration
        key, k_visit, k_rep = jax.random.split(self.state.key, 3)
        kd = None
        if run.need_api:
            kd = self.visit(k_visit, it)
            if kd is None:
                return False
        if cfg.query_budget is not None and self.total_queries() > cfg.query_budget:
            run.stopped_by_budget = True
            return False
        loss, train_acc = self.meta_step(kd, k_rep, key)
        run.iteration = it = it + 1
        if not self.real and self.plateau.update(train_acc):
            run.need_api = True
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{train_acc:.2f}", visits=run.visits,
                        queries=self.total_queries())
        if it % cfg.eval_every == 0 or it == cfg.meta_iterations:
            self.eval_point(it, train_acc=train_acc)
        if it % cfg.checkpoint_every == 0:
            self.save()
        if stop_after is not None and it >= stop_after:
            self.save()
            return False
        return True

    def train(self, progress: bool, stop_after: Optional[int]) -> TrainResult:
        """Runs the loop to ``cfg.meta_iterations`` (or a stop), evaluates a budget stop, saves."""
        cfg, run = self.cfg, self.run
        if run.iteration == 0 and not any(h.get("event") == "eval" for h in run.history):
            self.eval_point(0)  # the initial parameters compete in model selection too
        bar = tqdm(total=cfg.meta_iterations, initial=run.iteration, disable=not progress,
                   desc="BiDf-MKD" if not self.real else "MAML (real data)", dynamic_ncols=True)
        try:
            while run.iteration < cfg.meta_iterations:
                if not self.iterate(bar, stop_after):
                    break
        finally:
            bar.close()
        evaluated_now = any(h.get("event") == "eval" and h["iteration"] == run.iteration
                            for h in run.history[-1:])
        if run.stopped_by_budget and not evaluated_now:  # stop cleanly: evaluate what we have
            self.eval_point(run.iteration)
        self.save()
        if self.ckpt is not None:
            self.ckpt.close()
        return TrainResult(self.state.best_params, self.state.params, run.history,
                           self.total_queries(), run.visits, time.time() - self.t_start,
                           run.paper_best_test, run.stopped_by_budget)


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
    _validate(cfg, pool)
    loop = _Loop(cfg, meta_apply=meta_apply, meta_init_params=meta_init_params, gen_init=gen_init,
                 gen_apply=gen_apply, pool=pool, val_tasks=val_tasks, test_tasks=test_tasks,
                 real_tasks=real_tasks, checkpoint_dir=checkpoint_dir, mesh=mesh,
                 t_start=time.time())
    return loop.train(progress, stop_after)
