"""Factorizers (how to cut one block). Every module here registers itself in `plan.FACTORIZERS`.

Adding a method is adding a module: this package imports all of its modules.
"""

import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_m.name}")
