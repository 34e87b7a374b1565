"""Train the neighbor-conditioned diffusion model on mined cluster shards.

    python jobs/train.py --preset cpu                      # local: starts Ray in process
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --preset debug

Reads `<data.root>/<preset>/clusters` (written by jobs/prepare_data.py; data.root is a folder or a
URI such as s3://bucket/prefix), trains with Ray Train + DeepSpeed, logs to MLflow, exports the EMA
pipeline and registers it as `models:/<train.registered_model>@candidate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# registering copies the local pipeline folder through MLflow's artifact download, whose progress bar
# ("Downloading artifacts: 100%") would read in the job log as if something were fetched
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # for `ray job submit --working-dir .`

from neighbor_diffusion import config as C  # noqa: E402
from neighbor_diffusion.training import trainer  # noqa: E402


def _train(cfg: C.Config, *, register: bool) -> trainer.TrainOutcome:
    """The mined clusters as a Ray Data stream, trained on (`trainer.train`)."""
    from neighbor_diffusion.data.mining import layout
    from neighbor_diffusion.data.stream import training_dataset

    paths = layout(cfg)  # data.root may be a filesystem URI (s3://bucket/prefix): read before Ray starts
    if not paths["manifest"].is_file():
        raise SystemExit(
            f"no mined clusters at {paths['base']}: run `python jobs/prepare_data.py --preset "
            f"{cfg.preset} --data.root {cfg.data.root}` first"
        )
    manifest = json.loads(paths["manifest"].read_text())
    if not cfg.data.input:  # the synthetic world: the held-out subjects of the samples are drawn from these
        mined = manifest.get("config", {})
        for name in ("num_subjects", "num_heldout_subjects", "seed"):
            if name in mined and mined[name] != getattr(cfg.data, name):
                raise C.ConfigError(
                    f"data.{name}={getattr(cfg.data, name)}, but {paths['base']} was mined with {mined[name]}: "
                    f"its held-out subjects are others, some of them trained on; give {mined[name]}, or run "
                    f"`python jobs/prepare_data.py` with data.{name}={getattr(cfg.data, name)} first"
                )
    num_clusters = manifest["clusters_out"]
    resuming = trainer.check_resumable(cfg, trainer.run_dir_of(cfg))  # a run it cannot resume: said before Ray starts
    trainer.start_ray(cfg)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the job log shows training progress instead
    epochs = trainer.epochs_needed(cfg, num_clusters)
    print(f"[train] {num_clusters} clusters from {paths['clusters']}, {epochs} epochs for {cfg.train.steps} steps")
    dataset = training_dataset(paths["clusters"], cfg, seed=cfg.train.seed, num_epochs=epochs)
    return trainer.train(cfg, {"train": dataset}, register=register, resuming=resuming)


def main(argv: list[str] | None = None) -> trainer.TrainOutcome:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_cli_arguments(parser)
    parser.add_argument("--no-register", action="store_true", help="skip the MLflow model registry")
    parser.add_argument(
        "--export-backbone",
        metavar="FILE",
        help="also write the trained UNet without its neighbor layers to FILE (safetensors), for train.init_from",
    )
    args = parser.parse_args(argv)
    with C.cli_errors(parser):  # a bad --section.field, init_from or resume: one line naming it
        cfg = C.from_cli_args(args)
        outcome = _train(cfg, register=not args.no_register)
    print(f"[train] pipeline:    {outcome.pipeline_dir}")
    print(f"[train] sample grid: {outcome.pipeline_dir.parent / f'samples_step_{cfg.train.steps:06d}.png'}")
    print(f"[train] MLflow run:  {outcome.run_id}  (make mlflow-ui, then http://127.0.0.1:5000)")
    if args.export_backbone:
        from mlflow import MlflowClient

        from neighbor_diffusion.tracking import git_commit

        final = MlflowClient().get_run(outcome.run_id).data.metrics  # the held-out x0 errors at the last step
        provenance = {
            "command": " ".join(["python", *(sys.argv if argv is None else ["jobs/train.py", *argv])]),
            "git_commit": git_commit(),
            "mlflow_run_id": outcome.run_id,
            **{k: f"{v:.4f}" for k, v in sorted(final.items()) if k.startswith(("x0_", "loss"))},
        }
        path = trainer.export_backbone(outcome.pipeline_dir, Path(args.export_backbone), provenance)
        print(f"[train] backbone:    {path}  (--train.init_from {path})")
    if outcome.model_uri:
        print(f"[train] model:       {outcome.model_uri}  (serve it: make serve MODEL={outcome.model_uri})")
    return outcome


if __name__ == "__main__":
    main()
