"""Every public docstring example runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import margin_regs

# The harness subpackage's modules too (walk_packages recurses into it).
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(margin_regs.__path__, "margin_regs.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
