"""Query-efficient data-free distillation of ONE black-box model: IDEAL, DFME and NaiveKD.

Each method is a run-loop :class:`~dfml_jax.training.run_loop.Method` (:func:`ideal_method`,
:func:`dfme_method`) run by :func:`dfml_jax.training.run_loop.run`; the functions below build and run it.

* :func:`run_pool_distillation` (:mod:`.ideal`): IDEAL (ICLR 2023) with a label cache (each
  synthetic sample is queried exactly once, hard labels suffice); ``synth="noise"`` is NaiveKD
  (:func:`run_naive_kd`).
* :func:`run_dfme` (:mod:`.dfme`): DFME (CVPR 2021), a min-max game on the L1 distance between the
  student's logits and logits recovered from the teacher's probabilities, generator gradients
  from a zero-order estimator of :mod:`dfml_jax.estimators`.
* :mod:`.generation` (IDEAL's generator phase, NaiveKD's noise) and :mod:`.balance` (class
  balance of the paid-for pool: generator targets, balanced purchase, the class floor).
* :mod:`.common`: student optimisers and training steps, per-sample augmentation, evaluation, the
  on-disk label cache (:class:`PoolStore`), validation-based selection within a budget.

Every teacher query goes through a :class:`~dfml_jax.api.BlackBoxAPI`; its ledger is the
query count reported everywhere, and its budget bounds every run (a step is reserved before it
runs; a run stops cleanly when the budget cannot cover the next step).
"""
from dfml_jax.distill.common import (AUGMENTATIONS, Evaluator, PoolStore, StudentState,
                                     augment_images, init_student, make_pool_pass,
                                     make_supervised_epoch, multistep_schedule, random_crop_flip,
                                     select_within_budget, split_validation, torch_sgd,
                                     train_supervised)
from dfml_jax.distill.dfme import (DFMEConfig, DFMERun, DFMERunResult, DFMEState,
                                   cost_per_iteration, dfme_method, make_dfme_iteration,
                                   num_iterations, recover_logits, run_dfme)
from dfml_jax.distill.balance import (balanced_selection, class_floor_deficit,
                                      class_floor_images, pool_balancing_targets)
from dfml_jax.distill.common import make_generator
from dfml_jax.distill.generation import INFO_LOSSES, info_loss, make_generation_phase, noise_images
from dfml_jax.distill.ideal import (IDEALConfig, IDEALState, PoolRunResult, ideal_method,
                                    run_pool_distillation)
from dfml_jax.distill.naive import naive_config, run_naive_kd

__all__ = [
    "AUGMENTATIONS", "balanced_selection", "class_floor_deficit", "class_floor_images",
    "noise_images", "pool_balancing_targets", "DFMEConfig", "DFMERun", "DFMERunResult",
    "DFMEState", "Evaluator", "IDEALConfig", "IDEALState", "ideal_method", "dfme_method",
    "INFO_LOSSES", "PoolRunResult", "PoolStore", "StudentState", "augment_images",
    "cost_per_iteration", "info_loss", "init_student", "make_dfme_iteration",
    "make_generation_phase", "make_generator", "make_pool_pass", "make_supervised_epoch",
    "multistep_schedule", "naive_config", "num_iterations", "random_crop_flip", "recover_logits",
    "run_dfme", "run_naive_kd", "run_pool_distillation", "select_within_budget",
    "split_validation", "torch_sgd", "train_supervised",
]
