"""The public training API survives the import of every moorelm submodule."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import moorelm


def test_public_functions_stay_functions_after_importing_every_submodule():
    """``moorelm.train``, ``moorelm.pretrain`` and ``moorelm.load`` are still the API
    functions once every submodule is imported (a submodule named like a function would
    replace it as an attribute of the package: "'module' object is not callable")."""
    names = [m.name for m in pkgutil.walk_packages(moorelm.__path__, "moorelm.")
             if not m.name.endswith("__main__")]
    for name in names:
        importlib.import_module(name)
    assert "moorelm.finetune.sft" in names
    for fn in (moorelm.train, moorelm.pretrain, moorelm.load):
        assert inspect.isfunction(fn), fn
