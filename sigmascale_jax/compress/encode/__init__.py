"""Encoders (how to store what is left). Every module here registers itself in `plan.ENCODERS`.

Adding a method is adding a module: this package imports all of its modules.
"""

import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_m.name}")
