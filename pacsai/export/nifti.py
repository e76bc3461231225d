"""pacsai volumes → NIfTI files whose voxels sit where the DICOM put them.

pacsai volumes are (z, y, x) arrays with an affine to DICOM patient coordinates (LPS, mm; see
:mod:`pacsai.imaging.geometry`). NIfTI stores (i, j, k) arrays with an affine to RAS: so the array is transposed
and the affine's first two rows change sign (LPS → RAS). Both the qform and the sform hold it (code 1,
"scanner"), so that readers that prefer either (ITK/SimpleITK, nibabel, MONAI) agree on every voxel's position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from pacsai.errors import PacsaiError
from pacsai.imaging.geometry import affine_of

#: LPS ↔ RAS: x and y change sign, z stays.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ExportError(PacsaiError):
    """A research export cannot be written as asked (the message names the case/UID and the fix)."""


def nifti_affine(volume: xr.DataArray) -> np.ndarray:
    """The NIfTI (RAS) affine of a pacsai volume: ``LPS_TO_RAS @ affine``, indices (i, j, k)."""
    return LPS_TO_RAS @ affine_of(volume)


def image_array(volume: xr.DataArray) -> np.ndarray:
    """The HU values as (i, j, k): int16 where every value is a whole number that fits, else float32.

    CT rescaled with slope 1 gives whole HU: int16 keeps the file small and nnU-Net's CT normalisation
    reads it the same. Anything else (a non-integral slope, NaN padding) keeps its values as float32.
    """
    data = np.asarray(volume.values)
    finite = np.isfinite(data).all()
    if finite and np.array_equal(data, np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
        out = data.astype(np.int16)
    else:
        out = data.astype(np.float32)
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def label_map(
    masks: Mapping[str, xr.DataArray], structures: Sequence[str], *, case: str
) -> np.ndarray:
    """One uint8 label per voxel, (z, y, x): 0 background, ``structures[n]`` → n + 1; later structures win.

    Overlapping ROIs (a GTV inside a lung) cannot share a voxel in a label map: the later one in ``structures``
    wins, so list containers (BODY, lungs) before what lies inside them.

    Raises
    ------
    ExportError
        A structure is absent or empty in ``masks`` (an empty label would train "nothing here" as truth).
    """
    if len(structures) > 254:
        raise ExportError(f"{len(structures)} structures do not fit a uint8 label map (at most 254)")
    shape = next(iter(masks.values())).shape if masks else None
    if shape is None:
        raise ExportError(f"case {case}: no structures were read; check the RTSTRUCT")
    labels = np.zeros(shape, dtype=np.uint8)
    for value, name in enumerate(structures, start=1):
        if name not in masks:
            raise ExportError(f"case {case}: structure {name!r} is missing (has {sorted(masks)}); "
                              "drop it from --structures or the patient from the cohort")
        mask = np.asarray(masks[name].values, dtype=bool)
        if not mask.any():
            raise ExportError(f"case {case}: structure {name!r} is empty; drop it from --structures or the "
                              "patient from the cohort")
        labels[mask] = value
    return labels


def write_nifti(array_ijk: np.ndarray, affine_ras: np.ndarray, path: Path) -> Path:
    """Write an (i, j, k) array with its RAS affine as NIfTI-1 (``.nii.gz``); no free-text header fields."""
    import nibabel as nib

    image = nib.Nifti1Image(array_ijk, affine_ras)
    image.set_qform(affine_ras, code=1)
    image.set_sform(affine_ras, code=1)
    image.header["descrip"] = b""  # nibabel leaves it empty; stated so no identifier is ever put there
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def write_case(
    volume: xr.DataArray, labels_zyx: np.ndarray | None, image_path: Path, label_path: Path | None
) -> None:
    """Write a case's image and (where given) its label map on the same grid."""
    affine = nifti_affine(volume)
    write_nifti(image_array(volume), affine, image_path)
    if labels_zyx is not None and label_path is not None:
        write_nifti(np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)), affine, label_path)
