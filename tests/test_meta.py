"""MAML, few-shot evaluation, KD losses, augmentation, task memory and the plateau rule."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax import losses, memory, meta
from dfml_jax.training import augment


def mlp_apply(p, x):
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"]


def mlp_params(key, d=6, h=5, k=3):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (d, h)) * 0.5, "b1": jnp.zeros(h),
            "w2": jax.random.normal(k2, (h, k)) * 0.5}


def task(key, n=9, d=6, k=3):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, k)


@pytest.mark.parametrize("first_order", [False, True])
def test_second_order_maml_gradient_matches_finite_differences(first_order):
    jax.config.update("jax_enable_x64", True)
    try:
        p = jax.tree.map(lambda a: a.astype(jnp.float64), mlp_params(jax.random.key(0)))
        sx, sy = task(jax.random.key(1))
        qx, qy = task(jax.random.key(2))
        sx, qx = sx.astype(jnp.float64), qx.astype(jnp.float64)

        def outer(params, fo=first_order):
            return meta.maml_task_loss(mlp_apply, params, sx, sy, qx, qy, steps=3, lr=0.5,
                                       first_order=fo)[0]

        g = jax.grad(outer)(p)
        eps = 1e-6
        direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), p)
        plus = jax.tree.map(lambda a, d: a + eps * d, p, direction)
        minus = jax.tree.map(lambda a, d: a - eps * d, p, direction)
        fd = (outer(plus, False) - outer(minus, False)) / (2 * eps)  # true (second-order) derivative
        analytic = sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
        if first_order:
            assert abs(float(analytic - fd)) > 1e-4 * abs(float(fd))  # FOMAML is an approximation
        else:
            np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("unroll", [2, True])
def test_unrolled_inner_loop_is_the_same_maml(unroll):
    """``unroll`` changes how the inner scan compiles, not what it computes (second order)."""
    p = mlp_params(jax.random.key(0))
    sx, sy = task(jax.random.key(1))
    qx, qy = task(jax.random.key(2))

    def outer(params, u):
        return meta.maml_task_loss(mlp_apply, params, sx, sy, qx, qy, steps=5, lr=0.5,
                                   unroll=u)[0]

    (l1, g1), (l2, g2) = (jax.value_and_grad(outer)(p, u) for u in (1, unroll))
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_adaptation_reduces_support_loss():
    p = mlp_params(jax.random.key(0))
    x, y = task(jax.random.key(1))
    before = losses.cross_entropy(mlp_apply(p, x), y)
    fast = meta.adapt(mlp_apply, p, x, y, steps=20, lr=0.5)
    assert losses.cross_entropy(mlp_apply(fast, x), y) < before * 0.7


def test_evaluate_tasks_shapes_ci_and_padding():
    p = mlp_params(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 7)
    sx, sy = jax.vmap(task)(keys)
    res = meta.evaluate_tasks(mlp_apply, p, sx, sy, sx, sy, steps=10, lr=0.5, batch_size=3)
    assert res.accuracies.shape == (7,)
    assert 0 <= res.mean <= 100 and res.ci95 >= 0
    # each task evaluated on its own support set after 10 steps: well above chance (33%)
    assert res.mean > 50
    np.testing.assert_allclose(res.ci95, 1.96 * res.accuracies.std() / np.sqrt(7))


def test_select_finetune_lr_picks_best_validation_lr_without_retracing():
    p = mlp_params(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 6)
    sx, sy = jax.vmap(task)(keys)
    meta._eval_chunks_jit.clear_cache()
    best, table = meta.select_finetune_lr(mlp_apply, p, sx, sy, sx, sy, lrs=(0.0, 0.5, 0.001),
                                          steps=10, batch_size=3)
    assert set(table) == {0.0, 0.5, 0.001}
    assert best == max(table, key=lambda v: table[v].mean) == 0.5  # adapting beats not adapting
    for lr, r in table.items():  # each entry is exactly evaluate_tasks at that lr
        ref = meta.evaluate_tasks(mlp_apply, p, sx, sy, sx, sy, steps=10, lr=lr, batch_size=3)
        np.testing.assert_allclose(r.accuracies, ref.accuracies)
    assert meta._eval_chunks_jit._cache_size() == 1  # the learning rate is traced: one compile
    with pytest.raises(ValueError, match="learning rates"):
        meta.select_finetune_lr(mlp_apply, p, sx, sy, sx, sy, lrs=())


def test_kd_losses():
    s = jax.random.normal(jax.random.key(0), (4, 5))
    t = jax.nn.softmax(jax.random.normal(jax.random.key(1), (4, 5)))
    assert float(losses.kd_kl(jnp.log(t), t)) == pytest.approx(0.0, abs=1e-6)
    kl = jnp.mean(jnp.sum(t * (jnp.log(t) - jax.nn.log_softmax(s)), -1))
    np.testing.assert_allclose(losses.kd_kl(s, t), kl, rtol=1e-6)
    # the paper's quirk: mean over n*K of p_t (log p_t - p_s)
    ref = np.mean(np.asarray(t) * (np.log(np.asarray(t)) - np.asarray(jax.nn.softmax(s))))
    np.testing.assert_allclose(losses.kd_paper(s, t), ref, rtol=1e-5)
    labels = jnp.array([0, 2, 1, 4])
    np.testing.assert_array_equal(losses.teacher_probs(labels, "label", 5), jax.nn.one_hot(labels, 5))
    np.testing.assert_allclose(losses.teacher_probs(jnp.log(t), "logits", 5), t, rtol=1e-5)


def test_augmentation_shares_one_draw_and_is_differentiable():
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
    y = augment.batch_shared_augment(jnp.concatenate([x[:1]] * 6), jax.random.key(3), pad=2)
    assert np.allclose(y, y[:1])  # identical inputs -> identical outputs: one crop/flip for all
    ys = [augment.batch_shared_augment(x, jax.random.key(k), pad=2) for k in range(8)]
    assert len({np.asarray(a).tobytes() for a in ys}) > 1  # draws differ across keys
    g = jax.grad(lambda x: augment.batch_shared_augment(x, jax.random.key(1), pad=2).sum())(x)
    assert g.shape == x.shape and float(g.sum()) > 0
    z = augment.batch_shared_augment(x, jax.random.key(1), pad=0, flip=False, mean=(0.5,), std=(0.25,))
    np.testing.assert_allclose(z, (x - 0.5) / 0.25, rtol=1e-6)
    assert augment.batch_shared_augment(jnp.ones((2, 12, 12, 3)), jax.random.key(0), out_size=8).shape == (2, 8, 8, 3)


def test_memory_ring_buffer_order_and_quantisation():
    m = memory.init_memory(rows=3, slots=2, per_slot=2, image_shape=(1, 1, 1))
    for v in (0.1, 0.2, 0.3):  # the third write to row 1 overwrites its oldest slot
        m = memory.write(m, jnp.array([1]), jnp.full((1, 2, 1, 1, 1), v))
    vals = np.asarray(m.images[1, :, 0, 0, 0, 0])
    np.testing.assert_array_equal(vals, [int(0.3 * 255), int(0.2 * 255)])
    assert int(m.next_slot[1]) == 1 and int(memory.num_filled(m)) == 1
    assert not bool(m.filled[0].any())


def test_memory_replay_tasks_distinct_classes_and_images():
    rows, slots, per_slot = 6, 3, 4
    m = memory.init_memory(rows, slots, per_slot, (2, 2, 1))
    for r in (0, 2, 3, 5, 1):  # row 4 never written
        imgs = (r * 12 + jnp.arange(per_slot)).reshape(1, per_slot, 1, 1, 1) / 255.0 + 0.5 / 255
        m = memory.write(m, jnp.array([r]), jnp.broadcast_to(imgs, (1, per_slot, 2, 2, 1)))
    sx, sy, qx, qy, rws = jax.jit(memory.sample_tasks, static_argnums=(2,),
                                  static_argnames=("ways", "shots", "query"))(
        m, jax.random.key(0), 50, ways=3, shots=1, query=2)
    assert sx.shape == (50, 3, 2, 2, 1) and qx.shape == (50, 6, 2, 2, 1)
    rws = np.asarray(rws)
    assert (np.sort(rws, 1)[:, 1:] != np.sort(rws, 1)[:, :-1]).all()  # distinct classes
    assert not (rws == 4).any()
    np.testing.assert_array_equal(np.asarray(sy[0]), [0, 1, 2])
    pix = np.round(np.concatenate([sx, qx], 1)[..., 0, 0, 0] * 255).astype(int)
    cls = pix // 12  # every image comes from its task class, and images within a class are distinct
    labels = np.concatenate([sy, qy], 1)
    np.testing.assert_array_equal(cls, np.take_along_axis(rws, labels, 1))
    for t in range(50):
        assert len(set(pix[t].tolist())) == 9


def test_row_of_classes():
    np.testing.assert_array_equal(memory.row_of_classes([3, 7, 9], [9, 3]), [2, 0])
    with pytest.raises(ValueError, match=r"\[8\]"):
        memory.row_of_classes([3, 7, 9], [8])


def test_plateau_trigger():
    p = memory.PlateauTrigger(patience=3)
    fired = [p.update(a) for a in [0.1, 0.2, 0.2, 0.15, 0.2, 0.3, 0.1]]
    assert fired == [False, False, False, False, True, False, False]
    q = memory.PlateauTrigger(1)
    q.load_state_dict(p.state_dict())
    assert (q.best, q.stall, q.patience) == (p.best, p.stall, 3)


def test_evaluation_does_not_retrace():
    chex.clear_trace_counter()
    p = mlp_params(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 4)
    sx, sy = jax.vmap(task)(keys)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(p, sx, sy):
        return jax.vmap(lambda a, b: meta.maml_task_loss(mlp_apply, p, a, b, a, b, steps=2, lr=0.1)[0])(sx, sy).sum()

    for _ in range(3):
        jax.grad(loss)(p, sx, sy)
