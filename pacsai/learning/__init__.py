"""④ Learning: the only package that imports torch and MONAI (in its submodules, on first use).

``import pacsai.learning`` itself stays light; the names below load their module when first touched:
:func:`load_experiment` (:mod:`.train`; the training function is ``pacsai.learning.train.train``: a
lazy name ``train`` would clash with the submodule), :func:`segment` (:mod:`.infer`),
:func:`evaluate_structures` (:mod:`.evaluate`), :func:`build_network` (:mod:`.networks`), :class:`PreprocessSpec`
(:mod:`.dataset`), :func:`run_validation` (:mod:`.validate`).
"""

from __future__ import annotations

from typing import Any

from pacsai import lazy

_LAZY = {
    "load_experiment": "pacsai.learning.train",
    "TrainResult": "pacsai.learning.train",
    "segment": "pacsai.learning.infer",
    "load_model": "pacsai.learning.infer",
    "evaluate_structures": "pacsai.learning.evaluate",
    "agreement": "pacsai.learning.evaluate",
    "build_network": "pacsai.learning.networks",
    "PreprocessSpec": "pacsai.learning.dataset",
    "run_validation": "pacsai.learning.validate",
}


def __getattr__(name: str) -> Any:
    return lazy.attribute(__name__, _LAZY, name, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
