"""Moved to :mod:`dfml_jax.training.augment`; this shim keeps old imports working."""
from dfml_jax.training.augment import (AUGMENTATIONS, augment_images, batch_shared_augment,
                                       normalize, random_crop_flip)

__all__ = [
    "normalize", "batch_shared_augment", "random_crop_flip", "augment_images", "AUGMENTATIONS",
]
