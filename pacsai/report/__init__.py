"""Per-patient treatment-planning reports: gather inputs, compute one PlanSummary, render with papermill, push DICOM.

Modules: :mod:`summary` (everything a report shows, as data), :mod:`run` (papermill → HTML/PDF, MLflow run),
:mod:`outputs` (SEG / RTSTRUCT / TID1500 SR / Encapsulated PDF), :mod:`batch` (cohorts), :mod:`cli`.
"""
