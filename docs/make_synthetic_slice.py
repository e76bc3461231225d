"""Draw docs/synthetic_slice.png: one synthetic patient, axial slice through the GTV and a coronal slice, with
the ground-truth contours read back from its RTSTRUCT.

    .venv/bin/python docs/make_synthetic_slice.py [--seed 6] [--out docs/synthetic_slice.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pacsai.imaging.rtstruct import read_rtstruct
from pacsai.synthetic import make_patient

# drawing order: the GTV last, on top of the lung boundary it shares
COLORS = {
    "BODY": "#ffaa00",
    "Lung_L": "#00c8ff",
    "Lung_R": "#3a7bff",
    "Heart": "#ff6fb0",
    "SpinalCord": "#ffff00",
    "Esophagus": "#30e030",
    "PTV": "#ff40ff",
    "GTV": "#ff2020",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("synthetic_slice.png"))
    args = parser.parse_args()

    patient = make_patient(args.seed, with_prior=False)
    image = patient.image
    structures = read_rtstruct(patient.rtstruct, like=image)  # what a TPS would show: the DICOM contours
    gtv = structures["GTV"].values
    area = gtv.sum(axis=(1, 2))
    # among the slices where the GTV is near its largest, one through a vertebral body (not a disc)
    bone = structures["Vertebrae"].values.sum(axis=(1, 2)) if "Vertebrae" in structures else area * 0
    candidates = np.nonzero(area >= 0.75 * area.max())[0]
    k = int(candidates[np.argmax(bone[candidates])])
    lungs = structures["Lung_L"].values | structures["Lung_R"].values
    j = round(float(np.nonzero(lungs)[1].mean()))  # a coronal through the middle of the lungs
    sx, sy, sz = image.attrs["spacing"]
    x, y, z = (image.coords[d].values for d in ("x", "y", "z"))

    fig, (ax1, ax2, ax3) = plt.subplots(
        1, 3, figsize=(18, 6.6), facecolor="black", gridspec_kw={"width_ratios": [1, 1, 1.05]}
    )
    extent_axial = (x[0] - sx / 2, x[-1] + sx / 2, y[-1] + sy / 2, y[0] - sy / 2)
    for ax, (level, width), title in (
        (ax1, (-500, 1500), "lung window"),
        (ax2, (40, 400), "soft-tissue window"),
    ):
        ax.imshow(
            image.values[k],
            cmap="gray",
            vmin=level - width / 2,
            vmax=level + width / 2,
            extent=extent_axial,
            interpolation="bilinear",
        )
        for name, color in COLORS.items():
            if name in structures and structures[name].values[k].any():
                ax.contour(
                    x,
                    y,
                    structures[name].values[k],
                    levels=[0.5],
                    colors=color,
                    linewidths=1.6 if name == "GTV" else 1.0,
                )
        ax.set_title(f"{patient.patient_id} axial z = {z[k]:.1f} mm ({title}, W{width} L{level})", color="w")
    # coronal through the tumour: superior up
    extent_cor = (x[0] - sx / 2, x[-1] + sx / 2, z[0] - sz / 2, z[-1] + sz / 2)
    ax3.imshow(
        image.values[:, j, :],
        cmap="gray",
        vmin=-1250,
        vmax=250,
        extent=extent_cor,
        origin="lower",
        interpolation="bilinear",
    )
    for name in ("Lung_L", "Lung_R", "Heart", "GTV"):
        ax3.contour(x, z, structures[name].values[:, j, :], levels=[0.5], colors=COLORS[name], linewidths=1.0)
    ax3.set_title(f"coronal y = {y[j]:.1f} mm (W1500 L-500)", color="w")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("x (mm, patient left →)", color="w")
        ax.tick_params(colors="w")
        ax.set_facecolor("black")
    ax1.set_ylabel("y (mm, posterior ↓)", color="w")
    ax3.set_ylabel("z (mm, superior ↑)", color="w")
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="w")
    fig.suptitle(
        "pacsai synthetic patient (not a real patient; research use only): image right = patient left",
        color="w",
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(args.out, dpi=80, facecolor="black")
    print(f"wrote {args.out} (slice {k}, seed {args.seed}, GTV site {patient.truth['site']})")


if __name__ == "__main__":
    main()
