"""What a model was trained on, and whether a new image looks like it (the QA gate's domain check).

A segmentation network answers on any input; it is only trustworthy on inputs like its training data. At training
time :func:`image_stats` summarises every training image (modality, voxel spacing, field of view, body size, the HU
distribution inside the body and its tissue mix) and :func:`training_domain` keeps the ranges of the cohort with
the model. At report time :func:`check_input` compares a new image with those ranges and :func:`check_volumes`
compares the model's structure volumes with the training cohort's.

Body region is measured, not read from BodyPartExamined (often empty or wrong): a thoracic CT has aerated lung
(−950…−600 HU) inside the body outline on most of its axial slices; an abdomen, a pelvis, a head or a phantom has
none or only at its edge.

Pure NumPy/SciPy/xarray: the report imports this without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage

from pacsai.imaging.geometry import spacing_of, voxel_volume_cc
from pacsai.qa import Reason

#: HU quantiles recorded inside the body.
QUANTILES = (1, 5, 25, 50, 75, 95, 99)
#: Tissue classes by HU inside the filled body outline: [low, high).
TISSUES: dict[str, tuple[float, float]] = {
    "air": (-np.inf, -950.0),
    "lung": (-950.0, -600.0),
    "fat": (-200.0, -30.0),
    "soft": (-30.0, 150.0),
    "bone": (200.0, np.inf),
}
#: A slice counts as thoracic when at least this fraction of its body area is aerated lung.
THORACIC_SLICE_LUNG = 0.08
#: Ranges widen by these factors before an input counts as outside them (small cohorts have narrow ranges).
SIZE_TOLERANCE = 1.5  # voxel spacing, field of view, body size: ×/÷ (habitus varies more than small cohorts)
HU_TOLERANCE = 60.0  # HU beyond the training range of a quantile
FRACTION_TOLERANCE = 0.15  # absolute, for tissue fractions
VOLUME_TOLERANCE = 1.5  # organ volumes: ×/÷ the training range
TARGET_VOLUME_TOLERANCE = 3.0  # tumours vary more than organs
TARGETS = ("GTV", "CTV", "PTV", "ITV")
#: Below this share of thoracic slices the input is not a thorax (a thorax CT into the upper abdomen keeps ~50 %).
MIN_THORACIC_SHARE = 0.25


def _body_mask(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """The largest connected region above ``threshold_hu``, holes filled slice by slice (lungs are inside)."""
    above = hu > threshold_hu
    labels, n = ndimage.label(above)
    if n == 0:
        return above
    sizes = np.bincount(labels.ravel())[1:]
    body = labels == int(np.argmax(sizes)) + 1
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def image_stats(
    volume: xr.DataArray, *, modality: str = "CT", body_threshold_hu: float = -500.0
) -> dict[str, Any]:
    """Summarise one image (values in HU for CT) for the domain check.

    Returns
    -------
    dict
        ``modality``; ``spacing_mm`` and ``fov_mm`` (x, y, z); ``shape_zyx``; ``body_extent_mm`` (x, y, z) of the
        body (in-plane from the 1st–99th percentile of its voxels, so a couch does not count; z: its slices);
        ``hu`` quantiles inside the body; ``tissue_fractions`` of the body (air, lung, fat, soft, bone);
        ``thoracic_share``: the share of body slices that hold aerated lung
        (≥ :data:`THORACIC_SLICE_LUNG` of their body area).
    """
    spacing = np.asarray(spacing_of(volume), float)  # (x, y, z)
    nz, ny, nx = volume.shape
    # Every second row and column: the statistics do not need 512² and a 134-slice CT stays under a second.
    step = 2 if min(ny, nx) >= 256 else 1
    hu = np.asarray(volume.values[:, ::step, ::step], dtype=np.float32)
    body = _body_mask(hu, body_threshold_hu)
    out: dict[str, Any] = {
        "modality": str(modality).upper(),
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "shape_zyx": [int(nz), int(ny), int(nx)],
        "fov_mm": [round(float(n * s), 1) for n, s in zip((nx, ny, nz), spacing, strict=True)],
    }
    if not body.any():
        out.update(body_extent_mm=[0.0, 0.0, 0.0], hu={}, tissue_fractions={}, thoracic_share=0.0)
        return out
    zz = np.flatnonzero(body.any(axis=(1, 2)))
    # In-plane size from the 1st–99th percentile of the body's voxel columns/rows: a couch or a thin strap that
    # touches the patient joins the body component but holds too few voxels to move the percentiles.
    counts_x, counts_y = body.sum(axis=(0, 1)), body.sum(axis=(0, 2))
    extent = [
        _spread(counts_x) * step * spacing[0],
        _spread(counts_y) * step * spacing[1],
        (zz[-1] - zz[0] + 1) * spacing[2],
    ]
    inside = hu[body]
    qs = np.percentile(inside, QUANTILES)
    fractions = {name: float(np.mean((inside >= lo) & (inside < hi))) for name, (lo, hi) in TISSUES.items()}
    lung = (hu >= TISSUES["lung"][0]) & (hu < TISSUES["lung"][1]) & body
    area = body.sum(axis=(1, 2))
    slices = area > 0
    share = float(np.mean(lung.sum(axis=(1, 2))[slices] / area[slices] >= THORACIC_SLICE_LUNG))
    out.update(
        body_extent_mm=[round(float(e), 1) for e in extent],
        hu={f"p{q:02d}": round(float(v), 1) for q, v in zip(QUANTILES, qs, strict=True)},
        tissue_fractions={k: round(v, 4) for k, v in fractions.items()},
        thoracic_share=round(share, 4),
    )
    return out


def _spread(counts: np.ndarray) -> int:
    """Number of positions between the 1st and the 99th percentile of a voxel-count profile (inclusive)."""
    cdf = np.cumsum(counts) / counts.sum()
    return int(np.searchsorted(cdf, 0.99) - np.searchsorted(cdf, 0.01) + 1)


def structure_volumes(masks: Mapping[str, xr.DataArray]) -> dict[str, float]:
    """Volume in cm³ of each structure (voxel count × voxel volume)."""
    return {
        name: round(float(np.count_nonzero(np.asarray(m.values))) * voxel_volume_cc(m), 3)
        for name, m in masks.items()
    }


def _range(values: Sequence[float]) -> list[float]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    return [round(float(arr.min()), 4), round(float(arr.max()), 4)] if arr.size else []


def training_domain(
    images: Sequence[Mapping[str, Any]],
    volumes: Sequence[Mapping[str, float]],
    *,
    body_region: str = "thorax",
) -> dict[str, Any]:
    """The training cohort's domain: ranges (min, max) of every :func:`image_stats` figure and of each structure's
    volume (plus its median), JSON-able and free of identifiers (only numbers and the modality).

    Parameters
    ----------
    images
        :func:`image_stats` of every training image.
    volumes
        :func:`structure_volumes` of every training case's reference structures.
    body_region
        What the cohort images (``thorax`` for the demo); :func:`check_input` verifies thoracic inputs by their
        lung content.
    """
    if not images:
        raise ValueError("training_domain needs the statistics of at least one image")
    modalities = sorted({str(s.get("modality", "")).upper() for s in images})
    domain: dict[str, Any] = {
        "n_cases": len(images),
        "modality": modalities[0] if len(modalities) == 1 else modalities,
        "body_region": body_region,
    }
    for key in ("spacing_mm", "fov_mm", "body_extent_mm"):
        rows = [s[key] for s in images if s.get(key)]
        domain[key] = {"min": [round(float(v), 4) for v in np.min(rows, axis=0)],
                       "max": [round(float(v), 4) for v in np.max(rows, axis=0)]}
    domain["hu"] = {q: _range([s["hu"].get(q) for s in images if s.get("hu")]) for q in images[0].get("hu", {})}
    domain["tissue_fractions"] = {
        t: _range([s["tissue_fractions"].get(t) for s in images if s.get("tissue_fractions")])
        for t in images[0].get("tissue_fractions", {})
    }
    domain["thoracic_share"] = _range([s.get("thoracic_share", 0.0) for s in images])
    names = sorted({n for v in volumes for n in v})
    domain["structure_volumes_cc"] = {}
    for n in names:
        vals = [float(v[n]) for v in volumes if n in v and v[n] > 0]
        if vals:
            domain["structure_volumes_cc"][n] = {
                "min": round(min(vals), 3), "max": round(max(vals), 3), "median": round(float(np.median(vals)), 3),
                "n": len(vals),
            }
    return domain


def check_input(domain: Mapping[str, Any], stats: Mapping[str, Any]) -> list[Reason]:
    """Compare one image's :func:`image_stats` with a model's :func:`training_domain`.

    Errors (the model's output means nothing here): another modality; another body region. Reviews: voxels
    coarser than any training image, a field of view or body size outside the training range (×/÷
    :data:`SIZE_TOLERANCE`; along z only a scan shorter than the shortest training scan ÷ the tolerance),
    HU quantiles more than :data:`HU_TOLERANCE` HU outside theirs, tissue fractions more
    than :data:`FRACTION_TOLERANCE` outside theirs. An empty ``domain`` (a model trained before pacsai recorded
    one) is itself a review: nothing can be compared.
    """
    if not domain:
        return [Reason("DOMAIN_UNKNOWN", "review",
                       "the model records no training domain: the input cannot be compared with its training data")]
    reasons: list[Reason] = []
    modality = str(stats.get("modality", "")).upper()
    trained = domain.get("modality")
    allowed = [trained] if isinstance(trained, str) else list(trained or [])
    if allowed and modality not in allowed:
        reasons.append(Reason(
            "DOMAIN_MODALITY", "error",
            f"the image is {modality or 'of unknown modality'}; the model was trained on {'/'.join(allowed)} only",
            values={"modality": modality, "trained": allowed},
        ))
        return reasons  # HU statistics of another modality compare nothing
    region = str(domain.get("body_region", ""))
    share = float(stats.get("thoracic_share", 0.0))
    trained_share = domain.get("thoracic_share") or [0.0, 0.0]
    if region == "thorax" and share < min(MIN_THORACIC_SHARE, 0.5 * float(trained_share[0] or 1.0)):
        reasons.append(Reason(
            "DOMAIN_BODY_REGION", "error",
            f"only {share:.0%} of the image's slices hold aerated lung (training images: "
            f"{float(trained_share[0]):.0%}–{float(trained_share[1]):.0%}): this is not a thoracic CT, "
            "and the thoracic model's structures mean nothing here",
            values={"thoracic_share": share, "trained": list(trained_share)},
        ))
    spacing = stats.get("spacing_mm") or []
    trained_spacing = (domain.get("spacing_mm") or {}).get("max")
    if spacing and trained_spacing:
        coarse = [a for a, s, t in zip("xyz", spacing, trained_spacing, strict=True) if s > t * SIZE_TOLERANCE]
        if coarse:
            reasons.append(Reason(
                "DOMAIN_SPACING", "review",
                f"voxels {_fmt(spacing)} mm are coarser along {', '.join(coarse)} than any training image "
                f"(at most {_fmt(trained_spacing)} mm)",
                values={"spacing_mm": list(spacing), "trained_max_mm": list(trained_spacing)},
            ))
    for key, what in (("fov_mm", "field of view"), ("body_extent_mm", "body size")):
        value, rng = stats.get(key), domain.get(key) or {}
        if not value or not rng:
            continue
        out = [
            a for a, v, lo, hi in zip("xyz", value, rng["min"], rng["max"], strict=True)
            if a != "z" and (v < lo / SIZE_TOLERANCE or v > hi * SIZE_TOLERANCE)  # z: any scan length is fine
        ]
        if out:
            reasons.append(Reason(
                f"DOMAIN_{'FOV' if key == 'fov_mm' else 'BODY_SIZE'}", "review",
                f"{what} {_fmt(value)} mm is outside the training range along {', '.join(out)} "
                f"({_fmt(rng['min'])} – {_fmt(rng['max'])} mm)",
                values={key: list(value), "trained_min": rng["min"], "trained_max": rng["max"]},
            ))
    # A longer scan is fine (the organs are all in it); a much shorter one cuts them: a 3-slice CT holds slivers
    # of organs the model learnt whole, so their volumes and doses mean nothing.
    fov, fov_range = stats.get("fov_mm") or [], (domain.get("fov_mm") or {}).get("min")
    if len(fov) == 3 and fov_range and fov[2] < fov_range[2] / SIZE_TOLERANCE:
        reasons.append(Reason(
            "DOMAIN_SCAN_LENGTH", "review",
            f"the scan covers {fov[2]:.3g} mm cranio-caudally; the shortest training scan covered "
            f"{fov_range[2]:.3g} mm: organs are cut, their volumes and doses are partial",
            values={"scan_length_mm": fov[2], "trained_min_mm": fov_range[2]},
        ))
    hu, trained_hu = stats.get("hu") or {}, domain.get("hu") or {}
    off = {q: v for q, v in hu.items() if q in ("p05", "p50", "p95") and trained_hu.get(q)
           and not trained_hu[q][0] - HU_TOLERANCE <= v <= trained_hu[q][1] + HU_TOLERANCE}
    if off:
        reasons.append(Reason(
            "DOMAIN_HU", "review",
            "HU distribution inside the body unlike the training images: "
            + ", ".join(f"{q} {v:.0f} HU (training {trained_hu[q][0]:.0f}…{trained_hu[q][1]:.0f})"
                        for q, v in off.items()),
            values={"hu": dict(off), "trained": {q: trained_hu[q] for q in off}},
        ))
    fr, trained_fr = stats.get("tissue_fractions") or {}, domain.get("tissue_fractions") or {}
    off_fr = {t: v for t, v in fr.items() if trained_fr.get(t)
              and not trained_fr[t][0] - FRACTION_TOLERANCE <= v <= trained_fr[t][1] + FRACTION_TOLERANCE}
    if off_fr:
        reasons.append(Reason(
            "DOMAIN_TISSUE", "review",
            "tissue mix inside the body unlike the training images: "
            + ", ".join(f"{t} {v:.0%} (training {trained_fr[t][0]:.0%}–{trained_fr[t][1]:.0%})"
                        for t, v in off_fr.items()),
            values={"tissue_fractions": dict(off_fr), "trained": {t: trained_fr[t] for t in off_fr}},
        ))
    return reasons


def check_volumes(domain: Mapping[str, Any], volumes_cc: Mapping[str, float]) -> list[Reason]:
    """Non-empty structure volumes outside the training cohort's range (×/÷ :data:`VOLUME_TOLERANCE`, or
    :data:`TARGET_VOLUME_TOLERANCE` for targets) → review. Empty structures are the gate's own error, not here."""
    reasons = []
    ranges = domain.get("structure_volumes_cc") or {}
    for name, cc in volumes_cc.items():
        rng = ranges.get(name)
        if rng is None or cc <= 0:
            continue
        tol = TARGET_VOLUME_TOLERANCE if name.upper().rstrip("0123456789-_") in TARGETS else VOLUME_TOLERANCE
        lo, hi = rng["min"] / tol, rng["max"] * tol
        if not lo <= cc <= hi:
            reasons.append(Reason(
                "VOLUME_OUT_OF_RANGE", "review",
                f"{name} is {cc:.1f} cm³; the training cohort's {name} spans {rng['min']:.1f}–{rng['max']:.1f} cm³ "
                f"(accepted {lo:.1f}–{hi:.1f})",
                structure=name,
                values={"volume_cc": round(float(cc), 3), "trained_min_cc": rng["min"], "trained_max_cc": rng["max"]},
            ))
    return reasons


def uncertainty_domain(cases: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """The model's own uncertainty on held-out cases, per structure: what the report's gate compares with.

    Parameters
    ----------
    cases
        One mapping per held-out case: ``{structure: summarize_uncertainty(mask, σ)}``
        (the same figure the report computes). Store the result as ``domain["uncertainty"]``.

    Returns
    -------
    dict
        ``{structure: {"median": float, "max": float, "n": int}}`` of the measurable figures (empty regions
        skipped); the gate reviews a structure whose uncertainty exceeds 1.5 × ``max``.
    """
    out: dict[str, dict[str, float]] = {}
    names = sorted({name for case in cases for name in case})
    for name in names:
        values = [float(case[name]["mean_sigma"]) for case in cases
                  if name in case and case[name].get("mean_sigma") is not None]
        if values:
            out[name] = {"median": round(float(np.median(values)), 4), "max": round(max(values), 4),
                         "n": len(values)}
    return out


#: σ at or above which the augmented predictions are taken to disagree (probability units).
HESITANT_SIGMA = 0.05


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


def _fmt(values: Sequence[float]) -> str:
    return " × ".join(f"{float(v):.3g}" for v in values)


__all__ = [
    "HESITANT_SIGMA",
    "check_input",
    "check_volumes",
    "image_stats",
    "structure_volumes",
    "summarize_uncertainty",
    "training_domain",
    "uncertainty_domain",
]
