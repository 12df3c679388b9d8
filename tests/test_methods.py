"""Every method of the registry on the shared run loop, at tiny sizes: it runs, stops within its
query budget with the ledger's count, resumes after a kill to the run it would have made, and
writes its curve (``dfml_jax.methods.METHODS``, walked as evosax's tests walk its strategies).

Tiny problems per family: 8x8 images, a linear host teacher (or a pool of two), MLP students and
meta-models; each case is run uninterrupted, then killed after ``kill`` steps and resumed in a
"new process" (fresh API objects, the same work directory).
"""
import json
import math
import threading
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.bidf_mkd.experiment import BiDfExperimentConfig
from dfml_jax.bidf_mkd.inversion import InversionConfig, inversion_queries
from dfml_jax.bidf_mkd.train import BiDfMKDConfig, TeacherPool
from dfml_jax.api import BlackBoxAPI
from dfml_jax.distill import DFMEConfig, Evaluator, IDEALConfig, cost_per_iteration
from dfml_jax.methods import FAMILIES, METHODS
from dfml_jax.models import create_model, functional
from dfml_jax.training.run_loop import run

SHAPE, K = (8, 8, 1), 10           # distillation: 8x8 images, 10 classes
WAYS, NCLS = 5, 8                  # meta-learning: 5-way tasks, 8 meta-train classes


class Teacher:
    """A linear host teacher that counts the samples it answers (thread-safe)."""

    def __init__(self, seed: int, classes: int):
        self.w = np.random.default_rng(seed).normal(size=(64, classes)).astype(np.float32) * 3
        self.answered, self.lock = 0, threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.answered += len(x)
        return x.reshape(len(x), -1) @ self.w


class Case(NamedTuple):
    """One method's tiny run: ``make(workdir) -> (method, apis, teachers)`` builds it afresh."""
    make: Callable[[str], tuple]
    key: Any
    budget: Optional[int]          # per API
    expected_queries: Optional[int]
    kill: int
    run_kwargs: dict
    exact: bool                    # resumed arrays bit for bit (else to float tolerance)


# ----------------------------------------------------------------------------- the families
@pytest.fixture(scope="module")
def distill_world():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[:200, ..., None], d.target[:200].astype(np.int32)
    student = functional(create_model("mlp", num_classes=K, input_shape=SHAPE, hidden=(16,),
                                      rngs_or_key=0))
    ev = Evaluator(student, {"val": (x[:100], y[:100]), "test": (x[100:], y[100:])})
    return SimpleNamespace(student=student, evaluator=ev)


def distill_case(entry, world, tmp_path) -> Case:
    if entry.name == "dfme":
        cfg = entry.configure(DFMEConfig(batch_size=8, nz=8, ngf=4, eval_every=1,
                                         checkpoint_every=1))
        cost = cost_per_iteration(cfg)
        budget, expected, output, kill = 3 * cost - 1, 2 * cost, "probs", 1
    else:       # a pool round that is bought and logged but not checkpointed is replayed
        cfg = entry.configure(IDEALConfig(batch_size=20, g_steps=2, nz=8, ngf=4, aug_pad=1,
                                          distill_augment="crop", eval_every=2,
                                          checkpoint_every=2))
        budget, expected, output, kill = 100, 100, "label", 3

    def make(workdir):
        teacher = Teacher(0, K)
        api = BlackBoxAPI.from_host(teacher, SHAPE, K, output=output, budget=budget)
        method = entry.build(api, world.student, cfg, seed=0, evaluator=world.evaluator,
                             workdir=workdir)
        return method, api, [teacher]

    return Case(make, jax.random.key(0), budget, expected, kill,
                dict(eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every), True)


@pytest.fixture(scope="module")
def meta_world():
    meta = functional(create_model("mlp", num_classes=WAYS, input_shape=SHAPE, rngs_or_key=0,
                                   hidden=(16,)))
    gen = functional(create_model("dcgan", nz=8, ngf=4, img_size=8, nc=1, rngs_or_key=0))
    return SimpleNamespace(meta=meta, gen=gen)


def tasks(key, n=6, shots=1, query=3):
    x = jax.random.uniform(key, (n, WAYS * (shots + query)) + SHAPE)
    y = jnp.tile(jnp.repeat(jnp.arange(WAYS), shots + query)[None], (n, 1))
    return x[:, :WAYS * shots], y[:, :WAYS * shots], x[:, WAYS * shots:], y[:, WAYS * shots:]


def meta_case(entry, world, tmp_path) -> Case:
    cfg = entry.configure(BiDfMKDConfig(
        shots=1, query=3, meta_iterations=5, meta_batch=2,
        inversion=InversionConfig(iterations=2, per_class=4, num_directions=2, smoothing=0.01,
                                  pad=1),
        nz=8, ngf=4, memory_slots=3, plateau_patience=1,
        boundary_start=2, eval_every=2, val_tasks=6, replay_inner_steps=1, kd_inner_steps=1,
        checkpoint_every=2))
    per_visit = 2 * (inversion_queries(cfg.inversion_config(), WAYS, cfg.white_box)
                     + WAYS * cfg.inversion.per_class)
    budget = None if cfg.replay_source == "real" else per_visit + 10   # one visit per API

    def make(workdir):
        pool, teachers = None, []
        if budget is not None:
            teachers = [Teacher(10 + i, WAYS) for i in range(2)]
            apis = [BlackBoxAPI.from_host(t, SHAPE, WAYS, name=f"api{i}", budget=budget)
                    for i, t in enumerate(teachers)]
            classes = [list(np.random.RandomState(i).choice(NCLS, WAYS, replace=False))
                       for i in range(2)]
            wb = [(lambda w, x: x.reshape(x.shape[0], -1) @ w, jnp.asarray(t.w))
                  for t in teachers]
            pool = TeacherPool(apis, classes, (0.5,), (0.5,), 8, wb)
        method = entry.build(cfg, meta_apply=world.meta.apply_batchstats,
                             meta_init_params=world.meta.params,
                             gen_init=lambda k: world.gen.init(k)[0],
                             gen_apply=world.gen.apply_batchstats, pool=pool,
                             val_tasks=tasks(jax.random.key(0)),
                             real_tasks=lambda k: tasks(k, n=2))
        return method, pool.apis if pool is not None else (), teachers

    return Case(make, jax.random.key(cfg.seed), budget, None, 2,
                dict(eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every), False)


def baseline_case(entry, world, tmp_path) -> Case:
    meta = world.meta
    cfg = entry.configure(BiDfExperimentConfig(meta_arch="mlp", num_apis=4))
    teachers = [SimpleNamespace(params={"params": jax.tree.map(lambda a: a + i, meta.params)})
                for i in range(2)]

    def make(workdir):
        method = entry.build(meta.params, cfg, teachers=teachers,
                             records=[{"arch": "mlp"}] * 2)
        return method, (), []

    return Case(make, jax.random.key(0), None, 0, 0, {}, True)


CASES = {"distill": distill_case, "meta": meta_case, "baseline": baseline_case}


# ----------------------------------------------------------------------------- checks
def same(a, b, exact: bool) -> bool:
    """Equal records/values (NaN equals NaN; ``wall_s`` ignored; floats to 1e-5 if not exact)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in a if k != "wall_s"]
        return keys == [k for k in b if k != "wall_s"] and all(same(a[k], b[k], exact)
                                                               for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, exact) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b if exact else math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b


def arrays(method, state):
    """The checkpointed arrays of a state (numbers only; keys as their data)."""
    out = []
    for x in jax.tree.leaves(method.checkpoint(state)[0]):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, (jax.Array, np.ndarray, float, int)):
            out.append(np.asarray(x))
    return out


def summary(out):
    return {"curve": out.curve, "queries": out.queries, "steps": out.steps,
            "stopped": out.stopped}


def test_registry_lists_every_method_once():
    assert {"ideal", "naive_kd", "dfme", "bidf_mkd", "random", "random_scaled",
            "average"} <= set(METHODS)
    for name, entry in METHODS.items():
        assert entry.name == name and entry.family in FAMILIES and callable(entry.run)
        assert isinstance(entry.configure(), entry.config)


def test_experiment_runners_find_their_methods_in_the_registry():
    """Every method the two experiment runners run is a registry entry; the distillation
    experiment's sections are configured by theirs (NaiveKD: the ideal section, noise images)."""
    import dataclasses

    from dfml_jax.bidf_mkd import experiment as bidf_experiment
    from dfml_jax.distill import experiment as distill_experiment

    assert set(bidf_experiment.METHODS) <= set(METHODS)
    names = distill_experiment.REGISTRY_NAMES
    assert set(names) == set(distill_experiment.METHODS) and set(names.values()) <= set(METHODS)
    ideal = IDEALConfig(batch_size=7, synth="noise")
    cfg = SimpleNamespace(ideal=ideal, naive=None, dfme=DFMEConfig(batch_size=9))
    config = distill_experiment.method_config
    assert config(cfg, "ideal") == dataclasses.replace(ideal, synth="generator")
    assert config(cfg, "naive") == dataclasses.replace(ideal, synth="noise")
    assert config(cfg, "dfme") == cfg.dfme
    cfg.naive = IDEALConfig(batch_size=5)
    assert config(cfg, "naive") == IDEALConfig(batch_size=5, synth="noise")
    assert distill_experiment.ideal_config(cfg, "noise") == config(cfg, "naive")


@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_within_budget_resumes_and_writes_its_curve(name, tmp_path, distill_world,
                                                                  meta_world):
    entry = METHODS[name]
    world = distill_world if entry.family == "distill" else meta_world
    case = CASES[entry.family](entry, world, tmp_path)
    outs = {}
    for tag, wd, max_steps in (("full", "full", None), ("part", "killed", case.kill),
                               ("resumed", "killed", None)):
        workdir = str(tmp_path / wd)
        method, apis, teachers = case.make(workdir)
        out = run(method, apis, key=case.key, workdir=workdir, max_steps=max_steps,
                  summary=summary, **case.run_kwargs)
        outs[tag] = (method, out, apis, sum(t.answered for t in teachers))
    (method, full, apis, bought), (_, part, _, bought_b), (_, resumed, _, bought_c) = (
        outs["full"], outs["part"], outs["resumed"])
    apis = [apis] if isinstance(apis, BlackBoxAPI) else list(apis)
    # the query budget: the ledgers' count is what the teachers answered, within each budget
    assert full.finished and full.queries == sum(a.queries for a in apis) == bought
    if case.budget is not None:
        assert all(a.queries <= case.budget for a in apis) and full.stopped == "budget"
    if case.expected_queries is not None:
        assert full.queries == case.expected_queries
    # a kill and a resume: the same run, nothing bought twice
    if case.kill:
        assert not part.finished and part.steps == case.kill
    assert resumed.finished and (resumed.steps, resumed.stopped) == (full.steps, full.stopped)
    assert resumed.queries == full.queries == bought_b + bought_c
    assert same(resumed.curve, full.curve, case.exact)
    for a, b in zip(arrays(method, full.state), arrays(method, resumed.state), strict=True):
        if case.exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the curve: evaluated points within the budget, written to result.json
    points = [p for p in full.curve if p.get("event", "eval") == "eval"]
    assert bool(points) == (entry.family != "baseline")
    assert all(p["queries"] <= full.queries for p in points)
    saved = json.load(open(tmp_path / "full" / "result.json"))
    assert saved["method"] == method.name and saved["queries"] == full.queries
    assert same(saved["curve"], json.loads(json.dumps(full.curve, default=float)), True)


# ----------------------------------------------------------------------------- the loop itself
def counter(api, stop_at=None):
    """A method that buys two queries a step and logs every third step (no JAX compilation)."""
    def step(state, key, index):
        api(jnp.zeros((2,) + SHAPE))
        metrics = {"log": [{"event": "note", "step": index}] if index % 3 == 2 else []}
        if index == stop_at:
            metrics["stop"] = "done"
        return state + 1, metrics

    from dfml_jax.training.run_loop import Method
    return Method(name="count", init=lambda key: jnp.zeros(()), step=step, step_key="step",
                  checkpoint=lambda s: ({"n": s}, {}),
                  restore=lambda s, saved: s if saved is None else saved[0]["n"],
                  step_cost=lambda s, i: 2, query_cost=2,
                  evaluate=lambda s, at: (s, [{"step": at.steps, "queries": at.queries,
                                               "kind": at.kind, "value": float(s)}]))


def test_loop_evaluates_at_intervals_budget_crossings_and_the_last_step(tmp_path):
    api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1)[:, :2], SHAPE, 2, budget=15)
    out = run(counter(api), api, key=jax.random.key(0), workdir=str(tmp_path), eval_every=4,
              eval_budgets=(5,), checkpoint_every=100)
    assert (out.steps, out.stopped, out.queries) == (7, "budget", 14)
    points = [(p["step"], p["queries"]) for p in out.curve if "kind" in p]
    assert points == [(2, 4), (4, 8), (7, 14)]       # budget 5's last step, every 4, the last
    assert [p["step"] for p in out.curve if p.get("event") == "note"] == [2, 5]
    again = run(counter(api), api, key=jax.random.key(0), workdir=str(tmp_path))
    assert again.curve == out.curve and float(again.state) == 7.0     # resumed: nothing to do


def test_a_step_may_stop_the_run_and_a_foreign_checkpoint_is_refused(tmp_path):
    from dfml_jax.checkpoint import CheckpointError, RunCheckpointer

    api = BlackBoxAPI.from_host(lambda x: x.reshape(len(x), -1)[:, :2], SHAPE, 2)
    out = run(counter(api, stop_at=3), api, key=jax.random.key(0), eval_every=2)
    assert (out.steps, out.stopped, float(out.state)) == (3, "done", 4.0)   # state kept
    assert out.curve[-1]["kind"] == "end" and out.curve[-1]["step"] == 3
    with RunCheckpointer(str(tmp_path / "checkpoints")) as ck:
        ck.save(0, {"n": jnp.zeros(())}, {"history": []})
    with pytest.raises(CheckpointError, match=r"has no 'curve'.*dfml_jax \d"):
        run(counter(api), api, key=jax.random.key(0), workdir=str(tmp_path))
