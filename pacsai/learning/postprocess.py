"""Post-processing rules per structure, recorded with a model and applied by :func:`pacsai.learning.infer.segment`.

A network's thresholded probability map can hold specks far from the organ (a second "heart" in the liver) or
holes (an air pocket inside the BODY). Organs that are one piece in the body should come out as one piece, so each
structure carries rules, applied in this order:

``fill_holes``
    Fill enclosed holes in every axial slice (2D, as an external contour is drawn: air in the trachea or the
    bowel is inside the body).
``largest_component``
    Keep only the largest 26-connected component (organs that are one piece: lungs, heart, cord, oesophagus).
``min_component_cc``
    Drop components smaller than this many cc (structures that may be several pieces, e.g. a GTV with nodes).
``grow_below_hu``
    After the rules above, on the input's own grid: add every voxel below this many HU inside the BODY that is
    connected (6-connected, through such voxels) to the structure, and not in another structure (heart, GTV, ...).
    For the air-filled lungs: a lung is the air-density tissue connected to it, wherever the network's
    probability fell short (real parenchyma looks unlike the training patients'). Structures with the same value
    grow together, each added voxel going to the nearest of them (left and right lung).

The rules are plain JSON (``{"BODY": {"fill_holes": true, "largest_component": true}, "GTV": {...}}``) stored
in the model's metadata (``metadata["pacsai"]["postprocess"]``); numpy/scipy only (no torch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pacsai.errors import ConfigError

logger = logging.getLogger(__name__)

_KNOWN = ("fill_holes", "largest_component", "min_component_cc", "grow_below_hu")
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: diagonal neighbours belong to the same piece
_FACES = ndimage.generate_binary_structure(3, 1)  # 6-connectivity: growth does not leak through a diagonal gap


@dataclass(frozen=True)
class Rule:
    """What to do with one structure's mask (see the module docstring)."""

    fill_holes: bool = False
    largest_component: bool = False
    min_component_cc: float = 0.0
    grow_below_hu: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, structure: str = "") -> Rule:
        unknown = sorted(set(d) - set(_KNOWN))
        if unknown:
            raise ConfigError(
                f"postprocess rule for {structure!r} has unknown keys {unknown}; known: {', '.join(_KNOWN)}"
            )
        cc = float(d.get("min_component_cc", 0.0))
        if cc < 0:
            raise ConfigError(f"postprocess min_component_cc for {structure!r} must be ≥ 0, not {cc}")
        grow = d.get("grow_below_hu")
        if grow is not None and (isinstance(grow, bool) or not isinstance(grow, (int, float))):
            raise ConfigError(f"postprocess grow_below_hu for {structure!r} must be a number of HU, not {grow!r}")
        return cls(
            fill_holes=bool(d.get("fill_holes", False)),
            largest_component=bool(d.get("largest_component", False)),
            min_component_cc=cc,
            grow_below_hu=None if grow is None else float(grow),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fill_holes": self.fill_holes,
            "largest_component": self.largest_component,
            "min_component_cc": self.min_component_cc,
        }
        if self.grow_below_hu is not None:  # absent, not null: rules of models logged before it read the same
            out["grow_below_hu"] = self.grow_below_hu
        return out

    def describe(self) -> str:
        """One line for the model card."""
        parts = []
        if self.fill_holes:
            parts.append("holes filled slice by slice")
        if self.largest_component:
            parts.append("largest connected component kept")
        if self.min_component_cc > 0:
            parts.append(f"components below {self.min_component_cc:g} cc dropped")
        if self.grow_below_hu is not None:
            parts.append(f"grown into the connected tissue below {self.grow_below_hu:g} HU inside the BODY")
        return "; ".join(parts) or "none"


def parse_rules(cfg: Mapping[str, Any] | None, structures: tuple[str, ...] | list[str]) -> dict[str, Rule]:
    """The experiment's ``postprocess:`` mapping → a rule per structure (``Rule()`` where none is given).

    Raises
    ------
    ConfigError
        A rule names a structure the model does not output, or has unknown keys.
    """
    cfg = dict(cfg or {})
    stray = sorted(set(cfg) - set(structures))
    if stray:
        raise ConfigError(f"postprocess names {stray}, which are not among the structures {list(structures)}")
    return {s: Rule.from_dict(cfg.get(s) or {}, structure=s) for s in structures}


def rules_to_dict(rules: Mapping[str, Rule]) -> dict[str, dict[str, Any]]:
    return {name: rule.to_dict() for name, rule in rules.items()}


def fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in every axial slice of a (z, y, x) mask."""
    out = np.zeros_like(mask, dtype=bool)
    for k in np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]:
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components: (label image, voxel count of each label 1 … n)."""
    labels, n = ndimage.label(mask, structure=_FULL)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, sizes


def apply_rule(mask: np.ndarray, rule: Rule, *, voxel_cc: float) -> np.ndarray:
    """Apply ``rule`` to a boolean (z, y, x) mask whose voxels hold ``voxel_cc`` cc each.

    Works on the mask's bounding box only, so a small organ on a 512 × 512 CT costs little.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or not (rule.fill_holes or rule.largest_component or rule.min_component_cc > 0):
        return mask
    box = ndimage.find_objects(mask.astype(np.int8))[0]
    # one voxel of room so that holes touching the box edge are not mistaken for open ones
    box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, mask.shape, strict=True))
    sub = mask[box]
    if rule.fill_holes:
        sub = fill_holes_axial(sub)
    if rule.largest_component or rule.min_component_cc > 0:
        labels, sizes = components(sub)
        keep = np.ones(len(sizes), dtype=bool)
        if rule.min_component_cc > 0:
            keep &= sizes * voxel_cc >= rule.min_component_cc
        if rule.largest_component and len(sizes):
            largest = np.zeros(len(sizes), dtype=bool)
            largest[int(np.argmax(sizes))] = True
            keep &= largest
        sub = np.concatenate([[False], keep])[labels]
    out = np.zeros_like(mask)
    out[box] = sub
    return out


def apply_rules(
    masks: Mapping[str, np.ndarray], rules: Mapping[str, Rule], *, voxel_cc: float
) -> dict[str, np.ndarray]:
    """:func:`apply_rule` for every mask (structures without a rule pass through)."""
    return {name: apply_rule(m, rules.get(name, Rule()), voxel_cc=voxel_cc) for name, m in masks.items()}


def grow_below_hu(
    masks: Mapping[str, np.ndarray],
    hu: np.ndarray,
    rules: Mapping[str, Rule],
    *,
    spacing_zyx: tuple[float, float, float],
    body: str = "BODY",
) -> dict[str, np.ndarray]:
    """The ``grow_below_hu`` rules (module docstring) applied to ``masks`` on the grid of ``hu`` (z, y, x).

    Structures that share a threshold grow as one group: the candidate voxels are those below the threshold,
    inside ``masks[body]`` where the model has a BODY, and in no structure outside the group (BODY aside); the
    candidates 6-connected to the group's masks are added, each to the group member nearest to it (a distance
    transform with the members' indices, ``spacing_zyx`` mm). Returns a new mapping; masks without the rule are
    passed through unchanged.
    """
    out = {name: np.asarray(m, dtype=bool) for name, m in masks.items()}
    groups: dict[float, list[str]] = {}
    for name in out:
        rule = rules.get(name)
        if rule is not None and rule.grow_below_hu is not None:
            groups.setdefault(rule.grow_below_hu, []).append(name)
    for threshold, members in groups.items():
        seeds = np.zeros(hu.shape, dtype=np.int16)  # 0: no member; k: member k (1-based)
        for k, name in enumerate(members, start=1):
            seeds[out[name] & (seeds == 0)] = k
        if not seeds.any():
            continue
        allowed = hu < threshold
        if body in out and body not in members and out[body].any():
            allowed &= out[body]
        for name, m in out.items():
            if name not in members and name != body:
                allowed &= ~m
        _grow_group(out, members, seeds, allowed, spacing_zyx)
    return out


def _grow_group(
    out: dict[str, np.ndarray], members: list[str], seeds: np.ndarray, allowed: np.ndarray,
    spacing_zyx: tuple[float, float, float],
) -> None:
    labels, _ = ndimage.label(allowed | (seeds > 0), structure=_FACES)
    touching = np.unique(labels[seeds > 0])
    grown = np.isin(labels, touching[touching > 0]) & (seeds == 0)
    if not grown.any():
        return
    if len(members) == 1:
        out[members[0]] = out[members[0]] | grown
        return
    # Each grown voxel goes to the member of its nearest seed voxel: a distance transform with indices on the
    # box of the seeds and the grown voxels (every seed is in it, so the nearest one is).
    box = ndimage.find_objects((grown | (seeds > 0)).astype(np.int8))[0]
    sub = seeds[box]
    indices = ndimage.distance_transform_edt(sub == 0, sampling=spacing_zyx, return_distances=False,
                                             return_indices=True)
    nearest = np.zeros(seeds.shape, dtype=seeds.dtype)
    nearest[box] = sub[tuple(indices)]
    for k, name in enumerate(members, start=1):
        out[name] = out[name] | (grown & (nearest == k))
