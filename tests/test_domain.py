"""The QA gate's vocabulary (pacsai.qa) and the training-domain check (pacsai.domain), on hand-built phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from pacsai.domain import check_input, check_volumes, image_stats, structure_volumes, training_domain
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.qa import Reason, gate_status


def _phantom(*, lung: bool = True, spacing=(2.0, 2.0, 4.0), shape=(20, 100, 100)) -> object:
    """Air around a soft-tissue box (0 HU) of 80 × 60 voxels; optionally two 'lungs' of −800 HU inside it."""
    nz, ny, nx = shape
    hu = np.full(shape, -1000.0, np.float32)
    hu[:, 20:80, 10:90] = 0.0
    if lung:
        hu[:, 30:70, 20:45] = -800.0
        hu[:, 30:70, 55:80] = -800.0
    return make_volume(hu, affine_from((0, 0, 0), np.eye(3), spacing))


def test_reason_levels_and_gate_status() -> None:
    ok = Reason("VOLUME_OUT_OF_RANGE", "review", "x")
    assert gate_status([]) == "PASS"
    assert gate_status([Reason("A_NOTE", "note", "n")]) == "PASS"
    assert gate_status([ok, Reason("A_NOTE", "note", "n")]) == "REVIEW"
    assert gate_status([ok, {"level": "error"}]) == "FAIL"
    assert Reason.from_dict(ok.to_dict()) == ok
    with pytest.raises(ValueError, match="level"):
        Reason("X", "warning", "x")
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        Reason("lower", "note", "x")


def test_image_stats_measures_the_phantom_exactly() -> None:
    s = image_stats(_phantom())
    assert s["spacing_mm"] == [2.0, 2.0, 4.0]
    assert s["fov_mm"] == [200.0, 200.0, 80.0]
    assert s["body_extent_mm"] == [160.0, 120.0, 80.0]  # 80 × 60 voxels of 2 mm, 20 slices of 4 mm
    # lungs: 2 × 40 × 25 of the body's 60 × 80 voxels per slice, filled into the body outline
    assert s["tissue_fractions"]["lung"] == pytest.approx(2000 / 4800, abs=1e-4)
    assert s["tissue_fractions"]["soft"] == pytest.approx(2800 / 4800, abs=1e-4)
    assert s["thoracic_share"] == 1.0
    assert image_stats(_phantom(lung=False))["thoracic_share"] == 0.0


def test_same_images_pass_and_unlike_ones_are_named() -> None:
    train = [image_stats(_phantom()), image_stats(_phantom(spacing=(2.2, 2.2, 4.0)))]
    domain = training_domain(train, [{"Heart": 100.0}, {"Heart": 140.0}])
    assert domain["n_cases"] == 2 and domain["modality"] == "CT"
    assert domain["structure_volumes_cc"]["Heart"] == {"min": 100.0, "max": 140.0, "median": 120.0, "n": 2}
    assert check_input(domain, image_stats(_phantom(spacing=(2.1, 2.1, 4.0)))) == []

    mr = check_input(domain, image_stats(_phantom(), modality="MR"))
    assert [(r.code, r.level) for r in mr] == [("DOMAIN_MODALITY", "error")]

    abdomen = {r.code: r.level for r in check_input(domain, image_stats(_phantom(lung=False)))}
    assert abdomen["DOMAIN_BODY_REGION"] == "error"
    assert abdomen["DOMAIN_TISSUE"] == "review"  # no lung where training had 42 %

    coarse = {r.code for r in check_input(domain, image_stats(_phantom(spacing=(2.0, 2.0, 8.0))))}
    assert "DOMAIN_SPACING" in coarse

    assert [r.code for r in check_input({}, image_stats(_phantom()))] == ["DOMAIN_UNKNOWN"]


def test_check_volumes_uses_the_training_range_with_tolerance() -> None:
    domain = {"structure_volumes_cc": {"Heart": {"min": 100.0, "max": 140.0}, "GTV": {"min": 5.0, "max": 10.0}}}
    assert check_volumes(domain, {"Heart": 120.0, "GTV": 25.0, "Other": 1e6}) == []
    assert check_volumes(domain, {"Heart": 0.0}) == []  # emptiness is the gate's own error, not a range question
    big = check_volumes(domain, {"Heart": 1046.0, "GTV": 31.0})
    assert [(r.code, r.structure) for r in big] == [("VOLUME_OUT_OF_RANGE", "Heart"), ("VOLUME_OUT_OF_RANGE", "GTV")]
    assert big[0].values["volume_cc"] == 1046.0


def test_structure_volumes_in_cc() -> None:
    vol = _phantom()
    mask = make_volume(np.zeros(vol.shape, bool), vol.attrs["affine"])
    mask.values[0, 0, :10] = True  # 10 voxels of 2 × 2 × 4 mm = 0.16 cm³
    assert structure_volumes({"A": mask}) == {"A": 0.16}
