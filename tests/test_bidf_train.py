"""The BiDf-MKD loop on a tiny synthetic pool: query accounting, memory, budgets, resume."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import BlackBoxAPI
from dfml_jax.bidf_mkd.inversion import InversionConfig, inversion_queries
from dfml_jax.bidf_mkd.train import BiDfMKDConfig, TeacherPool, train_bidf_mkd
from dfml_jax.meta import evaluate_tasks
from dfml_jax.models import create_model, functional

S, K, NCLS = 8, 5, 8


def linear(w, x):  # the architecture shared by the pool's teachers
    return x.reshape(x.shape[0], -1) @ w


def make_pool(budget=None):
    apis, classes, wb = [], [], []
    for i in range(2):
        w = jax.random.normal(jax.random.key(10 + i), (S * S, K)) * 0.5
        apis.append(BlackBoxAPI.from_jax(linear, (S, S, 1), K, name=f"api{i}", budget=budget, params=w))
        classes.append(list(np.random.RandomState(i).choice(NCLS, K, replace=False)))
        wb.append((linear, w))
    return TeacherPool(apis, classes, (0.5,), (0.5,), S, wb)


META = functional(create_model("mlp", num_classes=K, input_shape=(S, S, 1), rngs_or_key=0, hidden=(32,)))
GEN = functional(create_model("dcgan", nz=8, ngf=4, img_size=S, nc=1, rngs_or_key=0))


def parts():
    return dict(meta_apply=META.apply_batchstats, meta_init_params=META.params,
                gen_init=lambda k: GEN.init(k)[0], gen_apply=GEN.apply_batchstats)


def tasks(key, n=10, shots=1, query=3):
    x = jax.random.uniform(key, (n, K * (shots + query), S, S, 1))
    y = jnp.tile(jnp.repeat(jnp.arange(K), shots + query)[None], (n, 1))
    return x[:, :K * shots], y[:, :K * shots], x[:, K * shots:], y[:, K * shots:]


CFG = BiDfMKDConfig(shots=1, query=3, meta_iterations=8, meta_batch=2,
                    inversion=InversionConfig(iterations=3, per_class=4, num_directions=4,
                                              smoothing=0.01, pad=1),
                    nz=8, ngf=4, memory_slots=3,
                    plateau_patience=2,
                    boundary_start=2, eval_every=4, val_tasks=10, replay_inner_steps=2,
                    kd_inner_steps=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    pool = make_pool()
    res = train_bidf_mkd(CFG, pool=pool, val_tasks=tasks(jax.random.key(0)), progress=False,
                         checkpoint_dir=str(tmp_path_factory.mktemp("full")), **parts())
    return pool, res


def test_loop_counts_queries_per_visit_and_fills_memory(full_run):
    pool, res = full_run
    visits = [h for h in res.history if h["event"] == "visit"]
    assert res.visits == len(visits) >= 2  # the plateau rule triggered further visits
    per_visit = 2 * (inversion_queries(CFG.inversion_config(), K) + K * CFG.inversion.per_class)
    assert res.api_queries == per_visit * res.visits == sum(a.queries for a in pool.apis)
    assert any(v["boundary"] for v in visits) and not visits[0]["boundary"]
    evals = [h for h in res.history if h["event"] == "eval"]
    assert [e["iteration"] for e in evals] == [0, 4, 8]  # iteration 0: the initial parameters


def test_resume_equals_uninterrupted(tmp_path, full_run):
    full = full_run[1]
    part = train_bidf_mkd(CFG, pool=make_pool(), val_tasks=tasks(jax.random.key(0)), progress=False,
                          checkpoint_dir=str(tmp_path / "b"), stop_after=5, **parts())
    assert part.visits < full.visits  # the kill happened before the last visit
    resumed = train_bidf_mkd(CFG, pool=make_pool(), val_tasks=tasks(jax.random.key(0)), progress=False,
                             checkpoint_dir=str(tmp_path / "b"), **parts())
    assert resumed.api_queries == full.api_queries and resumed.visits == full.visits
    for a, b in zip(jax.tree.leaves(full.final_params), jax.tree.leaves(resumed.final_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert [h["event"] for h in resumed.history] == [h["event"] for h in full.history]


def test_budget_stops_cleanly_and_evaluates():
    per_visit = 2 * (inversion_queries(CFG.inversion_config(), K) + K * CFG.inversion.per_class)
    pool = make_pool(budget=per_visit + 10)  # one visit per API affordable
    res = train_bidf_mkd(CFG, pool=pool, val_tasks=tasks(jax.random.key(0)), progress=False, **parts())
    assert all(a.queries <= per_visit + 10 for a in pool.apis)
    assert res.history[-1]["event"] == "eval"


def test_white_box_and_real_data_variants():
    pool = make_pool()
    cfg = CFG.__class__(**{**CFG.__dict__, "white_box": True, "meta_iterations": 4})
    res = train_bidf_mkd(cfg, pool=pool, val_tasks=tasks(jax.random.key(0)), progress=False, **parts())
    assert res.api_queries == res.visits * 2 * (inversion_queries(cfg.inversion, K, True) + K * 4)
    real = CFG.__class__(**{**CFG.__dict__, "replay_source": "real", "meta_iterations": 4})
    r = train_bidf_mkd(real, pool=None, val_tasks=tasks(jax.random.key(0)), progress=False,
                       real_tasks=lambda k: tasks(k, n=2), **parts())
    assert r.api_queries == 0 and r.visits == 0 and [h["iteration"] for h in r.history] == [0, 4]


def test_bad_config_is_refused():
    cfg = dataclasses.replace(CFG, inversion=dataclasses.replace(CFG.inversion, per_class=2))
    with pytest.raises(ValueError, match="inversion.per_class=2.*shots\\+query=4"):
        train_bidf_mkd(cfg, pool=make_pool(), val_tasks=tasks(jax.random.key(0)), progress=False, **parts())


def test_memory_filter_keeps_only_images_the_api_agrees_with():
    from dfml_jax.bidf_mkd.inversion import InversionResult
    from dfml_jax.bidf_mkd.train import _store
    from dfml_jax.memory import init_memory

    per = 4
    cfg = dataclasses.replace(CFG, inversion=dataclasses.replace(CFG.inversion, per_class=per),
                              memory_filter="api_agree")
    targets = jnp.tile(jnp.arange(K), per)                      # interleaved, as an inversion
    images = (jnp.arange(K * per, dtype=jnp.float32) / 255.0).reshape(K * per, 1, 1, 1)
    answer = jnp.where(jnp.arange(K * per) % 3 == 0, targets, (targets + 1) % K)
    answer = answer.at[jnp.arange(K * per) % K == 2].set(3)    # class 2: never agreed with
    probs = jax.nn.one_hot(answer, K)
    res = InversionResult(images, targets, None, None, None)
    rows = jnp.arange(K)
    mem, kept = _store(init_memory(K, 2, per, (1, 1, 1)), rows, res, probs, cfg)
    slot = np.asarray(mem.images[:, 0, :, 0, 0, 0])           # (K, per) stored pixel values
    for c in range(K):
        own = np.arange(K * per)[np.asarray(targets) == c]      # this class's images, in order
        agree = own[np.asarray(answer)[own] == c]
        expect = own if len(agree) == 0 else agree[np.arange(per) % len(agree)]
        np.testing.assert_array_equal(slot[c], expect)
    assert kept == pytest.approx(float(np.mean(np.asarray(answer) == np.asarray(targets))))
    plain, kept_all = _store(init_memory(K, 2, per, (1, 1, 1)), rows, res, probs,
                             cfg.__class__(**{**cfg.__dict__, "memory_filter": None}))
    assert kept_all == 1.0
    np.testing.assert_array_equal(np.asarray(plain.images[:, 0, :, 0, 0, 0]),
                                  np.arange(K * per).reshape(per, K).T)


def test_memory_filter_in_the_loop_costs_no_queries():
    cfg = CFG.__class__(**{**CFG.__dict__, "memory_filter": "api_agree", "meta_iterations": 4})
    res = train_bidf_mkd(cfg, pool=make_pool(), val_tasks=tasks(jax.random.key(0)), progress=False,
                         **parts())
    visits = [h for h in res.history if h["event"] == "visit"]
    assert visits and all(0.0 <= v["memory_kept"] <= 1.0 for v in visits)
    assert res.api_queries == res.visits * 2 * (inversion_queries(cfg.inversion, K) + K * 4)
    bad = CFG.__class__(**{**CFG.__dict__, "memory_filter": "agree"})
    with pytest.raises(ValueError, match="memory_filter must be None"):
        train_bidf_mkd(bad, pool=make_pool(), val_tasks=tasks(jax.random.key(0)), progress=False,
                       **parts())


def easy_tasks(key, n=10, shots=1, query=3):
    """Tasks a fine-tuned random MLP solves well: class c lights up row c of the image."""
    def part(k, per):
        y = jnp.tile(jnp.repeat(jnp.arange(K), per)[None], (n, 1))
        x = 0.1 * jax.random.uniform(k, (n, K * per, S, S, 1)) + jax.nn.one_hot(y, S)[..., None, None]
        return x, y
    ks, kq = jax.random.split(key)
    return part(ks, shots) + part(kq, query)


def test_model_selection_scores_the_initial_parameters():
    """Training that only degrades the model (here it diverges: NaN training images) returns the
    initial parameters: iteration 0 is evaluated and competes in model selection. The paper
    protocol's test evaluations (iteration 0 included) use paper_lr / paper_steps, and their
    maximum is reported."""
    cfg = CFG.__class__(**{**CFG.__dict__, "replay_source": "real", "meta_iterations": 4,
                           "eval_every": 2, "inner_lr": 0.5,
                           "paper_eval_tasks": 6, "paper_lr": 0.3, "paper_steps": 3})
    test = easy_tasks(jax.random.key(1))
    diverging = lambda k: tuple(a * jnp.nan if a.ndim > 2 else a for a in tasks(k, n=2))
    r = train_bidf_mkd(cfg, pool=None, val_tasks=easy_tasks(jax.random.key(0)), progress=False,
                       real_tasks=diverging, test_tasks=test, **parts())
    evals = [h for h in r.history if h["event"] == "eval"]
    assert [e["iteration"] for e in evals] == [0, 2, 4]
    assert evals[0]["val_acc"] > max(e["val_acc"] for e in evals[1:]) + 20  # training only hurts
    paper0 = evaluate_tasks(META.apply_batchstats, META.params, *(a[:6] for a in test), steps=3,
                            lr=0.3, batch_size=25)
    assert evals[0]["test_acc_paper_protocol"] == pytest.approx(paper0.mean)
    assert evals[0]["test_ci_paper_protocol"] == pytest.approx(paper0.ci95)
    assert r.paper_best_test == max(e["test_acc_paper_protocol"] for e in evals)
    for a, b in zip(jax.tree.leaves(r.best_params), jax.tree.leaves(META.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(r.final_params), jax.tree.leaves(META.params)))


def test_finetune_lr_changes_only_the_evaluations():
    """``finetune_lr`` sets the fine-tuning lr of the meta-validation evaluations; meta-training
    (the inner loops at ``inner_lr``) is unchanged; None (the default) evaluates at ``inner_lr``."""
    base = dataclasses.replace(CFG, replay_source="real", meta_iterations=4, eval_every=2)
    assert base.finetune_lr is None and base.eval_lr == base.inner_lr == 0.01
    val = easy_tasks(jax.random.key(0))

    def run(cfg):
        return train_bidf_mkd(cfg, pool=None, val_tasks=val, progress=False, real_tasks=tasks,
                              **parts())

    a, b = run(base), run(dataclasses.replace(base, finetune_lr=0.5))
    for x, y in zip(jax.tree.leaves(a.final_params), jax.tree.leaves(b.final_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))     # the same meta-training
    ev = lambda r: [h for h in r.history if h["event"] == "eval"]
    assert [h["iteration"] for h in ev(a)] == [h["iteration"] for h in ev(b)] == [0, 2, 4]
    for r, lr in ((a, 0.01), (b, 0.5)):                   # iteration 0: the initial parameters
        want = evaluate_tasks(META.apply_batchstats, META.params, *val, steps=base.finetune_steps,
                              lr=lr, batch_size=25)
        assert ev(r)[0]["val_acc"] == pytest.approx(want.mean)
    assert [h["val_acc"] for h in ev(a)] != [h["val_acc"] for h in ev(b)]
