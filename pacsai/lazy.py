"""Lazy re-exports for the packages' ``__init__``: a name loads its module on first use, so that importing a
package (and ``pacsai --help``) does not import NumPy, pandas, torch or MONAI behind it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any


def attribute(package: str, names: Mapping[str, str], name: str, namespace: MutableMapping[str, Any]) -> Any:
    """``package``'s ``name``, imported from the module ``names[name]`` and kept in ``namespace`` (the package's
    ``globals()``: the next access does not come here).

    Raises
    ------
    AttributeError
        ``name`` is not one of the package's lazy names (as for any missing module attribute).
    """
    try:
        module = names[name]
    except KeyError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    namespace[name] = value
    return value
