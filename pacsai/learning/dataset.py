"""Cohort → preprocessed training cases (cached on disk) → random training patches.

Preprocessing (:class:`PreprocessSpec`, saved with every model so inference repeats it exactly):

1. resample the image onto a grid with the same origin and axis directions and the training spacing
   (trilinear; masks: trilinear on 0/1 then ≥ 0.5, so thin structures keep their centre line);
2. clip HU to the window and scale it to [0, 1];
3. crop to the body: the bounding box of the largest connected region above ``body_threshold_hu``, plus a
   margin. The box comes from the image alone (not the BODY ROI) so inference, which has no ROIs, crops the same.

Labels are cached multi-label: one channel per structure in the YAML's order, so overlapping ROIs (a GTV inside a
lung) all stay intact. The training head (:class:`pacsai.learning.train.Head`) turns them into what the loss needs:
a class map where later structures win (softmax, the default) or the channels as they are (sigmoid).

Each cache entry also keeps the case's image statistics and reference structure volumes, measured on the raw HU
volume before preprocessing (:func:`pacsai.domain.image_stats`, :func:`pacsai.domain.structure_volumes`): the
model's training domain is built from them without reading the images again.

Patches (:class:`PatchSampler`) are centred on a class drawn with per-class weights, so small structures (cord,
GTV) get their share of patch centres however few voxels they have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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

CACHE_VERSION = 3  # bump when the preprocessing code changes what it writes


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
    antialias
        Smooth an image that is finer than the training grid before resampling it (Gaussian, σ = (factor − 1) / 2
        voxels per axis), so a 0.98 mm CT's noise and edges reach the coarser grid as a scanner with that voxel
        size would show them, instead of aliased samples.
    """

    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    window: tuple[float, float] = (-1000.0, 500.0)
    structures: tuple[str, ...] = ()
    body_threshold_hu: float = -500.0
    margin_mm: float = 8.0
    antialias: bool = False

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
        known = {"spacing_mm", "window", "structures", "body_threshold_hu", "margin_mm", "antialias"}
        fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**fields)

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
    #: :func:`pacsai.domain.image_stats` of the raw HU volume ({} where pacsai.domain was unavailable)
    stats: Mapping[str, Any] = field(default_factory=dict)
    #: reference structure volumes (cc) on the image's own grid
    volumes_cc: Mapping[str, float] = field(default_factory=dict)


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
        # axis-aligned: trilinear is separable, three 1D passes (several times faster)
        if order == 1 and np.issubdtype(np.asarray(array).dtype, np.floating):
            return _separable_linear(np.asarray(array), np.diag(lin), off, tuple(dst_shape), cval)
        lin = np.diag(lin)  # scipy's fast path for axis-aligned scaling
    padded = np.pad(np.asarray(array), 1, mode="edge")
    return ndimage.affine_transform(
        padded, lin, offset=off + 1.0, output_shape=tuple(dst_shape), order=order, cval=cval, mode="constant"
    )


def _separable_linear(
    array: np.ndarray, scale: np.ndarray, offset: np.ndarray, dst_shape: tuple[int, ...], cval: float
) -> np.ndarray:
    """:func:`sample` with ``order=1`` for a diagonal index map (source index = scale · index + offset), as three
    1D linear interpolations; same edge rule (one voxel of edge value, then ``cval``)."""
    out = array
    invalid = np.zeros(dst_shape, dtype=bool)
    for axis in (2, 1, 0):  # x first: the coarse source axes shrink the work of the later passes
        n = out.shape[axis]
        t = scale[axis] * np.arange(dst_shape[axis]) + offset[axis]
        bad = (t < -1.0 - 1e-6) | (t > n + 1e-6)  # the padded source spans [-1, n]
        tc = np.clip(t, 0.0, n - 1.0)  # within the pad the edge value is used
        i0 = np.minimum(np.floor(tc).astype(np.intp), max(n - 2, 0))
        w = (tc - i0).astype(out.dtype)
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1, 1, 1]
        shape[axis] = -1
        w = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
        if bad.any():
            idx = [slice(None)] * 3
            idx[axis] = bad
            invalid[tuple(idx)] = True
    out = out.astype(array.dtype, copy=False)
    if invalid.any():
        out[invalid] = cval
    return out


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
        nz, ny, nx = image_hu.shape
        return slice(0, nz), slice(0, ny), slice(0, nx)
    sizes = ndimage.sum_labels(body, labels, index=np.arange(1, n + 1))
    box = ndimage.find_objects((labels == int(np.argmax(sizes)) + 1).astype(np.int8))[0]
    z, y, x = (
        slice(max(0, b.start - m), min(s, b.stop + m))
        for b, m, s in zip(box, margin_vox, image_hu.shape, strict=True)
    )
    return z, y, x


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
    source = np.asarray(volume.values, np.float32)
    if spec.antialias:
        source = antialiased(source, spacing_zyx=_spacing_zyx(affine_of(volume)), target_zyx=spec.spacing_mm[::-1])
    hu = sample(source, affine_of(volume), grid, shape, order=1, cval=-1024.0)
    margin = [int(np.ceil(spec.margin_mm / s)) for s in spec.spacing_mm[::-1]]
    box = body_box(hu, threshold_hu=spec.body_threshold_hu, margin_vox=margin)
    lo, hi = spec.window
    image = ((np.clip(hu[box], lo, hi) - lo) / (hi - lo)).astype(np.float32)
    return make_volume(image, _shift(grid, box), name="image"), box


def _spacing_zyx(affine: np.ndarray) -> tuple[float, float, float]:
    sx, sy, sz = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    return (float(sz), float(sy), float(sx))


def antialiased(
    hu: np.ndarray, *, spacing_zyx: Sequence[float], target_zyx: Sequence[float]
) -> np.ndarray:
    """Gaussian prefilter before downsampling from ``spacing_zyx`` to ``target_zyx`` (σ = (factor − 1) / 2 voxels
    along each axis that gets coarser); the input itself where no axis does."""
    sigma = [max(0.0, (t / s - 1.0) / 2.0) for s, t in zip(spacing_zyx, target_zyx, strict=True)]
    if max(sigma) < 0.1:
        return hu
    return ndimage.gaussian_filter(hu, sigma=sigma, truncate=3.0)


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
        nz, ny, nx = image.shape
        prob = sample(np.asarray(m.values, np.float32), affine_of(m), dst, (nz, ny, nx), order=1)
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


def cache_key(row: Any, spec: PreprocessSpec) -> str:
    """What identifies a cohort row's preprocessed case: image series, RTSTRUCT instance, preprocessing."""
    return f"{row.series_instance_uid}-{row.rtstruct_sop_instance_uid or 'none'}-{spec.key()}"


def cache_file(row: Any, spec: PreprocessSpec, cache_dir: str | Path) -> Path:
    """Where :func:`load_case` keeps a cohort row's preprocessed case (also written by
    :mod:`pacsai.learning.preprocess_dask` on a cluster)."""
    return Path(cache_dir) / f"{hashlib.sha256(cache_key(row, spec).encode()).hexdigest()[:32]}.npz"


def load_case(
    pacs: Pacs, row: Any, spec: PreprocessSpec, *, cache_dir: str | Path, patient: str | None = None
) -> Case:
    """Retrieve, read and preprocess one cohort row, or load it from the on-disk cache.

    The cache key is the image series UID, the RTSTRUCT SOP instance UID and :meth:`PreprocessSpec.key`;
    entries are written atomically (temp file + rename).
    """
    key = cache_key(row, spec)
    path = cache_file(row, spec, cache_dir)
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
                    stats=json.loads(str(z["stats"])),
                    volumes_cc=json.loads(str(z["volumes_cc"])),
                )
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(
                f"preprocessing cache entry {path} is unreadable ({err}); rebuilding it",
                PacsaiWarning,
                stacklevel=2,
            )
    volume, masks = load_reference(pacs, row, spec.structures)
    stats, volumes_cc = case_statistics(volume, masks)
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
            stats=np.array(json.dumps(stats)),
            volumes_cc=np.array(json.dumps(volumes_cc)),
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
        stats=stats,
        volumes_cc=volumes_cc,
    )


def case_statistics(
    volume: xr.DataArray, masks: Mapping[str, xr.DataArray]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Image statistics of the raw HU volume and the reference structure volumes (for the training domain).

    JSON round trip, so a fresh case and a cached one carry identical values.
    """
    from pacsai.domain import image_stats, structure_volumes

    stats = json.loads(json.dumps(image_stats(volume), default=_plain))
    volumes = {str(k): float(v) for k, v in structure_volumes(masks).items()}
    return stats, volumes


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


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


def class_map(label: np.ndarray) -> np.ndarray:
    """Multi-label (C, z, y, x) → class index map (z, y, x): 0 background, k + 1 where channel k is set and no
    later channel is (later structures win, as in the softmax head)."""
    out = np.zeros(label.shape[1:], dtype=np.uint8)
    for k in range(label.shape[0]):
        out[label[k] > 0] = k + 1
    return out


@dataclass(frozen=True)
class Augment:
    """Intensity and resolution augmentation on windowed [0, 1] patches (no flips: left must stay left).

    Each draw applies, with its probability: an in-plane zoom (the patch is cut from a region ``f`` times its
    size, ``f`` log-uniform in ``zoom`` = (low, high); f < 1 shows the anatomy larger, as in a bigger patient),
    a scale of the intensities by U(1 ± ``scale``), a shift by U(± ``shift``), Gaussian noise with a standard
    deviation up to ``noise`` (window units; 0.02 ≈ 30 HU) and an in-plane Gaussian blur of up to ``blur`` voxels
    (a softer reconstruction kernel, partial volume).
    """

    scale: float = 0.1
    shift: float = 0.05
    noise: float = 0.0
    blur: float = 0.0
    p_scale: float = 0.5
    p_shift: float = 0.5
    p_noise: float = 0.0
    p_blur: float = 0.0
    zoom: tuple[float, float] = (1.0, 1.0)
    p_zoom: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Augment:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise VolumeError(f"train.augment has unknown keys {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for k, v in (d or {}).items():
            values[k] = (float(v[0]), float(v[1])) if k == "zoom" else float(v)
        return cls(**values)

    def zoom_factor(self, rng: np.random.Generator) -> float:
        """Source voxels per patch voxel in-plane (1: no zoom)."""
        lo, hi = self.zoom
        if not self.p_zoom or hi <= lo or rng.random() >= self.p_zoom:
            return 1.0
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image
        if self.p_blur and rng.random() < self.p_blur:
            sigma = float(rng.uniform(0.0, self.blur))
            out = ndimage.gaussian_filter(out, sigma=(0.0, 0.0, sigma, sigma), truncate=2.5)
        if self.p_scale and rng.random() < self.p_scale:
            out = out * np.float32(rng.uniform(1.0 - self.scale, 1.0 + self.scale))
        if self.p_shift and rng.random() < self.p_shift:
            out = out + np.float32(rng.uniform(-self.shift, self.shift))
        if self.p_noise and rng.random() < self.p_noise:
            sd = float(rng.uniform(0.0, self.noise))
            out = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(sd)
        return np.asarray(out, dtype=np.float32)


class PatchSampler:
    """Random training patches whose centres are drawn class by class.

    For each patch a class (background or a structure, as in :func:`class_map`) is drawn with ``class_weights``
    among the classes the chosen case has, then a voxel of that class is the patch centre (the patch is shifted
    to lie inside the case, which is padded with air where it is smaller than a patch). Deterministic from the
    ``rng`` it is given; no global random state.

    Parameters
    ----------
    cases
        Preprocessed cases.
    patch_size
        (z, y, x) voxels.
    class_weights
        One weight per class: background first, then one per structure.
    rng
        The random stream (``numpy.random.default_rng(seed)``).
    augment
        Intensity/resolution augmentation; default intensity scale and shift only.
    max_centres
        Candidate centres kept per class and case (a random subset; keeps memory small).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        *,
        patch_size: Sequence[int],
        class_weights: Sequence[float],
        rng: np.random.Generator,
        augment: Augment | None = None,
        max_centres: int = 20000,
    ) -> None:
        if not cases:
            raise VolumeError("no training case to draw patches from")
        self.patch = tuple(int(p) for p in patch_size)
        self.rng = rng
        self.augment = augment or Augment()
        n_classes = cases[0].label.shape[0] + 1
        weights = np.asarray(class_weights, dtype=float)
        if weights.shape != (n_classes,) or weights.min() < 0 or weights.sum() <= 0:
            raise VolumeError(
                f"class weights {list(weights)} need {n_classes} non-negative entries (background + structures)"
            )
        self.weights = weights
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._centres: list[list[np.ndarray]] = []
        for case in cases:
            pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(self.patch, case.image.shape[1:], strict=True)]
            image = np.pad(case.image, pad) if any(p[1] for p in pad) else case.image
            label = np.pad(case.label, pad) if any(p[1] for p in pad) else case.label
            classes = class_map(label).ravel()
            per_class = []
            for k in range(n_classes):
                idx = np.flatnonzero(classes == k)
                if len(idx) > max_centres:
                    idx = np.sort(rng.choice(idx, size=max_centres, replace=False))
                per_class.append(idx.astype(np.int64))
            self._images.append(np.ascontiguousarray(image, dtype=np.float32))
            self._labels.append(label)
            self._centres.append(per_class)

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """One patch: image (1, *patch) float32 (augmented) and multi-label (C, *patch) float32."""
        c = int(self.rng.integers(len(self._images)))
        centres = self._centres[c]
        w = self.weights * np.array([len(idx) > 0 for idx in centres])
        k = int(self.rng.choice(len(w), p=w / w.sum()))
        flat = int(centres[k][int(self.rng.integers(len(centres[k])))])
        shape = self._images[c].shape[1:]
        centre = tuple(int(v) for v in np.unravel_index(flat, shape))
        f = self.augment.zoom_factor(self.rng)
        if f != 1.0:
            image, label = self._zoomed(c, centre, f)
        else:
            start = [int(np.clip(ci - p // 2, 0, s - p)) for ci, p, s in zip(centre, self.patch, shape, strict=True)]
            box = tuple(slice(s0, s0 + p) for s0, p in zip(start, self.patch, strict=True))
            index = (slice(None), *box)
            image = self._images[c][index]
            label = self._labels[c][index].astype(np.float32)
        return self.augment(image, self.rng), label

    def _zoomed(self, c: int, centre: Sequence[int], f: float) -> tuple[np.ndarray, np.ndarray]:
        """The patch around ``centre`` cut from a region ``f`` times the patch in-plane, resampled to the patch
        (image trilinear, air outside the case; labels nearest)."""
        shape = self._images[c].shape[1:]
        scale = np.array([1.0, f, f])
        extent = np.array(self.patch) * scale
        start = [
            float(np.clip(ci - e / 2.0, min(0.0, s - e), max(0.0, s - e)))
            for ci, e, s in zip(centre, extent, shape, strict=True)
        ]
        offset = np.array(start) + (scale - 1.0) / 2.0  # voxel centres of the patch in source indices
        image = _separable_linear(self._images[c][0], scale, offset, self.patch, 0.0)[None]
        idx = [
            np.clip(np.rint(offset[a] + scale[a] * np.arange(self.patch[a])).astype(np.intp), 0, shape[a] - 1)
            for a in range(3)
        ]
        label = self._labels[c][:, idx[0]][:, :, idx[1]][:, :, :, idx[2]].astype(np.float32)
        inside = [(offset[a] + scale[a] * np.arange(self.patch[a]) > -0.5)
                  & (offset[a] + scale[a] * np.arange(self.patch[a]) < shape[a] - 0.5) for a in range(3)]
        label *= (inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])[None]
        return image.astype(np.float32), label

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` patches stacked: (B, 1, *patch) and (B, C, *patch)."""
        pairs = [self.draw() for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
