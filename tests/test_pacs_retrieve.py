"""Retrieval on both back ends: UIDs and decoded pixels equal the source (native and JPEG 2000), the second
call is served from the cache, integrity check and resume, and the streaming multipart parser itself."""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from pacsai.errors import PacsaiWarning, PacsError, PacsNotFoundError
from pacsai.pacs import DicomWebPacs, EmbeddedPacs, Pacs, connect
from pacsai.pacs.cache import InstanceCache
from pacsai.pacs.multipart import scan_sop_instance_uid, stream_parts
from pacsai.uids import derive_uid

CT3 = "dcmqi_ct_seg/ct_3slice"
J2K_SYNTAX = "1.2.840.10008.1.2.4.90"


def _by_uid(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    out = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def _series(pacs: Pacs) -> tuple[str, str]:
    row = pacs.search_series().iloc[0]
    return row.StudyInstanceUID, row.SeriesInstanceUID


def _counting(pacs: Pacs) -> list[str]:
    """URLs of every request the PACS answers from now on (empty for the embedded store)."""
    seen: list[str] = []
    if isinstance(pacs, DicomWebPacs):
        pacs.session.hooks["response"].append(lambda r, **_: seen.append(r.request.url))
    return seen


def test_retrieve_native_ct_matches_source(pacs: Pacs, test_data: Path):
    sources = _by_uid(sorted((test_data / CT3).glob("*.dcm")))
    pacs.store(test_data / CT3, progress=False)
    paths = pacs.retrieve_series(*_series(pacs), progress=False)
    assert len(paths) == 3
    assert all(p.name == f"{p.stem}.dcm" and p.parent.parent == pacs.cache.root / "instances" for p in paths)
    pulled = _by_uid(paths)
    assert set(pulled) == set(sources)
    for uid, ds in pulled.items():
        assert np.array_equal(ds.pixel_array, sources[uid].pixel_array)
        assert ds.pixel_array.dtype == np.int16
    assert list(pacs.cache.tmp_dir.iterdir()) == []  # nothing partial left behind


def _j2k_with_uids(test_data: Path) -> list[pydicom.Dataset]:
    # The TotalSegmentator files carry their UIDs only in the file meta (SOURCES.md): give them real ones.
    out = []
    for path in sorted((test_data / "totalsegmentator_ct_j2k/dicom").iterdir())[:4]:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = derive_uid("test-j2k", "study")
        ds.SeriesInstanceUID = derive_uid("test-j2k", "series")
        ds.PatientID = "TOTALSEG"
        out.append(ds)
    return out


def test_retrieve_jpeg2000_decodes_identically(pacs: Pacs, test_data: Path):
    sources = _j2k_with_uids(test_data)
    summary = pacs.store(sources, progress=False)
    assert summary.ok and len(summary.stored) == 4
    paths = pacs.retrieve_series(
        derive_uid("test-j2k", "study"), derive_uid("test-j2k", "series"), progress=False
    )
    pulled = _by_uid(paths)
    assert set(pulled) == {str(ds.SOPInstanceUID) for ds in sources}
    for ds in sources:
        back = pulled[str(ds.SOPInstanceUID)]
        assert back.file_meta.TransferSyntaxUID == J2K_SYNTAX  # transfer-syntax=*: no transcoding
        assert np.array_equal(back.pixel_array, ds.pixel_array)
        assert back.pixel_array.shape == (512, 512)


def test_second_call_is_served_from_the_cache(pacs: Pacs, test_data: Path, orthanc):
    pacs.store(test_data / CT3, progress=False)
    study, series = _series(pacs)
    first = pacs.retrieve_series(study, series, progress=False)
    requests_seen = _counting(pacs)
    # Empty the PACS itself: only the cache can answer now.
    if isinstance(pacs, EmbeddedPacs):
        shutil.rmtree(pacs.path)
        with pytest.raises(PacsNotFoundError, match="no embedded store at"):
            pacs.search_series()  # the store is gone, not empty
    else:
        orthanc.clear()
        assert pacs.search_series().empty
    requests_seen.clear()
    assert pacs.retrieve_series(study, series, progress=False) == first
    assert requests_seen == []


def test_retrieve_study(pacs: Pacs, test_data: Path):
    mr = sorted((test_data / "tcia_sts001_mr_t2_rtstruct/mr_t2").glob("*.dcm"))[:2]
    rtstruct = test_data / "tcia_sts001_mr_t2_rtstruct/rtstruct/1-1.dcm"
    pacs.store([*mr, rtstruct], progress=False)
    study = pacs.search_studies().StudyInstanceUID[0]
    result = pacs.retrieve_study(study, progress=False)
    assert sorted(len(v) for v in result.values()) == [1, 2]
    modalities = {str(pydicom.dcmread(v[0], stop_before_pixels=True).Modality) for v in result.values()}
    assert modalities == {"MR", "RTSTRUCT"}


def test_broken_cache_entry_is_fetched_again(pacs: Pacs, test_data: Path):
    pacs.store(test_data / CT3, progress=False)
    study, series = _series(pacs)
    paths = pacs.retrieve_series(study, series, progress=False)
    good = paths[1].read_bytes()
    paths[1].write_bytes(good[:1000])  # truncated behind the cache's back
    requests_seen = _counting(pacs)
    with pytest.warns(PacsaiWarning, match="1 cached instance"):
        again = pacs.retrieve_series(study, series, progress=False)
    assert again == paths
    assert paths[1].read_bytes() == good
    if isinstance(pacs, DicomWebPacs):
        # Only the broken instance: no listing, no whole-series transfer.
        assert requests_seen == [f"{pacs.url}/studies/{study}/series/{series}/instances/{paths[1].stem}"]
    # Most of the series gone: still only what is missing, never the cached instance again.
    paths[0].unlink()
    paths[2].unlink()
    requests_seen.clear()
    with pytest.warns(PacsaiWarning, match="2 cached instance"):
        assert pacs.retrieve_series(study, series, progress=False) == paths
    assert all(p.is_file() for p in paths)
    if isinstance(pacs, DicomWebPacs):
        base = f"{pacs.url}/studies/{study}/series/{series}/instances"
        assert sorted(requests_seen) == sorted(f"{base}/{p.stem}" for p in (paths[0], paths[2]))


def test_interrupted_retrieval_resumes_with_missing_instances_only(pacs: Pacs, test_data: Path):
    pacs.store(test_data / CT3, progress=False)
    study, series = _series(pacs)
    paths = pacs.retrieve_series(study, series, progress=False)
    # What an interrupted pull leaves behind: some instances, no manifest, a partial marker.
    pacs.cache.manifest_path(series).unlink()
    paths[0].unlink()
    pacs.cache.mark_partial(series)
    requests_seen = _counting(pacs)
    assert pacs.retrieve_series(study, series, progress=False) == sorted(paths, key=paths.index)
    assert not pacs.cache.is_partial(series)
    if isinstance(pacs, DicomWebPacs):
        assert len(requests_seen) == 2  # the instance list, then the one missing instance
        assert requests_seen[1].endswith(f"/instances/{paths[0].stem}")


def test_unknown_series_is_not_found(pacs: Pacs, test_data: Path):
    pacs.store(test_data / CT3, progress=False)
    study, _ = _series(pacs)
    with pytest.raises(PacsNotFoundError, match="1.2.3.4.5"):
        pacs.retrieve_series(study, "1.2.3.4.5", progress=False)
    with pytest.raises(PacsNotFoundError, match="no series"):
        pacs.retrieve_study("1.2.3.4.6", progress=False)


def test_refresh_fetches_instances_added_later(pacs: Pacs, test_data: Path):
    files = sorted((test_data / CT3).glob("*.dcm"))
    pacs.store(files[:2], progress=False)
    study, series = _series(pacs)
    assert len(pacs.retrieve_series(study, series, progress=False)) == 2
    pacs.store(files[2], progress=False)
    assert len(pacs.retrieve_series(study, series, progress=False)) == 2  # the manifest answers
    assert len(pacs.retrieve_series(study, series, progress=False, refresh=True)) == 3


# -- the streaming parser, on real HTTP ----------------------------------------------------------------------


def _part10(uid: str, payload: bytes) -> bytes:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.add_new(0x00420011, "OB", payload)  # EncapsulatedDocument: any bytes, any length
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class _Multipart(BaseHTTPRequestHandler):
    body = b""
    content_type = ""
    cut_after: int | None = None

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Connection", "close")
        self.end_headers()
        data = self.body if self.cut_after is None else self.body[: self.cut_after]
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def multipart_server() -> Iterator[tuple[str, type[_Multipart]]]:
    handler = type("Handler", (_Multipart,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/x", handler
    finally:
        server.shutdown()
        server.server_close()


def _body(parts: list[bytes], boundary: str, *, lengths: bool) -> bytes:
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n".encode()
        if lengths:
            out += f"Content-Length: {len(part)}\r\n".encode()
        out += b"\r\n" + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("lengths", [True, False])
@pytest.mark.parametrize("threaded", [True, False])
def test_stream_parts_writes_each_part_whole(multipart_server, tmp_path, lengths, threaded):
    url, handler = multipart_server
    boundary = "b0undary"
    # Bodies that contain near-boundaries and CRLFs, one larger than a read chunk.
    parts = [
        _part10("1.2.3.4.1", b"\r\n--b0undar\r\n--b0undaryX" * 10),
        _part10("1.2.3.4.2", bytes(range(256)).replace(b"\x00", b"a") * 9000),
        _part10("1.2.3.4.3", b"x"),
    ]
    handler.body = _body(parts, boundary, lengths=lengths)
    handler.content_type = f'multipart/related; type="application/dicom"; boundary="{boundary}"'
    cache = InstanceCache(tmp_path)
    got: list[tuple[str, int]] = []
    with requests.get(url, stream=True) as response:
        stream_parts(
            response, cache, on_instance=lambda uid, path, size: got.append((uid, size)), threaded=threaded
        )
    assert got == [(f"1.2.3.4.{i + 1}", len(p)) for i, p in enumerate(parts)]
    for i, part in enumerate(parts):
        assert cache.path_for(f"1.2.3.4.{i + 1}").read_bytes() == part


def test_dropped_stream_keeps_complete_parts_only(multipart_server, tmp_path):
    url, handler = multipart_server
    parts = [_part10(f"1.2.3.4.{i}", b"y" * 5000) for i in range(1, 4)]
    body = _body(parts, "bnd", lengths=True)
    handler.body = body
    handler.cut_after = body.index(parts[1]) + 100  # inside the second part
    handler.content_type = "multipart/related; boundary=bnd"
    cache = InstanceCache(tmp_path)
    with requests.get(url, stream=True) as response, pytest.raises(PacsError, match="ended inside a part"):
        stream_parts(response, cache, on_instance=lambda *_: None)
    assert cache.has("1.2.3.4.1") and not cache.has("1.2.3.4.2")
    assert list(cache.tmp_dir.iterdir()) == []


def test_not_multipart_is_an_error(multipart_server, tmp_path):
    url, handler = multipart_server
    handler.body, handler.content_type = b"<html>login</html>", "text/html"
    with requests.get(url, stream=True) as response, pytest.raises(PacsError, match="text/html"):
        stream_parts(response, InstanceCache(tmp_path), on_instance=lambda *_: None)


def test_scan_sop_instance_uid():
    data = _part10("1.2.826.0.1.3680043.8.498.77", b"z")
    assert scan_sop_instance_uid(data) == "1.2.826.0.1.3680043.8.498.77"
    assert scan_sop_instance_uid(data[128:]) is None  # no preamble: the caller reads the dataset instead


def test_connection_refused_during_retrieve(stopped_server_url, tmp_path):
    pacs = connect(stopped_server_url, user="u", password="p", retries=0, cache_dir=tmp_path)
    with pytest.raises(PacsError, match="connection refused"):
        pacs.retrieve_series("1.2.3", "1.2.3.4", progress=False)
