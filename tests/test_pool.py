"""Tests of the API-pool builder (dfml_jax.teachers) and the population trainer (train_teacher).

Sizes are tiny: a 65-class, 16x16 Glyphs subset, 3 Conv4 teachers of width 8 and 3 MLPs,
8 epochs of batch 16 (80 training and 20 held-out images per teacher).
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import APIGroup, BlackBoxAPI, BlackBoxGradientError
from dfml_jax.data import get_class_splits
from dfml_jax.models import create_model, functional, normalize, stack_trees, unstack_tree
from dfml_jax.teachers import (PoolError, build_pool, check_devices, format_summary, load_pool,
                               load_white_box_teachers, read_manifest, train_group, write_pool)
from dfml_jax.teachers.population import TEACHER_AXIS, recipe_for, train_population

RECIPE = dict(epochs=8, batch_size=16)


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory):
    return os.environ.get("DFML_JAX_CACHE") or str(tmp_path_factory.mktemp("glyphs"))


@pytest.fixture(scope="module")
def split(glyph_cache):
    return get_class_splits("glyphs", image_size=16, max_classes=100, cache_dir=glyph_cache,
                            progress=False)[0]


@pytest.fixture(scope="module")
def conv4_group(split):
    # vectorised population on one device (the CPU default is the "map" strategy on all local
    # devices, as mlp_group below: 3 of the 8 emulated devices, one teacher each)
    return train_group(split, dataset="glyphs", arch="conv4", num_apis=3, seed=0, group_index=0,
                       model_kwargs={"width": 8}, recipe=recipe_for("conv4", **RECIPE),
                       progress=False, strategy="vmap", devices=1)


@pytest.fixture(scope="module")
def mlp_group(split):
    return train_group(split, dataset="glyphs", arch="mlp", num_apis=3, seed=0, group_index=1,
                       model_kwargs={"hidden": [32]}, recipe=recipe_for("mlp", **RECIPE),
                       progress=False)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, conv4_group, mlp_group):
    d = str(tmp_path_factory.mktemp("pools") / "sh")
    write_pool(d, [conv4_group, mlp_group], scenario="SH")
    return d


def test_tiny_teachers_beat_chance_on_glyphs(conv4_group, mlp_group):
    for g in (conv4_group, mlp_group):
        ho = np.array([t["heldout_acc"] for t in g.teachers])
        tr = np.array([t["train_acc"] for t in g.teachers])
        # 5-way: chance is 0.2; 20 held-out images per teacher
        assert ho.min() >= 0.5 and ho.mean() >= 0.7, (g.arch, ho)
        assert tr.mean() >= 0.8, (g.arch, tr)


def test_teacher_records(split, conv4_group):
    recs = conv4_group.teachers
    assert [r["name"] for r in recs] == ["glyphs/conv4/0", "glyphs/conv4/1", "glyphs/conv4/2"]
    assert len({r["seed"] for r in recs}) == 3
    for r in recs:
        assert len(set(r["classes"])) == 5 and all(0 <= c < split.num_classes for c in r["classes"])
        assert r["class_names"] == [split.class_names[c] for c in r["classes"]]
        assert (r["num_train"], r["num_heldout"]) == (80, 20)  # 16/4 of 20 images per class
        assert r["mean"] == [0.5] and r["std"] == [0.5]
        # classes are a function of the recorded seed
        again = np.random.default_rng(r["seed"]).choice(split.num_classes, 5, replace=False)
        assert r["classes"] == [int(c) for c in again]
    assert jax.tree.leaves(conv4_group.params)[0].shape[0] == 3


def test_population_training_equals_individual_training(split, conv4_group):
    """Same seeds, trained one at a time (population size 1) or vmapped: same trajectory.

    Conv biases feed BatchNorm, so their true gradient is zero and Adam turns float round-off
    into +-lr steps that differ between the batched and unbatched programs; they do not change
    train-mode outputs. Everything else must agree.
    """
    alone = train_group(split, dataset="glyphs", arch="conv4", num_apis=2, seed=0, group_index=0,
                        model_kwargs={"width": 8}, recipe=recipe_for("conv4", **RECIPE),
                        max_population=1, progress=False)
    for a, b in zip(conv4_group.teachers, alone.teachers):
        assert a["classes"] == b["classes"] and a["seed"] == b["seed"]
        assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-4
        assert abs(a["heldout_acc"] - b["heldout_acc"]) <= 0.05 + 1e-6  # at most one image
    first_two = jax.tree.map(lambda a: a[:2], conv4_group.params)
    flat_a = jax.tree_util.tree_flatten_with_path(first_two)[0]
    for (path, a), b in zip(flat_a, jax.tree.leaves(alone.params)):
        name = jax.tree_util.keystr(path)
        if "convs" in name and "bias" in name:
            continue
        np.testing.assert_allclose(a, b, atol=2e-3, err_msg=name)
    fm = functional(create_model("conv4", rngs_or_key=0, **{**conv4_group.model_config,
                                                             "input_shape": (16, 16, 1)}))
    x = normalize(jnp.asarray(split.images_of(conv4_group.teachers[0]["classes"])[:, :16]
                              .reshape(-1, 16, 16, 1)), (0.5,), (0.5,))
    ya = fm.apply_batchstats(unstack_tree(conv4_group.params, 0), x)
    yb = fm.apply_batchstats(unstack_tree(alone.params, 0), x)
    np.testing.assert_allclose(ya, yb, atol=2e-3)


def test_train_population_validates_and_is_reproducible():
    fms = [functional(create_model("mlp", num_classes=3, input_shape=(4, 4, 1), rngs_or_key=i,
                                   hidden=(8,))) for i in range(2)]
    params = stack_trees([f.params for f in fms])
    state = stack_trees([f.state for f in fms])
    x = jax.random.uniform(jax.random.key(0), (2, 10, 4, 4, 1))
    y = jnp.tile(jnp.arange(10) % 3, (2, 1))
    keys = jax.random.split(jax.random.key(1), 2)
    # 2 full batches + one of 2 per epoch, each randomly shifted (per-teacher, per-step keys)
    r = recipe_for("mlp", epochs=3, batch_size=4, augment="crop", augment_pad=1)
    kw = dict(progress=False, fill=-1.0)
    a = train_population(fms[0], params, state, x, y, keys, r, strategy="map", **kw)
    b = train_population(fms[0], params, state, x, y, keys, r, strategy="map", **kw)
    c = train_population(fms[0], params, state, x, y, keys, r, strategy="vmap", **kw)
    one = train_population(fms[0], *jax.tree.map(lambda t: t[1:], (params, state, x, y, keys)),
                           r, **kw)
    assert a.losses.shape == (3, 2)
    for u, v, w in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params),
                       jax.tree.leaves(c.params)):
        np.testing.assert_array_equal(u, v)  # reproducible
        np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-5)  # strategies agree
    np.testing.assert_allclose(one.losses[:, 0], a.losses[:, 1], rtol=1e-5)  # alone == together
    with pytest.raises(ValueError, match="valid: vmap, map"):
        train_population(fms[0], params, state, x, y, keys, r, progress=False, strategy="pmap")
    with pytest.raises(ValueError, match="leading"):
        train_population(fms[0], params, state, x[:1], y[:1], keys[:1], r, progress=False)
    with pytest.raises(ValueError, match="No training recipe.*valid: conv4"):
        recipe_for("vgg")


def test_sharded_population_equals_one_device():
    """The teacher axis split over 4 or 2 of the 8 emulated devices trains the same teachers."""
    P = 4
    fms = [functional(create_model("conv4", num_classes=3, input_shape=(8, 8, 1), rngs_or_key=i,
                                   width=4, depth=2)) for i in range(P)]
    params = stack_trees([f.params for f in fms])
    state = stack_trees([f.state for f in fms])
    x = jax.random.uniform(jax.random.key(0), (P, 10, 8, 8, 1))
    y = jnp.tile(jnp.arange(10) % 3, (P, 1))
    keys = jax.random.split(jax.random.key(1), P)
    # SGD: float reassociation stays at round-off level (Adam would amplify it where a true
    # gradient is ~0, see test_population_training_equals_individual_training)
    # (with the crop augmentation: every teacher draws its own shifts on every device)
    r = recipe_for("conv4", epochs=2, batch_size=5, optimizer="sgd", lr=0.05, momentum=0.9,
                   augment="crop")
    ref = train_population(fms[0], params, state, x, y, keys, r, progress=False, strategy="map",
                           fill=-1.0)
    for devices, strategy in ((4, "map"), (jax.devices()[2:4], "vmap")):
        out = train_population(fms[0], params, state, x, y, keys, r, progress=False,
                               devices=devices, strategy=strategy, fill=-1.0)
        k = out.params["classifier"]["kernel"]
        assert k.sharding.spec == jax.sharding.PartitionSpec(TEACHER_AXIS)
        assert len(k.sharding.device_set) == (4 if devices == 4 else 2)
        np.testing.assert_allclose(out.losses, ref.losses, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves((out.params, out.state)),
                        jax.tree.leaves((ref.params, ref.state))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"3 devices do not divide the 4 teachers.*\[1, 2, 4\]"):
        train_population(fms[0], params, state, x, y, keys, r, progress=False, devices=3)
    with pytest.raises(ValueError, match="asked for 9 devices but only 8 exist: 8 cpu"):
        train_population(fms[0], params, state, x, y, keys, r, progress=False, devices=9)


def test_pool_device_counts_are_checked_before_training():
    check_devices(None, 20, 20)  # default: all local devices, lowered per population
    check_devices(4, 20, 20)
    with pytest.raises(ValueError, match=r"8 devices do not divide the 20 teachers.*\[1, 2, 4, 5\]"):
        check_devices(8, 20, 20)
    with pytest.raises(ValueError, match=r"2 devices do not divide the 3 teachers.*"
                                         r"\[8, 8, 3\].*: \[1\]"):
        check_devices(2, 19, 8)
    with pytest.raises(ValueError, match="but only 8 exist"):
        check_devices(16, 16, 16)


def test_save_load_roundtrip_gives_identical_outputs(pool_dir, split, conv4_group, mlp_group):
    x = jnp.asarray(split.images_of([1, 2])[:, :3].reshape(-1, 16, 16, 1))
    xn = normalize(x, (0.5,), (0.5,))
    pool = load_pool(pool_dir, conv_impl=None)  # same conv back-end as in training
    assert len(pool) == 6 and pool.scenario == "SH"
    assert pool.mean == (0.5,) and pool.std == (0.5,) and pool.image_size == 16
    assert pool.classes[0] == tuple(conv4_group.teachers[0]["classes"])
    wb = load_white_box_teachers(pool_dir, conv_impl=None)
    for i, g in enumerate((conv4_group, mlp_group)):
        fm = functional(create_model(g.arch, rngs_or_key=0, **g.model_config))
        ref = jax.jit(functools.partial(fm.apply, train=False))
        for m in range(3):
            t = wb[3 * i + m]
            stored = jax.tree.leaves(t.params)
            saved = jax.tree.leaves({"params": unstack_tree(g.params, m),
                                     "state": unstack_tree(g.state, m)})
            for a, b in zip(stored, saved):  # the arrays round-trip bit for bit
                np.testing.assert_array_equal(a, b)
            want, _ = ref(unstack_tree(g.params, m), unstack_tree(g.state, m), xn)
            np.testing.assert_array_equal(jax.jit(t.apply)(t.params, xn), want)
            if m == 0:  # each API compiles its own call: query one per group
                np.testing.assert_allclose(pool[3 * i](xn), want, rtol=1e-5, atol=1e-5)
    assert pool[0].queries == len(xn)

    # default back-end for APIs is lax (faster forward); same function up to float rounding
    fast = load_pool(pool_dir, output="probs", input_space="raw")
    np.testing.assert_allclose(fast[0](x), jax.nn.softmax(pool[0](xn)), atol=1e-5)
    assert wb[0].apply is wb[2].apply and wb[0].apply is not wb[3].apply


def test_loaded_pool_exposes_no_parameters(pool_dir):
    pool = load_pool(pool_dir, output="probs", budget=100)
    assert pool.white_box_teachers is None

    def public_arrays(obj, depth=0):
        found = []
        items = vars(obj).items() if hasattr(obj, "__dict__") else []
        for k, v in items:
            if k.startswith("_"):
                continue
            if isinstance(v, (jax.Array, np.ndarray)) or any(
                    isinstance(l, (jax.Array, np.ndarray)) for l in jax.tree.leaves(v)):
                found.append(k)
        return found

    assert public_arrays(pool) == []
    for api in pool:
        assert isinstance(api, BlackBoxAPI)
        assert public_arrays(api) == []
    json.dumps(pool.records)  # metadata only
    x = jnp.zeros((2, 16, 16, 1))
    with pytest.raises(BlackBoxGradientError):
        jax.grad(lambda z: pool[0](z).sum())(x)
    # one group per architecture can answer all its members from one compiled graph
    group = APIGroup([pool[i] for i in pool.indices(arch="conv4")])
    out = jax.jit(lambda i, z, op: group(i, z, op))(1, x, group.operand)
    np.testing.assert_allclose(out, pool[1](x), atol=1e-6)
    assert "held-out" in pool.summary() and "glyphs/conv4" in pool.summary()
    counts = np.bincount([pool.sample_index(np.random.default_rng(s)) for s in range(60)],
                         minlength=6)
    assert counts.sum() == 60 and (counts > 0).all()


def _copy(src, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def test_damaged_pools_raise_and_never_half_load(pool_dir, tmp_path):
    d = _copy(pool_dir, tmp_path, "no_manifest")
    os.remove(os.path.join(d, "pool.json"))
    with pytest.raises(PoolError, match="pool.json is missing"):
        load_pool(d)

    d = _copy(pool_dir, tmp_path, "no_ckpt")
    shutil.rmtree(os.path.join(d, "checkpoints", "glyphs-mlp"))
    with pytest.raises(PoolError, match="glyphs-mlp.*checkpoint directory is missing"):
        load_pool(d)

    d = _copy(pool_dir, tmp_path, "no_file")
    os.remove(os.path.join(d, "checkpoints", "glyphs-conv4", "_METADATA"))
    with pytest.raises(PoolError, match=r"glyphs-conv4.*missing checkpoint file\(s\) \['_METADATA'\]"):
        load_pool(d)

    d = _copy(pool_dir, tmp_path, "truncated")
    ck = os.path.join(d, "checkpoints", "glyphs-mlp")
    victim = max((os.path.join(r, f) for r, _, fs in os.walk(ck) for f in fs), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(PoolError, match="changed size"):
        load_pool(d)

    d = _copy(pool_dir, tmp_path, "bad_digest")
    manifest = read_manifest(d)
    manifest["groups"][1]["sha256"] = "0" * 64
    with open(os.path.join(d, "pool.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(PoolError, match="glyphs-mlp.*SHA-256"):
        load_pool(d)

    d = _copy(pool_dir, tmp_path, "old_version")
    manifest = read_manifest(d)
    manifest["format_version"] = 999
    with open(os.path.join(d, "pool.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(PoolError, match="incompatible version.*format_version 999"):
        load_pool(d)

    d = _copy(pool_dir, tmp_path, "bad_json")
    with open(os.path.join(d, "pool.json"), "w") as f:
        f.write('{"format": "dfml_jax.api_pool", "teach')
    with pytest.raises(PoolError, match="not valid JSON"):
        load_white_box_teachers(d)

    # flip bytes in the largest stored array file of the conv4 group
    d = _copy(pool_dir, tmp_path, "corrupt")
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "checkpoints", "glyphs-conv4"))
             for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(big) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(PoolError, match="glyphs-conv4"):
        load_pool(d)

    with pytest.raises(PoolError, match="does not exist"):
        load_pool(str(tmp_path / "nowhere"))


def test_bad_build_arguments(split, tmp_path):
    loader = lambda name, **kw: split  # noqa: E731
    kw = dict(datasets=["glyphs"], num_apis=1, epochs=1, split_loader=loader, progress=False)
    with pytest.raises(ValueError, match="Unknown scenario 'XY'; valid: SS, SH, MH"):
        build_pool(str(tmp_path / "a"), scenario="XY", **kw)
    with pytest.raises(ValueError, match="Unknown architecture 'vgg'; valid: conv4, resnet10"):
        build_pool(str(tmp_path / "a"), scenario="SS", archs=["vgg"], **kw)
    with pytest.raises(ValueError, match="SS needs exactly one dataset and one architecture"):
        build_pool(str(tmp_path / "a"), scenario="SS", archs=["conv4", "mlp"], **kw)
    with pytest.raises(ValueError, match="MH needs at least two datasets"):
        build_pool(str(tmp_path / "a"), scenario="MH", archs=["mlp"], **kw)
    with pytest.raises(ValueError, match=r"way=70 classes per teacher.*only 65 classes"):
        build_pool(str(tmp_path / "a"), scenario="SS", archs=["mlp"], way=70, **kw)
    os.makedirs(tmp_path / "exists")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        build_pool(str(tmp_path / "exists"), scenario="SS", archs=["mlp"], **kw)
    assert not os.path.exists(tmp_path / "a")


def test_mh_pool_with_mixed_datasets(split, tmp_path):
    rgb = get_class_splits("glyphs", image_size=16, channels=3, max_classes=100,
                           cache_dir=os.environ.get("DFML_JAX_CACHE") or str(tmp_path / "c"),
                           progress=False)[0]
    loader = lambda name, **kw: {"glyphs": split, "glyphs_rgb": rgb}[name]  # noqa: E731
    m = build_pool(str(tmp_path / "mh"), scenario="MH", datasets=["glyphs", "glyphs_rgb"],
                   archs=["mlp"], num_apis=2, epochs=1, model_kwargs={"mlp": {"hidden": [8]}},
                   split_loader=loader, progress=False)
    t = m["teachers"]
    assert [r["dataset"] for r in t] == ["glyphs", "glyphs", "glyphs_rgb", "glyphs_rgb"]
    assert t[2]["global_classes"] == [c + split.num_classes for c in t[2]["classes"]]
    assert t[2]["input_shape"] == [16, 16, 3] and len(t[2]["mean"]) == 3  # computed stats
    pool = load_pool(str(tmp_path / "mh"), input_space="raw")
    with pytest.raises(ValueError, match="differ in 'mean'"):
        pool.mean
    assert pool[3](jnp.zeros((2, 16, 16, 3))).shape == (2, 5)
    assert "glyphs_rgb/mlp" in format_summary(m)


def test_build_api_pool_cli(glyph_cache, tmp_path, monkeypatch, capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "build_api_pool.py")
    spec = importlib.util.spec_from_file_location("build_api_pool", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setenv("DFML_JAX_CACHE", glyph_cache)
    args = ["--dataset", "glyphs", "--scenario", "SS", "--arch", "mlp", "--num-apis", "2",
            "--epochs", "2", "--image-size", "16", "--max-classes", "100", "--workdir",
            str(tmp_path), "--name", "p", "--augment", "paper", "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "glyphs/mlp" in out
    assert len(load_pool(str(tmp_path / "p"))) == 2
    manifest = read_manifest(str(tmp_path / "p"))
    assert manifest["groups"][0]["recipe"]["augment"] == "none"  # --augment paper
    assert manifest["build_spec"]["recipes"]["glyphs/mlp"]["augment"] == "none"
    assert cli.main(args) == 2  # exists
    assert "overwrite" in capsys.readouterr().err
    assert cli.main(["--dataset", "glyphs", "--scenario", "XX", "--workdir", str(tmp_path)]) == 2
    assert "valid: SS, SH, MH" in capsys.readouterr().err
    assert cli.main(args[:-4] + ["q", "--devices", "3", "--no-progress"]) == 2
    assert "3 devices do not divide the 2 teachers" in capsys.readouterr().err
