"""pacsai: imaging AI for oncology, from the PACS to a validated model to a planning report. Research use only.

The public API is imported lazily so that ``import pacsai`` stays fast and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

RESEARCH_USE_ONLY = "Research use only. Not for clinical decision making."

_LAZY = {
    "connect": ("pacsai.pacs", "connect"),
    "Pacs": ("pacsai.pacs", "Pacs"),
    "Settings": ("pacsai.config", "Settings"),
    "load_settings": ("pacsai.config", "load_settings"),
    "read_series": ("pacsai.imaging", "read_series"),
    "read_seg": ("pacsai.imaging", "read_seg"),
    "read_rtstruct": ("pacsai.imaging", "read_rtstruct"),
    "read_dose": ("pacsai.imaging", "read_dose"),
    "write_seg": ("pacsai.imaging", "write_seg"),
    "write_rtstruct": ("pacsai.imaging", "write_rtstruct"),
    "resample": ("pacsai.imaging", "resample"),
}


if TYPE_CHECKING:  # pragma: no cover
    # Re-exported for type checkers (``import x as x``); at run time :func:`__getattr__` imports them lazily.
    from pacsai.config import Settings as Settings
    from pacsai.config import load_settings as load_settings
    from pacsai.imaging import read_dose as read_dose
    from pacsai.imaging import read_rtstruct as read_rtstruct
    from pacsai.imaging import read_seg as read_seg
    from pacsai.imaging import read_series as read_series
    from pacsai.imaging import resample as resample
    from pacsai.imaging import write_rtstruct as write_rtstruct
    from pacsai.imaging import write_seg as write_seg
    from pacsai.pacs import Pacs as Pacs
    from pacsai.pacs import connect as connect


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'pacsai' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["RESEARCH_USE_ONLY", "__version__", *_LAZY]
