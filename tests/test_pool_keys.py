"""Self-describing pools (build keys) and the teachers' augmentation (train_teacher).

Everything is tiny: a synthetic 6-class split of 8x8 images (no Glyphs rendering), MLP teachers
of one hidden layer trained for 1-2 epochs.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.data import ClassDataset, content_key
from dfml_jax.models import create_model, functional, stack_trees
from dfml_jax.teachers import (PoolKeyError, check_pool_key, load_pool, obtain_pool, pool_key,
                               pool_spec, read_manifest, split_fingerprint)
from dfml_jax.teachers.population import (TRAINER_VERSION, default_augment, recipe_for,
                                          resolve_augment, train_population)
from dfml_jax.training.augment import augment_images, random_crop_flip


# ----------------------------------------------------------------------------- augmentation

def _shift(img, dy, dx, fill):
    """``img`` (H, W, C) moved by (dy, dx) pixels, the uncovered border set to ``fill``."""
    h, w, _ = img.shape
    out = np.empty_like(img)
    out[...] = fill
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = img[ys, xs]
    return out


def test_crop_only_shifts_never_flips_and_fills_with_black():
    rng = np.random.default_rng(0)
    img = rng.uniform(0.1, 1.0, (7, 7, 2)).astype(np.float32)  # asymmetric, no zero pixel
    fill = (-1.0, -0.5)  # per channel, e.g. -mean/std
    x = jnp.asarray(np.broadcast_to(img, (64, 7, 7, 2)))
    out = np.asarray(augment_images(x, jax.random.key(1), "crop", pad=2, fill=fill))
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    seen = set()
    for o in out:
        match = [s for s in shifts if np.array_equal(o, _shift(img, *s, np.asarray(fill)))]
        assert match, "a crop that is not a shift of the image (a flip?)"
        seen.add(match[0])
    assert len(seen) >= 10  # per-sample draws cover many shifts
    # crop_flip does mirror some images; the flip-free shifts alone cannot explain them
    both = np.asarray(augment_images(x, jax.random.key(1), "crop_flip", pad=2, fill=fill))
    flipped = [o for o in both
               if not any(np.array_equal(o, _shift(img, *s, np.asarray(fill))) for s in shifts)]
    assert flipped and all(any(np.array_equal(o[:, ::-1], _shift(img, *s, np.asarray(fill)))
                               for s in shifts) for o in flipped)
    # fill 0 is the plain zero padding of the distillation students (one shared function)
    zero = np.asarray(random_crop_flip(x, jax.random.key(1), pad=2, flip=False))
    np.testing.assert_array_equal(zero, np.asarray(augment_images(x, jax.random.key(1), "crop", 2)))
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment_images(x, jax.random.key(1), "rotate")


def test_augment_defaults_are_domain_faithful_and_paper_recipe_is_kept():
    assert default_augment("glyphs") == default_augment("mnist5k") == "crop"
    assert default_augment("cifar_fs") == default_augment("mini_imagenet") == "crop_flip"
    assert default_augment("my_custom_data") == "crop"  # unknown domain: never flip
    assert recipe_for("conv4").augment == "none"  # RECIPES: the paper's recipe
    assert recipe_for("conv4", "glyphs").augment == "crop"
    assert recipe_for("resnet10", "cub").augment == "crop_flip"
    assert recipe_for("conv4", "glyphs", augment="paper").augment == "none"
    assert recipe_for("conv4", "glyphs", augment=None).augment == "crop"
    with pytest.raises(ValueError, match="Unknown teacher augmentation 'mirror'.*paper"):
        resolve_augment("mirror")


def _identical_teachers(P=2):
    fm = functional(create_model("mlp", num_classes=3, input_shape=(8, 8, 1), rngs_or_key=0,
                                 hidden=(8,)))
    params = stack_trees([fm.params] * P)
    state = stack_trees([fm.state] * P)
    x = jnp.broadcast_to(jax.random.uniform(jax.random.key(0), (1, 12, 8, 8, 1)), (P, 12, 8, 8, 1))
    y = jnp.tile(jnp.arange(12) % 3, (P, 1))
    return fm, params, state, x, y, jax.random.split(jax.random.key(1), P)


def test_population_augmentation_is_keyed_per_teacher():
    """Three teachers with the same weights and data, one full batch per step (so shuffling does
    not matter); teachers 0 and 1 share a key, teacher 2 has its own. The augmentation draws are a
    pure function of the teacher's key: 0 and 1 stay equal, 2 (other shifts) differs. (Alone ==
    in a population, map == vmap and sharded == one device, all with augmentation:
    tests/test_pool.py.)"""
    fm, params, state, x, y, _ = _identical_teachers(P=3)
    k0, k2 = jax.random.split(jax.random.key(1))
    keys = jnp.stack([k0, k0, k2])
    crop = train_population(fm, params, state, x, y, keys,
                            recipe_for("mlp", epochs=2, batch_size=12, augment="crop"),
                            progress=False, strategy="map", fill=-1.0)
    for a in jax.tree.leaves(crop.params):
        np.testing.assert_allclose(a[0], a[1], rtol=1e-5, atol=1e-6)
    diff = max(float(jnp.abs(a[0] - a[2]).max()) for a in jax.tree.leaves(crop.params))
    assert diff > 1e-3, diff
    with pytest.raises(ValueError, match="fill has 3 values for 1 channels"):
        train_population(fm, params, state, x, y, keys, recipe_for("mlp", epochs=1),
                         progress=False, fill=(0.0, 0.0, 0.0))


# ----------------------------------------------------------------------------- build keys

def _toy_split(seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (6, 5, 8, 8, 1), dtype=np.uint8)
    return ClassDataset(imgs, [f"c{i}" for i in range(6)], ["g"] * 6, name="toy/train")


BUILD = dict(scenario="SS", datasets=["toy"], archs=["mlp"], num_apis=1, way=3, epochs=1,
             model_kwargs={"mlp": {"hidden": [8]}}, progress=False)


def test_pool_spec_covers_every_input():
    base = dict(scenario="SS", datasets=["glyphs"], archs=["conv4"], num_apis=4, epochs=3,
                model_kwargs={"conv4": {"width": 8}},
                dataset_kwargs={"image_size": 16, "max_classes": 40})
    spec = pool_spec(**base)
    assert spec["trainer_version"] == TRAINER_VERSION
    assert spec["recipes"]["glyphs/conv4"]["augment"] == "crop"  # the dataset's default
    assert spec["recipes"]["glyphs/conv4"]["epochs"] == 3
    assert spec["data"]["glyphs"] == content_key("glyphs", image_size=16, max_classes=40)
    key = pool_key(spec)
    # irrelevant to the content: the cache directory and progress bars of the loader
    same = pool_spec(**{**base, "dataset_kwargs": {**base["dataset_kwargs"], "cache_dir": "/x",
                                                    "progress": False}})
    assert pool_key(same) == key
    changes = [dict(epochs=4), dict(seed=1), dict(num_apis=5), dict(way=4),
               dict(train_fraction=0.5), dict(model_kwargs={"conv4": {"width": 16}}),
               dict(recipe_overrides={"augment": "paper"}), dict(recipe_overrides={"lr": 0.1}),
               dict(dataset_kwargs={"image_size": 16, "max_classes": 41}),
               dict(dataset_kwargs={"image_size": 16, "max_classes": 40, "channels": 3}),
               dict(data_keys={"glyphs": {"fonts": "other bytes"}})]
    keys = {pool_key(pool_spec(**{**base, **c})) for c in changes}
    assert key not in keys and len(keys) == len(changes)
    # the data's content key follows the Glyphs rendering (e.g. the renderer version)
    from dfml_jax.data import glyphs as glyphs_mod
    orig = glyphs_mod.GLYPHS_VERSION
    try:
        glyphs_mod.GLYPHS_VERSION = orig + 1
        assert pool_key(pool_spec(**base)) != key
    finally:
        glyphs_mod.GLYPHS_VERSION = orig


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny pool obtained into ``<parent>/pool-<key>``: (directory, build arguments, log)."""
    split = _toy_split()
    build = dict(BUILD, split_loader=lambda name, **kw: split)
    lines = []
    d = obtain_pool(build, parent=str(tmp_path_factory.mktemp("pools")), log=lines.append)
    return d, build, lines


def test_pools_are_reused_only_for_the_same_build_key(built, tmp_path):
    d1, build, lines = built
    parent = os.path.dirname(d1)
    m1 = read_manifest(d1)
    assert os.path.basename(d1) == f"pool-{m1['build_key'][:12]}" and "building" in lines[0]
    assert m1["build_key"] == pool_key(m1["build_spec"])
    assert m1["build_spec"]["data"]["toy"]["loader"] == "custom"  # fingerprint of the split
    assert m1["groups"][0]["recipe"]["augment"] == "crop"  # unknown dataset: shifts only
    assert m1["groups"][0]["recipe"]["augment_pad"] == 1  # 8 px / 8
    stamp = os.path.getmtime(os.path.join(d1, "pool.json"))
    assert obtain_pool(build, parent=parent, log=lines.append) == d1  # same key: reused
    assert "reusing" in lines[-1] and os.path.getmtime(os.path.join(d1, "pool.json")) == stamp
    # other data (one pixel changed) -> another key
    other = _toy_split()
    other.images[0, 0, 0, 0, 0] ^= 1
    assert pool_key(pool_spec(**{k: v for k, v in build.items() if k in (
        "scenario", "datasets", "archs", "num_apis", "way", "epochs", "model_kwargs")},
        data_keys={"toy": {"dataset": "toy", "loader": "custom",
                           "split_sha256": split_fingerprint(other)}})) != m1["build_key"]
    # another recipe -> another key, another directory; the old one is kept
    d2 = obtain_pool(dict(build, epochs=2), parent=parent, log=lines.append)
    assert d2 != d1 and os.path.isdir(d1) and "building" in lines[-1]
    # an explicit directory built from other inputs: a clear error naming the fields and keys
    with pytest.raises(PoolKeyError, match=r"differing fields \(pool -> requested\): "
                                           r"recipes\.toy/mlp\.epochs: 1 -> 2.*Fix: rebuild"):
        obtain_pool(dict(build, epochs=2), directory=d1, log=lines.append)
    with pytest.raises(PoolKeyError, match=f"build key {m1['build_key'][:12]}"):
        obtain_pool(dict(build, epochs=2), directory=d1, log=lines.append)
    # ... accepted when the check is explicitly switched off
    assert obtain_pool(dict(build, epochs=2), directory=d1, check_key=False,
                       log=lines.append) == d1
    assert "without checking" in lines[-1]
    assert obtain_pool(build, directory=d1, log=lines.append) == d1 and "matches" in lines[-1]


def test_pools_without_a_key_still_load_but_are_never_reused(built, tmp_path):
    d1, build, _ = built
    legacy = str(tmp_path / "pool")
    shutil.copytree(d1, legacy)
    shutil.copytree(d1, str(tmp_path / os.path.basename(d1)))
    manifest = read_manifest(legacy)
    spec = manifest["build_spec"]
    for k in ("build_key", "build_spec"):  # as written before build keys existed
        del manifest[k]
    with open(os.path.join(legacy, "pool.json"), "w") as f:
        json.dump(manifest, f)
    assert len(load_pool(legacy)) == 1  # still readable
    with pytest.raises(PoolKeyError, match="records no build key.*written before"):
        check_pool_key(legacy, spec)
    with pytest.raises(PoolKeyError, match="records no build key"):
        obtain_pool(build, directory=legacy, log=print)
    lines = []
    d = obtain_pool(build, parent=str(tmp_path), log=lines.append)
    assert d == str(tmp_path / os.path.basename(d1))
    assert "older code" in lines[0] and "not reused" in lines[0] and "reusing" in lines[1]
    # an edited pool.json (key no longer matches its recorded spec) is not trusted either
    m = read_manifest(d)
    m["build_spec"]["num_apis"] = 7
    with open(os.path.join(d, "pool.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(PoolKeyError, match="pool.json was edited"):
        check_pool_key(d, spec)
