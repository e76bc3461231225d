"""Wrong report parameters are named in the user's terms: the parameter, its CLI option, the value, what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pacsai.errors import ReportError
from pacsai.report.params import validate_parameters


def _report(args: list[str], cwd) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    return subprocess.run([sys.executable, "-m", "pacsai", "report", *args, "--no-track"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["SYN-1", "--prescription", "-5"], "prescription_gy (--prescription): must be more than 0 (got -5.0)"),
        (["SYN-1", "--fractions", "0"], "fractions (--fractions): must be more than 0 (got 0)"),
        (["SYN-1", "--ctv-margin", "-1"], "ctv_margin_mm (--ctv-margin): margins are ≥ 0 mm (got -1.0)"),
        (["SYN-1", "--structures-from", "model"],
         "structures from a model need the model: give model_uri (pacsai report --model), e.g. "
         "models:/pacsai-thorax@champion"),
    ],
)
def test_cli_names_the_option_and_the_value(args, message, tmp_path):
    out = _report([*args, "--pacs", f"file://{tmp_path / 'pacs'}"], tmp_path)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.strip() == f"pacsai report: error: invalid report parameters: {message}"
    assert not (tmp_path / "pacs").exists()  # rejected before anything is opened


def test_every_problem_at_once_without_pydantic_wording():
    with pytest.raises(ReportError) as err:
        validate_parameters(patient_id="", fractions="abc", structures_from="modl", margin=3)
    text = str(err.value)
    assert "patient_id (PATIENT_ID): must not be empty (got '')" in text
    assert "fractions (--fractions): must be a whole number (got 'abc')" in text
    assert "structures_from (--structures-from): must be 'pacs' or 'model' (got 'modl')" in text
    assert "margin is not a report parameter (they are: patient_id, study_uid," in text
    for jargon in ("Value error", "Input should", "Extra inputs", "String should", "type="):
        assert jargon not in text
    with pytest.raises(ReportError, match=r"patient_id \(PATIENT_ID\) is required$"):
        validate_parameters()
