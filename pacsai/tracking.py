"""MLflow conventions: the embedded store, run tags, PHI-free manifests and the model registry.

Store
    By default an embedded store under ``mlruns/`` of the working directory: SQLite ``mlruns/mlflow.db`` for
    tracking and the registry, artifacts in ``mlruns/artifacts/`` (MLflow 3 refuses its old file store, so it is
    never used). ``MLFLOW_TRACKING_URI`` or ``PACSAI_MLFLOW_URI`` (``Settings.mlflow_uri``) point elsewhere, e.g.
    a tracking server. Telemetry is switched off (``MLFLOW_ENABLE_TELEMETRY=false``, ``DO_NOT_TRACK=1``) before
    mlflow is first imported through this module. Before a process first uses the embedded store,
    :func:`_prepare_store` creates it (schema and all) under a file lock, so two processes starting on a fresh
    project (e.g. two Dask workers) do not race in MLflow's schema set-up, and rewrites its absolute artifact
    locations if the project folder was copied or moved (:func:`pacsai.mlstore.relocate`).

Experiments
    Every experiment pacsai creates or serves carries ``mlflow.experimentKind=custom_model_development``: the MLflow 3
    UI then opens it in the classic machine-learning view (runs, metrics, registered models) instead of the GenAI
    view (traces), which it picks for experiments without that tag.

Runs
    :func:`start_run` tags every run with ``pacsai.kind`` (training / validation / report), ``pacsai.git_sha``,
    ``pacsai.cohort_hash`` and ``pacsai.version``, names it by kind, experiment and time
    (:func:`default_run_name`: ``train demo-thorax 2026-12-01 14:03``, ``validate pacsai-thorax v3``,
    ``report p-0123...``), sets its source (:func:`run_source`: the CLI verb or the notebook, never
    ``ipykernel_launcher.py``) and logs the cohort: its manifest (``inputs/manifest.json``) and an MLflow dataset
    (``cohort``, digest = the cohort's content hash) in the run's Datasets.

No UIDs, no dates
    What :func:`start_run` logs (parameters, tags, run name, manifest, dataset) holds no DICOM UID and no calendar
    date unless ``Settings.log_phi`` is true: UIDs become keyed hashes (:func:`pacsai.privacy.hash_uid`), dates days
    relative to the patient's first study (:func:`pacsai.privacy.scrub`). Whatever else a caller logs goes through
    :meth:`RunContext.scrub`. ``inputs/cohort.parquet`` holds the pseudonymised cohort too (UIDs as the same keyed
    hashes); the validation notebook finds the held-out series again in the PACS by them
    (:func:`pacsai.cohort.resolve_cohort`, under the same key).

Pseudonyms
    No patient name or ID goes into MLflow unless ``Settings.log_phi`` is true. Patients are named by
    :func:`pseudonymize`, an HMAC-SHA256 keyed by ``Settings.pseudonym_key`` (env ``PACSAI_PSEUDONYM_KEY``).
    Without a configured key a random key is created once per store and kept beside it in
    ``mlruns/.pseudonym_key`` (mode 0600): pseudonyms are then stable within that store but differ between
    stores, so set ``PACSAI_PSEUDONYM_KEY`` wherever several machines share a tracking server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from pacsai import __version__, privacy
from pacsai.errors import TrackingError
from pacsai.mlstore import relocate

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.cohort import Cohort
    from pacsai.config import Settings

logger = logging.getLogger(__name__)

KINDS = ("training", "validation", "report")
CHAMPION = "champion"
PROJECT_DIR = Path(__file__).resolve().parents[1]
STORE_DIR = "mlruns"
KEY_FILE = ".pseudonym_key"
#: Lock file in the embedded store's folder: processes creating or relocating the store take turns on it.
LOCK_FILE = ".pacsai-store.lock"
#: The experiment tag the MLflow 3 UI reads to choose its view, and the value of the classic machine-learning view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML_KIND = "custom_model_development"


def _mlflow() -> ModuleType:
    """Import mlflow with telemetry off (the variables must be set before its first import)."""
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import mlflow

    return mlflow


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from pacsai.config import load_settings

    return load_settings()


def store_dir(*, root: str | Path | None = None) -> Path:
    """The embedded store's folder, ``<root or cwd>/mlruns``."""
    return (Path(root) if root is not None else Path.cwd()).resolve() / STORE_DIR


def tracking_uri(*, settings: Settings | None = None, root: str | Path | None = None) -> str:
    """The tracking (and registry) URI to use.

    ``MLFLOW_TRACKING_URI`` wins, then ``PACSAI_MLFLOW_URI`` / ``settings.mlflow_uri``, then the embedded
    SQLite store ``sqlite:///<root or cwd>/mlruns/mlflow.db``.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    configured = os.environ.get("PACSAI_MLFLOW_URI") or (settings.mlflow_uri if settings else None)
    if configured:
        return configured
    return f"sqlite:///{store_dir(root=root) / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifact root for new experiments: ``mlruns/artifacts`` beside an embedded SQLite store.

    For a tracking server (http...) ``None``: the server decides where artifacts go.
    """
    local = _sqlite_path(uri)
    if local is None:
        return None
    return (local.parent / "artifacts").as_uri()


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :])).resolve()


# SQLite files of embedded stores this process has prepared (created if new, relocated if moved).
_PREPARED: set[Path] = set()
_PREPARED_GUARD = threading.Lock()


def _prepare_store(uri: str) -> None:
    """Make the embedded store of ``uri`` ready before MLflow opens it; nothing for a tracking server.

    Once per process and store: create the folder, ``artifacts/`` and the database with MLflow's full schema,
    under an exclusive lock on ``LOCK_FILE`` in that folder (MLflow creates a missing schema lazily and without a
    lock: two processes doing so at the same moment fail with "table alembic_version already exists"); then,
    under the same lock, point its absolute artifact locations at this folder if the project was copied or moved
    (:func:`pacsai.mlstore.relocate`), so a moved project never writes into its old folder.
    """
    db = _sqlite_path(uri)
    if db is None:
        return
    with _PREPARED_GUARD:
        if db in _PREPARED and db.is_file():
            return
        try:
            (db.parent / "artifacts").mkdir(parents=True, exist_ok=True)
            with _store_lock(db.parent):
                if not _has_schema(db):
                    _create_schema(uri)
                relocate(db)
        except (OSError, sqlite3.Error) as err:
            raise TrackingError(
                f"cannot prepare the MLflow store {db.parent}: {err}; check that the folder is writable, or "
                "point PACSAI_MLFLOW_URI elsewhere"
            ) from err
        _PREPARED.add(db)


@contextlib.contextmanager
def _store_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/LOCK_FILE`` (across processes and threads: one open file each)."""
    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _has_schema(db: Path) -> bool:
    """Whether ``db`` holds an MLflow schema (its alembic revision table); a missing file holds none."""
    if not db.is_file():
        return False
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        ).fetchone()
        return found is not None and conn.execute("SELECT 1 FROM alembic_version").fetchone() is not None


def _create_schema(uri: str) -> None:
    """Create the embedded store's database (tracking and registry tables, the Default experiment) now."""
    _mlflow()  # telemetry off before mlflow's first import
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, artifact_location(uri))
    store.engine.dispose()
    logger.info("created the MLflow store %s", uri)


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[str]:
    """Point mlflow's fluent API (``mlflow.start_run``, ``mlflow.log_*``, ``mlflow.artifacts``) at ``uri``
    for the duration of the block, then restore what was there.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the environment (for subprocesses); left
    in place, it would override :func:`tracking_uri` for the rest of the process, e.g. after a ``chdir``. The
    registry follows the tracking URI unless ``MLFLOW_REGISTRY_URI`` is set.
    """
    mlflow = _mlflow()
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    _prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(old_env)  # None unsets both mlflow's global and the variable
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def client(*, settings: Settings | None = None) -> Any:
    """An ``MlflowClient`` on :func:`tracking_uri` (tracking and registry on the same store)."""
    uri = tracking_uri(settings=settings)
    _prepare_store(uri)
    mlflow = _mlflow()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str, *, settings: Settings | None = None) -> str:
    """The id of experiment ``name``, created with its artifacts under ``mlruns/artifacts/`` if new."""
    uri = tracking_uri(settings=settings)
    c = client(settings=settings)
    try:
        found = c.get_experiment_by_name(name)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in (found.tags or {}):
                c.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML_KIND)
            return str(found.experiment_id)
        location = artifact_location(uri)
        if location is not None:
            # one folder per experiment name keeps artifacts browsable; run ids make the paths unique anyway
            location = f"{location}/{_safe_name(name)}"
        return str(
            c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: CLASSIC_ML_KIND})
        )
    except Exception as err:
        if isinstance(err, TrackingError):
            raise
        raise TrackingError(f"cannot open or create MLflow experiment {name!r} at {uri}: {err}") from err


def open_in_classic_view(*, settings: Settings | None = None) -> list[str]:
    """Tag every experiment of the store that has no ``mlflow.experimentKind`` for the classic ML view.

    Experiments created before pacsai set the tag (or by plain ``mlflow``) would otherwise open in the GenAI view,
    where training runs are hidden. Returns the names of the experiments tagged now.
    """
    c = client(settings=settings)
    tagged = []
    try:
        for experiment in c.search_experiments():
            if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
                c.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML_KIND)
                tagged.append(str(experiment.name))
    except Exception as err:
        raise TrackingError(f"cannot tag the experiments of {tracking_uri(settings=settings)}: {err}") from err
    return tagged


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "experiment"


# ---------------------------------------------------------------------------------------------------- provenance


def git_sha() -> str:
    """``git rev-parse HEAD`` of the installed project, ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha or "unknown"


# ---------------------------------------------------------------------------------------------------- pseudonyms


def pseudonymize(patient_id: str, key: str | bytes) -> str:
    """A stable pseudonym for ``patient_id``: ``"p-"`` + the first 16 hex digits of HMAC-SHA256(key, id).

    Parameters
    ----------
    patient_id
        The identifier to hide (PatientID, or any other identifying string).
    key
        The secret key; see :func:`pseudonym_key`.
    """
    if isinstance(key, str):
        key = key.encode()
    if not key:
        raise TrackingError("the pseudonym key is empty; set PACSAI_PSEUDONYM_KEY to a long random string")
    digest = hmac.new(key, str(patient_id).encode(), hashlib.sha256).hexdigest()
    return f"p-{digest[:16]}"


def pseudonym_key(*, settings: Settings | None = None, root: str | Path | None = None) -> str:
    """The key for :func:`pseudonymize`.

    ``settings.pseudonym_key`` (env ``PACSAI_PSEUDONYM_KEY``) if set; otherwise a random key created once
    and kept in ``.pseudonym_key`` (mode 0600) beside the SQLite store, or in ``<root or cwd>/mlruns`` for a
    tracking server.
    """
    s = _settings(settings)
    if s.pseudonym_key is not None and s.pseudonym_key.get_secret_value():
        return s.pseudonym_key.get_secret_value()
    local = _sqlite_path(tracking_uri(settings=s, root=root))
    folder = local.parent if local is not None else store_dir(root=root)
    path = folder / KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    try:
        # Written whole under a temporary name (mode 0600), then linked into place: two processes creating the key
        # at once end up with the same key (the first link wins) and neither reads a half-written file.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{KEY_FILE}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text().strip()
        finally:
            os.unlink(tmp)
    except OSError as err:
        raise TrackingError(
            f"cannot create the pseudonym key {path}: {err}; set PACSAI_PSEUDONYM_KEY instead"
        ) from err
    logger.info("created a pseudonym key for this store at %s", path)
    return key


def check_no_phi(values: Mapping[str, Any], identifiers: Iterable[str], *, what: str = "values") -> None:
    """Raise :class:`TrackingError` if any identifier occurs in a key or value of ``values``.

    Identifiers shorter than 3 characters are ignored (they would match everything).
    """
    ids = [str(i) for i in identifiers if i is not None and len(str(i)) >= 3]
    for k, v in values.items():
        text = f"{k}={v}"
        for ident in ids:
            if ident in text:
                raise TrackingError(
                    f"MLflow {what} {k!r} contains a patient identifier; pseudonymise it with "
                    "pacsai.tracking.pseudonymize, or set PACSAI_LOG_PHI=true to allow identifiers"
                )


# ---------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunContext:
    """What :func:`start_run` yields: the active MLflow run and the means to name patients safely."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    key: str = field(repr=False)
    log_phi: bool = False

    def patient_label(self, patient_id: str) -> str:
        """The name under which a patient may appear in MLflow (pseudonym unless PHI logging is allowed)."""
        return str(patient_id) if self.log_phi else pseudonymize(patient_id, self.key)

    def uid_label(self, uid: str) -> str:
        """The name under which a DICOM UID may appear in MLflow (keyed hash unless PHI logging is allowed)."""
        return str(uid) if self.log_phi else privacy.hash_uid(str(uid), self.key)

    def scrub(self, obj: Any, *, reference_date: dt.date | str | None = None) -> Any:
        """``obj`` fit for MLflow: UIDs hashed, dates as days since ``reference_date`` (the patient's first study;
        default the earliest date in ``obj``); unchanged when PHI logging is allowed. See
        :func:`pacsai.privacy.scrub`."""
        return obj if self.log_phi else privacy.scrub(obj, key=self.key, reference_date=reference_date)


_RUN_VERBS = {"training": "train", "validation": "validate", "report": "report"}


def default_run_name(
    kind: str, *, experiment: str, tags: Mapping[str, str] | None = None, now: dt.datetime | None = None
) -> str:
    """A run name by kind, experiment and time.

    ``train demo-thorax 2026-12-01 14:03``; ``validate pacsai-thorax v3`` (from the tags ``pacsai.model_name`` and
    ``pacsai.model_version``); ``report p-0123456789abcdef`` (tag ``pacsai.patient``, a pseudonym). Without those
    tags, the experiment and the local time stand in.
    """
    tags = dict(tags or {})
    verb = _RUN_VERBS.get(kind, kind)
    if kind == "validation" and tags.get("pacsai.model_name") and tags.get("pacsai.model_version"):
        return f"{verb} {tags['pacsai.model_name']} v{tags['pacsai.model_version']}"
    if kind == "report" and tags.get("pacsai.patient"):
        return f"{verb} {tags['pacsai.patient']}"
    when = (now or dt.datetime.now()).strftime("%Y-%m-%d %H:%M")
    return f"{verb} {experiment} {when}"


def run_source(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """What started the run, as MLflow's ``(mlflow.source.name, mlflow.source.type)``.

    In a Jupyter kernel the notebook (``JPY_SESSION_NAME``, which Jupyter Server sets to the notebook's path;
    ``PACSAI_RUN_SOURCE`` where a runner such as papermill names it), never ``ipykernel_launcher.py``. From the
    CLI ``pacsai <verb>`` only: the rest of the command line may hold a PatientID or a PACS password.
    """
    argv = list(sys.argv if argv is None else argv)
    env = os.environ if environ is None else environ
    if env.get("PACSAI_RUN_SOURCE"):
        return env["PACSAI_RUN_SOURCE"], "NOTEBOOK" if env["PACSAI_RUN_SOURCE"].endswith(".ipynb") else "LOCAL"
    program = Path(argv[0]).name if argv else ""
    if "ipykernel" in program or program == "-c" and "ipykernel" in " ".join(argv):
        notebook = env.get("JPY_SESSION_NAME", "")
        return (Path(notebook).name if notebook else "notebook (Jupyter kernel)"), "NOTEBOOK"
    # the console script `pacsai`, or `python -m pacsai` (argv[0] is then pacsai/__main__.py)
    is_pacsai = program == "pacsai" or (program == "__main__.py" and Path(argv[0]).parent.name == "pacsai")
    if is_pacsai:
        verb = next((a for a in argv[1:] if not a.startswith("-")), "")
        return f"pacsai {verb}".strip(), "LOCAL"
    if program == "__main__.py":  # python -m <package>: name the package, not its entry file
        return f"python -m {Path(argv[0]).parent.name}", "LOCAL"
    return (program or "python"), "LOCAL"


@contextlib.contextmanager
def start_run(
    kind: str,
    *,
    experiment: str,
    cohort: Cohort | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    source: str | None = None,
    settings: Settings | None = None,
) -> Iterator[RunContext]:
    """Start an MLflow run with pacsai's tags and the cohort's UID manifest.

    Parameters
    ----------
    kind
        ``"training"``, ``"validation"`` or ``"report"`` (tag ``pacsai.kind``).
    experiment
        MLflow experiment name; created with artifacts under ``mlruns/artifacts/`` when new.
    cohort
        Input cohort: tag ``pacsai.cohort_hash`` and artifacts ``inputs/manifest.json`` and
        ``inputs/cohort.parquet`` (pseudonyms, UIDs as keyed hashes unless ``log_phi``).
    params, tags
        Logged as given, after a check that they hold no identifier of the cohort's patients.
    run_name
        Run name (checked like params); default :func:`default_run_name`.
    run_id
        Continue this existing run (resumed training) instead of starting a new one.
    source
        What started the run (``mlflow.source.name``), e.g. the notebook a runner executes; default
        :func:`run_source`.
    settings
        Settings; default :func:`pacsai.load_settings`.

    Yields
    ------
    RunContext
        The run id and :meth:`RunContext.patient_label` for naming patients.
    """
    if kind not in KINDS:
        raise TrackingError(f"run kind {kind!r} is not one of {', '.join(KINDS)}")
    s = _settings(settings)
    uri = tracking_uri(settings=s)
    mlflow = _mlflow()
    experiment_id = ensure_experiment(experiment, settings=s)
    key = pseudonym_key(settings=s)
    identifiers = cohort.identifiers() if (cohort is not None and not s.log_phi) else []
    source, source_type = (source, "NOTEBOOK" if source.endswith(".ipynb") else "LOCAL") if source else run_source()
    all_tags = {
        "pacsai.kind": kind,
        "pacsai.git_sha": git_sha(),
        "pacsai.version": __version__,
        "pacsai.cohort_hash": cohort.content_hash if cohort is not None else "none",
        "pacsai.log_phi": str(bool(s.log_phi)).lower(),
        "mlflow.source.name": source,
        "mlflow.source.type": source_type,
        **dict(tags or {}),
    }
    if not s.log_phi:  # a study UID as a parameter, a date in a tag: hashed and made relative like everything else
        params = privacy.scrub(dict(params or {}), key=key)
        all_tags = privacy.scrub(all_tags, key=key)
    if run_name is None and run_id is None:
        run_name = default_run_name(kind, experiment=experiment, tags=all_tags)
    check_no_phi(dict(params or {}), identifiers, what="parameter")
    check_no_phi(all_tags, identifiers, what="tag")
    if run_name:
        check_no_phi({"run_name": run_name}, identifiers, what="run name")
    if run_id is not None:
        all_tags = {k: v for k, v in all_tags.items() if k != "pacsai.cohort_hash" or cohort is not None}
    with (
        using_store(uri),
        mlflow.start_run(
            run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else run_name, tags=all_tags
        ) as run,
    ):
        ctx = RunContext(
            run_id=run.info.run_id, experiment_id=experiment_id, tracking_uri=uri, key=key, log_phi=s.log_phi
        )
        if params:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        if cohort is not None:
            log_cohort(cohort, ctx=ctx, context=kind)
        yield ctx


def _param_value(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def log_cohort(
    cohort: Cohort, *, ctx: RunContext, artifact_path: str = "inputs", context: str = "training"
) -> None:
    """Log the cohort to the active run: manifest, parquet table and an MLflow dataset.

    ``manifest.json`` and the dataset (name ``cohort``, digest = the first 20 hex digits of the content hash,
    shown under the run's Datasets) name patients by pseudonym and UIDs by keyed hash; so does ``cohort.parquet``
    (:meth:`Cohort.pseudonymised`: the validation notebook resolves those hashes in the PACS again). With
    ``log_phi`` everything keeps the real IDs and UIDs.
    """
    mlflow = _mlflow()
    import pandas as pd

    if not ctx.log_phi:  # whoever calls with a real cohort: nothing identifying reaches the parquet
        cohort = cohort.pseudonymised(ctx.key)

    manifest = ctx.scrub(cohort.manifest(patient_label=ctx.patient_label))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        cohort.to_parquet(folder / "cohort.parquet", patient_label=ctx.patient_label)
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
    rows = pd.DataFrame(manifest["rows"])
    rows["roi_names"] = [", ".join(names) for names in cohort.table["roi_names"]]
    dataset = mlflow.data.from_pandas(rows, name="cohort", digest=cohort.content_hash[:20])
    mlflow.log_input(dataset, context=context, tags={"pacsai.cohort_hash": cohort.content_hash})


def log_json(obj: Any, artifact_file: str) -> None:
    """Log a JSON document as an artifact of the active run."""
    _mlflow().log_dict(obj, artifact_file)


# ---------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelRef:
    """A registered model version: name, version, the run that produced it, and its storage URI."""

    name: str
    version: str
    run_id: str | None
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_model(model_uri: str, *, settings: Settings | None = None) -> ModelRef:
    """Resolve ``models:/name@alias``, ``models:/name/3``, ``models:/name/latest`` to a :class:`ModelRef`.

    ``runs:/...`` and other URIs are returned with name ``""`` and version ``""`` (no registry entry).
    """
    c = client(settings=settings)
    parsed = urlparse(model_uri)
    if parsed.scheme != "models":
        run_id = (parsed.netloc or parsed.path.lstrip("/").split("/")[0]) if parsed.scheme == "runs" else None
        return ModelRef(name="", version="", run_id=run_id, source=model_uri)
    path = model_uri[len("models:/") :]
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, _, version = path.partition("/")
            if not version or version == "latest":
                versions = c.search_model_versions(f"name='{name}'")
                if not versions:
                    raise TrackingError(f"no version of registered model {name!r}; train one first")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                mv = c.get_model_version(name, version)
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(
            f"cannot resolve {model_uri} in {tracking_uri(settings=settings)}: {err}; "
            "check the name/version (pacsai ui lists them) or MLFLOW_TRACKING_URI"
        ) from err
    return ModelRef(name=mv.name, version=str(mv.version), run_id=mv.run_id, source=mv.source)


def register_model(model_uri: str, name: str, *, settings: Settings | None = None) -> ModelRef:
    """Register ``model_uri`` (``runs:/`` or ``models:/m-...``) under ``name``; returns the new version."""
    mlflow = _mlflow()
    uri = tracking_uri(settings=settings)
    try:
        with using_store(uri):
            mv = mlflow.register_model(model_uri, name)
    except Exception as err:
        raise TrackingError(f"cannot register {model_uri} as {name!r} in {uri}: {err}") from err
    return ModelRef(name=mv.name, version=str(mv.version), run_id=mv.run_id, source=mv.source)


def set_alias(
    name: str, version: str | int, alias: str = CHAMPION, *, settings: Settings | None = None
) -> None:
    """Point ``models:/name@alias`` at ``version`` (default alias ``champion``)."""
    c = client(settings=settings)
    try:
        c.set_registered_model_alias(name, alias, str(version))
    except Exception as err:
        raise TrackingError(f"cannot set alias {alias!r} of {name!r} to version {version}: {err}") from err


def get_alias(name: str, alias: str = CHAMPION, *, settings: Settings | None = None) -> str | None:
    """The version behind ``models:/name@alias``, or ``None`` when the alias is not set."""
    c = client(settings=settings)
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such alias (or no such model): nothing is promoted
        raise TrackingError(f"cannot read alias {alias!r} of {name!r}: {err}") from err


# ---------------------------------------------------------------------------------------------------- validation

VALIDATION_TAG = "pacsai.validation"
_SECTION_START = "<!-- pacsai:validation -->"
_SECTION_END = "<!-- /pacsai:validation -->"


_ML_VIEW = "?workflowType=machine_learning"


def experiment_page(experiment_id: str) -> str:
    """The UI route of an experiment's runs in the classic machine-learning view (relative, ``#/...``)."""
    return f"#/experiments/{experiment_id}/runs{_ML_VIEW}"


def model_version_page(name: str, version: str | int) -> str:
    """The UI route of a registered model version (relative, ``#/...``)."""
    return f"#/models/{name}/versions/{version}"


def run_link(run_id: str, experiment_id: str, *, uri: str, path: str = "") -> str:
    """A link to a run (or one of its artifacts) in the MLflow UI.

    Absolute for a tracking server; for the embedded store relative (``#/experiments/...``), which resolves
    inside the UI that ``pacsai ui`` serves from the same store.
    """
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if path:
        page += f"/artifacts/{path}"
    page += _ML_VIEW  # MLflow 3.17 shows a run in the GenAI layout without it
    return f"{uri.rstrip('/')}/{page}" if uri.startswith(("http://", "https://")) else page


def _fmt(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if number == number else "not evaluable"  # NaN != NaN


def validation_markdown(
    *,
    passed: bool,
    rows: Iterable[Mapping[str, Any]],
    failures: Iterable[str],
    run_id: str,
    run_url: str,
    notebook_url: str,
    notebook_artifact: str,
    n_cases: int = 0,
) -> str:
    """The validation section of a model version's description (markdown, between marker comments)."""
    status = "PASS" if passed else "FAIL"
    lines = [
        _SECTION_START,
        f"## Validation: {status}",
        "",
        f"Validation run [`{run_id}`]({run_url})"
        + (f" on {n_cases} held-out patient{'s' if n_cases != 1 else ''}" if n_cases else "")
        + f"; executed notebook [`{notebook_artifact}`]({notebook_url}) (`runs:/{run_id}/{notebook_artifact}`).",
        "",
        "| Structure | Metric | Limit | Measured | Result |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        result = "pass" if row.get("passed") else "**FAIL**"
        lines.append(
            f"| {row.get('structure', '')} | {row.get('metric') or '—'} | {row.get('limit') or 'none'} | "
            f"{_fmt(row.get('value'))} | {result} |"
        )
    failed = list(failures)
    if failed:
        lines += ["", "Not promoted:", *[f"- {line}" for line in failed]]
    else:
        lines += ["", "Every structure the model outputs met its limits."]
    lines.append(_SECTION_END)
    return "\n".join(lines)


def _merge_description(existing: str | None, section: str) -> str:
    """Put ``section`` into ``existing``: replacing an earlier validation section, else appended (model card
    and anything else written there stay)."""
    text = existing or ""
    start, end = text.find(_SECTION_START), text.find(_SECTION_END)
    if start >= 0 and end > start:
        return text[:start] + section + text[end + len(_SECTION_END) :]
    return f"{text.rstrip()}\n\n{section}" if text.strip() else section


def record_validation(
    name: str,
    version: str | int,
    *,
    run_id: str,
    passed: bool,
    rows: Iterable[Mapping[str, Any]],
    failures: Iterable[str] = (),
    notebook_artifact: str = "",
    n_cases: int = 0,
    settings: Settings | None = None,
) -> None:
    """Write a validation's outcome onto the model version, and point the validation run at the version.

    Model version tags: ``pacsai.validation.status`` (pass/fail), ``pacsai.validation.run_id``, and per gate row
    ``pacsai.validation.<metric>_<structure>`` (measured) and ``pacsai.validation.limit.<metric>_<structure>``
    (e.g. ``≥ 0.97``); earlier ``pacsai.validation.*`` tags are removed first, so none outlives its validation.
    The description gets a markdown section with the table and links to the run and its notebook (an existing
    description, such as the model card, is kept; an earlier validation section is replaced). The run gets
    ``pacsai.validated_model`` (``models:/name/version``) and ``pacsai.validation.status``.

    Parameters
    ----------
    rows
        Gate rows (:func:`pacsai.learning.validate.gate_rows`): structure, metric, limit, value, passed.
    """
    c = client(settings=settings)
    version = str(version)
    rows = list(rows)
    failures = list(failures)
    status = "pass" if passed else "fail"
    try:
        mv = c.get_model_version(name, version)
        run = c.get_run(run_id)
        for key in list(mv.tags or {}):
            if key.startswith(f"{VALIDATION_TAG}."):
                c.delete_model_version_tag(name, version, key)
        tags = {
            f"{VALIDATION_TAG}.status": status,
            f"{VALIDATION_TAG}.run_id": run_id,
            f"{VALIDATION_TAG}.failures": str(len(failures)),
        }
        if notebook_artifact:
            tags[f"{VALIDATION_TAG}.notebook"] = f"runs:/{run_id}/{notebook_artifact}"
        for row in rows:
            if not row.get("metric"):
                continue  # an output without a threshold: in the failures and the description
            metric = f"{row['metric']}_{row['structure']}"
            tags[f"{VALIDATION_TAG}.{metric}"] = _fmt(row.get("value"))
            tags[f"{VALIDATION_TAG}.limit.{metric}"] = str(row.get("limit", ""))
        for key, value in tags.items():
            c.set_model_version_tag(name, version, key, value)
        uri = tracking_uri(settings=settings)
        experiment_id = run.info.experiment_id
        section = validation_markdown(
            passed=passed,
            rows=rows,
            failures=failures,
            run_id=run_id,
            run_url=run_link(run_id, experiment_id, uri=uri),
            notebook_url=run_link(run_id, experiment_id, uri=uri, path=notebook_artifact),
            notebook_artifact=notebook_artifact,
            n_cases=n_cases,
        )
        c.update_model_version(name, version, description=_merge_description(mv.description, section))
        c.set_tag(run_id, "pacsai.validated_model", f"models:/{name}/{version}")
        c.set_tag(run_id, f"{VALIDATION_TAG}.status", status)
        # the run's description (shown on its page): which version it judged, with a link back
        page = model_version_page(name, version)
        link = f"{uri.rstrip('/')}/{page}" if uri.startswith(("http://", "https://")) else page
        verdict = "passed: eligible as champion" if passed else f"failed ({len(failures)} reasons): not promoted"
        c.set_tag(run_id, "mlflow.note.content",
                  f"Validation of [{name} v{version}]({link}) (`models:/{name}/{version}`): {verdict}. "
                  "The limits and measured values are in the version's description and tags.")
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(
            f"cannot record validation run {run_id} on model {name!r} version {version}: {err}"
        ) from err


def set_model_card(name: str, version: str | int, card: str, *, settings: Settings | None = None) -> None:
    """Put the model card (markdown, :func:`pacsai.learning.card.model_card`) at the top of the version's
    description; a validation section already there stays below it."""
    c = client(settings=settings)
    try:
        existing = c.get_model_version(name, str(version)).description or ""
        start, end = existing.find(_SECTION_START), existing.find(_SECTION_END)
        section = existing[start : end + len(_SECTION_END)] if start >= 0 and end > start else ""
        text = f"{card.rstrip()}\n\n{section}" if section else card
        c.update_model_version(name, str(version), description=text)
    except Exception as err:
        raise TrackingError(f"cannot write the model card of {name!r} version {version}: {err}") from err


def validation_status(name: str, version: str | int, *, settings: Settings | None = None) -> dict[str, str]:
    """The ``pacsai.validation.*`` tags of a model version, without the prefix (``{}``: never validated)."""
    c = client(settings=settings)
    try:
        mv = c.get_model_version(name, str(version))
    except Exception as err:
        raise TrackingError(f"cannot read model {name!r} version {version}: {err}") from err
    prefix = f"{VALIDATION_TAG}."
    return {k[len(prefix) :]: v for k, v in (mv.tags or {}).items() if k.startswith(prefix)}
