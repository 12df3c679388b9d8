"""DFME: data-free model extraction from a soft-label black box (Truong et al., CVPR 2021).

A generator and the student play a min-max game on the L1 distance between the student's logits
and the teacher's logits recovered from its probabilities, ``t = log p - mean_k log p``
(``shared/specs/ideal_dfme.md`` section 4). Per iteration:

* ``g_iter`` generator steps: ``x_pre = G(z)`` (pre-activation); the gradient of the per-sample
  objective ``l_i(v) = -mean_k |S(h(v)) - t(h(v))|`` w.r.t. ``x_pre`` is *estimated* by a
  zero-order estimator of :mod:`dfml_jax.estimators` (default ``"sphere-forward"``: ``m = 1``
  direction on the unit sphere, ``eps = 1e-3``, ``d/m`` scaling, ``B (m + 1)`` queries), divided by
  ``K * B`` as in the code, and pulled back through ``G`` by its exact VJP; Adam step on ``G``.
  The student is frozen in eval mode inside the estimate (it is part of the black-box objective,
  as in the code). ``h`` is the generator's activation: ``tanh`` mapped to the API's [0, 1] input
  range (``image_range="unit"``) or left in [-1, 1] (``"symmetric"``, DFME's normalised victims).
* ``d_iter`` student steps on fresh generator batches: SGD on ``mean |S(x) - t(x)|`` (``B``
  queries each).

Queries per iteration: ``g_iter * num_queries(estimator, B, m) + d_iter * B``
(``256 * (1 * 2 + 5) = 1792`` with the defaults). The run stops when the budget cannot cover one
more iteration; the student's and the generator's learning rates follow a multistep schedule at
fractions of the iterations the budget affords (the code uses fractions of 50-iteration epochs,
which is the same for large budgets and degenerates below a few epochs).

A hard-label API is refused: DFME has no use for labels (use IDEAL).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from dfml_jax.api import BlackBoxAPI
from dfml_jax.distill.common import (Evaluator, StudentState, accuracy_point, atomic_write_json,
                                     config_dict, init_student, make_generator, memoize_builder,
                                     multistep_schedule, torch_sgd, uncommitted)
from dfml_jax.estimators import ESTIMATORS, num_queries, zo_gradient
from dfml_jax.training.run_loop import EvalAt, Method, RunOutcome, run

__all__ = ["DFMEConfig", "DFMEState", "cost_per_iteration", "num_iterations", "make_dfme_iteration",
           "recover_logits", "run_dfme", "DFMERunResult", "init_dfme_state", "DFMERun",
           "dfme_method"]


@dataclasses.dataclass(frozen=True)
class DFMEConfig:
    """Hyper-parameters of DFME (defaults: ``dfme/train.py`` of the official code).

    Attributes:
      batch_size: B (256).
      g_iter, d_iter: generator and student steps per iteration (1, 5).
      num_directions: directions per sample of the zero-order estimate (1; the official code's
        ``grad_m``).
      smoothing: smoothing step of the estimate (1e-3; the official code's ``grad_epsilon``).
      estimator: a name of :data:`dfml_jax.estimators.ESTIMATORS` (``"sphere-forward"``).
      chunk_size: directions per API call inside the estimate (None: all).
      lr_s, momentum_s, weight_decay_s: student SGD (0.1, 0.9, 5e-4).
      lr_g, betas_g: generator Adam (1e-4; PyTorch default betas).
      nz, ngf: generator latent size and width (256, 64).
      loss: ``"l1"`` (on recovered logits) or ``"kl"`` (KL(p_T || p_S); generator gradient not
        divided by ``K * B``, as in the code).
      logit_correction: ``"mean"`` (``log p - mean log p``) or ``"none"`` (``log p``).
      scheduler: ``"multistep"``, ``"cosine"`` or ``"none"``; ``steps`` are fractions of the run's
        iterations, ``scale`` the factor (0.1/0.3/0.5, 0.3).
      iterations: cap on the iterations (None: as many as the budget buys).
      image_range: ``"unit"`` maps ``tanh`` to [0, 1] (APIs taking [0, 1] images) or
        ``"symmetric"`` keeps [-1, 1].
      eval_every: evaluate every this many iterations (50 = one DFME "epoch"); budget crossings
        and the end are always evaluated.
      checkpoint_every: checkpoint every this many iterations (iterations after the last
        checkpoint are redone after a kill and their queries bought again; the count is recorded).
      on_zero_differences: precision check of the estimator (``"warn"``, ``"raise"``, ``"ignore"``).

    ``num_directions`` and ``smoothing`` were named ``grad_m`` and ``grad_epsilon`` until issue 17
    (one name per knob: the estimators' names); ``--set`` refuses the old names and saved configs
    are read under the new ones (``RENAMED_FIELDS``).
    """
    RENAMED_FIELDS: ClassVar[Dict[str, str]] = {"grad_m": "num_directions",
                                                "grad_epsilon": "smoothing"}

    batch_size: int = 256
    g_iter: int = 1
    d_iter: int = 5
    num_directions: int = 1
    smoothing: float = 1e-3
    estimator: str = "sphere-forward"
    chunk_size: Optional[int] = None
    lr_s: float = 0.1
    momentum_s: float = 0.9
    weight_decay_s: float = 5e-4
    lr_g: float = 1e-4
    betas_g: tuple = (0.9, 0.999)
    nz: int = 256
    ngf: int = 64
    loss: str = "l1"
    logit_correction: str = "mean"
    scheduler: str = "multistep"
    steps: tuple = (0.1, 0.3, 0.5)
    scale: float = 0.3
    iterations: Optional[int] = None
    image_range: str = "unit"
    eval_every: int = 50
    checkpoint_every: int = 50
    on_zero_differences: str = "warn"

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; valid: {sorted(ESTIMATORS)}")
        if self.loss not in ("l1", "kl"):
            raise ValueError(f"loss must be 'l1' or 'kl', got {self.loss!r}")
        if self.logit_correction not in ("mean", "none"):
            raise ValueError(f"logit_correction must be 'mean' or 'none', got {self.logit_correction!r}")
        if self.scheduler not in ("multistep", "cosine", "none"):
            raise ValueError(f"scheduler must be multistep, cosine or none, got {self.scheduler!r}")
        if self.image_range not in ("unit", "symmetric"):
            raise ValueError(f"image_range must be 'unit' or 'symmetric', got {self.image_range!r}")


def cost_per_iteration(cfg: DFMEConfig) -> int:
    """Queries of one DFME iteration: ``g_iter * num_queries(estimator, B, num_directions) +
    d_iter * B``.

    >>> cost_per_iteration(DFMEConfig())
    1792
    """
    return cfg.g_iter * num_queries(cfg.estimator, cfg.batch_size, cfg.num_directions) + \
        cfg.d_iter * cfg.batch_size


def num_iterations(cfg: DFMEConfig, budget: Optional[int]) -> int:
    """Iterations a budget buys (capped by ``cfg.iterations``)."""
    if budget is None and cfg.iterations is None:
        raise ValueError("DFME needs a query budget on the API or DFMEConfig.iterations")
    n = budget // cost_per_iteration(cfg) if budget is not None else cfg.iterations
    return n if cfg.iterations is None else min(n, cfg.iterations)


def recover_logits(outputs: jax.Array, output_mode: str, correction: str = "mean") -> jax.Array:
    """Teacher logits (up to a per-sample shift) from API outputs: ``log p - mean_k log p``."""
    if output_mode == "probs":
        logp = jnp.log(jnp.clip(outputs, 1e-30, None))
    elif output_mode == "logits":
        logp = jax.nn.log_softmax(outputs, axis=-1)
    else:
        raise ValueError(f"cannot recover logits from output mode {output_mode!r}")
    if correction == "mean":
        logp = logp - jnp.mean(logp, axis=-1, keepdims=True)
    return logp


class DFMEState(NamedTuple):
    """Explicit DFME state: the student (:class:`StudentState`) and the generator + its Adam."""

    student: StudentState
    gen_params: Any
    gen_opt_state: Any


def _txs(cfg: DFMEConfig, total_iters: int):
    if cfg.scheduler == "multistep":
        its = sorted(int(s * total_iters) for s in cfg.steps)
        lr_s = multistep_schedule(cfg.lr_s, [i * cfg.d_iter for i in its], cfg.scale)
        lr_g = multistep_schedule(cfg.lr_g, [i * cfg.g_iter for i in its], cfg.scale)
    elif cfg.scheduler == "cosine":
        lr_s = optax.cosine_decay_schedule(cfg.lr_s, max(total_iters * cfg.d_iter, 1))
        lr_g = optax.cosine_decay_schedule(cfg.lr_g, max(total_iters * cfg.g_iter, 1))
    else:
        lr_s, lr_g = cfg.lr_s, cfg.lr_g
    return (torch_sgd(lr_s, cfg.momentum_s, cfg.weight_decay_s),
            optax.adam(lr_g, b1=cfg.betas_g[0], b2=cfg.betas_g[1]))


def init_dfme_state(student_fm, gen_fm, cfg: DFMEConfig, total_iters: int, key) -> DFMEState:
    stx, gtx = _txs(cfg, total_iters)
    student = init_student(student_fm, stx, jax.random.fold_in(key, 0))
    gp, _ = gen_fm.init(jax.random.fold_in(key, 2))
    return DFMEState(student, gp, gtx.init(gp))


def make_dfme_iteration(api: BlackBoxAPI, student_fm, gen_fm, cfg: DFMEConfig, total_iters: int):
    """Jitted ``iteration(state, key) -> (state, metrics)``: ``g_iter`` generator steps (zero-order
    estimate through the API) then ``d_iter`` student steps, exactly
    :func:`cost_per_iteration` queries.
    """
    relevant = dataclasses.replace(cfg, eval_every=1, checkpoint_every=1, iterations=None)
    return memoize_builder("dfme_iteration", (api, student_fm.apply, gen_fm.apply),
                           (relevant, int(total_iters)),
                           lambda: _build_dfme_iteration(api, student_fm, gen_fm, cfg, total_iters))


def _build_dfme_iteration(api, student_fm, gen_fm, cfg, total_iters):
    k = api.num_classes
    b = cfg.batch_size
    stx, gtx = _txs(cfg, total_iters)
    mode = api.output

    def to_image(v):
        x = jnp.tanh(v)
        return (x + 1.0) * 0.5 if cfg.image_range == "unit" else x

    def teacher_targets(x):
        out = api(jax.lax.stop_gradient(x))
        if cfg.loss == "l1":
            return recover_logits(out, mode, cfg.logit_correction)
        return out if mode == "probs" else jax.nn.softmax(out, axis=-1)

    def per_sample_loss(s_logits, t):
        if cfg.loss == "l1":
            return jnp.mean(jnp.abs(s_logits - t), axis=-1)
        logp_s = jax.nn.log_softmax(s_logits, axis=-1)
        return jnp.sum(jax.scipy.special.xlogy(t, t) - t * logp_s, axis=-1)

    @jax.jit
    def iteration(state: DFMEState, key):
        st, gp, gos = state
        kg, ks = jax.random.split(key)
        loss_g = jnp.zeros((), jnp.float32)
        for j in range(cfg.g_iter):
            kz, ke = jax.random.split(jax.random.fold_in(kg, j))
            z = jax.random.normal(kz, (b, cfg.nz), jnp.float32)
            x_pre, pull_back = jax.vjp(
                lambda p: gen_fm.apply_batchstats(p, z, pre_activation=True), gp)

            def objective(v):  # (B, *shape) -> (B,): the student is frozen, in eval mode
                x = to_image(v)
                s_logits, _ = student_fm.apply(st.params, st.bn, x, train=False)
                return -per_sample_loss(s_logits, teacher_targets(x))

            est = zo_gradient(objective, jax.lax.stop_gradient(x_pre), ke,
                              estimator=cfg.estimator, num_directions=cfg.num_directions,
                              smoothing=cfg.smoothing, chunk_size=cfg.chunk_size,
                              on_zero_differences=cfg.on_zero_differences)
            # est.grad estimates the gradient of the objective l_i = -loss_i; it is the cotangent
            # of G's output and Adam *minimises* the objective (maximises the disagreement), as
            # the code's ``fake.backward(grad_est); optimizer_G.step()``.
            grad_x = est.grad / (k * b) if cfg.loss == "l1" else est.grad
            (g_grads,) = pull_back(grad_x.astype(x_pre.dtype))
            updates, gos = gtx.update(g_grads, gos, gp)
            gp = optax.apply_updates(gp, updates)
            loss_g = jnp.mean(est.values) if est.values is not None else loss_g

        def student_step(st, kk):
            z = jax.random.normal(kk, (b, cfg.nz), jnp.float32)
            x = jax.lax.stop_gradient(
                to_image(gen_fm.apply_batchstats(gp, z, pre_activation=True)))
            t = teacher_targets(x)

            def loss(params):
                s_logits, new_bn = student_fm.apply(params, st.bn, x, train=True)
                return jnp.mean(per_sample_loss(s_logits, t)), new_bn

            (value, new_bn), grads = jax.value_and_grad(loss, has_aux=True)(st.params)
            updates, opt_state = stx.update(grads, st.opt_state, st.params)
            return StudentState(optax.apply_updates(st.params, updates), new_bn, opt_state), value

        st, losses_s = jax.lax.scan(student_step, st, jax.random.split(ks, cfg.d_iter))
        return DFMEState(st, gp, gos), {"loss_G": loss_g, "loss_S": jnp.mean(losses_s)}

    return iteration


@dataclasses.dataclass
class DFMERunResult:
    """Outcome of :func:`run_dfme` (see :class:`~dfml_jax.distill.ideal.PoolRunResult`).

    ``requeried`` counts queries bought again because a kill lost iterations done after the last
    checkpoint (0 for an uninterrupted run).
    """

    curve: List[Dict[str, Any]]
    queries: int
    iterations: int
    stopped: str
    finished: bool
    params: Any
    bn: Any
    cost_per_iteration: int
    requeried: int
    seconds: float

    def summary(self) -> Dict[str, Any]:
        return {"curve": self.curve, "queries": self.queries, "iterations": self.iterations,
                "stopped": self.stopped, "finished": self.finished,
                "cost_per_iteration": self.cost_per_iteration, "requeried": self.requeried,
                "seconds": self.seconds}


def _check_api(api: BlackBoxAPI) -> None:
    try:
        api.require_output(("probs", "logits"), "DFME")
    except ValueError as e:
        raise ValueError(
            f"{e} DFME trains on the teacher's logits recovered from its probabilities "
            "(log p - mean log p); a hard-label or top-k API does not reveal them. For a "
            "hard-label API use IDEAL (dfml_jax.distill.run_pool_distillation).") from None


class DFMERun(NamedTuple):
    """DFME's run state: the algorithm's :class:`DFMEState` and ``requeried``, the queries bought
    again because a kill lost iterations done after the last checkpoint (0 without a kill)."""

    state: DFMEState
    requeried: int


def dfme_method(api: BlackBoxAPI, student_fm, cfg: DFMEConfig, *, seed: int = 0,
                evaluator: Optional[Evaluator] = None, workdir: Optional[str] = None,
                name: str = "DFME", generator: Any = None) -> Method:
    """DFME as a run-loop method: a step is an iteration of exactly :func:`cost_per_iteration`
    queries; the run makes as many as the API's budget (or ``cfg.iterations``) allows.

    Args:
      api, student_fm, cfg, evaluator, name, generator: as :func:`run_dfme`.
      seed: recorded in ``result.json`` (the run's key is :func:`run`'s).
      workdir: directory of ``queries_log.json`` (what was bought, for ``requeried``).

    Returns:
      The :class:`~dfml_jax.training.run_loop.Method`.
    """
    _check_api(api)
    cfg.validate()
    cost = cost_per_iteration(cfg)
    total = num_iterations(cfg, None if api.remaining is None else api.queries + api.remaining)
    gen_fm = (generator or make_generator(cfg, api.input_shape, head="tanh_bn"))[1]
    iteration = make_dfme_iteration(api, student_fm, gen_fm, cfg, total)
    log_path = os.path.join(workdir, "queries_log.json") if workdir else None

    def step(run_state: DFMERun, key, it: int):
        state, metrics = iteration(run_state.state, key)
        jax.block_until_ready(state)
        if log_path:
            atomic_write_json(log_path, {"answered": api.queries + run_state.requeried,
                                         "iteration": it})
        return run_state._replace(state=state), {k: float(v) for k, v in metrics.items()}

    def evaluate(run_state: DFMERun, at: EvalAt):
        st = run_state.state.student
        return run_state, [accuracy_point(
            evaluator, "iteration", at, st.params, st.bn,
            loss_G=at.metrics.get("loss_G", float("nan")),
            loss_S=at.metrics.get("loss_S", float("nan")))]

    def restore(run_state: DFMERun, saved) -> DFMERun:
        if saved is not None:
            s = uncommitted(saved[0])["state"]
            run_state = DFMERun(DFMEState(StudentState(*s[0]), s[1], s[2]),
                                int(saved[1].get("requeried", 0)))
        if log_path and os.path.exists(log_path):
            with open(log_path) as f:
                logged = json.load(f)["answered"]
            # Everything bought beyond the checkpoint's trajectory was lost and is bought again.
            run_state = run_state._replace(requeried=max(run_state.requeried,
                                                         logged - api.queries))
        return run_state

    return Method(
        name=name, init=lambda key: DFMERun(init_dfme_state(student_fm, gen_fm, cfg, total, key), 0),
        step=step, restore=restore,
        checkpoint=lambda s: ({"state": s.state},
                              {"requeried": s.requeried, "config": config_dict(cfg)}),
        evaluate=evaluate if evaluator is not None else None, step_cost=lambda s, i: cost,
        query_cost=cost, num_steps=total,
        limit_reason="budget" if cfg.iterations is None or total < cfg.iterations else "iterations",
        step_key="iteration", unit="it", show=("loss_S",),
        info={"config": config_dict(cfg), "seed": seed})


def run_dfme(api: BlackBoxAPI, student_fm, cfg: DFMEConfig, *, seed: int,
             evaluator: Optional[Evaluator] = None, workdir: Optional[str] = None,
             max_iterations: Optional[int] = None, eval_budgets: Sequence[int] = (),
             progress: bool = False, name: str = "DFME", generator: Any = None) -> DFMERunResult:
    """Runs DFME against a soft-label API until its budget (or ``cfg.iterations``) is spent.

    Args:
      api: the teacher; ``output`` must be ``"probs"`` or ``"logits"`` (hard labels are refused
        with an explanation). Its budget fixes the number of iterations (and the LR schedule).
      student_fm: the student's :class:`~dfml_jax.models.FunctionalModel`.
      cfg: :class:`DFMEConfig`.
      seed: PRNG seed.
      evaluator: validation/test accuracy; None: no curve.
      workdir: checkpoints (resume by rerunning with the same directory).
      max_iterations: stop unfinished after this many iterations in total (simulated kill).
      eval_budgets: query counts at which to evaluate as well.
      progress: tqdm bar.
      name: label.
      generator: optional ``(module, functional)`` with a ``tanh_bn`` head.

    Returns:
      :class:`DFMERunResult`.
    """
    t0 = time.perf_counter()
    method = dfme_method(api, student_fm, cfg, seed=seed, evaluator=evaluator, workdir=workdir,
                         name=name, generator=generator)

    def result(out: RunOutcome) -> DFMERunResult:
        st = out.state.state.student
        return DFMERunResult(curve=out.curve, queries=api.queries, iterations=out.steps,
                             stopped=out.stopped, finished=out.finished, params=st.params,
                             bn=st.bn, cost_per_iteration=method.query_cost,
                             requeried=out.state.requeried, seconds=out.seconds)

    out = run(method, api, key=jax.random.key(seed), workdir=workdir, eval_every=cfg.eval_every,
              eval_budgets=eval_budgets, checkpoint_every=cfg.checkpoint_every,
              max_steps=max_iterations, progress=progress, started=t0,
              summary=lambda o: result(o).summary())
    return result(out)
