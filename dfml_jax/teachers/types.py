"""Pool scenarios and the trained-group record: what a pool build is asked for and produces.

The scenarios (``SS`` / ``SH`` / ``MH``) and their validation, the default architectures, and
:class:`TrainedGroup`, the in-memory (white-box) result of training one (dataset, architecture)
group, which :mod:`dfml_jax.teachers.store` writes. The loaded pool itself is
:class:`dfml_jax.api.APIPool`.

>>> resolve_archs("SH", None)
('conv4', 'resnet10', 'resnet18')
>>> validate_scenario("SS", ["glyphs"], ["conv4"])
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from dfml_jax.models import CLASSIFIERS

__all__ = ["SCENARIOS", "DEFAULT_ARCHS", "TrainedGroup", "check_choices", "validate_scenario",
           "resolve_archs"]

SCENARIOS = ("SS", "SH", "MH")
#: Architectures of the SH/MH scenarios when none are given (spec section 1.1).
DEFAULT_ARCHS = ("conv4", "resnet10", "resnet18")


def check_choices(kind: str, values: Sequence[str], valid: Sequence[str]) -> None:
    """Raises ``ValueError`` naming the valid ones unless every ``values`` item is in ``valid``."""
    for v in values:
        if v not in valid:
            raise ValueError(f"Unknown {kind} {v!r}; valid: {', '.join(valid)}.")


def resolve_archs(scenario: str, archs: Sequence[str] | None) -> tuple:
    """``archs`` as a tuple; none given: ``("conv4",)`` for SS, :data:`DEFAULT_ARCHS` otherwise."""
    return tuple(archs) if archs else (("conv4",) if scenario == "SS" else DEFAULT_ARCHS)


def validate_scenario(scenario: str, datasets: Sequence[str], archs: Sequence[str]) -> None:
    """Raises ``ValueError`` unless the datasets and architectures fit the scenario."""
    if scenario not in SCENARIOS:
        raise ValueError(f"Unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)} (SS: same "
                         f"dataset and architecture, SH: same dataset, mixed architectures, MH: "
                         f"mixed datasets and architectures).")
    check_choices("architecture", archs, CLASSIFIERS)
    if len(set(datasets)) != len(datasets) or len(set(archs)) != len(archs):
        raise ValueError(f"Datasets and architectures must not repeat: {datasets}, {archs}.")
    if not datasets or not archs:
        raise ValueError("Give at least one dataset and one architecture.")
    if scenario == "SS" and (len(datasets) != 1 or len(archs) != 1):
        raise ValueError(f"Scenario SS needs exactly one dataset and one architecture, got "
                         f"datasets={list(datasets)}, archs={list(archs)} (use SH or MH).")
    if scenario == "SH" and (len(datasets) != 1 or len(archs) < 2):
        raise ValueError(f"Scenario SH needs one dataset and at least two architectures, got "
                         f"datasets={list(datasets)}, archs={list(archs)}.")
    if scenario == "MH" and len(datasets) < 2:
        raise ValueError(f"Scenario MH needs at least two datasets, got {list(datasets)}.")


class TrainedGroup(NamedTuple):
    """The teachers of one (dataset, architecture) group after training (white-box, in memory).

    Attributes:
      dataset, arch: names.
      model_config: ``create_model`` arguments (without name/key) of the architecture.
      mean, std: input normalisation of the dataset.
      recipe: the :class:`~dfml_jax.teachers.population.TrainRecipe` used (as a dict).
      params, state: stacked ``(P, ...)`` parameters and BN running statistics (final epoch).
      teachers: one JSON record per teacher (classes, accuracies, seed, ...), without ``index``.
      class_offset, dataset_num_classes: position of the dataset's classes in the pool's global
        class numbering (MH) and the size of its meta-train split.
    """
    dataset: str
    arch: str
    model_config: dict
    mean: tuple
    std: tuple
    recipe: dict
    params: Any
    state: Any
    teachers: list
    class_offset: int
    dataset_num_classes: int
