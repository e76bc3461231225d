"""Cohort → preprocessed training cases (cached on disk) → MONAI datasets.

Preprocessing (:class:`PreprocessSpec`, saved with every model so inference repeats it exactly):

1. resample the image onto a grid with the same origin and axis directions and the training spacing
   (trilinear; masks: trilinear on 0/1 then ≥ 0.5, so thin structures keep their centre line);
2. clip HU to the window and scale it to [0, 1];
3. crop to the body: the bounding box of the largest connected region above ``body_threshold_hu``, plus a
   margin. The box comes from the image alone (not the BODY ROI) so inference, which has no ROIs, crops the same.

Labels are cached multi-label: one channel per structure in the YAML's order, so overlapping ROIs (a GTV inside a
lung) all stay intact. The training head (:class:`pacsai.learning.train.Head`) turns them into what the loss needs:
a class map where later structures win (softmax, the default) or the channels as they are (sigmoid).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from scipy import ndimage

from pacsai.errors import PacsaiWarning, StructureError, VolumeError
from pacsai.imaging.geometry import affine_of, make_volume

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.cohort import Cohort
    from pacsai.pacs import Pacs

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the preprocessing code changes what it writes


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become network inputs; stored in the model's metadata.

    Attributes
    ----------
    spacing_mm
        Training voxel size along (i, j, k) = (x, y, z), mm.
    window
        HU window (low, high) mapped to [0, 1].
    structures
        Output channels, in order.
    body_threshold_hu
        Voxels above this HU count as body when cropping.
    margin_mm
        Margin around the body box.
    """

    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    window: tuple[float, float] = (-1000.0, 500.0)
    structures: tuple[str, ...] = ()
    body_threshold_hu: float = -500.0
    margin_mm: float = 8.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "window", tuple(float(w) for w in self.window))
        object.__setattr__(self, "structures", tuple(str(s) for s in self.structures))
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise VolumeError(f"preprocess spacing_mm must be three positive numbers, got {self.spacing_mm}")
        if len(self.window) != 2 or self.window[1] <= self.window[0]:
            raise VolumeError(f"preprocess window must be (low, high) with low < high, got {self.window}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        known = {"spacing_mm", "window", "structures", "body_threshold_hu", "margin_mm"}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})

    def key(self) -> str:
        """A short hash of every field (the cache key part that says *how* a case was preprocessed)."""
        text = json.dumps({**self.to_dict(), "v": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Case:
    """One preprocessed case: image (1, z, y, x) float32 in [0, 1], labels (C, z, y, x) uint8, its affine."""

    key: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    patient: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...] = ()

    def as_item(self) -> dict[str, Any]:
        # "fg" (any structure) picks patch centres: MONAI would read a multi-channel label as one-hot
        # and skip its first channel
        fg = self.label.any(axis=0, keepdims=True).astype(np.float32)
        return {"image": self.image, "label": self.label.astype(np.float32), "fg": fg}


# ---------------------------------------------------------------------------------------------------- grids


def sample(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    *,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample ``array`` (z, y, x; grid ``src_affine``) at every voxel centre of the grid (``dst_affine``, shape).

    Exact for any pair of affines: the destination index maps to the source index by ``inv(src) @ dst``.
    Within one voxel outside the source the edge value is used (so that a destination voxel centre lying on the
    source's edge, give or take rounding, is not lost); farther out the value is ``cval``.
    """
    m = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(dst_affine, float)  # (i,j,k) → (i,j,k)
    p = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)  # (i,j,k) ↔ (k,j,i)
    lin = p @ m[:3, :3] @ p
    off = p @ m[:3, 3]
    if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9):
        lin = np.diag(lin)  # scipy's fast path for axis-aligned scaling
    padded = np.pad(np.asarray(array), 1, mode="edge")
    return ndimage.affine_transform(
        padded, lin, offset=off + 1.0, output_shape=tuple(dst_shape), order=order, cval=cval, mode="constant"
    )


def training_grid(
    volume: xr.DataArray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid with ``volume``'s origin and directions and the given spacing, inside its extent."""
    affine = affine_of(volume)
    old = np.linalg.norm(affine[:3, :3], axis=0)  # (Δi, Δj, Δk)
    new = np.asarray(spacing_mm, float)
    nz, ny, nx = volume.shape
    extent = (np.array([nx, ny, nz]) - 1) * old
    n = np.floor(extent / new + 1e-6).astype(int) + 1
    grid = affine.copy()
    grid[:3, :3] = affine[:3, :3] / old[None, :] * new[None, :]
    return grid, (int(n[2]), int(n[1]), int(n[0]))


def body_box(
    image_hu: np.ndarray, *, threshold_hu: float, margin_vox: Sequence[int]
) -> tuple[slice, slice, slice]:
    """Bounding box (z, y, x slices) of the largest connected region above ``threshold_hu``, plus a margin."""
    body = image_hu > threshold_hu
    labels, n = ndimage.label(body)
    if n == 0:
        warnings.warn(
            "no voxel above the body threshold; the image is not cropped", PacsaiWarning, stacklevel=2
        )
        return tuple(slice(0, s) for s in image_hu.shape)  # type: ignore[return-value]
    sizes = ndimage.sum_labels(body, labels, index=np.arange(1, n + 1))
    box = ndimage.find_objects((labels == int(np.argmax(sizes)) + 1).astype(np.int8))[0]
    return tuple(  # type: ignore[return-value]
        slice(max(0, b.start - m), min(s, b.stop + m)) for b, m, s in zip(box, margin_vox, image_hu.shape)
    )


def _shift(affine: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    out = affine.copy()
    ijk0 = np.array([box[2].start, box[1].start, box[0].start, 1.0])
    out[:3, 3] = (affine @ ijk0)[:3]
    return out


def preprocess_image(
    volume: xr.DataArray, spec: PreprocessSpec
) -> tuple[xr.DataArray, tuple[slice, slice, slice]]:
    """Resample, window and crop an HU volume as for training.

    Returns
    -------
    (xarray.DataArray, tuple of slices)
        The network input (float32, [0, 1]) on the cropped training grid (its own affine), and the crop box
        within the full training grid.
    """
    grid, shape = training_grid(volume, spec.spacing_mm)
    hu = sample(np.asarray(volume.values, np.float32), affine_of(volume), grid, shape, order=1, cval=-1024.0)
    margin = [int(np.ceil(spec.margin_mm / s)) for s in spec.spacing_mm[::-1]]
    box = body_box(hu, threshold_hu=spec.body_threshold_hu, margin_vox=margin)
    lo, hi = spec.window
    image = ((np.clip(hu[box], lo, hi) - lo) / (hi - lo)).astype(np.float32)
    return make_volume(image, _shift(grid, box), name="image"), box


def preprocess_case(
    volume: xr.DataArray, masks: Mapping[str, xr.DataArray], spec: PreprocessSpec
) -> tuple[xr.DataArray, np.ndarray]:
    """Preprocess an image and its masks: (network input volume, labels (C, z, y, x) uint8 on the same grid)."""
    image, _ = preprocess_image(volume, spec)
    dst = affine_of(image)
    channels = []
    for name in spec.structures:
        if name not in masks:
            raise StructureError(f"structure {name!r} missing; available: {sorted(masks)}")
        m = masks[name]
        prob = sample(np.asarray(m.values, np.float32), affine_of(m), dst, image.shape, order=1)
        channels.append(prob >= 0.5)
    label = np.stack(channels).astype(np.uint8) if channels else np.zeros((0, *image.shape), np.uint8)
    return image, label


# ---------------------------------------------------------------------------------------------------- cohort


def match_structures(names: Iterable[str], wanted: Sequence[str]) -> dict[str, str]:
    """Map each wanted structure to the RTSTRUCT's ROI name (case-insensitive); absent ones are left out."""
    lower = {n.lower(): n for n in names}
    return {w: lower[w.lower()] for w in wanted if w.lower() in lower}


def load_reference(
    pacs: Pacs, row: Any, structures: Sequence[str]
) -> tuple[xr.DataArray, dict[str, xr.DataArray]]:
    """Retrieve and read a cohort row: the image volume and its reference masks (named as in ``structures``).

    Raises
    ------
    StructureError
        The RTSTRUCT lacks one of ``structures``.
    """
    from pacsai.imaging import read_rtstruct, read_series

    files = pacs.retrieve_series(row.study_instance_uid, row.series_instance_uid, progress=False)
    volume = read_series(files)
    rt_files = pacs.retrieve_series(row.study_instance_uid, row.rtstruct_series_uid, progress=False)
    masks = read_rtstruct(pick_rtstruct(rt_files, row.rtstruct_sop_instance_uid), like=volume)
    mapping = match_structures(masks, structures)
    missing = [s for s in structures if s not in mapping]
    if missing:
        raise StructureError(
            f"RTSTRUCT {row.rtstruct_sop_instance_uid} lacks ROIs {missing} (has {sorted(masks)}); "
            "fix the experiment's structures or the cohort query"
        )
    return volume, {s: masks[mapping[s]] for s in structures}


def load_case(
    pacs: Pacs, row: Any, spec: PreprocessSpec, *, cache_dir: str | Path, patient: str | None = None
) -> Case:
    """Retrieve, read and preprocess one cohort row, or load it from the on-disk cache.

    The cache key is the image series UID, the RTSTRUCT SOP instance UID and :meth:`PreprocessSpec.key`;
    entries are written atomically (temp file + rename).
    """
    key = f"{row.series_instance_uid}-{row.rtstruct_sop_instance_uid or 'none'}-{spec.key()}"
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    label_name = patient if patient is not None else str(row.patient_id)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return Case(
                    key=key,
                    image=z["image"],
                    label=z["label"],
                    affine=z["affine"],
                    patient=label_name,
                    series_instance_uid=str(row.series_instance_uid),
                    sop_instance_uids=tuple(str(u) for u in z["sop_instance_uids"]),
                )
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(
                f"preprocessing cache entry {path} is unreadable ({err}); rebuilding it",
                PacsaiWarning,
                stacklevel=2,
            )
    volume, masks = load_reference(pacs, row, spec.structures)
    image, label = preprocess_case(volume, masks, spec)
    sop_uids = tuple(str(u) for u in volume.attrs.get("sop_instance_uids", ()))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(
            fh,
            image=image.values[None].astype(np.float32),
            label=label,
            affine=affine_of(image),
            sop_instance_uids=np.array(sop_uids, dtype=str),
        )
    os.replace(tmp, path)
    return Case(
        key=key,
        image=image.values[None].astype(np.float32),
        label=label,
        affine=affine_of(image),
        patient=label_name,
        series_instance_uid=str(row.series_instance_uid),
        sop_instance_uids=sop_uids,
    )


def pick_rtstruct(files: Sequence[Path], sop_uid: str) -> Path:
    """The file among ``files`` whose SOP Instance UID is ``sop_uid``."""
    import pydicom

    for f in files:
        if (
            str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            == sop_uid
        ):
            return Path(f)
    raise StructureError(
        f"RTSTRUCT instance {sop_uid} is not among the retrieved files {[str(f) for f in files]}"
    )


def load_cases(
    pacs: Pacs,
    cohort: Cohort,
    spec: PreprocessSpec,
    *,
    cache_dir: str | Path,
    patients: Iterable[str] | None = None,
    patient_label: Any = None,
    progress: bool = True,
) -> list[Case]:
    """Preprocessed cases of the cohort's rows (all, or those of ``patients``), with a progress bar."""
    from tqdm.auto import tqdm

    table = cohort.table if patients is None else cohort.table[cohort.table["patient_id"].isin(set(patients))]
    cases = []
    for row in tqdm(list(table.itertuples()), desc="preprocess", unit="series", disable=not progress):
        label = patient_label(str(row.patient_id)) if patient_label is not None else str(row.patient_id)
        cases.append(load_case(pacs, row, spec, cache_dir=cache_dir, patient=label))
    return cases


def training_dataset(
    cases: Sequence[Case], *, patch_size: Sequence[int], samples_per_case: int = 2, seed: int = 0
) -> Any:
    """A MONAI dataset of random patches (padded where a case is smaller than a patch).

    Patch centres fall on foreground (any structure) and background at 3:1 (``RandCropByPosNegLabeld``);
    no left-right flips (they would swap Lung_L and Lung_R).
    """
    from monai.data import Dataset
    from monai.transforms import (
        Compose,
        DeleteItemsd,
        RandCropByPosNegLabeld,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    patch = [int(p) for p in patch_size]
    transforms = Compose(
        [
            SpatialPadd(keys=("image", "label", "fg"), spatial_size=patch, mode="constant"),
            RandCropByPosNegLabeld(
                keys=("image", "label"),
                label_key="fg",
                spatial_size=patch,
                pos=3,
                neg=1,
                num_samples=int(samples_per_case),
                allow_smaller=False,
            ),
            DeleteItemsd(keys="fg"),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ]
    )
    transforms.set_random_state(seed=seed)
    return Dataset(data=[c.as_item() for c in cases], transform=transforms)
