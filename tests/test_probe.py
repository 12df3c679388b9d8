"""Transfer probes: the pieces compute what they say, cost what they say, and can tell data apart."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import BlackBoxAPI
from dfml_jax.bidf_mkd import InversionConfig, inversion_queries
from dfml_jax.bidf_mkd.probe import (ProbeConfig, Recipe, few_shot_eval, kd_student, pool_probe,
                                     recover_set, with_head, within_task_probe)
from dfml_jax.data import ClassDataset
from dfml_jax.models import create_model, functional, scale_kernels
from dfml_jax.training.augment import normalize

SIZE, K = 16, 5
MEAN, STD = (0.5,), (0.5,)
BASE = InversionConfig(iterations=3, per_class=4, lr=0.05, num_directions=4, smoothing=0.01,
                       pad=1, flip=False)
CFG = ProbeConfig(num_apis=2, student_width=8, within_steps=30, pool_steps=30, kd_batch=16,
                  val_tasks=4, lr_select_tasks=2, finetune_lrs=(0.1,), finetune_steps=2, query=2)


def teacher(seed):
    w = jax.random.normal(jax.random.key(seed), (SIZE * SIZE, K))
    return lambda x: x.reshape(x.shape[0], -1) @ w


def api(seed):
    return BlackBoxAPI.from_jax(teacher(seed), (SIZE, SIZE, 1), K, name=f"t{seed}")


def meta():
    return functional(create_model("conv4", num_classes=K, input_shape=(SIZE, SIZE, 1), width=8,
                                   rngs_or_key=0))


def test_recovered_sets_cost_what_they_say():
    real = np.random.default_rng(0).uniform(size=(K, 6, SIZE, SIZE, 1)).astype(np.float32)
    kw = dict(base=BASE, nz=8, ngf=4, mean=MEAN, std=STD, image_size=SIZE)
    a = api(0)
    s = recover_set(Recipe("zo"), a, jax.random.key(0), **kw)
    assert s.images.shape == (K * 4, SIZE, SIZE, 1) and s.probs.shape == (K * 4, K)
    assert s.queries == a.queries == inversion_queries(BASE, K) + K * 4
    np.testing.assert_array_equal(s.targets[:K + 1], [0, 1, 2, 3, 4, 0])
    wide = Recipe("zo", images_scale=3)
    assert wide.inversion_config(BASE).per_class == 12 and wide.inversion_config(BASE).iterations == 1
    r = recover_set(Recipe("real"), api(1), jax.random.key(0), real_images=real, **kw)
    assert r.queries == K * 4  # only the soft labels are bought
    np.testing.assert_array_equal(r.images[1], real[1, 0])
    np.testing.assert_allclose(r.probs, jax.nn.softmax(teacher(1)(normalize(r.images, MEAN, STD))),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="white_box"):
        recover_set(Recipe("white_box"), api(2), jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="unknown recipe source"):
        recover_set(Recipe("magic"), api(2), jax.random.key(0), **kw)


def test_kd_student_learns_the_teacher():
    x = jax.random.uniform(jax.random.key(3), (128, SIZE, SIZE, 1))
    p = jax.nn.softmax(teacher(5)(normalize(x, MEAN, STD)))
    m = meta()
    before = jnp.mean(jnp.argmax(m.apply_batchstats(m.params, x), -1) == jnp.argmax(p, -1))
    params = kd_student(m.apply_batchstats, m.params, x, p, jax.random.key(0), steps=150,
                        lr=3e-3, batch=32, temperature=4.0)
    after = jnp.mean(jnp.argmax(m.apply_batchstats(params, x), -1) == jnp.argmax(p, -1))
    assert float(after) > max(0.6, float(before) + 0.2)


def test_kernel_scaling_and_head_swap_touch_only_their_leaves():
    m = meta()
    s = scale_kernels(m.params, 0.5)[0]
    np.testing.assert_allclose(s["convs"][0]["kernel"][...], 0.5 * m.params["convs"][0]["kernel"][...])
    np.testing.assert_allclose(s["classifier"]["kernel"][...], 0.5 * m.params["classifier"]["kernel"][...])
    np.testing.assert_array_equal(s["convs"][0]["bias"][...], m.params["convs"][0]["bias"][...])
    np.testing.assert_array_equal(s["bns"][0]["scale"][...], m.params["bns"][0]["scale"][...])
    h = with_head(s, m.params)
    np.testing.assert_array_equal(h["classifier"]["kernel"][...], m.params["classifier"]["kernel"][...])
    np.testing.assert_array_equal(h["convs"][1]["kernel"][...], s["convs"][1]["kernel"][...])


def test_within_and_pool_probes_run_and_separate_real_from_noise():
    """Within-task: a student distilled on a teacher's REAL images beats one distilled on noise."""
    rng = np.random.default_rng(1)
    protos = rng.uniform(size=(K, SIZE, SIZE, 1)).astype(np.float32)
    imgs = np.clip(protos[:, None] + 0.15 * rng.normal(size=(K, 30, SIZE, SIZE, 1)), 0, 1)
    imgs = imgs.astype(np.float32)
    w = jnp.asarray((protos - 0.5).reshape(K, -1).T) * 4.0  # a teacher that knows the prototypes
    a = BlackBoxAPI.from_jax(lambda x: x.reshape(x.shape[0], -1) @ w, (SIZE, SIZE, 1), K)
    kw = dict(base=dataclasses.replace(BASE, per_class=20), nz=8, ngf=4, mean=MEAN, std=STD,
              image_size=SIZE)
    real = recover_set(Recipe("real"), a, jax.random.key(0), real_images=imgs[:, :20], **kw)
    noise = recover_set(Recipe("noise"), a, jax.random.key(0), **kw)
    held = (imgs[:, 20:].reshape(-1, SIZE, SIZE, 1), np.repeat(np.arange(K), 10))
    cfg = dataclasses.replace(CFG, within_steps=100)
    r = within_task_probe([real], [held], cfg, MEAN, STD)
    n = within_task_probe([noise], [held], cfg, MEAN, STD)
    assert r["mean"] > n["mean"] + 20 and r["target_agreement"] > 90
    val = ClassDataset(rng.uniform(size=(7, 4, SIZE, SIZE, 1)).astype(np.float32),
                       [str(i) for i in range(7)])
    ev = few_shot_eval(val, CFG, MEAN, STD)
    out = pool_probe([real, noise], [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]], meta(), ev, CFG, MEAN, STD)
    assert out["union_classes"] == 8 and 0 <= out["acc"] <= 100 and out["lr"] == 0.1
