"""Loss-balancing strategies. Importing this package imports every module in it, which
registers each strategy in :data:`mtlrec.registry.WEIGHTINGS` (a new strategy is a new module)."""

import importlib as _importlib
import pkgutil as _pkgutil

from mtlrec.weighting.base import Weighting
from mtlrec.weighting.build import build_weighting

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Weighting", "build_weighting"]
