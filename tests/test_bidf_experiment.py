"""The BiDf-MKD smoke experiment end to end: every method, results files, a finished run is kept;
the baselines' building blocks (kernel scaling, the pool's training data)."""
import dataclasses
import json
import math
import os
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
from configs.bidf_mkd_configs import CONFIGS, get_config  # noqa: E402

from dfml_jax.bidf_mkd.experiment import (METHODS, kernel_scale, meta_init_params,  # noqa: E402
                                          pool_data_split, run_experiment, scale_kernels)
from dfml_jax.data import ClassDataset, Taskset  # noqa: E402
from dfml_jax.experiment import apply_overrides  # noqa: E402
from dfml_jax.models import create_model, functional  # noqa: E402


def test_configs_are_consistent():
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        assert cfg.loop.inversion.per_class >= cfg.loop.shots + cfg.loop.query, name
    with pytest.raises(ValueError, match="available"):
        get_config("nope")
    assert set(CONFIGS["smoke"].methods) == set(METHODS)
    assert {"bidf_mkd", "random", "random_scaled"} <= set(CONFIGS["default"].methods) <= set(METHODS)
    sub = apply_overrides(get_config("smoke"), ['methods=["random","random_scaled","maml_pool_data"]'])
    assert sub.methods == ("random", "random_scaled", "maml_pool_data")
    with pytest.raises(ValueError, match="unknown methods.*random_scale'"):
        run_experiment(apply_overrides(sub, ['methods=["random_scale"]']), "/nonexistent/x")


def _loop_flat_layout(cfg) -> dict:
    """``cfg``'s config.json as written before the loop's settings were nested (``loop``): the
    loop's fields flat beside the experiment's, the inversion's nested (``inversion``)."""
    saved = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {**saved.pop("loop"), **saved}


def _flat_layout(cfg, q_mu: bool = False) -> dict:
    """``cfg``'s config.json as written before issue 17's nesting: the loop's and the inversion's
    settings as flat fields (``inv_*``), the zero-order knobs unprefixed (``q`` / ``mu`` before
    their rename)."""
    saved = _loop_flat_layout(cfg)
    zo = {"num_directions": "q" if q_mu else "num_directions",
          "smoothing": "mu" if q_mu else "smoothing"}
    unprefixed = ("estimator", "chunk_size", "boundary_weight")
    for k, v in saved.pop("inversion").items():
        saved[zo.get(k, k if k in unprefixed else f"inv_{k}")] = v
    return saved


def _old_workdir(path, saved: dict):
    """A finished run directory whose config.json is ``saved``."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(saved))
    (path / "results.json").write_text(json.dumps({"rows": [], "config": "smoke"}))
    (path / "DONE").write_text("finished\n")
    return str(path)


def test_loop_and_inversion_settings_are_nested_configs(tmp_path):
    """The loop's settings are ``cfg.loop`` (``--set loop.meta_iterations=7``), the inversion's
    ``cfg.loop.inversion`` (``--set loop.inversion.lr=0.03``); the former keys (flat loop fields,
    ``inversion.*``, ``inv_lr``, ``num_directions``, ``q``...) are refused naming the new key
    (nothing is written), and work directories of the former layouts resume."""
    from bidf_mkd import main

    cfg = get_config("smoke")
    sub = apply_overrides(cfg, ["loop.inversion.lr=0.03", "loop.inversion.per_class=5",
                                "loop.inversion.flip=none", "loop.inversion.zo_space=image",
                                "loop.meta_iterations=7", "loop.finetune_lr=none", "num_apis=4"])
    inv = sub.loop.inversion
    assert (inv.lr, inv.per_class, inv.zo_space) == (0.03, 5, "image")
    assert (sub.loop.meta_iterations, sub.loop.finetune_lr, sub.num_apis) == (7, None, 4)
    assert inv.flip is None and sub.loop_config().inversion.flip is False  # glyphs
    assert sub.loop_config().inversion_config() == sub.loop_config().inversion
    assert sub.loop_config(white_box=True).white_box and not sub.loop.white_box
    wd = tmp_path / "new"
    for old, new in [("meta_iterations=7", "loop.meta_iterations=7"),
                     ("seed=1", "loop.seed=1"),
                     ("inversion.lr=0.03", "loop.inversion.lr=0.03"),
                     ("inv_lr=0.03", "loop.inversion.lr=0.03"),
                     ("inv_per_class=5", "loop.inversion.per_class=5"),
                     ("num_directions=50", "loop.inversion.num_directions=50"),
                     ("q=50", "loop.inversion.num_directions=50"),
                     ("loop.mu=0.1", "loop.inversion.smoothing=0.1")]:
        key = old.split("=")[0]
        with pytest.raises(ValueError, match=rf"'{key}' was renamed.*"
                                             rf"'{new.split('=')[0]}'.*--set {new}"):
            main(["--config", "smoke", "--workdir", str(wd), "--set", old, "--no-progress"])
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        apply_overrides(cfg, ["loop.nope=1"])
    assert not wd.exists()
    layouts = [(_loop_flat_layout(cfg), r"ways, .*meta_iterations, .*inversion, .* -> loop\.\*"),
               (_flat_layout(cfg), r"inv_lr -> loop\.inversion\.lr.*num_directions, .* -> "
                                   r"loop\.inversion\.\*"),
               (_flat_layout(cfg, True), r"q -> loop\.inversion\.num_directions, "
                                         r"mu -> loop\.inversion\.smoothing")]
    for i, (old, renames) in enumerate(layouts):
        assert "loop" not in old and old["meta_iterations"] == cfg.loop.meta_iterations
        wd = _old_workdir(tmp_path / f"old{i}", old)
        with pytest.warns(UserWarning, match=renames):
            assert run_experiment(cfg, wd, progress=False)["config"] == "smoke"
        changed = apply_overrides(cfg, ["loop.inversion.lr=0.5", "loop.meta_iterations=9"])
        with pytest.warns(UserWarning), pytest.raises(
                ValueError, match=r"keys \['loop\.inversion\.lr', 'loop\.meta_iterations'\]"):
            run_experiment(changed, wd, progress=False)
    wd = _old_workdir(tmp_path / "both", {**_flat_layout(cfg), "inversion": {"lr": 0.1}})
    with pytest.raises(ValueError, match=r"both 'loop\.inv_lr' and its new name "
                                         r"'loop\.inversion\.lr'"):
        run_experiment(cfg, wd, progress=False)
    wd = _old_workdir(tmp_path / "both_loop", {**_loop_flat_layout(cfg), "loop": {"seed": 0}})
    with pytest.raises(ValueError, match=r"both 'seed' and its new name 'loop\.seed'"):
        run_experiment(cfg, wd, progress=False)


def test_finetune_lr_is_the_test_time_lr_without_a_grid():
    """Without a ``finetune_lrs`` grid the test-time fine-tuning uses ``finetune_lr`` (None:
    ``inner_lr``), in the accuracies, the recorded lr, the table and the protocol notes."""
    from dfml_jax.bidf_mkd.experiment import _protocol_notes, _rows, _test_eval
    from dfml_jax.meta import evaluate_tasks

    meta = functional(create_model("mlp", num_classes=5, input_shape=(4, 4, 1), rngs_or_key=0,
                                   hidden=(16,)))
    k1, k2 = jax.random.split(jax.random.key(0))
    y = np.tile(np.arange(5), (6, 1))
    tasks = (jax.random.uniform(k1, (6, 5, 4, 4, 1)), y, jax.random.uniform(k2, (6, 5, 4, 4, 1)), y)
    base = apply_overrides(get_config("smoke"), ["finetune_lrs=[]", "test_shots=[1]",
                                                 "test_tasks=6", "loop.inner_lr=0.01",
                                                 "loop.paper_lr=0.01"])
    for cfg, lr in ((base, 0.01), (apply_overrides(base, ["loop.finetune_lr=0.7"]), 0.7)):
        out = _test_eval(cfg, meta.apply_batchstats, meta.params, {1: tasks}, {}, (0.0,), (1.0,))
        want = evaluate_tasks(meta.apply_batchstats, meta.params, *tasks,
                              steps=cfg.loop.finetune_steps, lr=lr, batch_size=25)
        assert out["1-shot_lr"] == lr and out["1-shot"][0] == pytest.approx(want.mean)
        assert f"fine-tuning lr {lr} (fixed)" in _protocol_notes(cfg)["primary"]
        row = _rows({"random": {"1-shot": out["1-shot"], "wall_s": 0}},
                    dataclasses.replace(cfg, methods=("random",)))[0]
        assert row["fine-tune lr (1-shot)"] == f"{lr:g}"


def test_scale_kernels_scales_exactly_the_conv_and_linear_kernels():
    params = functional(create_model("conv4", num_classes=5, input_shape=(28, 28, 1),
                                     rngs_or_key=0, width=8)).params
    scaled, paths = scale_kernels(params, 0.25)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    new = jax.tree_util.tree_leaves(scaled)
    kernels = [jax.tree_util.keystr(p) for p, _ in flat if "'kernel'" in jax.tree_util.keystr(p)]
    assert sorted(paths) == sorted(kernels) and len(paths) == 5  # 4 convs + the classifier
    for (p, old), v in zip(flat, new):
        want = np.asarray(old) * 0.25 if jax.tree_util.keystr(p) in paths else np.asarray(old)
        np.testing.assert_array_equal(np.asarray(v), want)  # biases and BN scale/bias untouched
    assert jax.tree.structure(scaled) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="no leaf named 'kernel'"):
        scale_kernels({"bias": np.ones(3)}, 0.5)
    cfg = get_config("smoke")
    assert kernel_scale(cfg) == pytest.approx(1 / math.sqrt(cfg.num_apis))
    assert kernel_scale(dataclasses.replace(cfg, random_scale=0.5)) == 0.5
    with pytest.raises(ValueError, match="random_scale must be a positive"):
        kernel_scale(dataclasses.replace(cfg, random_scale=0.0))
    # meta_init: the meta-trained methods start from the random_scaled baseline's weights
    meta = functional(create_model("conv4", num_classes=5, input_shape=(28, 28, 1),
                                   rngs_or_key=0, width=8))
    init = meta_init_params(meta, dataclasses.replace(cfg, meta_init="scaled", random_scale=0.25))
    for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(scaled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta_init_params(meta, dataclasses.replace(cfg, meta_init="random")) is meta.params
    with pytest.raises(ValueError, match="meta_init must be one of"):
        meta_init_params(meta, dataclasses.replace(cfg, meta_init="zeros"))
    with pytest.raises(ValueError, match="meta_init must be one of"):
        run_experiment(dataclasses.replace(cfg, meta_init="zeros"), "/nonexistent/x")


def _toy_split(num_classes=12, per_class=5):
    """Pixel value = 10 * class + image index: every image names its class and index."""
    v = 10 * np.arange(num_classes)[:, None] + np.arange(per_class)[None]
    return ClassDataset(np.broadcast_to(v[:, :, None, None, None], (num_classes, per_class, 2, 2, 1))
                        .astype(np.uint8), [f"c{i}" for i in range(num_classes)], name="toy/train")


def test_pool_data_split_holds_only_the_teachers_classes_and_training_images():
    split = _toy_split()
    records = [{"classes": [3, 1, 4], "num_train": 12, "num_classes": 3, "dataset": "toy"},
               {"classes": [1, 5, 9], "num_train": 12, "num_classes": 3, "dataset": "toy"}]
    sub, classes, what = pool_data_split(split, records, "toy")
    np.testing.assert_array_equal(classes, [1, 3, 4, 5, 9])
    assert sub.per_class == 4 and "first 4 of 5" in what  # the held-out 5th image is left out
    np.testing.assert_array_equal(sub.images, split.images[classes][:, :4])
    t = Taskset(sub, 3, 1, 2).sample(jax.random.key(0), 50)
    abs_classes = classes[np.asarray(t.classes)]
    assert set(abs_classes.ravel()) <= {1, 3, 4, 5, 9} and len(set(abs_classes.ravel())) == 5
    pix = np.concatenate([np.asarray(t.support_x), np.asarray(t.query_x)], 1)[..., 0, 0, 0] * 255
    cls_of_pixel, idx_of_pixel = np.divmod(np.rint(pix).astype(int), 10)
    assert set(cls_of_pixel.ravel()) <= {1, 3, 4, 5, 9} and idx_of_pixel.max() < 4
    assert (cls_of_pixel[:, :3] == abs_classes).all()  # support image i is of the task's class i
    remote = [{k: v for k, v in r.items() if k != "num_train"} for r in records]
    sub, _, what = pool_data_split(split, remote, "toy")
    assert sub.per_class == 5 and "all 5 images" in what
    with pytest.raises(ValueError, match="trained on \\['other'\\]"):
        pool_data_split(split, [{**records[0], "dataset": "other"}], "toy")
    with pytest.raises(ValueError, match="must index the meta-train split"):
        pool_data_split(split, [{**records[0], "classes": [1, 12, 2]}], "toy")


def test_smoke_run_end_to_end(tmp_path):
    work = str(tmp_path / "run")
    cfg = get_config("smoke")
    out = run_experiment(cfg, work, progress=False)
    assert os.path.exists(os.path.join(work, "DONE"))
    methods = [r["method"] for r in out["rows"]]
    assert methods == list(cfg.methods)
    for r in out["rows"]:
        for s in ("1-shot acc (%)", "5-shot acc (%)"):
            mean, ci = r[s]
            assert 0 <= mean <= 100 and ci >= 0
    q = {r["method"]: r["API queries"] for r in out["rows"]}
    assert q["bidf_mkd"] > 0 and q["white_box"] > 0
    assert q["random"] == q["random_scaled"] == q["average"] == q["maml_real"] == q["maml_pool_data"] == 0
    # both protocols per method and shot; the primary one under the historical keys
    for m, r in out["methods"].items():
        for s in ("1-shot", "5-shot"):
            assert len(r[s]) == 2 and 0 <= r[s][0] <= 100, m
            assert len(r["paper_protocol"][s]) == 2 and 0 <= r["paper_protocol"][s][0] <= 100, m
        assert (r["paper_protocol"]["lr"], r["paper_protocol"]["steps"]) == (cfg.loop.paper_lr,
                                                                            cfg.loop.paper_steps)
    for m in ("bidf_mkd", "white_box", "maml_real", "maml_pool_data"):
        pp = out["methods"][m]["paper_protocol"]
        assert pp["1-shot_source"].startswith("max over") and pp["5-shot_source"].startswith("one"), m
        assert pp["1-shot"][0] == pytest.approx(out["methods"][m]["paper_protocol_best_test"])
    assert "1-shot_source" in out["methods"]["random"]["paper_protocol"]
    assert "TEST split" in out["protocols"]["paper_protocol"]
    assert out["methods"]["random_scaled"]["kernel_scale"] == pytest.approx(1 / math.sqrt(cfg.num_apis))
    # the fine-tuning lr of every method and shot is the best of the grid on meta-validation
    for m, r in out["methods"].items():
        for s in cfg.test_shots:
            table = r[f"{s}-shot_val_by_lr"]
            assert set(table) == {str(v) for v in cfg.finetune_lrs}, m
            assert r[f"{s}-shot_lr"] == max(sorted(cfg.finetune_lrs), key=lambda v: table[str(v)]), m
    md = open(os.path.join(work, "results.md")).read()
    assert "| bidf_mkd |" in md and "±" in md
    assert "paper protocol† 1-shot (%)" in md and "selects on the TEST split" in md
    assert os.path.exists(os.path.join(work, "val_acc_vs_iteration.png"))
    assert os.path.exists(os.path.join(work, "val_acc_vs_queries.png"))
    pools = [d for d in os.listdir(work) if d.startswith("pool-")]  # <workdir>/pool-<build key>
    assert len(pools) == 1
    pool = json.load(open(os.path.join(work, pools[0], "pool.json")))
    assert len(pool["teachers"]) == cfg.num_apis and pools[0] == f"pool-{pool['build_key'][:12]}"
    assert pool["groups"][0]["recipe"]["augment"] == "crop"  # glyphs: shifts, no flips
    pool_classes = {c for t in pool["teachers"] for c in t["classes"]}
    assert set(out["methods"]["maml_pool_data"]["pool_classes"]) == pool_classes
    # a finished run is not redone
    t0 = time.time()
    assert run_experiment(cfg, work, progress=False) == out
    assert time.time() - t0 < 5
    # the same workdir with a different config is refused
    with pytest.raises(ValueError, match="different config"):
        run_experiment(apply_overrides(cfg, ["loop.meta_iterations=7"]), work, progress=False)
