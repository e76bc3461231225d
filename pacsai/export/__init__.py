"""Research export: a cohort → nnU-Net v2 / MONAI / NIfTI datasets, optionally de-identified (PS3.15 Annex E).

``pacsai export --cohort -f KEY=VALUE --structures A,B --format nnunet --out DIR --deidentify --manifest FILE``;
from Python :func:`export_cohort` with a :class:`Deidentifier`. See docs/export.md.
"""

from __future__ import annotations

from pacsai.export.core import FORMATS, ExportResult, export_cohort
from pacsai.export.deid import Deidentifier, PatientEntry
from pacsai.export.nifti import ExportError, nifti_affine

__all__ = ["FORMATS", "Deidentifier", "ExportError", "ExportResult", "PatientEntry", "export_cohort",
           "nifti_affine"]
