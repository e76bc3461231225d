"""Per-patient treatment-planning reports: gather inputs, compute one PlanSummary, render with papermill, push DICOM.

Modules: :mod:`inputs` (what is read, and who drew the structures), :mod:`summary` (everything a report shows, as
data), :mod:`gate` (the QA gate: structure states and the reasons not to trust a statement), :mod:`uncertainty`
(model uncertainty per structure), :mod:`run` (papermill → HTML/PDF, MLflow run, the push the gate allows),
:mod:`outputs` (SEG / RTSTRUCT / TID1500 SR with the gate / Encapsulated PDF), :mod:`batch` (cohorts);
the verb is :mod:`pacsai.commands.report`.
"""
