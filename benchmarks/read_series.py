"""read_series against SimpleITK's ImageSeriesReader on one 100×512×512 CT series, same run; and its peak memory.

Usage: ``python benchmarks/read_series.py [--folder DIR] [--repeats 3]``

Without ``--folder`` the deterministic CT series of ``common.ct_series`` (int16 stored values, RescaleIntercept
−1024, Explicit VR Little Endian, shuffled file names) is written to a temporary folder. Both readers are timed
from the folder path, best of ``--repeats``: SimpleITK as ``GetGDCMSeriesFileNames`` (which sorts the files by
position) + ``Execute``, because ``read_series`` also finds and sorts the files itself; SimpleITK's ``Execute``
alone goes into the JSON as well. The voxels must be identical.

Peak memory: ``read_series`` in a fresh interpreter (``common.peak_rss_of_call``), net of the interpreter and
its imports, as a multiple of the volume's in-memory size.

Prints ``read_series: R x sitk_ImageSeriesReader`` and ``read_series_peak_memory: R x volume_bytes`` and writes
``benchmarks/results/read_series.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    CT_SHAPE,
    Figure,
    best_of,
    emit,
    load_average,
    mib,
    note,
    peak_rss_of_call,
    write_ct_series,
    write_result,
)


def run(folder: Path, repeats: int) -> dict[str, Any]:
    """Time both readers on ``folder`` and check the voxels are identical."""
    import SimpleITK as sitk

    from pacsai.imaging import read_series

    # Both sides return an image in memory; the array conversion is left out of SimpleITK's time.
    def sitk_full() -> sitk.Image:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        return reader.Execute()

    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))

    def sitk_execute() -> sitk.Image:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        return reader.Execute()

    def ours() -> Any:
        return read_series(folder)

    ours()  # warm the page cache and imports for both readers alike
    sitk_full()
    t_ours, cpu_ours, volume = best_of(ours, repeats)
    t_sitk, cpu_sitk, image = best_of(sitk_full, repeats)
    t_exec, _, _ = best_of(sitk_execute, repeats)
    reference = sitk.GetArrayFromImage(image)
    identical = volume.shape == reference.shape and bool(np.array_equal(volume.values, reference))
    return {
        "shape": list(volume.shape),
        "dtype": str(volume.dtype),
        "volume_bytes": int(volume.nbytes),
        "files": len(names),
        "repeats": repeats,
        "seconds": {"read_series": t_ours, "sitk_names_plus_execute": t_sitk, "sitk_execute_only": t_exec},
        "cpu_seconds": {"read_series": cpu_ours, "sitk_names_plus_execute": cpu_sitk},
        "ratio_vs_execute_only": t_exec / t_ours,
        "identical_voxels": identical,
    }


def memory(folder: Path) -> dict[str, Any]:
    """Peak RSS of one ``read_series`` in a fresh interpreter, net of the interpreter and its imports."""
    return peak_rss_of_call(
        "from pacsai.imaging import read_series\nimport SimpleITK, xarray, pydicom",
        f"read_series({str(folder)!r})",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an existing single-series folder (default: generate one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load = load_average()
    with tempfile.TemporaryDirectory(prefix="pacsai-bench-") as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp)
            write_ct_series(folder, CT_SHAPE)
        result = run(folder, args.repeats)
        mem = memory(folder)
    s = result["seconds"]
    speed = emit(Figure(
        "read_series",
        s["sitk_names_plus_execute"] / s["read_series"],
        "sitk_ImageSeriesReader",
        f"{s['read_series'] * 1000:.0f} ms vs {s['sitk_names_plus_execute'] * 1000:.0f} ms names+Execute; "
        f"{'x'.join(map(str, result['shape']))} {result['dtype']}, identical voxels: {result['identical_voxels']}",
    ))
    volume_bytes = mem["result_nbytes"] or result["volume_bytes"]
    peak = emit(Figure(
        "read_series_peak_memory",
        mem["net_bytes"] / volume_bytes,
        "volume_bytes",
        f"{mib(mem['net_bytes']):.0f} MiB above the interpreter+imports ({mib(mem['baseline_bytes']):.0f} MiB) "
        f"for a {mib(volume_bytes):.0f} MiB volume; VmHWM in a fresh process",
    ))
    path = write_result("read_series", [speed, peak], {**result, "memory": mem}, started_load=load)
    note(f"wrote {path}")
    return 0 if result["identical_voxels"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
