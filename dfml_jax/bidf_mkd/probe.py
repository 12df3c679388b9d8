"""Transfer probes: does the data recovered from black-box APIs teach NEW classes?

BiDf-MKD's claim rests on the recovered images carrying features that transfer to unseen classes.
A full run takes an hour; these probes answer the question for one recovery *recipe* in minutes,
under a fixed query budget per API, on the first ``num_apis`` teachers of a pool:

* **within-task** (:func:`within_task_probe`): a fresh student is distilled from one API on that
  API's recovered images and its soft answers (temperature ``T``), then scored on the API's
  held-out REAL images. High means recovery captured the teacher's own decision function.
* **pool-level** (:func:`pool_probe`): ONE student is distilled on the union of all probed APIs'
  recovered sets (one output per distinct class of the union); its body, with a fresh 5-way head,
  is fine-tuned on new-class meta-validation tasks. High means the images carry features that
  carry over to new classes, the thing BiDf-MKD needs.
* **replay-MAML** (:func:`replay_probe`): MAML on tasks drawn from the recovered images only (each
  (API, target) pair is a class), scored on meta-validation tasks: the memory-replay half of
  BiDf-MKD on its own.

The reference rows (:func:`reference_rows`) put Random init, Random with kernels scaled by
``1/sqrt(num_apis)``, the Average of the probed teachers' weights (white-box) beside them, under the
same fine-tuning protocol (learning rate chosen per row on separate validation tasks).

A :class:`Recipe` says where the images come from: ``"zo"`` (black-box inversion with zero-order
gradients: the method), ``"white_box"`` (true gradients through the teacher: the bound of
inversion), ``"real"`` (the API's own training images: the data ceiling), ``"noise"`` (uniform
noise: the floor); ``inversion`` overrides fields of the base :class:`.InversionConfig` (image
priors, augmentation, batch size vs iterations at a fixed budget...), ``generator`` picks the
image parameterisation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfml_jax.api import group_apis, surface_api_errors
from dfml_jax.data import ClassDataset, Taskset
from dfml_jax.losses import teacher_probs
from dfml_jax.meta import evaluate_tasks, select_finetune_lr
from dfml_jax.models import create_model, functional, scale_kernels
from dfml_jax.training.augment import normalize

from .inversion import InversionConfig, inversion_queries, make_inverter
from .train import BiDfMKDConfig, train_bidf_mkd

__all__ = ["Recipe", "ProbeConfig", "RecoveredSet", "recover_set", "recover_sets", "kd_student", "within_task_probe",
           "pool_probe", "replay_probe", "reference_rows", "with_head",
           "few_shot_eval", "FewShotEval", "transfer_score", "run_probe", "RECIPE_SOURCES"]

RECIPE_SOURCES = ("zo", "white_box", "real", "noise")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Where one probed API's images come from.

    Attributes:
      source: one of :data:`RECIPE_SOURCES`.
      inversion: ``(field, value)`` overrides of the probe's base :class:`.InversionConfig`
        (``"zo"`` / ``"white_box"`` only).
      generator: image parameterisation of the inversion, a name of
        :data:`dfml_jax.models.GENERATORS`.
      images_scale: ``s`` times more images per class with ``s`` times fewer iterations: the
        same query budget spread over more, less optimised images (diversity).
      generator_options: ``(keyword, value)`` pairs for the generator's constructor, overriding
        the probe's ``nz`` / ``ngf`` (e.g. ``(("latent", "direct"), ("nz", 32))``: the stroke
        generator's latents are its stroke parameters).
    """
    source: str = "zo"
    inversion: Tuple[Tuple[str, Any], ...] = ()
    generator: str = "dcgan"
    images_scale: int = 1
    generator_options: Tuple[Tuple[str, Any], ...] = ()

    def inversion_config(self, base: InversionConfig) -> InversionConfig:
        cfg = dataclasses.replace(base, **dict(self.inversion))
        if self.images_scale != 1:
            cfg = dataclasses.replace(cfg, per_class=cfg.per_class * self.images_scale,
                                      iterations=max(1, cfg.iterations // self.images_scale))
        return cfg


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Sizes of the probes (defaults: the issue's minutes-scale probe)."""
    num_apis: int = 5              # the first num_apis APIs of the pool are probed
    student_width: int = 32
    temperature: float = 4.0
    kd_lr: float = 1e-3            # Adam
    kd_batch: int = 64
    within_steps: int = 300
    pool_steps: int = 600
    replay_iterations: int = 150
    replay_meta_batch: int = 4
    replay_inner_steps: int = 5
    inner_lr: float = 0.1
    outer_lr: float = 1e-3
    ways: int = 5
    shots: int = 1
    query: int = 15
    val_tasks: int = 100
    lr_select_tasks: int = 50
    finetune_lrs: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    finetune_steps: int = 10
    seed: int = 0
    meta_init_scale: Optional[float] = None   # replay probe: kernels of the init x this (None: 1)


class RecoveredSet(NamedTuple):
    """One API's probe data: images in [0, 1], their targets, the API's answers, the cost."""
    images: np.ndarray       # (n, H, W, C)
    targets: np.ndarray      # (n,) target output index (the class the recovery aimed at)
    probs: np.ndarray        # (n, K) the API's probabilities on the images (queried once)
    queries: int             # API samples this set cost (recovery + the soft-label query)


@functools.lru_cache(maxsize=8)
def _gen(name: str, nz: int, ngf: int, image_size: int, channels: int, options=()):
    kw = dict(nz=nz, ngf=ngf, img_size=image_size, nc=channels, rngs_or_key=0)
    kw.update(options)
    return functional(create_model(name, **kw))


def recover_sets(recipe: Recipe, apis: Sequence, keys: jax.Array, *, base: InversionConfig,
                 nz: int, ngf: int, mean, std, image_size: int,
                 real_images: Optional[Sequence[np.ndarray]] = None,
                 white_box: Optional[Sequence[Tuple[Callable, Any]]] = None) -> List[RecoveredSet]:
    """Recovers (or takes) each API's image set by ``recipe`` and buys its soft labels once.

    Same-signature APIs share one compiled inversion (:func:`~dfml_jax.api.group_apis`).

    Args:
      recipe: the :class:`Recipe`.
      apis: the black-box APIs (their ledgers are charged).
      keys: one PRNG key per API.
      base: the base inversion config the recipe overrides.
      nz, ngf: generator sizes.
      mean, std, image_size: the APIs' input normalisation and side.
      real_images: per API ``(K, n, H, W, C)``: its own training images (``source="real"``).
      white_box: per API ``(apply, params)`` of the teacher (``source="white_box"``).

    Returns:
      One :class:`RecoveredSet` per API, ``K * per_class`` images each (interleaved targets).
    """
    if recipe.source not in RECIPE_SOURCES:
        raise ValueError(f"unknown recipe source {recipe.source!r}; valid: {RECIPE_SOURCES}")
    if recipe.source == "real" and real_images is None:
        raise ValueError("recipe source 'real' needs the APIs' real training images")
    if recipe.source == "white_box" and white_box is None:
        raise ValueError("recipe source 'white_box' needs the teachers' (apply, params)")
    cfg = recipe.inversion_config(base)
    invert = None
    if recipe.source in ("zo", "white_box"):
        invert = _group_inverter(recipe, apis, cfg, nz=nz, ngf=ngf, mean=mean, std=std,
                                 image_size=image_size,
                                 teacher_fn=white_box[0][0] if recipe.source == "white_box" else None)
    out = []
    for i, (api, key) in enumerate(zip(apis, keys)):
        before = api.queries
        k = api.num_classes
        shape = (image_size, image_size, api.input_shape[-1])
        targets = np.tile(np.arange(k), cfg.per_class)
        if recipe.source == "real":
            n = min(cfg.per_class, real_images[i].shape[1])
            targets = np.tile(np.arange(k), n)
            images = np.asarray(real_images[i][:, :n]).transpose(1, 0, 2, 3, 4).reshape((-1,) + shape)
        elif recipe.source == "noise":
            images = np.asarray(jax.random.uniform(key, (len(targets),) + shape))
        else:
            images = invert(i, key, None if white_box is None or recipe.source != "white_box"
                            else white_box[i][1])
        with api.reserve(len(images)), surface_api_errors():
            probs = teacher_probs(api(normalize(jnp.asarray(images), mean, std)), api.output, k)
        out.append(RecoveredSet(images, targets, np.asarray(probs), api.queries - before))
    return out


def _group_inverter(recipe: Recipe, apis, cfg: InversionConfig, *, nz, ngf, mean, std,
                    image_size, teacher_fn):
    """``(i, key, teacher_params) -> images`` of API ``i``; one compile per group of APIs."""
    groups, locate = group_apis(apis)
    gen = _gen(recipe.generator, nz, ngf, image_size, apis[0].input_shape[-1],
               recipe.generator_options)
    nz = dict(recipe.generator_options).get("nz", nz)
    invs = [make_inverter(g, gen.apply_batchstats, nz=nz, cfg=cfg, mean=mean, std=std,
                          image_size=image_size, teacher_fn=teacher_fn) for g in groups]

    def invert(i, key, teacher_params):
        g, m = locate[i]
        cost = inversion_queries(cfg, apis[i].num_classes, white_box=teacher_fn is not None)
        k_gen, k_inv = jax.random.split(key)
        with apis[i].reserve(cost), surface_api_errors():
            res = invs[g](k_inv, m, gen.init(k_gen)[0], groups[g].operand, None, teacher_params)
        return np.asarray(res.images)
    return invert


def recover_set(recipe: Recipe, api, key: jax.Array, *, real_images: Optional[np.ndarray] = None,
                white_box: Optional[Tuple[Callable, Any]] = None, **kw) -> RecoveredSet:
    """:func:`recover_sets` for one API (``real_images`` / ``white_box`` of that API)."""
    return recover_sets(recipe, [api], key[None], real_images=None if real_images is None
                        else [real_images], white_box=None if white_box is None else [white_box],
                        **kw)[0]


def _soft(probs: jax.Array, temperature: float) -> jax.Array:
    """Teacher probabilities sharpened/softened to temperature ``T``: softmax(log p / T)."""
    return jax.nn.softmax(jnp.log(jnp.clip(probs, 1e-8, None)) / temperature, axis=-1)


def kd_student(apply_fn: Callable, params, x: jax.Array, probs: jax.Array, key: jax.Array, *,
               steps: int, lr: float, batch: int, temperature: float):
    """Distils a student from fixed (image, teacher probability) pairs with Adam.

    Loss: ``T^2 * KL(softmax(log p / T) || softmax(s / T))`` on random minibatches (one
    ``lax.scan`` of ``steps``).

    Args:
      apply_fn: ``(params, x) -> logits``.
      params: initial student parameters.
      x: (n, H, W, C) normalised inputs.
      probs: (n, K) teacher probabilities (zeros for classes the teacher does not own).
      key: PRNG key of the minibatch draws.
      steps, lr, batch, temperature: optimisation settings.

    Returns:
      The trained parameters.
    """
    tx = optax.adam(lr)
    target = _soft(probs, temperature) * (probs > 0)
    target = target / jnp.sum(target, -1, keepdims=True)
    batch = min(batch, x.shape[0])

    def loss(p, xb, tb):
        logp = jax.nn.log_softmax(apply_fn(p, xb) / temperature, -1)
        return temperature ** 2 * jnp.mean(jnp.sum(jax.scipy.special.xlogy(tb, tb) - tb * logp, -1))

    def step(carry, k):
        p, o = carry
        idx = jax.random.choice(k, x.shape[0], (batch,), replace=False)
        g = jax.grad(loss)(p, x[idx], target[idx])
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
    return params


_kd_student = jax.jit(kd_student, static_argnames=("apply_fn", "steps", "lr", "batch",
                                                   "temperature"))


@functools.lru_cache(maxsize=8)
def _student_model(num_classes: int, shape: tuple, width: int):
    """One functional Conv4 per signature, so its jitted training compiles once."""
    return functional(create_model("conv4", num_classes=num_classes, input_shape=shape,
                                   rngs_or_key=0, width=width))


def _student(num_classes: int, shape, width: int, seed: int):
    """``(functional model, freshly initialised parameters)`` of a Conv4 student."""
    fm = _student_model(num_classes, tuple(int(v) for v in shape), width)
    return fm, fm.init(jax.random.key(seed))[0]


@functools.partial(jax.jit, static_argnums=0)
def _accuracy(apply_fn, params, x, y):
    return 100.0 * jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y)


def within_task_probe(sets: Sequence[RecoveredSet], heldout: Sequence[Tuple[np.ndarray, np.ndarray]],
                      cfg: ProbeConfig, mean, std) -> Dict[str, Any]:
    """Per API: a fresh Conv4 distilled on its recovered set, scored on its held-out real images.

    Args:
      sets: one :class:`RecoveredSet` per API.
      heldout: per API, ``(images (n, H, W, C) in [0, 1], labels (n,) output indices)``.
      cfg: :class:`ProbeConfig`.
      mean, std: input normalisation.

    Returns:
      ``{"mean": %, "per_api": [%...], "target_agreement": %}`` where target agreement is the
      fraction of recovered images the API assigns to their target (how class-conditional the
      recovery is).
    """
    accs, agree = [], []
    for i, (s, (hx, hy)) in enumerate(zip(sets, heldout)):
        st, p0 = _student(s.probs.shape[-1], s.images.shape[1:], cfg.student_width, cfg.seed + i)
        p = _kd_student(st.apply_batchstats, p0, normalize(jnp.asarray(s.images), mean, std),
                        jnp.asarray(s.probs), jax.random.key(cfg.seed + 100 + i),
                        steps=cfg.within_steps, lr=cfg.kd_lr, batch=cfg.kd_batch,
                        temperature=cfg.temperature)
        accs.append(float(_accuracy(st.apply_batchstats, p, normalize(jnp.asarray(hx), mean, std),
                                    jnp.asarray(hy))))
        agree.append(100.0 * float(np.mean(np.argmax(s.probs, -1) == s.targets)))
    return {"mean": float(np.mean(accs)), "per_api": accs, "target_agreement": float(np.mean(agree))}


def _union_targets(sets: Sequence[RecoveredSet], classes: Sequence[Sequence[int]]):
    """Stacks the sets; each API's probabilities are placed at its classes' positions in the
    union of classes (a class owned by two APIs is one output)."""
    union = sorted({int(c) for cl in classes for c in cl})
    pos = {c: j for j, c in enumerate(union)}
    xs, ps = [], []
    for s, cl in zip(sets, classes):
        full = np.zeros((len(s.probs), len(union)), np.float32)
        full[:, [pos[int(c)] for c in cl]] = s.probs
        xs.append(s.images)
        ps.append(full)
    return np.concatenate(xs), np.concatenate(ps), union


def with_head(params, head_params, head: str = "classifier"):
    """``params`` with the leaves under ``head`` taken from ``head_params`` (same structure)."""
    def pick(path, a, b):
        return b if jax.tree_util.keystr(path[:1]).find(head) >= 0 else a
    return jax.tree_util.tree_map_with_path(pick, params, head_params)


class FewShotEval(NamedTuple):
    """Validation tasks for the transfer score and separate ones for choosing the lr."""
    tasks: tuple
    lr_tasks: tuple


def few_shot_eval(val_split: ClassDataset, cfg: ProbeConfig, mean, std) -> FewShotEval:
    """Fixed meta-validation tasks (normalised): scoring tasks and lr-selection tasks."""
    ts = Taskset(val_split, cfg.ways, cfg.shots, cfg.query)
    key = jax.random.key(cfg.seed + 12345)

    def tasks(k, n):
        t = ts.sample(k, n)
        return (normalize(t.support_x, mean, std), t.support_y, normalize(t.query_x, mean, std),
                t.query_y)
    return FewShotEval(tasks(key, cfg.val_tasks), tasks(jax.random.fold_in(key, 1),
                                                         cfg.lr_select_tasks))


def transfer_score(apply_fn: Callable, params, ev: FewShotEval, cfg: ProbeConfig) -> Dict[str, Any]:
    """Accuracy (mean, 95% CI) on the scoring tasks at the lr chosen on the lr-selection tasks."""
    lr, _ = select_finetune_lr(apply_fn, params, *ev.lr_tasks, lrs=cfg.finetune_lrs,
                               steps=cfg.finetune_steps, batch_size=25)
    r = evaluate_tasks(apply_fn, params, *ev.tasks, steps=cfg.finetune_steps, lr=lr, batch_size=25)
    return {"acc": r.mean, "ci95": r.ci95, "lr": lr}


def pool_probe(sets: Sequence[RecoveredSet], classes: Sequence[Sequence[int]], meta, ev: FewShotEval,
               cfg: ProbeConfig, mean, std) -> Dict[str, Any]:
    """ONE student distilled on all sets (union of classes), body transferred to new classes.

    Args:
      sets: the probed APIs' :class:`RecoveredSet` s.
      classes: per API, the absolute class of each output (to merge shared classes).
      meta: the meta-model's functional view (its random head is the fresh 5-way head).
      ev: :class:`FewShotEval` on meta-validation classes.
      cfg: :class:`ProbeConfig`.
      mean, std: input normalisation.

    Returns:
      :func:`transfer_score` of the transferred body, plus ``"union_classes"``.
    """
    x, p, union = _union_targets(sets, classes)
    st, p0 = _student(len(union), x.shape[1:], cfg.student_width, cfg.seed)
    params = _kd_student(st.apply_batchstats, p0, normalize(jnp.asarray(x), mean, std),
                         jnp.asarray(p), jax.random.key(cfg.seed + 7), steps=cfg.pool_steps,
                         lr=cfg.kd_lr, batch=cfg.kd_batch, temperature=cfg.temperature)
    body = with_head(params, meta.params) if _same_body(params, meta.params) else None
    if body is None:
        raise ValueError("pool probe: the student's body does not match the meta-model's "
                         "(set ProbeConfig.student_width to the meta-model's width)")
    return {**transfer_score(meta.apply_batchstats, body, ev, cfg), "union_classes": len(union)}


def _same_body(a, b) -> bool:
    sa = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(a)}
    sb = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(b)}
    return sa.keys() == sb.keys() and all(sa[k] == sb[k] for k in sa if "classifier" not in k)


def replay_probe(sets: Sequence[RecoveredSet], meta, ev: FewShotEval, cfg: ProbeConfig, mean,
                 std, *, progress: bool = False) -> Dict[str, Any]:
    """MAML (second order, the loop's replay step) on tasks drawn from the recovered images only.

    Each (API, target) pair is a class holding the images aimed at it. The model is selected on
    ``ev.tasks`` (the initial parameters included); scored at the loop's fine-tuning lr
    (``cfg.inner_lr``). With ``cfg.meta_init_scale`` the meta-model starts from its random init
    with every kernel scaled (as the ``random_scaled`` baseline).

    Returns:
      ``{"acc": best validation %, "history": [...]}``.
    """
    per = min(int(np.sum(s.targets == t)) for s in sets for t in np.unique(s.targets))
    if per < cfg.shots + cfg.query:
        raise ValueError(f"replay probe: {per} images per recovered class cannot fill tasks of "
                         f"shots+query={cfg.shots + cfg.query}; recover more images per class")
    imgs = np.stack([s.images[s.targets == t][:per] for s in sets for t in np.unique(s.targets)])
    ds = ClassDataset(np.asarray(normalize(jnp.asarray(imgs), mean, std)),
                      [str(i) for i in range(len(imgs))], name="recovered")
    ts = Taskset(ds, cfg.ways, cfg.shots, cfg.query)

    def real(k):
        t = ts.sample(k, cfg.replay_meta_batch)
        return (t.support_x, t.support_y, t.query_x, t.query_y)

    lc = BiDfMKDConfig(ways=cfg.ways, shots=cfg.shots, query=cfg.query,
                       meta_iterations=cfg.replay_iterations, meta_batch=cfg.replay_meta_batch,
                       outer_lr=cfg.outer_lr, inner_lr=cfg.inner_lr,
                       replay_inner_steps=cfg.replay_inner_steps, replay_source="real",
                       eval_every=max(1, cfg.replay_iterations // 3), val_tasks=len(ev.tasks[0]),
                       finetune_steps=cfg.finetune_steps, seed=cfg.seed)
    # the tasks are normalised already: the loop's identity normalisation (no pool) keeps them
    init = meta.params if cfg.meta_init_scale is None else scale_kernels(
        meta.params, cfg.meta_init_scale)[0]
    res = train_bidf_mkd(lc, meta_apply=meta.apply_batchstats, meta_init_params=init,
                         gen_init=None, gen_apply=None, pool=None, val_tasks=ev.tasks,
                         real_tasks=real, progress=progress)
    evals = [h for h in res.history if h.get("event") == "eval"]
    return {"acc": max(h["val_acc"] for h in evals), "history": evals}


def reference_rows(meta, ev: FewShotEval, cfg: ProbeConfig, *,
                   white_box_params: Optional[Sequence[Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Random init, Random with kernels scaled by ``1/sqrt(num_apis)``, and (white-box) the
    Average of the probed teachers' weights, under the pool probe's fine-tuning protocol."""
    rows = {"random": transfer_score(meta.apply_batchstats, meta.params, ev, cfg),
            "random_scaled": transfer_score(
                meta.apply_batchstats, scale_kernels(meta.params, 1.0 / math.sqrt(cfg.num_apis))[0],
                ev, cfg)}
    if white_box_params:
        ok = [p for p in white_box_params if _same_body(p, meta.params) and
              jax.tree.structure(p) == jax.tree.structure(meta.params)]
        if ok:
            avg = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *ok)
            rows["average"] = transfer_score(meta.apply_batchstats, avg, ev, cfg)
    return rows


def json_ready(tree):
    """``tree`` as it reads back from JSON (tuples become lists), for comparisons on resume."""
    return json.loads(json.dumps(tree, default=float))


def _api_real_images(split: ClassDataset, record: Dict[str, Any]):
    """The API's own (training, held-out) real images by its output order: ``(K, n, ...)`` each."""
    imgs = split.images_of(record["classes"])
    n_tr = int(record["num_train"]) // len(record["classes"])
    return imgs[:, :n_tr], imgs[:, n_tr:]


def run_probe(recipes: Dict[str, Recipe], *, pool, train_split: ClassDataset,
              val_split: ClassDataset, meta, cfg: ProbeConfig, base: InversionConfig, nz: int,
              ngf: int, white_box: Optional[Sequence[Tuple[Callable, Any]]] = None,
              progress: bool = True, done: Optional[Dict[str, Any]] = None,
              on_recipe: Optional[Callable[[Dict[str, Any], Dict[str, np.ndarray]], None]] = None
              ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """All three probes for every recipe, and the reference rows, on the pool's first APIs.

    Args:
      recipes: name -> :class:`Recipe`.
      pool: a loaded :class:`~dfml_jax.api.APIPool` (records with classes and ``num_train``).
      train_split, val_split: the meta-train split the pool was trained on and the
        meta-validation split (new classes).
      meta: the meta-model's functional view (its width must equal ``cfg.student_width``).
      cfg: :class:`ProbeConfig`.
      base: the base :class:`.InversionConfig` the recipes override.
      nz, ngf: generator sizes.
      white_box: per API ``(apply, {"params", "state"})`` for white-box recipes and the Average
        row; None: those are skipped.
      progress: print one line per recipe.
      done: results of an earlier, interrupted call with the same settings: its recipes are
        kept, not recomputed (resume).
      on_recipe: called with ``(results, grids)`` after every recipe (e.g. to save them).

    Returns:
      ``(results, grids)``: results is JSON-ready (``references``, ``recipes[name]`` with
      ``within_task``, ``pool_level``, ``replay_maml``, ``queries_per_api``, ``mean_intensity``,
      ``wall_s``); grids maps a recipe name (and ``"real"``) to the first API's images.
    """
    n = min(cfg.num_apis, len(pool.apis))
    mean, std = pool.mean, pool.std
    records = pool.records[:n]
    real = [_api_real_images(train_split, r) for r in records]
    heldout = [(ho.reshape((-1,) + ho.shape[2:]), np.repeat(np.arange(ho.shape[0]), ho.shape[1]))
               for _, ho in real]
    ev = few_shot_eval(val_split, cfg, mean, std)
    wb_params = [p["params"] for _, p in white_box[:n]] if white_box else None
    if done and done.get("config") == json_ready(dataclasses.asdict(cfg)):
        results = done
    else:
        results = {"references": reference_rows(meta, ev, cfg, white_box_params=wb_params),
                   "recipes": {}, "num_apis": n, "config": json_ready(dataclasses.asdict(cfg))}
    grids = {"real (API 0)": real[0][0][:, :4].transpose(1, 0, 2, 3, 4).reshape(
        (-1,) + real[0][0].shape[2:])}
    for name, recipe in recipes.items():
        if (recipe.source == "white_box" and not white_box) or name in results["recipes"]:
            continue
        t0 = time.time()
        sets = recover_sets(recipe, pool.apis[:n], jax.random.split(jax.random.key(cfg.seed + 1), n),
                            base=base, nz=nz, ngf=ngf, mean=mean, std=std,
                            image_size=pool.image_size, real_images=[r[0] for r in real],
                            white_box=white_box[:n] if white_box else None)
        t_rec = time.time() - t0
        row = {"recipe": dataclasses.asdict(recipe),
               "queries_per_api": float(np.mean([s.queries for s in sets])),
               "mean_intensity": float(np.mean([s.images.mean() for s in sets])),
               "within_task": within_task_probe(sets, heldout, cfg, mean, std),
               "pool_level": pool_probe(sets, pool.classes[:n], meta, ev, cfg, mean, std),
               "replay_maml": replay_probe(sets, meta, ev, cfg, mean, std),
               "recovery_s": round(t_rec, 1), "wall_s": round(time.time() - t0, 1)}
        results["recipes"][name] = row
        grids[name] = sets[0].images[:4 * pool.apis[0].num_classes]
        if on_recipe is not None:
            on_recipe(results, grids)
        if progress:
            print(f"[probe] {name}: within {row['within_task']['mean']:.1f}%  pool-level "
                  f"{row['pool_level']['acc']:.1f}%  replay {row['replay_maml']['acc']:.1f}%  "
                  f"({row['queries_per_api']:.0f} queries/API, {row['wall_s']:.0f} s)", flush=True)
    return results, grids
