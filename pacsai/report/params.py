"""The report's parameters: the single contract between the CLI, papermill and the template's validation cell."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pacsai.errors import ReportError


class ReportParameters(BaseModel):
    """What shapes one report. Everything here goes into the report's provenance and its DICOM UIDs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: str = Field(min_length=1, description="PatientID on the PACS")
    study_uid: str = Field("", description="StudyInstanceUID of the planning study; empty = the latest with a CT")
    pacs_url: str = Field("", description="DICOMweb URL or file://; empty = settings (PACSAI_PACS_URL)")
    structures_from: Literal["pacs", "model"] = "pacs"
    model_uri: str = Field("", description="models:/name@champion, models:/name/3 or runs:/...; for 'model'")
    target: str = Field("GTV", description="ROI name of the gross tumour volume")
    ctv_margin_mm: float | tuple[float, float, float] = Field(5.0, description="GTV→CTV margin, mm (x, y, z)")
    ptv_margin_mm: float | tuple[float, float, float] = Field(5.0, description="CTV→PTV set-up margin, mm")
    constraint_set: str = Field("thorax", description="constraint table (site name or YAML path)")
    prescription_gy: float = Field(60.0, gt=0)
    fractions: int = Field(30, gt=0)
    alpha_beta_tumour_gy: float = Field(10.0, gt=0)
    alpha_beta_oar_gy: float = Field(3.0, gt=0)
    smoke: bool = False

    @field_validator("ctv_margin_mm", "ptv_margin_mm", mode="before")
    @classmethod
    def _margin(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple) and len(value) != 3:
            raise ValueError("a per-axis margin needs three values (x, y, z) in mm")
        values = value if isinstance(value, tuple) else (value,)
        if any(float(v) < 0 for v in values):
            raise ValueError("margins are ≥ 0 mm")
        return value

    @model_validator(mode="after")
    def _model_needs_uri(self) -> ReportParameters:
        if self.structures_from == "model" and not self.model_uri:
            raise ValueError("structures_from='model' needs model_uri (e.g. models:/demo-thorax@champion)")
        return self

    @property
    def dose_per_fraction_gy(self) -> float:
        return self.prescription_gy / self.fractions


def validate_parameters(**values: Any) -> ReportParameters:
    """Validate papermill parameters; a ReportError names every wrong one."""
    try:
        return ReportParameters(**values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'parameters'}: {e['msg']}" for e in err.errors())
        raise ReportError(f"invalid report parameters: {problems}") from err
