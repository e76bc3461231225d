"""pacsai.planning.constraints: YAML site tables → pass/fail rows, aliases, derived structures, errors."""

from __future__ import annotations

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
    missing = table[table["status"] == "not evaluated"]
    assert set(missing["structure"]) == {"Lungs-GTV", "SpinalCord", "Esophagus"}
    assert missing["passed"].isna().all() and missing["value"].isna().all()
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
    with pytest.warns(PacsaiWarning, match="no 'GTV' to subtract"):
        no_gtv = derive_structures({k: v for k, v in masks.items() if k != "GTV"}, "thorax")
    assert no_gtv["Lungs-GTV"].values.sum() == 128
    assert derive_structures({"Lung_L": masks["Lung_L"]}, "thorax") == {}
    assert derive_structures({**masks, "Lungs-GTV": masks["GTV"]}, "thorax") == {}
    other = make_volume(right, affine_from((0, 0, 0), np.eye(3), (2.0, 1.0, 1.0)), name="Lung_R")
    with pytest.raises(PlanningError, match="another grid"):
        derive_structures({"Lung_L": masks["Lung_L"], "Lung_R": other}, "thorax")


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
