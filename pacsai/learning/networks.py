"""Segmentation networks from the experiment's ``model:`` mapping (MONAI UNet, SegResNet, DynUNet, Voxelwise).

A model is stored as this mapping plus its weights (:mod:`pacsai.learning.modelio`): loading rebuilds the network
here, from code, and never unpickles a module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from pacsai.errors import ConfigError
from pacsai.notebooks import import_jsonschema_without_iri_grammar

# MONAI's package init imports jsonschema (monai.bundle), which then compiles rfc3987-syntax's IRI grammar: ~1.5 s of
# CPU in every process that imports MONAI (training, every model report) for a format check pacsai never runs.
import_jsonschema_without_iri_grammar()

from monai.networks.nets import DynUNet, SegResNet, UNet  # noqa: E402  (after the line above, on purpose)

logger = logging.getLogger(__name__)

ARCHITECTURES = ("UNet", "SegResNet", "DynUNet", "Voxelwise")


def build_network(spec: Mapping[str, Any], *, in_channels: int, out_channels: int) -> torch.nn.Module:
    """Build the network named by ``spec["architecture"]``.

    Parameters
    ----------
    spec
        ``architecture`` (``UNet`` | ``SegResNet`` | ``DynUNet``) and its options:
        UNet: ``channels`` (default [16, 32, 64, 128]), ``strides`` (default 2 between levels),
        ``num_res_units`` (2), ``dropout`` (0). SegResNet: ``init_filters`` (16), ``blocks_down`` ([1, 2, 2, 4]),
        ``blocks_up`` ([1, 1, 1]), ``dropout`` (0). DynUNet: ``filters`` (default [16, 32, 64, 128]),
        ``kernel_size`` (3 at every level), ``strides`` (1 then 2). Voxelwise: a 1×1×1 convolution, i.e. a
        logistic model of each voxel's intensity (a thresholding baseline; no options).
    in_channels, out_channels
        Image channels in, one channel per structure out (logits).
    """
    arch = str(spec.get("architecture", "UNet"))
    if arch == "UNet":
        channels = tuple(int(c) for c in spec.get("channels", (16, 32, 64, 128)))
        strides = tuple(int(s) for s in spec.get("strides", (2,) * (len(channels) - 1)))
        if len(strides) != len(channels) - 1:
            raise ConfigError(f"model.strides needs {len(channels) - 1} entries for {len(channels)} channels")
        return UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            num_res_units=int(spec.get("num_res_units", 2)),
            dropout=float(spec.get("dropout", 0.0)),
        )
    if arch == "SegResNet":
        return SegResNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            init_filters=int(spec.get("init_filters", 16)),
            blocks_down=tuple(int(b) for b in spec.get("blocks_down", (1, 2, 2, 4))),
            blocks_up=tuple(int(b) for b in spec.get("blocks_up", (1, 1, 1))),
            dropout_prob=float(spec.get("dropout", 0.0)) or None,
        )
    if arch == "DynUNet":
        filters = [int(f) for f in spec.get("filters", (16, 32, 64, 128))]
        kernels = spec.get("kernel_size", [3] * len(filters))
        strides = spec.get("strides", [1] + [2] * (len(filters) - 1))
        if not (len(kernels) == len(strides) == len(filters)):
            raise ConfigError("model.filters, model.kernel_size and model.strides need the same length")
        return DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=filters,
            res_block=bool(spec.get("res_block", True)),
        )
    if arch == "Voxelwise":
        return torch.nn.Conv3d(in_channels, out_channels, kernel_size=1)
    raise ConfigError(f"model.architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")


def divisor(spec: Mapping[str, Any]) -> int:
    """The factor every spatial input size must be a multiple of (product of the network's strides)."""
    arch = str(spec.get("architecture", "UNet"))
    if arch == "UNet":
        channels = spec.get("channels", (16, 32, 64, 128))
        strides = spec.get("strides", (2,) * (len(channels) - 1))
    elif arch == "SegResNet":
        strides = (2,) * (len(spec.get("blocks_down", (1, 2, 2, 4))) - 1)
    elif arch == "Voxelwise":
        strides = ()
    else:
        filters = spec.get("filters", (16, 32, 64, 128))
        strides = spec.get("strides", [1] + [2] * (len(filters) - 1))
    out = 1
    for s in strides:
        out *= int(s)
    return out
