# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: pacsai (Python 3)
#     language: python
#     name: pacsai
# ---

# %% [markdown]
# # Treatment-planning report
# **Research use only — not for clinical decision making.** Computed by pacsai from the images, structures and
# dose named in the provenance section; definitions: ICRU 50/62/83, QUANTEC, RECIST 1.1 and the QA gate
# (docs/clinical_definitions.md). Read the QA box first: it says whether the numbers below can be trusted.

# %% tags=["parameters"]
patient_id: str = "SYN-00000"  # help: PatientID on the PACS
study_uid: str = ""  # help: StudyInstanceUID of the planning study (empty: the latest study with a CT)
pacs_url: str = ""  # help: DICOMweb URL or file:// store (empty: PACSAI_PACS_URL or ./pacs)
structures_from: str = "pacs"  # help: pacs (the study RTSTRUCT) or model (segment with model_uri)
model_uri: str = ""  # help: model URI (models:/name@champion, models:/name/3, runs:/...) for model structures
target: str = "GTV"  # help: ROI name of the gross tumour volume
ctv_margin_mm: float = 5.0  # help: GTV→CTV margin in mm (or a list [x, y, z])
ptv_margin_mm: float = 5.0  # help: CTV→PTV set-up margin in mm (or a list [x, y, z])
constraint_set: str = "thorax"  # help: constraint table: a site name or a YAML path
prescription_gy: float = 60.0  # help: prescription dose to the PTV in Gy
fractions: int = 30  # help: number of fractions
out_dir: str = ""  # help: folder for metrics.json and structures.npz (empty: reports/<PatientID>/, never ".")
smoke: bool = False  # help: fast settings for tests and CI
inputs_file: str = ""  # help: inputs pacsai report gathered (and segmented) before this kernel; empty: read here

# %%
from pathlib import Path

from pacsai.report import display as show
from pacsai.report.handoff import summary_from_file
from pacsai.report.params import validate_parameters
from pacsai.report.run import default_out_dir
from pacsai.report.summary import build_summary

params = validate_parameters(
    patient_id=patient_id, study_uid=study_uid, pacs_url=pacs_url, structures_from=structures_from,
    model_uri=model_uri, target=target, ctv_margin_mm=ctv_margin_mm, ptv_margin_mm=ptv_margin_mm,
    constraint_set=constraint_set, prescription_gy=prescription_gy, fractions=fractions, smoke=smoke,
)

# %%
# `pacsai report` with a model segments in its own process (no torch here; this cell waits for it); run by hand, or with
# structures from the PACS, the kernel reads the PACS itself.
summary = summary_from_file(Path(inputs_file), params) if inputs_file else build_summary(params)
# Run by hand (plain papermill), the outputs go to reports/<PatientID>/ like `pacsai report`'s, not into the
# working folder: they carry the real PatientID, and the working folder may be a repository.
summary.save(Path(out_dir) if out_dir else default_out_dir(params.patient_id))
show.header(summary)  # the QA gate first, then failed/not-evaluable constraints, coverage and response

# %% [markdown]
# ## Key images

# %%
show.key_images(summary)

# %% [markdown]
# ## Structures

# %%
show.structures(summary)

# %% [markdown]
# ## Constraints

# %%
show.constraints(summary)

# %% [markdown]
# ## Dose–volume histograms

# %%
show.dvh(summary)

# %% [markdown]
# ## Margins, distances and overlaps

# %%
show.geometry(summary)

# %% [markdown]
# ## Response against the prior study

# %%
show.response(summary)

# %% [markdown]
# ## Model vs reference contours

# %%
show.agreement(summary)

# %% [markdown]
# ## QA reasons and provenance

# %%
show.qa(summary)
show.provenance(summary)

# %% [markdown]
# ## Model card

# %%
show.model_card(summary)
