"""Cohort selection from a real embedded PACS seeded with synthetic patients; hash, manifest, split.

``seeded_store`` (also used by the learning, tracking and validation tests) seeds the embedded store once per
test session under pytest's base temp folder: seeding costs seconds, and every test that reads it only reads.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import pandas as pd
import pytest

from pacsai.cohort import Cohort, CohortQuery, select_cohort, split_patients
from pacsai.errors import ConfigError, PacsaiError

SMOKE_SHAPE = (
    16,
    64,
    64,
)  # (z, y, x): the smallest grid pacsai.synthetic accepts (384 mm in-plane, 128 mm z)
SMOKE_SPACING = (6.0, 6.0, 8.0)  # (x, y, z) mm
N_PATIENTS = 3
STRUCTURES = ("BODY", "Lung_L", "Lung_R", "Heart", "SpinalCord", "Esophagus", "GTV")


def seeded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ``pacs/`` (embedded store) holding SYN-00000 … SYN-00002 (no prior studies); created once."""
    from pacsai.pacs import connect
    from pacsai.synthetic import seed_pacs

    root = tmp_path_factory.getbasetemp() / "pacsai-seeded"
    root.mkdir(exist_ok=True)
    done = root / "seeded.ok"
    with open(root / ".lock", "w") as lock:  # pytest-xdist workers share the base temp folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            pacs = connect(f"file://{root / 'pacs'}", cache_dir=root / "cache")
            seed_pacs(
                pacs,
                patients=N_PATIENTS,
                seed=0,
                with_prior=False,
                progress=False,
                shape=SMOKE_SHAPE,
                spacing=SMOKE_SPACING,
            )
            done.write_text("ok")
    return root


def store_url(root: Path) -> str:
    return f"file://{root / 'pacs'}"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    from pacsai.pacs import connect

    root = seeded_store(tmp_path_factory)
    pacs = connect(store_url(root), cache_dir=root / "cache-cohort")
    return select_cohort(pacs, CohortQuery(structures=STRUCTURES))


def test_select_cohort_pairs_each_ct_with_its_rtstruct(cohort, tmp_path_factory):
    import pydicom

    from pacsai.pacs import connect

    assert len(cohort) == N_PATIENTS
    assert cohort.patients == ["SYN-00000", "SYN-00001", "SYN-00002"]
    assert set(cohort.table["patient_name"]) == {
        "SYNTHETIC^PATIENT0",
        "SYNTHETIC^PATIENT1",
        "SYNTHETIC^PATIENT2",
    }
    root = seeded_store(tmp_path_factory)
    pacs = connect(store_url(root), cache_dir=root / "cache-cohort")
    for row in cohort.table.itertuples():
        assert set(STRUCTURES) <= set(row.roi_names)
        ct = pacs.search_series(StudyInstanceUID=row.study_instance_uid, Modality="CT")
        assert list(ct["SeriesInstanceUID"]) == [row.series_instance_uid]
        (rt_file,) = pacs.retrieve_series(row.study_instance_uid, row.rtstruct_series_uid, progress=False)
        ds = pydicom.dcmread(rt_file)
        assert ds.SOPInstanceUID == row.rtstruct_sop_instance_uid
        ref = (
            ds.ReferencedFrameOfReferenceSequence[0]
            .RTReferencedStudySequence[0]
            .RTReferencedSeriesSequence[0]
        )
        assert ref.SeriesInstanceUID == row.series_instance_uid


def test_query_for_a_missing_structure_finds_nothing(tmp_path_factory):
    from pacsai.pacs import connect

    root = seeded_store(tmp_path_factory)
    pacs = connect(store_url(root), cache_dir=root / "cache-cohort")
    with pytest.raises(PacsaiError, match="Parotid_L"):
        select_cohort(pacs, CohortQuery(structures=("BODY", "Parotid_L")))
    limited = select_cohort(pacs, CohortQuery(structures=("body", "heart"), max_patients=2))  # any case
    assert limited.patients == ["SYN-00000", "SYN-00001"]


def test_content_hash_is_stable_and_order_free(cohort):
    shuffled = Cohort(query=cohort.query, table=cohort.table.sample(frac=1.0, random_state=3))
    assert shuffled.content_hash == cohort.content_hash
    assert len(cohort.content_hash) == 64
    fewer = cohort.subset(cohort.patients[:2])
    assert fewer.content_hash != cohort.content_hash


def test_parquet_round_trip_and_pseudonymised_manifest(cohort, tmp_path):
    path = cohort.to_parquet(tmp_path / "c.parquet")
    back = Cohort.from_parquet(path)
    pd.testing.assert_frame_equal(back.table, cohort.table)
    assert back.query == cohort.query and back.content_hash == cohort.content_hash and not back.pseudonymized

    label = {p: f"p-{i}" for i, p in enumerate(cohort.patients)}.__getitem__
    pseudo = Cohort.from_parquet(cohort.to_parquet(tmp_path / "p.parquet", patient_label=label))
    assert pseudo.pseudonymized and pseudo.patients == ["p-0", "p-1", "p-2"]
    assert pseudo.content_hash == cohort.content_hash  # UIDs only
    assert pseudo.identifiers() == []
    raw = (tmp_path / "p.parquet").read_bytes()
    for ident in cohort.identifiers():
        assert ident.encode() not in raw
    manifest = cohort.manifest(patient_label=label)
    assert [r["patient"] for r in manifest["rows"]] == ["p-0", "p-1", "p-2"]
    assert manifest["content_hash"] == cohort.content_hash
    assert "SYN-00000" not in str(manifest) and "SYNTHETIC" not in str(manifest)


def test_split_is_deterministic_by_patient():
    patients = [f"P{i:03d}" for i in range(20)]
    a = split_patients(patients, seed=1)
    assert a == split_patients(list(reversed(patients)), seed=1)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (12, 4, 4)
    assert sorted(a["train"] + a["val"] + a["test"]) == patients
    assert a != split_patients(patients, seed=2)
    assert split_patients(["A", "B", "C"], seed=0, fractions={"val": 0.1, "test": 0.1})["train"] != []
    three = split_patients(["A", "B", "C"], seed=0)
    assert sorted(len(v) for v in three.values()) == [1, 1, 1]
    assert split_patients(["A", "B"], seed=0)["val"] == []
    with pytest.raises(ConfigError):
        split_patients(patients, fractions={"val": 0.6, "test": 0.5})


def test_query_from_config_rejects_unknown_keys():
    q = CohortQuery.from_config({"modality": "CT", "max_patients": 4}, structures=["BODY"])
    assert q == CohortQuery(modality="CT", structures=("BODY",), max_patients=4)
    with pytest.raises(ConfigError, match="modalty"):
        CohortQuery.from_config({"modalty": "CT"})


# ------------------------------------------------------------------------------------------------ MLflow form


def _decoded(path: Path) -> str:
    """Every value and the metadata of a parquet file as text (its pages are compressed: bytes would hide UIDs)."""
    import pyarrow.parquet as pq

    arrow = pq.read_table(path)
    meta = b" ".join(k + b"=" + v for k, v in (arrow.schema.metadata or {}).items()).decode()
    return arrow.to_pandas().to_json(orient="records") + meta


def test_pseudonymised_cohort_holds_no_uid_and_resolves_back_in_the_pacs(cohort, tmp_path_factory, tmp_path):
    from pacsai import privacy, tracking
    from pacsai.cohort import UID_COLUMNS, resolve_cohort
    from pacsai.pacs import connect

    key = "cohort-test-key"
    uids = sorted({str(u) for c in UID_COLUMNS for u in cohort.table[c]})
    plain = tmp_path / "plain.parquet"
    cohort.to_parquet(plain, patient_label=lambda p: tracking.pseudonymize(p, key))
    assert all(u in _decoded(plain) for u in uids)  # the search below reads what the file holds

    pseudo = cohort.pseudonymised(key)
    assert pseudo.content_hash == cohort.content_hash and pseudo.identifiers() == cohort.identifiers()
    logged = Cohort.from_parquet(pseudo.to_parquet(tmp_path / "logged.parquet"))
    text = _decoded(tmp_path / "logged.parquet")
    assert [u for u in [*uids, *cohort.identifiers()] if u in text] == []
    assert logged.pseudonymized and logged.uids_hashed and logged.identifiers() == []
    assert logged.content_hash == cohort.content_hash  # the run's cohort hash still names the real data
    first = cohort.table.iloc[0]
    assert logged.table.iloc[0].series_instance_uid == privacy.hash_uid(first.series_instance_uid, key)
    assert logged.table.iloc[0].patient_id == tracking.pseudonymize(first.patient_id, key)

    root = seeded_store(tmp_path_factory)
    pacs = connect(store_url(root), cache_dir=root / "cache-cohort")
    held_out = logged.subset(logged.patients[:2])
    resolved = resolve_cohort(pacs, held_out, key=key)
    expected = cohort.subset([p for p in cohort.patients if tracking.pseudonymize(p, key) in held_out.patients])
    assert len(resolved) == 2 and not resolved.uids_hashed
    assert resolved.content_hash == expected.content_hash
    assert sorted(resolved.patients) == sorted(held_out.patients)  # still pseudonyms
    assert set(resolved.identifiers()) >= set(expected.table.patient_id)  # kept for the PHI check only
    assert list(resolved.table.roi_names) == list(expected.table.roi_names)
    assert resolve_cohort(pacs, cohort, key=key) is cohort  # real UIDs already: nothing to find
    with pytest.raises(PacsaiError, match="2 of 2 logged series are not in .*PACSAI_PSEUDONYM_KEY"):
        resolve_cohort(pacs, held_out, key="another-store's-key")


# ------------------------------------------------------------------------------------------ one RTSTRUCT rule


def test_training_notebook_01_and_report_take_the_same_rtstruct_of_a_study_with_two(tmp_path):
    """A planner's first set (more ROIs) and a later revision (fewer), plus pacsai's own copy written back later
    still: the cohort (training), notebook 01's choice and the report all take the revision; a revision added after
    the cohort was logged does not change what a validation run re-finds."""
    from pacsai import structure_sets
    from pacsai.cohort import resolve_cohort
    from pacsai.pacs import connect
    from pacsai.report.inputs import gather
    from pacsai.report.params import validate_parameters
    from pacsai.synthetic import make_patient
    from tests.test_structure_sets import REVISION_ROIS, _pacsai_copy, _with_date, revision

    patient = make_patient(32, shape=SMOKE_SHAPE, spacing=SMOKE_SPACING, with_prior=False)
    _with_date(patient.rtstruct, "20300101", "090000")
    later = revision(patient)
    pacs = connect(f"file://{tmp_path / 'pacs'}", cache_dir=tmp_path / "cache")
    assert pacs.store([*patient.datasets(), later, _pacsai_copy(later, "20300102")], progress=False).ok
    assert len(patient.rtstruct.StructureSetROISequence) > len(REVISION_ROIS)

    wanted = ("Heart", "Lung_L")
    chosen = select_cohort(pacs, CohortQuery(structures=wanted))
    (row,) = chosen.table.itertuples()
    assert row.rtstruct_sop_instance_uid == later.SOPInstanceUID  # was the first set under "most ROIs"
    assert row.roi_names == REVISION_ROIS

    # notebook 01's choice (its "Pull one patient" cell): the study's RTSTRUCTs holding the wanted ROIs, the rule
    rt_series = pacs.search_series(StudyInstanceUID=row.study_instance_uid, Modality="RTSTRUCT")
    candidates = [structure_sets.read_header(path) for uid in rt_series.SeriesInstanceUID
                  for path in pacs.retrieve_series(row.study_instance_uid, uid, progress=False)]
    lowered = {n.lower() for n in wanted}
    in_notebook = structure_sets.choose([c for c in candidates if lowered <= {n.lower() for n in c.roi_names}],
                                        image_series_uid=row.series_instance_uid)
    assert len(candidates) == 3 and in_notebook is not None
    assert in_notebook.sop_instance_uid == row.rtstruct_sop_instance_uid

    data = gather(validate_parameters(patient_id=patient.patient_id), pacs=pacs)
    (structures_ref,) = [ref for ref in data.current.inputs if ref.modality == "RTSTRUCT"]
    assert structures_ref.sop_instance_uids == (row.rtstruct_sop_instance_uid,)
    assert data.current.drawn_by is not None and data.current.drawn_by.label.startswith("RTSTRUCT 'Physician revision'")

    # logged, then a newer revision arrives: the logged cohort resolves to the set it was trained on
    key = "rule-test-key"
    logged = Cohort.from_parquet(chosen.pseudonymised(key).to_parquet(tmp_path / "logged.parquet"))
    assert pacs.store([revision(patient, date="20300201", time="080000")], progress=False).ok
    assert select_cohort(pacs, CohortQuery(structures=wanted)).table.rtstruct_sop_instance_uid[0] != (
        row.rtstruct_sop_instance_uid)
    resolved = resolve_cohort(pacs, logged, key=key)
    assert resolved.content_hash == chosen.content_hash
