"""Measure a registered model on a real thoracic planning CT (NSCLC-Radiomics LUNG1-001): Dice and HD95.

Usage::

    .venv/bin/python scripts/evaluate_real_thorax.py [MODEL_URI] [--timing]

``MODEL_URI`` defaults to ``models:/pacsai-thorax@champion`` in the MLflow store of the current folder (or
``PACSAI_MLFLOW_URI``). The CT and its clinical RTSTRUCT come from ``$PACSAI_TEST_DATA/tcia_nsclc_lung1_001``
(default ``../shared/data``). This patient is for measuring only: never train or tune on it.

The clinical ROI names are mapped to the model's (``Lung-Left`` → ``Lung_L``, ``Lung-Right`` → ``Lung_R``,
``Spinal-Cord`` → ``SpinalCord``, ``GTV-1`` → ``GTV``); structures the RTSTRUCT lacks (BODY, heart, oesophagus)
are listed without a figure. ``--timing`` also times the segmentation of the first 100 slices (a 100×512×512 CT)
with and without test-time augmentation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE = "tcia_nsclc_lung1_001"
#: clinical ROI name → the model's structure name
NAMES = {"Lung-Left": "Lung_L", "Lung-Right": "Lung_R", "Spinal-Cord": "SpinalCord", "GTV-1": "GTV"}


def data_dir() -> Path:
    root = Path(os.environ.get("PACSAI_TEST_DATA", REPO.parent / "shared" / "data"))
    folder = root / CASE
    if not (folder / "ct").is_dir() or not (folder / "rtstruct").is_dir():
        sys.exit(f"{folder} has no ct/ and rtstruct/; set PACSAI_TEST_DATA to the folder holding {CASE}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="models:/pacsai-thorax@champion", help="registered model URI")
    parser.add_argument("--timing", action="store_true", help="also time a 100×512×512 CT (first 100 slices)")
    args = parser.parse_args(argv)

    import torch

    from pacsai.imaging import read_rtstruct, read_series
    from pacsai.imaging.geometry import voxel_volume_cc
    from pacsai.learning.evaluate import agreement
    from pacsai.learning.infer import load_model, segment

    folder = data_dir()
    volume = read_series(sorted((folder / "ct").glob("*.dcm")))
    rois = read_rtstruct(next((folder / "rtstruct").glob("*.dcm")), like=volume)
    truth = {NAMES[name]: mask for name, mask in rois.items() if name in NAMES}
    model = load_model(args.model)
    print(f"model {model.name} v{model.version} (run {model.run_id}); {torch.get_num_threads()} torch threads")
    print(f"CT {tuple(volume.shape)} (z, y, x), spacing (z, y, x) {tuple(round(v, 3) for v in _spacing_zyx(volume))} mm")

    started = time.perf_counter()
    masks = segment(volume, model=model)
    seconds = time.perf_counter() - started
    spacing_zyx = _spacing_zyx(volume)
    voxel_cc = voxel_volume_cc(volume)
    print(f"segmented in {seconds:.1f} s (no test-time augmentation)\n")
    print(f"{'structure':<12}{'Dice':>8}{'HD95 mm':>10}{'model cc':>10}{'clinical cc':>13}")
    for name in model.spec.structures:
        pred = masks[name].values
        if name not in truth:
            print(f"{name:<12}{'—':>8}{'—':>10}{pred.sum() * voxel_cc:>10.1f}{'(no ROI)':>13}")
            continue
        a = agreement(pred, truth[name].values.astype(bool), spacing_zyx=spacing_zyx)
        print(f"{name:<12}{a.dice:>8.3f}{a.hd95:>10.1f}{a.volume_pred_cc:>10.1f}{a.volume_ref_cc:>13.1f}")

    if args.timing:
        sub = volume.isel(z=slice(0, 100))  # slice 0 keeps its place: the affine holds for the first 100
        for tta in (False, True):
            t = time.perf_counter()
            segment(sub, model=model, return_uncertainty=tta)
            label = "with" if tta else "without"
            print(f"100×512×512 CT: {time.perf_counter() - t:.1f} s {label} test-time augmentation")
    return 0


def _spacing_zyx(volume) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    from pacsai.imaging.geometry import spacing_of

    sx, sy, sz = (float(v) for v in spacing_of(volume))
    return (sz, sy, sx)


if __name__ == "__main__":
    raise SystemExit(main())
