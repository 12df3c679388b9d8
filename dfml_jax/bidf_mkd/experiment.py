"""One BiDf-MKD experiment: pool, meta-training, baselines, evaluation, results, plots.

:func:`run_experiment` is what ``experiments/bidf_mkd.py`` calls. Methods (``cfg.methods``):

* ``bidf_mkd``: the black-box method (zero-order inversion, bi-level KD, memory replay);
* ``random``: a randomly initialised meta-model + the same test-time fine-tuning;
* ``average``: element-wise average of the same-architecture teachers' weights (WHITE-BOX) +
  fine-tuning;
* ``white_box``: BiDf-MKD with true gradients through the teachers (inversion upper bound);
* ``maml_real``: MAML on the real meta-train data (meta-learning upper bound).

Model selection is on meta-validation tasks; the reported accuracies are on ``test_tasks``
meta-test tasks (5-way 1-shot and 5-shot, 15 queries, ``finetune_steps`` SGD steps), mean and 95%
CI. The test-time fine-tuning learning rate is chosen per method and per shot on
``lr_select_tasks`` meta-VALIDATION tasks from the grid ``finetune_lrs`` (empty grid: the paper's
fixed ``inner_lr``), then applied unchanged to the test tasks; the chosen rates and the whole
validation grid are recorded in ``results.json``. If ``paper_eval_tasks > 0`` the paper's "best over test evaluations" number is reported in a
separate, labelled column. Each finished method is stored in ``methods/<name>.json``; an
interrupted method resumes from its orbax checkpoint; a finished run (``DONE``) is not redone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.augment import normalize
from dfml_jax.data import get_class_splits, Taskset
from dfml_jax.experiment import RunDir, plot_curves, write_results
from dfml_jax.meta import evaluate_tasks, select_finetune_lr
from dfml_jax.models import create_model, functional

from .train import BiDfMKDConfig, TeacherPool, train_bidf_mkd

__all__ = ["BiDfExperimentConfig", "run_experiment", "METHODS", "pool_build_args"]

METHODS = ("bidf_mkd", "random", "average", "white_box", "maml_real")
# Line drawings change identity under a horizontal flip: no flips in their augmentation.
LINE_DRAWING_DATASETS = ("glyphs", "omniglot", "mnist", "mnist5k", "digits")


@dataclasses.dataclass(frozen=True)
class BiDfExperimentConfig(BiDfMKDConfig):
    """A whole experiment: data, pool, meta-model, methods, evaluation (plus the loop's fields)."""
    name: str = "default"
    dataset: str = "glyphs"
    image_size: int = 28
    channels: int = 1
    data_dir: Optional[str] = None
    # pool: built into <workdir>/pool-<build key[:12]> if pool_dir is None (reused only when its
    # recorded build key matches); an explicit pool_dir is built if missing, else its key must
    # match the config's (PoolKeyError otherwise) unless pool_key_check is False
    pool_dir: Optional[str] = None
    pool_key_check: bool = True
    scenario: str = "SS"
    pool_archs: tuple = ("conv4",)
    num_apis: int = 20
    pool_epochs: int = 60
    pool_width: int = 32
    pool_seed: int = 0
    # teachers' augmentation: None = the dataset's domain-faithful default ("crop" for glyphs and
    # digits, "crop_flip" for natural images); "paper" / "none" = the paper's recipe (none)
    pool_augment: Optional[str] = None
    api_output: str = "logits"
    # inversion's image parameterisation: "dcgan" (the paper) or "strokes" (line drawings by
    # construction, dfml_jax.models.strokes; a departure)
    generator: str = "dcgan"
    # meta-model
    meta_arch: str = "conv4"
    meta_width: int = 32
    # methods and evaluation
    methods: tuple = METHODS
    baseline_iterations: Optional[int] = None  # meta-iterations of white_box / maml_real (None: same)
    test_tasks: int = 600
    test_shots: tuple = (1, 5)
    eval_seed: int = 12345
    # test-time fine-tuning lr: chosen per method and shot on meta-validation tasks from this grid
    # (empty: the paper's fixed inner_lr, no selection)
    finetune_lrs: tuple = ()
    lr_select_tasks: int = 200

    def loop_config(self, **changes) -> BiDfMKDConfig:
        """The loop's config; ``inv_flip=None`` resolved per dataset (no flips for line drawings)."""
        fields = {f.name for f in dataclasses.fields(BiDfMKDConfig)}
        values = {**{k: getattr(self, k) for k in fields}, **changes}
        if values["inv_flip"] is None:
            values["inv_flip"] = self.dataset not in LINE_DRAWING_DATASETS
        return BiDfMKDConfig(**values)


def pool_build_args(cfg: BiDfExperimentConfig, num_apis: Optional[int] = None) -> Dict[str, Any]:
    """:func:`dfml_jax.pool.build_pool` arguments of the config's pool (``num_apis``: its first
    teachers only; teacher ``m`` does not depend on the pool size)."""
    kw = {a: {"width": cfg.pool_width} for a in cfg.pool_archs
          if a in ("conv4", "resnet10", "resnet18")}
    return dict(scenario=cfg.scenario, datasets=(cfg.dataset,), archs=cfg.pool_archs,
                num_apis=num_apis or cfg.num_apis, way=cfg.ways, epochs=cfg.pool_epochs,
                seed=cfg.pool_seed, model_kwargs=kw, recipe_overrides={"augment": cfg.pool_augment},
                dataset_kwargs={"image_size": cfg.image_size, "channels": cfg.channels})


def _pool(cfg: BiDfExperimentConfig, run: RunDir, need_white_box: bool, pool_urls=None):
    from dfml_jax.pool import load_pool, load_white_box_teachers, obtain_pool

    if pool_urls:
        from dfml_jax.remote import load_remote_pool

        if need_white_box:
            raise ValueError("methods 'average' and 'white_box' need white-box teachers, which a "
                             "pool of URLs does not give; drop them from methods.")
        return load_remote_pool(pool_urls, output=cfg.api_output,
                                api_key=os.environ.get("DFML_API_KEY"),
                                cache_dir=run.file("api_pending")), None
    pool_dir = obtain_pool(
        pool_build_args(cfg), directory=cfg.pool_dir, parent=run.path, check_key=cfg.pool_key_check,
        fix="set pool_dir=None to build a matching pool into the workdir, change the config to "
            "the pool's settings, or set pool_key_check=False to use this pool anyway")
    pool = load_pool(pool_dir, output=cfg.api_output)
    wb = load_white_box_teachers(pool_dir) if need_white_box else None
    return pool, wb


def _fixed_tasks(ts: Taskset, key, n: int):
    t = ts.sample(key, n)
    return (t.support_x, t.support_y, t.query_x, t.query_y)


def run_experiment(cfg: BiDfExperimentConfig, workdir: str, *, progress: bool = True,
                   pool_urls: Optional[Sequence[str]] = None, mesh=None) -> Dict[str, Any]:
    """Runs (or resumes, or just reports) a BiDf-MKD experiment in ``workdir``.

    ``pool_urls``: query a pool of remote teachers (one Open Inference Protocol endpoint
    ``http://HOST:PORT/v2/models/NAME`` per teacher, e.g. ``python -m dfml_jax.serve --pool DIR
    --api I``; key from ``$DFML_API_KEY``) instead of ``cfg.pool_dir``; black-box only
    (no ``average`` / ``white_box`` methods). See :func:`dfml_jax.remote.load_remote_pool`.

    ``mesh``: optional device mesh (:func:`dfml_jax.parallel.make_mesh`) for the meta-trained
    methods (sharded inversions and meta-batches; see :func:`~.train.train_bidf_mkd`).

    Returns:
      The ``results.json`` content.
    """
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; valid: {list(METHODS)}")
    run = RunDir(workdir, cfg)
    if run.done:
        with open(run.file("results.json")) as f:
            return json.load(f)
    os.makedirs(run.file("methods"), exist_ok=True)
    t0 = time.time()
    glyph_kw = {"channels": cfg.channels, "progress": progress} if cfg.dataset == "glyphs" else {}
    train_split, val_split, test_split = get_class_splits(
        cfg.dataset, image_size=cfg.image_size, data_dir=cfg.data_dir, **glyph_kw)
    needs_pool = any(m in cfg.methods for m in ("bidf_mkd", "average", "white_box"))
    pool, wb = _pool(cfg, run, any(m in cfg.methods for m in ("average", "white_box")),
                     pool_urls) if needs_pool else (None, None)
    shape = train_split.image_shape
    meta = functional(create_model(cfg.meta_arch, num_classes=cfg.ways, input_shape=shape,
                                   rngs_or_key=cfg.seed, width=cfg.meta_width))
    gen = functional(create_model(cfg.generator, nz=cfg.nz, ngf=cfg.ngf, img_size=cfg.image_size,
                                  nc=shape[-1], rngs_or_key=cfg.seed))
    mean, std = (pool.mean, pool.std) if pool is not None else _stats(train_split)
    key = jax.random.key(cfg.eval_seed)
    kv, kt = jax.random.split(key)
    val_tasks = _fixed_tasks(Taskset(val_split, cfg.ways, cfg.shots, cfg.query), kv, cfg.val_tasks)
    test_sets = {s: _fixed_tasks(Taskset(test_split, cfg.ways, s, cfg.query), jax.random.fold_in(kt, s),
                                 cfg.test_tasks) for s in cfg.test_shots}

    lr_sets = {}
    if cfg.finetune_lrs:
        kl = jax.random.fold_in(kv, 1)
        lr_sets = {s: _fixed_tasks(Taskset(val_split, cfg.ways, s, cfg.query), jax.random.fold_in(kl, s),
                                   cfg.lr_select_tasks) for s in cfg.test_shots}

    def norm_tasks(tasks):
        sx, sy, qx, qy = tasks
        return normalize(sx, mean, std), sy, normalize(qx, mean, std), qy

    def test_eval(params) -> Dict[str, Any]:
        """Per shot: fine-tuning lr chosen on validation (if a grid is given), then test accuracy."""
        out: Dict[str, Any] = {}
        for s, tasks in test_sets.items():
            lr = cfg.inner_lr
            if cfg.finetune_lrs:
                lr, table = select_finetune_lr(meta.apply_batchstats, params, *norm_tasks(lr_sets[s]),
                                               lrs=cfg.finetune_lrs, steps=cfg.finetune_steps,
                                               batch_size=25)
                out[f"{s}-shot_val_by_lr"] = {str(k): round(v.mean, 3) for k, v in table.items()}
            r = evaluate_tasks(meta.apply_batchstats, params, *norm_tasks(tasks),
                               steps=cfg.finetune_steps, lr=lr, batch_size=25)
            out[f"{s}-shot"] = (r.mean, r.ci95)
            out[f"{s}-shot_lr"] = lr
        return out

    teacher_pool = None
    if pool is not None:
        teacher_pool = TeacherPool(pool.apis, pool.classes, mean, std, pool.image_size,
                                   tuple((w.apply, w.params) for w in wb) if wb else None)
    gen_init = lambda k: gen.init(k)[0]
    common = dict(meta_apply=meta.apply_batchstats, meta_init_params=meta.params,
                  gen_init=gen_init, gen_apply=gen.apply_batchstats, val_tasks=val_tasks,
                  test_tasks=test_sets.get(cfg.shots), progress=progress)
    base_its = cfg.baseline_iterations or cfg.meta_iterations
    results: Dict[str, Any] = {}
    for method in cfg.methods:
        path = run.file(os.path.join("methods", f"{method}.json"))
        if os.path.exists(path):
            with open(path) as f:
                results[method] = json.load(f)
            continue
        tm = time.time()
        rec: Dict[str, Any] = {"method": method}
        if method in ("random", "average"):
            params = meta.params
            if method == "average":
                params = _average_teachers(meta.params, wb, pool, cfg)
                rec["note"] = "white-box: averages teacher weights"
            rec.update(test_eval(params), api_queries=0, history=[])
        else:
            lc = {"bidf_mkd": cfg.loop_config(),
                  "white_box": cfg.loop_config(white_box=True, meta_iterations=base_its),
                  "maml_real": cfg.loop_config(replay_source="real", meta_iterations=base_its)}[method]
            real = None
            if method == "maml_real":
                ts_train = Taskset(train_split, cfg.ways, cfg.shots, cfg.query)
                real = lambda k: _fixed_tasks(ts_train, k, cfg.meta_batch)
            res = train_bidf_mkd(lc, pool=None if method == "maml_real" else teacher_pool,
                                 real_tasks=real, checkpoint_dir=run.file(f"ckpt_{method}"),
                                 mesh=mesh, **common)
            rec.update(test_eval(res.best_params), api_queries=res.api_queries if method != "maml_real" else 0,
                       visits=res.visits, history=res.history, stopped_by_budget=res.stopped_by_budget)
            if res.paper_best_test is not None:
                rec["paper_protocol_best_test"] = res.paper_best_test
            if method == "white_box":
                rec["note"] = "white-box upper bound: true gradients through the teachers"
        rec["wall_s"] = round(time.time() - tm, 1)
        with open(path, "w") as f:
            json.dump(rec, f, default=float)
        results[method] = rec

    rows = []
    for m in cfg.methods:
        r = results[m]
        row = {"method": m}
        for s in cfg.test_shots:
            row[f"{s}-shot acc (%)"] = tuple(r[f"{s}-shot"])
        row["fine-tune lr (" + "/".join(f"{s}" for s in cfg.test_shots) + "-shot)"] = "/".join(
            f"{r.get(f'{s}-shot_lr', cfg.inner_lr):g}" for s in cfg.test_shots)
        row["API queries"] = int(r.get("api_queries", 0))
        row["wall (s)"] = r["wall_s"]
        if "paper_protocol_best_test" in r:
            row[f"paper protocol: best test ({cfg.shots}-shot, max over evals)"] = round(r["paper_protocol_best_test"], 2)
        rows.append(row)
    lr_note = (f"fine-tuning lr chosen per method and shot on {cfg.lr_select_tasks} meta-validation "
               f"tasks from {list(cfg.finetune_lrs)}" if cfg.finetune_lrs
               else f"fine-tuning lr {cfg.inner_lr} (fixed)")
    notes = [f"{cfg.test_tasks} meta-test tasks per column, 5-way, {cfg.query} queries, "
             f"{cfg.finetune_steps} fine-tuning steps ({lr_note}); mean ± 95% CI.",
             f"Meta-trained models are selected on {cfg.val_tasks} meta-validation tasks "
             f"({cfg.shots}-shot); the paper-protocol column (if present) is the maximum over test "
             "evaluations and is optimistic.",
             "average and white_box use white-box access to the teachers (baselines / bounds).",
             f"dataset {cfg.dataset} {cfg.image_size}px, pool {cfg.scenario} {cfg.pool_archs} x "
             f"{cfg.num_apis}, seed {cfg.seed}."]
    _plots(run, results, cfg)
    extra = {"config": cfg.name, "seed": cfg.seed, "wall_s": round(time.time() - t0, 1),
             "methods": {m: {k: v for k, v in r.items() if k != "history"} for m, r in results.items()},
             "pool_heldout_acc": [r.get("heldout_acc") for r in pool.records] if pool is not None else None}
    write_results(run, rows, title=f"BiDf-MKD experiment '{cfg.name}'", notes=notes, extra=extra)
    run.mark_done()
    with open(run.file("results.json")) as f:
        return json.load(f)


def _stats(split) -> Tuple[tuple, tuple]:
    x = split.images_of(np.arange(min(split.num_classes, 50)))
    c = x.shape[-1]
    return tuple(float(v) for v in x.reshape(-1, c).mean(0)), tuple(float(v) for v in x.reshape(-1, c).std(0) + 1e-6)


def _average_teachers(meta_params, wb, pool, cfg):
    """Element-wise average of the teachers whose parameters match the meta-model's structure."""
    same = [w.params["params"] for w, r in zip(wb, pool.records) if r["arch"] == cfg.meta_arch]
    ok = [p for p in same if jax.tree.structure(p) == jax.tree.structure(meta_params) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(meta_params)))]
    if not ok:
        raise ValueError(f"average baseline: no teacher shares the meta-model's architecture "
                         f"({cfg.meta_arch}, width {cfg.meta_width}); drop 'average' from methods")
    return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *ok)


def _plots(run: RunDir, results, cfg):
    by_it, by_q = {}, {}
    for m, r in results.items():
        ev = [h for h in r.get("history", []) if h.get("event") == "eval"]
        if ev:
            by_it[m] = ([h["iteration"] for h in ev], [h["val_acc"] for h in ev])
            if m != "maml_real":
                by_q[m] = ([max(h["queries"], 1) for h in ev], [h["val_acc"] for h in ev])
    if by_it:
        plot_curves(run.file("val_acc_vs_iteration.png"), by_it, xlabel="meta-iteration",
                    ylabel=f"meta-val accuracy (%), 5-way {cfg.shots}-shot", title="Validation accuracy")
    if by_q:
        plot_curves(run.file("val_acc_vs_queries.png"), by_q, xlabel="API queries (samples)",
                    ylabel=f"meta-val accuracy (%), 5-way {cfg.shots}-shot",
                    title="Validation accuracy vs API queries", logx=True)
