"""Benchmarks 1-2 of issue #7: training pipeline overhead, scaling over workers, ZeRO state bytes.

The full path is the product's: `training_dataset` (Ray Data stream of mined shards) ->
`trainer.build_trainer(...).fit()` (Ray Train workers running `train_loop_per_worker`,
DeepSpeed engine). Its samples/s and data-wait fraction are the ones the loop itself
reports per log window (read back from the run's MLflow metrics); its ZeRO state bytes
come from `progress.json` in the last checkpoint. The reference is a bare loop in this
process: the same model, objective, batch size, optimizer, clipping, schedule and EMA,
over batches built by the same `build_example` and already stacked in memory, with the
torch threads a lone Ray Train worker sets (cores // local workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import Context, Ratio, Report, median, torch_threads
from neighbor_diffusion.config import Config, override


def training_cfg(ctx: Context, **train: Any) -> Config:
    """The preset with a short run: few dozen steps (a handful with --quick), one checkpoint at the end, no samples."""
    steps, log_every = (6, 2) if ctx.quick else (40, 5)
    values = {
        "train.steps": steps,
        "train.log_every": log_every,
        "train.checkpoint_every": train.get("steps", steps),
        "train.sample_every": 0,
        "train.max_failures": 0,
        "train.storage_path": str(ctx.work / "runs"),
        "data.root": str(ctx.data_root),
        **{f"train.{k}": v for k, v in train.items()},
    }
    return override(ctx.cfg, {k: str(v) for k, v in values.items()})


def warmup_steps(cfg: Config) -> int:
    """Steps left out of steady-state numbers: the first log window, and at least 10 steps when there are enough."""
    t = cfg.train
    return min(max(t.log_every, 10), t.steps - 2 * t.log_every) if t.steps >= 3 * t.log_every else t.log_every


# ---------------------------------------------------------------------------- the full path


def _mlflow_run(ctx: Context, run_name: str) -> str:
    """A run in the bench's own MLflow store (set up by run.py), for the loop's per-window metrics."""
    import mlflow
    from mlflow import MlflowClient

    name = "neighbor-diffusion-bench"
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(ctx.work / "mlartifacts").as_uri())
    return MlflowClient().create_run(mlflow.get_experiment_by_name(name).experiment_id, run_name=run_name).info.run_id


def _windows(run_id: str, cfg: Config) -> list[dict[str, float]]:
    """The loop's log windows: (start step, steps, seconds, samples/s, data-wait fraction)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    series = {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in ("samples_per_s", "data_wait_fraction")
    }
    t = cfg.train
    samples_per_step = t.batch_size * t.grad_accum * t.num_workers
    out, start = [], 0
    for step in sorted(series["samples_per_s"]):
        sps = series["samples_per_s"][step]
        n = step - start
        out.append(
            {
                "start": start,
                "steps": n,
                "seconds": n * samples_per_step / sps,
                "samples_per_s": sps,
                "data_wait_fraction": series["data_wait_fraction"][step],
            }
        )
        start = step
    return out


def train_run(ctx: Context, cfg: Config) -> dict[str, Any]:
    """One run of the product's training path; memoised per config, so benchmarks in one invocation share runs."""
    key = cfg.to_json()
    if key in ctx.train_runs:
        return {**ctx.train_runs[key], "shared": True}
    from neighbor_diffusion.data.stream import training_dataset
    from neighbor_diffusion.training import engine as E
    from neighbor_diffusion.training import trainer

    base = ctx.data_dir()
    ctx.ray()
    num_clusters = json.loads((base / "manifest.json").read_text())["clusters_out"]
    t0 = time.perf_counter()
    dataset = training_dataset(
        str(base / "clusters"), cfg, seed=cfg.train.seed, num_epochs=trainer.epochs_needed(cfg, num_clusters)
    )
    t1 = time.perf_counter()
    run_id = _mlflow_run(ctx, cfg.train.run_name)
    print(
        f"[bench] training: {cfg.train.num_workers} worker(s), ZeRO {cfg.train.zero_stage}, "
        f"{cfg.train.steps} steps of {cfg.train.batch_size} per worker",
        flush=True,
    )
    result = trainer.build_trainer(cfg, {"train": dataset}, run_id).fit()
    t2 = time.perf_counter()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        progress = E.read_progress(Path(d))
    out = {
        "windows": _windows(run_id, cfg),
        "dataset_setup_s": round(t1 - t0, 2),
        "fit_wall_s": round(t2 - t1, 2),
        "state_bytes_rank0": progress["state_bytes_rank0"],
        "worker_torch_threads": max(1, (os.cpu_count() or 1) // cfg.train.num_workers),
    }
    ctx.train_runs[key] = out
    return out


def throughput(windows: list[dict[str, float]], skip: int) -> dict[str, Any]:
    """Steady state (windows starting at or after step `skip`) and whole run, from per-window numbers."""

    def agg(ws: list[dict[str, float]]) -> dict[str, Any]:
        seconds = sum(w["seconds"] for w in ws)
        return {
            "windows": len(ws),
            "steps": sum(w["steps"] for w in ws),
            "median_window_samples_per_s": round(median([w["samples_per_s"] for w in ws]), 3),
            "samples_per_s": round(sum(w["samples_per_s"] * w["seconds"] for w in ws) / seconds, 3),
            "data_wait_fraction": round(sum(w["data_wait_fraction"] * w["seconds"] for w in ws) / seconds, 5),
            "seconds": round(seconds, 2),
        }

    steady = [w for w in windows if w["start"] >= skip] or windows[-1:]
    return {"steady": agg(steady), "whole_run": agg(windows), "excluded_warmup_steps": skip}


# ---------------------------------------------------------------------------- the bare reference


class BareLoop:
    """The same training step without Ray or DeepSpeed, over batches already in memory."""

    def __init__(self, cfg: Config, shard_dir: Path, num_batches: int, threads: int):
        from neighbor_diffusion.model import NeighborUNet
        from neighbor_diffusion.text import text_encoder_dim
        from neighbor_diffusion.training import engine as E

        self.cfg, self.threads, self.step = cfg, threads, 0
        t = cfg.train
        self.device = torch.device("cuda" if t.use_gpu and torch.cuda.is_available() else "cpu")
        # DeepSpeed trains in bf16 on GPU (precision auto); the bare equivalent is autocast
        self.bf16 = E.uses_bf16(t.precision, self.device.type == "cuda")
        self.batches = [
            {k: v.to(self.device) for k, v in b.items()} for b in in_memory_batches(cfg, shard_dir, num_batches)
        ]
        torch.manual_seed(t.seed)
        self.unet = NeighborUNet.from_model_config(cfg.model, text_encoder_dim(cfg.text.encoder))
        self.objective = E.DiffusionObjective(self.unet, cfg).to(self.device)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, E.lr_lambda(cfg))
        self.ema = E.EMA(self.unet, t.ema_decay, 0)
        self.step_generator = E.step_generator

    def run(self, steps: int) -> list[float]:
        """Seconds per step for `steps` steps (the caller discards warm-up)."""
        t = self.cfg.train
        amp = torch.autocast("cuda", torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        times = []
        with torch_threads(self.threads):
            for _ in range(steps):
                start = time.perf_counter()
                batch = self.batches[self.step % len(self.batches)]
                with amp:
                    loss = self.objective(batch, self.step_generator(t.seed, 0, self.step, 0))
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                self.ema.update(self.unet, self.step)
                loss.item()  # as the loop does: the step is complete here
                times.append(time.perf_counter() - start)
                self.step += 1
        return times


def in_memory_batches(cfg: Config, shard_dir: Path, num_batches: int) -> list[dict[str, torch.Tensor]]:
    """Batches from the same clusters by the same `build_example` as the stream (no Ray), stacked as tensors."""
    from neighbor_diffusion.data.stream import build_example, example_rng, load_clusters

    clusters = load_clusters(shard_dir)
    order = np.random.default_rng(cfg.train.seed).permutation(len(clusters))
    B = cfg.train.batch_size
    examples = []
    for i in range(num_batches * B):
        epoch, c = divmod(i, len(clusters))
        cluster = clusters[order[c]]
        examples.append(build_example(cluster, cfg, example_rng(cfg.train.seed, epoch, str(cluster["cluster_id"]))))
    return [
        {k: torch.from_numpy(np.stack([e[k] for e in examples[j * B : (j + 1) * B]])) for k in examples[0]}
        for j in range(num_batches)
    ]


def windowed(times: list[float], window: int, samples_per_step: int) -> list[float]:
    """Per-step seconds -> samples/s of consecutive windows of `window` steps (as the loop logs them)."""
    return [samples_per_step * window / sum(times[i : i + window]) for i in range(0, len(times) - window + 1, window)]


# ---------------------------------------------------------------------------- benchmarks


def pipeline_overhead(ctx: Context) -> Report:
    cfg = training_cfg(ctx, num_workers=1, run_name="bench-1worker")
    t = cfg.train
    skip = warmup_steps(cfg)
    threads = max(1, (os.cpu_count() or 1) // t.num_workers)  # what train_loop_per_worker sets
    bare_steps = 2 * t.log_every if ctx.quick else 3 * t.log_every
    shards = ctx.data_dir() / "clusters"
    ctx.ray()  # Ray runs (idle) during the bare loop too, as it does beside the full path
    bare = BareLoop(cfg, shards, num_batches=min(2 * bare_steps, 24), threads=threads)
    warm = bare.run(2)  # first steps: allocator and kernel warm-up, excluded
    before = bare.run(bare_steps)
    full = train_run(ctx, cfg)
    after = bare.run(bare_steps)

    full_tp = throughput(full["windows"], skip)
    bare_windows = windowed(before, t.log_every, t.batch_size) + windowed(after, t.log_every, t.batch_size)
    bare_sps = median(bare_windows)
    bare_all = t.batch_size * (len(warm) + 2 * bare_steps) / sum(warm + before + after)
    ratio = full_tp["steady"]["median_window_samples_per_s"] / bare_sps
    whole = full_tp["whole_run"]["samples_per_s"] / bare_all
    fit_wall = t.steps * t.batch_size / full["fit_wall_s"]
    return Report(
        ratios=[
            Ratio("steady samples/s: full path / bare loop", round(ratio, 3), ">=", 0.95),
            Ratio("data-wait fraction of step time (steady)", full_tp["steady"]["data_wait_fraction"], "<=", 0.02),
            Ratio("whole run samples/s (all log windows) / bare loop incl. warm-up", round(whole, 3)),
            Ratio(
                "fit() wall clock samples/s (worker start, DeepSpeed init, checkpoint) / bare",
                round(fit_wall / bare_sps, 3),
            ),
            Ratio("data-wait fraction (whole run)", full_tp["whole_run"]["data_wait_fraction"]),
        ],
        measured={
            "full_path": {
                **full_tp,
                "fit_wall_s": full["fit_wall_s"],
                "fit_wall_samples_per_s": round(fit_wall, 3),
                "dataset_setup_s": full["dataset_setup_s"],
                "windows": full["windows"],
                "worker_torch_threads": full["worker_torch_threads"],
            },
            "bare_loop": {
                "torch_threads": threads,
                "device": str(bare.device),
                "median_window_samples_per_s": round(bare_sps, 3),
                "window_samples_per_s": [round(x, 3) for x in bare_windows],
                "whole_samples_per_s_incl_warmup": round(bare_all, 3),
                "step_s_before_full_run": [round(x, 4) for x in before],
                "step_s_after_full_run": [round(x, 4) for x in after],
                "excluded_warmup_step_s": [round(x, 4) for x in warm],
                "in_memory_batches": len(bare.batches),
            },
        },
        method=(
            "Full path: training_dataset (Ray Data) -> TorchTrainer.fit -> train_loop_per_worker -> DeepSpeed engine "
            f"(ZeRO {t.zero_stage}, 1 worker); samples/s and data-wait fraction are what the loop reports per "
            f"{t.log_every}-step window (MLflow metrics); steady state drops windows before step {skip}. "
            "Bare loop: same model/objective/batch/AdamW/clipping/LR schedule/EMA in this process over stacked "
            "in-memory tensors from the same build_example, with the worker's torch threads; measured in "
            f"{t.log_every}-step windows before and after the full run (Ray up and idle both times), median window."
        ),
        config=cfg.to_dict(),
    )


CLUSTER_PATH = (
    "cluster path: `ray job submit ... -- python jobs/train.py --preset gpu-base --train.num_workers N "
    "--train.use_gpu true` over N GPUs (infra/ KubeRay manifests); the loop's samples_per_s per window gives "
    "the scaling curve and progress.json the state bytes per worker"
)


def _gpus_missing(ctx: Context, workers: int) -> str | None:
    """Why a run of `workers` GPU workers cannot start here (each Ray Train GPU worker owns one device), or None."""
    if ctx.cfg.train.use_gpu and torch.cuda.device_count() < workers:
        return f"{workers} GPU workers need {workers} GPUs, this machine has {torch.cuda.device_count()}"
    return None


def scaling(ctx: Context) -> Report:
    if why := _gpus_missing(ctx, 2):
        return Report([Ratio("steady samples/s: 2 workers / 1 worker", None)], {"cluster_path": CLUSTER_PATH},
                      method=CLUSTER_PATH, config=ctx.cfg.to_dict(), skipped=why)  # fmt: skip
    runs, tps = {}, {}
    for n in (1, 2):
        cfg = training_cfg(ctx, num_workers=n, run_name=f"bench-{n}worker")
        runs[n] = train_run(ctx, cfg)
        tps[n] = throughput(runs[n]["windows"], warmup_steps(cfg))
    one, two = (tps[n]["steady"]["median_window_samples_per_s"] for n in (1, 2))
    return Report(
        ratios=[
            Ratio(
                "steady samples/s: 2 workers / 1 worker (same machine)",
                round(two / one, 3),
                note="both share this machine's cores: 1 worker x cores threads vs 2 workers x cores/2 threads",
            ),
            Ratio("data-wait fraction, 2 workers (steady)", tps[2]["steady"]["data_wait_fraction"], "<=", 0.02),
        ],
        measured={
            f"{n}_workers": {
                **tps[n],
                "fit_wall_s": runs[n]["fit_wall_s"],
                "windows": runs[n]["windows"],
                "worker_torch_threads": runs[n]["worker_torch_threads"],
                "shared_with_pipeline_overhead": runs[n].get("shared", False),
            }
            for n in (1, 2)
        },
        method=(
            "Two runs of the product training path (1 then 2 Ray Train workers, DeepSpeed gloo/nccl data parallel, "
            "per-worker batch fixed, so 2 workers train 2x the samples per step); global samples/s as the loop "
            "reports it per window, steady state (warm-up windows dropped), median window. " + CLUSTER_PATH + "."
        ),
        config=training_cfg(ctx, num_workers=2, run_name="bench-2worker").to_dict(),
    )


def zero_memory(ctx: Context) -> Report:
    N = 2
    if why := _gpus_missing(ctx, N):
        return Report(
            [Ratio("state bytes per worker: ZeRO-3 / ZeRO-0", None, "<=", round(1.1 / N, 3))],
            {"cluster_path": CLUSTER_PATH},
            method=CLUSTER_PATH,
            config=ctx.cfg.to_dict(),
            skipped=why,
        )
    steps = 2
    states = {}
    runs = {}
    for stage in (0, 1, 2, 3):
        cfg = training_cfg(
            ctx, num_workers=N, zero_stage=stage, steps=steps, log_every=1, run_name=f"bench-zero{stage}"
        )
        runs[stage] = train_run(ctx, cfg)
        states[stage] = runs[stage]["state_bytes_rank0"]
    ratio = states[3]["total_bytes"] / states[0]["total_bytes"]
    return Report(
        ratios=[
            Ratio(
                f"model+optimizer state bytes per worker: ZeRO-3 / ZeRO-0 ({N} workers)",
                round(ratio, 3),
                "<=",
                round(1.1 / N, 3),
            ),
            *[
                Ratio(f"ZeRO-{s} / ZeRO-0", round(states[s]["total_bytes"] / states[0]["total_bytes"], 3))
                for s in (1, 2)
            ],
        ],
        measured={
            "workers": N,
            "state_bytes_rank0": {f"zero{s}": states[s] for s in states},
            "param_bytes_ratio_zero3_over_zero0": round(states[3]["param_bytes"] / states[0]["param_bytes"], 3),
            "optimizer_bytes_ratio_zero3_over_zero0": round(
                states[3]["optimizer_bytes"] / states[0]["optimizer_bytes"], 3
            ),
            "fit_wall_s": {f"zero{s}": runs[s]["fit_wall_s"] for s in runs},
        },
        method=(
            f"Four {steps}-step runs of the product training path with {N} workers, one per ZeRO stage; bytes are "
            "engine.model_state_bytes() on rank 0 after the last step (progress.json of the final checkpoint): "
            "parameters this rank holds + optimizer tensors of its partition (master weights, Adam moments), "
            "counted once per storage. Gradients and the EMA copy are not counted."
        ),
        config=training_cfg(ctx, num_workers=N, zero_stage=3, steps=steps, log_every=1).to_dict(),
    )
