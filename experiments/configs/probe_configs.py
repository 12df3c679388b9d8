"""Configurations and recipes of ``experiments/probe_transfer.py`` (transfer probes).

    python experiments/probe_transfer.py --config smoke --workdir runs/probe_smoke
    python experiments/probe_transfer.py --config default --workdir runs/probe --recipes zo,real --set probe.replay_iterations=300
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from dfml_jax.bidf_mkd.probe import ProbeConfig, Recipe
from dfml_jax.experiment import select_config

__all__ = ["ProbeRunConfig", "CONFIGS", "RECIPES", "get_config"]


PIXEL_REFERENCE = ("generator=dcgan", "loop.nz=64", "loop.inversion.lr=0.01",
                   "loop.inversion.direction_resolution=7", "loop.inversion.zo_space=image")


@dataclasses.dataclass(frozen=True)
class ProbeRunConfig:
    """A probe run: the BiDf-MKD config whose pool, inversion and meta-model it probes, the
    recipes, and the probe sizes (``--set probe.pool_steps=300``; the task shape, student width and
    MAML settings are taken from the BiDf-MKD config)."""
    name: str = "default"
    bidf_config: str = "default"    # a name of experiments/configs/bidf_mkd_configs.py
    recipes: tuple = ("zo", "zo_flip", "zo_priors", "zo_repulsion", "zo_wide", "strokes",
                      "strokes_priors", "strokes_wide", "white_box", "white_box_priors",
                      "white_box_strokes", "real", "noise")
    pool_seed: Optional[int] = None  # None: the BiDf-MKD config's
    # --set overrides of the BiDf-MKD config before probing: the probe's reference inversion,
    # which the recipes modify (the DCGAN with 7x7 pixel directions, the pre-stroke default)
    bidf_set: tuple = PIXEL_REFERENCE
    probe: ProbeConfig = ProbeConfig()


_DEFAULT = ProbeRunConfig()
_SMOKE = ProbeRunConfig(name="smoke", bidf_config="smoke",
                        bidf_set=("generator=dcgan", "loop.nz=16", "loop.inversion.lr=0.01",
                                  "loop.inversion.zo_space=image"),
                        recipes=("zo", "zo_priors", "real", "noise"),
                        probe=ProbeConfig(num_apis=2, within_steps=5, pool_steps=5,
                                          replay_iterations=2, val_tasks=6, lr_select_tasks=4,
                                          finetune_lrs=(0.01, 0.1), kd_batch=8))
CONFIGS = {"default": _DEFAULT, "smoke": _SMOKE}

# Recovery recipes: overrides of the BiDf-MKD config's inversion (same queries per API unless the
# name says otherwise; "wide" trades iterations for images at the same budget).
_DIRECT = (("latent", "direct"), ("nz", 32))  # stroke parameters as the latents (4 strokes)
_LATENT = (("zo_space", "latent"), ("direction_resolution", None), ("lr", 0.03),
           ("num_directions", 20))  # q = 20 directions search d = 32 (the default q: same queries)
RECIPES = {
    "zo": Recipe("zo"),
    "zo_flip": Recipe("zo", (("flip", True),)),
    "zo_priors": Recipe("zo", (("tv_weight", 1.0), ("l1_weight", 1.0))),
    "zo_repulsion": Recipe("zo", (("repulsion_weight", 1.0),)),
    "zo_priors_repulsion": Recipe("zo", (("tv_weight", 1.0), ("l1_weight", 1.0),
                                         ("repulsion_weight", 1.0))),
    "zo_wide": Recipe("zo", images_scale=2),
    "zo_classes": Recipe("zo", (("class_jitter", 0.5),)),
    "strokes_classes": Recipe("zo", (("class_jitter", 0.5),), generator="strokes"),
    "strokes_classes_wide": Recipe("zo", (("class_jitter", 0.5),), generator="strokes",
                                   images_scale=2),
    "white_box_strokes_classes": Recipe("white_box", (("class_jitter", 0.5),), generator="strokes"),
    "white_box": Recipe("white_box"),
    "white_box_priors": Recipe("white_box", (("tv_weight", 1.0), ("l1_weight", 1.0))),
    "strokes": Recipe("zo", generator="strokes"),
    "strokes_priors": Recipe("zo", (("tv_weight", 1.0), ("l1_weight", 1.0)), generator="strokes"),
    "strokes_wide": Recipe("zo", generator="strokes", images_scale=2),
    "white_box_strokes": Recipe("white_box", generator="strokes"),
    # zero-order directions over the 32 stroke parameters of each image (the renderer inside the
    # black-box objective) instead of its 784 pixels; same queries
    "strokes_latent": Recipe("zo", _LATENT, generator="strokes",
                             generator_options=_DIRECT),
    "strokes_latent_lr0.1": Recipe("zo", _LATENT + (("lr", 0.1),), generator="strokes",
                                   generator_options=_DIRECT),
    "strokes_latent_long": Recipe("zo", _LATENT + (("num_directions", 10), ("iterations", 60)),
                                  generator="strokes", generator_options=_DIRECT),  # same queries
    "white_box_strokes_latent_lr0.1": Recipe("white_box", _LATENT + (("lr", 0.1),),
                                             generator="strokes", generator_options=_DIRECT),
    "white_box_strokes_latent": Recipe("white_box", _LATENT,
                                       generator="strokes", generator_options=_DIRECT),
    "real": Recipe("real"),
    "noise": Recipe("noise"),
}


def get_config(name: str) -> ProbeRunConfig:
    """The named config (see the module docstring for the command lines)."""
    return select_config(CONFIGS, name)
