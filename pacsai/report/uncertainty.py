"""One model-uncertainty figure per structure, also for a structure the model left empty.

The model's test-time augmentation gives, per voxel, the standard deviation σ of the structure's probability over
the plain prediction and its flips (:func:`pacsai.learning.infer.segment`). Averaging σ over the predicted mask
alone (as before) gives an empty mask an uncertainty of 0 — "certain" exactly where the model found nothing.

Definition used here: the **candidate region** of a structure is its mask together with every voxel where the
augmented predictions disagree, σ ≥ :data:`HESITANT_SIGMA` (0.05: the passes differ by about 0.1 in probability).
The figure is the mean σ over that region. A present structure is measured over its mask and its hesitant rim; an
empty one over the voxels where the model hesitated to draw it. An empty mask with no hesitant voxel at all has no
region: its uncertainty is ``None`` (not measurable), never 0, and the gate reports the empty structure itself.

The figure is gated relative to the same model's held-out cases (``domain["uncertainty"][structure]["max"]``,
:func:`pacsai.report.gate.uncertainty_reasons`): the spread of flip TTA depends on the model as much as on the
case (a network not trained flip-invariant spreads on every asymmetric organ), so an absolute limit would flag
good contours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from pacsai.imaging.geometry import voxel_volume_cc

#: σ at or above which the augmented predictions are taken to disagree (probability units).
HESITANT_SIGMA = 0.05
#: Floor of the review limit on the mean σ over the candidate region; the limit itself is relative to what the
#: model showed on held-out cases (pacsai.report.gate.uncertainty_reasons).
HIGH_UNCERTAINTY = 0.1


def summarize_uncertainty(mask: xr.DataArray, sigma: Any) -> dict[str, Any]:
    """The uncertainty of one structure over its candidate region (see the module docstring).

    Parameters
    ----------
    mask
        The structure's boolean mask.
    sigma
        Its TTA standard-deviation map on the same grid (DataArray or array).

    Returns
    -------
    dict
        ``mean_sigma`` (float, or None when the region is empty), ``region_cc`` (cm³ of the candidate region),
        ``hesitant_cc`` (cm³ outside the mask where σ ≥ the threshold), ``empty_mask`` (bool), ``method``.
    """
    inside = np.asarray(mask.values, dtype=bool)
    values = np.asarray(sigma.values if hasattr(sigma, "values") else sigma, dtype=np.float32)
    if values.shape != inside.shape:
        raise ValueError(f"uncertainty map {values.shape} is not on the grid of the mask {inside.shape}")
    hesitant = values >= HESITANT_SIGMA
    region = inside | hesitant
    voxel_cc = voxel_volume_cc(mask)
    return {
        "mean_sigma": float(values[region].mean()) if region.any() else None,
        "region_cc": float(region.sum() * voxel_cc),
        "hesitant_cc": float((hesitant & ~inside).sum() * voxel_cc),
        "empty_mask": not bool(inside.any()),
        "method": f"mean TTA σ over the mask ∪ {{σ ≥ {HESITANT_SIGMA}}}",
    }


__all__ = ["HESITANT_SIGMA", "HIGH_UNCERTAINTY", "summarize_uncertainty"]
