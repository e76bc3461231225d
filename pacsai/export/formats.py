"""The dataset layouts ``pacsai export`` writes (a leaf module: the CLI lists them without importing the exporters)."""

from __future__ import annotations

#: nnU-Net v2 raw dataset, MONAI datalist JSON, plain NIfTI images + label maps.
FORMATS = ("nnunet", "monai", "nifti")
