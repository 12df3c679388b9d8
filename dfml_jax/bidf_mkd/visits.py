"""API visits of the BiDf-MKD loop: invert, query, adapt, store (spec ``bidf_mkd.md`` section 6).

A visit to an API recovers a support set by zeroth-order inversion, asks the API for its soft
labels, adapts the meta-model on it (once the boundary term is on: iteration
``>= cfg.boundary_start``), recovers a query set against the adapted model, asks the API again,
and writes both recovered sets into the memory. It is charged in advance (``api.reserve``) with
its exact query cost. :class:`ApiVisits` holds what the visits share over a run: the pool's API
groups, their compiled inverters, their (mesh-replicated) operands and sharded askers.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dfml_jax.api import group_apis, surface_api_errors
from dfml_jax.losses import teacher_probs
from dfml_jax.memory import MemoryState, row_of_classes, write
from dfml_jax.parallel import replicate, sharded_group_query
from dfml_jax.training.augment import batch_shared_augment

from .inversion import InversionConfig, inversion_queries, make_inverter
from .metastep import KDTask

__all__ = ["ApiVisits", "store_recovered"]


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _augment(x, k, pad, size, mean, std, flip=True):
    return batch_shared_augment(x, k, pad=pad, flip=flip, out_size=size, mean=mean, std=std)


def store_recovered(mem: MemoryState, rows, res, probs, cfg):
    """Writes one recovered set (interleaved targets ``[0..K-1] * per_class``) into the memory,
    grouped by class; with ``cfg.memory_filter == "api_agree"`` only the images whose API answer
    ``probs`` (to the KD query of this set) has its maximum at the target are kept.

    Args:
      cfg: the loop's :class:`~dfml_jax.bidf_mkd.train.BiDfMKDConfig` (``inversion.per_class``,
        ``memory_filter``).

    Returns:
      ``(memory, fraction of the set kept)``.
    """
    k = probs.shape[-1]
    per_class = res.images.reshape((cfg.inversion.per_class, k) + res.images.shape[1:])
    keep = None
    if cfg.memory_filter == "api_agree":
        agree = jnp.argmax(probs, axis=-1) == res.targets
        keep = agree.reshape(cfg.inversion.per_class, k).T
    mem = write(mem, rows, jnp.swapaxes(per_class, 0, 1), keep)
    return mem, 1.0 if keep is None else float(jnp.mean(keep))


def _store_sets(mem: MemoryState, memory_classes, api_classes, sets, cfg, kept: List[float]):
    """Stores the recovered ``(result, probs)`` sets of one API, appending each kept fraction to
    ``kept``; returns the memory."""
    rows = jnp.asarray(row_of_classes(memory_classes, api_classes))
    for res, probs in sets:
        mem, k = store_recovered(mem, rows, res, probs, cfg)
        kept.append(k)
    return mem


class ApiVisits:
    """The API visits of one run, with the caches they share.

    Args:
      cfg: the loop's :class:`~dfml_jax.bidf_mkd.train.BiDfMKDConfig`.
      pool: the :class:`~dfml_jax.bidf_mkd.train.TeacherPool`.
      inv_cfg: the inversion's :class:`~dfml_jax.bidf_mkd.inversion.InversionConfig`
        (``cfg.inversion_config()``).
      gen_init, gen_apply: the generator's re-initialisation and forward pass.
      meta_apply: the meta-model's forward pass (the boundary term's student).
      steps: the run's :func:`~dfml_jax.bidf_mkd.metastep.cached_meta_steps` (``adapt_support``).
      mean, std: the input normalisation.
      memory_classes: the absolute class of each memory row.
      mesh: optional device mesh.
    """

    def __init__(self, cfg, pool, *, inv_cfg: InversionConfig, gen_init: Callable,
                 gen_apply: Callable, meta_apply: Callable, steps, mean, std, memory_classes,
                 mesh=None):
        self.cfg, self.pool, self.steps, self.mesh = cfg, pool, steps, mesh
        self.gen_init, self.gen_apply, self.meta_apply = gen_init, gen_apply, meta_apply
        self.mean, self.std, self.memory_classes = mean, std, memory_classes
        self.inv_cfg = inv_cfg
        self.groups, self.locate = group_apis(pool.apis)
        self._operands: Dict[int, Any] = {}
        self._inverters: Dict[tuple, Callable] = {}
        self._askers: Dict[int, Callable] = {}

    def operand(self, g: int):
        """Group ``g``'s operand (stacked in-graph teachers), replicated once on the mesh."""
        if self.mesh is None:
            return self.groups[g].operand
        if g not in self._operands:
            self._operands[g] = replicate(self.groups[g].operand, self.mesh)
        return self._operands[g]

    def _make_inverter(self, g: int, teacher_fn=None):
        return make_inverter(self.groups[g], self.gen_apply, nz=self.cfg.nz, cfg=self.inv_cfg,
                             mean=self.mean, std=self.std, image_size=self.pool.image_size,
                             student_apply=self.meta_apply, teacher_fn=teacher_fn, mesh=self.mesh,
                             shard=self.cfg.inv_shard)

    def inverter(self, i: int):
        """The compiled inversion serving API ``i`` (shared by its whole group), and its args."""
        g, m = self.locate[i]
        wb_fn, wb_params = self.pool.white_box_teachers[i] if self.cfg.white_box else (None, None)
        key = (g, id(wb_fn))
        if key not in self._inverters:
            self._inverters[key] = self._make_inverter(g, wb_fn)
        inv = self._inverters[key]
        return lambda k, student: inv(k, m, self.gen_init(jax.random.fold_in(k, 7)),
                                      self.operand(g), student, wb_params)

    def many_inverter(self, g: int, boundary: bool):
        """All picked members of group ``g`` inverted at once (vmapped over the API index)."""
        key = ("many", g, boundary)
        if key not in self._inverters:
            axes = (0, 0, 0, None) + ((0,) if boundary else ())
            self._inverters[key] = jax.jit(jax.vmap(self._make_inverter(g), in_axes=axes))
        return self._inverters[key]

    def aug(self, x, k):
        return _augment(x, k, self.cfg.inversion.pad, self.pool.image_size, tuple(self.mean),
                        tuple(self.std), self.cfg.flip)

    def ask(self, i: int, x):
        """API ``i``'s answer on ``x``: eager on one device; with a mesh, one host call per device
        shard (works across hosts)."""
        if self.mesh is None:
            return self.pool.apis[i](x)
        g, m = self.locate[i]
        if g not in self._askers:
            self._askers[g] = sharded_group_query(self.groups[g], self.mesh)
        return self._askers[g](m, x, self.operand(g))

    def probs(self, i: int, x):
        """API ``i``'s answer on ``x`` as probabilities."""
        api = self.pool.apis[i]
        return teacher_probs(self.ask(i, x), api.output, api.num_classes)

    def visit(self, params, memory: MemoryState, key, iteration: int
              ) -> Tuple[KDTask, MemoryState, dict]:
        """Visits ``cfg.apis_per_visit`` APIs at meta-iteration ``iteration``.

        Returns:
          ``(KD task(s), memory with the recovered sets, info record)``.
        """
        if self.cfg.apis_per_visit == 1:
            return self.visit_one(params, memory, key, iteration)
        return self.visit_many(params, memory, key, iteration)

    def visit_one(self, params, memory: MemoryState, key, iteration: int) -> tuple:
        """Visits one API: support inversion, adaptation, boundary query inversion, memory write."""
        cfg = self.cfg
        k_pick, k_s, k_sa, k_q, k_qa = jax.random.split(key, 5)
        i = int(jax.random.randint(k_pick, (), 0, len(self.pool.apis)))
        api = self.pool.apis[i]
        b = api.num_classes * cfg.inversion.per_class
        cost = 2 * (inversion_queries(self.inv_cfg, api.num_classes, cfg.white_box) + b)
        inv = self.inverter(i)
        with api.reserve(cost), surface_api_errors():
            s = inv(k_s, None)
            s_aug = self.aug(s.images, k_sa)
            s_p = self.probs(i, s_aug)
            boundary = iteration >= cfg.boundary_start
            fast = self.steps.adapt_support(params, s_aug, s_p) if boundary else None
            qr = inv(k_q, fast)
            q_aug = self.aug(qr.images, k_qa)
            q_p = self.probs(i, q_aug)
            jax.block_until_ready((s, qr, s_p, q_p))  # the ledger is exact once results exist
        kept: List[float] = []
        new_mem = _store_sets(memory, self.memory_classes, self.pool.classes[i],
                              ((s, s_p), (qr, q_p)), cfg, kept)  # both sets go to the memory
        info = {"api": i, "support_ce": float(s.clean_ce[-1]), "support_api_acc": float(s.api_acc[-1]),
                "query_api_acc": float(qr.api_acc[-1]), "boundary": bool(boundary),
                "zero_diff_frac": float(s.zero_fraction.mean()), "memory_kept": float(np.mean(kept))}
        return KDTask(s_aug, s_p, q_aug, q_p, qr.targets), new_mem, info

    def _new_gens(self, ks):
        return jax.vmap(lambda k: self.gen_init(jax.random.fold_in(k, 7)))(ks)

    def _invert_group(self, params, g: int, members: List[int], keys: dict,
                      boundary: bool) -> Dict[int, dict]:
        """The recovered sets, augmentations and answers of the picked ``members`` of group
        ``g``: each inversion is ONE vmapped call over the API index."""
        idx = jnp.asarray([self.locate[i][1] for i in members], jnp.int32)
        ks = lambda j: jnp.stack([keys[i][j] for i in members])
        s = self.many_inverter(g, False)(ks(0), idx, self._new_gens(ks(0)), self.operand(g))
        parts: Dict[int, dict] = {}
        for n, i in enumerate(members):
            s_i = jax.tree.map(lambda a: a[n], s)
            s_aug = self.aug(s_i.images, keys[i][1])
            parts[i] = dict(s=s_i, s_aug=s_aug, s_p=self.probs(i, s_aug))
        if boundary:
            fast = jax.tree.map(lambda *a: jnp.stack(a), *[
                self.steps.adapt_support(params, parts[i]["s_aug"], parts[i]["s_p"])
                for i in members])
            qr = self.many_inverter(g, True)(ks(2), idx, self._new_gens(ks(2)), self.operand(g),
                                             fast)
        else:
            qr = self.many_inverter(g, False)(ks(2), idx, self._new_gens(ks(2)), self.operand(g))
        for n, i in enumerate(members):
            q_i = jax.tree.map(lambda a: a[n], qr)
            q_aug = self.aug(q_i.images, keys[i][3])
            parts[i].update(q=q_i, q_aug=q_aug, q_p=self.probs(i, q_aug))
        return parts

    def visit_many(self, params, memory: MemoryState, key, iteration: int) -> tuple:
        """Visits ``apis_per_visit`` distinct APIs at once: the inversions of the picked members
        of a group run as ONE vmapped call over the API index (each member answers and is
        charged for its own samples); every visited API adds one KD task to the meta-batch."""
        cfg, pool = self.cfg, self.pool
        k_pick, k_each = jax.random.split(key)
        picked = [int(i) for i in np.asarray(jax.random.choice(
            k_pick, len(pool.apis), (cfg.apis_per_visit,), replace=False))]
        keys = {i: jax.random.split(jax.random.fold_in(k_each, i), 4) for i in picked}
        boundary = iteration >= cfg.boundary_start
        by_group: Dict[int, list] = {}
        for i in picked:
            by_group.setdefault(self.locate[i][0], []).append(i)
        parts: Dict[int, dict] = {}
        with contextlib.ExitStack() as stack:
            for i in picked:
                api = pool.apis[i]
                b = api.num_classes * cfg.inversion.per_class
                stack.enter_context(api.reserve(
                    2 * (inversion_queries(self.inv_cfg, api.num_classes) + b)))
            stack.enter_context(surface_api_errors())
            for g, members in by_group.items():
                parts.update(self._invert_group(params, g, members, keys, boundary))
            jax.block_until_ready([(p["s_p"], p["q_p"], p["q"].images) for p in parts.values()])
        new_mem, kept = memory, []
        for i in picked:
            p = parts[i]
            new_mem = _store_sets(new_mem, self.memory_classes, pool.classes[i],
                                  ((p["s"], p["s_p"]), (p["q"], p["q_p"])), cfg, kept)
        return _many_task(parts, picked), new_mem, _many_info(parts, picked, boundary, kept)


def _many_task(parts: Dict[int, dict], picked: List[int]) -> KDTask:
    """The visited APIs' KD tasks stacked along a leading axis (in ``picked`` order)."""
    stacked = lambda name: jnp.stack([parts[i][name] for i in picked])
    return KDTask(stacked("s_aug"), stacked("s_p"), stacked("q_aug"), stacked("q_p"),
                  jnp.stack([parts[i]["q"].targets for i in picked]))


def _many_info(parts: Dict[int, dict], picked: List[int], boundary: bool,
               kept: List[float]) -> Dict[str, Any]:
    """The history record of a many-API visit (per-API lists, in ``picked`` order)."""
    return {"api": picked, "support_ce": [float(parts[i]["s"].clean_ce[-1]) for i in picked],
            "support_api_acc": [float(parts[i]["s"].api_acc[-1]) for i in picked],
            "query_api_acc": [float(parts[i]["q"].api_acc[-1]) for i in picked],
            "boundary": bool(boundary),
            "zero_diff_frac": float(np.mean([float(parts[i]["s"].zero_fraction.mean())
                                             for i in picked])),
            "memory_kept": float(np.mean(kept))}
