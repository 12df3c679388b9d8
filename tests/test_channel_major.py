"""Channel-major ("CNHW") activations: the same function as NHWC at every layer and for the
Conv4 meta-model up to its second-order MAML gradient (issue 16)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfml_jax.bidf_mkd.config import BiDfExperimentConfig
from dfml_jax.bidf_mkd.experiment import meta_model_options
from dfml_jax.bidf_mkd.metastep import KDTask, ReplayTasks, kd_task_loss, make_meta_steps
from dfml_jax.models import create_model, functional, layers

to_cm = lambda x: jnp.transpose(x, (3, 0, 1, 2))  # noqa: E731  NHWC -> CNHW
to_nhwc = lambda x: jnp.transpose(x, (1, 2, 3, 0))  # noqa: E731


def rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("impl", layers.CONV_IMPLS)
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (1, 1, 0),
                                              (3, 1, 0)])
def test_conv2d_cnhw_equals_nhwc(impl, k, stride, padding):
    x, w, b = rand((3, 9, 8, 4)), rand((k, k, 4, 6), 1), rand((6,), 2)
    ref = layers.conv2d(x, w, b, stride=stride, padding=padding, impl=impl)
    cm = layers.conv2d(to_cm(x), w, b, stride=stride, padding=padding, impl=impl, layout="CNHW")
    np.testing.assert_allclose(to_nhwc(cm), ref, rtol=1e-5, atol=1e-5)
    # gradients with respect to the input and the kernel
    ct = rand(ref.shape, 3)
    g_ref = jax.grad(lambda x, w: jnp.sum(ct * layers.conv2d(
        x, w, b, stride=stride, padding=padding, impl=impl)), argnums=(0, 1))(x, w)
    g_cm = jax.grad(lambda x, w: jnp.sum(to_cm(ct) * layers.conv2d(
        x, w, b, stride=stride, padding=padding, impl=impl, layout="CNHW")),
        argnums=(0, 1))(to_cm(x), w)
    np.testing.assert_allclose(to_nhwc(g_cm[0]), g_ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_cm[1], g_ref[1], rtol=1e-5, atol=1e-4)


def test_batch_norm_channel_axis_0_equals_last():
    x, s, b = rand((4, 5, 6, 3)), rand((3,), 1), rand((3,), 2)
    mean, var = jnp.zeros(3), jnp.ones(3)
    y, st = layers.batch_norm(x, s, b, mean, var, use_batch_stats=True)
    y0, st0 = layers.batch_norm(to_cm(x), s, b, mean, var, use_batch_stats=True, channel_axis=0)
    np.testing.assert_allclose(to_nhwc(y0), y, rtol=1e-5, atol=1e-5)
    for a, c in zip(st0, st):
        assert a.shape == (3,)
        np.testing.assert_allclose(a, c, rtol=1e-5)
    # running statistics (eval mode) and no affine transform
    y, _ = layers.batch_norm(x, None, None, st[0], st[1], use_batch_stats=False)
    y0, _ = layers.batch_norm(to_cm(x), None, None, st[0], st[1], use_batch_stats=False,
                              channel_axis=0)
    np.testing.assert_allclose(to_nhwc(y0), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="channel_axis"):
        layers.batch_norm(x, s, b, None, None, use_batch_stats=True, channel_axis=1)


def test_max_pool2_cnhw_equals_nhwc_with_ties():
    x = jnp.asarray(np.round(np.random.default_rng(0).uniform(0, 2, (3, 7, 6, 2))), jnp.float32)
    w = rand((3, 3, 3, 2), 1)
    np.testing.assert_array_equal(to_nhwc(layers.max_pool2(to_cm(x), "CNHW")), layers.max_pool2(x))
    g = jax.grad(lambda v: jnp.sum(w * layers.max_pool2(v) ** 2))(x)
    g_cm = jax.grad(lambda v: jnp.sum(to_cm(w) * layers.max_pool2(v, "CNHW") ** 2))(to_cm(x))
    np.testing.assert_allclose(to_nhwc(g_cm), g, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown layout"):
        layers.max_pool2(x, "NCHW")


def test_conv_bad_layout_names_the_choices():
    with pytest.raises(ValueError, match="valid: NHWC, CNHW"):
        layers.conv2d(rand((1, 4, 4, 2)), rand((3, 3, 2, 2)), layout="NCHW")
    with pytest.raises(ValueError, match="channels"):
        layers.conv2d(rand((1, 4, 4, 2)), rand((3, 3, 2, 2)), layout="CNHW")


def conv4_pair(shape=(16, 16, 3), **kw):
    mk = lambda **k: functional(create_model(  # noqa: E731
        "conv4", num_classes=5, input_shape=shape, rngs_or_key=3, width=8, **kw, **k))
    return mk(), mk(layout="CNHW")


def test_conv4_cnhw_same_parameters_and_function():
    a, b = conv4_pair(track_running_stats=True)
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a.params, b.params))
    x = rand((6, 16, 16, 3))
    np.testing.assert_allclose(b.apply_batchstats(b.params, x), a.apply_batchstats(a.params, x),
                               rtol=1e-4, atol=1e-5)
    # training mode updates the running statistics identically; eval mode then uses them
    (ya, sa), (yb, sb) = (m.apply(m.params, m.state, x, train=True) for m in (a, b))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), sa, sb)
    ea, _ = a.apply(a.params, sa, x, train=False)
    eb, _ = b.apply(b.params, sb, x, train=False)
    np.testing.assert_allclose(eb, ea, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unroll", [1, True])
def test_conv4_cnhw_second_order_maml_gradient(unroll):
    """The KD task's outer gradient (second order through 3 inner steps) in either layout."""
    a, b = conv4_pair()
    sx, qx = rand((10, 16, 16, 3), 1), rand((10, 16, 16, 3), 2)
    sp, qp = jax.nn.softmax(rand((10, 5), 3)), jax.nn.softmax(rand((10, 5), 4))
    task = KDTask(sx, sp, qx, qp, jnp.tile(jnp.arange(5), 2))
    grad = lambda m: jax.jit(jax.value_and_grad(lambda p: kd_task_loss(  # noqa: E731
        m.apply_batchstats, p, task, steps=3, lr=0.1, unroll=unroll)[0]))(m.params)
    (la, ga), (lb, gb) = grad(a), grad(b)
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    flat_a, flat_b = jax.tree.leaves(ga), jax.tree.leaves(gb)
    for u, v in zip(flat_a, flat_b):
        np.testing.assert_allclose(v, u, rtol=1e-3, atol=1e-4 * float(jnp.abs(u).max()) + 1e-7)


def test_meta_steps_unroll_equals_scan():
    a, _ = conv4_pair()
    tasks = ReplayTasks(rand((2, 5, 16, 16, 3)), jnp.tile(jnp.arange(5), (2, 1)),
                        rand((2, 10, 16, 16, 3), 1), jnp.tile(jnp.arange(5).repeat(2), (2, 1)))
    outs = []
    for unroll in (1, True):
        st = make_meta_steps(a.apply_batchstats, optax.sgd(0.1), replay_steps=2, kd_steps=2,
                             inner_lr=0.1, unroll=unroll)
        outs.append(st.replay(a.params, optax.sgd(0.1).init(a.params), tasks))
    np.testing.assert_allclose(outs[1][2], outs[0][2], rtol=1e-6)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-7),
                 outs[0][0], outs[1][0])


def test_meta_layout_option_of_the_experiment():
    cfg = BiDfExperimentConfig(meta_layout="CNHW")
    assert meta_model_options(cfg) == {"width": cfg.meta_width, "layout": "CNHW"}
    assert meta_model_options(BiDfExperimentConfig()) == {"width": 32}
    with pytest.raises(ValueError, match="needs meta_arch='conv4'"):
        meta_model_options(BiDfExperimentConfig(meta_arch="resnet10", meta_layout="CNHW"))
