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
aliases. A constraint whose structure is missing yields a row with status ``"not evaluated"`` and the reason;
nothing is silently dropped. The limits are for the fractionation stated in each file (conventional); convert a
hypofractionated DVH with :func:`pacsai.planning.fractionation.eqd2_dvh` first.
"""

from __future__ import annotations

import logging
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
]

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
    """Structure name for matching: lower case, without spaces, ``_``, ``-``, ``+``, ``.`` (``"Lung_L"`` → ``"lungl"``)."""
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
        resource = resources.files("pacsai.planning").joinpath("constraints", f"{site}.yaml")
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


def evaluate_constraints(
    dvhs: Mapping[str, DVH],
    site: str | Path | ConstraintSet = "thorax",
    *,
    names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Evaluate a site's constraints against DVHs: one row per constraint, pass/fail with value and limit.

    Parameters
    ----------
    dvhs
        DVHs by structure name (any naming; matched through the table's aliases).
    site
        A shipped site name, a YAML path, or a loaded :class:`ConstraintSet`.
    names
        Explicit mapping from the table's structure names to keys of ``dvhs`` (wins over aliases), e.g.
        ``{"Lung_Ipsi": "Lt Lung"}``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS`: ``structure`` (the table's name), ``matched`` (the DVH used), ``metric``,
        ``value``, ``unit``, ``comparator``, ``limit``, ``goal``, ``passed`` (nullable boolean), ``goal_met``,
        ``status`` (``"pass"``, ``"fail"`` or ``"not evaluated"``), ``priority``, ``source`` and ``reason``
        (why a row was not evaluated).
    """
    table = site if isinstance(site, ConstraintSet) else load_constraints(site)
    mapping = dict(names or {})
    available = list(dvhs)
    rows: list[dict[str, Any]] = []
    for c in table.constraints:
        key, reason = _resolve(table, c.structure, available, mapping)
        row: dict[str, Any] = {
            "structure": c.structure,
            "matched": key,
            "metric": c.metric,
            "value": np.nan,
            "unit": c.unit,
            "comparator": c.comparator,
            "limit": c.limit,
            "goal": np.nan if c.goal is None else c.goal,
            "passed": pd.NA,
            "goal_met": pd.NA,
            "status": "not evaluated",
            "priority": c.priority,
            "source": c.source,
            "reason": reason,
        }
        if key is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PacsaiWarning)
                value = c.measure(dvhs[key])
            passed, goal_met = c.check(value)
            row.update(
                value=value,
                passed=passed,
                goal_met=pd.NA if goal_met is None else goal_met,
                status="pass" if passed else "fail",
                reason="; ".join(str(w.message) for w in caught),
            )
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["passed"] = frame["passed"].astype("boolean")
    frame["goal_met"] = frame["goal_met"].astype("boolean")
    return frame


def derive_structures(
    masks: Mapping[str, xr.DataArray],
    site: str | Path | ConstraintSet = "thorax",
    *,
    names: Mapping[str, str] | None = None,
) -> dict[str, xr.DataArray]:
    """Masks of the table's derived structures (e.g. ``Lungs-GTV`` = Lung_L ∪ Lung_R − GTV) that are missing.

    A derived structure is built when it is not already among ``masks`` and every ``union`` part is; an absent
    ``minus`` part (e.g. no GTV) is skipped with a :class:`PacsaiWarning` and recorded in
    ``attrs["derived_from"]``.

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
        union_keys = [_resolve(table, part, available, mapping)[0] for part in derive.get("union", [])]
        if not union_keys or any(k is None for k in union_keys):
            logger.info("cannot derive %s: missing one of %s", canonical, derive.get("union"))
            continue
        first = masks[union_keys[0]]  # type: ignore[index]
        values = np.zeros(first.shape, dtype=bool)
        used = []
        for key in union_keys:
            part = masks[key]  # type: ignore[index]
            if not same_grid(first, part):
                raise PlanningError(
                    f"cannot derive {canonical!r}: {key!r} is on another grid than {union_keys[0]!r}"
                )
            values |= np.asarray(part.values, dtype=bool)
            used.append(f"+{key}")
        for part_name in derive.get("minus", []):
            key, _ = _resolve(table, part_name, available, mapping)
            if key is None:
                warnings.warn(
                    f"{canonical!r}: no {part_name!r} to subtract; derived without it",
                    PacsaiWarning,
                    stacklevel=2,
                )
                continue
            if not same_grid(first, masks[key]):
                raise PlanningError(
                    f"cannot derive {canonical!r}: {key!r} is on another grid than {union_keys[0]!r}"
                )
            values &= ~np.asarray(masks[key].values, dtype=bool)
            used.append(f"-{key}")
        out[canonical] = like(first, values, name=canonical, derived_from=" ".join(used))
    return out
