"""Response against the most recent prior study: ΔV% per structure and a RECIST 1.1-style category.

Definitions (DESIGN.md "Response"): ΔV% = (V_now − V_prior) / V_prior per structure. The category comes from the
sum of the longest in-plane (axial) diameters (SLD) of the target lesions: PR ≤ −30 %; PD ≥ +20 % *and*
≥ +5 mm absolute, or a new lesion; CR all target lesions gone; otherwise SD. Thresholds are inclusive (with a
1e-9 slack against float rounding). NE (not evaluable) where the prior has no measurable lesion.

Rules stated here because masks are not a radiologist (Eisenhauer et al. Eur J Cancer 2009;45:228–247):

* lesions are the 26-connected components of the target structure (e.g. the GTV);
* target lesions at the prior: components with a longest axial diameter ≥ ``measurable_mm`` (10 mm), the
  largest first, at most ``max_targets`` (5; the RECIST "2 per organ" rule is not applied: organs are unknown);
* now: the same number of largest components are measured, whatever their size (a shrinking target lesion
  keeps being measured; a vanished one counts 0 mm);
* new lesions: only where both studies share a frame of reference (same ``frame_of_reference_uid``), a current
  component ≥ ``measurable_mm`` that shares no position with the prior target is new. Across different frames
  positions cannot be compared (no registration here), so new lesions are *not assessed* (``None``) and a note
  says so; diameters and volumes are compared instead;
* the reference is the most recent prior study, not the nadir as in RECIST 1.1 (only one prior is compared).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xarray as xr

from pacsai.errors import PlanningError
from pacsai.imaging.geometry import affine_of, voxel_volume_cc
from pacsai.planning.constraints import normalise_name
from pacsai.planning.structures import components, longest_axial_diameter

logger = logging.getLogger(__name__)

CATEGORIES = ("CR", "PR", "SD", "PD", "NE")
_TOL = 1e-9


@dataclass(frozen=True)
class Response:
    """Response of one patient's target against the most recent prior study.

    Attributes
    ----------
    category
        ``"CR"``, ``"PR"``, ``"SD"``, ``"PD"`` or ``"NE"`` (not evaluable).
    target
        The target structure (e.g. ``"GTV"``).
    sld_prior_mm, sld_now_mm
        Sum of the longest axial diameters of the target lesions (mm).
    change_pct, change_mm
        SLD change (% of the prior, mm); NaN where the prior SLD is 0.
    target_lesions_prior_mm, target_lesions_now_mm
        Per-lesion longest axial diameters (mm), largest first.
    new_lesions
        Number of new lesions, or ``None`` where it could not be assessed (different frames of reference).
    volumes_prior_cc, volumes_now_cc, volume_change_pct
        Per structure present in both studies (ΔV% is NaN for an empty prior).
    reference
        What the change is measured against.
    notes
        Everything a reader needs to know about how the category was reached.
    """

    category: str
    target: str
    sld_prior_mm: float
    sld_now_mm: float
    change_pct: float
    change_mm: float
    target_lesions_prior_mm: tuple[float, ...]
    target_lesions_now_mm: tuple[float, ...]
    new_lesions: int | None
    volumes_prior_cc: dict[str, float]
    volumes_now_cc: dict[str, float]
    volume_change_pct: dict[str, float]
    reference: str
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples → lists)."""
        out = asdict(self)
        for key in ("target_lesions_prior_mm", "target_lesions_now_mm", "notes"):
            out[key] = list(out[key])
        return out


def recist_category(sld_prior_mm: float, sld_now_mm: float, *, new_lesion: bool = False) -> str:
    """RECIST 1.1-style category from the sums of longest diameters (DESIGN.md "Response").

    Parameters
    ----------
    sld_prior_mm
        SLD of the target lesions at the reference (prior) study, mm.
    sld_now_mm
        SLD of the same lesions now, mm (0 when all are gone).
    new_lesion
        A new lesion appeared (→ PD whatever the diameters).

    Returns
    -------
    str
        ``"PD"`` if a new lesion, or change ≥ +20 % and ≥ +5 mm; ``"CR"`` if all gone; ``"PR"`` if ≤ −30 %;
        ``"NE"`` if the prior has no measurable disease; else ``"SD"``. Thresholds are inclusive.
    """
    if sld_prior_mm < 0 or sld_now_mm < 0:
        raise PlanningError(f"sums of diameters must be ≥ 0 mm; got {sld_prior_mm}, {sld_now_mm}")
    if new_lesion:
        return "PD"
    if sld_prior_mm <= 0:
        return "NE"
    if sld_now_mm <= 0:
        return "CR"
    change_mm = sld_now_mm - sld_prior_mm
    change_pct = 100.0 * change_mm / sld_prior_mm
    if change_pct >= 20.0 - _TOL and change_mm >= 5.0 - _TOL:
        return "PD"
    if change_pct <= -30.0 + _TOL:
        return "PR"
    return "SD"


def _lookup(structures: Mapping[str, xr.DataArray], name: str) -> str | None:
    if name in structures:
        return name
    wanted = normalise_name(name)
    hits = [k for k in structures if normalise_name(k) == wanted]
    return hits[0] if hits else None


def _frame(mask: xr.DataArray) -> str:
    return str(mask.attrs.get("frame_of_reference_uid") or "")


def _touches(component: xr.DataArray, prior: xr.DataArray) -> bool:
    """Whether any voxel centre of ``component`` falls in a voxel of ``prior`` (LPS positions, any grids)."""
    kji = np.argwhere(np.asarray(component.values, dtype=bool))
    world = kji[:, ::-1] @ affine_of(component)[:3, :3].T + affine_of(component)[:3, 3]
    inv = np.linalg.inv(affine_of(prior))
    idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(int)[:, ::-1]
    shape = np.asarray(prior.shape)
    inside = np.all((idx >= 0) & (idx < shape), axis=1)
    values = np.asarray(prior.values, dtype=bool)
    return bool(values[tuple(idx[inside].T)].any())


def assess_response(
    current: Mapping[str, xr.DataArray],
    prior: Mapping[str, xr.DataArray],
    *,
    target: str = "GTV",
    measurable_mm: float = 10.0,
    max_targets: int = 5,
) -> Response:
    """Compare the current study's structures with the most recent prior study's (see the module docstring).

    Parameters
    ----------
    current, prior
        Boolean masks by structure name (names matched ignoring case, spaces, ``_`` and ``-``). Grids and
        frames of reference may differ between the studies.
    target
        The structure holding the lesions (e.g. ``"GTV"``).
    measurable_mm
        Minimum longest axial diameter of a target lesion (RECIST 1.1: 10 mm) and of a new lesion.
    max_targets
        At most this many target lesions (RECIST 1.1: 5).

    Returns
    -------
    Response

    Raises
    ------
    PlanningError
        The target structure is missing from either study.
    """
    key_now, key_prior = _lookup(current, target), _lookup(prior, target)
    if key_now is None or key_prior is None:
        side, names = ("current", list(current)) if key_now is None else ("prior", list(prior))
        raise PlanningError(
            f"target {target!r} is not among the {side} study's structures {names}; pass target="
        )
    notes: list[str] = ["reference: the most recent prior study (not the nadir)"]

    prior_parts = components(prior[key_prior])
    prior_d = sorted((longest_axial_diameter(c) for c in prior_parts), reverse=True)
    targets_prior = [d for d in prior_d if d >= measurable_mm - _TOL][:max_targets]
    now_parts = components(current[key_now])
    now_diams = sorted(((longest_axial_diameter(c), c) for c in now_parts), key=lambda t: -t[0])
    k = len(targets_prior)
    if len(prior_d) > len(targets_prior):
        notes.append(
            f"{len(prior_d) - len(targets_prior)} prior component(s) below {measurable_mm} mm or beyond "
            f"{max_targets} targets are not target lesions"
        )

    new: int | None
    if _frame(current[key_now]) and _frame(current[key_now]) == _frame(prior[key_prior]):
        # One frame: follow lesions by position. Components touching the prior target are the followed
        # lesions; measurable components elsewhere are new.
        followed = [(d, c) for d, c in now_diams if _touches(c, prior[key_prior])]
        elsewhere = [d for d, c in now_diams if not _touches(c, prior[key_prior])]
        new = sum(d >= measurable_mm - _TOL for d in elsewhere)
        if new:
            notes.append(f"{new} new lesion(s): component(s) ≥ {measurable_mm} mm outside the prior {target}")
    else:
        followed = now_diams
        new = None
        notes.append(
            "new lesions not assessed: the studies have different (or unknown) frames of reference, so "
            "positions cannot be compared without registration; the largest current components are "
            "taken as the target lesions"
        )
    targets_now = [d for d, _ in followed[:k]] + [0.0] * max(0, k - len(followed))
    if k and len(followed) > k:
        notes.append(f"{len(followed) - k} further current component(s) not among the {k} target lesion(s)")

    sld_prior, sld_now = float(sum(targets_prior)), float(sum(targets_now))
    category = recist_category(sld_prior, sld_now, new_lesion=bool(new))
    if category == "NE":
        notes.append(
            f"no measurable (≥ {measurable_mm} mm) lesion in the prior {target}: response not evaluable"
        )
    change_mm = sld_now - sld_prior if sld_prior > 0 else float("nan")
    change_pct = 100.0 * (sld_now - sld_prior) / sld_prior if sld_prior > 0 else float("nan")

    volumes_prior: dict[str, float] = {}
    volumes_now: dict[str, float] = {}
    delta: dict[str, float] = {}
    for name, mask in current.items():
        other = _lookup(prior, name)
        if other is None:
            continue
        v_now = float(np.count_nonzero(np.asarray(mask.values, dtype=bool))) * voxel_volume_cc(mask)
        v_prior = float(np.count_nonzero(np.asarray(prior[other].values, dtype=bool))) * voxel_volume_cc(
            prior[other]
        )
        volumes_now[name], volumes_prior[name] = v_now, v_prior
        delta[name] = 100.0 * (v_now - v_prior) / v_prior if v_prior > 0 else float("nan")
    missing = [n for n in current if _lookup(prior, n) is None]
    if missing:
        notes.append(f"no prior volume for {', '.join(missing)}")

    return Response(
        category=category,
        target=target,
        sld_prior_mm=sld_prior,
        sld_now_mm=sld_now,
        change_pct=change_pct,
        change_mm=change_mm,
        target_lesions_prior_mm=tuple(targets_prior),
        target_lesions_now_mm=tuple(targets_now),
        new_lesions=new,
        volumes_prior_cc=volumes_prior,
        volumes_now_cc=volumes_now,
        volume_change_pct=delta,
        reference="most recent prior study",
        notes=tuple(notes),
    )
