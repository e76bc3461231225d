"""A model on disk without pickle: weights as a plain ``.npz`` and everything else as JSON.

A pickled ``torch.nn.Module`` runs arbitrary code when it is loaded, so a model from an untrusted MLflow store
could take over the machine. pacsai therefore stores a model as a folder::

    pacsai_model/
        model.json     # network spec (architecture, channels ...), head, preprocessing, patch, post-processing
        weights.npz    # the state dict, one array per tensor (numpy, read with allow_pickle=False)

and loading rebuilds the network from code (:func:`pacsai.learning.networks.build_network`) and copies the arrays
in. MLflow logs the folder as a ``pyfunc`` model whose loader is this module (``loader_module``), so the registry,
aliases and signature work as for any MLflow model, and ``mlflow.pyfunc.load_model`` unpickles nothing either.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pacsai.errors import TrackingError

logger = logging.getLogger(__name__)

MODEL_DIR = "pacsai_model"
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"
FORMAT = "pacsai-npz/1"


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as an ``.npz`` of numpy arrays (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
    os.replace(tmp, path)
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an ``.npz`` state dict; object arrays (which need pickle) are refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except (OSError, ValueError) as err:
        raise TrackingError(f"model weights {path} are unreadable or not a pacsai .npz ({err})") from err


def save_model_dir(net: torch.nn.Module, config: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``folder/pacsai_model/{model.json, weights.npz}``; returns the ``pacsai_model`` folder.

    ``config`` needs ``network`` (the experiment's ``model:`` mapping), ``in_channels`` and ``out_channels``;
    the rest (preprocessing, head, patch, post-processing) is kept for the loader.
    """
    for key in ("network", "in_channels", "out_channels"):
        if key not in config:
            raise TrackingError(f"model config lacks {key!r}; cannot save a model that could not be rebuilt")
    out = Path(folder) / MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps({**config, "format": FORMAT}, indent=2, sort_keys=True))
    save_state_dict(net.state_dict(), out / WEIGHTS_FILE)
    return out


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrackingError(f"{path} is missing or not JSON ({err}); not a pacsai model folder") from err
    if config.get("format") != FORMAT:
        raise TrackingError(f"{path}: format {config.get('format')!r} is not {FORMAT!r}")
    return config


def build_from_dir(model_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from ``model.json`` and load ``weights.npz``: (network in eval mode, config)."""
    from pacsai.learning.networks import build_network

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    net = build_network(
        config["network"], in_channels=int(config["in_channels"]), out_channels=int(config["out_channels"])
    )
    try:
        net.load_state_dict(load_state_dict(model_dir / WEIGHTS_FILE), strict=True)
    except RuntimeError as err:
        raise TrackingError(f"weights in {model_dir} do not fit the network in its model.json: {err}") from err
    return net.to(device).eval(), config


def find_model_dir(root: str | Path) -> Path:
    """The ``pacsai_model`` folder inside a downloaded MLflow model (``root/data/pacsai_model``) or ``root``."""
    root = Path(root)
    for candidate in (root, root / MODEL_DIR, root / "data" / MODEL_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    hits = sorted(root.rglob(CONFIG_FILE))
    if hits:
        return hits[0].parent
    raise TrackingError(
        f"no {MODEL_DIR}/{CONFIG_FILE} under {root}: the model was not logged by this pacsai version "
        "(older versions stored a pickled module, which pacsai no longer loads); retrain it"
    )


@dataclass(eq=False)
class PyfuncSegmenter:
    """What ``mlflow.pyfunc.load_model`` returns for a pacsai model: logits of (B, 1, z, y, x) float32 input."""

    net: torch.nn.Module
    config: Mapping[str, Any]

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.net(x).float().cpu().numpy()


def _load_pyfunc(data_path: str) -> PyfuncSegmenter:
    """MLflow's entry point (``loader_module``): build the network from code, read the weights; no pickle."""
    net, config = build_from_dir(find_model_dir(data_path))
    return PyfuncSegmenter(net=net, config=config)
