"""Treatment-planning analytics (pure numpy/scipy/xarray; never imports torch).

Structures (volumes, diameters, margins GTV→CTV→PTV, PRVs, distances, overlaps), DVHs and plan quality indices,
dose constraints as data, BED/EQD2 and response against a prior study. Definitions: DESIGN.md "Clinical
definitions"; each function's docstring cites the one it implements.
"""

from __future__ import annotations

from pacsai.planning.constraints import (
    Constraint,
    ConstraintSet,
    available_sites,
    derive_structures,
    evaluate_constraints,
    evaluate_plan,
    load_constraints,
    normalise_name,
)
from pacsai.planning.dvh import DVH, PlanQuality, dose_coverage, dvh, homogeneity_index, plan_quality
from pacsai.planning.fractionation import bed, eqd2, eqd2_dvh, eqd2_total
from pacsai.planning.response import Response, assess_response, recist_category
from pacsai.planning.structures import (
    StructureStats,
    TargetRelation,
    axial_diameters,
    centroid,
    component_volumes_cc,
    components,
    count_components,
    ctv_ptv,
    expand,
    find_key,
    longest_axial_diameter,
    longest_diameter,
    min_surface_distance,
    overlap,
    parse_margin,
    prv,
    structure_state,
    structure_stats,
    target_relations,
    touches_edge,
    van_herk_margin,
    volume_cc,
)

__all__ = [
    "DVH",
    "Constraint",
    "ConstraintSet",
    "PlanQuality",
    "Response",
    "StructureStats",
    "TargetRelation",
    "assess_response",
    "available_sites",
    "axial_diameters",
    "bed",
    "centroid",
    "component_volumes_cc",
    "components",
    "count_components",
    "ctv_ptv",
    "derive_structures",
    "dose_coverage",
    "dvh",
    "eqd2",
    "eqd2_dvh",
    "eqd2_total",
    "evaluate_constraints",
    "evaluate_plan",
    "expand",
    "find_key",
    "homogeneity_index",
    "load_constraints",
    "longest_axial_diameter",
    "longest_diameter",
    "min_surface_distance",
    "normalise_name",
    "overlap",
    "parse_margin",
    "plan_quality",
    "prv",
    "recist_category",
    "structure_state",
    "structure_stats",
    "target_relations",
    "touches_edge",
    "van_herk_margin",
    "volume_cc",
]
