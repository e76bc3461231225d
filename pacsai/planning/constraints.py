"""Dose constraints as data: one YAML table per site, evaluated against DVHs → pass/fail rows.

A site file (``pacsai/planning/constraints/<site>.yaml``, or any path) has::

    site: thorax
    title: ...
    structures:                       # canonical name → how to find it
      Heart: {aliases: [Heart, Cor]}
      Lungs-GTV:
        aliases: [Lungs-GTV, Lung_Total-GTV]
        derive: {union: [Lung_L, Lung_R], minus: [GTV]}   # built from masks by derive_structures()
    constraints:
      - {structure: Heart, metric: V25Gy, comparator: "<", limit: 10, unit: "%", priority: soft,
         goal: 5, source: "QUANTEC ..."}

Metrics: ``Dmean``, ``Dmax``, ``Dmin`` (Gy), ``D<x>%`` (e.g. ``D2%``), ``D<x>cc`` (e.g. ``D0.03cc``, the
near-maximum), ``V<x>Gy`` (% of the structure), ``V<x>Gy_cc`` (cm³). Comparators ``<``, ``<=``, ``>``, ``>=``.
``goal`` (optional) is a stricter "optimal" value shown next to the limit (QUANTEC's ranges, e.g. lung
V20 ≤ 30–35 %: limit 35, goal 30). The unit must match the metric.

Names are matched tolerantly: case, spaces, ``_``, ``-`` and ``+`` are ignored, and each structure lists its
aliases.

What a row may state (docs/clinical_definitions.md "Constraints"): a value and PASS/FAIL only on a total plan dose, on a
structure that is present, non-empty and covered by the dose grid, at conventional fractionation or converted
to EQD2 with the organ's α/β. Otherwise the row's ``status`` says why not, and it counts as not passed
(``passed`` is False):

* ``"not evaluable"``: the structure is missing ("no structure named 'X'"), empty ("X is empty (the model
  found nothing)"), a derived structure lacks a component ("Lungs-GTV: GTV is empty ..."), the dose is not a
  total plan dose, or the fractionation is not conventional and the table gives no α/β;
* ``"unreliable"``: more than 1 % or 0.5 cm³ of the structure lies outside the dose grid (no dose there;
  never taken as 0 Gy).

Fractionation: QUANTEC limits are for ~2 Gy fractions. At a prescription dose per fraction outside
1.8–2.2 Gy the DVH is converted voxel by voxel to EQD2 (each voxel's dose per fraction is its own dose / n,
:func:`pacsai.planning.fractionation.eqd2_dvh`) with the α/β of the constraint (``alpha_beta_gy`` on the
constraint or its structure), and the row's ``conversion`` says so ("EQD2, α/β 3 Gy, 20 × 3 Gy").
:func:`evaluate_plan` does all of this from a dose grid and masks; :func:`evaluate_constraints` evaluates
DVHs already computed.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import yaml

from pacsai.errors import ConfigError, PacsaiWarning, PlanningError
from pacsai.imaging.geometry import like, same_grid
from pacsai.planning.dvh import DVH

logger = logging.getLogger(__name__)

COLUMNS = [
    "structure",
    "matched",
    "state",
    "metric",
    "value",
    "unit",
    "comparator",
    "limit",
    "goal",
    "passed",
    "goal_met",
    "status",
    "priority",
    "source",
    "reason",
    "conversion",
    "alpha_beta_gy",
    "uncovered_cc",
    "uncovered_pct",
]

#: Row statuses: only "pass" is a constraint known to be met.
STATUSES = ("pass", "fail", "not evaluable", "unreliable")
#: Prescription dose per fraction (Gy) within which the limits apply to the physical dose as is.
CONVENTIONAL_GY = (1.8, 2.2)
#: A structure more uncovered by the dose grid than this (either) is "unreliable".
MAX_UNCOVERED_PCT = 1.0
MAX_UNCOVERED_CC = 0.5

_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_METRIC = re.compile(
    r"^(?:(?P<stat>Dmean|Dmax|Dmin)|D(?P<dpct>\d+(?:\.\d+)?)%|D(?P<dcc>\d+(?:\.\d+)?)cc"
    r"|V(?P<vgy>\d+(?:\.\d+)?)Gy(?P<vcc>_cc)?)$"
)


def normalise_name(name: str) -> str:
    """Structure name for matching: lower case, without spaces, ``_``, ``-``, ``+``, ``.``
    (``"Lung_L"`` → ``"lungl"``)."""
    return re.sub(r"[\s_\-+.]", "", str(name)).lower()


@dataclass(frozen=True)
class Constraint:
    """One row of a site table (see the module docstring)."""

    structure: str
    metric: str
    comparator: str
    limit: float
    unit: str
    priority: str
    source: str
    goal: float | None = None
    alpha_beta_gy: float | None = None

    def measure(self, dvh: DVH) -> float:
        """The metric's value on a DVH (Gy, % or cm³)."""
        match = _METRIC.match(self.metric)
        if match is None:  # validated at load time; kept for constraints built by hand
            raise PlanningError(f"unknown metric {self.metric!r}")
        if match["stat"]:
            return {"Dmean": dvh.mean, "Dmax": dvh.max, "Dmin": dvh.min}[match["stat"]]
        if match["dpct"]:
            return dvh.d(float(match["dpct"]))
        if match["dcc"]:
            return dvh.d_cc(float(match["dcc"]))
        dose = float(match["vgy"])
        return dvh.v_cc(dose) if match["vcc"] else dvh.v(dose)

    def check(self, value: float) -> tuple[bool, bool | None]:
        """(passed against the limit, goal met or None without a goal)."""
        compare = _COMPARATORS[self.comparator]
        return bool(compare(value, self.limit)), (
            None if self.goal is None else bool(compare(value, self.goal))
        )


@dataclass(frozen=True)
class ConstraintSet:
    """A parsed site table."""

    site: str
    title: str
    structures: dict[str, dict[str, Any]]
    constraints: tuple[Constraint, ...]
    path: str = ""
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _metric_unit(metric: str) -> str:
    match = _METRIC.match(metric)
    if match is None:
        raise ValueError(metric)
    if match["vgy"]:
        return "cc" if match["vcc"] else "%"
    return "Gy"


def available_sites() -> list[str]:
    """Names of the site tables shipped with pacsai."""
    folder = resources.files("pacsai.planning").joinpath("constraints")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_constraints(site: str | Path) -> ConstraintSet:
    """Load a site table: a shipped site name (``"thorax"``, ``"breast"``, ``"head_neck"``) or a YAML path.

    Raises
    ------
    ConfigError
        Unknown site, unreadable YAML, or an invalid entry (the message names the file, entry and fix).
    """
    if isinstance(site, Path) or str(site).endswith((".yaml", ".yml")):
        path = Path(site)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read constraint table {path}: {err}") from err
        where = str(path)
    else:
        # One part per joinpath call: Python 3.10's Traversable takes one.
        resource = resources.files("pacsai.planning").joinpath("constraints").joinpath(f"{site}.yaml")
        if not resource.is_file():
            raise ConfigError(
                f"no constraint table for site {site!r}; shipped sites: {', '.join(available_sites())}, "
                "or pass the path of your own YAML table"
            )
        text = resource.read_text(encoding="utf-8")
        where = f"pacsai/planning/constraints/{site}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping) or not isinstance(data.get("constraints"), list):
        raise ConfigError(f"{where} needs a top-level mapping with a 'constraints' list")
    structures = {str(k): dict(v or {}) for k, v in (data.get("structures") or {}).items()}
    rows = []
    for n, raw in enumerate(data["constraints"], 1):
        try:
            metric = str(raw["metric"])
            unit = str(raw["unit"])
            comparator = str(raw["comparator"])
            if _METRIC.match(metric) is None:
                raise ValueError(
                    f"unknown metric {metric!r} (Dmean, Dmax, Dmin, D2%, D0.03cc, V20Gy, V20Gy_cc)"
                )
            if comparator not in _COMPARATORS:
                raise ValueError(f"comparator {comparator!r} is not one of {', '.join(_COMPARATORS)}")
            if unit != _metric_unit(metric):
                raise ValueError(
                    f"unit {unit!r} does not match metric {metric!r} (expected {_metric_unit(metric)!r})"
                )
            priority = str(raw.get("priority", "hard"))
            if priority not in ("hard", "soft"):
                raise ValueError(f"priority {priority!r} must be 'hard' or 'soft'")
            # α/β of the constraint's endpoint: on the constraint, else on its structure.
            ab_raw = raw.get("alpha_beta_gy", structures.get(str(raw["structure"]), {}).get("alpha_beta_gy"))
            alpha_beta = None if ab_raw is None else float(ab_raw)
            if alpha_beta is not None and not (math.isfinite(alpha_beta) and alpha_beta > 0):
                raise ValueError(f"alpha_beta_gy {ab_raw!r} must be a number > 0 Gy")
            rows.append(
                Constraint(
                    structure=str(raw["structure"]),
                    metric=metric,
                    comparator=comparator,
                    limit=float(raw["limit"]),
                    unit=unit,
                    priority=priority,
                    source=str(raw.get("source", "")),
                    goal=None if raw.get("goal") is None else float(raw["goal"]),
                    alpha_beta_gy=alpha_beta,
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: constraint #{n} ({raw!r}) is invalid: {err}") from err
    aliases = {
        name: tuple(dict.fromkeys([name, *[str(a) for a in spec.get("aliases", [])]]))
        for name, spec in structures.items()
    }
    for row in rows:
        aliases.setdefault(row.structure, (row.structure,))
    return ConstraintSet(
        site=str(data.get("site", Path(where).stem)),
        title=str(data.get("title", "")),
        structures=structures,
        constraints=tuple(rows),
        path=where,
        aliases=aliases,
    )


def find_structure(
    canonical: str, available: Sequence[str], aliases: Sequence[str]
) -> tuple[str | None, list[str]]:
    """The available name matching ``canonical`` through its aliases (first alias wins), and all candidates."""
    by_norm: dict[str, list[str]] = {}
    for name in available:
        by_norm.setdefault(normalise_name(name), []).append(name)
    candidates: list[str] = []
    for alias in (canonical, *aliases):
        for name in by_norm.get(normalise_name(alias), []):
            if name not in candidates:
                candidates.append(name)
    return (candidates[0] if candidates else None), candidates


def _resolve(
    table: ConstraintSet, canonical: str, available: Sequence[str], names: Mapping[str, str]
) -> tuple[str | None, str]:
    """(matched key or None, reason when not matched)."""
    if canonical in names:
        key = names[canonical]
        return (
            (key, "") if key in available else (None, f"mapped to {key!r}, which is not among the structures")
        )
    match, candidates = find_structure(canonical, available, table.aliases.get(canonical, (canonical,)))
    if len(candidates) > 1:
        warnings.warn(
            f"{canonical!r} matches several structures {candidates}: using {match!r} (first alias in "
            f"{table.path}); pass names={{{canonical!r}: ...}} to choose",
            PacsaiWarning,
            stacklevel=3,
        )
    if match is None:
        derive = table.structures.get(canonical, {}).get("derive")
        hint = (
            " derive it from masks with pacsai.planning.derive_structures(masks, site=...)" if derive else ""
        )
        return None, (
            f"no structure named {canonical!r} (aliases: {', '.join(table.aliases.get(canonical, ()))});{hint}"
            f" or map it with names={{{canonical!r}: '<your name>'}}"
        )
    return match, ""


# --------------------------------------------------------------------------------------------- rows
def _row(c: Constraint, **values: Any) -> dict[str, Any]:
    """A table row for constraint ``c``, not evaluable until a value is measured."""
    row: dict[str, Any] = {
        "structure": c.structure,
        "matched": None,
        "state": None,
        "metric": c.metric,
        "value": np.nan,
        "unit": c.unit,
        "comparator": c.comparator,
        "limit": c.limit,
        "goal": np.nan if c.goal is None else c.goal,
        "passed": False,  # only a measured value that meets the limit is "passed"
        "goal_met": pd.NA,
        "status": "not evaluable",
        "priority": c.priority,
        "source": c.source,
        "reason": "",
        "conversion": "",
        "alpha_beta_gy": np.nan if c.alpha_beta_gy is None else c.alpha_beta_gy,
        "uncovered_cc": np.nan,
        "uncovered_pct": np.nan,
    }
    row.update(values)
    return row


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["passed"] = frame["passed"].astype("boolean")
    frame["goal_met"] = frame["goal_met"].astype("boolean")
    return frame


def _conversion(c: Constraint, fractions: int | None, prescription_gy: float | None) -> tuple[str, bool, str]:
    """(conversion text, convert to EQD2?, reason it cannot be evaluated or "")."""
    if fractions is None or prescription_gy is None:
        return "none (fractionation not stated: the limits assume ~2 Gy per fraction)", False, ""
    if fractions < 1 or not prescription_gy > 0:
        raise PlanningError(
            f"fractions must be ≥ 1 and the prescription > 0 Gy; got {fractions}, {prescription_gy}"
        )
    per = prescription_gy / fractions
    schedule = f"{fractions} × {per:.4g} Gy"
    lo, hi = CONVENTIONAL_GY
    if lo - 1e-9 <= per <= hi + 1e-9:
        return f"none (physical dose; {schedule} is within {lo}–{hi} Gy per fraction)", False, ""
    if c.alpha_beta_gy is None:
        return (
            "",
            False,
            (
                f"{schedule} is outside {lo}–{hi} Gy per fraction and the table gives no α/β for "
                f"{c.structure} {c.metric}: the limit (for ~2 Gy fractions) cannot be applied; add alpha_beta_gy"
            ),
        )
    return f"EQD2, α/β {c.alpha_beta_gy:g} Gy, {schedule}", True, ""


def _measure(c: Constraint, dvh: DVH, fractions: int | None, prescription_gy: float | None) -> dict[str, Any]:
    """Value, pass/fail and conversion of one constraint on one DVH (already known reliable)."""
    text, convert, refusal = _conversion(c, fractions, prescription_gy)
    if refusal:
        return {"reason": refusal}
    # _conversion converts only where the fractions and the α/β are known (stated again for the type checker)
    if convert and fractions is not None and c.alpha_beta_gy is not None:
        from pacsai.planning.fractionation import eqd2_dvh  # fractionation imports dvh; not at module load

        dvh = eqd2_dvh(dvh, n_fractions=int(fractions), alpha_beta=float(c.alpha_beta_gy))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PacsaiWarning)
        value = c.measure(dvh)
    passed, goal_met = c.check(value)
    return {
        "value": value,
        "passed": passed,
        "goal_met": pd.NA if goal_met is None else goal_met,
        "status": "pass" if passed else "fail",
        "reason": "; ".join(str(w.message) for w in caught),
        "conversion": text,
    }


def evaluate_constraints(
    dvhs: Mapping[str, DVH],
    site: str | Path | ConstraintSet = "thorax",
    *,
    names: Mapping[str, str] | None = None,
    fractions: int | None = None,
    prescription_gy: float | None = None,
) -> pd.DataFrame:
    """Evaluate a site's constraints against DVHs already computed: one row per constraint.

    The DVHs must be of present, non-empty structures on a total plan dose; :func:`evaluate_plan` checks
    all of that from the dose and the masks and is what a report should call.

    Parameters
    ----------
    dvhs
        DVHs by structure name (any naming; matched through the table's aliases).
    site
        A shipped site name, a YAML path, or a loaded :class:`ConstraintSet`.
    names
        Explicit mapping from the table's structure names to keys of ``dvhs`` (wins over aliases), e.g.
        ``{"Lung_Ipsi": "Lt Lung"}``.
    fractions, prescription_gy
        The schedule. Outside 1.8–2.2 Gy per fraction each DVH is converted to EQD2 with the constraint's
        α/β, or the row is not evaluable without one. Not given: the physical dose is compared as is and
        ``conversion`` says that the fractionation was not stated.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS`: ``structure`` (the table's name), ``matched`` (the DVH used), ``state``,
        ``metric``, ``value``, ``unit``, ``comparator``, ``limit``, ``goal``, ``passed`` (boolean; False
        unless measured and met), ``goal_met``, ``status`` (:data:`STATUSES`), ``priority``, ``source``,
        ``reason``, ``conversion``, ``alpha_beta_gy``, ``uncovered_cc``/``uncovered_pct`` (from the DVH).
    """
    table = site if isinstance(site, ConstraintSet) else load_constraints(site)
    mapping = dict(names or {})
    available = list(dvhs)
    rows: list[dict[str, Any]] = []
    for c in table.constraints:
        key, reason = _resolve(table, c.structure, available, mapping)
        if key is None:
            rows.append(_row(c, state="missing", reason=reason))
            continue
        h = dvhs[key]
        total = h.volume_cc + h.uncovered_cc
        row = _row(
            c,
            matched=key,
            state="present",
            uncovered_cc=h.uncovered_cc,
            uncovered_pct=100.0 * h.uncovered_cc / total if total > 0 else np.nan,
        )
        row.update(_measure(c, h, fractions, prescription_gy))
        rows.append(row)
    return _frame(rows)


def _empty_reason(name: str, mask: xr.DataArray) -> str:
    """ "<Structure> is empty (...)", saying who drew nothing (model masks carry ``attrs["source_model"]``)."""
    if mask.attrs.get("source_model"):
        return f"{name} is empty (the model found nothing)"
    return f"{name} is empty (the structure set has no voxel of it)"


def _component_problem(
    table: ConstraintSet,
    canonical: str,
    masks: Mapping[str, xr.DataArray],
    mapping: Mapping[str, str],
) -> tuple[str, str] | None:
    """(state, reason) why a derived structure cannot be formed; None when every component is present."""
    derive = table.structures.get(canonical, {}).get("derive") or {}
    formula = " ∪ ".join(derive.get("union", [])) + "".join(f" − {m}" for m in derive.get("minus", []))
    for part in [*derive.get("union", []), *derive.get("minus", [])]:
        key, _ = _resolve(table, part, list(masks), mapping)
        if key is None:
            return "missing", f"{canonical} = {formula} cannot be formed: no structure named {part!r}"
        if not bool(np.asarray(masks[key].values).any()):
            return "empty", f"{canonical} = {formula} cannot be formed: {_empty_reason(key, masks[key])}"
    return None


def _constraint_masks(
    table: ConstraintSet, masks: Mapping[str, xr.DataArray], mapping: Mapping[str, str]
) -> tuple[dict[str, xr.DataArray], dict[str, tuple[str, str]]]:
    """Masks of the constraint structures that can be had (given or derived), and (state, reason) of the others."""
    found: dict[str, xr.DataArray] = {}
    problems: dict[str, tuple[str, str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)  # what cannot be derived is stated in the rows
        derived = derive_structures(masks, table, names=mapping)
    for canonical in dict.fromkeys(c.structure for c in table.constraints):
        key, reason = _resolve(table, canonical, list(masks), mapping)
        if key is not None:
            found[canonical] = masks[key].rename(key) if masks[key].name != key else masks[key]
        elif canonical in derived:
            found[canonical] = derived[canonical]
        else:
            problem = None
            if table.structures.get(canonical, {}).get("derive"):
                problem = _component_problem(table, canonical, masks, mapping)
            problems[canonical] = problem or ("missing", reason)
    return found, problems


def _plan_dvh(dose: xr.DataArray, mask: xr.DataArray, cache: dict[str, DVH]) -> DVH | dict[str, Any]:
    """The structure's DVH on the covered part (cached by name), or the row fields saying why there is none."""
    from pacsai.planning.dvh import dose_coverage
    from pacsai.planning.dvh import dvh as compute_dvh

    key = str(mask.name)
    cached = cache.get(key)
    if cached is not None:
        if "counted as 0 Gy" in cached.method:
            raise PlanningError(
                f"the cached DVH of {key!r} counts uncovered volume as 0 Gy; use outside='exclude'"
            )
        return cached
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PacsaiWarning)  # the coverage is stated in the row
            cache[key] = compute_dvh(dose, mask, name=key)
    except PlanningError as err:
        if "entirely outside" not in str(err):
            return {"reason": str(err)}  # e.g. another frame of reference: said in the row, not a crash
        uncovered, _ = dose_coverage(dose, mask)
        return {
            "status": "unreliable",
            "uncovered_cc": uncovered,
            "uncovered_pct": 100.0,
            "reason": f"{key} lies entirely outside the dose grid ({uncovered:.3g} cm³): no dose is known there",
        }
    return cache[key]


def _plan_row(
    c: Constraint,
    mask: xr.DataArray,
    h: DVH,
    *,
    fractions: int,
    prescription_gy: float,
    max_uncovered_pct: float,
    max_uncovered_cc: float,
) -> dict[str, Any]:
    """The row of a constraint whose structure has a DVH: unreliable when too uncovered, else measured."""
    key = str(mask.name)
    pct = 100.0 * h.uncovered_cc / (h.volume_cc + h.uncovered_cc)
    row = _row(c, matched=key, state="present", uncovered_cc=h.uncovered_cc, uncovered_pct=pct)
    if pct > max_uncovered_pct + 1e-9 or h.uncovered_cc > max_uncovered_cc + 1e-12:
        row.update(
            status="unreliable",
            reason=(
                f"{h.uncovered_cc:.3g} cm³ ({pct:.3g} %) of {key} lies outside the dose grid (more than "
                f"{max_uncovered_pct:g} % or {max_uncovered_cc:g} cm³): no dose is known there, so "
                f"{c.metric} is not stated"
            ),
        )
        return row
    row.update(_measure(c, h, fractions, prescription_gy))
    if h.uncovered_cc > 0:
        note = f"{h.uncovered_cc:.3g} cm³ ({pct:.3g} %) outside the dose grid, excluded"
        row["reason"] = "; ".join(r for r in (row["reason"], note) if r)
    return row


def evaluate_plan(
    dose: xr.DataArray,
    masks: Mapping[str, xr.DataArray],
    site: str | Path | ConstraintSet = "thorax",
    *,
    fractions: int,
    prescription_gy: float,
    names: Mapping[str, str] | None = None,
    dvhs: dict[str, DVH] | None = None,
    max_uncovered_pct: float = MAX_UNCOVERED_PCT,
    max_uncovered_cc: float = MAX_UNCOVERED_CC,
) -> pd.DataFrame:
    """Evaluate a site's constraints on a plan: dose, structures and schedule checked before any verdict.

    For each constraint, in this order (the first failing check decides the row):

    1. the dose is a total plan dose in Gy (:func:`pacsai.imaging.dose.check_plan_dose`), else every row is
       "not evaluable" with the refusal (naming the RTDOSE's SOP instance UID);
    2. its structure exists (through the table's aliases, or derived, e.g. ``Lungs-GTV``, whose components
       must all exist and be non-empty) and is non-empty, else "not evaluable";
    3. at most ``max_uncovered_pct`` % and ``max_uncovered_cc`` cm³ of it lies outside the dose grid, else
       "unreliable" with the cm³ (the DVH covers only the part inside the grid; nothing counts as 0 Gy);
    4. the schedule is conventional (1.8–2.2 Gy per fraction) or the constraint has an α/β for EQD2, else
       "not evaluable";
    5. the metric is measured and compared: "pass" or "fail".

    Parameters
    ----------
    dose
        The plan dose (Gy), from :func:`pacsai.imaging.read_dose`.
    masks
        Boolean masks by name (any naming; matched through the table's aliases), in the dose's frame of
        reference. Attrs ``source_model`` (model masks) make an empty mask's reason say the model found nothing.
    site
        A shipped site name, a YAML path, or a loaded :class:`ConstraintSet`.
    fractions, prescription_gy
        The schedule (number of fractions and total prescribed dose).
    names
        Explicit mapping from the table's structure names to keys of ``masks``.
    dvhs
        Optional cache keyed by mask name (derived structures by the table's name): DVHs found there are used
        (they must come from :func:`pacsai.planning.dvh` with its default ``outside="exclude"``), and those
        computed here are added, for the report to reuse.
    max_uncovered_pct, max_uncovered_cc
        Coverage limits beyond which a constraint is unreliable (either one).

    Returns
    -------
    pandas.DataFrame
        As :func:`evaluate_constraints`.
    """
    from pacsai.imaging.dose import NotPlanDoseError, check_plan_dose

    table = site if isinstance(site, ConstraintSet) else load_constraints(site)
    cache = dvhs if dvhs is not None else {}
    try:
        check_plan_dose(dose)
    except NotPlanDoseError as err:
        return _frame([_row(c, reason=str(err)) for c in table.constraints])
    found, problems = _constraint_masks(table, masks, dict(names or {}))
    rows: list[dict[str, Any]] = []
    for c in table.constraints:
        if c.structure in problems:
            state, reason = problems[c.structure]
            rows.append(_row(c, state=state, reason=reason))
            continue
        mask = found[c.structure]
        key = str(mask.name)
        if not bool(np.asarray(mask.values).any()):
            rows.append(_row(c, matched=key, state="empty", reason=_empty_reason(key, mask)))
            continue
        h = _plan_dvh(dose, mask, cache)
        if isinstance(h, dict):
            rows.append(_row(c, matched=key, state="present", **h))
            continue
        rows.append(
            _plan_row(
                c, mask, h, fractions=fractions, prescription_gy=prescription_gy,
                max_uncovered_pct=max_uncovered_pct, max_uncovered_cc=max_uncovered_cc,
            )
        )  # fmt: skip
    return _frame(rows)


def derive_structures(
    masks: Mapping[str, xr.DataArray],
    site: str | Path | ConstraintSet = "thorax",
    *,
    names: Mapping[str, str] | None = None,
) -> dict[str, xr.DataArray]:
    """Masks of the table's derived structures (e.g. ``Lungs-GTV`` = Lung_L ∪ Lung_R − GTV) that are missing.

    A derived structure is built only when it is not already among ``masks`` and every component (``union``
    and ``minus`` parts) is present and non-empty: "Lungs-GTV" with an empty or missing GTV is *not* the
    lungs (an empty model GTV says nothing about where the tumour is). Structures that cannot be formed are
    left out with a :class:`PacsaiWarning` naming the component; :func:`evaluate_plan` reports them as not
    evaluable. ``attrs["derived_from"]`` lists the parts used.

    Returns
    -------
    dict
        Only the newly derived masks, keyed by the table's name (add them to your masks before computing DVHs).
    """
    table = site if isinstance(site, ConstraintSet) else load_constraints(site)
    mapping = dict(names or {})
    available = list(masks)
    out: dict[str, xr.DataArray] = {}
    for canonical, spec in table.structures.items():
        derive = spec.get("derive")
        if not derive:
            continue
        existing, _ = _resolve(table, canonical, available, mapping)
        if existing is not None:
            continue
        problem = _component_problem(table, canonical, masks, mapping)
        if problem:
            warnings.warn(problem[1], PacsaiWarning, stacklevel=2)
            continue
        # every component resolves here (_component_problem said so); the filter states it for the type checker
        union_keys = [
            k for part in derive.get("union", []) if (k := _resolve(table, part, available, mapping)[0]) is not None
        ]
        minus_keys = [
            k for part in derive.get("minus", []) if (k := _resolve(table, part, available, mapping)[0]) is not None
        ]
        if not union_keys:
            continue
        first = masks[union_keys[0]]
        values = np.zeros(first.shape, dtype=bool)
        used = []
        for key, sign in [*((k, "+") for k in union_keys), *((k, "-") for k in minus_keys)]:
            part = masks[key]
            if not same_grid(first, part):
                raise PlanningError(
                    f"cannot derive {canonical!r}: {key!r} is on another grid than {union_keys[0]!r}"
                )
            if sign == "+":
                values |= np.asarray(part.values, dtype=bool)
            else:
                values &= ~np.asarray(part.values, dtype=bool)
            used.append(f"{sign}{key}")
        out[canonical] = like(first, values, name=canonical, derived_from=" ".join(used))
    return out
