"""The BiDf-MKD training loop: API visits, bi-level KD, memory replay, plateau rule, evaluation.

Host-side orchestration of jitted pure steps (:mod:`.inversion`, :mod:`.metastep`) over explicit
state (:class:`LoopState`), checkpointed with orbax so a killed run resumes without losing work or
re-buying queries. The loop follows the official code (spec ``bidf_mkd.md`` section 6):

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

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dfml_jax.augment import batch_shared_augment, normalize
from dfml_jax.blackbox import BlackBoxAPI, QueryBudgetExceeded, group_apis, surface_api_errors
from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.losses import teacher_probs
from dfml_jax.memory import (MemoryState, PlateauTrigger, init_memory, row_of_classes,
                             sample_tasks, write)
from dfml_jax.meta import evaluate_tasks
from dfml_jax.parallel import replicate, sharded_group_query

from .inversion import InversionConfig, inversion_queries, make_inverter
from .metastep import KDTask, ReplayTasks, cached_meta_steps

__all__ = ["BiDfMKDConfig", "TeacherPool", "LoopState", "train_bidf_mkd", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class BiDfMKDConfig:
    """Everything the loop needs; paper values in comments (spec section 8)."""
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
    q: int = 100
    mu: float = 0.005
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
    query_budget: Optional[int] = None
    checkpoint_every: int = 50
    seed: int = 2022

    @property
    def flip(self) -> bool:
        """Whether inversion and KD augmentation flip images (``inv_flip``; None: True)."""
        return True if self.inv_flip is None else bool(self.inv_flip)

    def inversion(self) -> InversionConfig:
        return InversionConfig(iterations=self.inv_iterations, per_class=self.inv_per_class,
                               lr=self.inv_lr, estimator=self.estimator, num_directions=self.q,
                               smoothing=self.mu, chunk_size=self.chunk_size,
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


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _augment(x, k, pad, size, mean, std, flip=True):
    return batch_shared_augment(x, k, pad=pad, flip=flip, out_size=size, mean=mean, std=std)


def _store(mem: MemoryState, rows, res, probs, cfg: BiDfMKDConfig):
    """Writes one recovered set (interleaved targets ``[0..K-1] * per_class``) into the memory,
    grouped by class; with ``cfg.memory_filter == "api_agree"`` only the images whose API answer
    ``probs`` (to the KD query of this set) has its maximum at the target are kept.

    Returns:
      ``(memory, fraction of the set kept)``.
    """
    k = probs.shape[-1]
    per_class = res.images.reshape((cfg.inv_per_class, k) + res.images.shape[1:])
    keep = None
    if cfg.memory_filter == "api_agree":
        agree = jnp.argmax(probs, axis=-1) == res.targets
        keep = agree.reshape(cfg.inv_per_class, k).T
    mem = write(mem, rows, jnp.swapaxes(per_class, 0, 1), keep)
    return mem, 1.0 if keep is None else float(jnp.mean(keep))


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
    t_start = time.time()
    mean, std = (pool.mean, pool.std) if pool is not None else ((0.0,), (1.0,))
    norm = lambda x: normalize(x, mean, std)
    optimizer = optax.adam(cfg.outer_lr)
    steps = cached_meta_steps(meta_apply, cfg.outer_lr, replay_steps=cfg.replay_inner_steps,
                              kd_steps=cfg.kd_inner_steps, inner_lr=cfg.inner_lr,
                              kd_loss=cfg.kd_loss, first_order=cfg.first_order, mesh=mesh)
    inv_cfg = cfg.inversion()
    image_shape = tuple(val_tasks[0].shape[2:])
    real = cfg.replay_source == "real"

    memory_classes = np.unique(np.concatenate([np.asarray(c) for c in pool.classes])) if not real \
        else np.arange(1)
    rows = len(memory_classes)
    state = LoopState(meta_init_params, optimizer.init(meta_init_params),
                      init_memory(rows if not real else 1, cfg.memory_slots if not real else 1,
                                  cfg.inv_per_class if not real else 1, image_shape),
                      jax.random.key(cfg.seed), meta_init_params)
    host = {"iteration": 0, "need_api": not real, "visits": 0, "history": [],
            "best_val": -1.0, "paper_best_test": None, "plateau": None, "ledgers": None,
            "train_accs": [], "stopped_by_budget": False}
    plateau = PlateauTrigger(cfg.plateau_patience)

    ckpt = RunCheckpointer(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None:
        restored = ckpt.restore_latest(state)
        if restored is not None:
            _, arrays, meta = restored
            state = LoopState(*arrays) if not isinstance(arrays, LoopState) else arrays
            host.update(meta)
            plateau.load_state_dict(host["plateau"])
            if pool is not None and host["ledgers"]:
                for api, led in zip(pool.apis, host["ledgers"]):
                    api.ledger.load_state_dict(led)
    if mesh is not None:  # the state lives replicated on the mesh (whatever wrote the checkpoint)
        state = replicate(state, mesh)

    def total_queries():
        return 0 if pool is None else int(sum(a.queries for a in pool.apis))

    def save():
        if ckpt is None:
            return
        host["plateau"] = plateau.state_dict()
        host["ledgers"] = None if pool is None else [a.ledger.state_dict() for a in pool.apis]
        ckpt.save(host["iteration"], state, host)

    groups, locate = group_apis(pool.apis) if pool is not None else ([], [])
    operands: Dict[int, Any] = {}

    def operand(g: int):
        """Group ``g``'s operand (stacked in-graph teachers), replicated once on the mesh."""
        if mesh is None:
            return groups[g].operand
        if g not in operands:
            operands[g] = replicate(groups[g].operand, mesh)
        return operands[g]
    inverters: Dict[tuple, Callable] = {}

    def inverter(i: int):
        """The compiled inversion serving API ``i`` (shared by its whole group), and its args."""
        g, m = locate[i]
        wb_fn, wb_params = pool.white_box_teachers[i] if cfg.white_box else (None, None)
        key = (g, id(wb_fn))
        if key not in inverters:
            inverters[key] = make_inverter(groups[g], gen_apply, nz=cfg.nz, cfg=inv_cfg, mean=mean,
                                           std=std, image_size=pool.image_size,
                                           student_apply=meta_apply, teacher_fn=wb_fn, mesh=mesh,
                                           shard=cfg.inv_shard)
        inv = inverters[key]
        return lambda k, student: inv(k, m, gen_init(jax.random.fold_in(k, 7)), operand(g),
                                      student, wb_params)

    def aug(x, k):
        return _augment(x, k, cfg.inv_pad, pool.image_size, tuple(mean), tuple(std), cfg.flip)

    askers: Dict[int, Callable] = {}

    def ask(i: int, x):
        """API ``i``'s answer on ``x``: eager on one device; with a mesh, one host call per device
        shard (works across hosts)."""
        if mesh is None:
            return pool.apis[i](x)
        g, m = locate[i]
        if g not in askers:
            askers[g] = sharded_group_query(groups[g], mesh)
        return askers[g](m, x, operand(g))

    def kd_visit(params, key) -> tuple:
        """Visits one API: support inversion, adaptation, boundary query inversion, memory write."""
        k_pick, k_s, k_sa, k_q, k_qa = jax.random.split(key, 5)
        i = int(jax.random.randint(k_pick, (), 0, len(pool.apis)))
        api = pool.apis[i]
        b = api.num_classes * cfg.inv_per_class
        cost = 2 * (inversion_queries(inv_cfg, api.num_classes, cfg.white_box) + b)
        inv = inverter(i)
        with api.reserve(cost), surface_api_errors():
            s = inv(k_s, None)
            s_aug = aug(s.images, k_sa)
            s_p = teacher_probs(ask(i, s_aug), api.output, api.num_classes)
            boundary = host["iteration"] >= cfg.boundary_start
            fast = steps.adapt_support(params, s_aug, s_p) if boundary else None
            qr = inv(k_q, fast)
            q_aug = aug(qr.images, k_qa)
            q_p = teacher_probs(ask(i, q_aug), api.output, api.num_classes)
            jax.block_until_ready((s, qr, s_p, q_p))  # the ledger is exact once results exist
        mem_rows = jnp.asarray(row_of_classes(memory_classes, pool.classes[i]))
        new_mem = state.memory
        kept = []
        for res, probs in ((s, s_p), (qr, q_p)):  # both recovered sets go to the memory
            new_mem, k = _store(new_mem, mem_rows, res, probs, cfg)
            kept.append(k)
        info = {"api": i, "support_ce": float(s.clean_ce[-1]), "support_api_acc": float(s.api_acc[-1]),
                "query_api_acc": float(qr.api_acc[-1]), "boundary": bool(boundary),
                "zero_diff_frac": float(s.zero_fraction.mean()), "memory_kept": float(np.mean(kept))}
        return KDTask(s_aug, s_p, q_aug, q_p, qr.targets), new_mem, info

    def many_inverter(g: int, boundary: bool):
        """All picked members of group ``g`` inverted at once (vmapped over the API index)."""
        key = ("many", g, boundary)
        if key not in inverters:
            inv = make_inverter(groups[g], gen_apply, nz=cfg.nz, cfg=inv_cfg, mean=mean, std=std,
                                image_size=pool.image_size, student_apply=meta_apply, mesh=mesh,
                                shard=cfg.inv_shard)
            axes = (0, 0, 0, None) + ((0,) if boundary else ())
            inverters[key] = jax.jit(jax.vmap(inv, in_axes=axes))
        return inverters[key]

    def kd_visit_many(params, key) -> tuple:
        """Visits ``apis_per_visit`` distinct APIs at once: the inversions of the picked members
        of a group run as ONE vmapped call over the API index (each member answers and is
        charged for its own samples); every visited API adds one KD task to the meta-batch."""
        k_pick, k_each = jax.random.split(key)
        picked = [int(i) for i in np.asarray(jax.random.choice(
            k_pick, len(pool.apis), (cfg.apis_per_visit,), replace=False))]
        keys = {i: jax.random.split(jax.random.fold_in(k_each, i), 4) for i in picked}
        boundary = host["iteration"] >= cfg.boundary_start
        by_group: Dict[int, list] = {}
        for i in picked:
            by_group.setdefault(locate[i][0], []).append(i)
        parts: Dict[int, dict] = {}
        new_gens = lambda ks: jax.vmap(lambda k: gen_init(jax.random.fold_in(k, 7)))(ks)
        with contextlib.ExitStack() as stack:
            for i in picked:
                api = pool.apis[i]
                b = api.num_classes * cfg.inv_per_class
                stack.enter_context(api.reserve(2 * (inversion_queries(inv_cfg, api.num_classes) + b)))
            stack.enter_context(surface_api_errors())
            for g, members in by_group.items():
                idx = jnp.asarray([locate[i][1] for i in members], jnp.int32)
                ks = lambda j: jnp.stack([keys[i][j] for i in members])
                s = many_inverter(g, False)(ks(0), idx, new_gens(ks(0)), operand(g))
                for n, i in enumerate(members):
                    api = pool.apis[i]
                    s_i = jax.tree.map(lambda a: a[n], s)
                    s_aug = aug(s_i.images, keys[i][1])
                    parts[i] = dict(s=s_i, s_aug=s_aug,
                                    s_p=teacher_probs(ask(i, s_aug), api.output, api.num_classes))
                if boundary:
                    fast = jax.tree.map(lambda *a: jnp.stack(a), *[
                        steps.adapt_support(params, parts[i]["s_aug"], parts[i]["s_p"]) for i in members])
                    qr = many_inverter(g, True)(ks(2), idx, new_gens(ks(2)), operand(g), fast)
                else:
                    qr = many_inverter(g, False)(ks(2), idx, new_gens(ks(2)), operand(g))
                for n, i in enumerate(members):
                    api = pool.apis[i]
                    q_i = jax.tree.map(lambda a: a[n], qr)
                    q_aug = aug(q_i.images, keys[i][3])
                    parts[i].update(q=q_i, q_aug=q_aug,
                                    q_p=teacher_probs(ask(i, q_aug), api.output, api.num_classes))
            jax.block_until_ready([(p["s_p"], p["q_p"], p["q"].images) for p in parts.values()])
        new_mem, kept = state.memory, []
        for i in picked:
            mem_rows = jnp.asarray(row_of_classes(memory_classes, pool.classes[i]))
            for res, probs in ((parts[i]["s"], parts[i]["s_p"]), (parts[i]["q"], parts[i]["q_p"])):
                new_mem, k = _store(new_mem, mem_rows, res, probs, cfg)
                kept.append(k)
        stacked = lambda name: jnp.stack([parts[i][name] for i in picked])
        kd = KDTask(stacked("s_aug"), stacked("s_p"), stacked("q_aug"), stacked("q_p"),
                    jnp.stack([parts[i]["q"].targets for i in picked]))
        info = {"api": picked, "support_ce": [float(parts[i]["s"].clean_ce[-1]) for i in picked],
                "support_api_acc": [float(parts[i]["s"].api_acc[-1]) for i in picked],
                "query_api_acc": [float(parts[i]["q"].api_acc[-1]) for i in picked],
                "boundary": bool(boundary),
                "zero_diff_frac": float(np.mean([float(parts[i]["s"].zero_fraction.mean())
                                                 for i in picked])),
                "memory_kept": float(np.mean(kept))}
        return kd, new_mem, info

    def sample_memory(m, k, n):
        return _sample_memory(m, k, n, cfg.ways, cfg.shots, cfg.query)

    def replay_batch(key, n) -> ReplayTasks:
        if real:
            t = real_tasks(key)
            t = ReplayTasks(*(a[:n] for a in t))
        else:
            sx, sy, qx, qy, _ = sample_memory(state.memory, key, n)
            t = ReplayTasks(sx, sy, qx, qy)
        return ReplayTasks(norm(t.support_x), t.support_y, norm(t.query_x), t.query_y)

    val = tuple(jnp.asarray(a) for a in val_tasks)

    paper_test = None if not (cfg.paper_eval_tasks and test_tasks is not None) else tuple(
        jnp.asarray(a)[:cfg.paper_eval_tasks] for a in test_tasks)

    def evaluate(params, tasks, lr=cfg.inner_lr, steps=cfg.finetune_steps):
        sx, sy, qx, qy = tasks
        return evaluate_tasks(meta_apply, params, norm(sx), sy, norm(qx), qy,
                              steps=steps, lr=lr, batch_size=25)

    def eval_point(st: LoopState, it: int, **info) -> LoopState:
        """Evaluates ``st.params`` on the meta-validation tasks (and, for the paper protocol, on
        the test tasks with ``paper_lr`` / ``paper_steps``), appends the record to the history and
        keeps the parameters as ``best_params`` if their validation accuracy is the best so far."""
        r = evaluate(st.params, val)
        rec = {"event": "eval", "iteration": it, "val_acc": r.mean, "val_ci": r.ci95,
               "queries": total_queries(), "visits": host["visits"], **info,
               "wall_s": time.time() - t_start}
        if r.mean > host["best_val"]:
            host["best_val"] = r.mean
            st = st._replace(best_params=st.params)
        if paper_test is not None:
            tr = evaluate(st.params, paper_test, cfg.paper_lr, cfg.paper_steps)
            rec.update(test_acc_paper_protocol=tr.mean, test_ci_paper_protocol=tr.ci95)
            prev = host["paper_best_test"]
            host["paper_best_test"] = tr.mean if prev is None else max(prev, tr.mean)
        host["history"].append(rec)
        return st

    if host["iteration"] == 0 and not any(h.get("event") == "eval" for h in host["history"]):
        state = eval_point(state, 0)  # the initial parameters compete in model selection too

    bar = tqdm(total=cfg.meta_iterations, initial=host["iteration"], disable=not progress,
               desc="BiDf-MKD" if not real else "MAML (real data)", dynamic_ncols=True)
    try:
        while host["iteration"] < cfg.meta_iterations:
            it = host["iteration"]
            key, k_visit, k_rep = jax.random.split(state.key, 3)
            kd = None
            if host["need_api"]:
                try:
                    visit = kd_visit if cfg.apis_per_visit == 1 else kd_visit_many
                    kd, new_mem, info = visit(state.params, k_visit)
                except QueryBudgetExceeded as e:
                    host["stopped_by_budget"] = True
                    tqdm.write(f"query budget exhausted at meta-iteration {it}: {e}")
                    break
                state = state._replace(memory=new_mem)
                host["visits"] += cfg.apis_per_visit
                host["need_api"] = False
                info.update(iteration=it, queries=total_queries())
                host["history"].append({"event": "visit", **info})
            if cfg.query_budget is not None and total_queries() > cfg.query_budget:
                host["stopped_by_budget"] = True
                break
            if kd is not None:
                tasks = replay_batch(k_rep, max(cfg.meta_batch - cfg.apis_per_visit, 1))
                params, opt, loss, accs = steps.kd_replay(state.params, state.opt_state, kd, tasks)
            else:
                tasks = replay_batch(k_rep, cfg.meta_batch)
                params, opt, loss, accs = steps.replay(state.params, state.opt_state, tasks)
            state = state._replace(params=params, opt_state=opt, key=key)
            train_acc = float(jnp.mean(accs))
            host["iteration"] = it = it + 1
            if not real and plateau.update(train_acc):
                host["need_api"] = True
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{train_acc:.2f}", visits=host["visits"],
                            queries=total_queries())
            if it % cfg.eval_every == 0 or it == cfg.meta_iterations:
                state = eval_point(state, it, train_acc=train_acc)
            if it % cfg.checkpoint_every == 0:
                save()
            if stop_after is not None and it >= stop_after:
                save()
                break
    finally:
        bar.close()
    evaluated_now = any(h.get("event") == "eval" and h["iteration"] == host["iteration"]
                        for h in host["history"][-1:])
    if host["stopped_by_budget"] and not evaluated_now:  # stop cleanly: evaluate what we have
        state = eval_point(state, host["iteration"])
    save()
    if ckpt is not None:
        ckpt.close()
    return TrainResult(state.best_params, state.params, host["history"], total_queries(),
                       host["visits"], time.time() - t_start, host["paper_best_test"],
                       host["stopped_by_budget"])
