"""RTSTRUCT rasterisation: pacsai's read_rtstruct against rt-utils on the same image series and ROIs, same process.

Usage: ``python benchmarks/rtstruct.py [--repeats 3]``

Cases:

* real data (``$PACSAI_TEST_DATA``, default ``../shared/data``): ``tcia_sts001_mr_t2_rtstruct``, the only
  full image series with a matching RTSTRUCT in the collection (40 × 384×384 oblique MR, 2 ROIs from MIM);
* a synthetic planning CT (``pacsai.synthetic``, 96 × 256×256, 7 ROIs written by pacsai), always; where the
  real data is absent it takes the headline line.

Timed, best of ``--repeats``, both from already parsed inputs: ``read_rtstruct(dataset, like=volume)`` against
``RTStruct.get_roi_mask_by_name`` for every ROI of an already built ``RTStructBuilder.create_from(...)``. The
end-to-end cost from the files (``read_series`` + ``read_rtstruct`` against ``create_from`` + the masks) goes
into the JSON too. Agreement: Dice per ROI between the two masks; rt-utils returns ``(rows, columns, slices)``
with slices sorted along the slice normal, so its masks are compared after ``moveaxis(-1, 0)`` as
``(z, y, x)``, the order of pacsai's grid. On the synthetic CT both are also compared with the generator's own
voxel masks. The two differ by convention on thin structures: pacsai takes voxels whose centre is inside the
contour, rt-utils (OpenCV ``fillPoly``) also the voxels the outline touches, so its masks are larger; a Dice
below 0.5 would mean an axis or orientation mistake, and fails the run.

Prints ``rtstruct_rasterise: R x rt-utils`` (R > 1: faster) and writes ``benchmarks/results/rtstruct.json``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import Figure, best_of, emit, load_average, note, test_data_root, write_result

SYNTHETIC_SHAPE = (96, 256, 256)
SYNTHETIC_SPACING = (1.8, 1.8, 3.0)


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    series_dir: Path
    rtstruct: Path
    truth: dict[str, np.ndarray] | None = None  # the generator's voxel masks (z, y, x), synthetic case only


def real_case(root: Path) -> Case | None:
    folder = root / "tcia_sts001_mr_t2_rtstruct"
    if not (folder / "rtstruct" / "1-1.dcm").is_file():
        return None
    return Case("tcia_sarcoma_mr", "real MR 40x384x384 (TCIA Soft-tissue-Sarcoma, oblique)", folder / "mr_t2",
                folder / "rtstruct" / "1-1.dcm")


def synthetic_case(work: Path) -> Case:
    """A synthetic planning CT and its RTSTRUCT in separate folders (rt-utils reads every image in a folder)."""
    from pacsai.imaging.dicomwrite import save
    from pacsai.synthetic import make_patient

    patient = make_patient(3, shape=SYNTHETIC_SHAPE, spacing=SYNTHETIC_SPACING, with_prior=False, with_dose=False)
    ct_dir = work / "synthetic_ct"
    ct_dir.mkdir(parents=True)
    for k, ds in enumerate(patient.ct):
        save(ds, ct_dir / f"CT_{k + 1:04d}.dcm")
    rtstruct = save(patient.rtstruct, work / "synthetic_rtstruct.dcm")
    shape = "x".join(map(str, SYNTHETIC_SHAPE))
    truth = {name: np.asarray(mask.values, dtype=bool) for name, mask in patient.masks.items()}
    return Case("synthetic_ct", f"synthetic planning CT {shape}", ct_dir, rtstruct, truth)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def measure(case: Case, repeats: int) -> dict[str, Any]:
    import pydicom
    from rt_utils import RTStructBuilder

    from pacsai.imaging import read_rtstruct, read_series

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_series(case.series_dir)
        dataset = pydicom.dcmread(case.rtstruct)
        builder = RTStructBuilder.create_from(dicom_series_path=str(case.series_dir),
                                              rt_struct_path=str(case.rtstruct))
        # ROIs with contours in both readers' view; empty ones say nothing about speed.
        ours_all = read_rtstruct(dataset, like=volume)
        names = [n for n in builder.get_roi_names() if n in ours_all and ours_all[n].values.any()]

        def ours() -> dict[str, Any]:
            return read_rtstruct(dataset, like=volume, names=names)

        def theirs() -> dict[str, np.ndarray]:
            return {n: builder.get_roi_mask_by_name(n) for n in names}

        def ours_files() -> dict[str, Any]:
            return read_rtstruct(case.rtstruct, like=read_series(case.series_dir), names=names)

        def theirs_files() -> dict[str, np.ndarray]:
            rt = RTStructBuilder.create_from(dicom_series_path=str(case.series_dir),
                                             rt_struct_path=str(case.rtstruct))
            return {n: rt.get_roi_mask_by_name(n) for n in names}

        builder.get_roi_mask_by_name(names[0])  # first-call costs out of the timing, as ours_all did for pacsai
        t_ours, cpu_ours, masks = best_of(ours, repeats)
        t_theirs, cpu_theirs, reference = best_of(theirs, repeats)
        t_ours_files, _, _ = best_of(ours_files, repeats)
        t_theirs_files, _, _ = best_of(theirs_files, repeats)
    agreement = {}
    for name in names:
        a = np.asarray(masks[name].values, dtype=bool)
        b = np.moveaxis(np.asarray(reference[name], dtype=bool), -1, 0)  # (rows, cols, slices) → (z, y, x)
        agreement[name] = {
            "dice": dice(a, b) if a.shape == b.shape else None,
            "voxels_pacsai": int(a.sum()),
            "voxels_rt_utils": int(b.sum()),
        }
        if case.truth is not None and name in case.truth:
            # Which convention lands nearer the voxels the contours were drawn from.
            agreement[name]["dice_pacsai_vs_truth"] = dice(a, case.truth[name])
            agreement[name]["dice_rt_utils_vs_truth"] = dice(b, case.truth[name])
    return {
        "label": case.label,
        "grid": list(volume.shape),
        "rois": names,
        "seconds": {"read_rtstruct": t_ours, "rt_utils_masks": t_theirs, "pacsai_from_files": t_ours_files,
                    "rt_utils_from_files": t_theirs_files},
        "cpu_seconds": {"read_rtstruct": cpu_ours, "rt_utils_masks": cpu_theirs},
        "ratio": t_theirs / t_ours,
        "ratio_from_files": t_theirs_files / t_ours_files,
        "agreement": agreement,
        "min_dice": min((v["dice"] for v in agreement.values() if v["dice"] is not None), default=None),
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught}),
    }


def figure(name: str, result: dict[str, Any]) -> Figure:
    s = result["seconds"]
    rows = result["agreement"].values()
    truth = ""
    if rows and all("dice_pacsai_vs_truth" in r for r in rows):
        ours = min(r["dice_pacsai_vs_truth"] for r in rows)
        theirs = min(r["dice_rt_utils_vs_truth"] for r in rows)
        truth = f"; min Dice vs the generator's voxels: pacsai {ours:.3f}, rt-utils {theirs:.3f}"
    return Figure(
        name,
        result["ratio"],
        "rt-utils",
        f"{result['label']}, {len(result['rois'])} ROIs: {s['read_rtstruct'] * 1000:.0f} ms vs "
        f"{s['rt_utils_masks'] * 1000:.0f} ms; from the files {result['ratio_from_files']:.2f} x; "
        f"Dice between them {result['min_dice']:.2f}-{max(r['dice'] for r in rows):.3f}{truth}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load = load_average()
    try:
        import rt_utils  # noqa: F401 - the baseline
    except ImportError as err:
        fig = emit(Figure("rtstruct_rasterise", None, "rt-utils", f"rt-utils not installed: {err}; "
                          "pip install rt-utils (the test extra)"))
        write_result("rtstruct", [fig], {}, started_load=load)
        return 0

    work = Path(tempfile.mkdtemp(prefix="pacsai-bench-"))
    try:
        root = test_data_root()
        real = real_case(root) if root is not None else None
        if real is None:
            note("real data not found (PACSAI_TEST_DATA, default ../shared/data): synthetic CT only")
        cases = {"synthetic_ct": synthetic_case(work)}
        if real is not None:
            cases = {real.key: real, **cases}
        results = {key: measure(case, args.repeats) for key, case in cases.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = []
    for key, result in results.items():
        name = "rtstruct_rasterise" if key == next(iter(results)) else f"rtstruct_rasterise_{key}"
        figures.append(emit(figure(name, result)))
    path = write_result("rtstruct", figures, {"repeats": args.repeats, "cases": results}, started_load=load)
    note(f"wrote {path}")
    worst = min((r["min_dice"] for r in results.values() if r["min_dice"] is not None), default=0.0)
    return 0 if worst >= 0.5 else 1  # masks that disagree this much make the speed meaningless


if __name__ == "__main__":
    raise SystemExit(main())
