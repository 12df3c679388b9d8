"""The BiDf-MKD experiment's config: data, pool, meta-model, methods, evaluation, and the nested
meta-training loop (:class:`~.train.BiDfMKDConfig`); run by :func:`.experiment.run_experiment`.

Example:
  >>> cfg = BiDfExperimentConfig(dataset="glyphs", loop=BiDfMKDConfig(meta_iterations=7))
  >>> cfg.loop.meta_iterations, cfg.loop.inversion.flip, cfg.loop_config().inversion.flip
  (7, None, False)
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Optional

from .train import BiDfMKDConfig

__all__ = ["BiDfExperimentConfig", "METHODS", "LINE_DRAWING_DATASETS"]

#: The methods one experiment can run (:mod:`.experiment`; each a ``dfml_jax.methods`` entry).
METHODS = ("bidf_mkd", "random", "random_scaled", "average", "white_box", "maml_real",
           "maml_pool_data")
# Line drawings change identity under a horizontal flip: no flips in their augmentation.
LINE_DRAWING_DATASETS = ("glyphs", "omniglot", "mnist", "mnist5k", "digits")


#: The loop's fields and former names: flat keys of the experiment config until the loop's
#: settings became the nested ``loop`` section (issue 17).
_LOOP_KEYS = (*(f.name for f in dataclasses.fields(BiDfMKDConfig)), *BiDfMKDConfig.RENAMED_FIELDS)


@dataclasses.dataclass(frozen=True)
class BiDfExperimentConfig:
    """A whole experiment: data, pool, meta-model, methods, evaluation, and the meta-training
    loop's settings as the nested :class:`~.train.BiDfMKDConfig` ``loop`` (``--set
    loop.meta_iterations=600``, ``--set loop.inversion.lr=0.03``).

    Until issue 17 the loop's fields were inherited flat fields (``--set meta_iterations=...``):
    ``--set`` refuses the old names with the new key in the error and a saved ``config.json`` of
    the flat layout is read under the new names (``RENAMED_FIELDS``, dotted targets).
    ``loop.inversion.flip=None`` is resolved per dataset by :meth:`loop_config`.
    """
    RENAMED_FIELDS: ClassVar[Dict[str, str]] = {k: f"loop.{k}" for k in _LOOP_KEYS}
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
    # the stroke generator's latent: "linear" (z -> strokes by a learnable map) or "direct"
    # (z are the 8 * num_strokes stroke parameters: set loop.nz=32 for 4 strokes)
    stroke_latent: str = "linear"
    # meta-model
    meta_arch: str = "conv4"
    meta_width: int = 32
    # activation layout of the conv4 meta-model: "NHWC" or "CNHW" (channel-major: the same
    # function and parameters, faster second-order steps on XLA:CPU; dfml_jax.models.layers)
    meta_layout: str = "NHWC"
    # initial meta-model of the meta-trained methods (bidf_mkd, white_box, maml_*): "random" (the
    # paper) or "scaled" (the random init with every kernel x kernel_scale(cfg), i.e. the
    # random_scaled baseline's weights: meta-training starts where that baseline stands)
    meta_init: str = "random"
    # methods and evaluation
    methods: tuple = METHODS
    baseline_iterations: Optional[int] = None  # meta-iterations of white_box / maml_real (None: same)
    test_tasks: int = 600
    test_shots: tuple = (1, 5)
    eval_seed: int = 12345
    # test-time fine-tuning lr: chosen per method and shot on meta-validation tasks from this grid
    # (empty: the fixed loop.finetune_lr, no selection; loop.finetune_lr=None: loop.inner_lr)
    finetune_lrs: tuple = ()
    lr_select_tasks: int = 200
    # random_scaled: every conv / linear kernel of the random init times this
    # (None: 1/sqrt(num_apis), the shrinkage of averaging num_apis independent kernels)
    random_scale: Optional[float] = None
    # the meta-training loop (tasks, inversion, memory, schedule, evaluation, seed);
    # inversion.flip=None: resolved per dataset (loop_config)
    loop: BiDfMKDConfig = BiDfMKDConfig()

    def loop_config(self, **changes) -> BiDfMKDConfig:
        """:attr:`loop` with ``changes`` applied and ``inversion.flip=None`` resolved per dataset
        (no flips for line drawings): the config the loop runs."""
        loop = dataclasses.replace(self.loop, **changes)
        if loop.inversion.flip is None:
            loop = dataclasses.replace(loop, inversion=dataclasses.replace(
                loop.inversion, flip=self.dataset not in LINE_DRAWING_DATASETS))
        return loop
