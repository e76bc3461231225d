"""Response against the most recent prior study: RECIST 1.1 from masks, like with like, and ΔV% per structure.

RECIST 1.1 as written (Eisenhauer et al. Eur J Cancer 2009;45:228–247), with the choices masks force stated
here (docs/clinical_definitions.md "Response"):

* **Like with like.** Prior and current contours must come from the same source (both ``"reference"`` —
  e.g. the planner's RTSTRUCTs — or both ``"model"``), and be trustworthy; otherwise the category is NE with
  an error reason. An empty *model* segmentation is not a disappearance: NE with an error, never CR.
* **Lesions** are the 26-connected components of the target structure(s) (e.g. ``GTV``, or ``["GTVp",
  "GTVn"]``). Each target structure is one organ unless ``organ_of`` says otherwise.
* **Measurable at baseline** (the prior study): longest in-plane (axial) diameter ≥ 10 mm, or ≥ twice the
  slice thickness where slices are thicker than 5 mm (RECIST 1.1 §3.1). Smaller ones are non-measurable
  (non-target) lesions.
* **Target lesions**: the measurable ones, largest first, at most 2 per organ and 5 in all.
* **Following lesions** needs positions in one patient frame: the same frame of reference UID in both
  studies, or a ``registration`` (4×4, prior LPS mm → current LPS mm). Then prior and current components are
  associated where they overlap or lie within ``match_mm`` of each other (voxel centres, patient frame), and
  the groups this makes are lesions followed over time:

  - a lesion that *split* (one prior, several current components): its fragments' diameters are summed
    (RECIST 1.1 appendix: "the longest diameters of the fragments are added together");
  - lesions that *coalesced* (several prior, one current component): the coalesced lesion's diameter is
    assigned to the first (largest) of them and 0 mm to the others, so the sum counts it once;
  - a current component associated with no prior component is a *new lesion*: unequivocal (→ PD) when it is
    measurable (≥ the same threshold), otherwise equivocal (a review reason, not PD, as RECIST asks to
    re-check equivocal findings at the next assessment).

  Without a shared frame or a registration, positions cannot be compared: the category is computed with the
  current components taken by size order and new lesions not assessed, and is **provisional**
  (``final=False``), never a final category.
* **Categories** (target lesions, overall with new lesions): CR every target lesion has disappeared (and, as
  Table 1 of RECIST 1.1 requires for an overall CR, nothing else remains — a remaining non-target or
  equivocal component makes it PR); PR sum ≤ −30 % of the prior; PD sum ≥ +20 % *and* ≥ +5 mm, or an
  unequivocal new lesion; SD otherwise; NE where the prior has no measurable lesion or the comparison is not
  valid. Thresholds are inclusive (1e-9 slack against float rounding). Lymph-node short axes are not
  measured (masks do not say which lesion is a node).
* The reference is the most recent prior study, taken as both baseline and nadir (one prior is compared).

Reasons are dicts with ``code``, ``level`` (``"error"``, ``"review"``, ``"note"``), ``message``,
``structure`` and ``values`` (the keys of :class:`pacsai.qa.Reason`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage
from scipy.spatial import cKDTree

from pacsai.errors import PlanningError
from pacsai.imaging.geometry import make_volume, voxel_volume_cc
from pacsai.planning.constraints import normalise_name
from pacsai.planning.structures import longest_axial_diameter

logger = logging.getLogger(__name__)

CATEGORIES = ("CR", "PR", "SD", "PD", "NE")
SOURCES = ("reference", "model")
_TOL = 1e-9


# --------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class StudyContours:
    """One study's contours, with what a like-with-like comparison needs to know about them.

    Attributes
    ----------
    structures
        Boolean masks by name.
    source
        ``"reference"`` (drawn by a person, e.g. the planner's RTSTRUCT) or ``"model"``.
    label
        Who drew them, for the reader: ``"RTSTRUCT 'Plan 1' 2024-01-01"``, ``"model thorax-oars v3"``.
    trustworthy
        False where the contours must not be used for a verdict (e.g. the QA gate failed them).
    why_untrusted
        The reason, when not trustworthy.
    frame_of_reference_uid
        The study's frame of reference; default: the target mask's ``attrs["frame_of_reference_uid"]``.
    """

    structures: Mapping[str, xr.DataArray]
    source: str
    label: str = ""
    trustworthy: bool = True
    why_untrusted: str = ""
    frame_of_reference_uid: str = ""

    def __post_init__(self) -> None:
        if self.source not in (*SOURCES, "unspecified"):
            raise PlanningError(f"contour source must be one of {SOURCES}, got {self.source!r}")


@dataclass
class _Component:
    organ: str
    structure: str
    diameter_mm: float
    volume_cc: float
    points: np.ndarray  # voxel centres, LPS mm (current frame)
    index: int = 0


# --------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Response:
    """Response of one patient's target against the most recent prior study.

    Attributes
    ----------
    category
        ``"CR"``, ``"PR"``, ``"SD"``, ``"PD"`` or ``"NE"`` (not evaluable).
    final
        True only for a category reached on same-source, trustworthy contours whose lesions could be
        followed by position; False for NE and for a provisional category (see ``reasons``).
    reasons
        Why the category is NE or provisional, and what a reader must know (dicts: code, level, message,
        structure, values).
    target
        The target structure(s).
    sld_prior_mm, sld_now_mm
        Sum of the longest axial diameters of the target lesions (mm); NaN where not measured.
    change_pct, change_mm
        SLD change (% of the prior, mm); NaN where the prior SLD is 0 or not measured.
    lesions
        Per-lesion table (dicts): ``lesion`` (number), ``kind`` (``"target"``, ``"non-target"``,
        ``"new"``, ``"equivocal new"``), ``organ``, ``prior_mm``, ``now_mm``, ``prior_components``,
        ``now_components``, ``note``.
    target_lesions_prior_mm, target_lesions_now_mm
        The target lesions' diameters (mm), in the order of ``lesions``.
    new_lesions
        Number of unequivocal new lesions, or ``None`` where they could not be assessed.
    sources
        ``{"prior": {...}, "current": {...}}``: source, label, trustworthy.
    frames
        ``{"prior": uid, "current": uid, "registration": bool}``.
    volumes_prior_cc, volumes_now_cc, volume_change_pct
        Per structure present in both studies; ΔV% only for same-source, trustworthy contours and
        non-empty structures.
    reference
        What the change is measured against.
    notes
        The reasons' messages, for plain-text readers.
    """

    category: str
    final: bool
    reasons: tuple[dict[str, Any], ...]
    target: tuple[str, ...]
    sld_prior_mm: float
    sld_now_mm: float
    change_pct: float
    change_mm: float
    lesions: tuple[dict[str, Any], ...]
    target_lesions_prior_mm: tuple[float, ...]
    target_lesions_now_mm: tuple[float, ...]
    new_lesions: int | None
    sources: dict[str, dict[str, Any]]
    frames: dict[str, Any]
    volumes_prior_cc: dict[str, float] = field(default_factory=dict)
    volumes_now_cc: dict[str, float] = field(default_factory=dict)
    volume_change_pct: dict[str, float] = field(default_factory=dict)
    reference: str = "most recent prior study (baseline and nadir)"
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples → lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


def _reason(
    code: str, level: str, message: str, *, structure: str | None = None, **values: Any
) -> dict[str, Any]:
    return {"code": code, "level": level, "message": message, "structure": structure, "values": values}


# --------------------------------------------------------------------------------------------- rules
def recist_category(sld_prior_mm: float, sld_now_mm: float, *, new_lesion: bool = False) -> str:
    """RECIST 1.1 category of the target lesions from the sums of longest diameters
    (docs/clinical_definitions.md "Response").

    Parameters
    ----------
    sld_prior_mm
        SLD of the target lesions at the reference (prior) study, mm.
    sld_now_mm
        SLD of the same lesions now, mm (0 when all are gone).
    new_lesion
        An unequivocal new lesion appeared (→ PD whatever the diameters).

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


def measurable_threshold_mm(mask: xr.DataArray, measurable_mm: float = 10.0) -> float:
    """RECIST 1.1 §3.1: ≥ 10 mm on CT with slices ≤ 5 mm; with thicker slices, ≥ twice the slice thickness."""
    slice_mm = float(mask.geo.spacing[0])
    return max(measurable_mm, 2.0 * slice_mm) if slice_mm > 5.0 + _TOL else measurable_mm


# --------------------------------------------------------------------------------------------- helpers
def _lookup(structures: Mapping[str, xr.DataArray], name: str) -> str | None:
    if name in structures:
        return name
    wanted = normalise_name(name)
    hits = [k for k in structures if normalise_name(k) == wanted]
    return hits[0] if hits else None


def _as_study(value: StudyContours | Mapping[str, xr.DataArray]) -> StudyContours:
    return value if isinstance(value, StudyContours) else StudyContours(dict(value), source="unspecified")


def _world(mask: xr.DataArray, transform: np.ndarray | None) -> np.ndarray:
    kji = np.argwhere(np.asarray(mask.values, dtype=bool))
    world = mask.geo.world(kji)
    if transform is None:
        return np.asarray(world, dtype=float)
    return np.asarray(world @ np.asarray(transform)[:3, :3].T + np.asarray(transform)[:3, 3], dtype=float)


def _cropped_components(mask: xr.DataArray) -> list[xr.DataArray]:
    """26-connected components, each cropped to its bounding box (affine shifted to match): the diameters and
    positions of a few small lesions should not cost a pass over the whole CT grid each."""
    values = np.asarray(mask.values, dtype=bool)
    labels, _ = ndimage.label(values, structure=ndimage.generate_binary_structure(3, 3))
    affine = mask.geo.affine
    out = []
    for label, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None:
            continue
        shifted = affine.copy()
        shifted[:3, 3] = (affine @ np.array([box[2].start, box[1].start, box[0].start, 1.0]))[:3]
        out.append(make_volume(labels[box] == label, shifted, name=f"{mask.name}#{label}"))
    return out


def _components(
    study: StudyContours, keys: Sequence[tuple[str, str]], transform: np.ndarray | None
) -> list[_Component]:
    out = []
    for key, organ in keys:
        for part in _cropped_components(study.structures[key]):
            out.append(
                _Component(
                    organ=organ,
                    structure=key,
                    diameter_mm=longest_axial_diameter(part),
                    volume_cc=float(np.count_nonzero(part.values)) * voxel_volume_cc(part),
                    points=_world(part, transform),
                )
            )
    return out


def _groups(
    prior: list[_Component], now: list[_Component], match_mm: float
) -> list[tuple[list[int], list[int]]]:
    """Connected groups of the bipartite "overlap or within match_mm" graph: (prior indices, current indices)."""
    parent = list(range(len(prior) + len(now)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    trees = [cKDTree(p.points) for p in prior]
    for c_idx, c in enumerate(now):
        for p_idx, tree in enumerate(trees):
            distance, _ = tree.query(c.points, k=1, distance_upper_bound=match_mm + _TOL)
            if np.isfinite(distance).any():
                parent[find(len(prior) + c_idx)] = find(p_idx)
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for i in range(len(prior)):
        groups.setdefault(find(i), ([], []))[0].append(i)
    for j in range(len(now)):
        groups.setdefault(find(len(prior) + j), ([], []))[1].append(j)
    return list(groups.values())


def _select_targets(
    prior: list[_Component], threshold_mm: float, max_targets: int, max_per_organ: int
) -> tuple[list[int], list[str]]:
    """Indices of the target lesions (largest measurable first, ≤ max_per_organ per organ, ≤ max_targets),
    and a note per prior component that is not one."""
    order = sorted(range(len(prior)), key=lambda i: -prior[i].diameter_mm)
    chosen: list[int] = []
    per_organ: dict[str, int] = {}
    why = [""] * len(prior)
    for i in order:
        c = prior[i]
        if c.diameter_mm < threshold_mm - _TOL:
            why[i] = f"non-measurable ({c.diameter_mm:.1f} mm < {threshold_mm:g} mm)"
        elif per_organ.get(c.organ, 0) >= max_per_organ:
            why[i] = f"measurable, not a target: already {max_per_organ} target lesions in {c.organ}"
        elif len(chosen) >= max_targets:
            why[i] = f"measurable, not a target: already {max_targets} target lesions"
        else:
            chosen.append(i)
            per_organ[c.organ] = per_organ.get(c.organ, 0) + 1
    return chosen, why


# --------------------------------------------------------------------------------------------- main
def assess_response(
    current: StudyContours | Mapping[str, xr.DataArray],
    prior: StudyContours | Mapping[str, xr.DataArray],
    *,
    target: str | Sequence[str] = "GTV",
    organ_of: Mapping[str, str] | None = None,
    registration: np.ndarray | None = None,
    measurable_mm: float = 10.0,
    max_targets: int = 5,
    max_per_organ: int = 2,
    match_mm: float = 5.0,
) -> Response:
    """RECIST 1.1 response and ΔV% of the current study against the most recent prior (module docstring).

    Parameters
    ----------
    current, prior
        Each study's contours with their source and trust (:class:`StudyContours`). A plain mapping of masks
        is accepted as contours of unstated source: the category is then provisional (``final=False``).
    target
        The structure(s) holding the lesions (names matched ignoring case, spaces, ``_`` and ``-``).
    organ_of
        Organ of each target structure, for the "2 per organ" rule (default: each structure its own organ).
    registration
        4×4 rigid/affine matrix mapping prior patient coordinates (LPS mm) to the current study's:
        ``x_current = registration @ x_prior`` (e.g. a DICOM Spatial Registration's matrix). Needed to follow
        lesions when the frames of reference differ.
    measurable_mm
        Minimum longest axial diameter of a measurable lesion on ≤ 5 mm slices (RECIST 1.1: 10 mm).
    max_targets, max_per_organ
        At most this many target lesions in all / per organ (RECIST 1.1: 5 and 2).
    match_mm
        Prior and current components at most this far apart (voxel centres, patient frame) are the same lesion.

    Returns
    -------
    Response
    """
    now_study, prior_study = _as_study(current), _as_study(prior)
    targets = [target] if isinstance(target, str) else list(target)
    organs = dict(organ_of or {})
    reasons: list[dict[str, Any]] = []
    sources = {
        name: {"source": s.source, "label": s.label, "trustworthy": s.trustworthy}
        for name, s in (("prior", prior_study), ("current", now_study))
    }

    # Which structures hold the lesions, in each study.
    keys: dict[str, list[tuple[str, str]]] = {"prior": [], "current": []}
    for side, study in (("prior", prior_study), ("current", now_study)):
        for name in targets:
            key = _lookup(study.structures, name)
            if key is None:
                reasons.append(
                    _reason(
                        "TARGET_MISSING",
                        "error",
                        f"no structure named {name!r} in the {side} study "
                        f"({', '.join(study.structures) or 'no structures'}): response not evaluable",
                        structure=name,
                    )
                )
            else:
                keys[side].append((key, organs.get(name, organs.get(key, name))))

    frame_prior = prior_study.frame_of_reference_uid or _frame_of(prior_study, keys["prior"])
    frame_now = now_study.frame_of_reference_uid or _frame_of(now_study, keys["current"])
    frames = {"prior": frame_prior, "current": frame_now, "registration": registration is not None}

    reasons += _comparability_reasons(prior_study, now_study, keys)
    transform: np.ndarray | None = None
    if registration is not None:
        transform = np.asarray(registration, dtype=float)
        if transform.shape != (4, 4) or not np.allclose(transform[3], [0, 0, 0, 1]):
            raise PlanningError(
                f"registration must be a 4×4 affine matrix (last row 0 0 0 1); got {transform!r}"
            )
    # Positions can be compared in one frame of reference, or through a registration.
    positional = (bool(frame_prior) and frame_prior == frame_now) or transform is not None
    if not positional:
        reasons.append(
            _reason(
                "FRAME_UNREGISTERED",
                "review",
                f"the studies are in different (or unknown) frames of reference (prior {frame_prior or '?'}, "
                f"current {frame_now or '?'}) and no registration was given: lesions cannot be followed by "
                "position, so current components are taken by size and new lesions are not assessed; the "
                "category is provisional",
                prior=frame_prior,
                current=frame_now,
            )
        )

    blocking = any(r["level"] == "error" for r in reasons)
    if blocking:
        return _finish(
            "NE",
            reasons,
            targets,
            sources,
            frames,
            now_study,
            prior_study,
            sld=(math.nan, math.nan),
            lesions=[],
            t_prior=(),
            t_now=(),
            new=None,
        )

    prior_parts = _components(prior_study, keys["prior"], transform)
    now_parts = _components(now_study, keys["current"], None)
    first_prior = prior_study.structures[keys["prior"][0][0]]
    threshold = measurable_threshold_mm(first_prior, measurable_mm)
    chosen, why_not = _select_targets(prior_parts, threshold, max_targets, max_per_organ)
    for rank, i in enumerate(chosen, 1):
        prior_parts[i].index = rank
    if not chosen:
        reasons.append(
            _reason(
                "NO_MEASURABLE_DISEASE",
                "review",
                f"no measurable lesion (≥ {threshold:g} mm) in the prior {', '.join(targets)}: response not "
                "evaluable",
                values_mm=[round(c.diameter_mm, 2) for c in prior_parts],
            )
        )
        return _finish(
            "NE",
            reasons,
            targets,
            sources,
            frames,
            now_study,
            prior_study,
            sld=(0.0, math.nan),
            lesions=[],
            t_prior=(),
            t_now=(),
            new=None,
        )

    if positional:
        now_threshold = measurable_threshold_mm(now_study.structures[keys["current"][0][0]], measurable_mm)
        followed = _follow_by_position(prior_parts, now_parts, chosen, why_not, match_mm, now_threshold)
    else:
        followed = _follow_by_size(prior_parts, now_parts, chosen)
    reasons += followed.reasons
    order = sorted(chosen, key=lambda i: prior_parts[i].index)
    t_prior = tuple(prior_parts[i].diameter_mm for i in order)
    t_now = tuple(followed.target_now.get(i, 0.0) for i in order)
    sld_prior, sld_now = float(sum(t_prior)), float(sum(t_now))
    category = recist_category(sld_prior, sld_now, new_lesion=bool(followed.new))
    remaining_other = followed.remaining_other
    if category == "CR" and remaining_other:
        category = "PR"
        reasons.append(
            _reason(
                "NON_TARGET_REMAINS",
                "note",
                f"every target lesion has disappeared but {remaining_other} other component(s) remain: not a "
                "complete response (RECIST 1.1 Table 1: target CR with non-target disease present is PR)",
                components=remaining_other,
            )
        )
    lesions = sorted(followed.lesions, key=lambda r: (r["kind"] != "target", r["lesion"] or 99))
    return _finish(
        category,
        reasons,
        targets,
        sources,
        frames,
        now_study,
        prior_study,
        sld=(sld_prior, sld_now),
        lesions=lesions,
        t_prior=t_prior,
        t_now=t_now,
        new=followed.new,
    )


def _comparability_reasons(
    prior: StudyContours, now: StudyContours, keys: Mapping[str, Sequence[tuple[str, str]]]
) -> list[dict[str, Any]]:
    """Like with like: the same source on both studies, trustworthy contours, no empty model segmentation."""
    reasons: list[dict[str, Any]] = []
    if "unspecified" in (prior.source, now.source):
        reasons.append(
            _reason(
                "SOURCE_UNSTATED",
                "review",
                "the contours' sources (reference or model) were not stated: the "
                "category is provisional until both are known to come from the same source",
            )
        )
    elif prior.source != now.source:
        reasons.append(
            _reason(
                "MIXED_SOURCES",
                "error",
                f"prior contours from {_who(prior)}, current from {_who(now)}: contours of different "
                "sources are not comparable (a contouring difference would read as a response); compare "
                "reference with reference, or run the model on the prior study too",
                prior=prior.source,
                current=now.source,
            )
        )
    for side, study in (("prior", prior), ("current", now)):
        if not study.trustworthy:
            reasons.append(
                _reason(
                    "UNTRUSTED_CONTOURS",
                    "error",
                    f"the {side} contours ({_who(study)}) are not trustworthy"
                    + (f": {study.why_untrusted}" if study.why_untrusted else ""),
                )
            )
        if study.source != "model":
            continue  # an empty reference contour is a disappearance, judged below
        for key, _ in keys[side]:
            if not np.asarray(study.structures[key].values).any():
                reasons.append(
                    _reason(
                        "EMPTY_MODEL_SEGMENTATION",
                        "error",
                        f"the model found no {key} in the {side} study: an empty segmentation is not a "
                        "disappearance; check the contours or use the reference structures",
                        structure=key,
                    )
                )
    return reasons


@dataclass
class _Followed:
    """Target lesions measured now, and what else the current study holds."""

    lesions: list[dict[str, Any]] = field(default_factory=list)
    target_now: dict[int, float] = field(default_factory=dict)
    remaining_other: int = 0  # current components that are not target lesions (non-target, equivocal new)
    new: int | None = 0
    reasons: list[dict[str, Any]] = field(default_factory=list)


def _follow_by_position(
    prior: list[_Component],
    now: list[_Component],
    chosen: list[int],
    why_not: list[str],
    match_mm: float,
    now_threshold: float,
) -> _Followed:
    """Lesions followed through the groups of associated components (module docstring)."""
    out = _Followed()
    for prior_idx, now_idx in _groups(prior, now, match_mm):
        now_sum = float(sum(now[j].diameter_mm for j in now_idx))
        if not prior_idx:
            for j in now_idx:
                _new_lesion(out, now[j], now_threshold)
            continue
        group_targets = sorted((i for i in prior_idx if i in chosen), key=lambda i: prior[i].index)
        if not group_targets:
            out.remaining_other += len(now_idx)
            for n, i in enumerate(prior_idx):
                out.lesions.append(
                    _lesion(
                        "non-target",
                        prior[i].organ,
                        prior[i].diameter_mm,
                        now_sum if n == 0 else 0.0,
                        1,
                        len(now_idx) if n == 0 else 0,
                        why_not[i],
                    )
                )
            continue
        lead = group_targets[0]
        note = _group_note(prior, group_targets, prior_idx, now_idx, now_sum)
        if note:
            out.reasons.append(_reason("LESION_ASSOCIATION", "note", note, structure=prior[lead].structure))
        for i in group_targets:
            # A coalesced lesion's diameter is assigned to the first of its target lesions, 0 to the others.
            out.target_now[i] = now_sum if i == lead else 0.0
            out.lesions.append(
                _lesion(
                    "target",
                    prior[i].organ,
                    prior[i].diameter_mm,
                    out.target_now[i],
                    1,
                    len(now_idx) if i == lead else 0,
                    (note or ("" if now_idx else "disappeared"))
                    if i == lead
                    else f"coalesced with target lesion {prior[lead].index}",
                    number=prior[i].index,
                )
            )
        for i in prior_idx:
            if i not in chosen:
                out.lesions.append(
                    _lesion(
                        "non-target",
                        prior[i].organ,
                        prior[i].diameter_mm,
                        0.0,
                        1,
                        0,
                        f"{why_not[i]}; part of the group of target lesion {prior[lead].index}",
                    )
                )
    return out


def _new_lesion(out: _Followed, component: _Component, threshold_mm: float) -> None:
    """A current component associated with no prior one: unequivocal when measurable, else equivocal."""
    d = component.diameter_mm
    unequivocal = d >= threshold_mm - _TOL
    out.new = (out.new or 0) + int(unequivocal)
    out.lesions.append(
        _lesion(
            "new" if unequivocal else "equivocal new",
            component.organ,
            math.nan,
            d,
            0,
            1,
            "unequivocal new lesion (measurable)"
            if unequivocal
            else f"new component below {threshold_mm:g} mm: equivocal, re-check at the next study",
        )
    )
    if not unequivocal:
        out.remaining_other += 1
        out.reasons.append(
            _reason(
                "NEW_LESION_EQUIVOCAL",
                "review",
                f"a new {d:.1f} mm component in {component.structure} (below {threshold_mm:g} mm): equivocal, "
                "not counted as progression; re-check at the next study",
                structure=component.structure,
                diameter_mm=d,
            )
        )


def _follow_by_size(prior: list[_Component], now: list[_Component], chosen: list[int]) -> _Followed:
    """Without positions: the largest current components stand for the target lesions; new ones unknown."""
    out = _Followed(new=None)
    by_size = sorted(now, key=lambda c: -c.diameter_mm)
    for rank, i in enumerate(sorted(chosen, key=lambda i: prior[i].index)):
        out.target_now[i] = by_size[rank].diameter_mm if rank < len(by_size) else 0.0
        out.lesions.append(
            _lesion(
                "target",
                prior[i].organ,
                prior[i].diameter_mm,
                out.target_now[i],
                1,
                int(rank < len(by_size)),
                "matched by size order (no shared frame or registration)",
                number=prior[i].index,
            )
        )
    out.remaining_other = max(0, len(by_size) - len(chosen))
    return out


def _who(study: StudyContours) -> str:
    return f"{study.source} ({study.label})" if study.label else study.source


def _frame_of(study: StudyContours, keys: Sequence[tuple[str, str]]) -> str:
    for key, _ in keys:
        uid = str(study.structures[key].attrs.get("frame_of_reference_uid") or "")
        if uid:
            return uid
    return ""


def _lesion(
    kind: str,
    organ: str,
    prior_mm: float,
    now_mm: float,
    prior_components: int,
    now_components: int,
    note: str,
    *,
    number: int | None = None,
) -> dict[str, Any]:
    return {
        "lesion": number,
        "kind": kind,
        "organ": organ,
        "prior_mm": prior_mm,
        "now_mm": now_mm,
        "prior_components": prior_components,
        "now_components": now_components,
        "note": note,
    }


def _group_note(
    prior: list[_Component], targets: list[int], prior_idx: list[int], now_idx: list[int], now_sum: float
) -> str:
    lead = prior[targets[0]].index
    if not now_idx:
        return ""
    parts = []
    if len(now_idx) > 1:
        parts.append(
            f"target lesion {lead} is in {len(now_idx)} fragments now: their diameters are summed "
            f"({now_sum:.1f} mm)"
        )
    if len(prior_idx) > 1:
        others = ", ".join(str(prior[i].index) for i in targets[1:]) or "a non-target lesion"
        parts.append(f"target lesion {lead} has coalesced with {others}: the coalesced diameter counts once")
    return "; ".join(parts)


def _finish(
    category: str,
    reasons: list[dict[str, Any]],
    targets: Sequence[str],
    sources: dict[str, dict[str, Any]],
    frames: dict[str, Any],
    now_study: StudyContours,
    prior_study: StudyContours,
    *,
    sld: tuple[float, float],
    lesions: list[dict[str, Any]],
    t_prior: tuple[float, ...],
    t_now: tuple[float, ...],
    new: int | None,
) -> Response:
    sld_prior, sld_now = sld
    if sld_prior > 0 and math.isfinite(sld_now):
        change_mm, change_pct = sld_now - sld_prior, 100.0 * (sld_now - sld_prior) / sld_prior
    else:
        change_mm = change_pct = math.nan
    volumes_prior, volumes_now, delta = _volumes(now_study, prior_study, reasons)
    provisional = any(r["level"] in ("error", "review") for r in reasons)
    final = category != "NE" and not provisional
    return Response(
        category=category,
        final=final,
        reasons=tuple(reasons),
        target=tuple(targets),
        sld_prior_mm=sld_prior,
        sld_now_mm=sld_now,
        change_pct=change_pct,
        change_mm=change_mm,
        lesions=tuple(lesions),
        target_lesions_prior_mm=t_prior,
        target_lesions_now_mm=t_now,
        new_lesions=new,
        sources=sources,
        frames=frames,
        volumes_prior_cc=volumes_prior,
        volumes_now_cc=volumes_now,
        volume_change_pct=delta,
        notes=tuple(r["message"] for r in reasons),
    )


def _volumes(
    now_study: StudyContours, prior_study: StudyContours, reasons: list[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Volumes of the structures in both studies; ΔV% only where the comparison is like with like."""
    volumes_prior: dict[str, float] = {}
    volumes_now: dict[str, float] = {}
    delta: dict[str, float] = {}
    same_source = prior_study.source == now_study.source or "unspecified" in (
        prior_study.source,
        now_study.source,
    )
    comparable = same_source and prior_study.trustworthy and now_study.trustworthy
    for name, mask in now_study.structures.items():
        other = _lookup(prior_study.structures, name)
        if other is None:
            continue
        v_now = float(np.count_nonzero(np.asarray(mask.values, dtype=bool))) * voxel_volume_cc(mask)
        prior_mask = prior_study.structures[other]
        v_prior = float(np.count_nonzero(np.asarray(prior_mask.values, dtype=bool))) * voxel_volume_cc(
            prior_mask
        )
        volumes_now[name], volumes_prior[name] = v_now, v_prior
        if comparable and v_prior > 0 and v_now > 0:
            delta[name] = 100.0 * (v_now - v_prior) / v_prior
    if volumes_now and not comparable:
        reasons.append(
            _reason(
                "VOLUME_CHANGE_NOT_COMPARABLE",
                "note",
                "volume changes are not stated: the two studies' contours are not from the same trustworthy source",
            )
        )
    return volumes_prior, volumes_now, delta
