"""Shared parts of the benchmarks: machine description, result files, the ``NAME: R x BASELINE`` line, timing,
peak memory, the synthetic CT series, and the README table.

Conventions every benchmark follows (README "Benchmarks"):

* a figure is a ratio against a baseline measured in the same process or command, never against a number
  remembered from another run. Against a competing tool or a slower path it is a speed-up,
  ``R = t_baseline / t`` (R > 1: faster than the baseline); against a floor it is a multiple of the floor,
  ``R = cost / floor`` (a report's time over an empty notebook's, peak memory over the volume's bytes: lower is
  better);
* each figure prints one line ``NAME: R x BASELINE``, optionally followed by two spaces and ``(details)``;
  anything else a benchmark prints starts with ``# `` so that a reader (or a grep) never mistakes it for a figure;
* results go to ``benchmarks/results/<benchmark>.json`` (written atomically) with the date, the machine and the
  load average before and after, because other jobs share the machine and its timings are noisy.

Memory (:func:`peak_rss_of_call`, :class:`TreePeak`): measured as resident set size seen by the OS, not with
tracemalloc. tracemalloc only sees allocations made through Python's and NumPy's allocators, so it misses
what pydicom's file reads, SimpleITK, the JPEG decoders, the Jupyter kernel and Chromium take; RSS counts all of
it. One process is measured in a fresh interpreter: the kernel's high-water mark (VmHWM) is reset after the
imports and read after the call, so the interpreter and its imports form the baseline, measured the same way,
and allocator reuse from earlier work in the parent stays out of the figure. A process tree (a report:
papermill, its kernel, Chromium for the PDF) is polled with psutil and the RSS of all its processes summed;
shared pages are then counted once per process, so a tree's figure is an upper bound.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
README = REPO / "README.md"
TABLE_START = "<!-- bench:start -->"
TABLE_END = "<!-- bench:end -->"
ORDER = ("retrieve", "read_series", "rtstruct", "dvh", "report")  # the README table's row order

# The packages whose versions shape the figures (pacsai itself and every baseline).
PACKAGES = (
    "pacsai",
    "numpy",
    "pydicom",
    "xarray",
    "requests",
    "dicomweb-client",
    "SimpleITK",
    "rt-utils",
    "dicompyler-core",
    "papermill",
    "ipykernel",
    "psutil",
)

# "NAME: R x BASELINE" with an optional "  (details)"; NAME and BASELINE are single tokens.
LINE_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+): (?P<ratio>[0-9][0-9.]*(?:e[+-]?[0-9]+)?) x "
                     r"(?P<baseline>[A-Za-z0-9_.-]+)(?:  \((?P<detail>.*)\))?$")
SKIP_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+): skipped \((?P<detail>.*)\)$")


# ----------------------------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Figure:
    """One benchmark figure: ``ratio`` × ``baseline``; ``ratio`` None means skipped (``detail`` says why)."""

    name: str
    ratio: float | None
    baseline: str
    detail: str = ""

    def line(self) -> str:
        """The printed line: ``NAME: R x BASELINE  (detail)``, or ``NAME: skipped (why)``."""
        for token in (self.name, self.baseline):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", token):
                raise ValueError(f"benchmark names and baselines are single tokens, got {token!r}")
        if self.ratio is None:
            return f"{self.name}: skipped ({self.detail or 'no reason given'})"
        if not math.isfinite(self.ratio) or self.ratio < 0:
            raise ValueError(f"{self.name}: a ratio must be finite and ≥ 0, got {self.ratio!r}")
        text = f"{self.name}: {format_ratio(self.ratio)} x {self.baseline}"
        return f"{text}  ({self.detail})" if self.detail else text


def format_ratio(ratio: float) -> str:
    """Three significant figures, never scientific notation: 0.366, 1.94, 64.9, 311."""
    if ratio == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(ratio))))
    return f"{ratio:.{digits}f}"


def parse_line(line: str) -> Figure | None:
    """The :class:`Figure` of a printed line, or None if it is not a figure line."""
    match = LINE_RE.match(line.rstrip("\n"))
    if match:
        return Figure(match["name"], float(match["ratio"]), match["baseline"], match["detail"] or "")
    match = SKIP_RE.match(line.rstrip("\n"))
    if match:
        return Figure(match["name"], None, "", match["detail"])
    return None


def emit(figure: Figure) -> Figure:
    """Print a figure's line (flushed: run_all streams the output) and return the figure."""
    print(figure.line(), flush=True)
    return figure


def note(text: str) -> None:
    """Print an informational line, marked so it cannot be read as a figure."""
    print(f"# {text}", flush=True)


# ----------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (rounded); other jobs on the machine show up here."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, RAM, load, OS, Python, package versions, code version."""
    import psutil

    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in PACKAGES},
        "git": _git_sha(),
    }


def machine_line(desc: Mapping[str, Any], *, with_load: bool = True) -> str:
    """One line: ``AMD EPYC, 2 cores (2 physical), 23.4 GiB RAM, load 1.2, Python 3.11.7``."""
    load = desc.get("load_average") or []
    parts = [
        str(desc.get("cpu", "?")),
        f"{desc.get('logical_cpus', '?')} cores ({desc.get('physical_cpus', '?')} physical)",
        f"{desc.get('ram_gib', '?')} GiB RAM",
        *([f"load {load[0] if load else '?'}"] if with_load else []),
        f"Python {desc.get('python', '?')}",
    ]
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- results
def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_result(
    benchmark: str,
    figures: Sequence[Figure],
    data: Mapping[str, Any],
    *,
    started_load: Sequence[float] | None = None,
    results_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``results_dir/<benchmark>.json`` atomically: figures, machine, date, loads, and ``data``.

    The file is written under a temporary name in the same folder and renamed, so a reader (the README
    generator, a second run) never sees half a file.
    """
    doc = {
        "benchmark": benchmark,
        "date": utc_now(),
        "figures": [asdict(f) for f in figures],
        "machine": machine(),
        "load_average_start": list(started_load) if started_load is not None else None,
        **_jsonable(dict(data)),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    target = results_dir / f"{benchmark}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{benchmark}.", suffix=".json.tmp", dir=results_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _jsonable(value: Any) -> Any:
    """Round floats to 6 significant figures (timings are noisier than that) and turn NaN/inf into None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy scalars
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every result file that follows the format above, by benchmark name; others are ignored."""
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("figures"), list):
            docs.append(doc)
    return docs


# ----------------------------------------------------------------------------------------------- README
def results_table(docs: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown between the README markers: a date + machine line and one row per figure."""
    if not docs:
        return "_No results yet: run `make bench`._"
    def rank(doc: Mapping[str, Any]) -> tuple[int, str]:
        name = str(doc.get("benchmark"))
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)

    docs = sorted(docs, key=rank)
    latest = max(docs, key=lambda d: str(d.get("date", "")))
    dates = sorted(str(d.get("date", ""))[:10] for d in docs)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}"
    loads = [float(pair[0]) for d in docs
             for pair in (d.get("load_average_start"), d.get("machine", {}).get("load_average")) if pair]
    load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"
    lines = [
        f"Latest run {when} on {machine_line(latest.get('machine', {}), with_load=False)}, 1-min load {load} "
        "during the runs "
        f"(git {latest.get('machine', {}).get('git') or '?'}). Generated from `benchmarks/results/*.json` "
        "by `make bench`; do not edit by hand.",
        "",
        "| benchmark | figure | details |",
        "|---|---|---|",
    ]
    cpus = {str(d.get("machine", {}).get("cpu")) for d in docs}
    for doc in docs:
        for fig in doc["figures"]:
            ratio = fig.get("ratio")
            figure = "skipped" if ratio is None else f"{format_ratio(float(ratio))} × {fig.get('baseline', '')}"
            detail = str(fig.get("detail", "")).replace("|", "\\|")
            if len(cpus) > 1:
                detail += f" [{doc.get('machine', {}).get('cpu')}, {str(doc.get('date', ''))[:10]}]"
            lines.append(f"| `{fig.get('name')}` | {figure} | {detail} |")
    return "\n".join(lines)


def update_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> bool:
    """Replace the text between the bench markers in ``readme`` with :func:`results_table`; True if changed.

    Raises ValueError (naming the file and the fix) when the markers are missing or out of order, rather than
    guessing where a table should go in a file other people edit.
    """
    text = readme.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < 0 or end < start or text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1:
        raise ValueError(
            f"{readme}: needs exactly one {TABLE_START} followed by one {TABLE_END} (in its Benchmarks section) "
            "for the results table; add them around the table"
        )
    new = text[: start + len(TABLE_START)] + "\n" + results_table(load_results(results_dir)) + "\n" + text[end:]
    if new == text:
        return False
    tmp = readme.with_name(f".{readme.name}.bench.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)
    return True


# ----------------------------------------------------------------------------------------------- timing
def best_of(
    fn: Callable[[], Any], repeats: int, *, before: Callable[[], None] | None = None
) -> tuple[float, float, Any]:
    """Smallest wall time of ``repeats`` calls, the CPU time of that call (all threads), and the last result.

    The minimum, not the mean: on a shared machine the noise only ever adds time.
    """
    best_wall, best_cpu, result = float("inf"), 0.0, None
    for _ in range(max(1, repeats)):
        if before is not None:
            before()
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = time.perf_counter() - start
        if wall < best_wall:
            best_wall, best_cpu = wall, time.process_time() - cpu
    return best_wall, best_cpu, result


# ----------------------------------------------------------------------------------------------- memory
_PEAK_CHILD = r"""
import json, sys, time

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

exec(compile(sys.argv[1], "<setup>", "exec"))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the high-water mark VmHWM to the current RSS (Linux ≥ 4.0)
before = status("VmRSS")
start = time.perf_counter()
result = eval(compile(sys.argv[2], "<call>", "eval"))
seconds = time.perf_counter() - start
after = status("VmHWM")
nbytes = int(getattr(result, "nbytes", 0) or 0)
print("\n" + json.dumps({"baseline_kib": before, "peak_kib": after, "seconds": seconds, "result_nbytes": nbytes}))
"""


def peak_rss_of_call(setup: str, call: str, *, timeout_s: float = 120) -> dict[str, Any]:
    """Peak RSS that evaluating ``call`` adds in a fresh interpreter, after running ``setup`` (the imports).

    The child resets the kernel's RSS high-water mark (``/proc/self/clear_refs``) after ``setup`` and reads
    ``VmHWM`` after the call. ``ru_maxrss`` would not do: Linux carries it over from the forking parent across
    ``exec``, so a child of a large benchmark process would report the parent's peak. Returns
    ``baseline_bytes`` (interpreter + setup), ``peak_bytes`` (the high-water mark during the call),
    ``net_bytes`` (the difference: what the call itself needed at its peak), ``seconds`` and ``result_nbytes``
    (``.nbytes`` of the call's result, e.g. the volume).
    """
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, setup, call], capture_output=True, text=True,
                          timeout=timeout_s, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({call}): {proc.stderr.strip()[-2000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    kib = 1024  # /proc/self/status reports kB (KiB)
    return {
        "baseline_bytes": found["baseline_kib"] * kib,
        "peak_bytes": found["peak_kib"] * kib,
        "net_bytes": (found["peak_kib"] - found["baseline_kib"]) * kib,
        "seconds": found["seconds"],
        "result_nbytes": found["result_nbytes"],
    }


class TreePeak:
    """Poll a process and all its descendants with psutil; keep the largest summed RSS seen.

    Use as a context manager around the wait for the process: ``with TreePeak(proc.pid) as peak: proc.wait()``.
    ``peak.bytes`` is the maximum total; ``peak.bytes_without`` the maximum total of the processes whose names
    do not start with any of ``without`` (e.g. ``("chrom",)`` leaves out the PDF renderer); ``peak.by_name``
    the maximum per process name (summed over processes of that name at one instant).
    """

    def __init__(self, pid: int, *, interval_s: float = 0.05, without: tuple[str, ...] = ()) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.without = without
        self.bytes = 0
        self.bytes_without = 0
        self.by_name: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return  # the root has exited
            total, kept = 0, 0
            names: dict[str, int] = {}
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = p.name()
                except psutil.Error:
                    continue  # a child that just exited
                total += rss
                if not name.startswith(self.without):
                    kept += rss
                names[name] = names.get(name, 0) + rss
            self.samples += 1
            self.bytes = max(self.bytes, total)
            self.bytes_without = max(self.bytes_without, kept)
            for name, rss in names.items():
                self.by_name[name] = max(self.by_name.get(name, 0), rss)
            self._stop.wait(self.interval_s)


def mib(nbytes: float) -> float:
    return nbytes / 2**20


# ----------------------------------------------------------------------------------------------- data
def test_data_root() -> Path | None:
    """The real DICOM collection (env PACSAI_TEST_DATA, default ../shared/data), or None where absent."""
    root = Path(os.environ.get("PACSAI_TEST_DATA", REPO.parent / "shared" / "data")).resolve()
    return root if (root / "SOURCES.md").is_file() else None


CT_SHAPE = (100, 512, 512)


def ct_series(shape: tuple[int, int, int] = CT_SHAPE) -> Iterator[Any]:
    """A deterministic CT series as pydicom Datasets: a water cylinder with a bone rod and seeded noise.

    int16 stored values with RescaleIntercept −1024, Explicit VR Little Endian, 2.5 mm slices; UIDs derive
    from the shape so that series of different sizes never collide in one PACS. Not a patient: the name and
    ID say "benchmark".
    """
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from pacsai.uids import derive_uid

    nz, ny, nx = shape
    rng = np.random.default_rng(20261128)
    yy, xx = np.mgrid[:ny, :nx]
    body = ((xx - nx / 2) / (0.42 * nx)) ** 2 + ((yy - ny / 2) / (0.35 * ny)) ** 2 <= 1
    bone = ((xx - nx / 2) / (0.05 * nx)) ** 2 + ((yy - 0.7 * ny) / (0.05 * ny)) ** 2 <= 1
    key = ("benchmark-ct", *shape)
    study, series, frame = (derive_uid(*key, part) for part in ("study", "series", "frame-of-reference"))
    for k in range(nz):
        hu = np.full((ny, nx), -1000.0)
        hu[body] = 40.0
        hu[bone] = 700.0 + 5 * k
        hu += rng.normal(0, 12, size=(ny, nx))
        stored = np.clip(np.round(hu + 1024), -32768, 32767).astype(np.int16)
        sop = derive_uid(*key, "instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PatientName = "BENCHMARK^CT"
        ds.PatientID = "BENCHMARK"
        ds.StudyDate = "20260101"
        ds.Modality = "CT"
        ds.Manufacturer = "pacsai-benchmark"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-250.0, -250.0, -300.0 + 2.5 * k]
        ds.SliceLocation = -300.0 + 2.5 * k
        ds.SliceThickness = 2.5
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored.tobytes()
        yield ds


def write_ct_series(folder: Path, shape: tuple[int, int, int] = CT_SHAPE) -> list[Path]:
    """Write :func:`ct_series` into ``folder``; file names do not follow slice order, as in real exports."""
    import numpy as np

    order = np.random.default_rng(7).permutation(shape[0])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(ct_series(shape)):
        path = folder / f"IM{order[k]:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_series_bytes(shape: tuple[int, int, int] = CT_SHAPE) -> list[bytes]:
    """:func:`ct_series` as Part-10 bytes (what a STOW or a REST upload sends)."""
    import io

    import pydicom

    out = []
    for ds in ct_series(shape):
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out
