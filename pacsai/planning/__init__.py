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
    load_constraints,
    normalise_name,
)
from pacsai.planning.dvh import DVH, PlanQuality, dvh, homogeneity_index, plan_quality
from pacsai.planning.fractionation import bed, eqd2, eqd2_dvh, eqd2_total
from pacsai.planning.response import Response, assess_response, recist_category
from pacsai.planning.structures import (
    StructureStats,
    TargetRelation,
    axial_diameters,
    centroid,
    components,
    ctv_ptv,
    expand,
    longest_axial_diameter,
    longest_diameter,
    min_surface_distance,
    overlap,
    parse_margin,
    prv,
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
    "components",
    "ctv_ptv",
    "derive_structures",
    "dvh",
    "eqd2",
    "eqd2_dvh",
    "eqd2_total",
    "evaluate_constraints",
    "expand",
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
    "structure_stats",
    "target_relations",
    "touches_edge",
    "van_herk_margin",
    "volume_cc",
]
