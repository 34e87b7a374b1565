"""Driver side of training: Ray, the TorchTrainer, MLflow run, export and registry.

`train(cfg, dataset)` validates the DeepSpeed config before any worker starts, creates
(or, when resuming, reuses) the MLflow run, runs `train_loop_per_worker` on
`cfg.train.num_workers` Ray Train workers, then exports the EMA weights of the last
checkpoint as a `NeighborDiffusionPipeline` folder and registers it in MLflow.
Re-running with the same `train.run_name` and `train.storage_path` resumes a stopped run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neighbor_diffusion import tracking
from neighbor_diffusion.config import Config, ConfigError
from neighbor_diffusion.data import storage
from neighbor_diffusion.data.storage import Location
from neighbor_diffusion.training import engine as E
from neighbor_diffusion.training.loop import train_loop_per_worker

EXPERIMENT = "neighbor-diffusion"


@dataclass
class TrainOutcome:
    run_id: str
    pipeline_dir: Path
    metrics: dict
    model_uri: str | None
    checkpoint_path: str


def epochs_needed(cfg: Config, num_clusters: int) -> int:
    """Passes over the clusters (one example per cluster per pass) that cover every step, plus one spare:
    each worker then streams a single long pass and no worker waits on another at an epoch boundary."""
    t = cfg.train
    if num_clusters < 1:
        raise ValueError("no clusters to train on: the mined shards are empty")
    examples = t.steps * t.batch_size * t.grad_accum * t.num_workers
    return math.ceil(examples / num_clusters) + 1


def start_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start Ray in process."""
    import ray

    if ray.is_initialized():
        return
    # Ray 2.60 wraps a worker's stdout, and Ray Train then sends each print to its logger *and* the wrapped
    # stdout: every line of the training log appeared twice. Plain prints, once.
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)  # merged with the job's own runtime env (working_dir) under ray job submit
        return
    # Logical CPUs beyond the cores: train workers must not take every CPU, or Ray Data stalls.
    # address="local": a new instance even when another Ray already runs on this machine.
    # No dashboard: on 2 cores it cost ~15-20 % of training samples/s (see trainer_class for what it changes).
    ray.init(
        address="local",
        num_cpus=cfg.train.ray_cpus or (os.cpu_count() or 2) + 2,
        include_dashboard=False,
        runtime_env=runtime_env,
    )


def storage_root(cfg: Config) -> str:
    path = cfg.train.storage_path
    return path if storage.is_uri(path) else str(Path(path).resolve())


def _mlflow_run(cfg: Config, run_dir: Path | Location, resuming: bool) -> str:
    """The MLflow run this Ray run used before when it resumes (resume keeps one MLflow run), else a new one;
    `run_dir` may be on object storage (a `train.storage_path` URI). A run that left no checkpoint starts again
    from step 0, perhaps with other settings: its own MLflow run then, with its own params (the old one, if left
    RUNNING by a killed driver, is marked KILLED)."""
    import mlflow
    from mlflow import MlflowClient

    experiment_id = tracking.setup(EXPERIMENT)
    marker = run_dir / "mlflow_run_id"
    client = MlflowClient()
    if marker.is_file():
        run_id = marker.read_text().strip()
        try:
            old = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a store that lost the run: start a fresh one
            old = None
        if old is not None and resuming:
            client.update_run(run_id, status="RUNNING")
            return run_id
        if old is not None and old.info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    run = client.create_run(
        experiment_id,
        run_name=cfg.train.run_name,
        tags={"preset": cfg.preset, "mlflow.source.git.commit": tracking.git_commit()},
    )
    logger = tracking.RunLogger(run.info.run_id, mlflow.get_tracking_uri())
    logger.params(cfg.flat())
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def build_trainer(cfg: Config, datasets: dict, run_id: str | None, init_weights: Any = None):
    """The TorchTrainer of a run; `init_weights`: an object ref to the bytes of `train.init_from`'s file."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    t = cfg.train
    ds_config = E.deepspeed_config(cfg, t.num_workers, t.use_gpu)
    E.validate_deepspeed_config(ds_config, t.num_workers)  # fail here, not in every worker
    return trainer_class()(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "tracking_uri": mlflow.get_tracking_uri() if run_id else None,
            "init_weights": init_weights,
            # the overrides file is read here: a worker on another node need not have it
            "deepspeed_config": ds_config,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"GPU": 1, "CPU": t.cpus_per_worker} if t.use_gpu else {"CPU": t.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=storage_root(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets=datasets,
        dataset_config=ingest_config(),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def ingest_config():
    """Ray Train's DataConfig, keeping the stream's order (stream.training_dataset: same seed, same order).

    Ray Train gives every dataset it splits over the workers DataConfig's execution options, which replace
    the dataset's own: by default the driver's current DataContext's, where `preserve_order` is off. Ray
    Data then hands out blocks as their tasks finish, and with two tasks running the order changed from
    run to run (measured: of two identical 300-step cpu-preset runs, one was fed different batches from
    step 61 on), so a run was not reproducible and a resumed run's skipped batches were not the ones it
    had trained on. (With the order kept, Ray Data also ignores the split's node-locality hints.)
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def _ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to (ray.init in process, not a cluster's address)."""
    import ray

    node = ray._private.worker._global_node  # Ray 2.60: the head Node when ray.init started one here
    return node is not None and node.head


def trainer_class():
    """TorchTrainer; on a Ray started in this process, less Ray Train's placement-group cleaner.

    The cleaner is a detached actor that asks the state API once a second whether the train controller
    is alive, to free the placement group of a controller that died. A Ray started in process dies with
    its driver, placement groups included, so it has nothing to do there, and there it did harm: our
    in-process Ray has no dashboard, which serves the state API, yet registers 127.0.0.1:8265 as its
    API server. The cleaner logged "Failed to query Ray Train Controller actor state" every second of
    the run; beside another local Ray it crashed (it auto-detects "the" Ray on this machine); and once,
    just after another Ray with a dashboard on 8265 started on the machine, it reported the controller
    dead and removed our live placement group, killing the training worker (the run started over; most
    likely it had asked that other cluster).
    """
    from ray.train.torch import TorchTrainer

    if not _ray_started_here():
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class TorchTrainerWithoutPGCleaner(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return TorchTrainerWithoutPGCleaner


def export_pipeline(cfg: Config, checkpoint_dir: Path, out_dir: Path):
    """EMA weights of a checkpoint -> a NeighborDiffusionPipeline folder (safetensors); returns the pipeline."""
    from safetensors.torch import load_file

    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline

    pipe = NeighborDiffusionPipeline.from_config(cfg)
    pipe.unet.load_state_dict(load_file(checkpoint_dir / E.EMA_FILE))
    pipe.save_pretrained(out_dir)
    return pipe


def export_backbone(pipeline_dir: Path, out_file: Path, provenance: dict[str, str]) -> Path:
    """A pipeline's UNet without its neighbor-attention layers -> one safetensors file that
    `train.init_from` accepts (how the text-only base the cpu preset starts from is made);
    `provenance` (command, commit, measurements) goes into the file's metadata."""
    from safetensors.torch import load_file, save_file

    state = load_file(E.init_weights_file(str(pipeline_dir)))  # the pipeline's UNet file, as init_from finds it
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    backbone = {k: v for k, v in state.items() if not E.is_neighbor_parameter(k)}
    save_file(backbone, out_file, metadata={k: str(v) for k, v in provenance.items()})
    return out_file


def check_resumable(cfg: Config, run_dir: Path | Location) -> bool:
    """Whether this run name resumes an earlier run (said when it does); refuse one whose model differs from
    `cfg.model`, whose optimizer state DeepSpeed could not load into this config's engine, or whose data
    position would mean other examples in this config."""
    checkpoints = [p for p in storage.children(run_dir) if p.name.startswith("checkpoint_")]
    saved = [E.read_progress(p) for p in checkpoints if (p / E.PROGRESS_FILE).is_file()]
    if not saved:
        return False
    last = max(saved, key=lambda p: p["step"])
    old, now = last["config"], json.loads(json.dumps(cfg.to_dict()))  # tuples as the JSON lists of progress.json
    changed = [f"model.{k}" for k, v in now["model"].items() if old["model"].get(k) != v]
    old_train, now_train = old["train"], now["train"]
    old_scale = old_train.get("neighbor_lr_scale", 1.0)
    if (old_scale == 1.0) != (cfg.train.neighbor_lr_scale == 1.0):  # one optimizer parameter group or two
        changed.append(f"train.neighbor_lr_scale ({old_scale} there)")
    # how DeepSpeed laid out the optimizer state: it cannot load another layout (2 workers from a run of 1 failed in
    # every worker: "Automatic adjustment of ZeRO's optimizer state partitioning ... is not currently supported");
    # and the data position: a checkpoint counts steps, and each of num_workers takes batch_size x grad_accum
    # examples a step from its split of the seed's stream (another split or count would repeat or skip examples)
    fixed = ["zero_stage", "offload", "num_workers", "seed"]
    changed += [f"train.{k} ({old_train[k]} there)" for k in fixed if old_train.get(k, now_train[k]) != now_train[k]]
    old_take = old_train["batch_size"] * old_train["grad_accum"]
    if old_take != cfg.train.batch_size * cfg.train.grad_accum:
        changed.append(f"train.batch_size x train.grad_accum ({old_take} there)")
    old_bf16 = E.uses_bf16(old_train.get("precision", "auto"), old_train.get("use_gpu", False))
    if old_bf16 != E.uses_bf16(cfg.train.precision, cfg.train.use_gpu):  # a bf16 checkpoint failed in fp32 (KeyError)
        changed.append(f"train.precision ({'bf16' if old_bf16 else 'fp32'} there)")
    if changed:
        raise ConfigError(
            f"{run_dir} holds checkpoints of another model, optimizer or data position ({', '.join(changed)} "
            f"differ): pass a new --train.run_name, or delete that folder to train from scratch"
        )
    finished = last["step"] >= cfg.train.steps
    print(
        f"[train] {run_dir} has a checkpoint at step {last['step']}: resuming from it"
        + (
            "; the run is finished, so it is exported again, not retrained (to train again: a new "
            "--train.run_name, or delete the folder, e.g. make clean)"
            if finished
            else ""
        ),  # fmt: skip
        flush=True,
    )
    return True


def init_weights_of(cfg: Config, resuming: bool) -> tuple[Config, bytes]:
    """(`cfg` with train.init_from as the run records it, the bytes of its file). A run that resumes starts from
    its checkpoint: its init_from is not read again (the file may be gone by then) and its workers get none."""
    if resuming and cfg.train.init_from:
        print(f"[train] train.init_from={cfg.train.init_from!r} not read: the run resumes from its checkpoint")
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from="")), b""
    init_from, init_weights = E.read_init_from(cfg)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=init_from)), init_weights


def run_dir_of(cfg: Config) -> Path | Location:
    """The run's folder (or URI) under train.storage_path: its checkpoints and the MLflow run id."""
    return storage.location(storage_root(cfg), "train.storage_path") / cfg.train.run_name


def train(
    cfg: Config, datasets: dict, *, register: bool = True, alias: str = "candidate", resuming: bool | None = None
) -> TrainOutcome:
    """`resuming`: what `check_resumable` said, when the caller asked it before building the datasets."""
    import mlflow
    import ray

    run_dir = run_dir_of(cfg)
    if resuming is None:
        resuming = check_resumable(cfg, run_dir)
    # train.init_from is checked and read here, not in every worker: workers get its bytes from the object store
    cfg, init_weights = init_weights_of(cfg, resuming)
    start_ray(cfg)
    run_id = _mlflow_run(cfg, run_dir, resuming)
    try:
        init_ref = ray.put(init_weights) if init_weights else None
        result = build_trainer(cfg, datasets, run_id, init_ref).fit()
        if result.error:
            raise result.error
        # the exported pipeline is a local folder (registered from there): beside the checkpoints, or in runs/
        out_dir = (run_dir if isinstance(run_dir, Path) else Path("runs") / cfg.train.run_name) / "pipeline"
        with result.checkpoint.as_directory() as d:
            pipe = export_pipeline(cfg, Path(d), out_dir)
        logger = tracking.RunLogger(run_id, mlflow.get_tracking_uri())
        logger.held_out(cfg, pipe.unet, cfg.train.steps, out_dir=out_dir.parent)
        model_uri = None
        if register:
            version = tracking.register_pipeline(
                run_id,
                out_dir,
                cfg.train.registered_model,
                alias,
                tags={"preset": cfg.preset, "steps": cfg.train.steps},
            )
            model_uri = f"models:/{cfg.train.registered_model}@{alias}"
            print(f"[train] registered {cfg.train.registered_model} version {version.version} as {model_uri}")
        from mlflow import MlflowClient

        MlflowClient().set_tag(run_id, "checkpoint", result.checkpoint.path)
        tracking.end_run(run_id)
        return TrainOutcome(run_id, out_dir, dict(result.metrics or {}), model_uri, result.checkpoint.path)
    except BaseException as e:  # the MLflow run says how it ended (was RUNNING for ever); a resume sets RUNNING again
        tracking.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
