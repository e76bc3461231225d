"""Send DICOM to a PACS (STOW-RS, or the embedded store): files, folders (walked recursively) or datasets.

The back-end-independent half of storing: every input is classified before anything is sent, and
:func:`store_items` runs a store given the back end's two primitives (which instances it holds, send a batch).

Every input is classified before anything is sent:

* **not DICOM** (no ``DICM`` at byte 128, and no SOP Class/Instance UID when read with ``force=True``: a
  LICENSE, a README) → *skipped*, and named in the summary;
* **DICOM without preamble / file meta** → file meta added, then sent;
* **broken DICOM** (unreadable, missing UIDs, pixel data shorter than Rows × Columns × SamplesPerPixel ×
  frames × BitsAllocated / 8, encapsulated pixel data with fewer fragments than frames) → *failed* with the
  reason; the rest continue. Orthanc neither stores nor rejects short pixel data, so this must be caught here.

Instances the PACS already holds (QIDO by study, before sending) are *already present* and not sent again:
re-sending is a no-op on a PACS (Orthanc keeps the first copy), so ``store`` is idempotent. STOW requests
carry at most :data:`BATCH_INSTANCES` instances or about :data:`BATCH_BYTES` bytes.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tqdm.auto import tqdm

from pacsai.pacs.dicomjson import dicom_json_value

logger = logging.getLogger(__name__)

BATCH_INSTANCES = 50
BATCH_BYTES = 50 << 20
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
DEFLATED = "1.2.840.10008.1.2.1.99"

#: What :meth:`pacsai.pacs.Pacs.store` takes: a path, a dataset, or an iterable of them.
StoreItems = Union[str, Path, Dataset, Iterable[Union[str, Path, Dataset]]]
#: ``(stored SOP UIDs, [(name, reason)])`` for one batch sent.
BatchOutcome = tuple[list[str], list[tuple[str, str]]]


@dataclass(frozen=True)
class StoreSummary:
    """What :func:`store` did.

    Attributes
    ----------
    stored
        SOPInstanceUIDs the PACS accepted.
    already_present
        SOPInstanceUIDs the PACS already held (not sent again), including repeats within one call.
    skipped
        Names of inputs that are not DICOM at all.
    failed
        ``(name, reason)`` for every input that could not be stored.
    """

    stored: tuple[str, ...] = ()
    already_present: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """Nothing failed."""
        return not self.failed

    def __str__(self) -> str:
        line = (
            f"stored {len(self.stored)}, already present {len(self.already_present)}, "
            f"skipped {len(self.skipped)} (not DICOM), failed {len(self.failed)}"
        )
        return "\n".join(
            [
                line,
                *(f"  skipped (not DICOM): {name}" for name in self.skipped),
                *(f"  failed: {name}: {reason}" for name, reason in self.failed),
            ]
        )


@dataclass
class Prepared:
    name: str
    sop_uid: str
    study_uid: str
    data: bytes = field(repr=False)
    dataset: Dataset | None = field(default=None, repr=False)


class _Skip(Exception):
    """Not DICOM at all."""


class _Broken(Exception):
    """DICOM, but not storable; the message is the reason."""


def iter_inputs(items: StoreItems) -> Iterator[tuple[str, Path | Dataset | None]]:
    """``(name, file or dataset)`` for every input; folders are walked recursively (sorted); a path that does not
    exist yields ``(name, None)``."""
    if isinstance(items, (str, Path, Dataset)):
        items = [items]
    for item in items:
        if isinstance(item, Dataset):
            yield f"dataset {item.get('SOPInstanceUID', '?')}", item
            continue
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    yield str(child), child
        elif path.is_file():
            yield str(path), path
        else:
            yield str(path), None


def _pixel_problem(ds: Dataset) -> str | None:
    """Why the pixel data cannot be right, or ``None``."""
    if "PixelData" not in ds:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as err:
        return f"pixel data without usable Rows/Columns/BitsAllocated ({err})"
    if min(rows, cols, samples, frames, bits) < 1:
        return (
            f"Rows/Columns/SamplesPerPixel/NumberOfFrames/BitsAllocated {rows}/{cols}/{samples}/{frames}/{bits} "
            "is not an image"
        )
    if bits != 1 and bits % 8:
        # PS3.5 8.1.1: BitsAllocated is 1 or a multiple of 8; anything else cannot be decoded by anyone.
        return f"BitsAllocated {bits} is neither 1 nor a multiple of 8 (corrupt header?)"
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    value = ds.PixelData
    if not isinstance(value, (bytes, bytearray)):  # empty (None) or decoded as text through a corrupt VR
        return f"pixel data is empty or not binary (VR {ds['PixelData'].VR}) (truncated or corrupt file?)"
    try:
        compressed = syntax is not None and UID(str(syntax)).is_compressed
    except ValueError:
        return f"TransferSyntaxUID {str(syntax)!r} is not a transfer syntax (corrupt file meta?)"
    if compressed:
        fragments = _count_items(value)
        if fragments is None:
            return "encapsulated pixel data is cut short: its last item is incomplete (truncated file?)"
        # The first item is the Basic Offset Table; every frame needs at least one fragment after it.
        if fragments - 1 < frames:
            return f"encapsulated pixel data has {fragments - 1} fragment(s) for {frames} frame(s)"
        return None
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if len(value) < expected:
        return (
            f"pixel data has {len(value)} bytes but Rows×Columns×SamplesPerPixel×frames×BitsAllocated/8 = "
            f"{rows}×{cols}×{samples}×{frames}×{bits}/8 call for {expected} (truncated file?)"
        )
    return None


def _count_items(value: bytes | bytearray) -> int | None:
    """Items in encapsulated pixel data (offset table included), or ``None`` when the last one is cut short."""
    offset, count, size = 0, 0, len(value)
    while offset < size:
        if offset + 8 > size or value[offset : offset + 4] != b"\xfe\xff\x00\xe0":
            return None
        offset += 8 + int.from_bytes(value[offset + 4 : offset + 8], "little")
        count += 1
    return count if offset == size else None


def _truncation(ds: Dataset, size: int) -> str | None:
    """Why the file must have been cut short, judged from the raw top-level elements (before conversion)."""
    for elem in ds.elements():
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            needed = tell + length
            return f"the file ends at byte {size}, inside element {elem.tag} that needs {needed} (truncated file?)"
    return None


def prepare_file(path: Path) -> Prepared:
    """Read and check one file; raises ``_Skip`` (not DICOM) or ``_Broken`` (with the reason)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError as err:
        raise _Broken(f"cannot read: {err.strerror or err}") from err
    marker = head[128:132] == b"DICM"
    try:
        with warnings.catch_warnings(), nullcontext() if marker else quiet_pydicom():
            # Reading a README with force=True makes pydicom warn and log about nonsense; the verdict is ours.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
            # Offsets of a deflated dataset refer to the inflated stream, not to the file.
            cut = _truncation(ds, path.stat().st_size) if marker and syntax != DEFLATED else None
            # Top-level values only: a truncated file shows in _truncation, and converting every nested value
            # (thousands of ContourData numbers in an RTSTRUCT) would cost a second per file.
            for _ in ds:
                pass
    except Exception as err:
        if marker:
            raise _Broken(f"unreadable DICOM ({type(err).__name__}: {err})") from err
        raise _Skip() from err
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS:
        raise _Skip()
    if cut:
        raise _Broken(cut)
    has_uids = bool(ds.get("SOPClassUID")) and bool(ds.get("SOPInstanceUID"))
    if not marker and not has_uids:
        raise _Skip()
    if not marker and len(ds) < 3:
        raise _Skip()  # force=True turns almost anything into a one-element "dataset"
    _check(ds)
    if not marker or meta is None or "TransferSyntaxUID" not in meta:
        _add_file_meta(ds)
        data = _encode(ds)
    else:
        data = path.read_bytes()
    return Prepared(
        name=str(path), sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID), data=data
    )


def prepare_dataset(ds: Dataset, *, name: str) -> Prepared:
    """Check a dataset and encode it as a Part-10 file (file meta added where missing)."""
    _check(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        ds = copy.copy(ds)  # the caller's dataset stays as it was
        _add_file_meta(ds)
    return Prepared(
        name=name,
        sop_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        data=_encode(ds),
        dataset=ds,
    )


def _check(ds: Dataset) -> None:
    """Raise ``_Broken`` with the reason when ``ds`` cannot be a storable instance."""
    missing = [
        k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)
    ]
    if missing:
        raise _Broken(f"DICOM without {', '.join(missing)}")
    if UID(str(ds.SOPClassUID)).name.endswith("Image Storage") and not any(
        k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    ):
        raise _Broken(f"{UID(str(ds.SOPClassUID)).name} without pixel data (truncated file?)")
    problem = _pixel_problem(ds)
    if problem:
        raise _Broken(problem)


def _add_file_meta(ds: Dataset) -> None:
    encoding = getattr(ds, "original_encoding", (True, True))
    implicit = encoding[0] if encoding[0] is not None else True
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as err:
        raise _Broken(f"cannot be encoded as a DICOM file ({type(err).__name__}: {err})") from err
    return buffer.getvalue()


def classify(items: StoreItems) -> tuple[list[Prepared], list[str], list[tuple[str, str]]]:
    """Read and check every input: ``(storable, skipped names, [(name, reason)] of failed)``."""
    prepared: list[Prepared] = []
    skipped: list[str] = []
    failed: list[tuple[str, str]] = []
    for name, item in iter_inputs(items):
        try:
            if item is None:
                raise _Broken("no such file or folder")
            if isinstance(item, Dataset):
                prepared.append(prepare_dataset(item, name=name))
            else:
                prepared.append(prepare_file(item))
        except _Skip:
            logger.info("not storing %s: not DICOM", name)
            skipped.append(name)
        except _Broken as err:
            logger.info("not storing %s: %s", name, err)
            failed.append((name, str(err)))
    return prepared, skipped, failed


def store_items(
    items: StoreItems,
    *,
    label: str,
    held: Callable[[set[str]], set[str]],
    send: Callable[[list[Prepared]], BatchOutcome],
    verify: bool,
    progress: bool = True,
) -> StoreSummary:
    """Store files, folders (recursively) and datasets through a back end's primitives.

    Parameters
    ----------
    items
        A path, a dataset, or an iterable of them.
    label
        The PACS as messages name it.
    held
        SOPInstanceUIDs the PACS holds in the given studies.
    send
        Send one batch; returns what it stored and what failed, with reasons.
    verify
        Check the answers against what the PACS holds afterwards (a server may claim to store what a filter
        dropped; the embedded store's answer is the truth).
    progress
        Show a progress bar.

    Returns
    -------
    StoreSummary
        Stored / already present / skipped / failed (with reasons). Broken inputs never stop the rest.

    Raises
    ------
    PacsAuthError, PacsConnectionError
        The PACS refused the credentials or cannot be reached: nothing more can be sent.
    """
    prepared, skipped, failed = classify(items)
    present = held({p.study_uid for p in prepared}) if prepared else set()
    already: list[str] = []
    to_send: list[Prepared] = []
    seen: set[str] = set()
    for item in prepared:
        if item.sop_uid in present or item.sop_uid in seen:
            already.append(item.sop_uid)
        else:
            seen.add(item.sop_uid)
            to_send.append(item)

    stored: list[str] = []
    with tqdm(total=len(to_send), unit="inst", desc="store", disable=not progress, leave=False) as bar:
        for batch in batches(to_send):
            ok, bad = send(batch)
            stored.extend(ok)
            failed.extend(bad)
            bar.update(len(batch))
    if to_send and verify:
        now = held({item.study_uid for item in to_send})
        stored, failed = _verify(label, now, to_send, stored, failed)
    summary = StoreSummary(
        stored=tuple(stored), already_present=tuple(already), skipped=tuple(skipped), failed=tuple(failed)
    )
    logger.info("store to %s: %s", label, summary)
    return summary


def _verify(
    label: str, held: set[str], sent: list[Prepared], stored: list[str], failed: list[tuple[str, str]]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Check the STOW answer against what the PACS now holds (one QIDO per study).

    Orthanc's DICOMweb plugin (1.7) lists an instance that a ``ReceivedInstanceFilter`` refused among the stored
    ones (HTTP 200, empty FailedSOPSequence) although it keeps nothing, and when a filter raises it silently drops
    that instance and every later one of the request. Only the server's contents tell the truth.
    """
    by_uid = {item.sop_uid: item for item in sent}
    really: list[str] = []
    for uid in stored:
        if uid in held:
            really.append(uid)
        else:
            failed.append((by_uid[uid].name, (
                f"{label} answered that it stored SOP instance {uid} but does not hold it: a filter on "
                "the PACS refused it (e.g. an Orthanc ReceivedInstanceFilter Lua script); ask its "
                "administrator why, then push again (instances already stored are skipped)"
            )))
    # An instance the answer did not account for may still have been stored: trust the server's contents.
    names = {item.name: item.sop_uid for item in sent}
    rescued = {name for name, _ in failed if name in names and names[name] in held and names[name] not in stored}
    really.extend(names[name] for name in sorted(rescued))
    return really, [(name, reason) for name, reason in failed if name not in rescued]


def batches(items: list[Prepared]) -> Iterator[list[Prepared]]:
    batch: list[Prepared] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= BATCH_INSTANCES or size + len(item.data) > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item.data)
    if batch:
        yield batch


def stow_outcome(
    batch: list[Prepared], doc: dict[str, Any], *, source: str
) -> tuple[list[str], list[tuple[str, str]]]:
    accepted = {
        str(dicom_json_value(i, "00081155")) for i in (doc.get("00081199") or {}).get("Value", []) if i
    }
    rejected = {
        str(dicom_json_value(i, "00081155")): dicom_json_value(i, "00081197")
        for i in (doc.get("00081198") or {}).get("Value", [])
        if i
    }
    ok: list[str] = []
    bad: list[tuple[str, str]] = []
    for item in batch:
        if item.sop_uid in rejected:
            bad.append((item.name, f"{source} rejected SOP instance {item.sop_uid} "
                        f"({failure_reason(rejected[item.sop_uid])}); see the PACS log for why"))
        elif item.sop_uid in accepted:
            ok.append(item.sop_uid)
        else:
            bad.append((item.name, f"{source} neither stored nor rejected SOP instance {item.sop_uid} (it stopped "
                        "reading the request early, e.g. a filter on it failed); push again: instances already "
                        "stored are skipped"))
    return ok, bad


# PS3.4 Annex GG.4 / PS3.18 FailureReason (0008,1197) codes a STOW answer may carry.
_FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA770: "out of resources",
    0xA900: "data set does not match SOP class",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class (warning)",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}


def failure_reason(code: Any) -> str:
    """``failure reason 0x0110 (processing failure)`` for a FailureReason value (an int, or absent)."""
    if code is None:
        return "no failure reason given"
    try:
        number = int(code)
    except (TypeError, ValueError):
        return f"failure reason {code!r}"
    meaning = _FAILURE_REASONS.get(number)
    return f"failure reason 0x{number:04X}" + (f" ({meaning})" if meaning else "")


class _DropRecords(logging.Filter):
    """Drops records containing ``text`` (every record when ``text`` is ``None``)."""

    def __init__(self, text: str | None) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text is not None and self.text not in record.getMessage()


@contextmanager
def quiet_pydicom(text: str | None = None) -> Iterator[None]:
    """Drop pydicom log records (those containing ``text``, or all) for the duration."""
    pydicom_logger = logging.getLogger("pydicom")
    dropper = _DropRecords(text)
    pydicom_logger.addFilter(dropper)
    try:
        yield
    finally:
        pydicom_logger.removeFilter(dropper)


__all__ = [
    "BATCH_BYTES",
    "BATCH_INSTANCES",
    "BatchOutcome",
    "Prepared",
    "StoreItems",
    "StoreSummary",
    "classify",
    "quiet_pydicom",
    "stow_outcome",
    "store_items",
]
