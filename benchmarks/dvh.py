"""DVHs of a real plan: pacsai.planning.dvh against dicompyler-core's ``dvhcalc.get_dvh``, same process.

Usage: ``python benchmarks/dvh.py [--repeats 2]``

Data: ``dicompyler_breast_rt`` under ``$PACSAI_TEST_DATA`` (default ``../shared/data``): RTSTRUCT + RTDOSE
(194×129×98, 2.5 mm) of a breast plan, whose RTDOSE also carries the TPS's own DVHs. Every ROI with contours
(9 of 10) is computed, from the files, best of ``--repeats``:

* pacsai: ``read_dose`` + ``read_rtstruct`` onto the dose grid refined 2× in-plane (1.25 mm; the contours lie
  on the 3 mm CT slices, which coincide with the dose frames) + ``dvh`` per ROI (default method: trilinear dose,
  surface voxels sub-sampled 2×2×2), as tests/test_planning_dvh.py does;
* dicompyler-core: ``get_dvh(rtss, rtdose, roi)`` per ROI with its defaults (dose-grid resolution, no
  interpolation), which reads both files each time, as its API is used.

dicompyler-core 0.5.6 imports ``pydicom.dicomio.read_file``, which pydicom 3 removed (pacsai needs pydicom 3).
That import is the only incompatibility met on this data: the benchmark aliases ``read_file`` to
``pydicom.dcmread`` in its own process before importing dicompyler-core, and checks that dicompyler-core's
results still match the TPS's DVHs (``tps_check`` in the JSON) so a silent misreading would show.

Agreement (JSON): Dmean and D95 of pacsai against dicompyler-core and against the TPS (Dmean only: the TPS
stores no D95), in Gy. Prints ``dvh: R x dicompyler-core`` (R > 1: faster) and writes
``benchmarks/results/dvh.json``; prints ``dvh: skipped (why)`` when dicompyler-core or the data is missing.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from common import Figure, best_of, emit, load_average, note, test_data_root, write_result

PRESCRIPTION_GY = 14.0  # the plan's DoseReference; the TPS's DVH statistics are in % of it (SOURCES.md)


def import_dicompyler() -> Any:
    """dicompylercore.dvhcalc under pydicom 3: alias the one removed function it imports (see module doc)."""
    import pydicom
    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):
        pydicom.dicomio.read_file = pydicom.dcmread  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pydicom.pixel_data_handlers, still in pydicom 3
        from dicompylercore import dvhcalc
    return dvhcalc


def tps_statistics(rtdose: Path, rois: dict[int, str]) -> dict[str, dict[str, float]]:
    """The TPS's DVH statistics from the RTDOSE's DVHSequence, in Gy (stored as % of the prescription)."""
    import pydicom

    header = pydicom.dcmread(rtdose, stop_before_pixels=True)
    return {
        rois[int(item.DVHReferencedROISequence[0].ReferencedROINumber)]: {
            "mean_gy": float(item.DVHMeanDose) / 100 * PRESCRIPTION_GY,
            "max_gy": float(item.DVHMaximumDose) / 100 * PRESCRIPTION_GY,
            "volume_cc": float(item.DVHData[1]),
        }
        for item in header.get("DVHSequence", [])
    }


def pacsai_dvhs(folder: Path, names: list[str]) -> dict[str, Any]:
    from pacsai.errors import PacsaiWarning
    from pacsai.imaging import read_dose, read_rtstruct
    from pacsai.imaging.geometry import refined_grid
    from pacsai.planning.dvh import dvh

    dose = read_dose(folder / "rtdose.dcm")
    template = refined_grid(dose)  # 2x2 structure samples per dose cell, as in tests/test_planning_dvh.py
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PacsaiWarning)  # BODY reaches past the dose grid: 0 Gy there, as stated
        masks = read_rtstruct(folder / "rtss.dcm", like=template, names=names)
        return {name: dvh(dose, masks[name]) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    load = load_average()

    root = test_data_root()
    folder = root / "dicompyler_breast_rt" if root is not None else None
    reason = None
    if folder is None or not (folder / "rtdose.dcm").is_file():
        reason = "real data not found: set PACSAI_TEST_DATA to the shared/data folder"
    else:
        try:
            dvhcalc = import_dicompyler()
        except ImportError as err:
            reason = f"dicompyler-core cannot be imported ({err}); pip install dicompyler-core (the test extra)"
    if reason is not None:
        fig = emit(Figure("dvh", None, "dicompyler-core", reason))
        write_result("dvh", [fig], {}, started_load=load)
        return 0
    assert folder is not None

    import pydicom

    structure_set = pydicom.dcmread(folder / "rtss.dcm", stop_before_pixels=True)
    rois = {int(r.ROINumber): str(r.ROIName) for r in structure_set.StructureSetROISequence}
    contoured = {int(c.ReferencedROINumber) for c in structure_set.ROIContourSequence
                 if len(c.get("ContourSequence", []))}
    numbers = {rois[n]: n for n in sorted(contoured)}
    names = list(numbers)
    rtss, rtdose = str(folder / "rtss.dcm"), str(folder / "rtdose.dcm")

    def theirs() -> dict[str, Any]:
        return {name: dvhcalc.get_dvh(rtss, rtdose, numbers[name]) for name in names}

    def ours() -> dict[str, Any]:
        return pacsai_dvhs(folder, names)

    # Warm imports and the page cache for both on the smallest structure, outside the timings.
    pacsai_dvhs(folder, ["Nodes"] if "Nodes" in names else names[:1])
    dvhcalc.get_dvh(rtss, rtdose, numbers[names[-1]])
    t_ours, cpu_ours, mine = best_of(ours, args.repeats)
    t_theirs, cpu_theirs, reference = best_of(theirs, args.repeats)

    tps = tps_statistics(folder / "rtdose.dcm", rois)
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        h, r = mine[name], reference[name]
        row = {
            "pacsai": {"mean_gy": h.mean, "d95_gy": h.d(95), "max_gy": h.max, "volume_cc": h.volume_cc},
            "dicompyler_core": {"mean_gy": float(r.mean), "d95_gy": float(r.statistic("D95").value),
                                "max_gy": float(r.max), "volume_cc": float(r.volume)},
        }
        row["dmean_diff_gy"] = row["pacsai"]["mean_gy"] - row["dicompyler_core"]["mean_gy"]
        row["d95_diff_gy"] = row["pacsai"]["d95_gy"] - row["dicompyler_core"]["d95_gy"]
        if name in tps:
            row["tps"] = tps[name]
            row["dmean_diff_vs_tps_gy"] = {
                "pacsai": row["pacsai"]["mean_gy"] - tps[name]["mean_gy"],
                "dicompyler_core": row["dicompyler_core"]["mean_gy"] - tps[name]["mean_gy"],
            }
        rows[name] = row
    worst_roi = max(rows, key=lambda n: abs(rows[n]["dmean_diff_gy"]))
    worst_mean = abs(rows[worst_roi]["dmean_diff_gy"])
    worst_d95 = max(abs(r["d95_diff_gy"]) for r in rows.values())
    tps_rows = [r["dmean_diff_vs_tps_gy"] for r in rows.values() if "dmean_diff_vs_tps_gy" in r]
    tps_check = {
        "max_abs_dmean_diff_gy_pacsai": max((abs(d["pacsai"]) for d in tps_rows), default=None),
        "max_abs_dmean_diff_gy_dicompyler_core": max((abs(d["dicompyler_core"]) for d in tps_rows), default=None),
    }
    fig = emit(Figure(
        "dvh",
        t_theirs / t_ours,
        "dicompyler-core",
        f"{len(names)} ROIs of a breast plan (RTDOSE 194x129x98) from the files: "
        f"{t_ours:.2f} s vs {t_theirs:.2f} s; "
        f"|ΔDmean| ≤ {worst_mean:.3f} Gy ({worst_roi}, {rows[worst_roi]['pacsai']['volume_cc']:.1f} cm³), "
        f"|ΔD95| ≤ {worst_d95:.3f} Gy of {PRESCRIPTION_GY:g} Gy; "
        f"Dmean vs TPS ≤ {tps_check['max_abs_dmean_diff_gy_pacsai']:.3f} Gy "
        f"(dicompyler-core {tps_check['max_abs_dmean_diff_gy_dicompyler_core']:.3f})",
    ))
    path = write_result(
        "dvh",
        [fig],
        {
            "repeats": args.repeats,
            "rois": names,
            "seconds": {"pacsai": t_ours, "dicompyler_core": t_theirs},
            "cpu_seconds": {"pacsai": cpu_ours, "dicompyler_core": cpu_theirs},
            "methods": {
                "pacsai": "masks on the dose grid refined 2x in-plane; " + next(iter(mine.values())).method,
                "dicompyler_core": "get_dvh defaults: dose-grid planes, no interpolation; "
                                   "pydicom.dicomio.read_file aliased to pydicom.dcmread (pydicom 3)",
            },
            "agreement": rows,
            "max_abs_dmean_diff_gy": worst_mean,
            "max_abs_d95_diff_gy": worst_d95,
            "tps_check": tps_check,
        },
        started_load=load,
    )
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
