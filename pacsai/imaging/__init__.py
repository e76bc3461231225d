"""DICOM image series, structures and dose ↔ geometry-exact arrays (see :mod:`pacsai.imaging.geometry`)."""

from __future__ import annotations

from typing import Any

from pacsai import lazy
from pacsai.imaging.geometry import (
    affine_from,
    affine_of,
    index_to_world,
    make_volume,
    same_grid,
    spacing_of,
    voxel_volume_cc,
    world_to_index,
)

_LAZY = {
    "read_series": "pacsai.imaging.volume",
    "to_sitk": "pacsai.imaging.volume",
    "from_sitk": "pacsai.imaging.volume",
    "to_metatensor": "pacsai.imaging.volume",
    "read_seg": "pacsai.imaging.seg",
    "write_seg": "pacsai.imaging.seg",
    "read_rtstruct": "pacsai.imaging.rtstruct",
    "write_rtstruct": "pacsai.imaging.rtstruct",
    "read_dose": "pacsai.imaging.dose",
    "resample": "pacsai.imaging.dose",
}


def __getattr__(name: str) -> Any:
    return lazy.attribute(__name__, _LAZY, name, globals())


__all__ = [
    "affine_from",
    "affine_of",
    "index_to_world",
    "make_volume",
    "same_grid",
    "spacing_of",
    "voxel_volume_cc",
    "world_to_index",
    *_LAZY,
]
