"""The single-teacher distillation experiment: teacher, reference student, IDEAL / NaiveKD / DFME.

:func:`run_experiment` is what ``experiments/distill.py`` runs. It trains (or restores) a teacher on
the dataset's training images, wraps it as a black-box API (top-1 labels for IDEAL and NaiveKD,
probabilities for DFME), distils a student with each method at the configured query budgets, and
writes ``results.json``, ``results.md`` and ``accuracy_vs_queries.png`` in the work directory.

The reported accuracy of a method at a budget is the test accuracy of the student selected on the
validation split (carved from the training images) among the evaluated students within that
budget; the papers' protocol (best test accuracy over the run) is reported separately and labelled.

Work directory layout (everything resumable)::

    config.json  DONE  results.json  results.md  accuracy_vs_queries.png
    teacher/            orbax checkpoint of the teacher (trained once)
    reference.json      the student architecture trained on the real training images
    ideal/ naive/       pool/round_*.npz (label cache), checkpoints/, result.json
    dfme/budget_<B>/    checkpoints/, queries_log.json, result.json

The config is any object with the fields of ``experiments/configs/distill_configs.py``
(``DistillExperimentConfig``): the methods' settings are its nested sections ``ideal``, ``naive``
and ``dfme`` (``--set ideal.lr_s=0.03``), each configured and run by the method's entry of the
registry :data:`dfml_jax.methods.METHODS` (:func:`method_config`, :data:`REGISTRY_NAMES`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from dfml_jax.api import BlackBoxAPI
from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.data import load_single_task
from dfml_jax.distill.common import (Evaluator, atomic_write_json, select_within_budget,
                                     split_validation, torch_sgd, train_supervised)
from dfml_jax.distill.dfme import DFMEConfig, cost_per_iteration
from dfml_jax.distill.ideal import IDEALConfig
from dfml_jax.experiment import RunDir, plot_curves, write_results
from dfml_jax.methods import METHODS as REGISTRY
from dfml_jax.models import create_model, functional, set_default_conv_impl

__all__ = ["METHODS", "REGISTRY_NAMES", "run_experiment", "load_data", "get_teacher",
           "get_reference", "make_api", "method_config", "ideal_config", "dfme_config",
           "build_rows"]

METHODS = ("ideal", "naive", "dfme")
LABELS = {"ideal": "IDEAL", "naive": "NaiveKD", "dfme": "DFME"}
#: The experiment's method names -> their names in the registry (``dfml_jax.methods.METHODS``).
REGISTRY_NAMES = {"ideal": "ideal", "naive": "naive_kd", "dfme": "dfme"}


# ----------------------------------------------------------------------------- data and models
def load_data(cfg, loader=None):
    """Training/validation/test splits of ``cfg.dataset`` as float32 NHWC in [0, 1]."""
    d = (loader or load_single_task)(cfg.dataset)
    x_tr, y_tr = np.asarray(d.x_train, np.float32), np.asarray(d.y_train, np.int32)
    x_fit, y_fit, x_val, y_val = split_validation(x_tr, y_tr, cfg.val_size, cfg.split_seed)
    return {"x_train": x_tr, "y_train": y_tr, "x_fit": x_fit, "y_fit": y_fit, "x_val": x_val,
            "y_val": y_val, "x_test": np.asarray(d.x_test, np.float32),
            "y_test": np.asarray(d.y_test, np.int32), "num_classes": int(d.num_classes),
            "input_shape": tuple(int(s) for s in x_tr.shape[1:])}


def build(arch, kw, data, seed):
    return functional(create_model(arch, num_classes=data["num_classes"],
                                   input_shape=data["input_shape"], rngs_or_key=seed, **kw))


def get_teacher(cfg, run, data, log):
    """Trains the teacher on all training images once; later runs restore it (orbax)."""
    fm = build(cfg.teacher_arch, cfg.teacher_kw, data, cfg.teacher_seed)
    ck = RunCheckpointer(run.file("teacher"), max_to_keep=1)
    try:
        restored = ck.restore_latest({"params": fm.params, "bn": fm.state})
        if restored is not None:
            _, arrays, meta = restored
            log(f"teacher restored: test acc {meta['test_acc']:.4f}")
            return fm, arrays["params"], arrays["bn"], meta
        ev = Evaluator(fm, {"val": (data["x_val"], data["y_val"]),
                            "test": (data["x_test"], data["y_test"])}, chunk=cfg.eval_chunk)
        t0 = time.perf_counter()
        tx = torch_sgd(cfg.teacher_lr, cfg.teacher_momentum, cfg.teacher_weight_decay)
        params, bn, hist = train_supervised(
            fm, tx, data["x_train"], data["y_train"], epochs=cfg.teacher_epochs,
            batch_size=cfg.teacher_batch, key=jax.random.key(cfg.teacher_seed),
            augment=cfg.teacher_augment)
        accs = ev(params, bn)
        meta = {"test_acc": accs["test_acc"], "train_images": len(data["x_train"]),
                "epochs": cfg.teacher_epochs, "seconds": time.perf_counter() - t0,
                "final_loss": hist[-1]["loss"]}
        ck.save(cfg.teacher_epochs, {"params": params, "bn": bn}, meta)
        log(f"teacher trained in {meta['seconds']:.0f}s: test acc {accs['test_acc']:.4f}")
        return fm, params, bn, meta
    finally:
        ck.close()


def get_reference(cfg, run, data, log):
    """The student architecture trained on the real training digits (minus validation)."""
    path = run.file("reference.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    fm = build(cfg.student_arch, cfg.student_kw, data, cfg.seed)
    ev = Evaluator(fm, {"val": (data["x_val"], data["y_val"]),
                        "test": (data["x_test"], data["y_test"])}, chunk=cfg.eval_chunk)
    t0 = time.perf_counter()
    _, _, hist = train_supervised(
        fm, torch_sgd(cfg.reference_lr, 0.9, 5e-4), data["x_fit"], data["y_fit"],
        epochs=cfg.reference_epochs, batch_size=cfg.reference_batch,
        key=jax.random.key(cfg.seed), evaluator=ev, select_on_val=True)
    best = max(hist, key=lambda h: (h["val_acc"], h["epoch"]))
    ref = {"val_acc": best["val_acc"], "test_acc": best["test_acc"], "epoch": best["epoch"],
           "best_test_acc": max(h["test_acc"] for h in hist), "train_images": len(data["x_fit"]),
           "seconds": time.perf_counter() - t0, "seed": cfg.seed}
    atomic_write_json(path, ref)
    log(f"real-data reference: test acc {ref['test_acc']:.4f} (epoch {ref['epoch']} selected on val)")
    return ref


def make_api(teacher, data, output, budget, name):
    fm, params, bn = teacher[0], teacher[1], teacher[2]

    def teacher_logits(x):
        return fm.apply(params, bn, x, train=False)[0]

    return BlackBoxAPI.from_jax(teacher_logits, data["input_shape"], data["num_classes"],
                                output=output, budget=budget, name=name)


def method_config(cfg, method: str):
    """The config of one of the experiment's methods: its section of the experiment config
    (``ideal``; ``naive``, or ``ideal`` when the experiment has none; ``dfme``) configured by the
    method's registry entry (NaiveKD: ``synth="noise"``).

    Args:
      cfg: the experiment config.
      method: one of :data:`METHODS`.

    Returns:
      An :class:`IDEALConfig` or a :class:`DFMEConfig`.
    """
    section = {"ideal": cfg.ideal, "dfme": cfg.dfme,
               "naive": cfg.naive if cfg.naive is not None else cfg.ideal}[method]
    return REGISTRY[REGISTRY_NAMES[method]].configure(section)


def ideal_config(cfg, synth: str) -> IDEALConfig:
    """IDEAL's config (``synth="generator"``: the ``ideal`` section) or NaiveKD's (``"noise"``:
    the ``naive`` section, or the ``ideal`` one when the experiment has none)."""
    return method_config(cfg, "naive" if synth == "noise" else "ideal")


def dfme_config(cfg) -> DFMEConfig:
    """The experiment's DFME section."""
    return method_config(cfg, "dfme")


def _refuse_flat_config(workdir: str) -> None:
    """A work directory started before the nested method configs cannot resume: say so."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    if "ideal" not in old and any(k.startswith(("ideal_batch", "dfme_batch")) for k in old):
        raise ValueError(
            f"{workdir} was started by dfml_jax 0.1.0 before the config redesign (flat "
            "ideal_*/dfme_* fields); this version nests them (ideal.*, dfme.*: --set "
            "ideal.lr_s=0.03). Its finished results stay readable; to run again, use a new "
            "--workdir, or resume it with the commit it was started from.")


# ----------------------------------------------------------------------------- runs
def _load_result(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def run_method(method, cfg, run, data, teacher, student, ev, log, progress=True,
               api_factory=None):
    """Runs (or resumes, or reloads) one method; returns ``{run_name: result summary}``.

    ``student`` (functional model) and ``ev`` (its evaluator) are shared by the methods, so their
    compiled steps are shared too. ``api_factory`` (see :func:`run_experiment`) replaces the
    in-process teacher API.
    """
    def new_api(output, budget, name):
        if api_factory is None:
            return make_api(teacher, data, output, budget, name)
        return api_factory(output=output, budget=budget, name=name,
                           input_shape=data["input_shape"], num_classes=data["num_classes"])

    out = {}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS} or 'all'")
    entry, mcfg = REGISTRY[REGISTRY_NAMES[method]], method_config(cfg, method)
    if method in ("ideal", "naive"):
        budgets = tuple(cfg.ideal_budgets or cfg.budgets)
        wd = run.file(method)
        res = _load_result(os.path.join(wd, "result.json"))
        if res is None:
            api = new_api("label", max(budgets), f"teacher-{method}")
            r = entry.run(api, student, mcfg, seed=cfg.seed, evaluator=ev, workdir=wd,
                          eval_budgets=budgets, progress=progress, name=LABELS[method])
            res = {**r.summary(), "seed": cfg.seed}
            log(f"{LABELS[method]}: {r.queries} queries, {r.rounds} rounds, stopped: {r.stopped}, "
                f"{r.seconds:.0f}s")
        out[method] = {**res, "budgets": list(budgets)}
    else:
        budgets = tuple(cfg.dfme_budgets or cfg.budgets)
        for b in budgets:
            wd = run.file(os.path.join("dfme", f"budget_{b}"))
            res = _load_result(os.path.join(wd, "result.json"))
            if res is None:
                api = new_api(cfg.dfme_output, b, f"teacher-dfme-{b}")
                r = entry.run(api, student, mcfg, seed=cfg.seed, evaluator=ev, workdir=wd,
                              progress=progress, name=f"DFME@{b}")
                res = {**r.summary(), "seed": cfg.seed}
                log(f"DFME@{b}: {r.queries} queries in {r.iterations} iterations of "
                    f"{r.cost_per_iteration}, {r.seconds:.0f}s")
            out[f"dfme@{b}"] = {**res, "budgets": [b]}
    return out


# ----------------------------------------------------------------------------- reporting
def build_rows(cfg, results, teacher_meta, reference):
    rows = [{"method": "teacher (real data, all training images)", "budget": "-", "queries": 0,
             "test_acc": 100 * teacher_meta["test_acc"], "val_acc": "-", "final_test_acc": "-",
             "best_test_acc (paper protocol)": "-", "seed": cfg.teacher_seed,
             "run_wall_s": _seconds(teacher_meta)},
            {"method": "student on real data (reference)", "budget": "-", "queries": 0,
             "test_acc": 100 * reference["test_acc"], "val_acc": 100 * reference["val_acc"],
             "final_test_acc": "-",
             "best_test_acc (paper protocol)": 100 * reference["best_test_acc"],
             "seed": reference["seed"], "run_wall_s": _seconds(reference)}]
    for run_name, res in results.items():
        method = run_name.split("@")[0]
        for b in res["budgets"]:
            sel = select_within_budget(res["curve"], b)
            if sel is None:
                continue
            s = sel["selected"]
            rows.append({"method": LABELS[method], "budget": b, "queries": s["queries"],
                         "test_acc": 100 * s["test_acc"], "val_acc": 100 * s["val_acc"],
                         "final_test_acc": 100 * sel["final"]["test_acc"],
                         "best_test_acc (paper protocol)": 100 * sel["best_on_test"],
                         "seed": res["seed"], "run_wall_s": _seconds(res)})
    return rows


def _seconds(meta):
    s = meta.get("seconds")
    return "-" if s is None else round(float(s))


def report(cfg, run, results, teacher_meta, reference, seconds):
    rows = build_rows(cfg, results, teacher_meta, reference)
    dcost = cost_per_iteration(dfme_config(cfg))
    notes = [
        f"dataset {cfg.dataset}: {reference['train_images']} training images for the reference "
        f"student, {cfg.val_size} validation images (model selection), test split for accuracy; "
        f"the teacher ({cfg.teacher_arch} {cfg.teacher_kw}) saw all {teacher_meta['train_images']} "
        "training images.",
        "test_acc: test accuracy (%) of the student with the best validation accuracy among the "
        "evaluated students whose queries are within the budget (queries = the queries it had "
        "used). final_test_acc: the last student within the budget. best_test_acc (paper "
        "protocol): the best TEST accuracy over the run, i.e. selection on the test set as in the "
        "official IDEAL and DFME code; for comparison with published numbers only.",
        "IDEAL and NaiveKD: one run up to the largest budget (the algorithm does not depend on the "
        "budget, so every prefix is exactly the run with the smaller budget); teacher queried "
        f"once per synthetic sample ({cfg.ideal.batch_size} per round, top-1 labels).",
        f"DFME: one run per budget (its LR schedule depends on the budget); {dcost} queries per "
        f"iteration = {cfg.dfme.batch_size} x ({cfg.dfme.g_iter} x ({cfg.dfme.num_directions} + 1) + "
        f"{cfg.dfme.d_iter}); teacher probabilities, logits recovered as log p - mean log p.",
        "run_wall_s: wall seconds of the run that produced the row (IDEAL and NaiveKD: the whole "
        "run up to the largest budget; a resumed run: the last invocation only).",
        f"student {cfg.student_arch} {cfg.student_kw}; seed {cfg.seed} (teacher seed "
        f"{cfg.teacher_seed}); wall time of this invocation {seconds:.0f}s.",
    ]
    if teacher_meta.get("remote"):
        notes.append(f"teacher: {teacher_meta['remote']}; its test accuracy was measured through "
                     f"the API ({teacher_meta['measure_queries']} queries, outside the budgets).")
    for name, res in results.items():
        if res.get("requeried"):
            notes.append(f"{name}: {res['requeried']} queries were bought again after a resume.")
        if "class_histogram" in res:
            notes.append(f"{name}: teacher-label histogram of the pool {res['class_histogram']}.")
    write_results(run, rows, title=f"Data-free distillation from one black box ({cfg.name}, "
                                   f"{cfg.dataset})", notes=notes,
                  extra={"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                         "teacher": teacher_meta, "reference": reference, "runs": results})
    curves = {}
    for name, res in results.items():
        pts = [p for p in res["curve"]      # the online student (not consolidated copies)
               if "test_acc" in p and p.get("phase") != "consolidate"]
        if pts:
            label = LABELS[name.split("@")[0]] + (f" (budget {name.split('@')[1]})"
                                                  if "@" in name else "")
            curves[label] = ([p["queries"] for p in pts], [100 * p["test_acc"] for p in pts])
    if curves:
        xmax = max(max(x) for x, _ in curves.values())
        xmin = max(1, min(min(x) for x, _ in curves.values()))
        curves["teacher"] = ([xmin, xmax], [100 * teacher_meta["test_acc"]] * 2)
        curves["student on real data"] = ([xmin, xmax], [100 * reference["test_acc"]] * 2)
        plot_curves(run.file("accuracy_vs_queries.png"), curves, xlabel="teacher queries",
                    ylabel="test accuracy (%)", logx=True,
                    title=f"{cfg.dataset}: accuracy vs queries (seed {cfg.seed})")
    return rows


def remote_teacher_meta(api_factory, data, log):
    """Test accuracy of a remote teacher, measured through its own API (outside the budgets)."""
    api = api_factory(output="label", budget=None, name="teacher-test-accuracy",
                      input_shape=data["input_shape"], num_classes=data["num_classes"])
    x, y = data["x_test"], data["y_test"]
    pred = np.concatenate([np.asarray(api(x[i:i + 1000])) for i in range(0, len(x), 1000)])
    desc = getattr(api_factory, "description", "a remote teacher")
    if hasattr(api, "remote"):
        api.remote.close()
    meta = {"test_acc": float(np.mean(pred == y)), "train_images": "(remote: unknown)",
            "remote": desc, "measure_queries": int(api.queries)}
    log(f"teacher: {desc}, test acc {meta['test_acc']:.4f} ({api.queries} queries to measure it)")
    return meta


def _existing(method, cfg, run):
    out = {}
    if method in ("ideal", "naive"):
        res = _load_result(run.file(os.path.join(method, "result.json")))
        if res is not None:
            out[method] = {**res, "budgets": list(cfg.ideal_budgets or cfg.budgets)}
    else:
        for b in cfg.dfme_budgets or cfg.budgets:
            res = _load_result(run.file(os.path.join("dfme", f"budget_{b}", "result.json")))
            if res is not None:
                out[f"dfme@{b}"] = {**res, "budgets": [b]}
    return out


def run_experiment(cfg, workdir: str, *, methods: Sequence[str] = METHODS, progress: bool = True,
                   loader: Optional[Callable] = None, log: Optional[Callable] = None,
                   api_factory: Optional[Callable] = None) -> dict:
    """Runs (or resumes, or reprints) a distillation experiment in ``workdir``.

    Args:
      cfg: the experiment config (``DistillExperimentConfig``).
      workdir: run directory; it refuses a different config. Rerunning resumes every unfinished
        run and reuses the finished ones (the teacher, the reference, each method's runs).
      methods: subset of :data:`METHODS`. Results of other methods already in ``workdir`` stay in
        the table. The experiment is marked ``DONE`` when all methods have run.
      progress: tqdm bars.
      loader: dataset loader ``name -> SingleTaskData`` (default:
        :func:`dfml_jax.data.load_single_task`).
      log: line logger (default: print).
      api_factory: builds the teacher API the methods query instead of the in-process teacher,
        ``api_factory(output=, budget=, name=, input_shape=, num_classes=) -> BlackBoxAPI``
        (e.g. :func:`dfml_jax.remote.remote_api_factory` for a teacher served over HTTP). The
        teacher row then reports the remote teacher's test accuracy, measured through a separate
        API (queries not counted in any budget); the local teacher is still trained/restored.

    Returns:
      ``{"rows": [...], "done": bool}`` (the rows of ``results.md``).
    """
    t0 = time.perf_counter()
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; valid: {METHODS}")
    _refuse_flat_config(workdir)
    run = RunDir(workdir, cfg)
    set_default_conv_impl(cfg.conv_impl)
    if log is None:
        def log(msg):
            print(f"[distill {cfg.name}] {msg}", flush=True)

    if run.done:
        log(f"{run.path} is finished (DONE); results in results.md")
        with open(run.file("results.json")) as f:
            return {"rows": json.load(f)["rows"], "done": True}
    data = load_data(cfg, loader)
    log(f"{cfg.dataset}: {len(data['x_fit'])} train / {len(data['x_val'])} val / "
        f"{len(data['x_test'])} test, input {data['input_shape']}, {data['num_classes']} classes")
    tfm, tparams, tbn, tmeta = get_teacher(cfg, run, data, log)
    if api_factory is not None:
        tmeta = remote_teacher_meta(api_factory, data, log)
    reference = get_reference(cfg, run, data, log)
    student = build(cfg.student_arch, cfg.student_kw, data, cfg.seed)
    ev = Evaluator(student, {"val": (data["x_val"], data["y_val"]),
                             "test": (data["x_test"], data["y_test"])}, chunk=cfg.eval_chunk)
    results = {}
    for m in METHODS:                       # keep earlier results of other methods in the table
        if m in methods:
            results.update(run_method(m, cfg, run, data, (tfm, tparams, tbn), student, ev, log,
                                      progress=progress, api_factory=api_factory))
        else:
            results.update(_existing(m, cfg, run))
    rows = report(cfg, run, results, tmeta, reference, time.perf_counter() - t0)
    expected = {"ideal": 1, "naive": 1, "dfme": len(cfg.dfme_budgets or cfg.budgets)}
    done = all(len(_existing(m, cfg, run)) == expected[m] for m in METHODS)
    if done:
        run.mark_done()
    return {"rows": rows, "done": done}
