"""Names a package re-exports without importing their modules until first use (PEP 562).

``annify``, ``annify.data`` and ``annify.eann`` keep ``import annify`` and the command line's
``--help`` free of torch this way: each holds a dict name -> defining module, and its module-level
``__getattr__`` calls ``load``.
"""

from __future__ import annotations

import importlib


def load(namespace: dict, exports: dict[str, str], name: str) -> object:
    """``name`` from its module ``exports[name]``, kept in ``namespace`` (the package's ``globals()``)
    so the next lookup is a plain one; AttributeError for a name not in ``exports``."""
    if name not in exports:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(exports[name]), name)
    namespace[name] = value
    return value
