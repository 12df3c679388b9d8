"""Moved to :mod:`dfml_jax.teachers.population`; this shim keeps old imports working."""
from dfml_jax.teachers.population import (DEFAULT_AUGMENT, RECIPES, STRATEGIES, TEACHER_AXIS,
                                          TRAINER_VERSION, PopulationResult, TrainRecipe,
                                          augment_pad_for, default_augment, default_strategy,
                                          evaluate_population, make_optimizer, population_sharding,
                                          predict_population, recipe_for, resolve_augment,
                                          resolve_devices, teacher_mesh, train_population)

__all__ = [
    "TrainRecipe", "RECIPES", "recipe_for", "make_optimizer", "PopulationResult",
    "train_population", "evaluate_population", "predict_population", "population_sharding",
    "resolve_devices", "teacher_mesh", "TEACHER_AXIS", "STRATEGIES", "default_strategy",
    "DEFAULT_AUGMENT", "default_augment", "resolve_augment", "augment_pad_for", "TRAINER_VERSION",
]
