"""Datasets: Glyphs, single-task data, TFDS loaders (mocked), task sampling, bad input."""
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dfml_jax import data
from dfml_jax.data import glyphs as glyphs_mod
from dfml_jax.data.tfds_benchmarks import CIFAR_FS_SPLITS, DatasetNotFoundError


@pytest.fixture(scope="session")
def glyph_cache(tmp_path_factory):
    d = os.environ.get("DFML_JAX_CACHE") or str(tmp_path_factory.mktemp("glyphs"))
    return d


@pytest.fixture(scope="session")
def glyph_data(glyph_cache):
    return glyphs_mod.load_glyphs(28, cache_dir=glyph_cache, progress=False)


def test_glyphs_classes_alphabets_and_disjoint_splits(glyph_data):
    n = len(glyph_data["codepoints"])
    assert 1300 <= n <= 1700, n
    assert glyph_data["images"].shape == (n, 20, 28, 28) and glyph_data["images"].dtype == np.uint8
    assert len(set(glyph_data["codepoints"].tolist())) == n
    split_alpha = {s: set(glyph_data["alphabets"][glyph_data["split"] == s]) for s in ("train", "validation", "test")}
    assert not (split_alpha["train"] & split_alpha["validation"]) and not (split_alpha["train"] & split_alpha["test"])
    assert not (split_alpha["validation"] & split_alpha["test"])
    assert {"Latin", "Cyrillic", "Greek", "Armenian", "Georgian", "Hebrew", "Arabic"} <= set.union(*split_alpha.values())
    # every instance has ink, is not a full box, and is roughly centred
    imgs = glyph_data["images"].astype(np.float32) / 255
    ink = imgs.mean(axis=(2, 3))
    assert (ink > 0.01).all() and (ink < 0.6).all()
    ys, xs = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    cy = (imgs * ys).sum(axis=(2, 3)) / imgs.sum(axis=(2, 3))
    assert abs(cy.mean() - 13.5) < 2.0
    # identical-looking letters were merged: Greek capital Alpha is a duplicate of Latin A
    assert ord("A") in glyph_data["codepoints"] and 0x0391 not in glyph_data["codepoints"]


def test_glyphs_deterministic_and_cached(glyph_cache, glyph_data):
    again = glyphs_mod.load_glyphs(28, cache_dir=glyph_cache, progress=False)
    np.testing.assert_array_equal(again["images"], glyph_data["images"])
    files = [f for f in os.listdir(glyph_cache) if f.startswith("glyphs_v")]
    assert any("_s28_seed0_" in f for f in files)
    small = glyphs_mod.build_glyphs(16, seed=0, max_classes=30, per_class=3, progress=False)
    small2 = glyphs_mod.build_glyphs(16, seed=0, max_classes=30, per_class=3, progress=False)
    np.testing.assert_array_equal(small["images"], small2["images"])
    other = glyphs_mod.build_glyphs(16, seed=1, max_classes=30, per_class=3, progress=False)
    assert not np.array_equal(small["images"], other["images"])


def test_glyph_splits_and_tasksets(glyph_cache):
    train, val, test = data.get_class_splits("glyphs", cache_dir=glyph_cache, progress=False)
    assert train.num_classes > val.num_classes > 0 and test.num_classes > 0
    assert not set(train.class_names) & set(test.class_names)
    assert train.image_shape == (28, 28, 1)
    rgb = data.get_class_splits("glyphs", channels=3, cache_dir=glyph_cache, progress=False)[0]
    assert rgb.image_shape == (28, 28, 3)
    ts = data.get_tasksets("glyphs", ways=5, shots=2, query=3, cache_dir=glyph_cache, progress=False)
    t = ts.test.sample(jax.random.key(0), 64)
    assert t.support_x.shape == (64, 10, 28, 28, 1) and t.query_x.shape == (64, 15, 28, 28, 1)
    assert t.support_x.dtype == np.float32 and 0 <= float(t.support_x.min()) and float(t.support_x.max()) <= 1
    np.testing.assert_array_equal(t.support_y[0], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert set(np.asarray(t.query_y).ravel().tolist()) == set(range(5))
    cls = np.asarray(t.classes)
    assert all(len(set(r)) == 5 for r in cls) and cls.max() < test.num_classes
    # images come from the right classes, support and query are distinct images
    imgs = test.images_of(cls[0])
    for w in range(5):
        picks = np.concatenate([t.support_x[0, 2 * w:2 * w + 2], t.query_x[0, 3 * w:3 * w + 3]])
        match = [int(np.argmin(np.abs(imgs[w] - p).sum(axis=(1, 2, 3)))) for p in picks]
        assert len(set(match)) == 5
        assert all(np.abs(imgs[w][m] - p).max() < 1e-6 for m, p in zip(match, picks))
    t2 = ts.test.sample(jax.random.key(0), 64)
    np.testing.assert_array_equal(t.support_x, t2.support_x)
    assert not np.array_equal(ts.test.sample(jax.random.key(1), 64).classes, t.classes)


def test_single_task_datasets():
    m = data.load_single_task("mnist5k")
    assert m.x_train.shape == (4000, 28, 28, 1) and m.x_test.shape == (1000, 28, 28, 1)
    assert set(np.unique(m.y_train)) == set(range(10)) and m.x_train.max() <= 1.0
    np.testing.assert_array_equal(data.load_single_task("mnist5k").y_test, m.y_test)  # fixed split
    d = data.load_single_task("digits")
    assert d.x_train.shape[1:] == (8, 8, 1) and len(d.x_train) + len(d.x_test) == 1797


def test_bad_input_errors(glyph_cache, tmp_path):
    with pytest.raises(ValueError, match="unknown few-shot dataset 'omniglot2'.*glyphs"):
        data.get_tasksets("omniglot2", 5, 1, 15)
    with pytest.raises(ValueError, match="unknown single-task dataset 'mnist6k'.*mnist5k"):
        data.load_single_task("mnist6k")
    with pytest.raises(ValueError, match="fewer than ways=2000"):
        data.get_tasksets("glyphs", 2000, 1, 1, cache_dir=glyph_cache, progress=False)
    with pytest.raises(ValueError, match=r"shots \+ query = 10 \+ 15 = 25"):
        data.get_tasksets("glyphs", 5, 10, 15, cache_dir=glyph_cache, progress=False)
    with pytest.raises(DatasetNotFoundError, match="lacks.*train.csv.*Ravi"):
        data.get_class_splits("mini_imagenet", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="cifar100.*not prepared.*tensorflow-cpu"):
        data.get_class_splits("cifar_fs", data_dir=str(tmp_path))


def test_mock_tfds_loaders(tmp_path):
    with tfds.testing.mock_data(num_examples=1500):
        train, val, test = data.get_class_splits("cifar_fs", data_dir=str(tmp_path))
        assert (train.num_classes, val.num_classes, test.num_classes) == (64, 16, 20)
        assert train.image_shape == (32, 32, 3) and train.per_class >= 2
        assert set(test.class_names) == set(CIFAR_FS_SPLITS["test"])
        t = data.Taskset(test, 5, 1, 1).sample(jax.random.key(0), 3)
        assert t.support_x.shape == (3, 5, 32, 32, 3)
    with tfds.testing.mock_data(num_examples=60):
        s = data.load_single_task("svhn_cropped", data_dir=str(tmp_path))
        assert s.x_train.shape == (60, 32, 32, 3) and s.num_classes == 10
        m = data.load_single_task("mnist", data_dir=str(tmp_path))
        assert m.x_test.shape[1:] == (28, 28, 1) and m.x_test.max() <= 1.0


def test_mock_omniglot_and_cub(tmp_path):
    # mock labels are random over 1,623 characters / 200 birds: use a mock with few classes per split
    def as_data_source(self, split=None, *a, **k):
        rng = np.random.default_rng(0 if split == "train" else 1)
        n = 240
        lab = np.repeat(np.arange(12) + (0 if split == "train" else 100), n // 12)
        return [{"image": rng.integers(0, 255, (105, 105, 3), dtype=np.uint8), "label": int(l),
                 "alphabet": int(l) // 3, "alphabet_char_id": 0} for l in lab]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        tr, va, te = data.get_class_splits("omniglot", data_dir=str(tmp_path))
        assert tr.num_classes + va.num_classes == 12 and te.num_classes == 12
        assert not set(tr.groups) & set(va.groups)
        assert tr.image_shape == (28, 28, 1)
        tr, va, te = data.get_class_splits("cub", data_dir=str(tmp_path), image_size=16)
        assert (tr.num_classes, va.num_classes, te.num_classes) == (12, 6, 6)
        assert tr.image_shape == (16, 16, 3)
