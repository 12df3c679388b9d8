"""Every docstring example in the library runs and prints what it says (optax style)."""
import doctest
import importlib
import pkgutil

import pytest

import dfml_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(dfml_jax.__path__, "dfml_jax.")
                 if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
