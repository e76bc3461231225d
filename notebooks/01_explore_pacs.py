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
# # Explore the PACS
# Connect to a PACS, search a cohort of planning CTs with structures, pull one patient's CT, structures and dose,
# and look at them: an interactive viewer (three planes + 3D, offline), HU histograms per structure, the dose.
# **Research use only.** Run `make demo` (or `pacsai seed --patients 3`) first to have synthetic patients in the
# embedded store.

# %% tags=["parameters"]
pacs_url: str = ""  # help: DICOMweb URL or file:// store (empty: PACSAI_PACS_URL or ./pacs)
patient_id: str = ""  # help: PatientID to look at (empty: the first patient of the cohort)
structures: str = ""  # help: comma-separated ROI names every RTSTRUCT of the cohort must contain (empty: any)
viewer: str = "auto"  # help: auto, niivue (WebGL, 3D), matplotlib (sliders, no WebGL) or static (a picture)
smoke: bool = False  # help: fast settings for tests and CI

# %%
import pandas as pd
from IPython.display import display

import pacsai
from pacsai import planning, structure_sets, viz
from pacsai.cohort import CohortQuery, select_cohort

if viewer not in ("auto", "niivue", "matplotlib", "static"):
    raise ValueError(f"viewer must be auto, niivue, matplotlib or static, not {viewer!r}")
wanted = tuple(name.strip() for name in structures.split(",") if name.strip())

pacs = pacsai.connect(pacs_url or None)
print(f"{pacs.url} answered in {pacs.ping() * 1000:.0f} ms")

# %% [markdown]
# ## Search
# Studies on the PACS, then the cohort: CT series that an RTSTRUCT of the same study refers to.

# %%
studies = pacs.search_studies()
print(f"{len(studies)} studies")
studies[["PatientID", "StudyDate", "StudyDescription", "ModalitiesInStudy"]].head(10)

# %%
cohort = select_cohort(pacs, CohortQuery(modality="CT", structures=wanted, max_patients=2 if smoke else None))
print(f"{len(cohort)} series of {len(cohort.patients)} patients; content hash {cohort.content_hash[:12]}")
cohort.table[["patient_id", "study_instance_uid", "series_instance_uid", "roi_names"]]

# %% [markdown]
# ## Pull one patient
# The CT series, its RTSTRUCT (rasterised on the CT grid) and the study's RT Dose, through the local cache. Where
# the study has several structure sets, `pacsai.structure_sets.choose` picks the one the report uses too: one that
# references this CT, the latest by StructureSetDate/Time, most ROIs as a tie-break; pacsai's own never
# (docs/structure_set_selection.md).

# %%
pid = patient_id or cohort.patients[0]
rows = cohort.table[cohort.table.patient_id == pid]
if rows.empty:
    raise ValueError(f"patient {pid!r} is not in the cohort; choose one of {cohort.patients}")
# The latest study of the patient (the planning study; earlier ones are priors).
dates = pacs.search_studies(PatientID=pid).set_index("StudyInstanceUID").StudyDate
row = max(rows.itertuples(), key=lambda r: str(dates.get(r.study_instance_uid) or ""))

image = pacsai.read_series(pacs.retrieve_series(row.study_instance_uid, row.series_instance_uid, progress=False))
rt_series = pacs.search_series(StudyInstanceUID=row.study_instance_uid, Modality="RTSTRUCT")
candidates = [structure_sets.read_header(path) for uid in rt_series.SeriesInstanceUID
              for path in pacs.retrieve_series(row.study_instance_uid, uid, progress=False)]
lowered = {name.lower() for name in wanted}
chosen = structure_sets.choose([c for c in candidates if lowered <= {n.lower() for n in c.roi_names}],
                               image_series_uid=row.series_instance_uid)
if chosen is None:
    raise ValueError(f"no planner RTSTRUCT of study {row.study_instance_uid} references CT {row.series_instance_uid}"
                     + (f" with {', '.join(wanted)}" if wanted else ""))
masks = pacsai.read_rtstruct(chosen.path, like=image)
print(f"structures: RTSTRUCT '{chosen.label}' ({chosen.date_time[:8] or 'undated'}), {len(candidates)} in the study")

doses = pacs.search_series(StudyInstanceUID=row.study_instance_uid, Modality="RTDOSE")
dose = None
if not doses.empty:
    dose_files = pacs.retrieve_series(row.study_instance_uid, doses.SeriesInstanceUID.iloc[-1], progress=False)
    dose = pacsai.read_dose(dose_files[0])
print(f"{row.patient_id}: CT {image.shape} voxels of {tuple(round(s, 2) for s in image.attrs['spacing'])} mm, "
      f"structures {list(masks)}, dose {'none' if dose is None else f'max {float(dose.max()):.1f} Gy'}")

# %% [markdown]
# ## Viewer
# Three planes and a 3D rendering with the structures overlaid (ipyniivue, offline), with a legend of the structure
# colours and the dose scale. Run by papermill or `nbconvert --execute` (no widget frontend) it makes only the same
# three planes as a picture, so the executed notebook stays small and its HTML export shows the picture offline.

# %%
viz.view(image, structures=masks, dose=dose, backend=viewer)

# %% [markdown]
# ## HU histograms per structure

# %%
display(viz.plot_histograms(image, masks, bins=60 if smoke else 150))

# %% [markdown]
# ## Dose
# Isodose lines in percent of the maximum dose through the GTV centroid, and the cumulative DVH of each structure
# (`pacsai.planning.dvh`: the dose resampled onto each structure, method stated in `DVH.method`).

# %%
if dose is None:
    print("no RT Dose in this study")
else:
    display(viz.plot_planes(image, masks, dose, title=f"{row.patient_id}: dose"))
    dvhs = {name: planning.dvh(dose, mask) for name, mask in masks.items() if bool(mask.values.any())}
    display(viz.plot_dvh(dvhs))
    table = pd.DataFrame([d.to_dict() for d in dvhs.values()], index=list(dvhs))
    display(table.drop(columns=["name", "method"], errors="ignore").round(2))
