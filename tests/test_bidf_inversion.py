"""Zero-order generator inversion: it recovers class-conditional data and costs what it says."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import BlackBoxAPI
from dfml_jax.bidf_mkd import InversionConfig, inversion_queries, make_inverter, per_sample_objective
from dfml_jax.models import create_model, functional

SIZE, K = 8, 5


@pytest.fixture(scope="module")
def parts():
    kw = jax.random.normal(jax.random.key(0), (SIZE * SIZE, K)) * 0.5
    teacher = lambda x: x.reshape(x.shape[0], -1) @ kw
    gen = functional(create_model("dcgan", nz=16, ngf=8, img_size=SIZE, nc=1, rngs_or_key=0))
    gen_init = lambda k: gen.init(k)[0]
    gen_apply = lambda p, z: gen.apply_batchstats(p, z)
    return teacher, gen_init, gen_apply


def run(parts, cfg, white_box=False, student=None):
    teacher, gen_init, gen_apply = parts
    api = BlackBoxAPI.from_jax(teacher, (SIZE, SIZE, 1), K, name="tiny")
    inv = make_inverter(api, gen_apply, nz=16, cfg=cfg, mean=(0.5,), std=(0.5,), image_size=SIZE,
                        teacher_fn=(lambda p, x: teacher(x)) if white_box else None,
                        student_apply=None if student is None else student[0])
    res = inv(jax.random.key(1), 0, gen_init(jax.random.key(2)), None,
              None if student is None else student[1])
    return api, res


CFG = InversionConfig(iterations=40, per_class=4, lr=0.05, num_directions=16, smoothing=0.01,
                      chunk_size=8, pad=1)


def test_inversion_raises_api_confidence_and_counts_queries(parts):
    api, res = run(parts, CFG)
    assert api.queries == inversion_queries(CFG, K) == 40 * 20 * (16 + 1)
    assert res.images.shape == (20, SIZE, SIZE, 1)
    assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    np.testing.assert_array_equal(res.targets[:6], [0, 1, 2, 3, 4, 0])
    ce = np.asarray(res.clean_ce)
    assert ce[-5:].mean() < 0.8 * ce[:5].mean()
    assert float(res.api_acc[-5:].mean()) > float(res.api_acc[:5].mean())
    # the selected batch is the lowest-clean-CE iterate: the API classifies it as targeted
    teacher = parts[0]
    out = teacher((res.images - 0.5) / 0.5)
    assert float(jnp.mean(jnp.argmax(out, -1) == res.targets)) >= float(res.api_acc[:5].mean())


def test_white_box_bound_is_at_least_as_good(parts):
    _, zo = run(parts, CFG)
    api, wb = run(parts, CFG, white_box=True)
    assert api.queries == inversion_queries(CFG, K, white_box=True)
    assert float(wb.clean_ce[-5:].mean()) <= float(zo.clean_ce[-5:].mean()) + 1e-3


def test_boundary_term_runs_with_student(parts):
    ws = jax.random.normal(jax.random.key(5), (SIZE * SIZE, K))
    student = (lambda p, x: x.reshape(x.shape[0], -1) @ p, ws)
    api, res = run(parts, CFG, student=student)
    assert api.queries == inversion_queries(CFG, K)
    assert np.isfinite(np.asarray(res.clean_ce)).all()


def test_per_sample_objective_boundary_mask():
    out = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    s = jnp.array([[1.0, 0.0], [1.0, 0.0]])  # agrees with sample 0 only
    y = jnp.array([0, 1])
    ce = per_sample_objective(out, y, "logits")
    v = per_sample_objective(out, y, "logits", s, 1.0)
    np.testing.assert_allclose(v, ce - jnp.array([1.0, 0.0]), rtol=1e-6)


def test_hard_label_api_refused(parts):
    api = BlackBoxAPI.from_jax(parts[0], (SIZE, SIZE, 1), K, output="label")
    with pytest.raises(ValueError, match="BiDf-MKD inversion cannot work.*'label'"):
        make_inverter(api, parts[2], nz=16, cfg=CFG, mean=(0.5,), std=(0.5,), image_size=SIZE)


def test_one_compile_serves_every_api_of_a_group(parts):
    from dfml_jax.api import APIGroup
    traces = []

    def counted_gen_apply(p, z):  # runs only while JAX traces the inversion
        traces.append(1)
        return parts[2](p, z)
    shared = lambda p, x: x.reshape(x.shape[0], -1) @ p
    apis = [BlackBoxAPI.from_jax(shared, (SIZE, SIZE, 1), K, params=jax.random.normal(jax.random.key(i), (SIZE * SIZE, K)))
            for i in range(3)]
    g = APIGroup(apis)
    cfg = InversionConfig(iterations=2, per_class=2, num_directions=2, pad=1)
    inv = make_inverter(g, counted_gen_apply, nz=16, cfg=cfg, mean=(0.5,), std=(0.5,), image_size=SIZE)
    for i in (2, 0, 1, 2):
        jax.block_until_ready(inv(jax.random.key(i), i, parts[1](jax.random.key(9)), g.operand))
    assert len(traces) == 2  # two call sites (initial batch, scan body) traced ONCE for 4 calls
    per_call = inversion_queries(cfg, K)
    assert [a.queries for a in apis] == [per_call, per_call, 2 * per_call]


def test_low_resolution_directions_same_queries_and_progress(parts):
    cfg = InversionConfig(iterations=40, per_class=4, lr=0.05, num_directions=16, smoothing=0.01,
                          chunk_size=8, pad=1, direction_resolution=4)
    api, res = run(parts, cfg)
    assert api.queries == inversion_queries(cfg, K) == inversion_queries(CFG, K)
    ce = np.asarray(res.clean_ce)
    assert ce[-5:].mean() < 0.8 * ce[:5].mean()
    with pytest.raises(ValueError, match="must divide image_size"):
        make_inverter(api, parts[2], nz=16, cfg=dataclasses.replace(cfg, direction_resolution=3),
                      mean=(0.5,), std=(0.5,), image_size=SIZE)


def test_image_prior_terms():
    from dfml_jax.bidf_mkd import image_prior
    flat = jnp.full((3, 6, 6, 1), 0.4)
    assert float(image_prior(flat, InversionConfig(tv_weight=1.0))) == 0.0
    np.testing.assert_allclose(float(image_prior(flat, InversionConfig(l1_weight=2.0))), 0.8,
                               rtol=1e-6)
    stripes = jnp.tile(jnp.array([0.0, 1.0]), 3)[None, None, :, None] * jnp.ones((1, 6, 1, 1))
    # every horizontal neighbour differs by 1, vertical ones by 0: mean |dx| = 1
    np.testing.assert_allclose(float(image_prior(stripes, InversionConfig(tv_weight=1.0))), 1.0,
                               rtol=1e-6)
    x = jax.random.uniform(jax.random.key(0), (4, 6, 6, 1))
    same = jnp.concatenate([x[:1]] * 4)
    rep = InversionConfig(repulsion_weight=1.0)
    np.testing.assert_allclose(float(image_prior(same, rep)), 1.0, rtol=1e-4)
    assert float(image_prior(x, rep)) < 0.5
    assert float(image_prior(x, InversionConfig())) == 0.0


def test_priors_steer_the_recovered_images_at_the_same_queries(parts):
    """An intensity (L1) prior darkens the recovered images without changing the query bill;
    the priors' gradient is exact (no query for them)."""
    plain = dataclasses.replace(CFG, iterations=20)
    api0, r0 = run(parts, plain)
    api1, r1 = run(parts, dataclasses.replace(plain, l1_weight=5.0, tv_weight=1.0))
    assert api1.queries == api0.queries == inversion_queries(plain, K)
    assert float(r1.images.mean()) < float(r0.images.mean()) - 0.05


def test_class_latents_make_each_class_one_drawing_with_variations(parts):
    """class_jitter: one latent per class plus fixed per-image noise; 0 gives identical images
    per class, a small jitter variations closer to their class than to other classes."""
    base = dataclasses.replace(CFG, iterations=3)
    api, same = run(parts, dataclasses.replace(base, class_jitter=0.0))
    assert api.queries == inversion_queries(base, K)
    img = np.asarray(same.images).reshape(base.per_class, K, -1)  # interleaved targets
    np.testing.assert_allclose(img[1:], np.broadcast_to(img[:1], img[1:].shape), atol=1e-5)
    _, var = run(parts, dataclasses.replace(base, class_jitter=0.3))
    v = np.asarray(var.images).reshape(base.per_class, K, -1)
    within = np.mean([np.abs(v[i, c] - v[j, c]).mean() for c in range(K)
                      for i in range(base.per_class) for j in range(i)])
    across = np.mean([np.abs(v[i, c] - v[i, d]).mean() for i in range(base.per_class)
                      for c in range(K) for d in range(c)])
    assert 0 < within < across
    with pytest.raises(ValueError, match="class_jitter"):
        run(parts, dataclasses.replace(base, class_jitter=-1.0))


def test_return_final_gives_the_last_update_and_the_same_result(parts):
    """``return_final=True`` returns the generator and latents after the last Adam step (which
    no other output reads) beside the very same result."""
    teacher, gen_init, gen_apply = parts
    cfg = dataclasses.replace(CFG, iterations=4)
    outs = []
    for final in (False, True):
        api = BlackBoxAPI.from_jax(teacher, (SIZE, SIZE, 1), K)
        inv = make_inverter(api, gen_apply, nz=16, cfg=cfg, mean=(0.5,), std=(0.5,),
                            image_size=SIZE, return_final=final)
        outs.append(jax.block_until_ready(inv(jax.random.key(1), 0, gen_init(jax.random.key(2)),
                                              None)))
        assert api.queries == inversion_queries(cfg, K)
    res, (res_f, state) = outs
    for a, b in zip(res, res_f):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    w0 = gen_init(jax.random.key(2))
    assert set(state) == {"w", "z"} and state["z"].shape == (20, 16)
    moved = jax.tree.map(lambda u, v: float(jnp.abs(u - v).max()), state["w"], w0)
    assert max(jax.tree.leaves(moved)) > 0  # the generator was updated
