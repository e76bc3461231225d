"""pacsai.planning.constraints: YAML site tables → pass/fail rows, aliases, derived structures, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from pacsai.errors import ConfigError, PacsaiWarning, PlanningError
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.planning.constraints import (
    COLUMNS,
    available_sites,
    derive_structures,
    evaluate_constraints,
    evaluate_plan,
    load_constraints,
    normalise_name,
)
from pacsai.planning.dvh import DVH


def uniform(name, gy, cc=100.0):
    return DVH.from_samples([gy], cc, name=name)


def split(name, hot_gy, hot_pct, cold_gy=0.0, cc=100.0):
    """hot_pct % of the volume at hot_gy, the rest at cold_gy."""
    return DVH.from_samples([cold_gy, hot_gy], [cc * (100 - hot_pct) / 100, cc * hot_pct / 100], name=name)


def test_shipped_sites_load_and_are_consistent():
    assert available_sites() == ["breast", "head_neck", "thorax"]
    for site in available_sites():
        table = load_constraints(site)
        assert table.site == site and table.constraints
        for c in table.constraints:
            assert c.source and c.priority in ("hard", "soft")
            assert c.structure in table.aliases
    thorax = load_constraints("thorax")
    assert {(c.structure, c.metric) for c in thorax.constraints} == {
        ("Lungs-GTV", "V20Gy"),
        ("Lungs-GTV", "Dmean"),
        ("Heart", "V25Gy"),
        ("Heart", "Dmean"),
        ("SpinalCord", "D0.03cc"),
        ("Esophagus", "Dmean"),
    }


def test_thorax_pass_fail_with_values_limits_and_exact_boundaries():
    dvhs = {
        "LUNGS_GTV": split(
            "lungs", 25.0, 35.0, cold_gy=5.0
        ),  # V20 = 35 % exactly: ≤ 35 passes, goal 30 missed
        "heart": split("heart", 30.0, 10.0),  # V25 = 10 % exactly: "< 10" fails
        "Spinal Cord": uniform("cord", 50.0),  # D0.03cc = 50 exactly: "≤ 50" passes
        "Oesophagus": uniform("eso", 34.0),  # mean 34 exactly: "< 34" fails
    }
    table = evaluate_constraints(dvhs, "thorax")
    assert list(table.columns) == COLUMNS
    assert str(table["passed"].dtype) == "boolean"
    rows = {(r.structure, r.metric): r for r in table.itertuples()}
    lung_v20 = rows[("Lungs-GTV", "V20Gy")]
    assert (lung_v20.matched, lung_v20.value, lung_v20.limit, lung_v20.goal) == (
        "LUNGS_GTV",
        35.0,
        35.0,
        30.0,
    )
    assert (lung_v20.status, bool(lung_v20.passed), bool(lung_v20.goal_met)) == ("pass", True, False)
    assert rows[("Lungs-GTV", "Dmean")].value == pytest.approx(0.65 * 5 + 0.35 * 25)
    assert (rows[("Heart", "V25Gy")].value, rows[("Heart", "V25Gy")].status) == (pytest.approx(10.0), "fail")
    assert rows[("Heart", "Dmean")].status == "pass"
    assert (rows[("SpinalCord", "D0.03cc")].value, rows[("SpinalCord", "D0.03cc")].status) == (50.0, "pass")
    assert (rows[("Esophagus", "Dmean")].matched, rows[("Esophagus", "Dmean")].status) == (
        "Oesophagus",
        "fail",
    )
    assert rows[("SpinalCord", "D0.03cc")].source.startswith("QUANTEC spinal cord")


def test_missing_structures_are_rows_with_a_reason_never_dropped():
    table = evaluate_constraints({"Heart": uniform("h", 1.0)}, "thorax")
    assert len(table) == len(load_constraints("thorax").constraints)
    missing = table[table["status"] == "not evaluable"]
    assert set(missing["structure"]) == {"Lungs-GTV", "SpinalCord", "Esophagus"}
    assert (~missing["passed"]).all() and missing["value"].isna().all()  # not evaluable counts as not passed
    assert set(missing["state"]) == {"missing"}
    assert (
        missing.loc[missing["structure"] == "SpinalCord", "reason"]
        .iloc[0]
        .startswith("no structure named 'SpinalCord'")
    )
    lung_reason = missing.loc[missing["structure"] == "Lungs-GTV", "reason"].iloc[0]
    assert "derive_structures" in lung_reason and "Lung_Total-GTV" in lung_reason


def test_names_mapping_and_ambiguity():
    # breast: the ipsilateral lung has to be named explicitly.
    dvhs = {"Lt Lung": split("l", 25.0, 12.0), "Heart": uniform("h", 2.0)}
    table = evaluate_constraints(dvhs, "breast", names={"Lung_Ipsi": "Lt Lung"})
    lung = table[table["structure"] == "Lung_Ipsi"].iloc[0]
    assert (lung["matched"], lung["status"], bool(lung["goal_met"])) == ("Lt Lung", "pass", True)
    bad = evaluate_constraints(dvhs, "breast", names={"Lung_Ipsi": "Right Lung"})
    assert "not among the structures" in bad[bad["structure"] == "Lung_Ipsi"].iloc[0]["reason"]
    with pytest.warns(PacsaiWarning, match="matches several"):
        evaluate_constraints({"Heart": uniform("a", 1.0), "HEART": uniform("b", 1.0)}, "breast")


def test_derive_lungs_minus_gtv_from_masks():
    affine = affine_from((0, 0, 0), np.eye(3), (1.0, 1.0, 1.0))
    left, right, gtv = (np.zeros((4, 4, 8), bool) for _ in range(3))
    left[:, :, :4] = True
    right[:, :, 4:] = True
    gtv[1, 1, 2:6] = True
    masks = {
        n: make_volume(a, affine, name=n) for n, a in (("Lung_L", left), ("Lung R", right), ("GTV", gtv))
    }
    derived = derive_structures(masks, "thorax")
    assert list(derived) == ["Lungs-GTV"]
    assert derived["Lungs-GTV"].values.sum() == 128 - 4
    assert derived["Lungs-GTV"].attrs["derived_from"] == "+Lung_L +Lung R -GTV"
    # Lungs-GTV without a GTV is not "the lungs": nothing is derived, and the warning names the component.
    with pytest.warns(
        PacsaiWarning, match="Lungs-GTV = Lung_L ∪ Lung_R − GTV cannot be formed: no structure named 'GTV'"
    ):
        assert derive_structures({k: v for k, v in masks.items() if k != "GTV"}, "thorax") == {}
    empty_gtv = {
        **masks,
        "GTV": make_volume(np.zeros_like(gtv), affine, name="GTV", attrs={"source_model": "m"}),
    }
    with pytest.warns(PacsaiWarning, match=r"cannot be formed: GTV is empty \(the model found nothing\)"):
        assert derive_structures(empty_gtv, "thorax") == {}
    with pytest.warns(PacsaiWarning, match="no structure named 'Lung_R'"):
        assert derive_structures({"Lung_L": masks["Lung_L"]}, "thorax") == {}
    assert derive_structures({**masks, "Lungs-GTV": masks["GTV"]}, "thorax") == {}
    other = make_volume(right, affine_from((0, 0, 0), np.eye(3), (2.0, 1.0, 1.0)), name="Lung_R")
    with pytest.raises(PlanningError, match="another grid"):
        derive_structures({"Lung_L": masks["Lung_L"], "Lung_R": other, "GTV": masks["GTV"]}, "thorax")


def test_own_yaml_table_and_metric_grammar(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "site: mine\nconstraints:\n"
        "  - {structure: PTV, metric: D95%, comparator: '>=', limit: 57, unit: Gy, source: protocol}\n"
        "  - {structure: PTV, metric: V60Gy_cc, comparator: '<=', limit: 10, unit: cc, source: protocol}\n"
        "  - {structure: PTV, metric: Dmin, comparator: '>', limit: 50, unit: Gy, priority: soft, source: p}\n",
        encoding="utf-8",
    )
    ramp = DVH.from_samples(np.arange(51.0, 61.0), 1.0, name="PTV")  # 10 cc: 51 ... 60 Gy
    table = evaluate_constraints({"ptv": ramp}, path)
    assert table["value"].tolist() == pytest.approx([51.0, 1.0, 51.0])  # D95 of 10 voxels = the 10th hottest
    assert table["status"].tolist() == ["fail", "pass", "pass"]
    assert table["priority"].tolist() == ["hard", "hard", "soft"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{structure: X, metric: V20, comparator: '<', limit: 1, unit: '%'}", "unknown metric"),
        ("{structure: X, metric: V20Gy, comparator: '=<', limit: 1, unit: '%'}", "comparator"),
        ("{structure: X, metric: V20Gy, comparator: '<', limit: 1, unit: Gy}", "does not match"),
        ("{structure: X, metric: Dmean, comparator: '<', unit: Gy}", "limit"),
        ("{structure: X, metric: Dmean, comparator: '<', limit: 1, unit: Gy, priority: maybe}", "priority"),
    ],
)
def test_invalid_tables_name_the_file_and_entry(tmp_path, row, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"constraints:\n  - {row}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        load_constraints(path)
    assert "bad.yaml" in str(info.value) and "#1" in str(info.value)


def test_unknown_site_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="shipped sites: breast, head_neck, thorax"):
        load_constraints("pelvis")
    broken = tmp_path / "broken.yaml"
    broken.write_text("constraints: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_constraints(broken)


def test_normalise_name():
    assert normalise_name("Lung_L") == normalise_name("lung-l") == normalise_name("LUNG L") == "lungl"
    assert normalise_name("Lungs-GTV") == "lungsgtv"
    assert isinstance(evaluate_constraints({}, "head_neck"), pd.DataFrame)


# ------------------------------------------------------------------------------------------ evaluate_plan
def volume(values, *, spacing=5.0, name="s", **attrs):
    affine = affine_from((0, 0, 0), np.eye(3), (spacing, spacing, spacing))
    attrs.setdefault("frame_of_reference_uid", "1.2.3")
    return make_volume(np.asarray(values), affine, name=name, attrs=attrs)


def plan_dose(values, summation="PLAN", kind="PHYSICAL"):
    return volume(
        np.asarray(values, dtype=float),
        name="dose",
        units="Gy",
        dose_units="GY",
        dose_summation_type=summation,
        dose_type=kind,
        sop_instance_uid="1.2.826.0.1.99",
    )


def mask(shape, *slices, name, **attrs):
    a = np.zeros(shape, bool)
    for sl in slices:
        a[sl] = True
    return volume(a, name=name, **attrs)


def rows_by_key(table):
    return {(r["structure"], r["metric"]): r for r in table.to_dict(orient="records")}


def test_empty_and_missing_structures_are_not_evaluable_never_pass():
    shape = (6, 6, 6)
    dose = plan_dose(np.full(shape, 10.0))
    masks = {
        "Heart": mask(shape, np.s_[1:3, 1:3, 1:3], name="Heart"),
        "SpinalCord": mask(
            shape, name="SpinalCord", source_model="thorax-oars v3"
        ),  # the model found nothing
        "Lung_L": mask(shape, np.s_[:, :, :3], name="Lung_L"),
        "Lung_R": mask(shape, np.s_[:, :, 3:], name="Lung_R"),
        "GTV": mask(shape, name="GTV", source_model="thorax-oars v3"),  # empty: Lungs-GTV is not "Lungs"
    }  # no oesophagus at all
    table = evaluate_plan(dose, masks, "thorax", fractions=30, prescription_gy=60.0)
    assert list(table.columns) == COLUMNS
    rows = rows_by_key(table)
    cord = rows[("SpinalCord", "D0.03cc")]
    assert (cord["status"], cord["state"], cord["reason"]) == (
        "not evaluable",
        "empty",
        "SpinalCord is empty (the model found nothing)",
    )
    assert cord["passed"] is not pd.NA and not cord["passed"] and np.isnan(cord["value"])
    eso = rows[("Esophagus", "Dmean")]
    assert (eso["status"], eso["state"]) == ("not evaluable", "missing")
    assert eso["reason"].startswith("no structure named 'Esophagus'")
    for metric in ("V20Gy", "Dmean"):
        lung = rows[("Lungs-GTV", metric)]
        assert (lung["status"], lung["state"]) == ("not evaluable", "empty")
        assert lung["reason"] == (
            "Lungs-GTV = Lung_L ∪ Lung_R − GTV cannot be formed: GTV is empty (the model found nothing)"
        )
    heart = rows[("Heart", "Dmean")]
    assert (heart["status"], heart["state"], heart["uncovered_cc"]) == ("pass", "present", 0.0)
    assert heart["value"] == pytest.approx(10.0, abs=1e-12)
    assert heart["conversion"] == "none (physical dose; 30 × 2 Gy is within 1.8–2.2 Gy per fraction)"
    assert int(table["passed"].sum()) == 2  # only the two heart rows are known to be met
    # A reference structure set with an empty contour says so without blaming a model.
    masks["SpinalCord"] = mask(shape, name="SpinalCord")
    again = rows_by_key(evaluate_plan(dose, masks, "thorax", fractions=30, prescription_gy=60.0))
    assert (
        again[("SpinalCord", "D0.03cc")]["reason"]
        == "SpinalCord is empty (the structure set has no voxel of it)"
    )


def test_only_a_total_plan_dose_is_evaluated():
    shape = (4, 4, 4)
    masks = {"Heart": mask(shape, np.s_[1:3, 1:3, 1:3], name="Heart")}
    for summation, kind in (("FRACTION", "PHYSICAL"), ("BEAM", "PHYSICAL"), ("PLAN", "ERROR")):
        table = evaluate_plan(
            plan_dose(np.full(shape, 1.0), summation, kind), masks, fractions=30, prescription_gy=60.0
        )
        assert set(table["status"]) == {"not evaluable"} and not table["passed"].any()
        assert table["reason"].str.contains("RTDOSE 1.2.826.0.1.99: Dose").all()
        assert table["reason"].str.contains(summation if kind != "ERROR" else "ERROR").all()


def test_structure_outside_the_dose_grid_is_unreliable_with_its_cm3():
    # 5 mm voxels (0.125 cm³). The dose grid covers x index 0..9; the masks' grid x 0..11 (same origin and
    # spacing, so every sub-sample of a voxel lies on that voxel's side of the dose grid's face).
    dose = plan_dose(np.full((10, 10, 10), 10.0))
    shape = (10, 10, 12)
    masks = {
        # 1000 voxels inside + 2 outside: 0.25 cm³, 0.2 % → evaluated, the excluded volume stated.
        "Heart": mask(shape, np.s_[:, :, :10], np.s_[0, 0, 10:12], name="Heart"),
        # 15 voxels, 5 outside: 0.625 cm³ and 33 % → unreliable (both limits).
        "Cord": mask(shape, np.s_[0:5, 5, 8:11], name="Cord"),
        # Lungs − GTV: 1004 voxels, 5 outside: 0.625 cm³ but 0.498 % → unreliable by the 0.5 cm³ limit.
        "Lung_L": mask(shape, np.s_[:, 0:5, 0:10], np.s_[0:5, 0, 10], name="Lung_L"),
        "Lung_R": mask(shape, np.s_[:, 5:10, 0:10], name="Lung_R"),
        "GTV": mask(shape, np.s_[4, 4, 4], name="GTV"),
        "Esophagus": mask(shape, np.s_[2, 2, 11], name="Esophagus"),  # wholly outside
    }
    rows = rows_by_key(evaluate_plan(dose, masks, "thorax", fractions=30, prescription_gy=60.0))
    heart = rows[("Heart", "Dmean")]
    assert (heart["status"], heart["value"]) == ("pass", pytest.approx(10.0, abs=1e-12))
    assert (heart["uncovered_cc"], heart["uncovered_pct"]) == pytest.approx((0.25, 100 * 2 / 1002))
    assert "0.25 cm³ (0.2 %) outside the dose grid, excluded" in heart["reason"]
    cord = rows[("SpinalCord", "D0.03cc")]
    assert (cord["status"], cord["matched"]) == ("unreliable", "Cord") and np.isnan(cord["value"])
    assert not cord["passed"] and cord["uncovered_cc"] == pytest.approx(0.625)
    assert cord["reason"].startswith(
        "0.625 cm³ (33.3 %) of Cord lies outside the dose grid (more than 1 % or 0.5 cm³)"
    )
    lung = rows[("Lungs-GTV", "Dmean")]
    assert (lung["status"], lung["uncovered_cc"]) == ("unreliable", pytest.approx(0.625))
    assert lung["uncovered_pct"] == pytest.approx(100 * 5 / 1004) and lung["uncovered_pct"] < 1
    eso = rows[("Esophagus", "Dmean")]
    assert (eso["status"], eso["uncovered_pct"]) == ("unreliable", 100.0)
    assert "entirely outside the dose grid (0.125 cm³)" in eso["reason"]


def test_hypofractionation_is_converted_to_eqd2_per_voxel_or_refused():
    shape = (4, 4, 4)
    dose_values = np.zeros(shape)
    dose_values[0] = 28.0  # heart slice
    dose_values[1] = 48.0  # cord slice
    dose = plan_dose(dose_values)
    masks = {"Heart": mask(shape, np.s_[0], name="Heart"), "Cord": mask(shape, np.s_[1], name="Cord")}
    # 20 × 3 Gy: each voxel's own dose per fraction is D/20. By hand:
    # heart 28 Gy → 1.4 Gy/fx, α/β 3: 28 (1 + 1.4/3) / (1 + 2/3) = 24.64 Gy → Dmean < 26 passes (28 would fail);
    # cord 48 Gy → 2.4 Gy/fx, α/β 2: 48 (1 + 2.4/2) / (1 + 2/2) = 52.8 Gy → ≤ 50 fails (48 would pass).
    rows = rows_by_key(evaluate_plan(dose, masks, "thorax", fractions=20, prescription_gy=60.0))
    heart, cord = rows[("Heart", "Dmean")], rows[("SpinalCord", "D0.03cc")]
    assert (heart["value"], heart["status"]) == (pytest.approx(24.64, abs=1e-3), "pass")
    assert heart["conversion"] == "EQD2, α/β 3 Gy, 20 × 3 Gy" and heart["alpha_beta_gy"] == 3.0
    assert (cord["value"], cord["status"]) == (pytest.approx(52.8, abs=1e-3), "fail")
    assert cord["conversion"] == "EQD2, α/β 2 Gy, 20 × 3 Gy"
    # Conventional 2 Gy fractions, and the limits of 1.8–2.2 Gy: physical dose as is.
    for n, total in ((30, 60.0), (25, 45.0), (25, 55.0)):
        conv = rows_by_key(evaluate_plan(dose, masks, "thorax", fractions=n, prescription_gy=total))
        assert (conv[("Heart", "Dmean")]["value"], conv[("SpinalCord", "D0.03cc")]["value"]) == pytest.approx(
            (28.0, 48.0)
        )
        assert conv[("Heart", "Dmean")]["conversion"].startswith("none (physical dose;")


def test_hypofractionation_without_alpha_beta_is_not_evaluable(tmp_path):
    path = tmp_path / "no_ab.yaml"
    path.write_text(
        "constraints:\n  - {structure: Heart, metric: Dmean, comparator: '<', limit: 26, unit: Gy, source: Q}\n",
        encoding="utf-8",
    )
    shape = (4, 4, 4)
    dose = plan_dose(np.full(shape, 5.0))
    masks = {"Heart": mask(shape, np.s_[0], name="Heart")}
    row = evaluate_plan(dose, masks, path, fractions=5, prescription_gy=40.0).iloc[0]
    assert (row["status"], bool(row["passed"])) == ("not evaluable", False) and np.isnan(row["value"])
    assert (
        "5 × 8 Gy is outside 1.8–2.2 Gy per fraction and the table gives no α/β for Heart Dmean"
        in row["reason"]
    )
    assert evaluate_plan(dose, masks, path, fractions=30, prescription_gy=60.0).iloc[0]["status"] == "pass"
    # α/β on the constraint wins over its structure's; a bad one names the file and entry.
    path.write_text(
        "structures: {Heart: {alpha_beta_gy: 3}}\nconstraints:\n"
        "  - {structure: Heart, metric: Dmean, comparator: '<', limit: 26, unit: Gy, alpha_beta_gy: 10}\n"
        "  - {structure: Heart, metric: Dmax, comparator: '<', limit: 26, unit: Gy}\n",
        encoding="utf-8",
    )
    assert [c.alpha_beta_gy for c in load_constraints(path).constraints] == [10.0, 3.0]
    path.write_text(
        "constraints:\n  - {structure: H, metric: Dmean, comparator: '<', limit: 1, unit: Gy, alpha_beta_gy: 0}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="no_ab.yaml.*#1.*alpha_beta_gy"):
        load_constraints(path)


def test_a_structure_in_another_frame_of_reference_is_not_evaluable():
    shape = (4, 4, 4)
    heart = mask(shape, np.s_[0], name="Heart", frame_of_reference_uid="9.9")
    row = rows_by_key(
        evaluate_plan(plan_dose(np.ones(shape)), {"Heart": heart}, fractions=30, prescription_gy=60.0)
    )
    assert row[("Heart", "Dmean")]["status"] == "not evaluable"
    assert "different patient frames; register them first" in row[("Heart", "Dmean")]["reason"]


def test_evaluate_plan_fills_and_reuses_a_dvh_cache():
    shape = (4, 4, 4)
    dose = plan_dose(np.full(shape, 3.0))
    masks = {"Heart": mask(shape, np.s_[0], name="Heart")}
    cache: dict = {}
    evaluate_plan(dose, masks, "thorax", fractions=30, prescription_gy=60.0, dvhs=cache)
    assert list(cache) == ["Heart"] and cache["Heart"].mean == pytest.approx(3.0)
    cache["Heart"] = DVH.from_samples([40.0], 1.0, name="Heart")  # a cached DVH is used as is
    rows = rows_by_key(evaluate_plan(dose, masks, "thorax", fractions=30, prescription_gy=60.0, dvhs=cache))
    assert rows[("Heart", "Dmean")]["value"] == 40.0


def test_real_plan_dose_evaluated_and_a_fraction_dose_refused(test_data):
    """The dicompyler breast set (a PLAN dose in Gy), and the same grid relabelled as a FRACTION dose."""
    import pydicom

    from pacsai.imaging import read_dose, read_rtstruct
    from pacsai.imaging.geometry import refined_grid

    folder = test_data / "dicompyler_breast_rt"
    dose = read_dose(folder / "rtdose.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)
        structures = read_rtstruct(folder / "rtss.dcm", like=refined_grid(dose), names=["Heart", "Lt Lung"])
    rows = evaluate_plan(
        dose, structures, "breast", fractions=7, prescription_gy=14.0, names={"Lung_Ipsi": "Lt Lung"}
    )
    assert set(rows["status"]) == {"pass"} and (rows["uncovered_cc"] == 0).all()
    assert set(rows["conversion"]) == {"none (physical dose; 7 × 2 Gy is within 1.8–2.2 Gy per fraction)"}
    heart = rows[(rows["structure"] == "Heart") & (rows["metric"] == "Dmean")].iloc[0]
    assert heart["value"] == pytest.approx(0.648, abs=0.02)  # the TPS's own Dmean (0.648 Gy)
    header = pydicom.dcmread(folder / "rtdose.dcm")
    header.DoseSummationType = "FRACTION"
    refused = evaluate_plan(
        read_dose(header),
        structures,
        "breast",
        fractions=7,
        prescription_gy=14.0,
        names={"Lung_Ipsi": "Lt Lung"},
    )
    assert set(refused["status"]) == {"not evaluable"} and not refused["passed"].any()
    assert (
        refused["reason"]
        .str.startswith(
            f"RTDOSE {header.SOPInstanceUID}: DoseSummationType is FRACTION (one fraction of a plan)"
        )
        .all()
    )
