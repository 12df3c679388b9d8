"""Teacher training recipes: optimiser, schedule, epochs and domain-faithful augmentation.

Recipe (``shared/specs/bidf_mkd.md`` section 1.1): batch 128, cross-entropy, gradient-norm
clipping at 50, the learning rate stepped per epoch by a MultiStep schedule (gamma 0.2).

* Conv4: Adam(lr 0.01), milestones [70].
* ResNet-10/18: SGD(lr 0.01, momentum 0.9, weight decay 5e-4, PyTorch-style coupled decay after
  clipping), milestones [30, 50, 80].
* LeNet-5 / MLP (not in the spec): IDEAL's ``pretrain.py`` recipe, SGD(lr 0.1, momentum 0.9), no
  weight decay, no schedule (``ideal_dfme.md`` section 3.6).

Augmentation (:attr:`TrainRecipe.augment`): see :mod:`dfml_jax.teachers.population` and
:func:`default_augment`. :func:`dfml_jax.teachers.population.train_population` runs a recipe.
"""
from __future__ import annotations

import dataclasses

import optax

from dfml_jax.training.augment import AUGMENTATIONS

__all__ = ["TrainRecipe", "RECIPES", "recipe_for", "make_optimizer", "DEFAULT_AUGMENT",
           "default_augment", "resolve_augment", "augment_pad_for"]


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Optimisation recipe of a teacher.

    Attributes:
      optimizer: ``"adam"`` or ``"sgd"``.
      lr: base learning rate.
      momentum: SGD momentum.
      weight_decay: coupled (PyTorch-style) L2 weight decay, applied after clipping.
      milestones: epochs at which the learning rate is multiplied by ``gamma``.
      gamma: MultiStep decay factor.
      batch_size: mini-batch size.
      clip_norm: global gradient-norm clipping threshold (``None``: off).
      epochs: number of epochs.
      augment: per-sample augmentation of each mini-batch, a name of
        :data:`dfml_jax.training.augment.AUGMENTATIONS`: ``"none"`` (the paper's recipe), ``"crop"``
        (random shift, no flip: glyphs, digits), ``"crop_flip"`` (natural images) or ``"flip"``.
      augment_pad: largest shift of the crop in pixels; ``None``: an eighth of the image side,
        rounded (4 at 28 and 32 px, 2 at 16 px, 10 at 84 px; :func:`augment_pad_for`).
    """
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    batch_size: int = 128
    clip_norm: float | None = 50.0
    epochs: int = 60
    augment: str = "none"
    augment_pad: int | None = None

    def to_json(self) -> dict:
        """JSON-serialisable dict of the fields."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


#: Default recipe per architecture (60 epochs as for CIFAR-FS/MiniImageNet in the spec).
RECIPES: dict[str, TrainRecipe] = {
    "conv4": TrainRecipe("adam", 0.01, milestones=(70,)),
    "resnet10": TrainRecipe("sgd", 0.01, momentum=0.9, weight_decay=5e-4, milestones=(30, 50, 80)),
    "resnet18": TrainRecipe("sgd", 0.01, momentum=0.9, weight_decay=5e-4, milestones=(30, 50, 80)),
    "lenet5": TrainRecipe("sgd", 0.1, momentum=0.9),
    "mlp": TrainRecipe("sgd", 0.1, momentum=0.9),
}


#: Domain-faithful augmentation per dataset name (:func:`default_augment`): shifts only where a
#: mirror image changes or never shows the class (letters, handwriting, digits; Fashion-MNIST's
#: items all face one way), shifts and flips for natural images.
DEFAULT_AUGMENT: dict[str, str] = {
    "glyphs": "crop", "omniglot": "crop", "mnist": "crop", "mnist5k": "crop", "digits": "crop",
    "svhn_cropped": "crop", "fashion_mnist": "crop",
    "cifar_fs": "crop_flip", "cifar10": "crop_flip", "cifar100": "crop_flip", "cub": "crop_flip",
    "mini_imagenet": "crop_flip",
}
#: Accepted spellings of :attr:`TrainRecipe.augment` besides the names of ``AUGMENTATIONS``.
_AUGMENT_ALIASES = {"paper": "none"}


def default_augment(dataset: str | None) -> str:
    """The domain-faithful teacher augmentation of a dataset (:data:`DEFAULT_AUGMENT`).

    Args:
      dataset: a dataset name; an unknown name (e.g. a custom split loader's) or ``None`` gets
        ``"crop"``, which never mirrors an image (the safe choice for an unknown domain).

    Returns:
      ``"crop"`` or ``"crop_flip"``.
    """
    return DEFAULT_AUGMENT.get(dataset, "crop")


def resolve_augment(augment: str | None, dataset: str | None = None) -> str:
    """The augmentation a teacher of ``dataset`` is trained with.

    Args:
      augment: ``None`` (the dataset's default, :func:`default_augment`), ``"paper"`` (the
        paper's recipe: ``"none"``) or a name of :data:`dfml_jax.training.augment.AUGMENTATIONS`.
      dataset: the dataset name (only used when ``augment`` is ``None``).

    Returns:
      A name of :data:`dfml_jax.training.augment.AUGMENTATIONS`.

    Raises:
      ValueError: an unknown name (the valid ones are listed).

    >>> resolve_augment(None, "glyphs"), resolve_augment(None, "cifar_fs"), resolve_augment("paper")
    ('crop', 'crop_flip', 'none')
    """
    if augment is None:
        return default_augment(dataset)
    name = _AUGMENT_ALIASES.get(augment, augment)
    if name not in AUGMENTATIONS:
        raise ValueError(f"Unknown teacher augmentation {augment!r}; valid: "
                         f"{sorted(AUGMENTATIONS) + sorted(_AUGMENT_ALIASES)} (None: the "
                         f"dataset's default, 'crop' for glyphs and digits, 'crop_flip' for "
                         f"natural images; 'paper'/'none': no augmentation, the paper's recipe).")
    return name


def augment_pad_for(recipe: TrainRecipe, image_size: int) -> int:
    """The crop's largest shift: ``recipe.augment_pad``, or an eighth of the side, rounded.

    Args:
      recipe: the recipe.
      image_size: image side in pixels.

    Returns:
      The shift in pixels (at least 1).

    >>> augment_pad_for(TrainRecipe(), 32), augment_pad_for(TrainRecipe(), 16)
    (4, 2)
    """
    if recipe.augment_pad is not None:
        return int(recipe.augment_pad)
    return max(1, int(round(image_size / 8)))


def recipe_for(arch: str, dataset: str | None = None, **overrides) -> TrainRecipe:
    """The default recipe of an architecture with some fields replaced.

    Args:
      arch: a key of :data:`RECIPES`.
      dataset: the teachers' dataset. When given and ``augment`` is not overridden, the recipe
        gets the dataset's domain-faithful augmentation (:func:`default_augment`); without it,
        the :data:`RECIPES` default (``"none"``, the paper's recipe).
      **overrides: :class:`TrainRecipe` fields (``None`` values are ignored); ``augment`` may
        also be ``"paper"`` (``"none"``).

    Returns:
      The recipe.

    Raises:
      ValueError: unknown architecture, field or augmentation.

    >>> recipe_for("conv4", "glyphs").augment, recipe_for("conv4", augment="paper").augment
    ('crop', 'none')
    """
    if arch not in RECIPES:
        raise ValueError(f"No training recipe for architecture {arch!r}; valid: "
                         f"{', '.join(sorted(RECIPES))}.")
    fields = {f.name for f in dataclasses.fields(TrainRecipe)}
    bad = set(overrides) - fields
    if bad:
        raise ValueError(f"Unknown recipe field(s) {sorted(bad)}; valid: {sorted(fields)}.")
    ov = {k: (tuple(v) if k == "milestones" else v) for k, v in overrides.items() if v is not None}
    if "augment" in ov or dataset is not None:
        ov["augment"] = resolve_augment(ov.get("augment"), dataset)
    return dataclasses.replace(RECIPES[arch], **ov)


def make_optimizer(recipe: TrainRecipe, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation of a recipe (clip -> [decay] -> Adam/SGD with MultiStep lr).

    Args:
      recipe: the recipe.
      steps_per_epoch: optimiser steps per epoch (milestones are in epochs).

    Returns:
      An ``optax.GradientTransformation``.
    """
    if recipe.optimizer not in ("adam", "sgd"):
        raise ValueError(f"Unknown optimizer {recipe.optimizer!r}; valid: adam, sgd.")
    schedule = optax.piecewise_constant_schedule(
        recipe.lr, {int(m) * steps_per_epoch: recipe.gamma for m in recipe.milestones})
    parts = []
    if recipe.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(recipe.clip_norm))
    if recipe.weight_decay:
        parts.append(optax.add_decayed_weights(recipe.weight_decay))
    if recipe.optimizer == "adam":
        parts.append(optax.adam(schedule))
    else:
        parts.append(optax.sgd(schedule, momentum=recipe.momentum or None))
    return optax.chain(*parts)
