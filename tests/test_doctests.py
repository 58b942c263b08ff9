"""Every public docstring example runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import margin_regs

MODULES = sorted(
    m.name
    for m in pkgutil.iter_modules(margin_regs.__path__, "margin_regs.")
    if m.name != "margin_regs.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
