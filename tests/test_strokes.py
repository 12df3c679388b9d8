"""Stroke generator: drawings by construction, differentiable, and a drop-in for the DCGAN.

Compile-bound on CPU: the tests share two generator configurations (``LIN``: linear latent,
``DIR``: one stroke, direct latent) and one jitted function per use.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.models import count_params, create_model, functional, model_config
from dfml_jax.models.strokes import PARAMS_PER_STROKE, decode_strokes, encode_strokes

H = 28
Y = 14.5 / H  # centre line of pixel row 14
LIN_KW = dict(nz=40, img_size=H, nc=3, ngf=64)  # ngf is accepted and ignored


@functools.lru_cache(maxsize=None)
def lin():
    m = create_model("strokes", rngs_or_key=0, **LIN_KW)
    return m, functional(m)


@functools.lru_cache(maxsize=None)
def lin_apply():
    return jax.jit(lin()[1].apply_batchstats)


@functools.lru_cache(maxsize=None)
def direct():
    return functional(create_model("strokes", latent="direct", num_strokes=1, img_size=H, nc=1,
                                   rngs_or_key=0))


def horizontal_latent(y=Y, x0=0.2, x1=0.8, width=0.1, intensity=0.999):
    """Direct-mode latent (1, 8) of one straight horizontal stroke."""
    enc = jax.jit(encode_strokes)(jnp.array([[[x0, y]]]), jnp.array([[[x1, y]]]),
                                  jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.full((1, 1), width),
                                  jnp.full((1, 1), intensity))
    return enc.reshape(1, PARAMS_PER_STROKE)


def test_shapes_range_polarity_params_and_config():
    m, fg = lin()
    assert count_params(fg.params) == 40 * 32 + 32 and jax.tree.leaves(fg.state) == []
    z = jax.random.normal(jax.random.key(1), (32, 40))
    x = np.asarray(lin_apply()(fg.params, z))
    assert x.shape == (32, H, H, 3) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # replicated channels
    # fresh strokes are scribbles in the polarity of Glyphs: white ink on a black background,
    # no blank or saturated images, black corners
    ink = x.mean((1, 2, 3))
    assert 0.08 < ink.mean() < 0.35 and ink.min() > 0.02 and ink.max() < 0.6
    assert np.median(x[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]) < 0.01
    cfg = model_config(m)
    assert cfg == {"name": "strokes", **LIN_KW}
    assert functional(create_model(rngs_or_key=3, **cfg)).graphdef == fg.graphdef
    with pytest.raises(ValueError, match="nz must be 8 \\* num_strokes = 24, got 20"):
        create_model("strokes", latent="direct", num_strokes=3, nz=20, rngs_or_key=0)
    with pytest.raises(ValueError, match="unknown latent"):
        create_model("strokes", latent="mlp", rngs_or_key=0)
    with pytest.raises(ValueError, match=r"expected latents \(N, 40\)"):
        fg.apply_batchstats(fg.params, z[:, :8])


def test_horizontal_stroke_inks_its_row_not_the_corners():
    g = direct()
    z = horizontal_latent()
    sp = decode_strokes(z.reshape(1, 1, PARAMS_PER_STROKE))
    np.testing.assert_allclose(sp.p0[0, 0], [0.2, Y], atol=1e-5)  # encode/decode round trip
    np.testing.assert_allclose(sp.width[0, 0], 0.1, atol=1e-5)
    img = np.asarray(jax.jit(g.apply_batchstats)(g.params, z))[0, ..., 0]
    # row 14 is inked from x = 0.2 * 28 = 5.6 to 0.8 * 28 = 22.4 (round caps 1.4 px beyond)
    assert img[14, 6:22].min() > 0.95
    assert img[14, 1] < 0.05 and img[14, 26] < 0.05
    assert img[:11].max() < 1e-3 and img[18:].max() < 1e-3  # far rows stay black
    assert img[[0, 0, -1, -1], [0, -1, 0, -1]].max() < 1e-6
    np.testing.assert_allclose(img[13], img[15], atol=1e-5)  # symmetric profile about row 14


def test_gradient_wrt_end_points_moves_the_ink():
    g = direct()
    z = horizontal_latent()
    below = lambda z: jnp.sum(g.apply_batchstats(g.params, z)[0, 16, :, 0])  # noqa: E731
    value_grad = jax.jit(jax.value_and_grad(below))
    v0, grad = value_grad(z)
    assert np.isfinite(np.asarray(grad)).all()
    assert float(grad[0, 1]) > 0 and float(grad[0, 3]) > 0  # moving y0, y1 down inks row 16
    # the gradient predicts the change of a small step (finite difference)
    dz = jnp.zeros_like(z).at[0, 1].set(0.005).at[0, 3].set(0.005)
    np.testing.assert_allclose(float(value_grad(z + dz)[0] - v0), float(jnp.vdot(grad, dz)),
                               rtol=0.1)
    # following the gradient moves the stroke: 20 signed ascent steps ink row 16 much more
    zz = z
    for _ in range(20):
        zz = zz + 0.05 * np.sign(np.asarray(value_grad(zz)[1]))
    assert float(value_grad(zz)[0]) > 3 * float(v0)


def test_gradients_finite_and_nonzero_for_random_strokes():
    fg = lin()[1]
    z = jax.random.normal(jax.random.key(3), (6, 40))
    target = jax.random.uniform(jax.random.key(4), (6, H, H, 1))
    loss = lambda p, z: jnp.mean((fg.apply_batchstats(p, z) - target) ** 2)  # noqa: E731
    gp, gz = jax.jit(jax.grad(loss, argnums=(0, 1)))(fg.params, z)
    for leaf in jax.tree.leaves(gp) + [gz]:
        assert np.isfinite(np.asarray(leaf)).all() and float(jnp.abs(leaf).max()) > 0
    assert float(jnp.mean(jnp.abs(gz) > 0)) > 0.9  # every latent of every image


def test_init_differs_across_keys_jittable_and_vmappable():
    fg = lin()[1]
    init = jax.jit(lambda k: fg.init(k)[0])
    p1, p2 = init(jax.random.key(1)), init(jax.random.key(2))
    k1 = np.asarray(p1["fc"]["kernel"][...])
    assert not np.allclose(k1, p2["fc"]["kernel"][...])
    assert abs(k1.std() - 1 / np.sqrt(40)) < 0.01  # W ~ N(0, 1 / nz): u ~ N(0, 1) at init
    assert float(jnp.abs(p1["fc"]["bias"][...]).max()) == 0
    np.testing.assert_array_equal(fg.init(jax.random.key(1))[0]["fc"]["kernel"][...], k1)
    stacked = jax.vmap(init)(jax.random.split(jax.random.key(0), 3))
    assert stacked["fc"]["kernel"][...].shape == (3, 40, 32)
    # a population of generators (the trainer vmaps the inversion over APIs): vmap = one by one
    z = jax.random.normal(jax.random.key(1), (32, 40))
    xs = jax.jit(jax.vmap(fg.apply_batchstats, in_axes=(0, None)))(stacked, z)
    np.testing.assert_allclose(xs[2], lin_apply()(jax.tree.map(lambda a: a[2], stacked), z),
                               atol=1e-5)
    # direct mode: no randomness in the weights (a zero shared offset), all of it in Z
    pd = direct().init(jax.random.key(5))[0]
    assert count_params(pd) == 8 and float(jnp.abs(pd["offset"][...]).max()) == 0


def test_runs_inside_the_black_box_inverter_on_a_conv4_api():
    from dfml_jax.bidf_mkd import InversionConfig, inversion_queries, make_inverter
    from dfml_jax.api import BlackBoxAPI

    size, k, nz = 16, 4, 16
    teacher = functional(create_model("conv4", num_classes=k, input_shape=(size, size, 1),
                                      rngs_or_key=0, width=4, conv_impl="lax"))
    fwd = lambda x: teacher.apply(teacher.params, teacher.state, x, train=False)[0]  # noqa: E731
    gen = functional(create_model("strokes", nz=nz, img_size=size, nc=1, rngs_or_key=0))
    cfg = InversionConfig(iterations=2, per_class=2, lr=0.01, num_directions=4, smoothing=0.01,
                          pad=1)
    api = BlackBoxAPI.from_jax(fwd, (size, size, 1), k, name="conv4")
    inv = make_inverter(api, gen.apply_batchstats, nz=nz, cfg=cfg, mean=(0.5,), std=(0.5,),
                        image_size=size)
    res = inv(jax.random.key(1), 0, gen.init(jax.random.key(2))[0], None)
    assert res.images.shape == (8, size, size, 1)
    assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    assert np.isfinite(np.asarray(res.clean_ce)).all()
    assert api.queries == inversion_queries(cfg, k)


def test_polyline_distance_custom_vjp_equals_the_min_and_its_gradient():
    """The renderer's distance: forward = min over segments, backward = the gradient of that min
    (the custom VJP differentiates only each pixel's nearest segment)."""
    from dfml_jax.models.strokes import _polyline_d2, _segment_d2

    pts = jax.random.uniform(jax.random.key(0), (2, 3, 6, 2)) * 10
    grid = jnp.arange(10, dtype=jnp.float32) + 0.5
    plain = lambda p: jnp.min(_segment_d2(p, grid), axis=-3)  # noqa: E731
    np.testing.assert_allclose(_polyline_d2(pts, grid), plain(pts), rtol=1e-6, atol=1e-6)
    w = jax.random.normal(jax.random.key(1), (2, 3, 10, 10))
    g_custom = jax.grad(lambda p: jnp.sum(w * _polyline_d2(p, grid)))(pts)
    g_plain = jax.grad(lambda p: jnp.sum(w * plain(p)))(pts)
    np.testing.assert_allclose(g_custom, g_plain, rtol=1e-4, atol=1e-4)


def test_latent_space_zero_order_inversion_over_stroke_parameters():
    """zo_space='latent': the directions search each image's 8 * S stroke parameters (the renderer
    inside the black-box objective); same queries as pixel directions, a much better estimate, so
    the same budget lowers the teacher's CE further; only Z moves; clear errors."""
    from dfml_jax.bidf_mkd import InversionConfig, inversion_queries, make_inverter
    from dfml_jax.api import BlackBoxAPI
    from dfml_jax.parallel import make_mesh

    size, k, ns = 16, 3, 2
    kw = jax.random.normal(jax.random.key(7), (size * size, k))
    teacher = lambda x: 0.3 * x.reshape(x.shape[0], -1) @ kw  # noqa: E731
    gen = functional(create_model("strokes", latent="direct", num_strokes=ns, img_size=size,
                                  nc=1, rngs_or_key=0))
    nz = 8 * ns
    base = InversionConfig(iterations=30, per_class=2, lr=0.05, num_directions=8,
                           smoothing=0.01, pad=1, flip=False)

    def invert(**changes):
        cfg = dataclasses.replace(base, **changes)
        api = BlackBoxAPI.from_jax(teacher, (size, size, 1), k, name="lin")
        inv = make_inverter(api, gen.apply_batchstats, nz=nz, cfg=cfg, mean=(0.5,), std=(0.5,),
                            image_size=size)
        return api, cfg, inv(jax.random.key(1), 0, gen.init(jax.random.key(2))[0], None)

    api, cfg, lat = invert(zo_space="latent")
    assert api.queries == inversion_queries(cfg, k) == 30 * 6 * (8 + 1)
    _, _, pix = invert()
    ce_lat, ce_pix = (float(np.asarray(r.clean_ce)[-5:].mean()) for r in (lat, pix))
    assert ce_lat < 0.8 * float(lat.clean_ce[0])
    assert ce_lat < ce_pix
    assert float(np.mean(np.asarray(lat.zero_fraction))) < 0.5
    with pytest.raises(ValueError, match="zo_space"):
        invert(zo_space="pixels")
    with pytest.raises(ValueError, match="direction_resolution=None"):
        invert(zo_space="latent", direction_resolution=4)
    # samples sharded over 2 devices: each renders and queries its half, same directions
    cfg = dataclasses.replace(base, zo_space="latent", iterations=3)
    api = BlackBoxAPI.from_jax(teacher, (size, size, 1), k, name="lin")
    inv = make_inverter(api, gen.apply_batchstats, nz=nz, cfg=cfg, mean=(0.5,), std=(0.5,),
                        image_size=size, mesh=make_mesh(2))
    sharded = inv(jax.random.key(1), 0, gen.init(jax.random.key(2))[0], None)
    _, _, single = invert(zo_space="latent", iterations=3)
    assert api.queries == inversion_queries(cfg, k)
    np.testing.assert_allclose(sharded.clean_ce, single.clean_ce, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sharded.images, single.images, atol=1e-4)
    with pytest.raises(ValueError, match="shard='samples'"):
        make_inverter(api, gen.apply_batchstats, nz=nz, cfg=cfg, mean=(0.5,), std=(0.5,),
                      image_size=size, mesh=make_mesh(2), shard="directions")
