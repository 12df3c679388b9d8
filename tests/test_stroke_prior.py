"""The stroke prior in hard-label distillation: IDEAL's ``generator="strokes"`` and NaiveKD's
``noise="strokes"`` (query accounting, images that are drawings, clear config errors).

Tiny sizes (8x8 images, an MLP student, a random linear teacher), as in ``test_distill.py``.
"""
import dataclasses

import jax
import numpy as np
import pytest

from dfml_jax.api import BlackBoxAPI
from dfml_jax.distill import (IDEALConfig, make_generation_phase, make_generator, noise_images,
                              run_naive_kd, run_pool_distillation, torch_sgd)
from dfml_jax.distill.common import init_student
from dfml_jax.models import create_model, functional

SHAPE = (8, 8, 1)
K = 10
CFG = IDEALConfig(batch_size=20, g_steps=6, nz=8, aug_pad=1, lr_s=0.05, lr_g=0.05,
                  generator="strokes", num_strokes=2, gen_augment="none",
                  distill_augment="none", checkpoint_every=1, eval_every=1)


class Recorder:
    def __init__(self, w):
        self.w, self.batches = w, []

    def __call__(self, x):
        self.batches.append(np.array(x))
        return x.reshape(len(x), -1) @ self.w

    @property
    def rows(self):
        return np.concatenate(self.batches)


@pytest.fixture(scope="module")
def teacher_w():
    return np.random.default_rng(0).normal(size=(64, K)).astype(np.float32) * 3.0


@pytest.fixture(scope="module")
def student():
    return functional(create_model("mlp", num_classes=K, input_shape=SHAPE, hidden=(32,),
                                   rngs_or_key=0))


def _ink_fraction(x):
    """Share of pixels with any ink (drawings: a minority; noise: nearly all)."""
    return float(np.mean(np.asarray(x) > 0.05))


def test_stroke_generator_draws_and_learns_towards_the_targets(student):
    st = init_student(student, torch_sgd(0.01), jax.random.key(0))
    gen = make_generator(CFG, SHAPE)
    phase = make_generation_phase(student, gen[1], CFG, K, SHAPE)
    x, best, losses = phase(st.params, st.bn, jax.random.key(1))
    x2, _, _ = phase(st.params, st.bn, jax.random.key(1))
    assert x.shape == (CFG.batch_size,) + SHAPE
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(x, x2)
    assert _ink_fraction(x) < 0.8                       # strokes on a black background
    assert float(losses[-1]) < float(losses[0])         # the generator's Adam steps act
    assert float(best) == pytest.approx(float(np.min(np.asarray(losses))))


def test_stroke_generator_config_errors():
    with pytest.raises(ValueError, match="gen_bias"):
        dataclasses.replace(CFG, gen_bias=-2.0).validate(K)
    with pytest.raises(ValueError, match="gen_head"):
        dataclasses.replace(CFG, gen_head="bn_sigmoid").validate(K)
    with pytest.raises(ValueError, match="generator must be one of"):
        dataclasses.replace(CFG, generator="vae").validate(K)
    with pytest.raises(ValueError, match="num_strokes"):
        dataclasses.replace(CFG, num_strokes=0).validate(K)
    with pytest.raises(ValueError, match="square"):
        make_generator(CFG, (8, 12, 1))


def test_random_drawings_are_drawings_and_reproducible():
    cfg = dataclasses.replace(CFG, synth="noise", noise="strokes")
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
    res = run_naive_kd(api, student, dataclasses.replace(CFG, noise="strokes"), seed=0)
    assert res.queries == api.queries == len(rec.rows) == 100 == sum(res.class_histogram)
    assert len({r.tobytes() for r in rec.rows}) == 100
    assert _ink_fraction(rec.rows) < 0.8


def test_ideal_with_strokes_buys_each_image_once_with_the_floor_and_balancing(student,
                                                                              teacher_w):
    rec = Recorder(teacher_w)
    api = BlackBoxAPI.from_host(rec, SHAPE, K, output="label", budget=90)
    cfg = dataclasses.replace(CFG, targets="pool_balancing", class_floor=0.05)
    res = run_pool_distillation(api, student, cfg, seed=0)
    assert res.rounds == 4 and res.queries == api.queries == 80 == len(rec.rows)
    assert [len(b) for b in rec.batches] == [20] * 4
    assert len({r.tobytes() for r in rec.rows}) == 80
    assert sum(res.class_histogram) == 80
    assert _ink_fraction(rec.rows) < 0.8
