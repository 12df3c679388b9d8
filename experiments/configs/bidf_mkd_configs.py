"""Configurations of ``experiments/bidf_mkd.py`` (BiDf-MKD and its baselines in one run).

    python experiments/bidf_mkd.py --config smoke --workdir runs/bidf_smoke
    python experiments/bidf_mkd.py --config default --workdir runs/bidf_default [--set loop.seed=1]
    python experiments/bidf_mkd.py --config paper_cifar_fs_ss --workdir runs/cifar_fs_ss --set data_dir=~/tensorflow_datasets

Every config is a frozen :class:`dfml_jax.bidf_mkd.experiment.BiDfExperimentConfig`: the
experiment's fields (data, pool, meta-model, methods, evaluation) and the meta-training loop's
settings nested as ``loop`` (a :class:`dfml_jax.bidf_mkd.train.BiDfMKDConfig`, its inversion
settings nested again as ``loop.inversion``). Any field can be overridden with ``--set
key=value``, a loop field with ``--set loop.key=value`` (``--set loop.meta_iterations=600``), an
inversion field with ``--set loop.inversion.key=value`` (``--set loop.inversion.lr=0.03``).

* ``smoke``: tiny everything on Glyphs (3 Conv4 teachers of width 8, a few meta-iterations): the
  whole pipeline, every method, in about 3 minutes on 2 CPU cores (tests and CI).
* ``default``: the README's main job. Glyphs 28x28, an SS pool of 20 Conv4 teachers (random
  shifts), BiDf-MKD with every mechanism of the paper at CPU scale (zero-order inversion with
  q = 20 directions, boundary query sets, second-order bi-level KD, memory replay,
  plateau-triggered API visits, 150 meta-iterations) against ``random``, ``random_scaled`` and
  ``average``; the bounds ``white_box``, ``maml_real`` and ``maml_pool_data`` (about 40 more
  minutes) run with ``--set 'methods=["white_box","maml_real","maml_pool_data"]'`` in another
  workdir. Departures, each chosen
  on meta-VALIDATION (tables in ``docs/results.md``): images are drawings of 4 Bezier strokes
  (``generator="strokes"``, ``stroke_latent="direct"``) inverted with zero-order directions over
  their 32 stroke parameters (``loop.inversion.zo_space="latent"``, ``loop.inversion.lr=0.1``);
  meta-training starts from the random init with every kernel scaled by 1/sqrt(num_apis)
  (``meta_init="scaled"``; the paper: ``"random"``); ``loop.inner_lr=0.1`` and
  ``loop.plateau_patience=5`` for this scale; each method fine-tuned at test time with the lr chosen for it on validation
  tasks. The paper's protocol is reported beside it, labelled.
* ``paper_*``: the spec's hyper-parameters (``shared/specs/bidf_mkd.md`` section 8) on the TFDS /
  local-folder benchmarks, for GPU/TPU users with the data prepared (nothing is downloaded).
"""
from __future__ import annotations

import dataclasses

from dfml_jax.bidf_mkd.experiment import BiDfExperimentConfig
from dfml_jax.bidf_mkd.inversion import InversionConfig
from dfml_jax.bidf_mkd.train import BiDfMKDConfig
from dfml_jax.experiment import select_config

__all__ = ["CONFIGS", "get_config", "DEFAULT_METHODS"]

# the default's methods fit its one-hour budget on 2 CPU cores; the bounds (white_box, maml_real,
# maml_pool_data) are one --set away: --set 'methods=["white_box","maml_real","maml_pool_data"]'
DEFAULT_METHODS = ("bidf_mkd", "random", "random_scaled", "average")


def _inversion(**settings) -> InversionConfig:
    """An experiment's inversion settings (``loop.inversion``); ``flip=None``: resolved per dataset
    (no flips for line drawings,
    :meth:`~dfml_jax.bidf_mkd.experiment.BiDfExperimentConfig.loop_config`)."""
    return InversionConfig(**{"flip": None, **settings})


_SMOKE = BiDfExperimentConfig(
    name="smoke", num_apis=3, pool_epochs=15, pool_width=8, meta_width=8, test_tasks=20,
    generator="strokes", stroke_latent="direct", meta_init="scaled",
    finetune_lrs=(0.01, 0.1), lr_select_tasks=10,
    loop=BiDfMKDConfig(
        shots=1, query=3, meta_iterations=6, meta_batch=2, replay_inner_steps=2, kd_inner_steps=2,
        inversion=_inversion(iterations=3, per_class=4, num_directions=4, smoothing=0.01,
                             chunk_size=None, lr=0.1, zo_space="latent"), nz=32,
        ngf=8, boundary_start=3, plateau_patience=2, memory_slots=3, eval_every=3, val_tasks=10,
        finetune_steps=3, checkpoint_every=3, seed=0, paper_eval_tasks=20, paper_steps=3))

_DEFAULT = BiDfExperimentConfig(
    name="default", num_apis=20, pool_epochs=60, pool_width=32, meta_width=32, meta_init="scaled",
    generator="strokes", stroke_latent="direct", test_tasks=600,
    finetune_lrs=(0.01, 0.03, 0.1, 0.3, 1.0), lr_select_tasks=100, methods=DEFAULT_METHODS,
    loop=BiDfMKDConfig(
        shots=1, query=15, meta_iterations=150, meta_batch=4, replay_inner_steps=5,
        kd_inner_steps=10, inner_lr=0.1,
        inversion=_inversion(iterations=30, per_class=16, num_directions=20, smoothing=0.005,
                             chunk_size=10, lr=0.1, zo_space="latent", direction_resolution=None),
        nz=32, ngf=16, boundary_start=100, plateau_patience=5, memory_slots=10,
        eval_every=50, val_tasks=100, finetune_steps=10, checkpoint_every=25, seed=0,
        paper_eval_tasks=600))

_PAPER = BiDfExperimentConfig(
    name="paper_cifar_fs_ss", dataset="cifar_fs", image_size=32, channels=3, num_apis=100,
    pool_epochs=60, pool_width=32, meta_width=32, test_tasks=600,
    loop=BiDfMKDConfig(
        shots=1, query=15, meta_iterations=60000, meta_batch=4,
        inversion=_inversion(iterations=200, per_class=30, num_directions=100, smoothing=0.005,
                             chunk_size=20, lr=1e-3),
        nz=256, ngf=64, boundary_start=4000, plateau_patience=200, memory_slots=20,
        eval_every=500, val_tasks=600, paper_eval_tasks=600, seed=2022))

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
