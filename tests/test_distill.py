"""IDEAL / DFME / NaiveKD: query accounting, label cache, budgets, resume, the stroke prior, and
the smoke run.

Tiny sizes (8x8 digits, MLP students, a random linear teacher) so the module runs in about a
minute on a loaded 2-core CPU; compiled steps are shared between runs that reuse the same model
and API objects (``dfml_jax.distill.common.memoize_builder``).
"""
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import BlackBoxAPI
from dfml_jax.distill import (DFMEConfig, Evaluator, IDEALConfig, cost_per_iteration, info_loss,
                              make_dfme_iteration, make_generation_phase, make_generator,
                              noise_images, random_crop_flip, run_dfme, run_naive_kd,
                              run_pool_distillation, select_within_budget, split_validation,
                              torch_sgd)
from dfml_jax.distill.common import PoolStore, dequantize, init_student
from dfml_jax.distill.dfme import init_dfme_state
from dfml_jax.models import create_model, functional

SHAPE = (8, 8, 1)
K = 10


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    return x[:200], y[:200]


@pytest.fixture(scope="module")
def teacher_w():
    return np.random.default_rng(0).normal(size=(64, K)).astype(np.float32) * 3.0


class Recorder:
    """Host teacher that records every batch it answers."""

    def __init__(self, w):
        self.w, self.batches = w, []

    def __call__(self, x):
        self.batches.append(np.array(x))
        return x.reshape(len(x), -1) @ self.w

    @property
    def rows(self):
        return np.concatenate(self.batches) if self.batches else np.zeros((0,) + SHAPE)


@pytest.fixture(scope="module")
def student():
    return functional(create_model("mlp", num_classes=K, input_shape=SHAPE, hidden=(32,),
                                   rngs_or_key=0))


@pytest.fixture(scope="module")
def evaluator(student, digits):
    x, y = digits
    return Evaluator(student, {"val": (x[:100], y[:100]), "test": (x[100:], y[100:])})


IDEAL_CFG = IDEALConfig(batch_size=20, g_steps=4, nz=8, ngf=4, aug_pad=1, lr_s=0.05,
                        distill_augment="crop", checkpoint_every=1, eval_every=1)


def _pool_images(workdir):
    files = sorted(f for f in os.listdir(os.path.join(workdir, "pool")) if f.endswith(".npz"))
    return np.concatenate([np.load(os.path.join(workdir, "pool", f))["x"] for f in files])


# ----------------------------------------------------------------------------- units
def test_info_loss_forms():
    p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (6, K)), -1)
    ent = -jnp.sum(p * jnp.log(p), -1)
    np.testing.assert_allclose(info_loss(p, "per_sample"), -jnp.mean(ent) / K, rtol=1e-5)
    uniform = jnp.eye(K)                        # one-hot rows, balanced over the batch
    np.testing.assert_allclose(info_loss(uniform, "class_balance"), -np.log(K), rtol=1e-5)
    assert float(info_loss(p, "none")) == 0.0
    with pytest.raises(ValueError, match="info_loss"):
        info_loss(p, "dafl")


def test_class_balanced_pool_losses():
    from dfml_jax.distill.common import balanced_loss, pool_class_prior

    y = jnp.array([1, 1, 1, 2, 0, 7])                    # slot 5 is capacity padding
    prior = pool_class_prior(y, 5, 3)
    np.testing.assert_allclose(prior, [0.2, 0.6, 0.2], rtol=1e-6)
    logits = jax.random.normal(jax.random.key(0), (5, 3))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:5, None], 1)[:, 0]
    per_class = [float(jnp.mean(nll[y[:5] == c])) for c in range(3)]
    # inverse-frequency weights: every class counts equally
    np.testing.assert_allclose(balanced_loss("balanced_ce", logits, y[:5], prior),
                               np.mean(per_class), rtol=1e-5)
    np.testing.assert_allclose(balanced_loss("ce", logits, y[:5], prior), jnp.mean(nll), rtol=1e-6)
    adj = -jnp.take_along_axis(jax.nn.log_softmax(logits + jnp.log(prior)), y[:5, None], 1)
    np.testing.assert_allclose(balanced_loss("logit_adjusted", logits, y[:5], prior),
                               jnp.mean(adj), rtol=1e-5)
    with pytest.raises(ValueError, match="pool_loss"):
        IDEALConfig(pool_loss="focal").validate(K)
    with pytest.raises(ValueError, match="soft_labels"):
        IDEALConfig(pool_loss="balanced_ce", soft_labels=True).validate(K)


def test_crop_flip_is_per_sample_shift():
    x = jnp.broadcast_to(jnp.arange(64.0).reshape(1, 8, 8, 1), (16, 8, 8, 1))
    y = np.asarray(random_crop_flip(x, jax.random.key(3), pad=2))
    assert len({a.tobytes() for a in y}) > 1          # different draws per image
    centre = np.asarray(x[0, 2:6, 2:6, 0])
    for a in y:                                        # every output is a shifted (flipped) copy
        found = any(np.array_equal(np.asarray(a[2 + dy:6 + dy, 2 + dx:6 + dx, 0]), c)
                    for c in (centre, centre[:, ::-1]) for dy in (-2, -1, 0, 1, 2)
                    for dx in (-2, -1, 0, 1, 2))
        assert found


def test_selection_within_budget_uses_validation():
    curve = [{"queries": 100, "val_acc": 0.5, "test_acc": 0.9},
             {"queries": 200, "val_acc": 0.7, "test_acc": 0.6},
             {"queries": 300, "val_acc": 0.7, "test_acc": 0.65},
             {"queries": 400, "val_acc": 0.9, "test_acc": 0.95}]
    sel = select_within_budget(curve, 300)
    assert sel["selected"]["queries"] == 300          # best validation, ties -> later
    assert sel["final"]["queries"] == 300
    assert sel["best_on_test"] == 0.9                  # the papers' protocol, reported apart
    assert select_within_budget(curve, 50) is None


def test_split_validation_is_stratified(digits):
    x, y = digits
    xf, yf, xv, yv = split_validation(x, y, 50, seed=0)
    assert len(xv) == 50 and len(xf) == 150
    assert np.bincount(yv, minlength=K).max() - np.bincount(yv, minlength=K).min() <= 2
    assert not set(map(bytes, xv)) & set(map(bytes, xf))


def test_pool_store_grows_and_quantises(tmp_path):
    pool = PoolStore(SHAPE, (), directory=str(tmp_path), initial_capacity=4)
    x = jax.random.uniform(jax.random.key(0), (5,) + SHAPE)
    pool.append(0, pool.prepare(x), np.arange(5), 5)
    assert pool.size == 5 and pool.capacity == 8 and pool.x.dtype == jnp.uint8
    np.testing.assert_allclose(dequantize(pool.x[:5]), x, atol=0.5 / 255 + 1e-6)
    assert pool.cached_round(0)[2] == 5 and pool.cached_round(1) is None


# ----------------------------------------------------------------------------- IDEAL
def test_generation_phase_makes_no_teacher_query(student, teacher_w):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label")
    gen = make_generator(IDEAL_CFG, SHAPE)
    phase = make_generation_phase(student, gen[1], IDEAL_CFG, K, SHAPE)
    st = init_student(student, torch_sgd(0.01), jax.random.key(0))
    x1, best, losses = phase(st.params, st.bn, jax.random.key(1))
    x2, _, _ = phase(st.params, st.bn, jax.random.key(1))
    assert api.queries == 0 and api.host_calls == 0 and not rec.batches
    assert x1.shape == (IDEAL_CFG.batch_size,) + SHAPE
    assert float(jnp.min(x1)) >= 0.0 and float(jnp.max(x1)) <= 1.0
    np.testing.assert_array_equal(x1, x2)      # re-initialised from the key: same key, same batch
    assert float(best) == pytest.approx(float(jnp.min(losses)))


def test_ideal_label_cache_queries_each_sample_once_and_budget_stops(student, teacher_w,
                                                                     evaluator, tmp_path):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=90)  # 4 rounds of 20 fit
    res = run_pool_distillation(api, student, IDEAL_CFG, seed=0, evaluator=evaluator,
                                workdir=str(tmp_path), eval_budgets=(40,))
    assert res.stopped == "budget" and res.rounds == 4 and res.finished
    assert api.queries == 80 == res.queries                     # Q = B * E
    assert [len(b) for b in rec.batches] == [20, 20, 20, 20]    # one query per new sample
    np.testing.assert_array_equal(rec.rows, np.asarray(dequantize(jnp.asarray(
        _pool_images(tmp_path)))))                              # exactly the pool, in order
    assert len({r.tobytes() for r in rec.rows}) == 80           # no sample queried twice
    saved = json.load(open(tmp_path / "result.json"))
    assert saved["stopped"] == "budget" and saved["queries"] == 80
    assert [p["queries"] for p in saved["curve"]] == [20, 40, 60, 80]
    assert sum(res.class_histogram) == 80
    # Rerunning the finished run re-buys nothing.
    rec2 = Recorder(teacher_w)
    api2 = BlackBoxAPI.from_host(rec2, SHAPE, K, output="label", budget=90)
    again = run_pool_distillation(api2, student, IDEAL_CFG, seed=0, evaluator=evaluator,
                                  workdir=str(tmp_path))
    assert not rec2.batches and again.queries == 80 and again.curve == res.curve


@pytest.mark.parametrize("generator", ["dcgan", "strokes"])
def test_ideal_resume_equals_uninterrupted(student, teacher_w, tmp_path, generator):
    cfg = dataclasses.replace(IDEAL_CFG, checkpoint_every=2, generator=generator,
                              gen_head="sigmoid", num_strokes=2)
    api_a = BlackBoxAPI.from_host(Recorder(teacher_w), SHAPE, K, output="label", budget=100)
    full = run_pool_distillation(api_a, student, cfg, seed=1, workdir=str(tmp_path / "a"))
    # "Kill" after 3 rounds: round 2 is bought and logged but not checkpointed (every 2 rounds).
    rec_b = Recorder(teacher_w)
    api_b = BlackBoxAPI.from_host(rec_b, SHAPE, K, output="label", budget=100)
    part = run_pool_distillation(api_b, student, cfg, seed=1, workdir=str(tmp_path / "b"),
                                 max_rounds=3)
    assert not part.finished and api_b.queries == 60
    rec_c = Recorder(teacher_w)                               # a new process: fresh API object
    api_c = BlackBoxAPI.from_host(rec_c, SHAPE, K, output="label", budget=100)
    resumed = run_pool_distillation(api_c, student, cfg, seed=1, workdir=str(tmp_path / "b"))
    assert len(rec_b.rows) + len(rec_c.rows) == 100           # nothing bought twice
    assert resumed.queries == full.queries == 100 and resumed.rounds == full.rounds == 5
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)


def test_naive_kd_labels_noise(student, teacher_w):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=100)
    # (with the class-balanced pool loss, which changes the student's training only)
    res = run_naive_kd(api, student, dataclasses.replace(IDEAL_CFG, pool_loss="balanced_ce"),
                       seed=0)
    assert res.queries == 100 and len(rec.rows) == 100 and res.stopped == "budget"
    assert float(rec.rows.std()) > 0.2                       # uniform noise, not a generator


def test_naive_kd_gauss_noise_is_dark_and_counted(student, teacher_w):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=100)
    res = run_naive_kd(api, student, dataclasses.replace(IDEAL_CFG, noise="gauss"), seed=0)
    assert res.queries == api.queries == len(rec.rows) == 100 == sum(res.class_histogram)
    # N(0, 1) in MNIST's normalised space, clipped: mostly dark, about 1/3 exactly black
    assert 0.12 < float(rec.rows.mean()) < 0.28
    assert 0.2 < float(np.mean(rec.rows == 0.0)) < 0.5
    with pytest.raises(ValueError, match="noise must be one of"):
        run_naive_kd(api, student, dataclasses.replace(IDEAL_CFG, noise="pink"), seed=0)


def test_generator_bias_darkens_images(student):
    st = init_student(student, torch_sgd(0.01), jax.random.key(0))
    means = []
    for bias in (0.0, -2.0):
        cfg = dataclasses.replace(IDEAL_CFG, gen_head="bn_sigmoid", gen_bias=bias)
        gen = make_generator(cfg, SHAPE)
        x, _, _ = make_generation_phase(student, gen[1], cfg, K, SHAPE)(st.params, st.bn,
                                                                        jax.random.key(1))
        means.append(float(x.mean()))
    assert 0.4 < means[0] < 0.6 and 0.1 < means[1] < 0.25


def test_ideal_soft_label_variant(student, teacher_w, tmp_path):
    api = BlackBoxAPI.from_host(Recorder(teacher_w), SHAPE, K, output="probs", budget=40)
    cfg = dataclasses.replace(IDEAL_CFG, soft_labels=True)
    res = run_pool_distillation(api, student, cfg, seed=0, workdir=str(tmp_path))
    assert res.queries == 40 and res.stopped == "budget"
    y = np.concatenate([np.load(tmp_path / "pool" / f)["y"]
                        for f in sorted(os.listdir(tmp_path / "pool"))])
    assert y.shape == (40, K)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)   # cached probabilities
    hard = BlackBoxAPI.from_host(Recorder(teacher_w), SHAPE, K, output="label", budget=40)
    with pytest.raises(ValueError, match="soft labels"):
        run_pool_distillation(hard, student, cfg, seed=0)


def test_pool_balancing_targets_favour_the_classes_the_pool_lacks():
    from dfml_jax.distill.balance import pool_balancing_targets

    for seed in range(5):
        counts = jnp.asarray(np.random.default_rng(seed).integers(0, 500, K), jnp.float32)
        y = np.asarray(pool_balancing_targets(counts, 40))
        assert y.shape == (40,) and np.all(np.diff(y) >= 0) and y.min() >= 0 and y.max() < K
        share = np.bincount(y, minlength=K)
        rare, common = int(np.argmin(counts)), int(np.argmax(counts))
        assert share[rare] >= share[common] and share[rare] >= 40 // K
    np.testing.assert_array_equal(pool_balancing_targets(jnp.zeros(K), 2 * K), np.arange(2 * K) // 2)


def test_ideal_pool_balancing_run(student, teacher_w, tmp_path):
    api = BlackBoxAPI.from_host(Recorder(teacher_w), SHAPE, K, output="label", budget=60)
    cfg = dataclasses.replace(IDEAL_CFG, targets="pool_balancing", batch_size=30)
    res = run_pool_distillation(api, student, cfg, seed=0, workdir=str(tmp_path))
    assert res.queries == 60 and res.rounds == 2 and sum(res.class_histogram) == 60
    with pytest.raises(ValueError, match="targets must be one of"):
        run_pool_distillation(api, student, dataclasses.replace(IDEAL_CFG, targets="pool"), seed=0)


def test_balanced_selection_fills_quotas_then_best_scores():
    from dfml_jax.distill.balance import balanced_selection

    rng = np.random.default_rng(0)
    for trial in range(5):
        pred = jnp.asarray(rng.integers(0, K, 200))
        score = jnp.asarray(rng.uniform(size=200), jnp.float32)
        quotas = jnp.asarray(rng.multinomial(40, np.ones(K) / K))
        idx = np.asarray(balanced_selection(pred, score, quotas, 40))
        assert idx.shape == (40,) and len(set(idx.tolist())) == 40
        got = np.bincount(np.asarray(pred)[idx], minlength=K)
        have = np.bincount(np.asarray(pred), minlength=K)
        need = np.minimum(np.asarray(quotas), have)
        assert np.all(got >= need)                               # every quota met if possible
        for c in range(K):                                       # the best of each class first
            cls = np.flatnonzero(np.asarray(pred) == c)
            top = cls[np.argsort(-np.asarray(score)[cls])][:need[c]]
            assert set(top.tolist()) <= set(idx.tolist())
    # a class without candidates: its places go to the best remaining candidates
    idx = balanced_selection(jnp.array([0, 0, 0, 0]), jnp.array([.1, .9, .5, .3]),
                             jnp.array([1, 1]), 2)
    assert sorted(idx.tolist()) == [1, 2]
    with pytest.raises(ValueError, match="cannot select"):
        balanced_selection(jnp.zeros(3, jnp.int32), jnp.zeros(3), jnp.array([4]), 4)


def test_near_duplicates_keep_one_image_of_each_cluster_in_the_selection():
    from dfml_jax.distill.balance import balanced_selection, near_duplicates

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (30,) + SHAPE).astype(np.float32)
    x[:12] = 0.0                                     # 12 blank images, all the most uncertain
    x[12:15] = x[20] + 0.001                         # 3 near-copies of image 20
    score = np.r_[np.full(12, 0.99), rng.uniform(0.0, 0.9, 18)].astype(np.float32)
    score[20] = 0.95
    dup = np.asarray(near_duplicates(jnp.asarray(x), jnp.asarray(score), 0.05))
    assert dup[:12].sum() == 11 and not dup[0]        # one blank image survives (ties: index)
    keep = {12, 13, 14, 20}
    assert sum(not dup[i] for i in keep) == 1        # one of each cluster
    assert not dup[15:20].any() and not dup[21:].any()
    assert not np.asarray(near_duplicates(jnp.asarray(x), jnp.asarray(score), 0.0)).any()
    marked = jnp.where(jnp.asarray(dup), -1.0, jnp.asarray(score))
    idx = np.asarray(balanced_selection(jnp.zeros(30, jnp.int32), marked, jnp.array([10]), 10))
    assert not dup[idx].any()                         # enough distinct images: no copy is bought
    idx = np.asarray(balanced_selection(jnp.zeros(30, jnp.int32), marked, jnp.array([20]), 20))
    assert dup[idx].sum() == 20 - (~dup).sum()        # copies only once the rest are taken
    with pytest.raises(ValueError, match="select_min_dist must be"):
        IDEALConfig(select="balanced", select_min_dist=-0.1).validate(10)


def test_low_contrast_images_are_bought_last():
    from dfml_jax.distill.balance import balanced_selection, low_contrast

    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.0, (20,) + SHAPE).astype(np.float32)
    x[:8] = 0.002 * rng.uniform(size=(8,) + SHAPE)          # 8 nearly blank images
    flat = np.asarray(low_contrast(jnp.asarray(x), 0.1))
    assert flat[:8].all() and not flat[8:].any()
    score = jnp.where(jnp.asarray(flat), -1.0, 0.99)          # the blank ones the most uncertain
    idx = np.asarray(balanced_selection(jnp.zeros(20, jnp.int32), score, jnp.array([12]), 12))
    assert sorted(idx.tolist()) == list(range(8, 20))
    cfg = dataclasses.replace(IDEAL_CFG, select="balanced", select_score="entropy",
                              select_min_contrast=0.1)
    with pytest.raises(ValueError, match="select_min_contrast must be"):
        dataclasses.replace(cfg, select_min_contrast=1.5).validate(K)


def test_ideal_run_with_contrast_and_duplicate_filters_buys_each_sample_once(student, teacher_w):
    cfg = dataclasses.replace(IDEAL_CFG, select="balanced", select_score="entropy",
                              select_min_contrast=0.1, select_min_dist=0.05)
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=60)
    res = run_pool_distillation(api, student, cfg, seed=0, evaluator=None)
    assert res.queries == api.queries == len(rec.rows) == 60 == sum(res.class_histogram)
    assert len({r.tobytes() for r in rec.rows}) == 60


@pytest.mark.parametrize("score", ["confidence", "entropy"])
def test_ideal_balanced_selection_run_buys_each_sample_once(student, teacher_w, tmp_path, score):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=60)
    cfg = dataclasses.replace(IDEAL_CFG, select="balanced", select_score=score)
    res = run_pool_distillation(api, student, cfg, seed=0, workdir=str(tmp_path),
                                evaluator=None)
    assert res.queries == api.queries == len(rec.rows) == 60 == sum(res.class_histogram)
    np.testing.assert_array_equal(rec.rows, np.asarray(dequantize(jnp.asarray(
        _pool_images(tmp_path)))))                              # the teacher saw the pool only
    assert len({r.tobytes() for r in rec.rows}) == 60
    with pytest.raises(ValueError, match="select must be one of"):
        run_pool_distillation(api, student, dataclasses.replace(IDEAL_CFG, select="x"), seed=0)


def test_class_floor_images_mix_pool_images_of_the_rare_class():
    from dfml_jax.distill.balance import class_floor_deficit, class_floor_images

    rng = np.random.default_rng(0)
    y = jnp.asarray(np.r_[np.zeros(30), np.full(4, 3), np.zeros(30)], jnp.int32)   # 4 threes
    x = jnp.asarray(rng.uniform(0.0, 0.2, (64,) + SHAPE), jnp.float32)
    x = x.at[30:34].set(jnp.asarray(rng.uniform(0.6, 0.8, (4,) + SHAPE), jnp.float32))
    m, deficit = class_floor_deficit(np.bincount(np.asarray(y[:60]), minlength=K), 60, 20, 0.1, 6)
    assert m == 5 and deficit[3] == 8 - 4 and deficit.sum() == 4     # only class 3 is short
    out = np.asarray(class_floor_images(jax.random.key(1), x, y, 60, deficit, m, pad=0))
    assert out.shape == (5,) + SHAPE and out.min() >= 0.6 and out.max() <= 0.8   # threes only
    assert len({o.tobytes() for o in out}) == 5                        # new images, not copies
    assert class_floor_deficit([6, 6, 6], 18, 3, 0.3, 3)[0] == 0       # nobody short: none


def test_ideal_class_floor_lifts_rare_teacher_classes_at_the_same_budget(student, teacher_w):
    """A linear teacher (convex class regions): un-shifted mixtures of two pool images it
    answered c are answered c again, so the floor lifts the rare classes; the budget, the round
    size and the one-query-per-sample rule are unchanged."""
    cfg = dataclasses.replace(IDEAL_CFG, synth="noise", floor_shift=0, floor_mix=(0.2, 0.8),
                              eval_every=100)
    hists = {}
    for floor in (0.0, 0.08):
        rec = Recorder(teacher_w)
        api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=400)
        res = run_pool_distillation(api, student, dataclasses.replace(cfg, class_floor=floor),
                                    seed=0)
        assert res.queries == api.queries == len(rec.rows) == 400
        assert [len(b) for b in rec.batches] == [20] * 20
        hists[floor] = np.asarray(res.class_histogram)
    rare = (hists[0.0] > 1) & (hists[0.0] < 0.08 * 400)      # a mixture needs two images
    assert rare.any() and np.all(hists[0.08][rare] > hists[0.0][rare])
    assert hists[0.08][rare].min() >= 2 * hists[0.0][rare].min()
    with pytest.raises(ValueError, match="class_floor must be in"):
        run_pool_distillation(api, student, dataclasses.replace(cfg, class_floor=0.1), seed=0)


def test_consolidation_adds_points_at_budgets_without_queries_or_changing_the_run(
        student, teacher_w, evaluator, tmp_path):
    """A copy of the student trains on the bought pool at each budget's last round: no query,
    the online run (its purchases and its student) unchanged, the copy's points selectable."""
    runs = {}
    for passes in (0, 3):
        rec = Recorder(teacher_w)
        api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=100)
        cfg = dataclasses.replace(IDEAL_CFG, consolidate_passes=passes, consolidate_eval_every=2,
                                  eval_every=100)
        runs[passes] = (run_pool_distillation(api, student, cfg, seed=0, evaluator=evaluator,
                                              workdir=str(tmp_path / str(passes)),
                                              eval_budgets=(40,)), rec.rows)
    (plain, rows0), (cons, rows3) = runs[0], runs[3]
    np.testing.assert_array_equal(rows0, rows3)                 # the same images bought
    assert plain.queries == cons.queries == 100
    jax.tree.map(np.testing.assert_array_equal, plain.params, cons.params)
    online = [p for p in cons.curve if p.get("phase") != "consolidate"]
    assert online == plain.curve
    extra = [(p["queries"], p["consolidate_passes"]) for p in cons.curve
             if p.get("phase") == "consolidate"]
    assert extra == [(40, 2), (40, 3), (100, 2), (100, 3)]       # every 2 passes and the last
    copies = [p for p in cons.curve if p.get("phase") == "consolidate"]
    assert any(p["val_acc"] != q["val_acc"] for p in copies for q in plain.curve)
    sel = select_within_budget(cons.curve, 40)["selected"]
    assert sel["queries"] <= 40
    # Killed after the 40-query consolidation, resumed: the same curve, nothing bought twice.
    cfg = dataclasses.replace(IDEAL_CFG, consolidate_passes=3, consolidate_eval_every=2,
                              eval_every=100)
    rec_a, rec_b = Recorder(teacher_w), Recorder(teacher_w)
    for rec, max_rounds in ((rec_a, 3), (rec_b, None)):
        api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=100)
        resumed = run_pool_distillation(api, student, cfg, seed=0, evaluator=evaluator,
                                        workdir=str(tmp_path / "killed"), eval_budgets=(40,),
                                        max_rounds=max_rounds)
    assert len(rec_a.rows) + len(rec_b.rows) == 100 and resumed.curve == cons.curve
    with pytest.raises(ValueError, match="consolidate_passes must be >= 0"):
        run_pool_distillation(api, student, dataclasses.replace(IDEAL_CFG, consolidate_passes=-1),
                              seed=0)


def test_min_student_batches_cycles_a_small_pool(student):
    from dfml_jax.distill.common import make_pool_pass

    tx = torch_sgd(0.05, 0.9, 0.0)
    state = init_student(student, tx, jax.random.key(0))
    x = jnp.zeros((64,) + SHAPE, jnp.float32)
    y = jnp.zeros((64,), jnp.int32)
    one_pass = make_pool_pass(student, tx, batch_size=20)
    cycled = make_pool_pass(student, tx, batch_size=20, min_batches=5)
    assert int(one_pass(state, x, y, jnp.int32(40), jax.random.key(1))[2]) == 2
    assert int(cycled(state, x, y, jnp.int32(40), jax.random.key(1))[2]) == 5
    assert int(cycled(state, x, y, jnp.int32(7), jax.random.key(1))[2]) == 5    # < one batch
    assert int(cycled(state, x, y, jnp.int32(0), jax.random.key(1))[2]) == 0    # empty pool
    assert int(cycled(state, x, y, jnp.int32(64), jax.random.key(1))[2]) == 5   # 3 < 5


def test_workdir_of_the_flat_config_layout_is_refused_with_the_version(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import distill

    (tmp_path / "config.json").write_text(json.dumps({"name": "smoke", "ideal_batch_size": 100,
                                                      "dfme_batch_size": 20}))
    with pytest.raises(ValueError, match="dfml_jax 0.1.0 before the config redesign"):
        distill.main(["--config", "smoke", "--workdir", str(tmp_path), "--no-progress"])
    with pytest.raises(ValueError, match="unknown config key 'ideal_lr_s'"):
        distill.main(["--config", "smoke", "--workdir", str(tmp_path / "b"),
                      "--set", "ideal_lr_s=0.1"])


def test_renamed_dfme_knobs(tmp_path):
    """DFME's ``grad_m`` / ``grad_epsilon`` are now ``num_directions`` / ``smoothing``:
    ``--set dfme.grad_m=...`` names the new key (nothing is written), and a work directory whose
    config.json predates the rename resumes (here a finished one, which reprints its rows)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import distill
    from configs.distill_configs import get_config

    from dfml_jax.distill.common import config_dict
    from dfml_jax.distill.experiment import run_experiment

    wd = tmp_path / "new"
    with pytest.raises(ValueError, match=r"'dfme\.grad_m' was renamed.*'dfme\.num_directions'.*"
                                         r"--set dfme\.num_directions=2"):
        distill.main(["--config", "smoke", "--workdir", str(wd), "--set", "dfme.grad_m=2"])
    with pytest.raises(ValueError, match=r"--set dfme\.smoothing=0\.01"):
        distill.main(["--config", "smoke", "--workdir", str(wd), "--set", "dfme.grad_epsilon=0.01"])
    assert not wd.exists()
    cfg = get_config("smoke")
    old = config_dict(cfg)
    old["dfme"] = {{"num_directions": "grad_m", "smoothing": "grad_epsilon"}.get(k, k): v
                   for k, v in old["dfme"].items()}
    assert old["dfme"]["grad_m"] == cfg.dfme.num_directions
    wd = tmp_path / "old"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(old))
    (wd / "results.json").write_text(json.dumps({"rows": [{"method": "DFME"}]}))
    (wd / "DONE").write_text("finished\n")
    with pytest.warns(UserWarning, match=r"dfme\.grad_m -> dfme\.num_directions, "
                                         r"dfme\.grad_epsilon -> dfme\.smoothing"):
        out = run_experiment(cfg, str(wd), progress=False, log=lambda m: None)
    assert out == {"rows": [{"method": "DFME"}], "done": True}
    with pytest.warns(UserWarning), pytest.raises(ValueError,
                                                  match=r"keys \['dfme\.smoothing'\] differ"):
        run_experiment(dataclasses.replace(cfg, dfme=dataclasses.replace(cfg.dfme, smoothing=0.5)),
                       str(wd), progress=False, log=lambda m: None)


def test_ideal_rejects_unbalanced_batch(student, teacher_w):
    api = BlackBoxAPI.from_host(Recorder(teacher_w), SHAPE, K, output="label")
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        run_pool_distillation(api, student, IDEALConfig(batch_size=25), seed=0)


# ----------------------------------------------------------------------------- DFME
def test_dfme_refuses_hard_label_api(student, teacher_w):
    for output in ("label", "topk"):
        api = BlackBoxAPI.from_host(Recorder(teacher_w), SHAPE, K, output=output,
                                    k=3 if output == "topk" else None, budget=1000)
        with pytest.raises(ValueError, match=r"DFME cannot work .* use IDEAL"):
            run_dfme(api, student, DFMEConfig(batch_size=8), seed=0)
        assert api.queries == 0


@pytest.fixture(scope="module")
def soft_api(teacher_w):
    w = jnp.asarray(teacher_w)
    cost = cost_per_iteration(DFME_CFG)
    return BlackBoxAPI.from_jax(lambda x: x.reshape(len(x), -1) @ w, SHAPE, K, output="probs",
                                budget=2 * cost + cost - 1, name="soft-teacher")


DFME_CFG = DFMEConfig(batch_size=8, nz=8, ngf=4, eval_every=1, checkpoint_every=1)


def test_dfme_query_formula_other_estimator(student, teacher_w):
    w = jnp.asarray(teacher_w)
    api = BlackBoxAPI.from_jax(lambda x: x.reshape(len(x), -1) @ w, SHAPE, K, output="logits")
    cfg = DFMEConfig(batch_size=8, nz=8, ngf=4, num_directions=2, d_iter=2, estimator="gaussian-central")
    assert cost_per_iteration(cfg) == 8 * 2 * 2 + 2 * 8
    gen = make_generator(cfg, SHAPE, head="tanh_bn")
    it = make_dfme_iteration(api, student, gen[1], cfg, 10)
    state = init_dfme_state(student, gen[1], cfg, 10, jax.random.key(0))
    state, metrics = it(state, jax.random.key(1))
    jax.block_until_ready(state)
    assert api.queries == cost_per_iteration(cfg)
    assert np.isfinite(float(metrics["loss_S"]))


def test_dfme_query_count_budget_stop_and_resume(student, soft_api, evaluator, tmp_path):
    assert cost_per_iteration(DFMEConfig()) == 256 * (1 * (1 + 1) + 5) == 1792
    cost = cost_per_iteration(DFME_CFG)
    assert cost == 8 * (1 * (1 + 1) + 5)
    soft_api.ledger.load_state_dict({"answered": 0})
    full = run_dfme(soft_api, student, DFME_CFG, seed=2, evaluator=evaluator,
                    workdir=str(tmp_path / "a"))
    # The budget (3 * cost - 1) buys 2 iterations; the run stops cleanly with its results saved.
    assert full.stopped == "budget" and full.iterations == 2 and full.finished
    assert [p["queries"] for p in full.curve] == [cost, 2 * cost] and soft_api.queries == 2 * cost
    saved = json.load(open(tmp_path / "a" / "result.json"))
    assert saved["queries"] == 2 * cost and saved["cost_per_iteration"] == cost
    # Kill after one iteration, resume in a "new process" (ledger back at zero).
    soft_api.ledger.load_state_dict({"answered": 0})
    part = run_dfme(soft_api, student, DFME_CFG, seed=2, evaluator=evaluator,
                    workdir=str(tmp_path / "b"), max_iterations=1)
    assert not part.finished and soft_api.queries == cost
    soft_api.ledger.load_state_dict({"answered": 0})
    resumed = run_dfme(soft_api, student, DFME_CFG, seed=2, evaluator=evaluator,
                       workdir=str(tmp_path / "b"))
    assert resumed.queries == full.queries == 2 * cost and resumed.requeried == 0
    assert resumed.curve == full.curve
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)


# ----------------------------------------------------------------------------- smoke run
def test_smoke_run_end_to_end(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import distill

    t0, c0 = time.perf_counter(), time.process_time()
    argv = ["--config", "smoke", "--workdir", str(tmp_path), "--no-progress"]
    distill.main(argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU time of this process (load-independent; wall time on a machine shared with other jobs
    # can be several times larger) must stay under the 2-minute smoke budget.
    assert cpu < 120, f"smoke run used {cpu:.0f}s of CPU ({wall:.0f}s wall)"
    for f in ("results.json", "results.md", "accuracy_vs_queries.png", "DONE", "config.json"):
        assert (tmp_path / f).exists(), f
    out = json.load(open(tmp_path / "results.json"))
    methods = {(r["method"], r["budget"]) for r in out["rows"]}
    assert {("IDEAL", 300), ("IDEAL", 600), ("NaiveKD", 600), ("DFME", 600)} <= methods
    for r in out["rows"]:
        if r["budget"] != "-":
            assert r["queries"] <= r["budget"] and 0 <= r["test_acc"] <= 100
    assert out["runs"]["ideal"]["queries"] == 600 and out["runs"]["dfme@600"]["queries"] == 560
    # A finished experiment is not redone.
    t1 = time.perf_counter()
    again = distill.main(argv)
    assert again["done"] and time.perf_counter() - t1 < 10
    with pytest.raises(ValueError, match="different config"):
        distill.main(argv + ["--seed", "5"])
    with pytest.raises(ValueError, match=r"keys \['ideal\.lr_s'\] differ"):     # nested: ideal.<field>
        distill.main(argv + ["--set", "ideal.lr_s=0.5"])


def test_ideal_noise_share_buys_noise_images_once_within_the_round(student, teacher_w, tmp_path):
    """``noise_share`` replaces part of each generated round by noise images: the round size,
    the budget and one query per sample are unchanged; with candidates the student's most
    uncertain draws are kept (no query for the candidates)."""
    cfg = dataclasses.replace(IDEAL_CFG, noise="gauss", noise_share=0.25, noise_candidates=4)
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=60)
    res = run_pool_distillation(api, student, cfg, seed=0, workdir=str(tmp_path))
    assert res.queries == api.queries == len(rec.rows) == 60 == sum(res.class_histogram)
    assert [len(b) for b in rec.batches] == [20, 20, 20]
    np.testing.assert_array_equal(rec.rows, np.asarray(dequantize(jnp.asarray(
        _pool_images(tmp_path)))))
    # 5 of every 20 are gauss noise (a third of the pixels exactly black); generated images
    # (sigmoid outputs, quantised) are almost never exactly 0
    black = np.mean(rec.rows.reshape(60, -1) == 0.0, axis=1)
    assert np.sum(black > 0.15) == 15
    with pytest.raises(ValueError, match="noise_share must be in"):
        run_pool_distillation(api, student, dataclasses.replace(cfg, noise_share=1.0), seed=0)


def test_uncertain_noise_images_keep_the_highest_entropy_candidates():
    from dfml_jax.distill.generation import uncertain_noise_images

    cfg = IDEALConfig(noise="uniform")
    # a "student" sure of bright images and unsure of dark ones: the kept ones are the darkest
    probs = lambda x: jax.nn.softmax(jnp.stack([40.0 * x.mean((1, 2, 3)), jnp.zeros(len(x))], 1))
    key = jax.random.key(3)
    kept = np.asarray(uncertain_noise_images(cfg, key, 5, SHAPE, probs, candidates=6))
    every = np.asarray(noise_images(cfg, key, 30, SHAPE))
    means = np.sort(every.mean((1, 2, 3)))
    np.testing.assert_allclose(np.sort(kept.mean((1, 2, 3))), means[:5], rtol=1e-6)
    same = uncertain_noise_images(cfg, key, 5, SHAPE, probs, candidates=1)
    np.testing.assert_array_equal(same, noise_images(cfg, key, 5, SHAPE))


def test_pair_targets_put_the_chosen_share_between_two_classes():
    from dfml_jax.distill.generation import pair_targets

    y = jnp.arange(40) % 10
    assert pair_targets(jax.random.key(0), y, 10, 0.0, (0.5, 0.7)) is None
    t = np.asarray(pair_targets(jax.random.key(0), y, 10, 0.25, (0.55, 0.7)))
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
    own = t[np.arange(40), np.asarray(y)]
    soft = own < 1.0
    assert soft.sum() == 10                                  # a quarter of the 40 targets
    assert np.all((own[soft] >= 0.55) & (own[soft] <= 0.7))   # the image's class keeps the most
    assert np.all((t[soft] > 0).sum(1) == 2)                  # exactly one other class


def test_ideal_pair_share_keeps_round_size_and_one_query_per_sample(student, teacher_w, tmp_path):
    cfg = dataclasses.replace(IDEAL_CFG, pair_share=0.5)
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=60)
    res = run_pool_distillation(api, student, cfg, seed=0, workdir=str(tmp_path))
    assert res.queries == api.queries == len(rec.rows) == 60 == sum(res.class_histogram)
    assert [len(b) for b in rec.batches] == [20, 20, 20]
    plain = Recorder(teacher_w)
    run_pool_distillation(BlackBoxAPI.from_host(plain, SHAPE, K, output="label", budget=60),
                          student, IDEAL_CFG, seed=0)
    assert not np.array_equal(rec.rows, plain.rows)      # other targets, other images
    with pytest.raises(ValueError, match="pair_weight must be"):
        run_pool_distillation(api, student, dataclasses.replace(cfg, pair_weight=(0.3, 0.6)),
                              seed=0)


def test_ideal_select_after_buys_the_best_batch_until_the_pool_is_that_large(student, teacher_w):
    """Rounds bought before ``select_after`` samples are those of ``select="best"``; later rounds
    use ``select`` (here the student's most uncertain candidates)."""
    runs = {}
    for name, cfg in {"best": IDEAL_CFG,
                      "after": dataclasses.replace(IDEAL_CFG, select="balanced",
                                                   select_score="entropy", select_after=40)}.items():
        runs[name] = Recorder(teacher_w)
        api = BlackBoxAPI.from_host(runs[name], SHAPE, K, output="label", budget=60)
        assert run_pool_distillation(api, student, cfg, seed=0).queries == 60
    np.testing.assert_array_equal(runs["best"].rows[:40], runs["after"].rows[:40])
    assert not np.array_equal(runs["best"].rows[40:], runs["after"].rows[40:])
    with pytest.raises(ValueError, match="select_after must be"):
        IDEALConfig(select="balanced", select_after=-1).validate(10)
    with pytest.raises(ValueError, match="only act with select='balanced'"):
        IDEALConfig(select_after=100, select_min_contrast=0.1).validate(10)


# ----------------------------------------------------------------------------- the stroke prior
# IDEAL's generator="strokes" and NaiveKD's noise="strokes": images that are drawings, the same
# query accounting, clear config errors.
STROKES_CFG = IDEALConfig(batch_size=20, g_steps=6, nz=8, aug_pad=1, lr_s=0.05, lr_g=0.05,
                          generator="strokes", num_strokes=2, gen_augment="none",
                          distill_augment="none", checkpoint_every=1, eval_every=1)


def _ink_fraction(x):
    """Share of pixels with any ink (drawings: a minority; noise: nearly all)."""
    return float(np.mean(np.asarray(x) > 0.05))


def test_stroke_generator_draws_and_learns_towards_the_targets(student):
    st = init_student(student, torch_sgd(0.01), jax.random.key(0))
    gen = make_generator(STROKES_CFG, SHAPE)
    phase = make_generation_phase(student, gen[1], STROKES_CFG, K, SHAPE)
    x, best, losses = phase(st.params, st.bn, jax.random.key(1))
    x2, _, _ = phase(st.params, st.bn, jax.random.key(1))
    assert x.shape == (STROKES_CFG.batch_size,) + SHAPE
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(x, x2)
    assert _ink_fraction(x) < 0.8                       # strokes on a black background
    assert float(losses[-1]) < float(losses[0])         # the generator's Adam steps act
    assert float(best) == pytest.approx(float(np.min(np.asarray(losses))))


def test_stroke_generator_config_errors():
    with pytest.raises(ValueError, match="gen_bias"):
        dataclasses.replace(STROKES_CFG, gen_bias=-2.0).validate(K)
    with pytest.raises(ValueError, match="gen_head"):
        dataclasses.replace(STROKES_CFG, gen_head="bn_sigmoid").validate(K)
    with pytest.raises(ValueError, match="generator must be one of"):
        dataclasses.replace(STROKES_CFG, generator="vae").validate(K)
    with pytest.raises(ValueError, match="num_strokes"):
        dataclasses.replace(STROKES_CFG, num_strokes=0).validate(K)
    with pytest.raises(ValueError, match="square"):
        make_generator(STROKES_CFG, (8, 12, 1))


def test_random_drawings_are_drawings_and_reproducible():
    cfg = dataclasses.replace(STROKES_CFG, synth="noise", noise="strokes")
    a = noise_images(cfg, jax.random.key(0), 200, (16, 16, 1))
    b = noise_images(cfg, jax.random.key(0), 200, (16, 16, 1))
    c = noise_images(cfg, jax.random.key(1), 200, (16, 16, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (200, 16, 16, 1) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert 0.02 < _ink_fraction(a) < 0.6                # mostly background
    assert float(np.mean(np.asarray(a).max(axis=(1, 2, 3)) > 0.5)) > 0.9   # with bright ink
    gauss = noise_images(dataclasses.replace(cfg, noise="gauss"), jax.random.key(0), 200,
                         (16, 16, 1))
    assert _ink_fraction(gauss) > 0.6                   # noise is everywhere


def test_naive_kd_stroke_noise_is_counted_once_per_image(student, teacher_w):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=100)
    res = run_naive_kd(api, student, dataclasses.replace(STROKES_CFG, noise="strokes"), seed=0)
    assert res.queries == api.queries == len(rec.rows) == 100 == sum(res.class_histogram)
    assert len({r.tobytes() for r in rec.rows}) == 100
    assert _ink_fraction(rec.rows) < 0.8


def test_ideal_with_strokes_buys_each_image_once_with_the_floor_and_balancing(student,
                                                                              teacher_w):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=90)
    cfg = dataclasses.replace(STROKES_CFG, targets="pool_balancing", class_floor=0.05)
    res = run_pool_distillation(api, student, cfg, seed=0)
    assert res.rounds == 4 and res.queries == api.queries == 80 == len(rec.rows)
    assert [len(b) for b in rec.batches] == [20] * 4
    assert len({r.tobytes() for r in rec.rows}) == 80
    assert sum(res.class_histogram) == 80
    assert _ink_fraction(rec.rows) < 0.8
