"""``grow_below_hu``: lungs grown into the air-density tissue connected to them, on hand-built volumes."""

from __future__ import annotations

import numpy as np
import pytest

from pacsai.errors import ConfigError
from pacsai.learning.postprocess import Rule, grow_below_hu, parse_rules

SOFT, AIR = 40.0, -850.0
SPACING = (2.0, 1.0, 1.0)


def _thorax() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 10×40×60 'thorax': soft tissue, two air-filled lungs (x 5-24 and 36-55) joined by an air 'trachea'
    (rows 2-4, x 24-36), an air pocket in the body not connected to them, air outside the body; the model's
    lungs cover only their lateral halves and a 'heart' sits inside the left lung's air."""
    hu = np.full((10, 40, 60), SOFT)
    hu[:, 5:35, 5:25] = AIR  # right lung (image left)
    hu[:, 5:35, 36:56] = AIR  # left lung
    hu[:, 2:5, 5:56] = AIR  # trachea-like bridge across the top
    hu[4:6, 37:39, 28:32] = AIR  # bowel gas: in the body, not connected
    hu[:, :, 58:] = -1000.0  # outside the body
    body = np.zeros(hu.shape, bool)
    body[:, :, :58] = True
    right = np.zeros(hu.shape, bool)
    right[:, 5:35, 5:12] = True
    left = np.zeros(hu.shape, bool)
    left[:, 5:35, 49:56] = True
    heart = np.zeros(hu.shape, bool)
    heart[:, 15:20, 40:45] = True  # inside the left lung's air: the lungs must not take it
    return hu, {"BODY": body, "Lung_R": right, "Lung_L": left, "Heart": heart}


def _rules(**lungs: float | None) -> dict[str, Rule]:
    cfg = {"BODY": {}, "Heart": {}, "Lung_L": {}, "Lung_R": {}}
    for name, value in lungs.items():
        cfg[name] = {"grow_below_hu": value}
    return parse_rules(cfg, list(cfg))


def test_lungs_grow_into_their_connected_air_each_voxel_to_the_nearest_lung():
    hu, masks = _thorax()
    out = grow_below_hu(masks, hu, _rules(Lung_L=-500.0, Lung_R=-500.0), spacing_zyx=SPACING)
    air_right = np.zeros(hu.shape, bool)
    air_right[:, 5:35, 5:25] = True
    air_left = np.zeros(hu.shape, bool)
    air_left[:, 5:35, 36:56] = True
    bridge = np.zeros(hu.shape, bool)
    bridge[:, 2:5, 5:56] = True
    assert np.array_equal(out["Lung_R"] & ~bridge, air_right & ~bridge)  # the whole lung, nothing else
    assert np.array_equal(out["Lung_L"] & ~bridge, air_left & ~masks["Heart"] & ~bridge)  # the heart stays out
    assert not (out["Lung_L"] & out["Lung_R"]).any()
    assert np.array_equal((out["Lung_L"] | out["Lung_R"]) & bridge, bridge)  # the bridge is split, all of it
    # the bridge's voxels go to the lung of the nearest seed voxel (seeds at x ≤ 11 and x ≥ 49; x = 30 is a tie)
    assert out["Lung_R"][:, 2:5, 5:30].all() and out["Lung_L"][:, 2:5, 31:56].all()
    assert not (out["Lung_L"] | out["Lung_R"])[4:6, 37:39, 28:32].any()  # unconnected gas
    assert not (out["Lung_L"] | out["Lung_R"])[:, :, 58:].any()  # outside the BODY
    for name in ("BODY", "Heart"):
        assert np.array_equal(out[name], masks[name])
    assert np.array_equal(masks["Lung_R"][:, 5:35, 5:12], np.ones((10, 30, 7), bool))  # inputs untouched


def test_without_the_rule_or_without_seeds_nothing_changes():
    hu, masks = _thorax()
    out = grow_below_hu(masks, hu, _rules(), spacing_zyx=SPACING)
    assert all(np.array_equal(out[k], masks[k]) for k in masks)
    empty = {**masks, "Lung_L": np.zeros(hu.shape, bool), "Lung_R": np.zeros(hu.shape, bool)}
    out = grow_below_hu(empty, hu, _rules(Lung_L=-500.0, Lung_R=-500.0), spacing_zyx=SPACING)
    assert not out["Lung_L"].any() and not out["Lung_R"].any()  # no lung found: none invented


def test_a_single_growing_structure_takes_all_its_connected_air_and_the_threshold_counts():
    hu, masks = _thorax()
    out = grow_below_hu(masks, hu, _rules(Lung_R=-500.0), spacing_zyx=SPACING)
    assert out["Lung_R"][:, 5:35, 36:56].sum() > 0  # through the bridge into the other air: nobody to share with
    assert np.array_equal(out["Lung_L"], masks["Lung_L"])
    out = grow_below_hu(masks, hu, _rules(Lung_L=-900.0, Lung_R=-900.0), spacing_zyx=SPACING)  # the air is -850
    assert np.array_equal(out["Lung_R"], masks["Lung_R"]) and np.array_equal(out["Lung_L"], masks["Lung_L"])


def test_rule_parsing_and_recording():
    rule = Rule.from_dict({"largest_component": True, "grow_below_hu": -500}, structure="Lung_L")
    assert rule.grow_below_hu == -500.0
    assert rule.to_dict()["grow_below_hu"] == -500.0
    assert "grow_below_hu" not in Rule().to_dict()  # models logged before the rule read back the same
    assert "below -500 HU" in rule.describe()
    for bad in (True, "-500"):
        with pytest.raises(ConfigError, match="grow_below_hu for 'Lung_L' must be a number"):
            Rule.from_dict({"grow_below_hu": bad}, structure="Lung_L")
