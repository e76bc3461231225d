"""The instance cache: layout, atomic writes, manifests, integrity check."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from pacsai.errors import CacheError
from pacsai.pacs.cache import InstanceCache, SeriesManifest

UID_A = "1.2.826.0.1.3680043.8.498.1"
UID_B = "1.2.826.0.1.3680043.8.498.2"


def test_path_is_keyed_by_sop_instance_uid(tmp_path):
    cache = InstanceCache(tmp_path)
    shard = hashlib.sha1(UID_A.encode()).hexdigest()[0]
    assert cache.path_for(UID_A) == tmp_path / "instances" / shard / f"{UID_A}.dcm"
    assert cache.manifest_path(UID_B) == tmp_path / "series" / f"{UID_B}.json"


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "1.2/3", ".hidden", "1.2 3", "1" * 129])
def test_uids_that_could_escape_the_cache_are_refused(tmp_path, bad):
    with pytest.raises(CacheError, match="not a usable DICOM UID"):
        InstanceCache(tmp_path).path_for(bad)


def test_put_bytes_is_atomic_and_leaves_no_temporary_file(tmp_path):
    cache = InstanceCache(tmp_path)
    path = cache.put_bytes(UID_A, b"x" * 1000)
    assert path.read_bytes() == b"x" * 1000
    assert cache.has(UID_A) and not cache.has(UID_B)
    assert list(cache.tmp_dir.iterdir()) == []


def test_discarded_temporary_file_never_becomes_visible(tmp_path):
    cache = InstanceCache(tmp_path)
    handle, temp = cache.open_temp()
    with handle:
        handle.write(b"half an instance")
    cache.discard(temp)
    assert not temp.exists()
    assert not (tmp_path / "instances").exists()


def test_commit_replaces_an_existing_instance(tmp_path):
    cache = InstanceCache(tmp_path)
    cache.put_bytes(UID_A, b"old")
    cache.put_bytes(UID_A, b"new!")
    assert cache.path_for(UID_A).read_bytes() == b"new!"


def test_put_file_copies_rather_than_links(tmp_path):
    source = tmp_path / "source.dcm"
    source.write_bytes(b"dicom bytes")
    cache = InstanceCache(tmp_path / "cache")
    path = cache.put_file(UID_A, source)
    source.write_bytes(b"changed in place")
    assert path.read_bytes() == b"dicom bytes"


def test_manifest_round_trip_and_integrity_check(tmp_path):
    cache = InstanceCache(tmp_path)
    cache.put_bytes(UID_A, b"a" * 10)
    cache.put_bytes(UID_B, b"b" * 20)
    manifest = SeriesManifest(study_uid="1.2.3", series_uid="1.2.4", instances={UID_A: 10, UID_B: 20})
    cache.write_manifest(manifest)
    read = cache.read_manifest("1.2.4")
    assert read == SeriesManifest(study_uid="1.2.3", series_uid="1.2.4", instances={UID_A: 10, UID_B: 20})
    paths, broken = cache.check(read)
    assert paths == [cache.path_for(UID_A), cache.path_for(UID_B)]
    assert broken == []

    cache.path_for(UID_A).write_bytes(b"a" * 9)  # truncated behind the cache's back
    cache.path_for(UID_B).unlink()
    assert cache.check(read)[1] == [UID_A, UID_B]


def test_unreadable_manifest_means_refetch(tmp_path, caplog):
    cache = InstanceCache(tmp_path)
    cache.manifest_path("1.2.4").parent.mkdir(parents=True)
    cache.manifest_path("1.2.4").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pacsai.pacs.cache"):
        assert cache.read_manifest("1.2.4") is None
    assert "re-fetched" in caplog.text
    assert cache.read_manifest("1.2.5") is None


def test_manifest_of_another_series_is_not_trusted(tmp_path):
    cache = InstanceCache(tmp_path)
    cache.write_manifest(SeriesManifest(study_uid="1.2.3", series_uid="1.2.4", instances={}))
    cache.manifest_path("1.2.9").write_text(cache.manifest_path("1.2.4").read_text())
    assert cache.read_manifest("1.2.9") is None
    assert json.loads(cache.manifest_path("1.2.4").read_text())["series_uid"] == "1.2.4"


def test_partial_marker(tmp_path):
    cache = InstanceCache(tmp_path)
    assert not cache.is_partial("1.2.4")
    cache.mark_partial("1.2.4")
    assert cache.is_partial("1.2.4")
    cache.clear_partial("1.2.4")
    assert not cache.is_partial("1.2.4")


def test_unwritable_cache_is_a_cache_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError, match="PACSAI_CACHE_DIR"):
        InstanceCache(blocker / "cache").put_bytes(UID_A, b"x")
