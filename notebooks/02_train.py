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
# # Train a segmentation model on a PACS cohort
#
# Research use only. The same training as `pacsai train EXPERIMENT.yaml`, driven from a notebook: the cohort is
# selected from the PACS, split by patient, preprocessed (cached) and used to train the experiment's MONAI
# network. Every epoch is logged to MLflow (`pacsai ui` shows the run live); the curves below are read back
# from MLflow while and after the run. The best model is registered under the experiment's `model.name`;
# validate it with `notebooks/03_evaluate.ipynb` (`pacsai validate models:/NAME/VERSION`).

# %% tags=["parameters"]
experiment = "experiments/demo.yaml"  # help: experiment YAML (relative to the working directory or absolute)
overrides = {}  # help: dotted overrides, e.g. {"train.epochs": 5}
smoke = False  # help: apply the experiment's smoke: block (seconds)
pacs_url = ""  # help: PACS URL; empty: PACSAI_PACS_URL or the embedded store

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from pacsai import tracking
from pacsai.config import load_settings
from pacsai.learning.train import load_experiment, train

if not Path(experiment).is_file():
    raise FileNotFoundError(f"experiment {experiment} not found; run from the project folder or pass a path")
config = load_experiment(experiment, overrides=overrides, smoke=smoke)
print(f"structures: {config['structures']}")
print(f"model: {config['model']}")
print(f"training: {config['train']}")

# %% [markdown]
# ## Train: live curves (metrics also go to MLflow as they come)

# %%
from IPython.display import clear_output, display

live: dict[str, dict[int, float]] = {}


def show(epoch: int, metrics: dict) -> None:
    for name, value in metrics.items():
        live.setdefault(name, {})[epoch] = value
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    pd.Series(live["train_loss"]).plot(ax=axes[0], title="training loss", xlabel="epoch", marker=".")
    for s in config["structures"]:
        if f"val_dice_{s}" in live:
            pd.Series(live[f"val_dice_{s}"]).plot(ax=axes[1], label=s, ylim=(0, 1), marker=".")
    axes[1].set_title("validation Dice")
    axes[1].legend(fontsize=7, ncol=2)
    clear_output(wait=True)
    display(fig)
    plt.close(fig)


result = train(experiment, pacs=pacs_url or None, overrides=overrides, smoke=smoke,
               settings=load_settings(experiment), callback=show, progress=False)
print(f"run {result.run_id} → {result.model_uri} (best epoch {result.best_epoch}, {result.seconds:.0f} s)")
pd.Series(result.best_val_dice, name="validation Dice").round(3)

# %% [markdown]
# ## The same curves, read back from MLflow

# %%
client = tracking.client()
run = client.get_run(result.run_id)
names = ["train_loss", "val_dice_mean", *[f"val_dice_{s}" for s in config["structures"]]]
history = {n: pd.Series({m.step: m.value for m in client.get_metric_history(result.run_id, n)}) for n in names}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
history["train_loss"].plot(ax=axes[0], title="training loss", xlabel="epoch")
for s in config["structures"]:
    history[f"val_dice_{s}"].plot(ax=axes[1], label=s, xlabel="epoch", ylim=(0, 1), title="validation Dice")
axes[1].legend(fontsize=7, ncol=2)
fig.tight_layout()

# %% [markdown]
# ## The model card registered with this version
# Intended use, training cohort and domain (what the report's QA gate compares new images with), validation
# metrics, post-processing rules and known limitations. The registry shows it as the version's description.

# %%
from IPython.display import Markdown

from pacsai.learning.infer import load_model

Markdown(load_model(result.model_uri).card)
