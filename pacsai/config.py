"""One settings object: defaults < experiment YAML < environment (``PACSAI_*``) and ``.env``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from platformdirs import user_cache_dir
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pacsai.errors import ConfigError

DEFAULT_PACS_URL = "file://./pacs"


def default_cache_dir() -> Path:
    return Path(user_cache_dir("pacsai", appauthor=False))


class Settings(BaseSettings):
    """Everything pacsai reads from its environment.

    Environment variables use the prefix ``PACSAI_`` (``PACSAI_PACS_URL``, ``PACSAI_PACS_PASSWORD`` ...).
    Secrets are :class:`pydantic.SecretStr`, so they never show up in ``repr`` or logs. Credentials come only
    from here (environment, ``.env``) or a netrc file (``pacs_netrc``; see :mod:`pacsai.pacs.credentials`),
    never from the command line.
    """

    model_config = SettingsConfigDict(
        env_prefix="PACSAI_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    pacs_url: str = Field(DEFAULT_PACS_URL, description="DICOMweb base URL, or file:// for the embedded store")
    pacs_user: str | None = None
    pacs_password: SecretStr | None = None
    pacs_token: SecretStr | None = None
    pacs_netrc: Path | None = Field(
        None, description="netrc file with the PACS host's login (default: $NETRC, else ~/.netrc, as requests)"
    )
    pacs_ca_bundle: Path | None = Field(None, description="CA bundle for a hospital's TLS certificates")
    pacs_verify: bool = Field(True, description="verify TLS certificates (on by default)")
    pacs_timeout: float = Field(30.0, description="seconds to wait for the PACS to answer")
    pacs_connect_timeout: float = Field(10.0, description="seconds to wait for a connection")
    pacs_retries: int = Field(4, description="retries on 429/5xx and dropped connections")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default: mlruns/ (SQLite)")
    pseudonym_key: SecretStr | None = Field(None, description="key of the keyed hash that pseudonymises IDs")
    log_phi: bool = Field(False, description="allow patient identifiers in MLflow and logs")
    experiment: dict[str, Any] = Field(default_factory=dict, description="the experiment YAML, as read")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats .env beats values from the YAML (passed as init kwargs) beats defaults.
        return env_settings, dotenv_settings, init_settings, file_secret_settings


def load_settings(experiment: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings: defaults < experiment YAML (its ``settings:`` mapping) < environment < ``overrides``.

    Parameters
    ----------
    experiment
        Path of an experiment YAML. Its top-level ``settings`` mapping sets any :class:`Settings` field;
        the whole document is kept in ``Settings.experiment``.
    overrides
        Explicit values; they win over everything.
    """
    values: dict[str, Any] = {}
    if experiment is not None:
        path = Path(experiment)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"experiment file {path} does not exist; pass an existing YAML") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"experiment file {path} is not valid YAML: {err}") from err
        if not isinstance(doc, dict):
            raise ConfigError(f"experiment file {path} must hold a mapping at the top level")
        if "pacs" in doc:
            # An earlier layout documented a ``pacs:`` block that nothing read: refuse it rather than ignore it.
            raise ConfigError(f"experiment file {path}: the top-level `pacs:` block is not read; put the PACS URL "
                              "under `settings: {pacs_url: ...}` (or set PACSAI_PACS_URL)")
        values.update(doc.get("settings") or {})
        values["experiment"] = doc
    try:
        settings = Settings(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"PACSAI_{'_'.join(str(part) for part in e['loc']).upper()}={e.get('input')!r}: {e['msg']}"
            for e in err.errors()
            if not any("password" in str(part) or "token" in str(part) or "key" in str(part) for part in e["loc"])
        ) or "a secret setting is invalid"
        raise ConfigError(f"invalid settings ({problems}); fix the environment, .env or the experiment file") from err
    if overrides:
        settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return settings
