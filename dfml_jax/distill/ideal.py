"""IDEAL: query-efficient data-free distillation from a hard-label black box (Zhang et al., ICLR 2023).

Every round (``shared/specs/ideal_dfme.md`` sections 3.2-3.4):

1. **Generate, no queries.** Re-initialise the generator, train it for ``g_steps`` Adam steps
   against the *student* (frozen, BatchNorm in eval mode) on
   ``CE(S(aug(G(z))), y) + info_weight * L_info`` with fixed class-balanced targets
   ``y_i = i mod K`` and one fixed latent batch; keep the lowest-loss batch (loss measured before
   the step, image kept un-augmented). One round's generation is ONE jitted ``lax.scan``
   (:func:`make_generation_phase`); it never sees the teacher.
2. **Query once.** The teacher's top-1 labels of the ``B`` new images are bought through the
   black-box API (``api.reserve(B)`` first: the budget is checked before any work) and stored in
   the label cache (:class:`~dfml_jax.distill.common.PoolStore`). The paper's accounting,
   ``Q = B * E``; a sample is never queried again (the released code re-queries the augmented pool
   every epoch, ``B * E(E+1)/2`` queries: not reproduced).
3. **Distil.** One shuffled pass of SGD (0.01, momentum 0.9, wd 5e-4, constant) with cross-entropy
   on the cached labels over the whole pool.

``L_info`` (``info_loss``): ``"per_sample"`` is the released code's ``mean_{i,k} p_ik log p_ik``
(raises every sample's entropy); ``"class_balance"`` is the DAFL-style batch-mean form
``sum_k pbar_k log pbar_k`` that later papers attribute to IDEAL; ``"none"`` drops it.

The same runner with ``synth="noise"`` is the NaiveKD baseline (uniform-noise images labelled by
the teacher; :mod:`dfml_jax.distill.naive`).

Example (tiny, CPU):
  >>> from dfml_jax.distill import IDEALConfig, run_pool_distillation   # doctest: +SKIP
  >>> res = run_pool_distillation(api, student_fm, IDEALConfig(batch_size=20, g_steps=3),
  ...                             seed=0, evaluator=ev)                 # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from dfml_jax.api import BlackBoxAPI
from dfml_jax.distill.balance import with_floor_images
from dfml_jax.distill.common import (AUGMENTATIONS, POOL_LOSSES, Evaluator, PoolStore,
                                     StudentState, accuracy_point, config_dict, dequantize,
                                     init_student, make_generator, make_pool_pass, torch_sgd,
                                     uncommitted)
from dfml_jax.distill.consolidate import make_consolidation
from dfml_jax.distill.generation import (GEN_HEADS, GENERATORS, INFO_LOSSES, NOISES,
                                         SELECT_SCORES, SELECTS, TARGETS, make_generation_phase,
                                         noise_images, uncertain_noise_images)
from dfml_jax.losses import teacher_probs
from dfml_jax.training.run_loop import EvalAt, Method, RunOutcome, run

__all__ = ["IDEALConfig", "IDEALState", "ideal_method", "run_pool_distillation", "PoolRunResult"]


@dataclasses.dataclass(frozen=True)
class IDEALConfig:
    """Hyper-parameters of IDEAL and of NaiveKD (``synth="noise"``), one round at a time.

    A round generates ``batch_size`` images against the student (no query), buys the teacher's
    answers to them once, then distils the student on the pool bought so far (module docstring).
    The defaults are the released code's (``shared/specs/ideal_dfme.md`` section 3.7); fields
    marked "a departure" are this library's additions, off by default. Each field is documented
    where it is declared; :meth:`validate` checks a config against the number of classes.

    >>> cfg = IDEALConfig(batch_size=20, g_steps=3)
    >>> cfg.validate(num_classes=10)
    >>> (cfg.batch_size, cfg.lr_s, cfg.distill_augment)
    (20, 0.01, 'flip')
    """

    #: B: new synthetic samples per round (queries per round) and the distillation minibatch.
    #: Must be a multiple of K with balanced targets.
    batch_size: int = 250
    #: E: number of rounds; None: until the API's budget cannot buy another round.
    rounds: Optional[int] = None
    #: Rounds after which no new samples are generated (400 in the code); later rounds only
    #: re-train on the pool. None: never stop.
    stop_gen: Optional[int] = None
    #: Generator Adam steps per round (30; the code's CIFAR-10 example uses 5).
    g_steps: int = 30
    #: Generator Adam learning rate (1e-3).
    lr_g: float = 1e-3
    #: Generator Adam betas ((0.5, 0.999)).
    betas_g: tuple = (0.5, 0.999)
    #: The generator (a departure when not ``"dcgan"``; one of
    #: :data:`~dfml_jax.distill.common.GENERATORS`): ``"dcgan"`` (the paper's) or ``"strokes"``: the parametric pen-stroke renderer of
    #: :mod:`dfml_jax.models.strokes` (latent ``nz`` -> ``num_strokes`` quadratic Bezier strokes
    #: through a learnable linear map, white on black), an image prior for line-drawing domains
    #: such as digits: every image it makes, before and after the generator's Adam steps, is a
    #: drawing (``docs/ideal_diagnosis.md`` section 12). ``gen_head``, ``gen_bias`` and ``ngf``
    #: shape the DCGAN only.
    generator: str = "dcgan"
    #: Strokes per image of the ``"strokes"`` generator and of ``noise="strokes"``.
    num_strokes: int = 3
    #: Generator latent size (256).
    nz: int = 256
    #: Generator width (64).
    ngf: int = 64
    #: ``"sigmoid"`` (IDEAL's ``Generator_2``) or ``"bn_sigmoid"`` (a final BN(affine=False)
    #: before the sigmoid, as in DFME's generator; spec section 10).
    gen_head: str = "sigmoid"
    #: A fixed offset added before the final sigmoid (0: the code). Negative values make dark
    #: images (``bn_sigmoid`` with -2: pixels ~ sigmoid(N(-2, 1)), mean ~0.16, close to MNIST's
    #: 0.13); bright images such as U[0,1] noise are answered "1" by a digit teacher
    #: (``docs/ideal_diagnosis.md``).
    gen_bias: float = 0.0
    #: One of :data:`~dfml_jax.distill.generation.INFO_LOSSES` (see the module docstring).
    info_loss: str = "per_sample"
    #: Weight of ``L_info`` (5 in the code, DAFL's beta).
    info_weight: float = 5.0
    #: ``"balanced"`` (``i mod K``, the code), ``"random"`` (uniform class draws) or
    #: ``"pool_balancing"`` (a departure: the round's B targets are split over the classes in
    #: inverse proportion to ``count_k + B/K``, where ``count_k`` is how often the teacher has
    #: answered class k on the pool so far (already paid for, no extra query): the generator aims
    #: more often at the classes the pool lacks; see
    #: :func:`~dfml_jax.distill.balance.pool_balancing_targets`).
    targets: str = "balanced"
    #: Which generated images are bought each round. ``"best"``: the lowest-loss batch (the
    #: code). ``"balanced"`` (a departure): the candidates are the batches of all ``g_steps``
    #: generator steps (``g_steps * B`` images, no query); the student (eval mode) predicts each,
    #: every class k gets a quota of the B purchases in inverse proportion to the teacher's
    #: answers of class k in the pool so far, filled by the candidates the student assigns to k
    #: with the highest ``select_score``; unfilled quotas go to the best-scoring remaining
    #: candidates (:func:`~dfml_jax.distill.balance.balanced_selection`). The teacher still
    #: answers each bought image once.
    select: str = "best"
    #: Ranking within a class for ``select="balanced"``: ``"confidence"`` (the student's top
    #: probability: most likely to be answered that class) or ``"entropy"`` (the student's
    #: uncertainty: where a label teaches most).
    select_score: str = "confidence"
    #: A departure (0: from the first round): ``select`` applies once the pool holds this many
    #: bought samples; before, the round buys the lowest-loss batch (``"best"``). The student's
    #: scores mean little while it agrees with the teacher on few images.
    select_after: int = 0
    #: A departure (0: off): with ``select="balanced"``, a candidate within this root-mean-square
    #: pixel distance of a better-scoring candidate is bought only when nothing else is left
    #: (:func:`~dfml_jax.distill.balance.near_duplicates`): an uncertainty score ranks a cluster
    #: of near-identical images alike, and the teacher would be paid for the same answer again.
    select_min_dist: float = 0.0
    #: A departure (0: off): with ``select="balanced"``, a candidate whose pixel range (max - min)
    #: is below this is bought only when nothing else is left: the generator can collapse latents
    #: to blank images, which the student is unsure of and the teacher answers alike
    #: (``docs/ideal_diagnosis.md`` section 11).
    select_min_contrast: float = 0.0
    #: Augmentation of the generated batch before the student (kornia crop(pad 4) + flip in the
    #: code: ``"crop_flip"``).
    gen_augment: str = "crop_flip"
    #: ``"generator"`` (IDEAL) or ``"noise"`` (NaiveKD: noise images).
    synth: str = "generator"
    #: NaiveKD's noise: ``"uniform"`` (U[0, 1], the spec's baseline), ``"gauss"``
    #: (``clip(noise_mean + noise_std * N(0, 1), 0, 1)``: a standard normal in the teacher's
    #: normalised input space, the field's NaiveKD (``torch.randn`` fed to a normalising
    #: teacher); the defaults are MNIST's normalisation constants) or ``"strokes"`` (random
    #: drawings of ``num_strokes`` pen strokes: the stroke prior without IDEAL's generator
    #: training, an ablation of ``generator="strokes"``).
    noise: str = "uniform"
    #: Mean of ``"gauss"`` noise (0.1307).
    noise_mean: float = 0.1307
    #: Standard deviation of ``"gauss"`` noise (0.3081).
    noise_std: float = 0.3081
    #: A departure (0: off, the paper): this share of each IDEAL round's ``B`` images are noise
    #: images (``noise``, as NaiveKD draws them) instead of generated ones; each is queried once
    #: like the rest. The generator's images carry the classes the proxy reaches; noise labels
    #: cover the teacher's function elsewhere (``docs/ideal_diagnosis.md`` section 10).
    noise_share: float = 0.0
    #: Noise candidates drawn per noise image bought (1: random draws); above 1 the round keeps
    #: the candidates the student is least sure of (highest predictive entropy, no query;
    #: :func:`~dfml_jax.distill.generation.uncertain_noise_images`).
    noise_candidates: int = 1
    #: A departure (0: off, the paper): this share of each round's generator targets are two-class
    #: soft targets, ``w`` on the image's class and ``1 - w`` on a random other class with
    #: ``w ~ U(pair_weight)`` (:func:`~dfml_jax.distill.generation.pair_targets`): images on the
    #: proxy's decision boundary, where a teacher label teaches most. Each is queried once.
    pair_share: float = 0.0
    #: ``(low, high)`` range of the image's own class weight in a pair target.
    pair_weight: tuple = (0.5, 0.7)
    #: Student SGD learning rate (0.01, constant).
    lr_s: float = 0.01
    #: Student SGD momentum (0.9).
    momentum_s: float = 0.9
    #: Student SGD weight decay (5e-4).
    weight_decay_s: float = 5e-4
    #: Distillation minibatch (None: ``batch_size``).
    student_batch: Optional[int] = None
    #: The student's loss on the pool (:data:`~dfml_jax.distill.common.POOL_LOSSES`): ``"ce"``
    #: (the paper and the code), ``"balanced_ce"`` (inverse label-frequency weights) or
    #: ``"logit_adjusted"`` (the code's commented-out class-count-aware loss); the frequencies are
    #: those of the teacher's labels in the pool, recomputed every pass. Hard labels only.
    pool_loss: str = "ce"
    #: Augmentation of pool minibatches (the code: ``"flip"`` for MNIST/SVHN, ``"crop_flip"`` for
    #: CIFAR); pad of the crop is ``aug_pad``.
    distill_augment: str = "flip"
    #: Crop padding (4).
    aug_pad: int = 4
    #: Cap on the minibatches of one pool pass (None: the whole pool, the paper; a CPU-scaling
    #: knob otherwise).
    max_student_batches: Optional[int] = None
    #: At least this many minibatches per round (0: one pass, the paper); while the pool is small
    #: the student cycles through it, so the early student (the generator's proxy) learns from
    #: its few labels instead of taking one step a round.
    min_student_batches: int = 0
    #: A departure: every class should be at least this share of the pool of teacher answers (0:
    #: off). Each round, up to ``floor_share * batch_size`` of the round's images are replaced by
    #: mixtures of two pool images the TEACHER answered with a class below the floor (the first
    #: weighted ``floor_mix``, shifted by up to ``floor_shift`` px;
    #: :func:`~dfml_jax.distill.balance.class_floor_images`). They are queried like every other
    #: image (same round size, same budget); the teacher mostly answers them with that class,
    #: which lifts rare classes that the proxy-driven generator cannot reach.
    class_floor: float = 0.0
    #: The largest share of a round spent on class-floor images.
    floor_share: float = 0.2
    #: Largest shift of a class-floor image, in pixels (0: pure mixtures, which stay in the class
    #: for any teacher with convex class regions, e.g. a linear one).
    floor_shift: int = 0
    #: ``(low, high)`` range of the first image's weight in a class-floor mixture ((0.75, 0.95):
    #: close to one image the teacher answered with the class, but new).
    floor_mix: tuple = (0.75, 0.95)
    #: Cache the teacher's probabilities and distil with KL (needs a score API); the default
    #: (False) caches top-1 labels and uses cross-entropy (hard-label IDEAL).
    soft_labels: bool = False
    #: Store the pool as uint8 levels (the code's PNG round-trip); the teacher is queried on the
    #: quantised images.
    quantize: bool = True
    #: A departure (0: off, the paper): after the last round within each evaluation budget and
    #: after the last round, a copy of the student makes this many more passes over the pool
    #: bought so far (no query; lr from ``consolidate_lr`` decayed to 0 on a cosine;
    #: :mod:`dfml_jax.distill.consolidate`), evaluated every ``consolidate_eval_every`` passes;
    #: its points enter the curve (``phase="consolidate"``) at the same query count, so each
    #: budget's validation selection sees them. The online student (the generator's proxy) goes
    #: on unchanged.
    consolidate_passes: int = 0
    #: First-pass learning rate of the copy (None: ``lr_s``).
    consolidate_lr: Optional[float] = None
    #: Evaluate the copy every this many passes (and after the last).
    consolidate_eval_every: int = 2
    #: Augmentation of the copy's minibatches (``"crop"`` with pad ``consolidate_pad`` = 1:
    #: shifts of at most one pixel, labels kept; no query).
    consolidate_augment: str = "crop"
    #: Crop padding of the copy's augmentation.
    consolidate_pad: int = 1
    #: Evaluate (validation + test) every this many rounds; budget crossings and the last round
    #: are always evaluated.
    eval_every: int = 1
    #: Checkpoint the student every this many rounds (the pool and its labels are logged every
    #: round regardless, so a resume never re-buys a query).
    checkpoint_every: int = 1

    def validate(self, num_classes: int) -> None:
        if self.info_loss not in INFO_LOSSES:
            raise ValueError(f"info_loss must be one of {INFO_LOSSES}, got {self.info_loss!r}")
        if self.gen_head not in GEN_HEADS:
            raise ValueError(f"gen_head must be one of {GEN_HEADS}, got {self.gen_head!r}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.generator == "strokes" and (self.gen_head != "sigmoid" or self.gen_bias):
            raise ValueError(
                f"gen_head={self.gen_head!r} and gen_bias={self.gen_bias} shape the DCGAN's "
                "output; the strokes generator draws in [0, 1] itself: set ideal.gen_head=sigmoid and "
                "ideal.gen_bias=0 (or generator=dcgan)")
        if self.num_strokes < 1:
            raise ValueError(f"num_strokes must be >= 1, got {self.num_strokes}")
        if self.synth not in ("generator", "noise"):
            raise ValueError(f"synth must be 'generator' or 'noise', got {self.synth!r}")
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        if self.select_score not in SELECT_SCORES:
            raise ValueError(f"select_score must be one of {SELECT_SCORES}, "
                             f"got {self.select_score!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.noise_std <= 0:
            raise ValueError(f"noise_std must be positive, got {self.noise_std}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        for a in (self.gen_augment, self.distill_augment, self.consolidate_augment):
            if a not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {a!r}; valid: {sorted(AUGMENTATIONS)}")
        if self.synth == "generator" and self.targets == "balanced" and self.batch_size % num_classes:
            raise ValueError(
                f"IDEAL's class-balanced targets need batch_size to be a multiple of the number of "
                f"classes ({num_classes}); got batch_size={self.batch_size} (the released code "
                "crashes here too). Use e.g. batch_size="
                f"{max(num_classes, self.batch_size // num_classes * num_classes)} or targets='random'.")
        if not 0.0 <= self.noise_share < 1.0:
            raise ValueError(f"noise_share must be in [0, 1), got {self.noise_share} (for noise "
                             "only use synth='noise', NaiveKD)")
        if not 0.0 <= self.pair_share <= 1.0:
            raise ValueError(f"pair_share must be in [0, 1], got {self.pair_share}")
        lo, hi = self.pair_weight
        if not 0.5 <= lo <= hi <= 1.0:
            raise ValueError(f"pair_weight must be (low, high) with 0.5 <= low <= high <= 1 (the "
                             f"image's own class keeps the larger weight), got {self.pair_weight}")
        if self.select_min_dist < 0:
            raise ValueError(f"select_min_dist must be >= 0 (an RMS pixel distance), got "
                             f"{self.select_min_dist}")
        if not 0.0 <= self.select_min_contrast < 1.0:
            raise ValueError(f"select_min_contrast must be in [0, 1) (a pixel range), got "
                             f"{self.select_min_contrast}")
        if self.select_after < 0:
            raise ValueError(f"select_after must be >= 0 samples, got {self.select_after}")
        unused = [f for f in ("select_after", "select_min_dist", "select_min_contrast")
                  if getattr(self, f)]
        if self.select == "best" and unused:
            raise ValueError(f"{', '.join(unused)} only act with select='balanced' (this config has "
                             "select='best'): set ideal.select=balanced or drop them")
        if self.noise_candidates < 1:
            raise ValueError(f"noise_candidates must be >= 1, got {self.noise_candidates}")
        if self.pool_loss not in POOL_LOSSES:
            raise ValueError(f"pool_loss must be one of {POOL_LOSSES}, got {self.pool_loss!r}")
        if self.pool_loss != "ce" and self.soft_labels:
            raise ValueError(f"pool_loss={self.pool_loss!r} corrects hard-label cross-entropy; "
                             "use pool_loss='ce' with soft_labels=True")
        sb = self.student_batch or self.batch_size
        if sb > self.batch_size:
            raise ValueError(f"student_batch ({sb}) must not exceed batch_size ({self.batch_size})")
        if not 0.0 <= self.class_floor < 1.0 / num_classes:
            raise ValueError(f"class_floor must be in [0, 1/K) = [0, {1.0 / num_classes:.3f}), got "
                             f"{self.class_floor} (a floor of 1/K or more cannot hold for every "
                             "class)")
        if self.class_floor and not 0.0 < self.floor_share <= 0.5:
            raise ValueError(f"floor_share must be in (0, 0.5], got {self.floor_share}")
        if self.class_floor and self.soft_labels:
            raise ValueError("class_floor needs hard labels (the pool's classes); "
                             "use soft_labels=False")
        lo, hi = self.floor_mix
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"floor_mix must be (low, high) with 0 <= low <= high <= 1, got "
                             f"{self.floor_mix}")
        if self.floor_shift < 0:
            raise ValueError(f"floor_shift must be >= 0 pixels, got {self.floor_shift}")
        if self.min_student_batches < 0:
            raise ValueError(f"min_student_batches must be >= 0, got {self.min_student_batches}")
        if self.consolidate_passes < 0 or self.consolidate_eval_every < 1:
            raise ValueError(f"consolidate_passes must be >= 0 and consolidate_eval_every >= 1, "
                             f"got {self.consolidate_passes}, {self.consolidate_eval_every}")
        if self.stop_gen is not None and self.rounds is None:
            raise ValueError("stop_gen needs a finite number of rounds")


@dataclasses.dataclass
class PoolRunResult:
    """Outcome of :func:`run_pool_distillation`.

    Attributes:
      curve: evaluated points: dicts with round, queries, pool_size, val_acc, test_acc, the pool
        pass's mean loss, the generation phase's best loss, student steps, the class histogram
        of the teacher's labels in the pool, and ``student_teacher_agree``: the fraction of the
        round's new images on which the student (before learning from them) predicted the
        teacher's answer (hard labels; NaN for a resumed round).
      queries: samples charged by the API's ledger over the whole run (resumes included).
      rounds: rounds completed.
      stopped: why the run ended: ``"budget"``, ``"rounds"`` or ``"interrupted"`` (``max_rounds``).
      finished: False only when interrupted by ``max_rounds``.
      params, bn: the final student.
      class_histogram: counts of the teacher's labels in the pool.
      seconds: wall time of this call.
    """

    curve: List[Dict[str, Any]]
    queries: int
    rounds: int
    stopped: str
    finished: bool
    params: Any
    bn: Any
    class_histogram: List[int]
    seconds: float

    def summary(self) -> Dict[str, Any]:
        return {"curve": self.curve, "queries": self.queries, "rounds": self.rounds,
                "stopped": self.stopped, "finished": self.finished,
                "class_histogram": self.class_histogram, "seconds": self.seconds}


class IDEALState(NamedTuple):
    """IDEAL's (and NaiveKD's) state: the student and the pool of bought samples.

    Attributes:
      student: the :class:`~dfml_jax.distill.common.StudentState`.
      pool: the :class:`~dfml_jax.distill.common.PoolStore` (host-side; with a work directory
        every round's purchase is logged to disk the moment it is bought).
    """
    student: StudentState
    pool: PoolStore


def ideal_method(api: BlackBoxAPI, student_fm, cfg: IDEALConfig, *, seed: int = 0,
                 evaluator: Optional[Evaluator] = None, workdir: Optional[str] = None,
                 name: str = "IDEAL", generator: Any = None) -> Method:
    """IDEAL (``cfg.synth="generator"``) or NaiveKD (``"noise"``) as a run-loop method.

    A step is a round: generate (no query), buy the new images' labels once (replayed from the
    pool log if a killed run bought them already), one pass over the pool. Evaluation adds
    consolidation points at budget crossings (``cfg.consolidate_passes``).

    Args:
      api, student_fm, cfg, evaluator, name, generator: as :func:`run_pool_distillation`.
      seed: recorded in ``result.json`` (the run's key is :func:`run`'s).
      workdir: directory of the on-disk pool log (None: in memory).

    Returns:
      The :class:`~dfml_jax.training.run_loop.Method`.
    """
    k, b = api.num_classes, cfg.batch_size
    cfg.validate(k)
    if cfg.soft_labels:
        api.require_output(("probs", "logits"), f"{name} with soft labels")
    else:
        api.require_output(("label", "probs", "logits", "topk"), name)
    parts = _RunParts(student_fm, cfg, k, api.input_shape, generator)
    max_samples = _max_samples(api, cfg)

    def init(key):
        return IDEALState(init_student(student_fm, parts.tx, jax.random.fold_in(key, 0)),
                          _new_pool(cfg, k, api.input_shape, max_samples, workdir))

    def step(state: IDEALState, key, r: int):
        kgen, kpass = jax.random.split(key)
        pool, gen_loss, agree = state.pool, float("nan"), float("nan")
        if cfg.stop_gen is None or r < cfg.stop_gen:
            gen_loss, agree = _buy_round(api, parts, pool, state.student, r, kgen)
        student, loss, nsteps = parts.pool_pass(state.student, pool.x, pool.y,
                                                jnp.int32(pool.size), kpass)
        return state._replace(student=student), {
            "loss": float(loss), "gen_loss": gen_loss, "student_teacher_agree": agree,
            "student_steps": int(nsteps)}

    def step_cost(state: IDEALState, r: int) -> int:
        bought = (cfg.stop_gen is not None and r >= cfg.stop_gen) or state.pool.has_round(r)
        return 0 if bought else b

    def evaluate(state: IDEALState, at: EvalAt):
        pool = state.pool
        if at.kind == "end":
            fields = dict(pool_size=pool.size, loss=float("nan"), gen_loss=float("nan"),
                          student_steps=0)
        else:
            fields = dict(pool_size=pool.size, **at.metrics,
                          pool_histogram=pool.class_histogram(k))
        return state, [accuracy_point(evaluator, "round", at, state.student.params,
                                      state.student.bn, **fields)]

    def consolidate(state: IDEALState, at: EvalAt):
        """Points of a copy of the student trained further on the pool (no query)."""
        pool, key = state.pool, jax.random.fold_in(jax.random.split(at.key)[1], 3)
        return [accuracy_point(evaluator, "round", at, params, bn, pool_size=pool.size,
                               phase="consolidate", consolidate_passes=passes, loss=loss)
                for passes, params, bn, loss in parts.consolidate(
                    state.student, pool.x, pool.y, jnp.int32(pool.size), key)]

    def restore(state: IDEALState, saved):
        if saved is None:
            return state
        arrays, meta = saved
        state.pool.reload(meta["pool_rounds"])
        return state._replace(student=StudentState(*uncommitted(arrays)["student"]))

    return Method(
        name=name, init=init, step=step, restore=restore, step_cost=step_cost,
        checkpoint=lambda s: ({"student": s.student},
                              {"pool_rounds": s.pool.rounds, "config": config_dict(cfg)}),
        evaluate=evaluate if evaluator is not None else None,
        on_budget=consolidate if evaluator is not None and parts.consolidate else None,
        query_cost=b, num_steps=cfg.rounds, limit_reason="rounds", step_key="round",
        unit="round", eval_first=True, info={"config": config_dict(cfg), "seed": seed})


def run_pool_distillation(api: BlackBoxAPI, student_fm, cfg: IDEALConfig, *, seed: int,
                          evaluator: Optional[Evaluator] = None, workdir: Optional[str] = None,
                          max_rounds: Optional[int] = None, eval_budgets: Sequence[int] = (),
                          progress: bool = False, name: str = "IDEAL",
                          generator: Any = None) -> PoolRunResult:
    """Runs IDEAL (``cfg.synth="generator"``) or NaiveKD (``"noise"``) against one black-box API.

    Args:
      api: the teacher. Hard labels (``output="label"``) are enough; with ``cfg.soft_labels`` it
        must return scores. Its budget (if any) bounds the run: a round is bought only if the
        budget covers all of its ``B`` queries, otherwise the run stops cleanly.
      student_fm: the student's :class:`~dfml_jax.models.FunctionalModel` (initialised from
        ``seed``).
      cfg: :class:`IDEALConfig`.
      seed: PRNG seed (the whole run is a deterministic function of it).
      evaluator: validation/test accuracy (BatchNorm eval mode); None: no curve.
      workdir: directory for checkpoints and the on-disk label cache; rerunning with the same
        directory resumes (and re-buys nothing). None: in memory only.
      max_rounds: stop (unfinished) after this many rounds in total, e.g. to simulate a kill.
      eval_budgets: query counts at which the student must be evaluated (the last round within
        each budget is always evaluated, for per-budget model selection).
      progress: show a tqdm bar.
      name: label for the progress bar and errors.
      generator: optional ``(module, functional)`` generator (default: :func:`make_generator`).

    Returns:
      :class:`PoolRunResult`.
    """
    t0 = time.perf_counter()
    method = ideal_method(api, student_fm, cfg, seed=seed, evaluator=evaluator, workdir=workdir,
                          name=name, generator=generator)

    def result(out: RunOutcome) -> PoolRunResult:
        st = out.state
        return PoolRunResult(curve=out.curve, queries=api.queries, rounds=out.steps,
                             stopped=out.stopped, finished=out.finished, params=st.student.params,
                             bn=st.student.bn,
                             class_histogram=st.pool.class_histogram(api.num_classes),
                             seconds=out.seconds)

    out = run(method, api, key=jax.random.key(seed), workdir=workdir, eval_every=cfg.eval_every,
              eval_budgets=eval_budgets, checkpoint_every=cfg.checkpoint_every,
              max_steps=max_rounds, progress=progress, started=t0,
              summary=lambda o: result(o).summary())
    return result(out)


class _RunParts:
    """The compiled pieces of one run: student pass over the pool, generation, prediction."""

    def __init__(self, student_fm, cfg: IDEALConfig, k: int, image_shape, generator):
        self.cfg, self.k, self.image_shape = cfg, k, tuple(image_shape)
        self.tx = torch_sgd(cfg.lr_s, cfg.momentum_s, cfg.weight_decay_s)
        self.pool_pass = make_pool_pass(
            student_fm, self.tx, batch_size=cfg.student_batch or cfg.batch_size,
            augment=cfg.distill_augment, pad=cfg.aug_pad,
            targets_kind="soft" if cfg.soft_labels else "hard",
            max_batches=cfg.max_student_batches, pool_loss=cfg.pool_loss, num_classes=k,
            min_batches=cfg.min_student_batches)
        self.phase = self.early_phase = None
        if cfg.synth == "generator":
            gen_fm = (generator or make_generator(cfg, image_shape))[1]
            self.phase = make_generation_phase(student_fm, gen_fm, cfg, k, image_shape)
            self.early_phase = self.phase
            if cfg.select_after and cfg.select != "best":
                self.early_phase = make_generation_phase(
                    student_fm, gen_fm, dataclasses.replace(cfg, select="best"), k, image_shape)
        self.predict = jax.jit(
            lambda p, bn, x: jnp.argmax(student_fm.apply(p, bn, x, train=False)[0], -1))
        self.probs = jax.jit(
            lambda p, bn, x: jax.nn.softmax(student_fm.apply(p, bn, x, train=False)[0], -1))
        self.consolidate = None
        if cfg.consolidate_passes:
            self.consolidate = make_consolidation(
                student_fm, lr=cfg.lr_s if cfg.consolidate_lr is None else cfg.consolidate_lr,
                momentum=cfg.momentum_s, weight_decay=cfg.weight_decay_s,
                batch_size=cfg.student_batch or cfg.batch_size, passes=cfg.consolidate_passes,
                eval_every=cfg.consolidate_eval_every, augment=cfg.consolidate_augment,
                pad=cfg.consolidate_pad, pool_loss=cfg.pool_loss, num_classes=k,
                targets_kind="soft" if cfg.soft_labels else "hard")

    def new_images(self, state, pool: PoolStore, key):
        """The round's ``B`` images (no query) and the generation phase's best loss."""
        cfg, gen_loss = self.cfg, float("nan")
        if self.phase is not None:
            counts = (jnp.asarray(pool.class_histogram(self.k), jnp.float32)
                      if cfg.targets == "pool_balancing" or cfg.select == "balanced" else None)
            phase = self.phase if pool.size >= cfg.select_after else self.early_phase
            x, best_l, _ = phase(state.params, state.bn, key, counts)
            gen_loss = float(best_l)
            x = self._with_noise(state, x, jax.random.fold_in(key, 11))
        else:
            x = noise_images(cfg, key, cfg.batch_size, self.image_shape)
        if cfg.class_floor:
            x = with_floor_images(x, pool, cfg, self.k, jax.random.fold_in(key, 7))
        return x, gen_loss

    def _with_noise(self, state, x, key):
        """``x`` with a random ``noise_share * B`` of its images replaced by noise images (the
        generator's targets are sorted by class, so the replaced ones are drawn at random)."""
        n = int(round(self.cfg.noise_share * x.shape[0]))
        if n == 0:
            return x
        kn, kp = jax.random.split(key)
        keep = jax.random.permutation(kp, x.shape[0])[: x.shape[0] - n]
        noise = uncertain_noise_images(
            self.cfg, kn, n, self.image_shape,
            lambda z: self.probs(state.params, state.bn, z), self.cfg.noise_candidates)
        return jnp.concatenate([x[keep], noise.astype(x.dtype)])




def _max_samples(api: BlackBoxAPI, cfg: IDEALConfig) -> Optional[int]:
    """The most samples the run can buy (whole rounds), None if unbounded."""
    b, max_samples = cfg.batch_size, None
    if api.remaining is not None:
        max_samples = (api.queries + api.remaining) // b * b
    if cfg.rounds is not None:
        n_gen = cfg.rounds if cfg.stop_gen is None else min(cfg.rounds, cfg.stop_gen)
        max_samples = n_gen * b if max_samples is None else min(max_samples, n_gen * b)
    return max_samples


def _new_pool(cfg: IDEALConfig, k: int, image_shape, max_samples, workdir) -> PoolStore:
    b = cfg.batch_size
    init_cap = max(b, min(max_samples or 16 * b, 64 * b))
    init_cap = 1 << (init_cap - 1).bit_length()     # powers of two: compiled shapes recur
    return PoolStore(image_shape, (k,) if cfg.soft_labels else (), quantize=cfg.quantize,
                     directory=os.path.join(workdir, "pool") if workdir else None,
                     initial_capacity=init_cap)


def _buy_round(api: BlackBoxAPI, parts: _RunParts, pool: PoolStore, state, r: int, key):
    """Round ``r``'s purchase (its ``B`` queries reserved by the run loop), appended to ``pool``:
    ``(gen_loss, agreement)``. A round bought before a kill is replayed from the pool log, never
    re-bought.
    """
    cfg = parts.cfg
    gen_loss, agree = float("nan"), float("nan")
    cached = pool.cached_round(r)
    if cached is not None:
        x_st, answers, answered = cached
        led = api.ledger.state_dict()
        led["answered"] = answered
        api.ledger.load_state_dict(led)
    else:
        x, gen_loss = parts.new_images(state, pool, key)
        x_st = pool.prepare(x)
        out = api(jax.lax.stop_gradient(dequantize(x_st)))
        if cfg.soft_labels:
            answers = teacher_probs(out, api.output, parts.k)
        elif api.output == "label":
            answers = out
        else:
            answers = jnp.argmax(out, axis=-1).astype(jnp.int32)
        answered = api.queries
        if not cfg.soft_labels:     # how far the student's classes are the teacher's
            agree = float(jnp.mean(parts.predict(state.params, state.bn,
                                                 dequantize(x_st)) == answers))
    pool.append(r, x_st, answers, answered)
    return gen_loss, agree
