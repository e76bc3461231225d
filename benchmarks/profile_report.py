"""Per-stage profile of one report's imaging work: which stage costs what, so a regression shows where it moved.

Usage: ``python benchmarks/profile_report.py [--folder DIR] [--repeats 1] [--no-kernel] [--baseline-ref REF]``

``--baseline-ref`` also runs the stages (no kernel) with the ``pacsai`` package of an earlier commit, in a child
process of the same run on the same files, and records its seconds next to each stage (``baseline_seconds``):
a before/after under the same load, which is what a shared machine allows.

Without ``--folder`` a synthetic patient (``pacsai.synthetic``, 96×256×256 CT, RTSTRUCT, RT Dose) is written to a
temporary folder. The stages are the ones a report runs with structures from the PACS (warm cache: files on
disk), each timed in this process after its imports: best of ``--repeats`` (``seconds``) and the first call
(``first_call_seconds``, what a report pays: it calls each stage once):

* ``xarray_first_dataarray``: the one-off cost of xarray's first array in a process (it imports dask.array);
* ``read_series`` (volume build) and, in the same run, SimpleITK's ``ImageSeriesReader`` (the ratio);
* ``read_rtstruct`` (rasterisation of every ROI onto the CT grid);
* ``read_dose`` + ``resample`` onto the CT grid, ``dvh`` of every structure (the summary's main cost);
* ``write_seg`` and ``write_rtstruct`` from the masks (the DICOM outputs) and their serialisation;
* ``kernel_start``: an empty notebook through ``pacsai.notebooks.execute`` (the floor of the HTML stage).

Inference is not profiled here: the report hands the kernel masks either way, and a model stage needs a
registered model (``benchmarks/report.py`` and ``pacsai demo`` time it end to end).

Each stage also records the process's peak RSS growth (VmHWM reset before the stage, where the kernel allows
it). Prints ``# stage seconds`` lines and the figure ``read_series_in_report: R x sitk_ImageSeriesReader``;
writes ``benchmarks/results/profile_report.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, Figure, emit, load_average, mib, note, write_result


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def stage(name: str, call: Callable[[], Any], repeats: int, table: list[dict[str, Any]]) -> Any:
    """Time ``call`` best of ``repeats``; record seconds and peak RSS growth; return its last result."""
    best, result, grew, first = float("inf"), None, None, None
    for _ in range(repeats):
        result = None
        resettable = _reset_peak()
        before = _rss_bytes()
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
        first = seconds if first is None else first
        if resettable:
            grew = max(0, _peak_bytes() - before)
        best = min(best, seconds)
    # A report calls each stage once: the first call (library set-up, e.g. highdicom loading the standard) is
    # what it pays; the best of the repeats is the stage's own work.
    table.append({"stage": name, "seconds": best, "first_call_seconds": first,
                  "peak_rss_growth_mib": None if grew is None else mib(grew)})
    note(f"{name:<24} {best:8.3f} s (first call {first:.3f} s)"
         + ("" if grew is None else f"   peak +{mib(grew):.0f} MiB"))
    return result


def synthetic_folder(root: Path) -> Path:
    # In a child process, so that this one starts the stages as a report's kernel does (nothing imported or
    # warmed by the generator).
    code = ("import sys; from pacsai.synthetic import make_patient, write_patient; "
            "write_patient(make_patient(1, with_prior=False, with_dose=True), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)
    return next(p for p in root.rglob("RTSTRUCT.dcm")).parent


def kernel_start(work: Path) -> None:
    import nbformat

    from pacsai import notebooks

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("")])
    notebook.metadata["kernelspec"] = {"name": notebooks.KERNEL, "display_name": notebooks.KERNEL,
                                       "language": "python"}
    template = work / "empty.ipynb"
    nbformat.write(notebook, template)
    notebooks.execute(template, work / "empty.out.ipynb", {}, cwd=work)


def profile(folder: Path, repeats: int, with_kernel: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import numpy as np
    import pydicom
    import SimpleITK as sitk

    from pacsai.imaging import read_dose, read_rtstruct, read_series, resample, write_rtstruct, write_seg
    from pacsai.planning.dvh import dvh

    cts = sorted(p for p in folder.glob("*.dcm") if p.name.startswith("CT"))
    table: list[dict[str, Any]] = []

    series_uid = str(pydicom.dcmread(cts[0], stop_before_pixels=True).SeriesInstanceUID)

    def sitk_read() -> Any:
        # GDCM finds and sorts the CT series' files itself, as read_series does (the folder also holds RT files).
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
        return reader.Execute()

    # xarray imports dask.array (when installed) on the first DataArray a process builds: ~1-2 s every report
    # kernel pays once. Its own row, so that read_series is not charged with it.
    import xarray as xr

    stage("xarray_first_dataarray", lambda: xr.DataArray(np.zeros(1)), 1, table)
    # sitk first: the page cache is then warm for both (a report's cache is warm too).
    image = stage("sitk_ImageSeriesReader", sitk_read, repeats, table)
    ct = stage("read_series", lambda: read_series(cts), repeats, table)
    assert np.array_equal(sitk.GetArrayFromImage(image).astype(np.float32), ct.values.astype(np.float32))
    masks = stage("read_rtstruct", lambda: read_rtstruct(folder / "RTSTRUCT.dcm", like=ct), repeats, table)
    masks = {name: m for name, m in masks.items() if bool(m.values.any())}
    dose = stage("read_dose+resample", lambda: resample(read_dose(folder / "RTDOSE.dcm"), like=ct), repeats, table)
    stage("dvh_all_structures", lambda: [dvh(dose, m, name=n) for n, m in masks.items()], repeats, table)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in cts]
    seg = stage("write_seg", lambda: write_seg(masks, source=headers, segment_type="BINARY"), repeats, table)
    rts = stage("write_rtstruct", lambda: write_rtstruct(masks, source=headers), repeats, table)

    def serialise() -> int:
        total = 0
        for ds in (seg, rts):
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            total += buffer.tell()
        return total

    out_bytes = stage("serialise_seg+rtstruct", serialise, repeats, table)
    if with_kernel:
        with tempfile.TemporaryDirectory(prefix="pacsai-profile-kernel-") as work:
            stage("kernel_start", lambda: kernel_start(Path(work)), repeats, table)
    info = {
        "ct_shape": list(ct.shape),
        "ct_bytes": int(ct.values.nbytes),
        "structures": sorted(masks),
        "dicom_output_bytes": out_bytes,
        "seg_frames": int(getattr(seg, "NumberOfFrames", 0)),
    }
    return table, info


def baseline_table(ref: str, folder: Path, repeats: int) -> list[dict[str, Any]]:
    """The same stages (no kernel) with the ``pacsai`` package of git ``ref``, in a child process of this run."""
    with tempfile.TemporaryDirectory(prefix="pacsai-profile-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "pacsai"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = Path(tmp) / "table.json"
        # cwd and PYTHONPATH outside the repo, so that `import pacsai` finds the archived package first.
        env = {**os.environ, "PYTHONPATH": tmp}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--folder", str(folder), "--repeats",
                        str(repeats), "--no-kernel", "--table-only", str(out)], cwd=tmp, env=env, check=True)
        table: list[dict[str, Any]] = json.loads(out.read_text())
        return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--folder", type=Path, help="a folder with CT_*.dcm, RTSTRUCT.dcm and RTDOSE.dcm")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-kernel", action="store_true", help="leave out the kernel start")
    parser.add_argument("--baseline-ref", help="also profile the pacsai package of this git ref (same run)")
    parser.add_argument("--table-only", type=Path, help=argparse.SUPPRESS)  # the baseline child's output
    args = parser.parse_args(argv)
    started = load_average()
    repeats = max(1, args.repeats)
    baseline: list[dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(prefix="pacsai-profile-") as tmp:
        folder = args.folder or synthetic_folder(Path(tmp))
        if args.table_only:
            table, _ = profile(folder, repeats, False)
            args.table_only.write_text(json.dumps(table))
            return 0
        if args.baseline_ref:
            note(f"baseline: pacsai at {args.baseline_ref}")
            baseline = baseline_table(args.baseline_ref, folder, repeats)
            note("this tree:")
        table, info = profile(folder, repeats, not args.no_kernel)
    seconds = {row["stage"]: row["seconds"] for row in table}
    if baseline is not None:
        before = {row["stage"]: row["seconds"] for row in baseline}
        for row in table:
            row["baseline_seconds"] = before.get(row["stage"])
        info["baseline_ref"] = args.baseline_ref
    ratio = seconds["sitk_ImageSeriesReader"] / seconds["read_series"]
    figures = [
        emit(Figure("read_series_in_report", ratio, "sitk_ImageSeriesReader",
                    f"{info['ct_shape']} CT of one report: {seconds['read_series'] * 1000:.0f} ms vs "
                    f"{seconds['sitk_ImageSeriesReader'] * 1000:.0f} ms; SEG {seconds['write_seg']:.2f} s, "
                    f"RTSTRUCT {seconds['write_rtstruct']:.2f} s")),
    ]
    if baseline is not None:
        common = [row for row in table
                  if row.get("baseline_seconds") is not None and row["stage"] != "sitk_ImageSeriesReader"]
        ours = sum(row["seconds"] for row in common)
        theirs = sum(row["baseline_seconds"] for row in common)
        token = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(args.baseline_ref))
        figures.append(emit(Figure(
            "report_imaging_stages", theirs / ours, f"pacsai_{token}",
            f"sum of {len(common)} stages: {ours:.2f} s vs {theirs:.2f} s; write_rtstruct "
            f"{seconds['write_rtstruct']:.2f} vs {before['write_rtstruct']:.2f} s, write_seg "
            f"{seconds['write_seg']:.2f} vs {before['write_seg']:.2f} s")))
    write_result("profile_report", figures, {"stages": table, **info}, started_load=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
