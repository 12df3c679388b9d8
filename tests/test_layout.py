"""The package's layout (issue 17): arrows point down, and the old module paths still import."""
import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import module_graph  # noqa: E402

#: Old module -> the modules its names moved to (the old module is a re-export shim).
MOVED = {
    "dfml_jax.blackbox": ["dfml_jax.api"],
    "dfml_jax.api_errors": ["dfml_jax.api.errors"],
    "dfml_jax.ledger": ["dfml_jax.api.ledger"],
    "dfml_jax.api_outputs": ["dfml_jax.api.outputs"],
    "dfml_jax.blackbox_api": ["dfml_jax.api.blackbox"],
    "dfml_jax.api_group": ["dfml_jax.api.group"],
    "dfml_jax.pool_types": ["dfml_jax.api.pool", "dfml_jax.teachers.types"],
    "dfml_jax.pool": ["dfml_jax.teachers"],
    "dfml_jax.pool_store": ["dfml_jax.teachers.store"],
    "dfml_jax.pool_keys": ["dfml_jax.teachers.keys"],
    "dfml_jax.pool_build": ["dfml_jax.teachers.build"],
    "dfml_jax.train_teacher": ["dfml_jax.teachers.population"],
    "dfml_jax.teacher_recipe": ["dfml_jax.teachers.recipe"],
    "dfml_jax.augment": ["dfml_jax.training.augment"],
    "dfml_jax.distill.compile_cache": ["dfml_jax.training.compile_cache"],
}

#: Package -> packages it must never import (the layers above it).
FORBIDDEN = {
    "dfml_jax.api": ["dfml_jax.teachers", "dfml_jax.training", "dfml_jax.remote", "dfml_jax.serve",
                     "dfml_jax.distill", "dfml_jax.bidf_mkd", "dfml_jax.estimators"],
    "dfml_jax.remote": ["dfml_jax.teachers", "dfml_jax.serve", "dfml_jax.distill",
                        "dfml_jax.bidf_mkd"],
    "dfml_jax.training": ["dfml_jax.teachers", "dfml_jax.remote", "dfml_jax.serve",
                          "dfml_jax.distill", "dfml_jax.bidf_mkd"],
    "dfml_jax.teachers": ["dfml_jax.remote", "dfml_jax.serve", "dfml_jax.distill",
                          "dfml_jax.bidf_mkd"],
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_reexport_the_moved_names(old):
    shim = importlib.import_module(old)
    new = [importlib.import_module(m) for m in MOVED[old]]
    assert shim.__all__, old
    for name in shim.__all__:
        assert any(getattr(m, name, None) is getattr(shim, name) for m in new), (old, name)


def test_optimisers_still_import_from_the_student_module():
    from dfml_jax.distill import student
    from dfml_jax.training import optim

    assert student.torch_sgd is optim.torch_sgd
    assert student.multistep_schedule is optim.multistep_schedule


def _graph():
    mods = module_graph.modules()
    graph = {}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = module_graph.ast.parse(f.read())
        top, inner = module_graph.imports(mod, tree, set(mods), path.endswith("__init__.py"))
        graph[mod] = top | inner
    return graph


def _within(mod, pkg):
    return mod == pkg or mod.startswith(pkg + ".")


def test_no_import_cycle_and_arrows_point_down():
    graph = _graph()
    assert module_graph.cycles(graph) == []
    upward = [(m, d) for m, deps in graph.items() for pkg, above in FORBIDDEN.items()
              if _within(m, pkg) for d in deps for a in above if _within(d, a)]
    assert upward == []
