"""MLflow: the one place for rank-0 side effects (params, metrics, images, registry).

Default store: SQLite file `mlflow.db` + artifact folder `mlartifacts/` in the working
directory (MLflow 3's recommended local setup; the file store is legacy). Any tracking
URI via `MLFLOW_TRACKING_URI`.

A trained model is registered without pickles: the `NeighborDiffusionPipeline`
directory (safetensors + JSON) is logged as run artifacts under `pipeline/`, and a
registry version points at it, so `models:/<name>@<alias>` resolves to that folder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else SQLite in the current directory (absolute, so Ray workers agree)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def setup(experiment: str, uri: str | None = None):
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = Path(DEFAULT_ARTIFACTS).resolve().as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(experiment, artifact_location=location)
    return mlflow.set_experiment(experiment).experiment_id


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except Exception:
        return "unknown"


def register_pipeline(
    run_id: str,
    pipeline_dir: str | os.PathLike,
    name: str,
    alias: str = "candidate",
    tags: dict[str, Any] | None = None,
):
    """Log a pipeline folder to the run and register it as a new version of `name` with `alias`."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    client.log_artifacts(run_id, str(pipeline_dir), artifact_path="pipeline")
    try:
        client.create_registered_model(name, description="Neighbor Diffusion pipelines (subject-driven t2i)")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/pipeline"
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    client.set_registered_model_alias(name, alias, version.version)
    return version


def resolve_pipeline_dir(uri: str) -> Path:
    """A local pipeline folder, or `models:/<name>@<alias>` / `models:/<name>/<version>` from the registry."""
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    path = Path(uri)
    if not path.is_dir():
        raise FileNotFoundError(f"model_uri={uri!r}: neither a models:/ URI nor an existing folder")
    return path
