"""Fuzzing the readers and ``pacs push`` (issue 8, "Faults").

Mutated Part-10 files (truncated, wrong lengths, other VRs, garbage or short pixel data, flipped bytes, and
dataset-level nonsense: missing geometry, "abc" in a DS, NaN/inf, zero spacing, odd contour counts, dangling
references) go to ``read_series``, ``read_rtstruct``, ``read_seg``, ``read_dose`` and ``store``/``pacs push``.
The property: a result or a :class:`~pacsai.errors.PacsaiError` naming the file, only clear warnings, never a
hang, never an interpreter crash, and never a wrong volume: whatever is read must agree with what an
independent reader (pydicom) makes of the same mutated bytes, and equal the unmutated result when the mutation
left geometry and pixels alone.

Seeds are tiny synthetic objects (a 6-slice 12×12 CT, its RTSTRUCT, SEG and an 4×8×8 RTDOSE) so that each
example costs milliseconds; hypothesis runs derandomized without a database, so CI sees the same examples.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from pacsai.errors import PacsaiError, PacsaiWarning
from pacsai.imaging import read_dose, read_rtstruct, read_seg, read_series, write_rtstruct, write_seg
from pacsai.imaging.dicomwrite import save
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.pacs import connect
from pacsai.pacs.store import _Broken, _Skip, prepare_file
from pacsai.synthetic.dicom import StudyInfo, ct_series, rt_dose
from pacsai.uids import derive_uid

# A profile, not global settings: derandomized (the same examples in CI), no example database in the repo,
# a deadline for slow examples, and the hard alarm below for real hangs.
settings.register_profile(
    "pacsai-fuzz",
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=10),
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fuzz(examples: int) -> settings:
    """The fuzz profile with this many examples per test."""
    return settings(settings.get_profile("pacsai-fuzz"), max_examples=examples)


HARD_LIMIT_S = 20.0  # per reader call; a hang is a failure, not a stuck CI job

N_SLICES, ROWS, COLS = 6, 12, 12
DOSE_SHAPE = (4, 8, 8)
MUTATED_SLICE = 2  # the file of the CT series that gets mutated (not the first: its attrs name the series)


# ------------------------------------------------------------------------------------------ element map
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Element:
    """Where one element of a Part-10 file sits (absolute byte offsets)."""

    tag: int
    vr: str
    header: int  # offset of the tag
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4 bytes
    value_at: int
    length: int
    explicit: bool

    @property
    def name(self) -> str:
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X}) {self.vr}"


def element_map(data: bytes, implicit: bool) -> list[Element]:
    """Every data element of a Part-10 file, nested ones included, by walking the bytes (little endian).

    Independent of pydicom's reader on purpose: the offsets must be those of the bytes, whatever pydicom
    makes of them."""
    out: list[Element] = []
    end = _walk(data, 132, len(data), implicit, out)
    assert end == len(data), f"element walk stopped at {end} of {len(data)}"
    return out


def _walk(data: bytes, pos: int, end: int, implicit: bool, out: list[Element]) -> int:
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = (group << 16) | elem
        if tag in (_ITEM_END, _SEQ_END):
            return pos + 8
        if group == 2 or not implicit:
            vr = data[pos + 4 : pos + 6].decode("latin-1")
            if vr in _LONG_VRS:
                length_at, size, value_at = pos + 8, 4, pos + 12
            else:
                length_at, size, value_at = pos + 6, 2, pos + 8
        else:
            vr = dictionary_VR(tag) if tag in pydicom.datadict.DicomDictionary else "UN"
            length_at, size, value_at = pos + 4, 4, pos + 8
        length = int.from_bytes(data[length_at : length_at + size], "little")
        out.append(Element(tag, vr, pos, length_at, size, value_at, length, not (implicit and group != 2)))
        if vr == "SQ" or length == _UNDEFINED:
            stop = end if length == _UNDEFINED else value_at + length
            pos = _items(data, value_at, stop, implicit, out, datasets=tag != 0x7FE00010)
        else:
            pos = value_at + length
    return pos


def _items(data: bytes, pos: int, end: int, implicit: bool, out: list[Element], *, datasets: bool) -> int:
    while pos + 8 <= end:
        tag = (struct.unpack_from("<H", data, pos)[0] << 16) | struct.unpack_from("<H", data, pos + 2)[0]
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if tag == _SEQ_END:
            return pos + 8
        assert tag == _ITEM, f"expected an item at {pos}"
        if not datasets:  # encapsulated pixel data: fragments are bytes
            pos += 8 + length
        elif length == _UNDEFINED:
            pos = _walk(data, pos + 8, end, implicit, out)
        else:
            _walk(data, pos + 8, pos + 8 + length, implicit, out)
            pos += 8 + length
    return pos


# ------------------------------------------------------------------------------------------ mutations
@dataclass(frozen=True)
class Mutation:
    """A named change of a file's bytes; ``touches`` says which byte range it may have altered."""

    label: str
    apply: Callable[[bytes], bytes]

    def __repr__(self) -> str:
        return self.label


_VR_CODES = [
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
    "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
    "ZZ", "\x00\x00", "xy",
]  # fmt: skip


def _put(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes, elements: list[Element]) -> Mutation:
    """One mutation of the raw bytes, chosen among the kinds the issue lists."""
    pixel = [e for e in elements if e.tag == 0x7FE00010]
    kind = draw(st.sampled_from(["truncate", "length", "vr", "flip"] + (["pixels"] if pixel else [])))
    size = len(data)
    if kind == "truncate":
        at = draw(st.integers(0, size - 1))
        return Mutation(f"truncated at byte {at} of {size}", lambda d: d[:at])
    if kind == "length":
        elem = draw(st.sampled_from(elements))
        top = (1 << (8 * elem.length_size)) - 1
        value = draw(
            st.one_of(
                st.sampled_from([0, 1, 2, 3, elem.length + 1, max(elem.length - 1, 0), elem.length * 2, top]),
                st.integers(0, top),
            )
        )
        new = value.to_bytes(elem.length_size, "little")
        return Mutation(f"length of {elem.name} at {elem.header}: {elem.length} → {value}", lambda d: _put(d, elem.length_at, new))
    if kind == "vr":
        explicit = [e for e in elements if e.explicit] or elements
        elem = draw(st.sampled_from(explicit))
        vr = draw(st.sampled_from([v for v in _VR_CODES if v != elem.vr]))
        code = vr.encode("latin-1")
        if not elem.explicit:  # implicit VR files have no VR field: overwrite the tag's element number instead
            return Mutation(f"tag bytes of {elem.name} → {code!r}", lambda d: _put(d, elem.header + 2, code))
        return Mutation(f"VR of {elem.name} at {elem.header} → {vr!r}", lambda d: _put(d, elem.header + 4, code))
    if kind == "pixels":
        elem = pixel[0]
        garbage = draw(st.binary(min_size=1, max_size=64))
        where = draw(st.integers(0, max(elem.length - 1, 0)))
        mode = draw(st.sampled_from(["overwrite", "cut", "extend"]))
        if mode == "overwrite":  # same length, garbage values
            return Mutation(
                f"pixel data bytes {where}… overwritten with {len(garbage)} garbage bytes",
                lambda d: _put(d, elem.value_at + where, garbage[: max(0, elem.length - where)]),
            )
        # A wrong length that is consistent: the element's length field matches its (shorter/longer) value.
        new_len = where if mode == "cut" else elem.length + len(garbage) + (len(garbage) % 2)
        extra = b"" if mode == "cut" else garbage + b"\x00" * (len(garbage) % 2)

        def rewrite(d: bytes) -> bytes:
            value = d[elem.value_at : elem.value_at + elem.length]
            value = value[: new_len] if mode == "cut" else value + extra
            head = _put(d[: elem.value_at], elem.length_at, new_len.to_bytes(elem.length_size, "little"))
            return head + value + d[elem.value_at + elem.length :]

        return Mutation(f"pixel data {mode} to {new_len} bytes (length field consistent)", rewrite)
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=8))

    def flip(d: bytes) -> bytes:
        out = bytearray(d)
        for at, mask in flips:
            out[at] ^= mask
        return bytes(out)

    return Mutation(f"bytes flipped at {sorted(a for a, _ in flips)}", flip)


def _rewrite(ds: Dataset, change: Callable[[Dataset], None]) -> bytes:
    """Apply a dataset-level change and write the file without pydicom's value validation (the change is
    meant to be invalid)."""
    import copy

    ds = copy.deepcopy(ds)
    config = pydicom.config.settings
    old = config.writing_validation_mode
    config.writing_validation_mode = pydicom.config.IGNORE
    try:
        change(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        config.writing_validation_mode = old
    return buffer.getvalue()


def _set(keyword: str, value: Any) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)

    return change


def _raw(keyword: str, text: bytes) -> Callable[[Dataset], None]:
    """Replace an element's value by raw text (e.g. "abc" in a DS), bypassing pydicom's value conversion."""

    def change(ds: Dataset) -> None:
        tag = pydicom.tag.Tag(keyword)
        vr = ds[tag].VR if tag in ds else dictionary_VR(tag)
        padded = text + b" " * (len(text) % 2)
        # A raw element is written byte for byte: pydicom would refuse to build a DS from "abc".
        ds._dict[tag] = RawDataElement(tag, vr, len(padded), padded, 0, False, True)

    return change


def _nested(path: list[tuple[str, int]], change: Callable[[Dataset], None]) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        target = ds
        for keyword, index in path:
            target = target[keyword].value[index]
        change(target)

    return apply


def _pixels(fraction: float) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        n = int(len(ds.PixelData) * fraction)
        ds.PixelData = ds.PixelData[: n - n % 2]

    return change


_IMAGE_CHANGES: dict[str, Callable[[Dataset], None]] = {
    "no ImagePositionPatient": _set("ImagePositionPatient", None),
    "no ImageOrientationPatient": _set("ImageOrientationPatient", None),
    "no PixelSpacing": _set("PixelSpacing", None),
    "no Rows": _set("Rows", None),
    "no Columns": _set("Columns", None),
    "no BitsAllocated": _set("BitsAllocated", None),
    "no PixelData": _set("PixelData", None),
    "IPP 'abc'": _raw("ImagePositionPatient", b"abc\\1\\2 "),
    "IPP two values": _raw("ImagePositionPatient", b"1\\2 "),
    "IPP NaN": _raw("ImagePositionPatient", b"nan\\0\\0 "),
    "IPP inf": _raw("ImagePositionPatient", b"0\\inf\\0 "),
    "IPP -inf z": _raw("ImagePositionPatient", b"0\\0\\-inf"),
    "IPP 1e308": _raw("ImagePositionPatient", b"1e308\\0\\0 "),
    "IOP zero": _raw("ImageOrientationPatient", b"0\\0\\0\\0\\0\\0 "),
    "IOP NaN": _raw("ImageOrientationPatient", b"nan\\0\\0\\0\\1\\0 "),
    "IOP parallel": _raw("ImageOrientationPatient", b"1\\0\\0\\1\\0\\0 "),
    "PixelSpacing 0": _raw("PixelSpacing", b"0\\0 "),
    "PixelSpacing negative": _raw("PixelSpacing", b"-1\\-1 "),
    "PixelSpacing NaN": _raw("PixelSpacing", b"nan\\1 "),
    "PixelSpacing inf": _raw("PixelSpacing", b"inf\\1 "),
    "PixelSpacing 'abc'": _raw("PixelSpacing", b"abc "),
    "RescaleSlope 'abc'": _raw("RescaleSlope", b"abc "),
    "RescaleSlope NaN": _raw("RescaleSlope", b"nan "),
    "RescaleIntercept inf": _raw("RescaleIntercept", b"inf "),
    "SliceThickness 'abc'": _raw("SliceThickness", b"abc "),
    "Rows 0": _set("Rows", 0),
    "Rows doubled": _set("Rows", 2 * ROWS),
    "Rows halved": _set("Rows", ROWS // 2),
    "Columns 65535": _set("Columns", 65535),
    "BitsAllocated 12": _set("BitsAllocated", 12),
    "BitsAllocated 0": _set("BitsAllocated", 0),
    "BitsAllocated 32": _set("BitsAllocated", 32),
    "BitsStored 0": _set("BitsStored", 0),
    "BitsStored 40": _set("BitsStored", 40),
    "PixelRepresentation 7": _set("PixelRepresentation", 7),
    "SamplesPerPixel 3": _set("SamplesPerPixel", 3),
    "SamplesPerPixel 0": _set("SamplesPerPixel", 0),
    "NumberOfFrames 5": _set("NumberOfFrames", 5),
    "NumberOfFrames 0": _set("NumberOfFrames", 0),
    "NumberOfFrames 'abc'": _raw("NumberOfFrames", b"abc "),
    "pixel data half (consistent length)": _pixels(0.5),
    "pixel data empty": _pixels(0.0),
    "other SeriesInstanceUID": _set("SeriesInstanceUID", "1.2.3.4"),
    "no SeriesInstanceUID": _set("SeriesInstanceUID", None),
    "Modality RTSTRUCT": _set("Modality", "RTSTRUCT"),
    "no SOPInstanceUID": _set("SOPInstanceUID", None),
}


# ------------------------------------------------------------------------------------------ harness
class Hang(BaseException):
    """A reader ran past the hard limit (BaseException: no library ``except Exception`` may swallow it)."""


@contextmanager
def hard_limit(seconds: float, what: str) -> Iterator[None]:
    """SIGALRM after ``seconds``: a hang becomes a test failure instead of a stuck job."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    result: Any
    error: PacsaiError | None


def attempt(what: str, call: Callable[[], Any], *, names: tuple[str, ...]) -> Outcome:
    """Run a reader: a result or a PacsaiError naming one of ``names``; anything else fails the test.

    Warnings must be PacsaiWarnings or pydicom's own value warnings (they name the element and value);
    a numpy RuntimeWarning (NaN arithmetic on bad input) means an unchecked value got through."""
    with warnings.catch_warnings(record=True) as caught, hard_limit(HARD_LIMIT_S, what):
        warnings.simplefilter("always")
        try:
            outcome = Outcome(call(), None)
        except PacsaiError as err:
            outcome = Outcome(None, err)
    for w in caught:
        from_pydicom = "pydicom" in Path(w.filename).parts or "highdicom" in Path(w.filename).parts
        clear = issubclass(w.category, PacsaiWarning) or (from_pydicom and w.category is UserWarning)
        assert clear, f"{what}: unclear warning {w.category.__name__} at {w.filename}:{w.lineno}: {w.message}"
    if outcome.error is not None:
        message = str(outcome.error)
        assert any(n in message for n in names), f"{what}: error does not name {names}: {message}"
    return outcome


# ------------------------------------------------------------------------------------------ seeds
class Seeds:
    """The unmutated files and what the readers make of them (a plain class: hypothesis prints its repr)."""

    root: Path
    ct_files: list[Path]
    ct: xr.DataArray
    rtstruct: Path
    masks: dict[str, xr.DataArray]
    seg: Path
    seg_masks: dict[str, xr.DataArray]
    dose: Path
    dose_grid: xr.DataArray

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: keep it short
        return f"Seeds({self.root})"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    uid = lambda role: derive_uid("pacsai-fuzz", role)  # noqa: E731
    info = StudyInfo(
        patient_id="FUZZ-1", patient_name="Fuzz^Seed", birth_date="19700101", sex="O",
        study_uid=uid("study"), study_date="20240102", study_time="101500", study_id="1",
        accession="FUZZ1", description="fuzz seeds", frame_of_reference_uid=uid("frame"),
    )  # fmt: skip
    affine = affine_from((-30.0, -30.0, 10.0), np.eye(3), (5.0, 5.0, 7.0))
    hu = np.random.default_rng(8).integers(-1000, 1500, (N_SLICES, ROWS, COLS)).astype(float)
    datasets = ct_series(
        hu, affine, info, series_uid=uid("ct"), instance_uids=[uid(f"ct-{k}") for k in range(N_SLICES)]
    )
    ct_dir = root / "ct"
    ct_dir.mkdir()
    ct_files = [save(ds, ct_dir / f"CT_{k:04d}.dcm") for k, ds in enumerate(datasets)]
    ct = read_series(ct_dir)
    frame = {"frame_of_reference_uid": info.frame_of_reference_uid}
    body = np.zeros(ct.shape, dtype=bool)
    body[1:5, 2:10, 2:10] = True
    gtv = np.zeros(ct.shape, dtype=bool)
    gtv[2:4, 4:8, 5:8] = True
    gtv[3, 5:7, 6] = False  # a hole: two contours on one plane
    masks = {n: make_volume(m, ct.attrs["affine"], name=n, attrs=frame) for n, m in (("BODY", body), ("GTV", gtv))}
    rtstruct = save(write_rtstruct(masks, source=datasets), root / "RTSTRUCT.dcm")
    seg = save(write_seg(masks, source=datasets), root / "SEG.dcm")
    dose_affine = affine_from((-20.0, -20.0, 17.0), np.eye(3), (4.0, 4.0, 7.0))
    dose_gy = np.random.default_rng(9).uniform(0, 60, DOSE_SHAPE)
    dose = save(
        rt_dose(dose_gy, dose_affine, info, series_uid=uid("dose-series"), instance_uid=uid("dose"), plan=None),
        root / "RTDOSE.dcm",
    )
    return Seeds(
        root=root,
        ct_files=ct_files,
        ct=ct,
        rtstruct=rtstruct,
        masks=read_rtstruct(rtstruct, like=ct),
        seg=seg,
        seg_masks=read_seg(seg, like=ct),
        dose=dose,
        dose_grid=read_dose(dose),
    )


def _elements(path: Path) -> list[Element]:
    data = path.read_bytes()
    implicit = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_implicit_VR
    return element_map(data, implicit)


@contextmanager
def mutated_copy(files: list[Path], target: Path, new_bytes: bytes) -> Iterator[tuple[Path, Path]]:
    """A fresh folder with ``files`` where ``target`` is replaced by ``new_bytes``: (folder, mutated file)."""
    with tempfile.TemporaryDirectory(prefix="pacsai-fuzz-") as tmp:
        folder = Path(tmp)
        mutated = folder / target.name
        for f in files:
            (folder / f.name).write_bytes(new_bytes if f == target else f.read_bytes())
        yield folder, mutated


# ------------------------------------------------------------------------------------------ oracles
def _pydicom_view(path: Path) -> Dataset | None:
    """The file as pydicom alone reads it (None where it cannot); values are converted on access."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=True)
    except Exception:
        return None


def _floats(ds: Dataset, keyword: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([float(v) for v in ds[keyword].value], dtype=float)


def check_series(volume: xr.DataArray, folder: Path, original: xr.DataArray, mutated: Path) -> None:
    """A volume read from a mutated folder must be what independent pydicom reads of the same files say."""
    affine = np.asarray(volume.attrs["affine"])
    assert np.isfinite(affine).all() and np.isfinite(volume.attrs["spacing"]).all(), "non-finite geometry"
    assert np.all(np.asarray(volume.attrs["spacing"]) > 0)
    files = [Path(f) for f in volume.attrs["source_files"]]
    assert len(files) == volume.shape[0] == len(list(folder.iterdir())), "a file was dropped silently"
    for k, path in enumerate(files):
        ds = _pydicom_view(path)
        assert ds is not None, f"read_series accepted {path.name}, which pydicom cannot parse"
        ipp, iop = _floats(ds, "ImagePositionPatient"), _floats(ds, "ImageOrientationPatient")
        spacing = _floats(ds, "PixelSpacing")
        assert (int(ds.Rows), int(ds.Columns)) == volume.shape[1:], f"{path.name}: matrix size"
        np.testing.assert_allclose(affine[:3, :3] @ [0, 0, k] + affine[:3, 3], ipp, atol=0.06, err_msg=path.name)
        np.testing.assert_allclose(affine[:3, 0] / np.linalg.norm(affine[:3, 0]), iop[:3], atol=1e-4)
        np.testing.assert_allclose(volume.attrs["spacing"][:2], spacing[::-1], atol=1e-4)
        if "TransferSyntaxUID" not in ds.file_meta:  # a corrupt file meta: decode as pydicom parsed the dataset
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian if not ds.original_encoding[0] else pydicom.uid.ImplicitVRLittleEndian
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stored = ds.pixel_array
        except Exception as err:
            raise AssertionError(f"read_series read pixels from {path.name}; pydicom refuses them: {err}") from err
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        np.testing.assert_array_equal(volume.values[k], stored * slope + intercept, err_msg=path.name)
    good = _pydicom_view(mutated)
    if good is not None and all(
        np.array_equal(_floats(good, kw), np.asarray(v))
        for kw, v in (
            ("ImagePositionPatient", original.attrs["affine"][:3, :3] @ [0, 0, MUTATED_SLICE] + original.attrs["affine"][:3, 3]),
        )
    ):
        # Geometry of the mutated slice untouched: the grid is exactly the original one.
        assert volume.shape == original.shape
        np.testing.assert_allclose(affine, original.attrs["affine"], atol=1e-6)


# ------------------------------------------------------------------------------------------ read_series
def test_series_element_map_covers_the_seed(seeds: Seeds):
    elements = _elements(seeds.ct_files[MUTATED_SLICE])
    tags = {e.tag for e in elements}
    assert {0x00200032, 0x00280030, 0x7FE00010, 0x00020010} <= tags


@fuzz(120)
@given(data=st.data())
def test_read_series_on_mutated_bytes(seeds: Seeds, data: st.DataObject):
    target = seeds.ct_files[MUTATED_SLICE]
    original = target.read_bytes()
    mutation = data.draw(byte_mutations(original, _elements(target)), label="mutation")
    with mutated_copy(seeds.ct_files, target, mutation.apply(original)) as (folder, mutated):
        outcome = attempt(f"read_series [{mutation.label}]", lambda: read_series(folder), names=(target.name, str(folder)))
        if outcome.result is not None:
            check_series(outcome.result, folder, seeds.ct, mutated)


@pytest.mark.parametrize("label", sorted(_IMAGE_CHANGES))
def test_read_series_on_mutated_datasets(seeds: Seeds, label: str):
    target = seeds.ct_files[MUTATED_SLICE]
    new = _rewrite(pydicom.dcmread(target), _IMAGE_CHANGES[label])
    with mutated_copy(seeds.ct_files, target, new) as (folder, mutated):
        outcome = attempt(f"read_series [{label}]", lambda: read_series(folder), names=(target.name,))
        if outcome.result is not None:
            check_series(outcome.result, folder, seeds.ct, mutated)


# ------------------------------------------------------------------------------------------ structures, dose
def _rt_signature(path: Path) -> Any:
    """What read_rtstruct's result depends on, as pydicom decodes it (None where pydicom cannot)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            rois = [(str(i.ROINumber), str(i.ROIName), str(i.ReferencedFrameOfReferenceUID)) for i in ds.StructureSetROISequence]
            contours = [
                (str(i.ReferencedROINumber), [(str(c.ContourGeometricType), [float(v) for v in c.ContourData]) for c in i.ContourSequence])
                for i in ds.ROIContourSequence
            ]
            return str(ds.Modality), str(ds.SOPClassUID), rois, contours
    except Exception:
        return None


def _seg_signature(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            shared = ds.SharedFunctionalGroupsSequence[0]
            frames = [
                (
                    [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient],
                    int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
                )
                for f in ds.PerFrameFunctionalGroupsSequence
            ]
            segments = [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in ds.SegmentSequence]
            geometry = (
                [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
            )
            pixels = ds.pixel_array.tobytes()
            return str(ds.SOPClassUID), str(ds.SegmentationType), str(ds.FrameOfReferenceUID), frames, segments, geometry, pixels
    except Exception:
        return None


def _check_masks(masks: dict[str, xr.DataArray], like: xr.DataArray, original: dict[str, xr.DataArray], same: bool) -> None:
    for name, mask in masks.items():
        assert mask.dtype == bool and mask.shape == like.shape, name
        np.testing.assert_array_equal(mask.attrs["affine"], like.attrs["affine"])
    if same:  # the mutation left everything the reader uses alone: the masks are the original ones
        assert list(masks) == list(original)
        for name in masks:
            np.testing.assert_array_equal(masks[name].values, original[name].values, err_msg=name)


@fuzz(60)
@given(data=st.data())
def test_read_rtstruct_on_mutated_bytes(seeds: Seeds, data: st.DataObject):
    original = seeds.rtstruct.read_bytes()
    mutation = data.draw(byte_mutations(original, _elements(seeds.rtstruct)), label="mutation")
    with mutated_copy([seeds.rtstruct], seeds.rtstruct, mutation.apply(original)) as (_, mutated):
        outcome = attempt(f"read_rtstruct [{mutation.label}]", lambda: read_rtstruct(mutated, like=seeds.ct), names=(mutated.name,))
        if outcome.result is not None:
            same = _rt_signature(mutated) == _rt_signature(seeds.rtstruct)
            _check_masks(outcome.result, seeds.ct, seeds.masks, same)


def _odd_contour(ds: Dataset) -> None:
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = list(contour.ContourData)[:-1]


def _contour_text(text: bytes) -> Callable[[Dataset], None]:
    return _nested([("ROIContourSequence", 0), ("ContourSequence", 0)], _raw("ContourData", text))


_RT_CHANGES: dict[str, Callable[[Dataset], None]] = {
    "odd ContourData count": _odd_contour,
    "ContourData 'abc'": _contour_text(b"abc\\1\\2\\3\\4\\5\\6\\7\\8 "),
    "ContourData NaN": _contour_text(b"nan\\0\\17\\1\\0\\17\\1\\1\\17 "),
    "ContourData inf": _contour_text(b"inf\\0\\17\\1\\0\\17\\1\\1\\17 "),
    "ContourData 1e308": _contour_text(b"1e308\\0\\17\\1\\0\\17\\1\\1\\17 "),
    "ContourData empty": _contour_text(b""),
    "ReferencedROINumber dangling": _nested([("ROIContourSequence", 0)], _set("ReferencedROINumber", 99)),
    "ReferencedROINumber 'abc'": _nested([("ROIContourSequence", 0)], _raw("ReferencedROINumber", b"abc ")),
    "ROINumber 'abc'": _nested([("StructureSetROISequence", 0)], _raw("ROINumber", b"abc ")),
    "no ROINumber": _nested([("StructureSetROISequence", 0)], _set("ROINumber", None)),
    "no ReferencedROINumber": _nested([("ROIContourSequence", 0)], _set("ReferencedROINumber", None)),
    "other frame of reference": _nested([("StructureSetROISequence", 0)], _set("ReferencedFrameOfReferenceUID", "1.2.3")),
    "ContourGeometricType garbage": _nested([("ROIContourSequence", 0), ("ContourSequence", 0)], _set("ContourGeometricType", "XX")),
    "NumberOfContourPoints wrong": _nested([("ROIContourSequence", 0), ("ContourSequence", 0)], _set("NumberOfContourPoints", 1000)),
    "no StructureSetROISequence": _set("StructureSetROISequence", None),
    "no ROIContourSequence": _set("ROIContourSequence", None),
    "empty ContourSequence": _nested([("ROIContourSequence", 0)], _set("ContourSequence", [])),
    "Modality CT": lambda ds: (setattr(ds, "Modality", "CT"), setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")),
    "ROIContourSequence item empty": lambda ds: setattr(ds, "ROIContourSequence", [Dataset()]),
}


@pytest.mark.parametrize("label", sorted(_RT_CHANGES))
def test_read_rtstruct_on_mutated_datasets(seeds: Seeds, label: str, tmp_path: Path):
    mutated = tmp_path / "RTSTRUCT.dcm"
    mutated.write_bytes(_rewrite(pydicom.dcmread(seeds.rtstruct), _RT_CHANGES[label]))
    outcome = attempt(f"read_rtstruct [{label}]", lambda: read_rtstruct(mutated, like=seeds.ct), names=(mutated.name,))
    if outcome.result is not None:
        _check_masks(outcome.result, seeds.ct, seeds.masks, same=False)


@fuzz(60)
@given(data=st.data())
def test_read_seg_on_mutated_bytes(seeds: Seeds, data: st.DataObject):
    original = seeds.seg.read_bytes()
    mutation = data.draw(byte_mutations(original, _elements(seeds.seg)), label="mutation")
    with mutated_copy([seeds.seg], seeds.seg, mutation.apply(original)) as (_, mutated):
        outcome = attempt(f"read_seg [{mutation.label}]", lambda: read_seg(mutated, like=seeds.ct), names=(mutated.name,))
        if outcome.result is not None:
            same = _seg_signature(mutated) == _seg_signature(seeds.seg)
            _check_masks(outcome.result, seeds.ct, seeds.seg_masks, same)


_SHARED = ("SharedFunctionalGroupsSequence", 0)
_FRAME0 = ("PerFrameFunctionalGroupsSequence", 0)
_SEG_CHANGES: dict[str, Callable[[Dataset], None]] = {
    "ReferencedSegmentNumber dangling": _nested([_FRAME0, ("SegmentIdentificationSequence", 0)], _set("ReferencedSegmentNumber", 99)),
    "ReferencedSegmentNumber 'abc'": _nested([_FRAME0, ("SegmentIdentificationSequence", 0)], _raw("ReferencedSegmentNumber", b"\x01")),
    "no PlanePositionSequence": _nested([_FRAME0], _set("PlanePositionSequence", None)),
    "frame position NaN": _nested([_FRAME0, ("PlanePositionSequence", 0)], _raw("ImagePositionPatient", b"nan\\0\\0 ")),
    "frame position 'abc'": _nested([_FRAME0, ("PlanePositionSequence", 0)], _raw("ImagePositionPatient", b"abc ")),
    "PixelSpacing 0": _nested([_SHARED, ("PixelMeasuresSequence", 0)], _raw("PixelSpacing", b"0\\0 ")),
    "PixelSpacing inf": _nested([_SHARED, ("PixelMeasuresSequence", 0)], _raw("PixelSpacing", b"inf\\1 ")),
    "IOP zero": _nested([_SHARED, ("PlaneOrientationSequence", 0)], _raw("ImageOrientationPatient", b"0\\0\\0\\0\\0\\0 ")),
    "IOP NaN": _nested([_SHARED, ("PlaneOrientationSequence", 0)], _raw("ImageOrientationPatient", b"nan\\0\\0\\0\\1\\0 ")),
    "no SegmentSequence": _set("SegmentSequence", None),
    "SegmentNumber 'abc'": _nested([("SegmentSequence", 0)], _raw("SegmentNumber", b"\x01")),
    "SegmentationType garbage": _set("SegmentationType", "XYZ"),
    "FRACTIONAL with MaximumFractionalValue 0": lambda ds: (setattr(ds, "SegmentationType", "FRACTIONAL"), setattr(ds, "MaximumFractionalValue", 0)),
    "NumberOfFrames 1000": _set("NumberOfFrames", 1000),
    "NumberOfFrames 0": _set("NumberOfFrames", 0),
    "Rows doubled": _set("Rows", 2 * ROWS),
    "pixel data half": _pixels(0.5),
    "pixel data empty": _pixels(0.0),
    "no PerFrameFunctionalGroupsSequence": _set("PerFrameFunctionalGroupsSequence", None),
    "no SharedFunctionalGroupsSequence": _set("SharedFunctionalGroupsSequence", None),
    "other frame of reference": _set("FrameOfReferenceUID", "1.2.3"),
}


@pytest.mark.parametrize("label", sorted(_SEG_CHANGES))
def test_read_seg_on_mutated_datasets(seeds: Seeds, label: str, tmp_path: Path):
    mutated = tmp_path / "SEG.dcm"
    mutated.write_bytes(_rewrite(pydicom.dcmread(seeds.seg), _SEG_CHANGES[label]))
    for like in (seeds.ct, None):
        outcome = attempt(f"read_seg [{label}] like={like is not None}", lambda: read_seg(mutated, like=like), names=(mutated.name,))
        if outcome.result is not None and like is not None:
            _check_masks(outcome.result, like, seeds.seg_masks, same=False)


def check_dose(dose: xr.DataArray, path: Path) -> None:
    """A dose grid read from a mutated file must be what pydicom makes of the same bytes."""
    ds = _pydicom_view(path)
    assert ds is not None, f"read_dose accepted {path.name}, which pydicom cannot parse"
    affine = np.asarray(dose.attrs["affine"])
    assert np.isfinite(affine).all() and np.all(np.asarray(dose.attrs["spacing"]) > 0)
    nframes = int(ds.get("NumberOfFrames") or 1)
    assert dose.shape == (nframes, int(ds.Rows), int(ds.Columns))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stored = ds.pixel_array.reshape(dose.shape)
        except Exception as err:
            raise AssertionError(f"read_dose read pixels from {path.name}; pydicom refuses them: {err}") from err
        offsets = np.array([float(v) for v in ds.GridFrameOffsetVector]) if nframes > 1 else np.zeros(1)
        scaling = float(ds.DoseGridScaling)
        ipp = _floats(ds, "ImagePositionPatient")
    order = np.argsort(offsets, kind="stable")
    np.testing.assert_allclose(dose.values, stored[order] * scaling)
    np.testing.assert_allclose(affine[:3, 3], ipp + np.array([0, 0, offsets[order][0]]), atol=1e-6)
    np.testing.assert_allclose(dose.attrs["spacing"][:2], _floats(ds, "PixelSpacing")[::-1])


@fuzz(80)
@given(data=st.data())
def test_read_dose_on_mutated_bytes(seeds: Seeds, data: st.DataObject):
    original = seeds.dose.read_bytes()
    mutation = data.draw(byte_mutations(original, _elements(seeds.dose)), label="mutation")
    with mutated_copy([seeds.dose], seeds.dose, mutation.apply(original)) as (_, mutated):
        outcome = attempt(f"read_dose [{mutation.label}]", lambda: read_dose(mutated), names=(mutated.name,))
        if outcome.result is not None:
            check_dose(outcome.result, mutated)


_DOSE_CHANGES: dict[str, Callable[[Dataset], None]] = {
    "GridFrameOffsetVector short": _raw("GridFrameOffsetVector", b"0\\7 "),
    "GridFrameOffsetVector 'abc'": _raw("GridFrameOffsetVector", b"abc\\7\\14\\21 "),
    "GridFrameOffsetVector NaN": _raw("GridFrameOffsetVector", b"0\\nan\\14\\21 "),
    "GridFrameOffsetVector irregular": _raw("GridFrameOffsetVector", b"0\\7\\15\\21 "),
    "GridFrameOffsetVector constant": _raw("GridFrameOffsetVector", b"0\\0\\0\\0 "),
    "GridFrameOffsetVector descending": _raw("GridFrameOffsetVector", b"0\\-7\\-14\\-21 "),
    "no GridFrameOffsetVector": _set("GridFrameOffsetVector", None),
    "DoseGridScaling 'abc'": _raw("DoseGridScaling", b"abc "),
    "DoseGridScaling NaN": _raw("DoseGridScaling", b"nan "),
    "DoseGridScaling -1": _raw("DoseGridScaling", b"-1 "),
    "no DoseGridScaling": _set("DoseGridScaling", None),
    "IPP NaN": _raw("ImagePositionPatient", b"nan\\0\\0 "),
    "IPP two values": _raw("ImagePositionPatient", b"1\\2 "),
    "IOP zero": _raw("ImageOrientationPatient", b"0\\0\\0\\0\\0\\0 "),
    "IOP 'abc'": _raw("ImageOrientationPatient", b"abc "),
    "PixelSpacing 0": _raw("PixelSpacing", b"0\\0 "),
    "PixelSpacing one value": _raw("PixelSpacing", b"4 "),
    "NumberOfFrames 3": _set("NumberOfFrames", 3),
    "NumberOfFrames 0": _set("NumberOfFrames", 0),
    "NumberOfFrames 'abc'": _raw("NumberOfFrames", b"abc "),
    "Rows doubled": _set("Rows", 16),
    "Rows 0": _set("Rows", 0),
    "BitsAllocated 32": _set("BitsAllocated", 32),
    "BitsAllocated 12": _set("BitsAllocated", 12),
    "pixel data half": _pixels(0.5),
    "no PixelData": _set("PixelData", None),
    "DoseUnits garbage": _set("DoseUnits", "XX"),
    "SliceThickness 'abc' single frame": lambda ds: (
        _raw("SliceThickness", b"abc ")(ds), setattr(ds, "NumberOfFrames", 1), _set("GridFrameOffsetVector", None)(ds),
        setattr(ds, "PixelData", ds.PixelData[: 8 * 8 * 2]),
    ),
}


@pytest.mark.parametrize("label", sorted(_DOSE_CHANGES))
def test_read_dose_on_mutated_datasets(seeds: Seeds, label: str, tmp_path: Path):
    mutated = tmp_path / "RTDOSE.dcm"
    mutated.write_bytes(_rewrite(pydicom.dcmread(seeds.dose), _DOSE_CHANGES[label]))
    outcome = attempt(f"read_dose [{label}]", lambda: read_dose(mutated), names=(mutated.name,))
    if outcome.result is not None:
        check_dose(outcome.result, mutated)


# ------------------------------------------------------------------------------------------ pacs push
@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("fuzz-store")
    with connect(f"file://{root / 'store'}", cache_dir=root / "cache") as pacs:
        yield pacs


@fuzz(60)
@given(data=st.data())
def test_store_refuses_mutated_files_by_name(seeds: Seeds, embedded: Any, data: st.DataObject):
    target = data.draw(st.sampled_from([seeds.ct_files[MUTATED_SLICE], seeds.rtstruct, seeds.seg, seeds.dose]), label="seed")
    original = target.read_bytes()
    mutation = data.draw(byte_mutations(original, _elements(target)), label="mutation")
    with tempfile.TemporaryDirectory(prefix="pacsai-fuzz-push-") as tmp:
        folder = Path(tmp)
        for f in seeds.ct_files:
            (folder / f.name).write_bytes(f.read_bytes())
        mutated = folder / f"mutated-{target.name}"
        mutated.write_bytes(mutation.apply(original))
        # The library check on its own: prepared, skipped (not DICOM) or broken with a reason, nothing else.
        with warnings.catch_warnings(), hard_limit(HARD_LIMIT_S, f"prepare_file [{mutation.label}]"):
            warnings.simplefilter("ignore")  # pydicom's notes on the invalid values the mutation made
            try:
                prepare_file(mutated)
                accepted = True
            except _Skip:
                accepted = False
            except _Broken as err:
                assert str(err), "a refusal without a reason"
                accepted = False
        with warnings.catch_warnings(), hard_limit(HARD_LIMIT_S, f"store [{mutation.label}]"):
            warnings.simplefilter("ignore")  # store's own logging is not under test here
            try:
                summary = embedded.store(folder, progress=False)
            except PacsaiError as err:
                raise AssertionError(f"one mutated file stopped the whole store: {err}") from err
    failed = dict(summary.failed)
    good = {f"{folder / f.name}" for f in seeds.ct_files}
    assert not good & set(failed) and not good & set(summary.skipped), f"a good file was refused: {summary}"
    kept = len(summary.stored) + len(summary.already_present)
    refused = str(mutated) in failed or str(mutated) in summary.skipped
    assert kept == len(seeds.ct_files) + (0 if refused else 1), f"{mutation.label}: {summary}"
    if str(mutated) in failed:
        assert failed[str(mutated)], "a refusal without a reason"
    elif str(mutated) not in summary.skipped:
        assert accepted, f"{mutation.label}: store kept a file prepare_file refused"


# Header-level mutations that byte flips rarely reach (a 300-example probe found the empty PixelData crash only).
_STORE_DATASET_MUTATIONS: dict[str, tuple[Callable[[Any], None], bool]] = {
    # label: (mutation, must be refused)
    "empty PixelData": (lambda ds: setattr(ds, "PixelData", b""), True),
    "half PixelData": (lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]), True),
    "Rows 0": (lambda ds: setattr(ds, "Rows", 0), True),
    "BitsAllocated 7": (lambda ds: setattr(ds, "BitsAllocated", 7), True),
    "no SOPInstanceUID": (lambda ds: delattr(ds, "SOPInstanceUID"), True),
    "no PixelData": (lambda ds: delattr(ds, "PixelData"), False),
    "PatientName with backslashes": (lambda ds: setattr(ds, "PatientName", "A\\B\\C"), False),
}


@pytest.mark.parametrize("label", sorted(_STORE_DATASET_MUTATIONS))
def test_store_on_mutated_headers(seeds: Seeds, label: str, tmp_path: Path):
    mutate, refused = _STORE_DATASET_MUTATIONS[label]
    folder = tmp_path / "push"
    folder.mkdir()
    for f in seeds.ct_files:
        (folder / f.name).write_bytes(f.read_bytes())
    ds = pydicom.dcmread(seeds.ct_files[MUTATED_SLICE])
    ds.SOPInstanceUID = derive_uid("fuzz-store", label)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    mutate(ds)
    mutated = folder / "mutated.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(mutated, enforce_file_format=False)
    with connect(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache") as pacs, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with hard_limit(HARD_LIMIT_S, f"store [{label}]"):
            summary = pacs.store(folder, progress=False)
    failed = dict(summary.failed)
    assert len(summary.stored) == len(seeds.ct_files) + (0 if str(mutated) in failed else 1), summary
    if refused:
        assert str(mutated) in failed and failed[str(mutated)], f"{label}: not refused by name ({summary})"


def test_cli_push_exits_non_zero_naming_each_refused_file(seeds: Seeds, tmp_path: Path):
    folder = tmp_path / "push"
    folder.mkdir()
    for f in seeds.ct_files:
        (folder / f.name).write_bytes(f.read_bytes())
    data = seeds.ct_files[0].read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) - 100])
    elements = _elements(seeds.rtstruct)
    seq = next(e for e in elements if e.vr == "SQ" and e.length != _UNDEFINED)
    rt = seeds.rtstruct.read_bytes()
    (folder / "bad-length.dcm").write_bytes(_put(rt, seq.length_at, (seq.length + 7).to_bytes(4, "little")))
    (folder / "README.txt").write_text("not DICOM\n")
    url = f"file://{tmp_path / 'store'}"
    run = subprocess.run(
        [sys.executable, "-m", "pacsai", "pacs", "push", str(folder), "--pacs", url, "--no-progress"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "Traceback" not in output
    assert f"stored {len(seeds.ct_files)}" in output
    assert "failed: " + str(folder / "truncated.dcm") in output and "bad-length.dcm" in output
    assert "skipped 1" in output


_DECODER_CHILD = textwrap.dedent(
    """
    import io, random, sys, warnings
    import pydicom
    from pacsai.errors import PacsaiError
    from pacsai.imaging import read_series
    warnings.simplefilter("ignore")
    rng = random.Random(8)
    out = sys.argv[1]
    for source in sys.argv[2:]:
        ds = pydicom.dcmread(source)
        frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
        for trial in range(12):
            junk = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, len(f) // 2, len(f)]))) or b"\\x00\\x00" for f in frames]
            ds.PixelData = pydicom.encaps.encapsulate(junk)
            path = f"{out}/junk.dcm"
            ds.save_as(path, enforce_file_format=True)
            try:
                read_series([path])
                print("read", source, trial)
            except PacsaiError as err:
                print("refused", type(err).__name__)
    print("done")
    """
)


def test_decoders_on_garbage_pixel_data_never_crash_the_interpreter(test_data: Path, tmp_path: Path):
    # Compressed pixel data goes to C decoders (RLE, OpenJPEG, libjpeg): run them on garbage in a child process,
    # so a segfault shows as a return code instead of killing the test run.
    sources = [test_data / "pydicom_variants" / "mr" / n for n in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm")]
    run = subprocess.run(
        [sys.executable, "-c", _DECODER_CHILD, str(tmp_path), *map(str, sources)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, f"decoder child died with {run.returncode}: {run.stderr[-2000:]}"
    lines = run.stdout.splitlines()
    assert lines[-1] == "done" and len(lines) == 1 + 12 * len(sources), run.stdout
    assert sum(line.startswith("refused") for line in lines) >= 12, run.stdout
