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
# # Validation of a registered segmentation model
#
# Research use only. This notebook is the validation template that `pacsai validate MODEL_URI` runs with
# papermill: it evaluates the model on the **held-out (test) patients of its training run** against their
# reference contours, on each patient's own CT grid: Dice, HD95, mean surface distance, surface Dice and added
# path length (mm of contour to redraw) at τ mm, and — where the study has a plan dose — what the model's
# contours change in the plan's numbers (ΔDmean, ΔD0.03cc, ΔV20Gy, model − reference). It logs an MLflow run
# with `pacsai.kind=validation`. Patients appear only as pseudonyms. The promotion gate (every structure the
# model outputs must meet its limits) is decided and recorded by `pacsai validate`, not here.

# %% tags=["parameters"]
model_uri = "models:/pacsai-thorax/latest"  # help: registered model to validate (models:/NAME/VERSION)
pacs_url = ""  # help: PACS holding the cohort; empty: PACSAI_PACS_URL or the embedded store
tracking_uri = ""  # help: MLflow tracking URI; empty: the default store, mlruns/ of the working directory
thresholds = {}  # help: {"dice_Heart": 0.94, "abs_delta_dmean_Heart": 1.0}; enforced by pacsai validate
tolerance_mm = 2.0  # help: tolerance of the surface Dice and the added path length (mm)
smoke = False  # help: evaluate one held-out case only (tests, CI)
result_path = ""  # help: where to write the result JSON; empty: nowhere

# %%
import json
import math
import os
from pathlib import Path

if not isinstance(model_uri, str) or not model_uri.startswith("models:/"):
    raise ValueError(f"model_uri must be a registered model URI (models:/...), got {model_uri!r}")
if not isinstance(thresholds, dict) or not all(isinstance(v, (int, float)) for v in thresholds.values()):
    raise ValueError(f"thresholds must map metric names to numbers, got {thresholds!r}")
if not float(tolerance_mm) > 0:
    raise ValueError(f"tolerance_mm must be positive, got {tolerance_mm!r}")
if tracking_uri:
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri

# %%
import matplotlib.pyplot as plt
import pandas as pd

from pacsai import tracking
from pacsai.cohort import Cohort, resolve_cohort
from pacsai.config import load_settings
from pacsai.learning.evaluate import summarize, summary_metrics
from pacsai.learning.infer import evaluate_cohort, load_model
from pacsai.learning.validate import gate_rows
from pacsai.pacs import connect

settings = load_settings()
ref = tracking.resolve_model(model_uri)
mlflow = tracking._mlflow()
mlflow.set_tracking_uri(tracking.tracking_uri())
training = mlflow.get_run(ref.run_id)
print(f"model {ref.name} version {ref.version}, training run {ref.run_id}")

# %% [markdown]
# ## Held-out patients
# The training run recorded its cohort and its split by patient; only the `test` part is used. MLflow keeps
# patients as pseudonyms and DICOM UIDs as keyed hashes: the held-out series are found again in the PACS by those
# hashes (`pacsai.cohort.resolve_cohort`, under the store's pseudonym key), with the very RTSTRUCT trained on.

# %%
folder = Path(mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path="inputs/cohort.parquet"))
cohort = Cohort.from_parquet(folder)
split = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path="split.json")).read_text())
held_out = split["patients"]["test"] or split["patients"]["val"]
logged_test = cohort.subset(held_out)
if smoke:
    logged_test = logged_test.subset(logged_test.patients[:1])
pacs = connect(pacs_url or None)
key = tracking.pseudonym_key(settings=settings)
test_cohort = resolve_cohort(pacs, logged_test, key=key)
print(f"{len(test_cohort)} series of {len(test_cohort.patients)} held-out patients")

# %%
model = load_model(ref.uri)
outputs = list(model.spec.structures)
table = evaluate_cohort(pacs, test_cohort, model=model, tolerance_mm=float(tolerance_mm))
table.round(3)

# %% [markdown]
# ## Per structure over the held-out patients
# Contour metrics are means over patients, and NaN (with the reason in `note`) when a structure is empty or
# missing in any of them. `delta_*` is the mean model − reference difference on the plan dose (the model's bias),
# `abs_delta_*` the largest difference in any one patient (what a dose limit of the gate is checked against).

# %%
summary = summarize(table)
fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
summary["dice"].plot.bar(ax=axes[0], ylim=(0, 1), title="Dice", color="tab:blue")
summary["hd95"].plot.bar(ax=axes[1], title="HD95 (mm)", color="tab:orange")
summary["abs_delta_dmean_gy"].plot.bar(ax=axes[2], title="|ΔDmean| worst patient (Gy)", color="tab:red")
for name, limit in thresholds.items():
    metric, _, structure = name.partition("_")
    if metric == "dice" and structure in summary.index:
        axes[0].scatter([list(summary.index).index(structure)], [limit], marker="_", s=400, color="k")
fig.tight_layout()
summary.round(3)

# %% [markdown]
# ## The promotion gate (as `pacsai validate` will check it)

# %%
metrics = summary_metrics(summary)
metrics["dice_mean"] = float(summary["dice"].mean(skipna=False))
notes = {str(k): str(v) for k, v in summary["note"].items() if v}
gate = pd.DataFrame(gate_rows(metrics, {k: float(v) for k, v in thresholds.items()}, outputs=outputs, notes=notes))
failures = [r for r in gate.get("reason", []) if r]
print("PASS" if not failures and len(gate) else "FAIL:\n  " + "\n  ".join(failures or ["no thresholds"]))
gate

# %%
experiment = mlflow.get_experiment(training.info.experiment_id).name
with tracking.start_run(
    "validation",
    experiment=experiment,
    # what MLflow keeps of the cohort: pseudonyms and hashed UIDs, as for the training run
    cohort=test_cohort if settings.log_phi else test_cohort.pseudonymised(key),
    source="03_evaluate.ipynb",  # the template, not the kernel's ipykernel_launcher.py (papermill, Jupyter alike)
    params={"model_uri": ref.uri, "tolerance_mm": float(tolerance_mm), "smoke": bool(smoke),
            "thresholds": json.dumps(thresholds, sort_keys=True)},
    tags={"pacsai.model_name": ref.name, "pacsai.model_version": ref.version, "pacsai.training_run": ref.run_id},
) as ctx:
    mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    mlflow.log_table(table, artifact_file="metrics_per_patient.json")
    mlflow.log_table(summary.reset_index(), artifact_file="metrics_per_structure.json")
    mlflow.log_figure(fig, "per_structure.png")
    run_id = ctx.run_id
print(f"validation run {run_id}")
if result_path:
    Path(result_path).write_text(json.dumps({
        "run_id": run_id, "metrics": metrics, "outputs": outputs, "notes": notes,
        "n_patients": len(test_cohort.patients), "failures": failures,
    }))
