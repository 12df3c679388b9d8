"""Configurations of ``experiments/bidf_mkd.py`` (BiDf-MKD and its baselines in one run).

Every config is a flat frozen dataclass (:class:`dfml_jax.bidf_mkd.experiment.BiDfExperimentConfig`),
so any field can be overridden with ``--set key=value``. Names:

* ``smoke``: tiny everything on Glyphs (3 Conv4 teachers of width 8, a few meta-iterations); the
  whole pipeline, every method, in well under 3 minutes on 2 CPU cores (tests and CI). Its
  paper protocol fine-tunes for 3 steps (``paper_steps=3``, = ``finetune_steps``: no extra
  compilation), not the paper's 10.
* ``default``: the README's main job. Glyphs 28x28, an SS pool of 20 Conv4 teachers (random
  shifts; built into ``<workdir>/pool-<build key>``), BiDf-MKD with every mechanism of the paper at
  CPU scale (ZO inversion with q=20 sphere directions, boundary query sets, second-order bi-level
  KD, memory replay, plateau-triggered API visits), and the six baselines (``random``,
  ``random_scaled``, ``average``, ``white_box``, ``maml_real``, ``maml_pool_data``; see
  :mod:`dfml_jax.bidf_mkd.experiment`). One departure from the
  paper: the zero-order directions are drawn at 7x7 and upsampled to 28x28
  (``inv_direction_resolution=7``, AutoZOOM; same queries per iteration). Measured on the
  meta-VALIDATION side (pool APIs 1, 16, 17, 16 images per class, 30 iterations, q=20, one seed),
  the fraction of recovered images the teacher assigns to their target class rose from 0.39
  (full-resolution directions; CE 1.57, chance 1.61) to 0.58 (CE 1.10); white-box inversion
  reaches 0.91. More iterations also help (full resolution 0.56 / 0.76 at 60 / 100 iterations,
  7x7 0.69 / 0.77) at 2x / 3.3x the queries and inversion time. Two more CPU-scale choices,
  both made on meta-VALIDATION tasks (100 per shot, seed 0, each method at its best fine-tuning
  lr): ``inner_lr=0.1`` (the spec's section 14 suggestion at this scale; the paper uses 0.01) for
  every inner loop, which lifts MAML on the real meta-train data from 57.3 / 83.7% (1 / 5-shot) to
  76.0 / 92.4% in 300 meta-iterations; and ``plateau_patience=5`` (paper 200 of 60,000
  iterations), so that 300 meta-iterations visit many APIs: white-box BiDf-MKD went from 53.2 /
  78.9% with 5 visits of 3 distinct APIs (patience 20) to 56.6 / 81.9% with 67 visits of 18
  (patience 2), still rising at the end; resumed to 800 meta-iterations (177 visits, all 20
  APIs, 878K queries; the 500 extra iterations took 49 min on shared cores) it reaches 58.7 /
  81.2%, level with Average (59.3 / 81.3%) and below MAML on real data: at CPU scale even the
  white-box upper bound of inversion does not pass Average (validation every 50 iterations:
  52.7, 53.5, 52.6, 53.7, 55.3, 56.3, 56.0, 56.5, 57.3, 57.4, 57.8, 57.9, 58.7, 57.7, 58.8, 57.7;
  the paper runs 60,000). Evaluation: 600
  meta-test tasks per shot, 10 fine-tuning steps whose learning rate each method gets chosen for it
  on 100 meta-VALIDATION tasks per shot from (0.01, 0.03, 0.1, 0.3, 1.0) (a fixed 0.01 is far too
  small for every method at this scale and confounds the comparison; the paper fixes 0.01).
  Measured on 2 CPU cores shared with 1-2 other jobs: BiDf-MKD 39 min (30 API visits, 3.03M
  queries), white-box 12 min, MAML on real data 13 min, each baseline's evaluation about 8 min
  (``--set methods='["bidf_mkd","random"]'`` runs a subset). Test results (seed 0) are in the
  README: BiDf-MKD does not beat Random or Average at this scale. Every results table also has
  the paper protocol (labelled: fine-tuning lr 0.01, 10 steps, and for meta-trained methods the
  maximum over test evaluations during training, selecting on the TEST split):
  ``paper_eval_tasks=600`` evaluates all 600 1-shot test tasks at iteration 0 and every
  ``eval_every`` meta-iterations: 7 extra test evaluations per meta-trained method, each 6 times
  the cost of a 100-task validation evaluation (not timed at this scale; ``--set
  paper_eval_tasks=0`` skips them, and the paper-protocol column of meta-trained methods is then
  one test evaluation of the validation-selected model, as the table note says)::

      python experiments/bidf_mkd.py --config default --workdir runs/bidf_default

* ``paper_cifar_fs_ss``, ``paper_mini_imagenet_ss``, ``paper_cub_ss``, ``paper_cifar_fs_sh``,
  ``paper_cifar_fs_mh``: the spec's hyper-parameters (``shared/specs/bidf_mkd.md`` section 8) on the
  TFDS / local-folder benchmarks, for GPU/TPU users with the data prepared (nothing is downloaded)::

      python experiments/bidf_mkd.py --config paper_cifar_fs_ss --workdir runs/cifar_fs_ss --set data_dir=~/tensorflow_datasets
"""
from __future__ import annotations

import dataclasses

from dfml_jax.bidf_mkd.experiment import BiDfExperimentConfig
from dfml_jax.experiment import select_config

__all__ = ["CONFIGS", "get_config"]

_SMOKE = BiDfExperimentConfig(
    name="smoke", num_apis=3, pool_epochs=15, pool_width=8, meta_width=8,
    shots=1, query=3, meta_iterations=6, meta_batch=2, replay_inner_steps=2, kd_inner_steps=2,
    inv_iterations=3, inv_per_class=4, q=4, mu=0.01, chunk_size=None, nz=16, ngf=8,
    boundary_start=3, plateau_patience=2, memory_slots=3, eval_every=3, val_tasks=10,
    test_tasks=20, finetune_steps=3, checkpoint_every=3, inv_lr=0.01, seed=0,
    finetune_lrs=(0.01, 0.1), lr_select_tasks=10, paper_eval_tasks=20, paper_steps=3)

_DEFAULT = BiDfExperimentConfig(
    name="default", num_apis=20, pool_epochs=60, pool_width=32, meta_width=32,
    shots=1, query=15, meta_iterations=300, meta_batch=4, replay_inner_steps=5, kd_inner_steps=10,
    inner_lr=0.1,
    inv_iterations=30, inv_per_class=16, q=20, mu=0.005, chunk_size=10, nz=64, ngf=16, inv_lr=0.01,
    inv_direction_resolution=7, boundary_start=100, plateau_patience=5, memory_slots=10,
    eval_every=50, val_tasks=100,
    test_tasks=600, finetune_steps=10, checkpoint_every=25, seed=0,
    finetune_lrs=(0.01, 0.03, 0.1, 0.3, 1.0), lr_select_tasks=100, paper_eval_tasks=600)

_PAPER = BiDfExperimentConfig(
    name="paper_cifar_fs_ss", dataset="cifar_fs", image_size=32, channels=3, num_apis=100,
    pool_epochs=60, pool_width=32, meta_width=32, shots=1, query=15, meta_iterations=60000,
    meta_batch=4, inv_iterations=200, inv_per_class=30, q=100, mu=0.005, chunk_size=20, nz=256,
    ngf=64, inv_lr=1e-3, boundary_start=4000, plateau_patience=200, memory_slots=20,
    eval_every=500, val_tasks=600, paper_eval_tasks=600, test_tasks=600, seed=2022)

CONFIGS = {
    "smoke": _SMOKE,
    "default": _DEFAULT,
    "paper_cifar_fs_ss": _PAPER,
    "paper_mini_imagenet_ss": dataclasses.replace(_PAPER, name="paper_mini_imagenet_ss",
                                                  dataset="mini_imagenet", image_size=84),
    "paper_cub_ss": dataclasses.replace(_PAPER, name="paper_cub_ss", dataset="cub", image_size=84,
                                        pool_epochs=100),
    "paper_cifar_fs_sh": dataclasses.replace(_PAPER, name="paper_cifar_fs_sh", scenario="SH",
                                             pool_archs=("conv4", "resnet10", "resnet18"),
                                             pool_width=64),
    "paper_cifar_fs_mh": dataclasses.replace(_PAPER, name="paper_cifar_fs_mh", scenario="MH",
                                             pool_archs=("conv4", "resnet10", "resnet18")),
}


def get_config(name: str) -> BiDfExperimentConfig:
    """The named config (see the module docstring for the command lines)."""
    return select_config(CONFIGS, name)
