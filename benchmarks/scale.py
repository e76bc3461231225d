"""Scale curve: time and peak memory per stage for synthetic CTs of three sizes, up to 400×512×512.

Usage: ``python benchmarks/scale.py [--sizes 100x256x256 200x384x384 400x512x512] [--model-store mlruns/mlflow.db]
[--no-report]``; not part of ``make bench`` (the 400-slice patient alone takes minutes on 2 cores). Writes
``benchmarks/results/scale.json``.

Each size is a synthetic patient (``pacsai.synthetic.make_patient``: CT, RTSTRUCT, plan and dose, no prior) over
the same field of view (410 mm in-plane, 300 mm along z), so the finer grids hold the same anatomy at a finer
spacing. It is stored in a temporary embedded store, and each stage then runs in its own child process (this
script with ``--child``), timed after its imports, its process tree's resident set polled by
``common.TreePeak`` (psutil, every 50 ms, RSS summed over the process and its descendants):

* ``read``: ``retrieve_series`` of the CT (warm cache) and ``read_series``;
* ``model``: ``segment`` of that volume with test-time-augmentation uncertainty, as a report does, with the demo's
  model ``models:/pacsai-thorax@champion`` (``--model-store``; the stage says ``skipped`` without it);
* ``report``: ``run_report`` with the model's structures (HTML; PDF where Chromium exists), or with the PACS's
  structures where there is no model. Its peak is the tree without Chromium (papermill and the kernel).

Figures, all at the largest size (a stage that failed there, by memory, time or an error, is recorded by name in
``failed`` and its figures say ``skipped``):

* ``scale_time_per_voxel_<stage>: R x smallest_size``: seconds per voxel at the largest size over seconds per
  voxel at the smallest (R ≤ 1: time grows at most linearly with voxels);
* ``scale_peak_memory_<stage>: R x volume_bytes``: the stage's tree peak over the CT volume's bytes (int16 HU
  as ``read_series`` returns it); the JSON holds the same ratio at every size, so growth shows there too, and
  whether the report's tree stayed ≤ 4 GiB (the issue's aim for 400×512×512).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from common import Figure, TreePeak, emit, load_average, mib, note, write_result
from report import DEMO_STORE, MODEL_ALIAS, MODEL_NAME, demo_model

SIZES = ((100, 256, 256), (200, 384, 384), (400, 512, 512))
FOV_MM = (410.0, 410.0, 300.0)  # x, y, z: the same thorax at every size
SEED = 131
STAGE_TIMEOUT_S = 900
AIM_PEAK_BYTES = 4 * 2**30


# ------------------------------------------------------------------------------------------- child side
def _child(kind: str, args: list[str]) -> dict[str, Any]:
    """Run one stage for one patient (in a fresh process) and return what it timed."""
    from pacsai.imaging import read_series
    from pacsai.pacs import connect

    url, patient_id = os.environ["PACSAI_PACS_URL"], args[0]
    pacs = connect(url)
    series = pacs.search_series(PatientID=patient_id, Modality="CT")
    study_uid, series_uid = str(series.StudyInstanceUID.iloc[0]), str(series.SeriesInstanceUID.iloc[0])
    if kind == "read":
        start = time.perf_counter()
        volume = read_series(pacs.retrieve_series(study_uid, series_uid, progress=False))
        return {"seconds": time.perf_counter() - start, "shape": list(volume.shape), "volume_bytes": volume.nbytes}
    if kind == "model":
        from pacsai.learning.infer import load_model, segment

        volume = read_series(pacs.retrieve_series(study_uid, series_uid, progress=False))
        loaded = load_model(args[1])
        start = time.perf_counter()
        masks, _ = cast("tuple[dict[str, Any], dict[str, Any]]",
                        segment(volume, model=loaded, return_uncertainty=True))
        return {"seconds": time.perf_counter() - start,
                "voxels_inside": {name: int(mask.sum()) for name, mask in masks.items()}}
    if kind == "report":
        from pacsai.report.params import validate_parameters
        from pacsai.report.run import run_report

        model_uri = args[2] if len(args) > 2 else None
        params = validate_parameters(patient_id=patient_id, pacs_url=url,
                                     structures_from="model" if model_uri else "pacs",
                                     **({"model_uri": model_uri} if model_uri else {}))
        start = time.perf_counter()
        result = run_report(params, out_dir=Path(args[1]), push=False, track=False)
        return {"seconds": time.perf_counter() - start, "pdf": result.pdf is not None}
    raise SystemExit(f"unknown child step {kind!r}")


# ------------------------------------------------------------------------------------------- parent side
def run_stage(work: Path, env: dict[str, str], kind: str, *args: str) -> dict[str, Any]:
    """One stage in a child process: its result plus the tree's peak RSS; ``{"failed": why}`` if it did not end."""
    log = work / f"{kind}-{args[0]}.log"
    timed_out = False
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", kind, *args], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        with TreePeak(proc.pid, without=("chrom",)) as peak:
            try:
                out, _ = proc.communicate(timeout=STAGE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # its own session: the kernel and Chromium go too
                proc.communicate()
                out, timed_out = "", True
    measured = {"peak_tree_bytes": peak.bytes, "peak_tree_bytes_without_chromium": peak.bytes_without,
                "peak_by_process": dict(sorted(peak.by_name.items(), key=lambda kv: -kv[1])[:5])}
    if proc.returncode != 0:
        tail = log.read_text()[-800:].strip()
        # a kill by the kernel's OOM killer also shows as -9: the log and the peak say which
        why = f"ran over {STAGE_TIMEOUT_S} s" if timed_out else f"exit {proc.returncode}: {tail}"
        return {"failed": why, **measured}
    return {**json.loads(out.strip().splitlines()[-1]), **measured}


def seed(work: Path, url: str, shape: tuple[int, int, int]) -> tuple[str, float]:
    """Make and store the synthetic patient of ``shape``; returns its ID and the seconds it took to make."""
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    spacing = (FOV_MM[0] / shape[2], FOV_MM[1] / shape[1], FOV_MM[2] / shape[0])
    start = time.perf_counter()
    patient = make_patient(SEED, shape=shape, spacing=spacing, with_prior=False)
    seconds = time.perf_counter() - start
    pacs = connect(url, cache_dir=work / "cache")
    summary = pacs.store(list(patient.datasets()), progress=False)
    if not summary.ok:
        raise RuntimeError(f"seeding the embedded store in {work} failed: {summary}")
    for study_uid in set(pacs.search_studies(PatientID=patient.patient_id).StudyInstanceUID):
        pacs.retrieve_study(str(study_uid), progress=False)  # warm cache: cold retrieval is retrieve.py's
    return patient.patient_id, seconds


def measure_size(shape: tuple[int, int, int], model_uri: str | None, store: str | None,
                 with_report: bool) -> dict[str, Any]:
    """Every stage for one size, in a temporary store of its own (removed afterwards)."""
    work = Path(tempfile.mkdtemp(prefix="pacsai-bench-scale-"))
    url = f"file://{work / 'pacs'}"
    env = {**os.environ, "PACSAI_PACS_URL": url, "PACSAI_CACHE_DIR": str(work / "cache"),
           "PACSAI_MLFLOW_URI": store or f"sqlite:///{work / 'mlflow.db'}", "MLFLOW_ENABLE_TELEMETRY": "false",
           "DO_NOT_TRACK": "1", "TQDM_DISABLE": "1"}
    label = "x".join(map(str, shape))
    try:
        patient_id, make_s = seed(work, url, shape)
        stages: dict[str, Any] = {"read": run_stage(work, env, "read", patient_id)}
        note(f"{label}: read {stages['read'].get('seconds', stages['read'].get('failed'))}")
        if model_uri:
            stages["model"] = run_stage(work, env, "model", patient_id, model_uri)
            note(f"{label}: model {stages['model'].get('seconds', stages['model'].get('failed'))}")
        if with_report:
            stages["report"] = run_stage(work, env, "report", patient_id, str(work / "report"),
                                         *([model_uri] if model_uri else []))
            note(f"{label}: report {stages['report'].get('seconds', stages['report'].get('failed'))}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    voxels = shape[0] * shape[1] * shape[2]
    return {"shape": list(shape), "voxels": voxels, "volume_bytes": 2 * voxels, "make_patient_seconds": make_s,
            "stages": stages}


def peak_of(stage: dict[str, Any]) -> int:
    """A stage's tree peak without Chromium (the PDF printer's pages are mostly shared)."""
    return int(stage["peak_tree_bytes_without_chromium"])


def marginal(small: dict[str, Any], large: dict[str, Any], stage: str) -> float:
    """Peak bytes the stage added from the smallest to the largest size, per CT volume byte added.

    The fixed part (interpreter, torch, an idle kernel) cancels, so this is the stage's memory per voxel as the
    CT grows: bounded by a constant when memory grows at most linearly.
    """
    added = large["volume_bytes"] - small["volume_bytes"]
    return (peak_of(large["stages"][stage]) - peak_of(small["stages"][stage])) / added if added else 0.0


def figures_for(sizes: list[dict[str, Any]]) -> tuple[list[Figure], list[str]]:
    """The per-stage figures at the largest size against the smallest, and the stages that failed."""
    small, large = sizes[0], sizes[-1]
    label = "x".join(map(str, large["shape"]))
    figures, failed = [], []
    for stage in large["stages"]:
        a, b = small["stages"].get(stage, {}), large["stages"][stage]
        if "failed" in b or "failed" in a:
            failed.append(f"{stage} at {label}: {b.get('failed') or a.get('failed')}")
            why = f"the {stage} stage failed at {label if 'failed' in b else small['shape']}; see scale.json"
            figures.append(emit(Figure(f"scale_time_per_voxel_{stage}", None, "smallest_size", why)))
            figures.append(emit(Figure(f"scale_peak_memory_{stage}", None, "volume_bytes", why)))
            continue
        per_small, per_large = a["seconds"] / small["voxels"], b["seconds"] / large["voxels"]
        figures.append(emit(Figure(
            f"scale_time_per_voxel_{stage}", per_large / per_small, "smallest_size",
            f"{b['seconds']:.1f} s for {label} ({large['voxels'] / 1e6:.0f} M voxels) vs {a['seconds']:.1f} s for "
            f"{'x'.join(map(str, small['shape']))}; ≤ 1: at most linear in voxels")))
        figures.append(emit(Figure(
            f"scale_peak_memory_{stage}", peak_of(b) / large["volume_bytes"], "volume_bytes",
            f"{mib(peak_of(b)):.0f} MiB process-tree peak (without Chromium) for a {mib(large['volume_bytes']):.0f}"
            f" MiB {label} CT; {peak_of(a) / small['volume_bytes']:.1f} x at the smallest size; growth "
            f"{marginal(small, large, stage):.1f} x the volume bytes added (linear: a constant)"
            + (f"; aim ≤ 4 GiB: {'met' if peak_of(b) <= AIM_PEAK_BYTES else 'NOT met'}" if stage == "report"
               else ""))))
    return figures, failed


def parse_size(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.lower().split("x"))
    return z, y, x


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print("\n" + json.dumps(_child(argv[1], argv[2:])), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(SIZES),
                        help="CT shapes z x y x x, smallest first (default: 100x256x256 200x384x384 400x512x512)")
    parser.add_argument("--model-store", type=Path, default=DEMO_STORE,
                        help="MLflow sqlite store with the demo's model (default: the repository's mlruns/mlflow.db)")
    parser.add_argument("--no-report", action="store_true", help="only the read and model stages")
    args = parser.parse_args(argv)
    store, model_version = demo_model(args.model_store)
    model_uri = f"models:/{MODEL_NAME}@{MODEL_ALIAS}" if store else None
    if not store:
        note(f"model stage skipped: {model_version}")
    load = load_average()
    sizes = []
    for shape in sorted(args.sizes, key=lambda s: s[0] * s[1] * s[2]):
        sizes.append(measure_size(shape, model_uri, store, not args.no_report))
    figures, failed = figures_for(sizes)
    path = write_result("scale", figures, {
        "fov_mm_xyz": list(FOV_MM),
        "model": {"uri": model_uri, "store": str(args.model_store), "version": model_version},
        "sizes": sizes,
        "per_voxel_seconds": {"x".join(map(str, s["shape"])): {k: v["seconds"] / s["voxels"]
                                                                for k, v in s["stages"].items() if "seconds" in v}
                              for s in sizes},
        "peak_over_volume_bytes": {"x".join(map(str, s["shape"])): {k: peak_of(v) / s["volume_bytes"]
                                                                     for k, v in s["stages"].items()}
                                   for s in sizes},
        "peak_growth_per_volume_byte_added": {
            stage: marginal(sizes[0], sizes[-1], stage) for stage in sizes[-1]["stages"]
            if "failed" not in sizes[-1]["stages"][stage] and "failed" not in sizes[0]["stages"].get(stage, {})},
        "failed": failed,
        "load_average_end": load_average(),
    }, started_load=load)
    note(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
