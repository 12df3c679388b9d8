"""Tests of dfml_jax.models: shapes, parameter counts, conv back-ends, BN modes, functional view."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from dfml_jax.models import (MODELS, count_params, create_model, functional, layers, model_config,
                             preprocess)
from dfml_jax.models import stack_trees, unstack_tree


def conv_p(k, cin, cout, bias):
    return k * k * cin * cout + (cout if bias else 0)


def bn_p(c):
    return 2 * c


def lin_p(a, b):
    return a * b + b


def abstract_fm(name, **kw):
    """Functional view of an abstract model (shapes only: no compilation, no initialisation)."""
    return functional(nnx.eval_shape(lambda: create_model(name, **kw)))


def out_shape(fm, x_shape, train=False):
    y, _ = jax.eval_shape(functools.partial(fm.apply, train=train), fm.params, fm.state,
                          jax.ShapeDtypeStruct(x_shape, jnp.float32))
    return y.shape


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("shape,width,classes", [((32, 32, 3), 32, 5), ((84, 84, 3), 32, 5),
                                                 ((28, 28, 1), 8, 7)])
def test_conv4_params_and_shapes(shape, width, classes):
    h, w, c = shape
    fm = abstract_fm("conv4", num_classes=classes, input_shape=shape, width=width)
    feat = width * (h >> 4) * (w >> 4)
    expected = (conv_p(3, c, width, True) + 3 * conv_p(3, width, width, True) + 4 * bn_p(width)
                + lin_p(feat, classes))
    assert count_params(fm.params) == expected
    assert count_params(fm.state) == 4 * 2 * width  # running mean + var
    if shape == (32, 32, 3):
        assert feat == 128
    if shape == (84, 84, 3):
        assert feat == 800
    assert out_shape(fm, (3, *shape)) == (3, classes)


def test_conv4_global_pool_mixed_resolutions():
    fm = abstract_fm("conv4", num_classes=5, input_shape=(84, 84, 3), width=8, global_pool=True,
                     track_running_stats=False)
    assert count_params(fm.params) == (conv_p(3, 3, 8, True) + 3 * conv_p(3, 8, 8, True)
                                       + 4 * bn_p(8) + lin_p(8, 5))
    assert count_params(fm.state) == 0
    for s in (32, 84):
        assert out_shape(fm, (2, s, s, 3), train=True) == (2, 5)


def resnet_expected(c, width, blocks, classes):
    total = conv_p(3, c, width, False) + bn_p(width)
    cin = width
    for stage, n in enumerate(blocks):
        cout = width * 2 ** stage
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            total += conv_p(3, cin, cout, False) + bn_p(cout) + conv_p(3, cout, cout, False) \
                + bn_p(cout)
            if stride != 1 or cin != cout:
                total += conv_p(1, cin, cout, False) + bn_p(cout)
            cin = cout
    return total + lin_p(8 * width, classes)


@pytest.mark.parametrize("name,blocks", [("resnet10", (1, 1, 1, 1)), ("resnet18", (2, 2, 2, 2))])
def test_resnet_params_and_shapes(name, blocks):
    fm = abstract_fm(name, num_classes=5, input_shape=(32, 32, 3), width=64)
    assert count_params(fm.params) == resnet_expected(3, 64, blocks, 5)
    small = abstract_fm(name, num_classes=5, input_shape=(16, 16, 1), width=4)
    assert count_params(small.params) == resnet_expected(1, 4, blocks, 5)
    y, new_state = jax.eval_shape(functools.partial(small.apply, train=True), small.params,
                                  small.state, jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32))
    assert y.shape == (2, 5)
    assert jax.tree.structure(new_state) == jax.tree.structure(small.state)


def test_resnet18_full_width_matches_the_known_count():
    # The CIFAR ResNet-18 (3x3 stem, 64..512, 10 classes) has 11,173,962 parameters.
    fm = abstract_fm("resnet18", num_classes=10, input_shape=(32, 32, 3))
    assert count_params(fm.params) == 11_173_962 == resnet_expected(3, 64, (2,) * 4, 10)


def test_lenet5_and_mlp():
    fm = abstract_fm("lenet5", num_classes=10, input_shape=(28, 28, 1))
    assert count_params(fm.params) == (conv_p(5, 1, 16, True) + bn_p(16) + conv_p(5, 16, 32, True)
                                       + bn_p(32) + lin_p(1568, 10))
    assert out_shape(fm, (2, 28, 28, 1)) == (2, 10)
    fm32 = abstract_fm("lenet5", num_classes=10, input_shape=(32, 32, 1))
    assert fm32.params["classifier"]["kernel"].shape == (2048, 10)

    mlp = abstract_fm("mlp", num_classes=10, input_shape=(28, 28, 1))
    assert count_params(mlp.params) == lin_p(784, 512) + lin_p(512, 128) + lin_p(128, 10)
    assert count_params(mlp.state) == 0
    assert out_shape(mlp, (3, 28, 28, 1), train=True) == (3, 10)


def test_model_init_statistics():
    m = create_model("conv4", num_classes=5, input_shape=(32, 32, 3), rngs_or_key=3, width=64)
    k = np.asarray(m.convs[1].kernel[...])
    assert abs(k.std() - np.sqrt(2 / (9 * 64))) < 0.01  # N(0, 2/(9*C_out))
    np.testing.assert_array_equal(np.asarray(m.bns[0].scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(m.bns[0].bias[...]), 0.0)
    bound = 1 / np.sqrt(9 * 3)
    b = np.asarray(m.convs[0].bias[...])
    assert np.all(np.abs(b) <= bound) and b.std() > 0
    lk = np.asarray(m.classifier.kernel[...])
    assert np.all(np.abs(lk) <= 1 / np.sqrt(m.feature_dim))


def test_create_model_errors_and_config_roundtrip():
    with pytest.raises(ValueError,
                       match="valid: conv4, dcgan, lenet5, mlp, resnet10, resnet18, strokes"):
        create_model("vgg", num_classes=5, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="at least 16x16"):
        create_model("conv4", num_classes=5, input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="num_classes and input_shape"):
        create_model("conv4", input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="generator"):
        create_model("dcgan", num_classes=5)
    m = create_model("conv4", num_classes=5, input_shape=(28, 28, 1), rngs_or_key=0, width=8)
    with pytest.raises(ValueError, match=r"built for inputs \(N, 28, 28, 1\)"):
        m(jnp.ones((1, 32, 32, 1)), train=False)
    cfg = model_config(m)
    assert cfg == {"name": "conv4", "num_classes": 5, "input_shape": [28, 28, 1], "width": 8}
    fm = functional(m)
    # one configuration -> one hashable graph and ONE shared apply function (shared jit caches)
    other = functional(create_model(rngs_or_key=5, **cfg))
    assert other.graphdef == fm.graphdef and other.apply is fm.apply
    p2, s2 = fm.init(jax.random.key(0))
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), fm.params, p2)
    assert all(jax.tree.leaves(chex_equal))  # same seed -> same init
    assert set(MODELS) == {"conv4", "resnet10", "resnet18", "lenet5", "mlp", "dcgan", "strokes"}


# ----------------------------------------------------------------------------- conv back-ends

CONV_CASES = [(3, 2, 1, 4, 9), (1, 2, 0, 4, 8), (5, 1, 2, 2, 7)]  # 3x3 stride 1: MAML test


def test_im2col_matches_lax_values_and_gradients():
    """Forward values, input and kernel gradients agree for 3x3/5x5/1x1, stride 1/2, padding."""
    def run(impl):
        def f(xs, ws):
            outs = [layers.conv2d(x, w, stride=st, padding=pd, impl=impl)
                    for x, w, (_, st, pd, _, _) in zip(xs, ws, CONV_CASES)]
            loss = sum(jnp.sum(jnp.tanh(o) ** 2) for o in outs)
            return loss, outs
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    keys = jax.random.split(jax.random.key(0), 2 * len(CONV_CASES))
    xs = [jax.random.normal(keys[2 * i], (2, size, size, cin))
          for i, (_, _, _, cin, size) in enumerate(CONV_CASES)]
    ws = [0.3 * jax.random.normal(keys[2 * i + 1], (k, k, cin, 5))
          for i, (k, _, _, cin, _) in enumerate(CONV_CASES)]
    (_, outs_a), grads_a = run("im2col")(xs, ws)
    (_, outs_b), grads_b = run("lax")(xs, ws)
    for a, b in zip(outs_a, outs_b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert outs_a[0].shape == (2, 5, 5, 5) and outs_a[1].shape == (2, 4, 4, 5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_im2col_matches_lax_second_order_maml():
    """Second-order MAML gradient of a Conv4 is the same with both back-ends."""
    key = jax.random.key(1)
    xs = jax.random.uniform(key, (5, 8, 8, 1))
    xq = jax.random.uniform(jax.random.fold_in(key, 1), (10, 8, 8, 1))
    ys, yq = jnp.arange(5), jnp.arange(10) % 5

    def grads_for(impl):
        fm = functional(create_model("conv4", num_classes=5, input_shape=(8, 8, 1), rngs_or_key=0,
                                     width=4, depth=1, track_running_stats=False, conv_impl=impl))

        def ce(p, x, y):
            logits = fm.apply_batchstats(p, x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        def outer(p, second_order=True):
            g = jax.grad(ce)(p, xs, ys)
            if not second_order:
                g = jax.lax.stop_gradient(g)
            return ce(jax.tree.map(lambda a, b: a - 0.5 * b, p, g), xq, yq)

        both = jax.jit(lambda p: (jax.grad(outer)(p), jax.grad(outer)(p, False)))
        return both(fm.params)

    (so_a, fo_a), (so_b, _) = grads_for("im2col"), grads_for("lax")
    for a, b in zip(jax.tree.leaves(so_a), jax.tree.leaves(so_b)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    # The second-order terms are not negligible here, so the comparison above is meaningful.
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(so_a),
                                                              jax.tree.leaves(fo_a)))
    assert diff > 1e-4


def test_max_pool2_gradient_shares_ties_like_jnp_max():
    """Same values and gradients as the reshape + jnp.max form, bit for bit, with 3- and 4-way ties
    (second derivatives: to rounding)."""
    def reshape_max(x):
        n, h, w, c = x.shape
        x = x[:, : h // 2 * 2, : w // 2 * 2]
        return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))

    rng = np.random.default_rng(0)
    x = jnp.asarray(np.round(rng.uniform(0, 2, (3, 7, 6, 2))), jnp.float32)   # many ties
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 2)), jnp.float32)
    for f in (lambda v: v, jax.jit):
        np.testing.assert_array_equal(f(layers.max_pool2)(x), reshape_max(x))
        g_new = f(jax.grad(lambda v: jnp.sum(w * layers.max_pool2(v) ** 2)))(x)
        g_old = f(jax.grad(lambda v: jnp.sum(w * reshape_max(v) ** 2)))(x)
        np.testing.assert_array_equal(g_new, g_old)
        # second order, ties included: equal up to rounding (a tangent divided by the tie count
        # in another order); a different tie split would be off by a third
        h_new = f(jax.grad(lambda v: jnp.sum(jax.grad(
            lambda u: jnp.sum(w * layers.max_pool2(u * v) ** 2))(v) ** 2)))(x)
        h_old = f(jax.grad(lambda v: jnp.sum(jax.grad(
            lambda u: jnp.sum(w * reshape_max(u * v) ** 2))(v) ** 2)))(x)
        np.testing.assert_allclose(h_new, h_old, rtol=1e-6, atol=0)
    win = np.asarray(x)[:, :6, :6].reshape(3, 3, 2, 3, 2, 2)
    ties = (win == win.max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4))
    assert (ties == 3).any() and (ties == 4).any()                  # 3- and 4-way ties were hit


def test_max_pool2_second_order_under_jit_matches_eager():
    """Hessian-vector product of a width-32 Conv4 on 16x16 inputs: jit == eager.

    With max_pool2 written as reshape + jnp.max, XLA:CPU compiled this product 32% off the eager
    (and finite-difference) value in float32 on the tests' 8 emulated devices (18% in float64 on
    one device); second-order MAML goes through exactly this derivative.
    """
    fm = functional(create_model("conv4", num_classes=5, input_shape=(16, 16, 3), rngs_or_key=3,
                                 width=32))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 16, 16, 3)), jnp.float32)
    y = jnp.arange(5)
    d = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), fm.params)

    def loss(p):
        logits = fm.apply_batchstats(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def hvp(p):
        return jax.jvp(jax.grad(loss), (p,), (d,))[1]

    jitted = jax.jit(hvp)(fm.params)
    with jax.disable_jit():
        eager = hvp(fm.params)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(jitted),
                                                            jax.tree.leaves(eager)))
    den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(eager))
    assert (num / den) ** 0.5 < 1e-3


def test_pooling_and_upsample():
    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
    p = layers.max_pool2(x)
    assert p.shape == (2, 2, 2, 1)  # floor mode
    assert float(p[0, 0, 0, 0]) == 6.0
    u = layers.upsample_nearest2(p)
    assert u.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(u[0, :2, :2, 0], 6.0)


# ----------------------------------------------------------------------------- BN modes

def test_batch_norm_function_matches_pytorch_semantics():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 2 + 1
    mean, var = jnp.zeros(2), jnp.ones(2)
    y, (nm, nv) = layers.batch_norm(x, jnp.ones(2), jnp.zeros(2), mean, var, use_batch_stats=True)
    xf = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2),
                               (xf - xf.mean(0)) / np.sqrt(xf.var(0) + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nm, 0.1 * xf.mean(0), rtol=1e-5)
    np.testing.assert_allclose(nv, 0.9 + 0.1 * xf.var(0, ddof=1), rtol=1e-5)
    y_eval, none = layers.batch_norm(x, None, None, nm, nv, use_batch_stats=False)
    assert none is None
    np.testing.assert_allclose(y_eval, (x - nm) / jnp.sqrt(nv + 1e-5), rtol=1e-5)
    with pytest.raises(ValueError, match="not tracked"):
        layers.batch_norm(x, None, None, None, None, use_batch_stats=False)


def test_bn_modes_teacher_and_meta_model():
    key = jax.random.key(0)
    x = jax.random.uniform(key, (6, 8, 8, 1))
    kw = dict(num_classes=3, input_shape=(8, 8, 1), rngs_or_key=0, width=4, depth=2)
    teacher = functional(create_model("conv4", **kw))
    train = jax.jit(functools.partial(teacher.apply, train=True))
    evaluate = jax.jit(functools.partial(teacher.apply, train=False))
    before = jax.tree.map(jnp.copy, teacher.state)
    _, s1 = teacher.apply(teacher.params, teacher.state, x, train=True)  # eager: purity check
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(teacher.state)):
        np.testing.assert_array_equal(a, b)
    # the returned running stats moved towards the batch statistics (momentum 0.1)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(s1),
                                                      jax.tree.leaves(teacher.state)))
    first_conv = layers.conv2d(x, teacher.params["convs"][0]["kernel"][...],
                               teacher.params["convs"][0]["bias"][...], padding=1)
    np.testing.assert_allclose(s1["bns"][0]["mean"][...], 0.1 * first_conv.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    # a batch that shares its first 3 images with x (same shape: no recompilation)
    x2 = jnp.concatenate([x[:3], jax.random.uniform(jax.random.key(9), (3, 8, 8, 1)) * 3], 0)
    # eval mode: running stats -> per-sample outputs do not depend on the rest of the batch,
    # and the state comes back unchanged.
    y_all, s_eval = evaluate(teacher.params, s1, x)
    y_other, _ = evaluate(teacher.params, s1, x2)
    np.testing.assert_allclose(y_all[:3], y_other[:3], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_eval), jax.tree.leaves(s1)):
        np.testing.assert_array_equal(a, b)
    # train mode: batch statistics -> outputs depend on the batch.
    y_tr_all, _ = train(teacher.params, s1, x)
    y_tr_other, _ = train(teacher.params, s1, x2)
    assert not np.allclose(y_tr_all[:3], y_tr_other[:3], atol=1e-4)
    np.testing.assert_allclose(jax.jit(teacher.apply_batchstats)(teacher.params, x), y_tr_all,
                               rtol=1e-5, atol=1e-6)

    meta = functional(create_model("conv4", track_running_stats=False, **kw))
    assert jax.tree.leaves(meta.state) == []
    y_t, _ = jax.jit(functools.partial(meta.apply, train=True))(meta.params, meta.state, x)
    # transductive: batch statistics in "eval" mode too
    y_e, _ = jax.jit(functools.partial(meta.apply, train=False))(meta.params, meta.state, x)
    np.testing.assert_allclose(y_t, y_e, rtol=1e-6)
    np.testing.assert_allclose(y_t, y_tr_all, rtol=1e-5, atol=1e-6)  # same params (seed 0)


# ----------------------------------------------------------------------------- generator

@pytest.mark.parametrize("head,lo,hi", [("sigmoid", 0.0, 1.0), ("tanh_bn", -1.0, 1.0)])
def test_generator_shapes_range_and_reinit(head, lo, hi):
    g = create_model("dcgan", rngs_or_key=0, nz=16, ngf=8, img_size=12, nc=3, head=head)
    fg = functional(g)
    ngf, nz, s0 = 8, 16, 3
    expected = (lin_p(nz, 2 * ngf * s0 * s0) + bn_p(2 * ngf) + conv_p(3, 2 * ngf, 2 * ngf, False)
                + bn_p(2 * ngf) + conv_p(3, 2 * ngf, ngf, False) + bn_p(ngf) + conv_p(3, ngf, 3, True))
    assert count_params(fg.params) == expected  # the tanh_bn head's final BN has no affine params
    assert jax.tree.leaves(fg.state) == []
    z = jax.random.normal(jax.random.key(1), (10, nz)) * 5
    img = fg.apply_batchstats(fg.params, z)
    assert img.shape == (10, 12, 12, 3)
    assert float(img.min()) >= lo and float(img.max()) <= hi
    pre = fg.apply_batchstats(fg.params, z, pre_activation=True)
    act = jnp.tanh(pre) if head == "tanh_bn" else jax.nn.sigmoid(pre)
    np.testing.assert_allclose(act, img, rtol=1e-6)
    if head == "tanh_bn":  # final BN (affine=False) -> per-channel zero mean, unit variance
        np.testing.assert_allclose(pre.mean((0, 1, 2)), 0.0, atol=1e-4)
    # spec init: weights N(0, 0.02^2), biases 0, BN gamma N(1, 0.02^2)
    p, _ = jax.jit(fg.init)(jax.random.key(7))
    assert abs(float(jnp.std(p["conv1"]["kernel"][...])) - 0.02) < 0.003
    assert float(jnp.max(jnp.abs(p["fc"]["bias"][...]))) == 0.0
    gam = p["bn0"]["scale"][...]
    assert abs(float(gam.mean()) - 1.0) < 0.02 and 0.005 < float(gam.std()) < 0.05
    p2, _ = jax.jit(fg.init)(jax.random.key(8))
    assert not np.allclose(p["conv1"]["kernel"][...], p2["conv1"]["kernel"][...])
    with pytest.raises(ValueError, match="multiple of 4"):
        create_model("dcgan", rngs_or_key=0, img_size=30)


@pytest.mark.parametrize("impl", layers.CONV_IMPLS)
def test_upsample2_conv3x3_subpixel_equals_upsample_then_conv(impl):
    x = jax.random.normal(jax.random.key(0), (3, 5, 4, 6))
    k = jax.random.normal(jax.random.key(1), (3, 3, 6, 7))
    b = jax.random.normal(jax.random.key(2), (7,))
    literal = layers.conv2d(layers.upsample_nearest2(x), k, b, padding=1, impl=impl)
    for method in layers.UPSAMPLE_CONV_IMPLS:
        y = layers.upsample2_conv3x3(x, k, b, method=method, impl=impl)
        assert y.shape == (3, 10, 8, 7)
        np.testing.assert_allclose(y, literal, rtol=1e-5, atol=1e-5)
    # the gradients (kernel and input) agree too: the phase taps are sums of kernel taps
    cot = jax.random.normal(jax.random.key(3), literal.shape)
    grads = [jax.grad(lambda xx, kk: jnp.sum(cot * layers.upsample2_conv3x3(
        xx, kk, method=m, impl=impl)), argnums=(0, 1))(x, k) for m in layers.UPSAMPLE_CONV_IMPLS]
    for a, c in zip(*grads):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown method 'pixelshuffle'"):
        layers.upsample2_conv3x3(x, k, method="pixelshuffle")
    with pytest.raises(ValueError, match="3x3 kernel"):
        layers.upsample2_conv3x3(x, k[:2, :2])


def test_generator_subpixel_matches_default():
    kw = dict(rngs_or_key=0, nz=16, ngf=8, img_size=12, nc=3)
    default = functional(create_model("dcgan", **kw))
    sub = functional(create_model("dcgan", upsample="subpixel", **kw))
    z = jax.random.normal(jax.random.key(1), (10, 16))
    np.testing.assert_allclose(sub.apply_batchstats(default.params, z),
                               default.apply_batchstats(default.params, z), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown upsample 'bilinear'"):
        create_model("dcgan", upsample="bilinear", **kw)


# ----------------------------------------------------------------------------- population

@pytest.mark.parametrize("name,kw,modes", [
    ("conv4", dict(width=4, depth=2), (True, False)), ("resnet10", dict(width=2), (True,)),
    ("lenet5", dict(channels=(4, 8)), (True, False)), ("mlp", dict(hidden=(16,)), (True,))])
def test_population_vmap_equals_individual(name, kw, modes):
    P = 3
    fms = [functional(create_model(name, num_classes=5, input_shape=(8, 8, 1), rngs_or_key=i, **kw))
           for i in range(P)]
    params = stack_trees([f.params for f in fms])
    state = stack_trees([f.state for f in fms])
    x = jax.random.uniform(jax.random.key(0), (P, 6, 8, 8, 1))
    for train in modes:
        single = jax.jit(functools.partial(fms[0].apply, train=train))
        y, new_state = jax.jit(jax.vmap(functools.partial(fms[0].apply, train=train)))(
            params, state, x)
        for i in range(P):
            yi, si = single(fms[i].params, fms[i].state, x[i])
            np.testing.assert_allclose(y[i], yi, rtol=1e-4, atol=1e-5)
            for a, b in zip(jax.tree.leaves(unstack_tree(new_state, i)), jax.tree.leaves(si)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vmapped_init_from_keys_matches_individual_init():
    fm = functional(create_model("conv4", num_classes=5, input_shape=(8, 8, 1), rngs_or_key=0,
                                 width=4, depth=2))
    keys = jax.random.split(jax.random.key(3), 3)
    pop_params, _ = jax.jit(jax.vmap(fm.init))(keys)
    init = jax.jit(fm.init)
    for i in range(3):
        p_i, _ = init(keys[i])
        for a, b in zip(jax.tree.leaves(unstack_tree(pop_params, i)), jax.tree.leaves(p_i)):
            np.testing.assert_allclose(a, b, rtol=1e-6)


# ----------------------------------------------------------------------------- preprocessing

def test_normalize_and_stats():
    x = jnp.full((2, 4, 4, 3), 0.5)
    mean, std = preprocess.get_stats("cifar")
    y = preprocess.normalize(x, mean, std)
    np.testing.assert_allclose(y[0, 0, 0], (0.5 - np.array(mean)) / np.array(std), atol=1e-6)
    np.testing.assert_allclose(preprocess.denormalize(y, mean, std), x, rtol=1e-6)
    g = preprocess.normalize(jnp.ones((1, 2, 2, 1)), *preprocess.get_stats("glyphs"))
    np.testing.assert_allclose(g, 1.0)
    assert preprocess.get_stats("grayscale", 3) == ((0.5,) * 3, (0.5,) * 3)
    assert preprocess.stats_for_dataset("glyphs") == ((0.5,), (0.5,))
    assert preprocess.stats_for_dataset("unknown-set") is None
    m, s = preprocess.compute_stats(np.stack([np.zeros((2, 2, 1)), np.ones((2, 2, 1))]))
    assert m == (0.5,) and abs(s[0] - 0.5) < 1e-9
    with pytest.raises(ValueError, match="valid:"):
        preprocess.get_stats("nope")
    with pytest.raises(ValueError, match="expected"):
        preprocess.normalize(jnp.ones((1, 2, 2, 1)), (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
