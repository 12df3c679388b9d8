"""Datasets: Glyphs, single-task data, TFDS loaders (mocked), MiniImageNet folder, task sampling,
bad input. The full 28 px Glyphs benchmark is built once per session (about 30 s)."""
import json
import os
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dfml_jax import data
from dfml_jax.data import glyphs as glyphs_mod
from dfml_jax.data.tfds_benchmarks import CIFAR100_CLASSES, CIFAR_FS_SPLITS, DatasetNotFoundError


@pytest.fixture(scope="session")
def glyph_cache(tmp_path_factory):
    return os.environ.get("DFML_JAX_CACHE") or str(tmp_path_factory.mktemp("glyphs"))


@pytest.fixture(scope="session")
def glyph_data(glyph_cache):
    return glyphs_mod.load_glyphs(28, cache_dir=glyph_cache, progress=False)


@pytest.fixture(scope="session")
def glyph_splits(glyph_cache, glyph_data):
    return data.get_class_splits("glyphs", cache_dir=glyph_cache, progress=False)


def _index(d, cp):
    hits = np.nonzero(d["codepoints"] == cp)[0]
    return int(hits[0]) if len(hits) else None


# ----------------------------------------------------------------------------------- Glyphs


def test_glyphs_class_counts_and_alphabet_disjoint_splits(glyph_data):
    d = glyph_data
    n = len(d["codepoints"])
    assert 1350 <= n <= 1600, n
    assert d["images"].shape == (n, 20, 28, 28) and d["images"].dtype == np.uint8
    assert len(set(d["codepoints"].tolist())) == n
    counts = glyphs_mod.glyph_split_counts(d)
    assert sum(c["total"] for c in counts.values()) == n
    assert 850 <= counts["train"]["total"] <= 1050, counts
    assert 140 <= counts["validation"]["total"] <= 230, counts
    assert 280 <= counts["test"]["total"] <= 400, counts
    split_alpha = {s: set(d["alphabets"][d["split"] == s]) for s in ("train", "validation", "test")}
    for s, alphas in split_alpha.items():
        assert alphas == set(glyphs_mod.SPLIT_ALPHABETS[s]), (s, alphas)
    assert not (split_alpha["train"] & split_alpha["validation"])
    assert not (split_alpha["train"] & split_alpha["test"])
    assert not (split_alpha["validation"] & split_alpha["test"])
    # letters only: Lu/Ll/Lo without decomposition; placeholder / symbol fonts unused
    import unicodedata
    for cp in d["codepoints"][::7]:
        ch = chr(int(cp))
        assert unicodedata.category(ch) in ("Lu", "Ll", "Lo") and unicodedata.decomposition(ch) == ""
    assert not any(f.startswith(("LastResort", "cmex10", "cmsy10")) for f in d["fonts"])
    assert (np.asarray([len(set(r)) for r in d["instance_fonts"]]) >= 4).all()


def test_glyphs_look_like_letters(glyph_data):
    imgs = glyph_data["images"].astype(np.float32) / 255
    ink = imgs.mean(axis=(2, 3))
    assert (ink < 0.5).all()  # never a filled box
    assert (ink > 0.002).all() and (imgs.max(axis=(2, 3)) > 0.5).all()  # never empty (small finals and
    # the Arabic high hamza are the faintest letters)
    # a placeholder box would have ink all around its border; centred glyphs leave the border dark
    border = np.concatenate([imgs[..., 0, :], imgs[..., -1, :], imgs[..., :, 0], imgs[..., :, -1]], -1)
    assert border.mean() < 0.02
    ys, xs = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    cy = (imgs * ys).sum(axis=(2, 3)) / imgs.sum(axis=(2, 3))
    cx = (imgs * xs).sum(axis=(2, 3)) / imgs.sum(axis=(2, 3))
    assert abs(cy.mean() - 13.5) < 1.5 and abs(cx.mean() - 13.5) < 1.5
    # the 20 instances of a class differ (fonts + jitter)
    a = glyph_data["images"][:50].astype(np.int16)
    assert (np.abs(a[:, :1] - a[:, 1:]).max(axis=(2, 3)) > 0).all()


def test_glyphs_deduplicated_across_scripts_but_distinct_letters_kept(glyph_data):
    d = glyph_data
    have = set(d["codepoints"].tolist())
    a = _index(d, ord("A"))
    assert a is not None
    # Greek Alpha, Cyrillic A, Lisu A render identically in every font: merged into Latin A
    for cp in (0x0391, 0x0410, 0xA4EE):
        assert cp not in have and f"U+{cp:04X}" in d["aliases"][a]
    assert 0x043E not in have and ord("o") in have  # Cyrillic o
    # letters differing by a dot or a stroke stay apart: Arabic tah / zah, D / eth; the identical
    # capital eth and D with stroke are one class
    assert {0x0637, 0x0638, ord("D"), 0x00D0} <= have and 0x0110 not in have
    # glyphs keep their relative size: lower-case x is smaller than capital X
    ink = d["images"].astype(np.float32).mean(axis=(1, 2, 3))
    assert ink[_index(d, ord("x"))] < 0.8 * ink[_index(d, ord("X"))]
    assert ink[_index(d, ord("o"))] < 0.8 * ink[_index(d, ord("O"))]


def test_glyphs_deterministic_cached_and_keyed_by_parameters(glyph_cache, glyph_data):
    t0 = time.perf_counter()
    again = glyphs_mod.load_glyphs(28, cache_dir=glyph_cache, progress=False)
    load_s = time.perf_counter() - t0
    assert load_s < 5.0, load_s  # ~0.05 s on an idle machine
    for k in glyph_data:
        np.testing.assert_array_equal(again[k], glyph_data[k])
    path = glyphs_mod.cache_file(28, cache_dir=glyph_cache)
    digest = glyphs_mod.cache_key_digest(28)
    assert os.path.basename(path) == (f"glyphs_v{glyphs_mod.GLYPHS_VERSION}_s28_c1_seed0_n20_f4-"
                                      f"{digest[:12]}.npz")
    assert os.path.exists(path)
    assert glyphs_mod.cache_file(32, seed=1, max_classes=30, cache_dir=glyph_cache) != path
    assert "_s32_" in glyphs_mod.cache_file(32, cache_dir=glyph_cache)
    small = glyphs_mod.build_glyphs(16, seed=0, max_classes=30, per_class=3, progress=False)
    small2 = glyphs_mod.build_glyphs(16, seed=0, max_classes=30, per_class=3, progress=False)
    for k in small:
        np.testing.assert_array_equal(small[k], small2[k])
    assert set(small["split"].tolist()) == {"train", "validation", "test"}
    assert len(small["codepoints"]) <= 40
    other = glyphs_mod.build_glyphs(16, seed=1, max_classes=30, per_class=3, progress=False)
    np.testing.assert_array_equal(other["codepoints"], small["codepoints"])
    assert not np.array_equal(small["images"], other["images"])
    # a cached small build round-trips through a fresh directory, and rebuild=True rewrites it
    kw = dict(seed=0, max_classes=30, per_class=3, progress=False, cache_dir=glyph_cache)
    first = glyphs_mod.load_glyphs(16, **kw)
    f = glyphs_mod.cache_file(16, seed=0, max_classes=30, per_class=3, cache_dir=glyph_cache)
    mtime = os.path.getmtime(f)
    np.testing.assert_array_equal(glyphs_mod.load_glyphs(16, **kw)["images"], first["images"])
    assert os.path.getmtime(f) == mtime
    np.testing.assert_array_equal(glyphs_mod.load_glyphs(16, rebuild=True, **kw)["images"], first["images"])


def _fake_build(calls):
    """A stand-in for build_glyphs (no rendering): records its calls, returns tiny arrays."""
    def build(image_size, **kw):
        calls.append((image_size, kw))
        return {"images": np.full((2, 1, image_size, image_size), len(calls), np.uint8),
                "codepoints": np.array([65, 66], np.int32)}
    return build


def test_glyphs_cache_key_covers_parameters_constants_and_font_bytes(tmp_path, monkeypatch):
    base = glyphs_mod.cache_file(16, max_classes=30, cache_dir=str(tmp_path))
    assert glyphs_mod.cache_file(16, max_classes=30, cache_dir=str(tmp_path)) == base  # stable
    key = glyphs_mod.cache_key(16, max_classes=30)
    assert key["params"]["image_size"] == 16
    assert key["renderer_version"] == glyphs_mod.GLYPHS_VERSION
    assert [f for f, _ in key["fonts"]] == [os.path.basename(p) for p in glyphs_mod.font_paths()]
    assert {"pillow", "pillow_freetype", "fonttools", "numpy"} <= set(key["libraries"])
    others = {glyphs_mod.cache_file(16, max_classes=30, seed=1, cache_dir=str(tmp_path)),
              glyphs_mod.cache_file(16, max_classes=30, per_class=5, cache_dir=str(tmp_path)),
              glyphs_mod.cache_file(16, max_classes=30, min_fonts=3, cache_dir=str(tmp_path)),
              glyphs_mod.cache_file(16, max_classes=31, cache_dir=str(tmp_path)),
              glyphs_mod.cache_file(17, max_classes=30, cache_dir=str(tmp_path))}
    assert base not in others and len(others) == 5
    # a rendering constant, the split alphabets or the renderer version: another file
    for name, value in (("_ROTATION_DEG", 11.0), ("_SUPERSAMPLE_PX", 96), ("GLYPHS_VERSION", 99),
                        ("SPLIT_ALPHABETS", {**glyphs_mod.SPLIT_ALPHABETS, "test": ("Cyrillic",)})):
        with monkeypatch.context() as m:
            m.setattr(glyphs_mod, name, value)
            assert glyphs_mod.cache_file(16, max_classes=30, cache_dir=str(tmp_path)) != base, name
    # a library version
    with monkeypatch.context() as m:
        m.setattr(glyphs_mod, "_library_versions", lambda: {"pillow": "0.0"})
        assert glyphs_mod.cache_file(16, max_classes=30, cache_dir=str(tmp_path)) != base
    # the bytes of one font file (same names, same paths): another file
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    copies = []
    for p in glyphs_mod.font_paths()[:3]:
        copies.append(str(fonts / os.path.basename(p)))
        with open(p, "rb") as src, open(copies[-1], "wb") as dst:
            dst.write(src.read())
    monkeypatch.setattr(glyphs_mod, "font_paths", lambda: list(copies))
    before = glyphs_mod.cache_file(16, max_classes=30, cache_dir=str(tmp_path))
    with open(copies[1], "ab") as f:
        f.write(b"\0")
    os.utime(copies[1], ns=(1, 1))  # even with a forged modification time
    after = glyphs_mod.cache_file(16, max_classes=30, cache_dir=str(tmp_path))
    assert after != before and before != base
    assert after.rsplit("-", 1)[0] == before.rsplit("-", 1)[0]  # same readable prefix


def test_glyphs_code_digest_ignores_docstrings_but_not_code(tmp_path):
    import importlib.util

    sources = {"a": 'def f(x):\n    """Doc."""\n    return x + 1  # comment\n',
               "b": 'def f(x):\n    """Other doc."""\n\n    return (x +\n            1)\n',
               "c": 'def f(x):\n    """Doc."""\n    return x + 2\n'}
    fns = {}
    for name, src in sources.items():
        (tmp_path / f"m_{name}.py").write_text(src)
        spec = importlib.util.spec_from_file_location(f"m_{name}", tmp_path / f"m_{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fns[name] = mod.f
    d = glyphs_mod._code_digest
    assert d((fns["a"],)) == d((fns["b"],)) != d((fns["c"],))


def test_glyphs_stale_cache_is_never_reused(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(glyphs_mod, "build_glyphs", _fake_build(calls))
    d = str(tmp_path)
    # a file at the pre-key path (old naming, no stored key) is ignored
    old = os.path.join(d, f"glyphs_v{glyphs_mod.GLYPHS_VERSION}_s16_c1_seed0_n20_f4_max30.npz")
    np.savez(old, images=np.zeros((1, 1, 16, 16), np.uint8), codepoints=np.array([1], np.int32))
    first = glyphs_mod.load_glyphs(16, max_classes=30, cache_dir=d)
    assert len(calls) == 1 and (first["images"] == 1).all() and "_cache_key" not in first
    path = glyphs_mod.cache_file(16, max_classes=30, cache_dir=d)
    assert os.path.exists(path) and path != old
    # no temporary file left behind
    assert sorted(os.listdir(d)) == sorted([os.path.basename(old), os.path.basename(path)])
    with np.load(path) as z:
        assert json.loads(str(z["_cache_key"])) == glyphs_mod.cache_key(16, max_classes=30)
    again = glyphs_mod.load_glyphs(16, max_classes=30, cache_dir=d)  # valid: reused
    assert len(calls) == 1 and (again["images"] == 1).all() and set(again) == set(first)
    # a file at the current path whose stored key differs (or is absent) is rebuilt
    key = glyphs_mod.cache_key(16, max_classes=30)
    stale = {**key, "constants": {**key["constants"], "rotation_deg": 0.0}}
    np.savez(path, _cache_key=np.asarray(json.dumps(stale)),
             images=np.zeros((1, 1, 16, 16), np.uint8))
    rebuilt = glyphs_mod.load_glyphs(16, max_classes=30, cache_dir=d)
    assert len(calls) == 2 and (rebuilt["images"] == 2).all()
    assert "differs in ['constants.rotation_deg']" in capsys.readouterr().err
    np.savez(path, images=np.zeros((1, 1, 16, 16), np.uint8))
    assert (glyphs_mod.load_glyphs(16, max_classes=30, cache_dir=d)["images"] == 3).all()
    assert "records no key" in capsys.readouterr().err
    with open(path, "wb") as f:
        f.write(b"truncated")
    assert (glyphs_mod.load_glyphs(16, max_classes=30, cache_dir=d)["images"] == 4).all()
    assert (glyphs_mod.load_glyphs(16, max_classes=30, cache_dir=d)["images"] == 4).all()
    assert len(calls) == 4


def test_glyphs_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DFML_JAX_CACHE", str(tmp_path / "env_cache"))
    assert glyphs_mod.cache_dir() == str(tmp_path / "env_cache")
    assert glyphs_mod.cache_file(28).startswith(str(tmp_path / "env_cache"))
    assert glyphs_mod.cache_dir(str(tmp_path / "explicit")) == str(tmp_path / "explicit")


def test_glyph_sizes_and_channels():
    img = glyphs_mod.render_glyph(glyphs_mod.font_paths()[0], ord("A"), 84)
    assert img.shape == (84, 84) and img.dtype == np.uint8 and img.max() > 200
    # centred on its bounding box
    ys, xs = np.nonzero(img > 64)
    assert abs((ys.min() + ys.max()) / 2 - 41.5) <= 2 and abs((xs.min() + xs.max()) / 2 - 41.5) <= 2
    small = glyphs_mod.build_glyphs(32, max_classes=12, per_class=2, progress=False)
    assert small["images"].shape[1:] == (2, 32, 32)


def test_glyph_splits_images_of_and_channels(glyph_splits, glyph_data, glyph_cache):
    train, val, test = glyph_splits
    counts = glyphs_mod.glyph_split_counts(glyph_data)
    assert (train.num_classes, val.num_classes, test.num_classes) == tuple(
        counts[s]["total"] for s in ("train", "validation", "test"))
    assert not set(train.class_names) & set(test.class_names)
    assert not set(train.class_names) & set(val.class_names)
    assert train.image_shape == (28, 28, 1) and train.per_class == 20
    x = test.images_of([0, 5])
    assert x.shape == (2, 20, 28, 28, 1) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(x[1], test.images[5] / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, "):
        test.images_of([test.num_classes])
    rgb = data.get_class_splits("glyphs", channels=3, cache_dir=glyph_cache, progress=False)[2]
    assert rgb.image_shape == (28, 28, 3)
    np.testing.assert_array_equal(rgb.images_of([5])[..., 2], x[1:, ..., 0])


# --------------------------------------------------------------------------------- sampling


def test_tasksets_shapes_labels_and_distinct_classes(glyph_splits):
    test = glyph_splits[2]
    ts = data.Taskset(test, 5, 2, 3)
    t = ts.sample(jax.random.key(0), 64)
    assert t.support_x.shape == (64, 10, 28, 28, 1) and t.query_x.shape == (64, 15, 28, 28, 1)
    assert t.support_y.shape == (64, 10) and t.query_y.shape == (64, 15) and t.classes.shape == (64, 5)
    assert t.support_y.dtype == np.int32 and t.query_y.dtype == np.int32
    assert t.support_x.dtype == np.float32 and 0 <= float(t.support_x.min()) and float(t.support_x.max()) <= 1
    np.testing.assert_array_equal(t.support_y, np.tile([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], (64, 1)))
    np.testing.assert_array_equal(t.query_y, np.tile(np.repeat(np.arange(5), 3), (64, 1)))
    cls = np.asarray(t.classes)
    assert all(len(set(r)) == 5 for r in cls) and cls.min() >= 0 and cls.max() < test.num_classes
    # images come from the right classes; support and query images of a class are distinct
    classes, idx = ts.sample_indices(jax.random.key(0), 64)
    np.testing.assert_array_equal(classes, cls)
    for task in (0, 63):
        imgs = test.images_of(cls[task])
        for w in range(5):
            np.testing.assert_allclose(t.support_x[task, 2 * w:2 * w + 2], imgs[w][idx[task, w, :2]], atol=1e-6)
            np.testing.assert_allclose(t.query_x[task, 3 * w:3 * w + 3], imgs[w][idx[task, w, 2:]], atol=1e-6)
            assert len(set(np.asarray(idx[task, w]).tolist())) == 5
    # deterministic from the key, different keys give different tasks
    t2 = ts.sample(jax.random.key(0), 64)
    np.testing.assert_array_equal(t.support_x, t2.support_x)
    np.testing.assert_array_equal(t.query_x, t2.query_x)
    assert not np.array_equal(ts.sample(jax.random.key(1), 64).classes, t.classes)
    # every class of the split gets sampled eventually
    many = np.asarray(ts.sample_indices(jax.random.key(2), 2000)[0])
    assert len(np.unique(many)) == test.num_classes


def test_get_tasksets_and_sampling_speed(glyph_cache):
    ts = data.get_tasksets("glyphs", ways=5, shots=5, query=15, cache_dir=glyph_cache, progress=False)
    assert isinstance(ts, data.Tasksets) and ts.train.dataset.name == "glyphs/train"
    jax.block_until_ready(ts.train.sample(jax.random.key(0), 1000))  # compile
    t0 = time.perf_counter()
    for i in range(10):
        t = ts.train.sample(jax.random.key(i), 1000)
    jax.block_until_ready(t)
    secs = time.perf_counter() - t0
    assert t.support_x.shape == (1000, 25, 28, 28, 1) and t.query_x.shape == (1000, 75, 28, 28, 1)
    assert secs < 60, secs  # 10,000 tasks: ~2 s idle, ~7 s on a loaded 2-core machine


# ------------------------------------------------------------------------------ single task


def test_single_task_datasets():
    m = data.load_single_task("mnist5k")
    assert m.x_train.shape == (4000, 28, 28, 1) and m.x_test.shape == (1000, 28, 28, 1)
    assert m.x_train.dtype == np.float32 and m.y_train.dtype == np.int32 and m.num_classes == 10
    assert set(np.unique(m.y_train)) == set(range(10)) and 0 <= m.x_train.min() and m.x_train.max() <= 1.0
    again = data.load_single_task("mnist5k")
    np.testing.assert_array_equal(again.y_test, m.y_test)  # fixed split
    np.testing.assert_array_equal(again.x_train, m.x_train)
    d = data.load_single_task("digits")
    assert d.x_train.shape[1:] == (8, 8, 1) and len(d.x_train) + len(d.x_test) == 1797
    assert d.x_train.max() <= 1.0 and set(np.unique(d.y_test)) == set(range(10))
    big = data.load_single_task("digits", image_size=28, channels=3)
    assert big.x_train.shape == (len(d.x_train), 28, 28, 3) and big.x_test.shape[1:] == (28, 28, 3)
    assert 0 <= big.x_train.min() and big.x_train.max() <= 1.0
    np.testing.assert_array_equal(big.y_train, d.y_train)


def test_registry():
    assert set(data.DATASETS) == set(data.FEW_SHOT_DATASETS) | set(data.SINGLE_TASK_DATASETS)
    assert set(data.FEW_SHOT_DATASETS) == {"glyphs", "cifar_fs", "omniglot", "cub", "mini_imagenet"}
    assert set(data.SINGLE_TASK_DATASETS) == {"mnist5k", "digits", "mnist", "fashion_mnist",
                                              "svhn_cropped", "cifar10", "cifar100"}
    assert data.list_datasets()["few_shot"] == list(data.FEW_SHOT_DATASETS)
    assert data.DATASETS["cub"].image_size == 84 and data.DATASETS["omniglot"].channels == 1


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_errors(glyph_splits, glyph_cache, tmp_path):
    with pytest.raises(ValueError, match="unknown few-shot dataset 'omniglot2'.*'glyphs'.*'mini_imagenet'"):
        data.get_tasksets("omniglot2", 5, 1, 15)
    with pytest.raises(ValueError, match=r"unknown few-shot dataset 'mnist5k' \(a single-task dataset: use load_single_task\)"):
        data.get_class_splits("mnist5k")
    with pytest.raises(ValueError, match="unknown single-task dataset 'mnist6k'.*'mnist5k'"):
        data.load_single_task("mnist6k")
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        data.get_class_splits("glyphs", channels=2, cache_dir=glyph_cache)
    with pytest.raises(ValueError, match=r"glyphs: unknown options \['max_clases'\]"):
        data.get_class_splits("glyphs", max_clases=3, cache_dir=glyph_cache)
    with pytest.raises(ValueError, match=r"cifar_fs: unknown options \['cache_dir'\]"):
        data.get_class_splits("cifar_fs", cache_dir=glyph_cache)
    n_train = glyph_splits[0].num_classes
    with pytest.raises(ValueError, match=f"glyphs/train has {n_train} classes, fewer than ways=2000"):
        data.get_tasksets("glyphs", 2000, 1, 1, cache_dir=glyph_cache, progress=False)
    with pytest.raises(ValueError, match=r"20 images per class, fewer than shots \+ query = 10 \+ 15 = 25"):
        data.get_tasksets("glyphs", 5, 10, 15, cache_dir=glyph_cache, progress=False)
    with pytest.raises(ValueError, match="need ways >= 1"):
        data.Taskset(glyph_splits[0], 0, 1, 1)
    with pytest.raises(ValueError, match="image_size must be an integer >= 8"):
        glyphs_mod.build_glyphs(4, progress=False)
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DatasetNotFoundError, match=f"folder {missing} does not exist.*images/.*train,val,test.*csv.*Ravi"):
        data.get_class_splits("mini_imagenet", data_dir=str(missing))
    (tmp_path / "partial" / "images").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"partial lacks \['train.csv', 'val.csv', 'test.csv'\].*Ravi"):
        data.get_class_splits("mini_imagenet", data_dir=str(tmp_path / "partial"))
    with pytest.raises(DatasetNotFoundError, match="needs data_dir"):
        data.get_class_splits("mini_imagenet")
    with pytest.raises(DatasetNotFoundError, match="cifar100.*not prepared.*tensorflow-cpu.*download=True"):
        data.get_class_splits("cifar_fs", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="'mnist'.*not prepared"):
        data.load_single_task("mnist", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------- mocked TFDS


def test_cifar_fs_split_is_the_standard_one():
    assert len(CIFAR100_CLASSES) == 100 == len(set(CIFAR100_CLASSES))
    sizes = {s: len(v) for s, v in CIFAR_FS_SPLITS.items()}
    assert sizes == {"train": 64, "validation": 16, "test": 20}
    assert set().union(*CIFAR_FS_SPLITS.values()) == set(CIFAR100_CLASSES)
    assert {"whale", "poppy", "rocket", "woman"} <= set(CIFAR_FS_SPLITS["test"])
    assert {"beaver", "otter", "tractor", "sea"} <= set(CIFAR_FS_SPLITS["validation"])


def test_mock_tfds_loaders(tmp_path):
    with tfds.testing.mock_data(num_examples=1500):
        train, val, test = data.get_class_splits("cifar_fs", data_dir=str(tmp_path))
        assert (train.num_classes, val.num_classes, test.num_classes) == (64, 16, 20)
        assert train.image_shape == (32, 32, 3) and train.per_class >= 2
        assert set(test.class_names) == set(CIFAR_FS_SPLITS["test"])
        t = data.Taskset(test, 5, 1, 1).sample(jax.random.key(0), 3)
        assert t.support_x.shape == (3, 5, 32, 32, 3)
        grey = data.get_class_splits("cifar_fs", data_dir=str(tmp_path), channels=1, image_size=16)[2]
        assert grey.image_shape == (16, 16, 1) and grey.num_classes == 20
    with tfds.testing.mock_data(num_examples=60):
        s = data.load_single_task("svhn_cropped", data_dir=str(tmp_path))
        assert s.x_train.shape == (60, 32, 32, 3) and s.num_classes == 10 and s.y_train.dtype == np.int32
        m = data.load_single_task("mnist", data_dir=str(tmp_path))
        assert m.x_test.shape[1:] == (28, 28, 1) and m.x_test.max() <= 1.0
        c = data.load_single_task("cifar100", data_dir=str(tmp_path), image_size=16, channels=1)
        assert c.x_train.shape[1:] == (16, 16, 1) and c.num_classes == 100
        for name in ("fashion_mnist", "cifar10"):
            assert data.load_single_task(name, data_dir=str(tmp_path)).num_classes == 10


def test_mock_omniglot_and_cub(tmp_path):
    # mock labels are random over 1,623 characters / 200 birds: use a mock with few classes per split
    def as_data_source(self, split=None, *a, **k):
        rng = np.random.default_rng(0 if split == "train" else 1)
        n = 240
        lab = np.repeat(np.arange(12) + (0 if split == "train" else 100), n // 12)
        return [{"image": rng.integers(0, 255, (105, 105, 3), dtype=np.uint8), "label": int(l),
                 "alphabet": int(l) // 3, "alphabet_char_id": 0} for l in lab[: n - (7 if split == "test" else 0)]]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        tr, va, te = data.get_class_splits("omniglot", data_dir=str(tmp_path))
        assert tr.num_classes + va.num_classes == 12 and te.num_classes == 12
        assert not set(tr.groups) & set(va.groups) and not set(tr.class_names) & set(te.class_names)
        assert tr.image_shape == (28, 28, 1) and tr.per_class == 20
        assert te.per_class == 13  # unequal counts: truncated to the smallest class
        rgb = data.get_class_splits("omniglot", data_dir=str(tmp_path), channels=3)[0]
        assert rgb.image_shape == (28, 28, 3)
        tr, va, te = data.get_class_splits("cub", data_dir=str(tmp_path), image_size=16)
        assert (tr.num_classes, va.num_classes, te.num_classes) == (12, 6, 6)
        assert tr.image_shape == (16, 16, 3)


# ----------------------------------------------------------------------- MiniImageNet folder


def _fake_mini_imagenet(root, classes_per_split=(6, 3, 3), per_class=4):
    os.makedirs(root / "images")
    rng = np.random.default_rng(0)
    k = 0
    for split, n in zip(("train", "val", "test"), classes_per_split):
        rows = ["filename,label"]
        for c in range(n):
            wnid = f"n{split}{c:03d}"
            for i in range(per_class + (1 if c == 0 else 0)):
                fn = f"{wnid}{i:08d}.jpg"
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "images" / fn)
                rows.append(f"{fn},{wnid}")
                k += 1
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_mini_imagenet_folder(tmp_path):
    root = _fake_mini_imagenet(tmp_path / "mini")
    tr, va, te = data.get_class_splits("mini_imagenet", data_dir=str(root), image_size=20)
    assert (tr.num_classes, va.num_classes, te.num_classes) == (6, 3, 3)
    assert tr.image_shape == (20, 20, 3) and tr.per_class == 4
    assert tr.class_names[0] == "ntrain000"
    ts = data.get_tasksets("mini_imagenet", 3, 1, 2, data_dir=str(root), image_size=20, channels=1)
    t = ts.test.sample(jax.random.key(0), 2)
    assert t.support_x.shape == (2, 3, 20, 20, 1) and t.query_x.shape == (2, 6, 20, 20, 1)
    os.remove(root / "images" / "ntest00000000001.jpg")
    with pytest.raises(DatasetNotFoundError, match="ntest00000000001.jpg listed in test.csv is missing"):
        data.get_class_splits("mini_imagenet", data_dir=str(root))
