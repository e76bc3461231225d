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
