"""Low-level DICOM reading shared by every ``pacsai.imaging`` reader.

A *source* is a folder, one file, a list of paths, or a list of :class:`pydicom.Dataset` (mixing paths and
datasets is allowed). :func:`load_datasets` turns it into datasets, and every failure names the file and the fix:

* a folder is read non-recursively; files that are not DICOM at all (``LICENSE``, a reference ``.nii.gz``) are
  skipped and logged, because real exports carry such companions; a path named explicitly that is not DICOM is
  an error;
* files without the 128-byte preamble / ``DICM`` prefix but starting with a plausible group-0002/0008 element
  (old ACR-NEMA-style exports, e.g. pydicom's ``rt_tiny/rtstruct.dcm``) are read with ``force=True``;
* a truncated file raises :class:`pacsai.errors.DicomFileError` instead of yielding a silently short dataset
  (pydicom returns whatever it parsed before the end of the file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pacsai.errors import DicomFileError, PacsaiError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Source = PathLike | pydicom.Dataset | Iterable[PathLike | pydicom.Dataset]

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA_TAG = pydicom.tag.Tag("PixelData")
# First bytes of a preamble-less file: a (0002,xxxx) or (0008,xxxx) tag, little or big endian.
_PLAUSIBLE_HEADS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
# A file with one of these suffixes claims to be DICOM: when it is not (empty, cut short before the 'DICM'
# prefix), skipping it as a companion would silently drop a slice from a series.
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}


def load_datasets(source: Source, *, stop_before_pixels: bool = False) -> list[pydicom.Dataset]:
    """Read a folder, a file, a list of paths or a list of datasets into pydicom datasets.

    Parameters
    ----------
    source
        A folder (read non-recursively; non-DICOM companions are skipped), one file path, a dataset, or an
        iterable of paths and/or datasets. Datasets are passed through unchanged.
    stop_before_pixels
        Stop reading each file before its pixel data (fast header-only reads).

    Returns
    -------
    list of pydicom.Dataset
        In file-name order for a folder, in the given order otherwise. Each dataset read from a file has
        ``ds.filename`` set.

    Raises
    ------
    DicomFileError
        The source is empty or missing, an explicitly named file is not DICOM, or a file is truncated.
    """
    items = expand_source(source)
    datasets = []
    for item in items:
        if isinstance(item, pydicom.Dataset):
            datasets.append(item)
        else:
            datasets.append(read_file(item, stop_before_pixels=stop_before_pixels))
    return datasets


def read_file(
    path: PathLike, *, stop_before_pixels: bool = False, defer_size: int | str | None = None
) -> pydicom.Dataset:
    """Read one DICOM file, refusing non-DICOM and truncated files with a :class:`DicomFileError`.

    Parameters
    ----------
    path
        The file.
    stop_before_pixels
        Do not read the pixel data.
    defer_size
        Passed to :func:`pydicom.dcmread`: values larger than this are read only when accessed.
    """
    path = Path(path)
    force = False
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
        except InvalidDicomError:
            # No preamble/'DICM': accept only files that start like a DICOM element (pydicom with force=True
            # would otherwise "parse" any text file into garbage).
            if not _plausible_preambleless(path):
                raise DicomFileError(
                    f"{path} is not a DICOM file (no 'DICM' prefix at byte 128 and no DICOM element at its "
                    "start); remove it from the list or pass the folder so non-DICOM files are skipped"
                ) from None
            force = True
            ds = pydicom.dcmread(
                path, stop_before_pixels=stop_before_pixels, defer_size=defer_size, force=True
            )
    except DicomFileError:
        raise
    except FileNotFoundError as err:
        raise DicomFileError(f"{path} does not exist; check the path") from err
    except Exception as err:  # noqa: BLE001 - pydicom raises a dozen types for corrupt bytes (ValueError,
        # struct.error, BytesLengthException, KeyError, EOFError, OverflowError...): all mean "corrupt file"
        raise DicomFileError(
            f"{path} cannot be parsed as DICOM ({type(err).__name__}: {err}); the file is probably truncated or "
            "corrupt: fetch it again from the PACS"
        ) from err
    if force and len(ds) == 0:
        raise DicomFileError(f"{path} parsed to an empty dataset; it is not DICOM")
    _check_not_truncated(ds, path)
    pixel_elem = ds._dict.get(_PIXEL_DATA_TAG)  # peek without reading a deferred value
    if getattr(pixel_elem, "value", None) is not None and "Rows" in ds and "BitsAllocated" in ds:
        check_pixel_data(ds)
    return ds


def describe(ds: pydicom.Dataset) -> str:
    """A short name for a dataset in messages: its file name if read from disk, else its SOP Instance UID."""
    filename = getattr(ds, "filename", None)
    if isinstance(filename, (str, os.PathLike)) and str(filename):
        return str(filename)
    uid = ds.get("SOPInstanceUID") or getattr(
        getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", ""
    )
    return f"dataset {uid}" if uid else "an in-memory dataset without SOPInstanceUID"


def expected_pixel_bytes(ds: pydicom.Dataset) -> int:
    """Bytes of native (uncompressed) PixelData the image attributes call for, without the padding byte."""
    rows, cols = int_value(ds, "Rows", minimum=1), int_value(ds, "Columns", minimum=1)
    frames = int_value(ds, "NumberOfFrames", default=1, minimum=1)
    samples = int_value(ds, "SamplesPerPixel", default=1, minimum=1)
    bits = int_value(ds, "BitsAllocated", minimum=1)
    total_bits = rows * cols * frames * samples * bits
    return (total_bits + 7) // 8


def value(ds: pydicom.Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword)`` with pydicom's conversion errors (a value that does not fit its VR, a wrong
    length) turned into a :class:`DicomFileError` naming the file and the element."""
    try:
        found = ds.get(keyword)
    except Exception as err:  # noqa: BLE001 - conversion raises ValueError, BytesLengthException, struct.error...
        raise DicomFileError(
            f"{describe(ds)}: {keyword} cannot be read ({type(err).__name__}: {err}); the file is corrupt: fetch "
            "it again from the PACS"
        ) from err
    return default if found is None or found == "" else found


#: Largest plausible magnitude (mm) of a position, spacing or offset: beyond it the header is corrupt, and
#: squaring such values (norms, cross products) overflows to inf.
MAX_MM = 1e6


def floats(
    ds: pydicom.Dataset,
    keyword: str,
    n: int | None,
    *,
    error: type[PacsaiError] = DicomFileError,
    positive: bool = False,
    holder: pydicom.Dataset | None = None,
) -> np.ndarray:
    """A numeric (DS/FD) attribute of ``holder`` (default ``ds``; e.g. a functional-group item) as ``n`` finite
    floats (any count where ``n`` is None), or ``error`` naming the file of ``ds``, the attribute and the value.
    """
    raw = value(holder if holder is not None else ds, keyword)
    if raw is None:
        raise error(f"{describe(ds)} has no {keyword}; the file is incomplete or corrupt")
    return as_floats(raw, n, ds=ds, keyword=keyword, error=error, positive=positive)


def as_floats(
    raw: Any,
    n: int | None,
    *,
    ds: pydicom.Dataset,
    keyword: str,
    error: type[PacsaiError] = DicomFileError,
    positive: bool = False,
) -> np.ndarray:
    """``raw`` (a value already read from ``ds``) as ``n`` finite floats; see :func:`floats`."""
    items = raw if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else [raw]
    try:
        arr = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError) as err:
        raise error(f"{describe(ds)}: {keyword} {raw!r} is not numeric; the file is corrupt") from err
    if n is not None and arr.shape != (n,):
        raise error(f"{describe(ds)}: {keyword} needs {n} value(s), has {arr.size}; the file is corrupt")
    if not np.isfinite(arr).all() or (np.abs(arr) > MAX_MM).any():
        raise error(f"{describe(ds)}: {keyword} {arr.tolist()} is not finite or implausibly large; the file is corrupt")
    if positive and (arr <= 0).any():
        raise error(f"{describe(ds)}: {keyword} {arr.tolist()} must be positive; the file is corrupt")
    return arr


def check_orientation(ds: pydicom.Dataset, iop: np.ndarray, *, error: type[PacsaiError] = DicomFileError) -> None:
    """Refuse an ImageOrientationPatient that is not two orthogonal unit vectors (zero vectors, NaN...)."""
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(float(row @ col)) > 1e-3:
        raise error(
            f"{describe(ds)}: ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors; the file is "
            "corrupt"
        )


def int_value(ds: pydicom.Dataset, keyword: str, *, default: int | None = None, minimum: int = 0) -> int:
    """A non-negative integer attribute (Rows, BitsAllocated, NumberOfFrames...), or a :class:`DicomFileError`
    naming the file when it is missing, not an integer or negative."""
    found = value(ds, keyword)
    if found is None:
        if default is not None:
            return default
        raise DicomFileError(f"{describe(ds)} has no {keyword}; the file is incomplete or corrupt")
    try:
        number = int(found)
    except (TypeError, ValueError, OverflowError) as err:
        raise DicomFileError(f"{describe(ds)}: {keyword} {found!r} is not an integer; the file is corrupt") from err
    if number < minimum:
        raise DicomFileError(f"{describe(ds)}: {keyword} is {number}; it must be at least {minimum}")
    return number


def transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    """The file's TransferSyntaxUID (None for an in-memory dataset without one), refusing values that are not
    a transfer syntax pydicom knows (a corrupt file meta would otherwise crash the decoders)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return None
    raw = value(meta, "TransferSyntaxUID")
    if raw is None:
        return None
    uid = UID(str(raw))
    try:
        uid.is_compressed  # noqa: B018 - raises ValueError for a UID that is not a transfer syntax
    except ValueError as err:
        raise DicomFileError(
            f"{describe(ds)}: TransferSyntaxUID {str(raw)!r} is not a transfer syntax; the file meta is corrupt: "
            "fetch the file again from the PACS"
        ) from err
    return uid


def check_pixel_data(ds: pydicom.Dataset) -> None:
    """Raise :class:`DicomFileError` when native PixelData is shorter than Rows × Columns × frames needs.

    Compressed (encapsulated) pixel data is checked by the decoder instead.
    """
    if "PixelData" not in ds:
        raise DicomFileError(f"{describe(ds)} has no PixelData; it is not an image (or it is truncated)")
    tsyntax = transfer_syntax(ds)
    if tsyntax is not None and tsyntax.is_compressed:
        return
    elem = ds.get_item("PixelData")
    length = _value_length(elem)
    if length is None:
        return
    expected = expected_pixel_bytes(ds)
    if length < expected:
        raise DicomFileError(
            f"{describe(ds)}: PixelData has {length} bytes but Rows×Columns×frames×BitsAllocated needs {expected}; "
            "the file is truncated or its group 0028 attributes are wrong: fetch it again from the PACS"
        )


def decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """``ds.pixel_array`` with decoder failures turned into a :class:`DicomFileError` naming the file."""
    check_pixel_data(ds)
    tsyntax = transfer_syntax(ds) or "unknown"
    try:
        return ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoders and pydicom's pixel handlers raise many types for garbage
        # (ValueError, RuntimeError, struct.error, KeyError, MemoryError for absurd sizes...)
        raise DicomFileError(
            f"{describe(ds)}: pixel data cannot be decoded (transfer syntax {tsyntax}: {err}); for compressed "
            "data install pylibjpeg with pylibjpeg-openjpeg/-libjpeg/-rle, otherwise the file is corrupt"
        ) from err


def expand_source(source: Source) -> list[PathLike | pydicom.Dataset]:
    """The files (non-DICOM folder companions dropped) and datasets a source stands for, without reading them."""
    if isinstance(source, pydicom.Dataset):
        return [source]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _folder_files(path)
        if not path.exists():
            raise DicomFileError(f"{path} does not exist; pass a folder, a DICOM file or a list of them")
        return [path]
    if isinstance(source, (bytes, bytearray)):
        raise DicomFileError(
            "raw bytes are not a DICOM source; wrap them in pydicom.dcmread(io.BytesIO(...))"
        )
    try:
        # A Dataset was returned above; mypy's narrowing keeps it in the union (pydicom's Dataset has a
        # dynamic __getattr__), so say what is left.
        items: Sequence[PathLike | pydicom.Dataset] = list(cast(Iterable[PathLike | pydicom.Dataset], source))
    except TypeError as err:
        raise DicomFileError(
            f"cannot read DICOM from a {type(source).__name__}; pass a folder, paths or pydicom datasets"
        ) from err
    if not items:
        raise DicomFileError("the DICOM source is an empty list; pass at least one file or dataset")
    for item in items:
        if not isinstance(item, (str, os.PathLike, pydicom.Dataset)):
            raise DicomFileError(
                f"a DICOM source list may hold paths and pydicom datasets only, not {type(item).__name__}"
            )
    return list(items)


def _folder_files(folder: Path) -> list[PathLike | pydicom.Dataset]:
    entries = sorted(folder.iterdir())
    files: list[PathLike | pydicom.Dataset] = []
    skipped = []
    for entry in entries:
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if _has_dicm_prefix(entry) or _plausible_preambleless(entry):
            files.append(entry)
        elif entry.suffix.lower() in _DICOM_SUFFIXES:
            raise DicomFileError(
                f"{entry} is named like a DICOM file but is not one ({entry.stat().st_size} bytes, no 'DICM' "
                "prefix at byte 128): it is probably truncated; fetch it again from the PACS or remove it"
            )
        else:
            skipped.append(entry.name)
    if skipped:
        logger.info("skipped %d non-DICOM file(s) in %s: %s", len(skipped), folder, ", ".join(skipped[:5]))
    if not files:
        subdirs = [e.name for e in entries if e.is_dir()]
        hint = f" (it has subfolders {', '.join(subdirs[:5])}: pass one of them)" if subdirs else ""
        raise DicomFileError(f"no DICOM files in folder {folder}{hint}")
    return files


def _has_dicm_prefix(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _plausible_preambleless(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return len(head) == 8 and head[:2] in _PLAUSIBLE_HEADS


def _value_length(elem: object) -> int | None:
    """Length in bytes of an element's value as read (None where it cannot be told without reading)."""
    value = elem.value if hasattr(elem, "value") else None
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    return None


def _check_not_truncated(ds: pydicom.Dataset, path: Path) -> None:
    """pydicom stops quietly at the end of a file: check that the last element's value is complete."""
    if not ds._dict:  # the raw (unconverted) elements are the only place the declared length lives
        return
    last = ds._dict[max(ds._dict)]
    if not isinstance(last, RawDataElement) or last.length == _UNDEFINED_LENGTH:
        return
    if last.value is not None:
        short = len(last.value) < last.length
    else:  # deferred read: compare the declared end of the value with the file size
        short = last.value_tell + last.length > os.path.getsize(path)
    if short:
        raise DicomFileError(
            f"{path} is truncated: element {last.tag} declares {last.length} bytes but the file ends early; "
            "fetch it again from the PACS"
        )
