"""Every module of the package imports on its own (no module is reached only by slow tests, and
none breaks at import on a machine without a GPU)."""

import importlib
import pkgutil

import pytest

import online_stablerep

MODULES = [m.name for m in pkgutil.walk_packages(online_stablerep.__path__, "online_stablerep.")]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
