"""Gather a report's inputs (and run its model) while the kernel starts, and hand them to the template.

With ``structures_from="model"``, ``pacsai report`` reads the patient's studies and segments them in its own process
(:func:`gather_to_file`), so the notebook kernel never imports torch or MONAI: it loads what was gathered
(:func:`summary_from_file`) — masks, uncertainty, images, dose — and only computes and shows the summary. Its
start-up is the light one of the PACS path.

The hand-off file is a pickle in the report's own output folder, written by this process for the kernel it starts
and read by nothing else; it is removed once the kernel has finished (:func:`remove`). The kernel is started while
the inputs are still being gathered (:func:`announce`): its start-up and imports, seconds on a small machine,
overlap the model's inference. :func:`summary_from_file` waits for the file while a ``.pending`` marker says it is
on its way; a ``.failed`` marker, written by :func:`gather_to_file` on an error, ends the wait with that error.

Boolean masks travel bit-packed (1 bit a voxel instead of a byte), a float image of whole numbers in the int16
range (a CT in HU) as int16, and an image held twice (the same pixels in two studies' records) once; every array
arrives bit for bit (:class:`_Pickler`).
"""

from __future__ import annotations

import io
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pacsai.errors import PacsaiWarning, ReportError
from pacsai.report.params import ReportParameters

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs
    from pacsai.report.inputs import PatientData
    from pacsai.report.summary import PlanSummary

INPUTS_FILE = ".inputs.pickle"
PENDING, FAILED = ".pending", ".failed"  # markers beside it: being gathered / gathering failed
_VERSION = 2
_PACK_MIN_BYTES = 4096  # arrays below this travel as they are: packing a few bytes saves nothing


@dataclass(frozen=True)
class Gathered:
    """What :func:`pacsai.report.inputs.gather` read and the data notes it raised on the way."""

    data: PatientData
    notes: tuple[str, ...]
    pacs_url: str
    version: int = _VERSION


def announce(folder: Path) -> Path:
    """Say that ``folder``'s hand-off file is being gathered (a kernel started now waits for it); returns its path."""
    path = folder / INPUTS_FILE
    for stale in (path, _marker(path, FAILED)):
        stale.unlink(missing_ok=True)
    _marker(path, PENDING).write_bytes(b"")
    return path


def gather_to_file(params: ReportParameters, pacs: Pacs, folder: Path) -> Path:
    """Read the patient's inputs from ``pacs`` (segmenting with the model where asked) into ``folder``.

    An error is also left for a kernel waiting on the file (after :func:`announce`), which then stops with it.

    Returns
    -------
    Path
        The hand-off file, for the template's ``inputs_file`` parameter.
    """
    from pacsai.report.inputs import gather
    from pacsai.report.summary import data_notes

    path = folder / INPUTS_FILE
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PacsaiWarning)
            data = gather(params, pacs=pacs)
        gathered = Gathered(data=data, notes=tuple(data_notes(caught)), pacs_url=params.pacs_url)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as sink:
            _Pickler(sink).dump(gathered)
        tmp.replace(path)
    except BaseException as err:
        fail(folder, err)
        raise
    finally:
        _marker(path, PENDING).unlink(missing_ok=True)
    return path


def fail(folder: Path, err: BaseException) -> None:
    """Leave ``err`` for a kernel waiting on ``folder``'s announced inputs (it stops with it); idempotent."""
    path = folder / INPUTS_FILE
    failed = _marker(path, FAILED)
    if not failed.exists():
        tmp = failed.with_name(failed.name + ".tmp")
        tmp.write_text(f"{type(err).__name__}: {err}")
        tmp.replace(failed)
    _marker(path, PENDING).unlink(missing_ok=True)



def _marker(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _wait_for(path: Path, *, poll_s: float = 0.05) -> None:
    """Wait while ``path`` is announced but not written yet; raise the gatherer's error if it failed.

    The wait also ends when the process that started this kernel (and gathers its inputs) is gone.
    """
    parent = os.getppid()
    while not path.exists() and _marker(path, PENDING).exists():
        if _marker(path, FAILED).exists() or os.getppid() != parent:
            break
        time.sleep(poll_s)
    failed = _marker(path, FAILED)
    if not path.exists() and failed.exists():
        raise ReportError(f"pacsai report could not gather this report's inputs: {failed.read_text()}")


def dumps(obj: object) -> bytes:
    """``obj`` pickled as in a hand-off file (masks bit-packed, equal images once); :func:`pickle.loads` reads it."""
    sink = io.BytesIO()
    _Pickler(sink).dump(obj)
    return sink.getvalue()


def _unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean array from :func:`numpy.packbits` of its C-order voxels and its shape."""
    count = int(np.prod(shape))
    return np.unpackbits(packed, count=count).reshape(shape).view(bool)


def _widen(values: np.ndarray, dtype: str) -> np.ndarray:
    """A float image stored as int16 (every value a whole number in range) back in its own dtype."""
    return values.astype(np.dtype(dtype))


def _as_int16(array: np.ndarray) -> np.ndarray | None:
    """``array`` as int16 where that loses nothing (bit for bit on the way back: a CT in HU), else ``None``."""
    if array.dtype.kind != "f":
        return None
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or out-of-range values: caught by the comparison
        narrow = array.astype(np.int16)
    return narrow if _same_bytes(narrow.astype(array.dtype), array) else None


def _same(array: np.ndarray) -> np.ndarray:
    """The array itself: how a second copy of equal pixels refers to the first in the pickle."""
    return array


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equal (NaN payloads and the sign of zero included) arrays of one shape and dtype."""
    return bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)))


class _Pickler(pickle.Pickler):
    """Pickles boolean arrays bit-packed, float images of whole numbers (a CT in HU) as int16, and each set of
    equal large arrays once (highest protocol).

    Equal non-boolean arrays (an image read twice, e.g. the planning CT in the model's and in the reference's
    study record) become one array in the reader; the report only reads them. Boolean masks are never merged (a
    reader may edit one mask); packing alone makes them 8× smaller.
    """

    def __init__(self, sink: io.BufferedIOBase | io.BytesIO) -> None:
        super().__init__(sink, protocol=pickle.HIGHEST_PROTOCOL)
        self._seen: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not np.ndarray or obj.nbytes < _PACK_MIN_BYTES or obj.dtype.hasobject:
            return NotImplemented
        if obj.dtype == np.bool_:
            return _unpack_mask, (np.packbits(obj, axis=None), obj.shape)
        key = (obj.shape, obj.dtype.str)
        earlier = self._seen.setdefault(key, [])
        for first in earlier:
            if first is not obj and _same_bytes(first, obj):
                return _same, (first,)
        earlier.append(obj)
        narrow = _as_int16(obj)
        if narrow is not None:  # the first copy; later ones refer to it (memoised by the pickler)
            return _widen, (narrow, obj.dtype.str)
        return NotImplemented


def summary_from_file(path: Path, params: ReportParameters) -> PlanSummary:
    """The summary of the inputs in a hand-off file (in the kernel: no PACS reads, no model)."""
    from pacsai.report.summary import summarize

    _wait_for(path)
    try:
        with open(path, "rb") as source:
            gathered = pickle.load(source)  # noqa: S301 - written by pacsai report for this kernel, in its folder
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise ReportError(f"cannot read the report's gathered inputs {path}: {err}; run `pacsai report` again") from err
    if not isinstance(gathered, Gathered) or gathered.version != _VERSION:
        raise ReportError(f"{path} is not a hand-off file of this pacsai version; run `pacsai report` again")
    if gathered.data.patient_id != params.patient_id:
        raise ReportError(f"{path} holds patient {gathered.data.patient_id!r}, not {params.patient_id!r}")
    return summarize(gathered.data, params, pacs_url=gathered.pacs_url, notes=gathered.notes)


def remove(folder: Path) -> None:
    """Delete the hand-off file of ``folder`` and its markers (it holds the images; the outputs do not need it)."""
    path = folder / INPUTS_FILE
    for leftover in (path, _marker(path, PENDING), _marker(path, FAILED), path.with_name(path.name + ".tmp")):
        leftover.unlink(missing_ok=True)
