"""One BiDf-MKD experiment: pool, meta-training, baselines, evaluation, results, plots.

:func:`run_experiment` is what ``experiments/bidf_mkd.py`` calls. Methods (``cfg.methods``):

* ``bidf_mkd``: the black-box method (zero-order inversion, bi-level KD, memory replay);
* ``random``: a randomly initialised meta-model + the same test-time fine-tuning;
* ``random_scaled``: the same random init with every conv / linear KERNEL (not the biases, not
  the BatchNorm parameters) multiplied by ``random_scale`` (default ``1/sqrt(num_apis)``): does
  ``average`` help only by shrinking the weights? (see :func:`scale_kernels`);
* ``average``: element-wise average of the same-architecture teachers' weights (WHITE-BOX) +
  fine-tuning (the three untrained baselines: :mod:`.baselines`);
* ``white_box``: BiDf-MKD with true gradients through the teachers (inversion upper bound);
* ``maml_real``: MAML on the real meta-train data, all classes (meta-learning upper bound);
* ``maml_pool_data``: the same MAML, but its tasks are drawn only from the real training images
  of the classes the pool's teachers saw (what the APIs know; see :func:`pool_data_split`).

Two evaluation protocols, both in every results table:

* primary: meta-trained models are selected on meta-validation tasks (the initial model,
  iteration 0, included); the test-time fine-tuning learning rate is chosen per method and per
  shot on ``lr_select_tasks`` meta-VALIDATION tasks from the grid ``finetune_lrs`` (empty grid:
  the fixed ``loop.finetune_lr``, by default ``loop.inner_lr``), then ``test_tasks`` meta-test
  tasks (5-way 1-shot and 5-shot, 15 queries, ``loop.finetune_steps`` SGD steps) are evaluated
  once: mean and 95% CI. The chosen rates and the whole validation grid are recorded in
  ``results.json`` (``methods[name]["1-shot"|"5-shot"] = [mean, ci95]``).
* paper protocol (labelled; it selects on the TEST split, so it is optimistic): fine-tuning lr
  ``loop.paper_lr`` (0.01) for ``loop.paper_steps`` (10) steps; for meta-trained methods, on the
  training shot and if ``loop.paper_eval_tasks > 0``, the maximum over the test evaluations made
  during training; otherwise (other shot, untrained methods, ``loop.paper_eval_tasks == 0``) one
  test evaluation (``methods[name]["paper_protocol"]``, with the source of each number).

Each finished method is stored in ``methods/<name>.json``; an interrupted method resumes from its
orbax checkpoint; a finished run (``DONE``) is not redone.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from dfml_jax.data import ClassDataset, get_class_splits, Taskset
from dfml_jax.experiment import RunDir, plot_curves, write_results
from dfml_jax.meta import evaluate_tasks, select_finetune_lr
from dfml_jax.methods import METHODS as REGISTRY
from dfml_jax.models import create_model, functional, scale_kernels
from dfml_jax.remote import load_remote_pool
from dfml_jax.teachers import load_pool, load_white_box_teachers, obtain_pool
from dfml_jax.training.augment import normalize

from .baselines import META_INITS, UNTRAINED, kernel_scale, meta_init_params
from .config import LINE_DRAWING_DATASETS, METHODS, BiDfExperimentConfig
from .train import TeacherPool

__all__ = ["BiDfExperimentConfig", "run_experiment", "METHODS", "LINE_DRAWING_DATASETS",
           "scale_kernels", "META_INITS", "kernel_scale", "meta_init_params", "pool_data_split",
           "pool_build_args"]

REAL_DATA = ("maml_real", "maml_pool_data")          # MAML on real images: no API queries
BOUNDS = ("white_box", "maml_real", "maml_pool_data")  # meta-iterations: baseline_iterations


def pool_build_args(cfg: BiDfExperimentConfig, num_apis: Optional[int] = None) -> Dict[str, Any]:
    """:func:`dfml_jax.teachers.build_pool` arguments of the config's pool (``num_apis``: its first
    teachers only; teacher ``m`` does not depend on the pool size)."""
    kw = {a: {"width": cfg.pool_width} for a in cfg.pool_archs
          if a in ("conv4", "resnet10", "resnet18")}
    return dict(scenario=cfg.scenario, datasets=(cfg.dataset,), archs=cfg.pool_archs,
                num_apis=num_apis or cfg.num_apis, way=cfg.loop.ways, epochs=cfg.pool_epochs,
                seed=cfg.pool_seed, model_kwargs=kw, recipe_overrides={"augment": cfg.pool_augment},
                dataset_kwargs={"image_size": cfg.image_size, "channels": cfg.channels})


def _pool(cfg: BiDfExperimentConfig, run: RunDir, need_white_box: bool, pool_urls=None):
    if pool_urls:
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
    if cfg.meta_init not in META_INITS:
        raise ValueError(f"meta_init must be one of {META_INITS}, got {cfg.meta_init!r}")
    run = RunDir(workdir, cfg)
    if run.done:
        with open(run.file("results.json")) as f:
            return json.load(f)
    os.makedirs(run.file("methods"), exist_ok=True)
    t0 = time.time()
    glyph_kw = {"channels": cfg.channels, "progress": progress} if cfg.dataset == "glyphs" else {}
    train_split, val_split, test_split = get_class_splits(
        cfg.dataset, image_size=cfg.image_size, data_dir=cfg.data_dir, **glyph_kw)
    needs_pool = any(m in cfg.methods for m in ("bidf_mkd", "average", "white_box", "maml_pool_data"))
    pool, wb = _pool(cfg, run, any(m in cfg.methods for m in ("average", "white_box")),
                     pool_urls) if needs_pool else (None, None)
    meta, gen = _models(cfg, train_split.image_shape)
    mean, std = (pool.mean, pool.std) if pool is not None else _stats(train_split)
    val_tasks, test_sets, lr_sets = _eval_tasks(cfg, val_split, test_split)

    def test_eval(params) -> Dict[str, Any]:
        return _test_eval(cfg, meta.apply_batchstats, params, test_sets, lr_sets, mean, std)

    teacher_pool = None
    if pool is not None:
        teacher_pool = TeacherPool(pool.apis, pool.classes, mean, std, pool.image_size,
                                   tuple((w.apply, w.params) for w in wb) if wb else None)
    common = dict(meta_apply=meta.apply_batchstats, meta_init_params=meta_init_params(meta, cfg),
                  gen_init=lambda k: gen.init(k)[0], gen_apply=gen.apply_batchstats,
                  val_tasks=val_tasks, test_tasks=test_sets.get(cfg.loop.shots), progress=progress)
    results: Dict[str, Any] = {}
    for method in cfg.methods:
        path = run.file(os.path.join("methods", f"{method}.json"))
        if os.path.exists(path):
            with open(path) as f:
                results[method] = json.load(f)
            continue
        tm = time.time()
        rec: Dict[str, Any] = {"method": method}
        if method in UNTRAINED:
            params, info = REGISTRY[method].run(meta.params, cfg, teachers=wb,
                                                records=pool.records if pool is not None else None)
            rec.update(info, **test_eval(params), api_queries=0, history=[])
        else:
            res, info = _train_method(method, cfg, common=common, teacher_pool=teacher_pool,
                                      pool=pool, train_split=train_split, run=run, mesh=mesh)
            rec.update(info, **test_eval(res.best_params),
                       api_queries=res.api_queries if method not in REAL_DATA else 0,
                       visits=res.visits, history=res.history,
                       stopped_by_budget=res.stopped_by_budget)
            if res.paper_best_test is not None:
                rec["paper_protocol_best_test"] = res.paper_best_test
            _paper_from_history(rec, cfg)
        rec["wall_s"] = round(time.time() - tm, 1)
        with open(path, "w") as f:
            json.dump(rec, f, default=float)
        results[method] = rec

    return _finish(run, cfg, results, pool, wall_s=round(time.time() - t0, 1))


def meta_model_options(cfg: BiDfExperimentConfig) -> Dict[str, Any]:
    """``create_model`` options of the meta-model: its width, and its layout when not NHWC
    (only ``conv4`` has one)."""
    if cfg.meta_layout == "NHWC":
        return {"width": cfg.meta_width}
    if cfg.meta_arch != "conv4":
        raise ValueError(f"meta_layout={cfg.meta_layout!r} needs meta_arch='conv4' (the only "
                         f"architecture with a layout option), got {cfg.meta_arch!r}; set "
                         "meta_layout=NHWC.")
    return {"width": cfg.meta_width, "layout": cfg.meta_layout}


def _models(cfg: BiDfExperimentConfig, shape):
    """The meta-model and the inversion's generator (functional views), both initialised from
    ``cfg.loop.seed``, for images of ``shape``."""
    lp = cfg.loop
    meta = functional(create_model(cfg.meta_arch, num_classes=lp.ways, input_shape=shape,
                                   rngs_or_key=lp.seed, **meta_model_options(cfg)))
    gen_kw = {"latent": cfg.stroke_latent} if cfg.generator == "strokes" else {}
    gen = functional(create_model(cfg.generator, nz=lp.nz, ngf=lp.ngf, img_size=cfg.image_size,
                                  nc=shape[-1], rngs_or_key=lp.seed, **gen_kw))
    return meta, gen


def _finish(run: RunDir, cfg: BiDfExperimentConfig, results: Dict[str, Any], pool, wall_s: float):
    """Writes the plots, ``results.json`` and ``results.md``, marks the run done.

    Returns:
      The ``results.json`` content: ``rows`` (the table), ``protocols`` (both evaluation
      protocols in words) and ``methods[name]`` (each method's record without its history:
      ``"1-shot"`` / ``"5-shot"`` = primary ``[mean, ci95]``, ``"paper_protocol"``, lrs, notes).
    """
    _plots(run, results, cfg)
    extra = {"config": cfg.name, "seed": cfg.loop.seed, "wall_s": wall_s,
             "protocols": _protocol_notes(cfg),
             "methods": {m: {k: v for k, v in r.items() if k != "history"} for m, r in results.items()},
             "pool_heldout_acc": [r.get("heldout_acc") for r in pool.records] if pool is not None else None}
    write_results(run, _rows(results, cfg), title=f"BiDf-MKD experiment '{cfg.name}'",
                  notes=_notes(cfg), extra=extra)
    run.mark_done()
    with open(run.file("results.json")) as f:
        return json.load(f)


def _eval_tasks(cfg: BiDfExperimentConfig, val_split, test_split):
    """The fixed evaluation tasks (in [0, 1]) of a run, all drawn from ``cfg.eval_seed``.

    Returns:
      ``(val_tasks, test_sets, lr_sets)``: ``cfg.loop.val_tasks`` meta-validation tasks at the
      training shot (model selection), ``{shot: cfg.test_tasks meta-test tasks}`` and ``{shot:
      cfg.lr_select_tasks meta-validation tasks}`` (fine-tuning lr selection; empty without a
      ``finetune_lrs`` grid).
    """
    lp = cfg.loop
    kv, kt = jax.random.split(jax.random.key(cfg.eval_seed))
    val_tasks = _fixed_tasks(Taskset(val_split, lp.ways, lp.shots, lp.query), kv, lp.val_tasks)
    test_sets = {s: _fixed_tasks(Taskset(test_split, lp.ways, s, lp.query), jax.random.fold_in(kt, s),
                                 cfg.test_tasks) for s in cfg.test_shots}
    lr_sets = {}
    if cfg.finetune_lrs:
        kl = jax.random.fold_in(kv, 1)
        lr_sets = {s: _fixed_tasks(Taskset(val_split, lp.ways, s, lp.query), jax.random.fold_in(kl, s),
                                   cfg.lr_select_tasks) for s in cfg.test_shots}
    return val_tasks, test_sets, lr_sets


def _test_eval(cfg: BiDfExperimentConfig, apply_fn, params, test_sets, lr_sets, mean, std
               ) -> Dict[str, Any]:
    """Test accuracy of ``params`` under both protocols, per shot.

    Args:
      cfg: the experiment config.
      apply_fn: the meta-model's ``(params, x) -> logits``.
      params: the (meta-trained or baseline) parameters.
      test_sets, lr_sets: ``{shot: (sx, sy, qx, qy)}`` test and lr-selection tasks in [0, 1].
      mean, std: input normalisation.

    Returns:
      ``{"<s>-shot": (mean, ci95), "<s>-shot_lr": lr, "<s>-shot_val_by_lr": {lr: val acc}
      (with a grid), "paper_protocol": {"<s>-shot": (mean, ci95), "<s>-shot_source": str,
      "lr": paper_lr, "steps": paper_steps}}``: primary protocol (lr chosen on validation if
      ``cfg.finetune_lrs``, else ``cfg.loop.eval_lr``: ``finetune_lr``, or ``inner_lr`` if None;
      ``finetune_steps`` steps) and one test evaluation at ``paper_lr`` / ``paper_steps``.
    """
    def norm(tasks):
        sx, sy, qx, qy = tasks
        return normalize(sx, mean, std), sy, normalize(qx, mean, std), qy

    out: Dict[str, Any] = {}
    paper: Dict[str, Any] = {"lr": cfg.loop.paper_lr, "steps": cfg.loop.paper_steps}
    for s, tasks in test_sets.items():
        lr = cfg.loop.eval_lr
        if cfg.finetune_lrs:
            lr, table = select_finetune_lr(apply_fn, params, *norm(lr_sets[s]), lrs=cfg.finetune_lrs,
                                           steps=cfg.loop.finetune_steps, batch_size=25)
            out[f"{s}-shot_val_by_lr"] = {str(k): round(v.mean, 3) for k, v in table.items()}
        r = evaluate_tasks(apply_fn, params, *norm(tasks), steps=cfg.loop.finetune_steps, lr=lr,
                           batch_size=25)
        out[f"{s}-shot"] = (r.mean, r.ci95)
        out[f"{s}-shot_lr"] = lr
        if (float(lr), cfg.loop.finetune_steps) != (float(cfg.loop.paper_lr), cfg.loop.paper_steps):
            r = evaluate_tasks(apply_fn, params, *norm(tasks), steps=cfg.loop.paper_steps,
                               lr=cfg.loop.paper_lr, batch_size=25)
        paper[f"{s}-shot"] = (r.mean, r.ci95)
        paper[f"{s}-shot_source"] = f"one test evaluation ({cfg.test_tasks} tasks)"
    out["paper_protocol"] = paper
    return out


def _paper_from_history(rec: Dict[str, Any], cfg: BiDfExperimentConfig) -> None:
    """Puts the paper protocol's number of a meta-trained method at the training shot in
    ``rec["paper_protocol"]``: the maximum over the test evaluations made during training (the
    evaluation with the highest ``test_acc_paper_protocol`` in ``rec["history"]``), if any were
    made (``paper_eval_tasks > 0``); otherwise the one test evaluation of the
    validation-selected model stays, its source saying so (as for the other shots)."""
    key = f"{cfg.loop.shots}-shot"
    paper = rec.get("paper_protocol", {})
    for s in cfg.test_shots:
        if s != cfg.loop.shots:
            paper[f"{s}-shot_source"] = (f"one test evaluation of the validation-selected model "
                                         f"({cfg.test_tasks} tasks; test evaluations during "
                                         f"training exist only for the training shot "
                                         f"{cfg.loop.shots})")
    if key not in paper:
        return
    evals = [h for h in rec.get("history", []) if "test_acc_paper_protocol" in h]
    if not evals:
        paper[key + "_source"] = (f"one test evaluation of the validation-selected model "
                                  f"({cfg.test_tasks} tasks; paper_eval_tasks=0: no max over "
                                  "test evaluations)")
        return
    best = max(evals, key=lambda h: h["test_acc_paper_protocol"])
    paper[key] = (best["test_acc_paper_protocol"], best.get("test_ci_paper_protocol", float("nan")))
    paper[key + "_source"] = (f"max over {len(evals)} test evaluations during training "
                              f"({min(cfg.loop.paper_eval_tasks, cfg.test_tasks)} tasks each; "
                              f"best at meta-iteration {best['iteration']})")


def pool_data_split(train_split: ClassDataset, records: Sequence[Dict[str, Any]],
                    dataset: Optional[str] = None) -> Tuple[ClassDataset, np.ndarray, str]:
    """The real images the pool's teachers were trained on, as a few-shot split.

    The classes are the union of the teachers' classes (``record["classes"]``: ids of the
    meta-train split). A teacher of :func:`dfml_jax.teachers.train_group` trained on the first
    ``num_train // num_classes`` images of each of its classes (the rest is its held-out set);
    the split keeps the first ``min`` of that over the records, i.e. images every teacher of the
    class trained on (in a pool from ``build_pool`` all teachers share one train fraction). If a
    record does not say (a remote pool's published record), every image of the classes is kept
    and the returned description says so.

    Args:
      train_split: the meta-train split the pool was built from.
      records: the pool's per-teacher records (``APIPool.records``).
      dataset: the run's dataset name; records naming another dataset are refused.

    Returns:
      ``(split, classes, images)``: the :class:`ClassDataset` (its class ``i`` is meta-train
      class ``classes[i]``), the sorted absolute class ids, and a description of the images kept.

    Raises:
      ValueError: no records, a record of another dataset, or class ids outside the split.
    """
    if not records:
        raise ValueError("maml_pool_data needs the pool's records (which classes each teacher saw)")
    other = sorted({r["dataset"] for r in records if r.get("dataset") not in (None, dataset, "remote")})
    if dataset is not None and other:
        raise ValueError(f"maml_pool_data: pool teachers were trained on {other}, not the run's "
                         f"dataset {dataset!r}; use a pool of {dataset!r} (pool_dir) or drop the method.")
    classes = np.unique(np.concatenate([np.asarray(r["classes"], np.int64) for r in records]))
    counts = [r["num_train"] // r["num_classes"] for r in records
              if r.get("num_train") and r.get("num_classes")]
    if classes.min() < 0 or classes.max() >= train_split.num_classes:
        raise ValueError(f"maml_pool_data: pool class ids must index the meta-train split "
                         f"({train_split.num_classes} classes), got ids {int(classes.min())}.."
                         f"{int(classes.max())}; was the pool built from another split?")
    images = train_split.images[classes]
    if len(counts) == len(records):
        n = min(counts)
        images = images[:, :n]
        what = f"the first {n} of {train_split.per_class} images per class (the teachers' training images)"
    else:
        what = (f"all {train_split.per_class} images per class (the records do not say which "
                "images the teachers trained on)")
    names = [train_split.class_names[c] for c in classes]
    return (ClassDataset(images, names, name=f"{train_split.name}[pool classes]"), classes, what)


def _train_method(method: str, cfg: BiDfExperimentConfig, *, common, teacher_pool, pool,
                  train_split, run: RunDir, mesh):
    """Meta-trains ``method`` (``bidf_mkd``, ``white_box``, ``maml_real``, ``maml_pool_data``):
    its registry entry (``dfml_jax.methods.METHODS``) configures the experiment's loop and runs it.

    Returns:
      ``(TrainResult, info)``: ``info`` is what the method's record states about its data.
    """
    entry = REGISTRY[method]
    its = {"meta_iterations": cfg.baseline_iterations or cfg.loop.meta_iterations} \
        if method in BOUNDS else {}
    lc = entry.configure(cfg.loop_config(), **its)
    info: Dict[str, Any] = {}
    real = None
    if method == "maml_real":
        real = _real_tasks(train_split, cfg)
    elif method == "maml_pool_data":
        split, classes, what = pool_data_split(train_split, pool.records, cfg.dataset)
        real = _real_tasks(split, cfg)
        info = {"pool_classes": [int(c) for c in classes],
                "note": f"MAML on real data of the {len(classes)} (of {train_split.num_classes}) "
                        f"meta-train classes the pool's teachers saw: {what}"}
    elif method == "white_box":
        info = {"note": "white-box upper bound: true gradients through the teachers"}
    res = entry.run(lc, pool=None if method in REAL_DATA else teacher_pool, real_tasks=real,
                    checkpoint_dir=run.file(f"ckpt_{method}"), mesh=mesh, **common)
    return res, info


def _real_tasks(split: ClassDataset, cfg: BiDfExperimentConfig):
    """``key -> cfg.loop.meta_batch`` real training tasks of ``split`` (MAML's ``real_tasks``)."""
    ts = Taskset(split, cfg.loop.ways, cfg.loop.shots, cfg.loop.query)
    return lambda k: _fixed_tasks(ts, k, cfg.loop.meta_batch)


PAPER_MARK = "paper protocol†"


def _rows(results: Dict[str, Any], cfg: BiDfExperimentConfig):
    """The results table: per method the primary and the paper-protocol accuracies per shot."""
    rows = []
    for m in cfg.methods:
        r = results[m]
        paper = r.get("paper_protocol", {})
        row = {"method": m}
        for s in cfg.test_shots:
            row[f"{s}-shot acc (%)"] = tuple(r[f"{s}-shot"])
        row["fine-tune lr (" + "/".join(f"{s}" for s in cfg.test_shots) + "-shot)"] = "/".join(
            f"{r.get(f'{s}-shot_lr', cfg.loop.eval_lr):g}" for s in cfg.test_shots)
        for s in cfg.test_shots:
            v = paper.get(f"{s}-shot")
            row[f"{PAPER_MARK} {s}-shot (%)"] = tuple(v) if v is not None else "n/a"
        row["API queries"] = int(r.get("api_queries", 0))
        row["wall (s)"] = r["wall_s"]
        rows.append(row)
    return rows


def _protocol_notes(cfg: BiDfExperimentConfig) -> Dict[str, str]:
    """The two evaluation protocols in words (``results.json["protocols"]`` and the notes)."""
    lp = cfg.loop
    lr = (f"fine-tuning lr chosen per method and shot on {cfg.lr_select_tasks} meta-validation "
          f"tasks from {list(cfg.finetune_lrs)}" if cfg.finetune_lrs
          else f"fine-tuning lr {lp.eval_lr} (fixed)")
    other = [s for s in cfg.test_shots if s != lp.shots]
    if lp.paper_eval_tasks > 0:
        trained = (f"for meta-trained methods the {lp.shots}-shot number is the MAXIMUM over the "
                   f"test evaluations made during training (iteration 0 and every "
                   f"{lp.eval_every} meta-iterations, {min(lp.paper_eval_tasks, cfg.test_tasks)} "
                   f"test tasks each)")
        if other:
            trained += (f"; max over test evaluations exists only for the training shot, so their "
                        f"{'/'.join(map(str, other))}-shot number is one test evaluation of the "
                        "validation-selected model")
    else:
        trained = ("paper_eval_tasks=0: no test evaluations during training, so meta-trained "
                   "methods get one test evaluation of the validation-selected model (not the "
                   "paper's max over test evaluations)")
    return {
        "primary": (f"meta-trained models selected on {lp.val_tasks} meta-validation tasks "
                    f"({lp.shots}-shot; the initial model, iteration 0, included); {lr}; "
                    f"{lp.finetune_steps} fine-tuning steps; {cfg.test_tasks} meta-test tasks "
                    "evaluated once"),
        "paper_protocol": (f"OPTIMISTIC, selects on the TEST split: fine-tuning lr {lp.paper_lr}, "
                           f"{lp.paper_steps} steps; {trained}; untrained methods "
                           f"({', '.join(UNTRAINED)}): one test evaluation"),
    }


def _notes(cfg: BiDfExperimentConfig):
    """The notes under the results table."""
    p = _protocol_notes(cfg)
    return [f"{cfg.test_tasks} meta-test tasks per column, 5-way, {cfg.loop.query} queries; "
            "mean ± 95% CI.",
            f"Primary protocol (the 'acc' columns; results.json methods[m]['<k>-shot']): {p['primary']}.",
            f"{PAPER_MARK} (results.json methods[m]['paper_protocol']): {p['paper_protocol']}.",
            "average and white_box use white-box access to the teachers (baselines / bounds); "
            "maml_real uses the real images of every meta-train class, maml_pool_data only those "
            "of the classes the pool's teachers saw (data-access upper bounds); random_scaled is "
            "the random init with every kernel scaled (random_scale, default 1/sqrt(num_apis)).",
            f"dataset {cfg.dataset} {cfg.image_size}px, pool {cfg.scenario} {cfg.pool_archs} x "
            f"{cfg.num_apis}, seed {cfg.loop.seed}."]


def _stats(split) -> Tuple[tuple, tuple]:
    x = split.images_of(np.arange(min(split.num_classes, 50)))
    c = x.shape[-1]
    return tuple(float(v) for v in x.reshape(-1, c).mean(0)), tuple(float(v) for v in x.reshape(-1, c).std(0) + 1e-6)


def _plots(run: RunDir, results, cfg):
    by_it, by_q = {}, {}
    for m, r in results.items():
        ev = [h for h in r.get("history", []) if h.get("event") == "eval"]
        if ev:
            by_it[m] = ([h["iteration"] for h in ev], [h["val_acc"] for h in ev])
            if m not in REAL_DATA:
                by_q[m] = ([max(h["queries"], 1) for h in ev], [h["val_acc"] for h in ev])
    if by_it:
        plot_curves(run.file("val_acc_vs_iteration.png"), by_it, xlabel="meta-iteration",
                    ylabel=f"meta-val accuracy (%), 5-way {cfg.loop.shots}-shot",
                    title="Validation accuracy")
    if by_q:
        plot_curves(run.file("val_acc_vs_queries.png"), by_q, xlabel="API queries (samples)",
                    ylabel=f"meta-val accuracy (%), 5-way {cfg.loop.shots}-shot",
                    title="Validation accuracy vs API queries", logx=True)
