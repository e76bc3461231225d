"""read_series speed against SimpleITK's ImageSeriesReader on the same 100×512×512 CT series, same run.

Usage: ``python benchmarks/read_series.py [--folder DIR] [--repeats 3]``

Without ``--folder`` a deterministic CT series (int16 stored values, RescaleIntercept −1024, Explicit VR Little
Endian, shuffled file names) is written to a temporary folder with pydicom. Both readers are timed from the
folder path, best of ``--repeats``: SimpleITK as ``GetGDCMSeriesFileNames`` (which sorts the files by position)
+ ``Execute``, because ``read_series`` also finds and sorts the files itself; SimpleITK's ``Execute`` alone is
reported as well. The voxels must be identical. Prints ``read_series: R x sitk_ImageSeriesReader`` and writes
``benchmarks/results/read_series.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacsai.uids import derive_uid

RESULTS = Path(__file__).resolve().parent / "results" / "read_series.json"
SHAPE = (100, 512, 512)


def write_ct_series(folder: Path, *, shape: tuple[int, int, int] = SHAPE) -> None:
    """Write a deterministic CT series (a water cylinder with bone and noise) of ``shape`` slices into ``folder``."""
    nz, ny, nx = shape
    rng = np.random.default_rng(20261128)
    yy, xx = np.mgrid[:ny, :nx]
    body = ((xx - nx / 2) / (0.42 * nx)) ** 2 + ((yy - ny / 2) / (0.35 * ny)) ** 2 <= 1
    bone = ((xx - nx / 2) / (0.05 * nx)) ** 2 + ((yy - 0.7 * ny) / (0.05 * ny)) ** 2 <= 1
    study = derive_uid("benchmark-read-series", "study")
    series = derive_uid("benchmark-read-series", "series")
    frame = derive_uid("benchmark-read-series", "frame-of-reference")
    order = rng.permutation(nz)  # file names do not follow slice order, as in real exports
    for k in range(nz):
        hu = np.full((ny, nx), -1000.0)
        hu[body] = 40.0
        hu[bone] = 700.0 + 5 * k
        hu += rng.normal(0, 12, size=(ny, nx))
        stored = np.clip(np.round(hu + 1024), -32768, 32767).astype(np.int16)
        sop = derive_uid("benchmark-read-series", "instance", k)
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
        ds.PatientName = "BENCH^CT"
        ds.PatientID = "BENCH001"
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
        ds.save_as(folder / f"IM{order[k]:05d}.dcm", enforce_file_format=True)


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    import SimpleITK as sitk

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "simpleitk": sitk.Version_VersionString(),
    }


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

    ours = lambda: read_series(folder)
    ours()  # warm the page cache and imports for both readers alike
    sitk_full()
    t_ours, volume = best_of(ours, repeats)
    t_sitk, image = best_of(sitk_full, repeats)
    t_exec, _ = best_of(sitk_execute, repeats)
    reference = sitk.GetArrayFromImage(image)
    identical = volume.shape == reference.shape and bool(np.array_equal(volume.values, reference))
    return {
        "shape": list(volume.shape),
        "files": len(names),
        "repeats": repeats,
        "read_series_s": round(t_ours, 4),
        "sitk_names_plus_execute_s": round(t_sitk, 4),
        "sitk_execute_only_s": round(t_exec, 4),
        "ratio": round(t_sitk / t_ours, 3),
        "ratio_vs_execute_only": round(t_exec / t_ours, 3),
        "identical_voxels": identical,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folder", type=Path, help="an existing single-series folder (default: generate one)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacsai-bench-") as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp)
            write_ct_series(folder)
        result = run(folder, args.repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"read_series: {result['ratio']:.2f} x sitk_ImageSeriesReader "
        f"({result['read_series_s'] * 1000:.0f} ms vs {result['sitk_names_plus_execute_s'] * 1000:.0f} ms "
        f"names+Execute; {result['ratio_vs_execute_only']:.2f} x Execute alone) on {result['shape']}, "
        f"identical voxels: {result['identical_voxels']}"
    )
    return 0 if result["identical_voxels"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
