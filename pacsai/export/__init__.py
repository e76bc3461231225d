"""Research export: a cohort → nnU-Net v2 / MONAI / NIfTI datasets, optionally de-identified (PS3.15 Annex E).

``pacsai export --cohort -f KEY=VALUE --structures A,B --format nnunet --out DIR --deidentify --manifest FILE``;
from Python :func:`export_cohort` with a :class:`Deidentifier`. See docs/export.md.
"""

from __future__ import annotations

from typing import Any

from pacsai import lazy
from pacsai.export.formats import FORMATS

# Re-exported on first use, so that `pacsai --help` (which lists the formats) loads no NumPy, pandas or pydicom.
_LAZY = {
    "ExportResult": "pacsai.export.core",
    "export_cohort": "pacsai.export.core",
    "Deidentifier": "pacsai.export.deid",
    "PatientEntry": "pacsai.export.deid",
    "ExportError": "pacsai.export.nifti",
    "nifti_affine": "pacsai.export.nifti",
}


def __getattr__(name: str) -> Any:
    return lazy.attribute(__name__, _LAZY, name, globals())


__all__ = ["FORMATS", "Deidentifier", "ExportError", "ExportResult", "PatientEntry", "export_cohort",
           "nifti_affine"]
