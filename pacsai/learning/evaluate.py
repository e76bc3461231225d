"""Contour agreement in mm on the true grid: Dice, HD95, mean surface distance, surface Dice at τ mm.

Definitions (DESIGN.md, "Contour agreement"): Dice = 2|A∩B| / (|A| + |B|). The surface of a mask is its voxels
with at least one face-neighbour outside it (6-connectivity; the volume's edge counts as outside). Surface
distances are Euclidean distances in mm between voxel centres, from each surface voxel of A to the nearest
surface voxel of B and back, by an exact Euclidean distance transform with the grid's spacing (so anisotropic
grids are handled exactly). HD95 is the 95th percentile of the pooled symmetric distances, MSD their mean, and
surface Dice at τ the fraction of both surfaces lying within τ mm of the other.

Pure NumPy/SciPy (no torch), so it runs anywhere; MONAI's metrics use a different HD95 (max of the two
directed percentiles) and surface extraction, which is why they are not used here.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

from pacsai.errors import PacsaiWarning, VolumeError
from pacsai.imaging.geometry import affine_of, same_grid, spacing_of

logger = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "msd", "surface_dice")


@dataclass(frozen=True)
class Agreement:
    """Agreement of one predicted structure with its reference (distances in mm)."""

    dice: float
    hd95: float
    msd: float
    surface_dice: float
    volume_pred_cc: float
    volume_ref_cc: float


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of ``mask``: voxels of the mask with a face-neighbour outside it (or on the array edge)."""
    mask = np.asarray(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def _distances_to(
    target_surface: np.ndarray, at: np.ndarray, sampling: tuple[float, float, float]
) -> np.ndarray:
    # EDT of the complement: each voxel's distance (mm) to the nearest surface voxel of the target
    edt = ndimage.distance_transform_edt(~target_surface, sampling=sampling)
    return np.asarray(edt[at], dtype=float)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, *, spacing_zyx: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface → ref surface, ref surface → pred surface).

    Parameters
    ----------
    pred, ref
        Boolean arrays of the same shape, axes (z, y, x).
    spacing_zyx
        Voxel size along (z, y, x) in mm.
    """
    sp, sr = surface(pred), surface(ref)
    return _distances_to(sr, sp, spacing_zyx), _distances_to(sp, sr, spacing_zyx)


def agreement(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing_zyx: tuple[float, float, float],
    tolerance_mm: float = 2.0,
) -> Agreement:
    """Dice, HD95, MSD and surface Dice of two boolean masks on one grid.

    Both empty: Dice 1, distances 0. One empty: Dice 0, distances NaN (no surface to measure to), surface Dice 0.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise VolumeError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    vols = {"volume_pred_cc": n_pred * voxel_cc, "volume_ref_cc": n_ref * voxel_cc}
    if n_pred == 0 and n_ref == 0:
        return Agreement(dice=1.0, hd95=0.0, msd=0.0, surface_dice=1.0, **vols)
    dice = 2.0 * int(np.logical_and(pred, ref).sum()) / (n_pred + n_ref)
    if n_pred == 0 or n_ref == 0:
        return Agreement(dice=dice, hd95=math.nan, msd=math.nan, surface_dice=0.0, **vols)
    d_pr, d_rp = surface_distances(pred, ref, spacing_zyx=spacing_zyx)
    pooled = np.concatenate([d_pr, d_rp])
    within = int((d_pr <= tolerance_mm).sum() + (d_rp <= tolerance_mm).sum())
    return Agreement(
        dice=float(dice),
        hd95=float(np.percentile(pooled, 95)),
        msd=float(pooled.mean()),
        surface_dice=within / pooled.size,
        **vols,
    )


def _zyx_spacing(volume: xr.DataArray) -> tuple[float, float, float]:
    sx, sy, sz = spacing_of(volume)
    return float(sz), float(sy), float(sx)


def evaluate_structures(
    pred: Mapping[str, xr.DataArray],
    ref: Mapping[str, xr.DataArray],
    *,
    structures: Iterable[str] | None = None,
    tolerance_mm: float = 2.0,
    patient: str = "",
) -> pd.DataFrame:
    """Agreement per structure of predicted and reference masks on the same grid → one row per structure.

    Parameters
    ----------
    pred, ref
        Boolean volumes by structure name (pacsai volumes: dims z, y, x and ``attrs["affine"]``).
    structures
        Names to evaluate; default: those present in both, in ``ref`` order. A requested name missing from
        either side raises :class:`VolumeError`.
    tolerance_mm
        τ of the surface Dice.
    patient
        Label put in the ``patient`` column (a pseudonym where the table goes to MLflow).

    Returns
    -------
    pandas.DataFrame
        Columns ``patient, structure, dice, hd95, msd, surface_dice, volume_pred_cc, volume_ref_cc, tolerance_mm``.
    """
    names = list(structures) if structures is not None else [n for n in ref if n in pred]
    rows = []
    for name in names:
        if name not in pred or name not in ref:
            side = "prediction" if name not in pred else "reference"
            raise VolumeError(
                f"structure {name!r} is missing from the {side}; evaluate only common structures"
            )
        p, r = pred[name], ref[name]
        if not same_grid(p, r):
            raise VolumeError(
                f"structure {name!r}: prediction and reference are on different grids "
                f"({p.shape} vs {r.shape}, affines {affine_of(p).tolist()} vs {affine_of(r).tolist()}); "
                "resample the prediction onto the reference grid first"
            )
        a = agreement(p.values, r.values, spacing_zyx=_zyx_spacing(r), tolerance_mm=tolerance_mm)
        if not np.asarray(r.values).any():
            warnings.warn(f"reference {name!r} of patient {patient!r} is empty", PacsaiWarning, stacklevel=2)
        rows.append(
            {"patient": patient, "structure": name, **a.__dict__, "tolerance_mm": float(tolerance_mm)}
        )
    return pd.DataFrame(
        rows,
        columns=["patient", "structure", *METRICS, "volume_pred_cc", "volume_ref_cc", "tolerance_mm"],
    )


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric per structure over patients (NaN distances ignored) → index ``structure``."""
    return table.groupby("structure", sort=False)[list(METRICS)].mean()
