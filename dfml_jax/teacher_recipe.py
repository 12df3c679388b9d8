"""Moved to :mod:`dfml_jax.teachers.recipe`; this shim keeps old imports working."""
from dfml_jax.teachers.recipe import (DEFAULT_AUGMENT, RECIPES, TrainRecipe, augment_pad_for,
                                      default_augment, make_optimizer, recipe_for, resolve_augment)

__all__ = [
    "TrainRecipe", "RECIPES", "recipe_for", "make_optimizer", "DEFAULT_AUGMENT", "default_augment",
    "resolve_augment", "augment_pad_for",
]
