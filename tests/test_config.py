from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacsai.config import DEFAULT_PACS_URL, load_settings
from pacsai.errors import ConfigError


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PACSAI_CACHE_DIR")
    s = load_settings()
    assert s.pacs_url == DEFAULT_PACS_URL == "file://./pacs"
    assert s.pacs_verify is True
    assert s.pacs_password is None
    assert "pacsai" in str(s.cache_dir)


def test_yaml_then_env_then_overrides(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "x.yaml"
    exp.write_text("settings:\n  pacs_url: http://yaml:8042/dicom-web\n  pacs_timeout: 5\nmodel:\n  name: m\n")
    s = load_settings(exp)
    assert s.pacs_url == "http://yaml:8042/dicom-web"
    assert s.pacs_timeout == 5.0
    assert s.experiment["model"] == {"name": "m"}
    monkeypatch.setenv("PACSAI_PACS_URL", "https://env/dicom-web")
    monkeypatch.setenv("PACSAI_PACS_PASSWORD", "s3cret")
    s = load_settings(exp)
    assert s.pacs_url == "https://env/dicom-web"
    assert s.pacs_timeout == 5.0
    assert s.pacs_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert load_settings(exp, pacs_url="file:///tmp/x").pacs_url == "file:///tmp/x"


def test_dotenv(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PACSAI_PACS_USER=alice\nPACSAI_PACS_TOKEN=tok\n")
    s = load_settings()
    assert s.pacs_user == "alice"
    assert s.pacs_token.get_secret_value() == "tok"


@pytest.mark.parametrize("text", ["[1, 2]", "a: [unclosed"])
def test_bad_yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_settings(p)


def test_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_import_is_light():
    """Importing pacsai (and its CLI) never imports torch, monai or mlflow."""
    code = (
        "import sys, pacsai, pacsai.cli, pacsai.imaging; "
        "bad = [m for m in ('torch', 'monai', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_a_pacs_block_in_the_experiment_is_refused_not_ignored(tmp_path):
    """Regression (#14): config documented ``pacs:`` keys that nothing read; now they are an error naming the fix."""
    exp = tmp_path / "e.yaml"
    exp.write_text("pacs:\n  url: http://ignored:8042/dicom-web\n")
    with pytest.raises(ConfigError, match=r"settings: \{pacs_url"):
        load_settings(exp)
