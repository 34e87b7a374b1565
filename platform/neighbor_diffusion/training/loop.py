"""The per-worker training loop that Ray Train runs on every worker.

    build model (same seed on every rank) -> DeepSpeed engine -> resume from
    ray.train.get_checkpoint() if any -> stream batches from this worker's dataset
    shard -> steps (micro-batches x grad accumulation) -> EMA -> every N steps every
    rank saves its DeepSpeed shard and reports it -> rank 0 logs to MLflow.

Training randomness is a function of (seed, rank, step), and the data position is
the number of batches consumed, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from neighbor_diffusion.config import Config
from neighbor_diffusion.training import engine as E


def _batches(shard, batch_size: int, skip: int, device: torch.device):
    """Yield batches forever (the shard again when it ends); the first `skip` batches (already trained on) are
    passed over. (No epoch count: the job's stream holds all its epochs, `stream.training_dataset`.)"""
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device):
            if skip > 0:
                skip -= 1
                continue
            yield batch


def _new_window() -> dict[str, float]:
    """What the loop sums between two log steps (losses and grad norms to average, waits and step times)."""
    return {"loss": 0.0, "n": 0, "wait": 0.0, "time": 0.0, "grad_norm": 0.0}


def _quiet_report_log() -> None:
    """Ray Train V2 logs every `ray.train.report` at INFO, metrics and all (half the job's log, as our own
    progress line says the same). Its logger is named after its file path, not under `ray.train`, so
    `LoggingConfig` does not reach it: set that logger's level here, in the worker."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    from neighbor_diffusion.tracking import RunLogger

    cfg = Config.from_dict(loop_config["config"])
    t = cfg.train
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    if world == 1 and not use_gpu:
        # one process has nothing to all-reduce: DeepSpeed's shared-memory op (compiled on first use, 30-50 s of
        # a fresh machine's `make demo`) is left out; torch.distributed serves what collectives remain. The module by
        # importlib: the attribute deepspeed.comm.torch is PyTorch itself (deepspeed.comm's `import *`)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    log = RunLogger(loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri"), enabled=rank == 0)

    # 1. model, identical on every rank
    init = loop_config.get("init_weights")  # train.init_from's file, from the object store (trainer.train)
    objective = E.DiffusionObjective(E.build_unet(cfg, ray.get(init) if init is not None else None), cfg)
    ds_config = loop_config.get("deepspeed_config") or E.deepspeed_config(cfg, world, use_gpu)  # (the driver's)
    groups = E.param_groups(objective, cfg)
    kwargs: dict[str, Any] = {}
    if "optimizer" not in ds_config:  # a client torch optimizer avoids compiling fused_adam
        kwargs["optimizer"] = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    # DeepSpeed steps the LR schedule at each optimizer step and keeps it in its checkpoints
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, E.lr_lambda(cfg)),
        **kwargs,
    )
    E.weights_only_loads(engine)
    ema = E.EMA(engine.module.unet, t.ema_decay, t.zero_stage)

    # 2. resume
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            if not (Path(d) / E.ENGINE_TAG).is_dir():  # DeepSpeed's own failure is a bare AssertionError
                raise RuntimeError(f"checkpoint {checkpoint.path}: no DeepSpeed state {E.ENGINE_TAG!r} in it")
            loaded, _ = engine.load_checkpoint(d, tag=E.ENGINE_TAG)
            if loaded is None:  # (DeepSpeed only warns then, and the run would go on from fresh weights)
                raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed loaded nothing from {E.ENGINE_TAG!r}")
            ema.load(Path(d) / E.EMA_FILE)
            start_step = E.read_progress(Path(d))["step"]
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {start_step}", flush=True)
    elif rank == 0 and t.init_from:
        print(f"[train] backbone from {t.init_from}, neighbor gates at {t.neighbor_gate_init}", flush=True)
    if rank == 0:
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.unet.parameters())
        print(
            f"[train] workers={world} zero_stage={t.zero_stage} params={n_params:,} device={device} "
            f"steps {start_step}->{t.steps}",
            flush=True,
        )
        log.params({"model.num_parameters": n_params})

    # 3. steps
    shard = ray.train.get_dataset_shard("train")
    batches = _batches(shard, t.batch_size, start_step * t.grad_accum, device)
    samples_per_step = t.batch_size * t.grad_accum * world
    window = _new_window()
    run_start = time.perf_counter()
    own_norm = float("nan")  # (set below at stage 0; a ZeRO or bf16 optimizer gives its own)
    for step in range(start_step, t.steps):
        step_start = time.perf_counter()
        lr = engine.get_lr()[0]  # this step's: the schedule moves on at engine.step()
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - wait_start
            loss = engine(batch, E.step_generator(t.seed, rank, step, micro))
            engine.backward(loss)
            if t.zero_stage == 0 and micro == t.grad_accum - 1:
                # DeepSpeed's fp32 optimizer at stage 0 records no norm (its ZeRO and bf16 optimizers do, and the bf16
                # one keeps its grads apart from p.grad); the grads are all-reduced by now
                own_norm = torch.nn.utils.get_total_norm([p.grad for p in engine.parameters() if p.grad is not None])
            engine.step()
            loss_sum += loss.item()
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_norm
        ema.update(engine.module.unet, step)
        window["loss"] += loss_sum / t.grad_accum
        window["grad_norm"] += float(grad_norm)
        window["n"] += 1
        window["time"] += time.perf_counter() - step_start
        done = step + 1
        if done % t.log_every == 0 or done == t.steps or done % t.checkpoint_every == 0:  # a checkpoint reports these
            # on the engine's device: NCCL (the GPU backend) reduces only CUDA tensors
            loss_t = torch.tensor(window["loss"] / window["n"], device=engine.device)
            torch.distributed.all_reduce(loss_t)  # mean over ranks, for the log only
            metrics = {
                "loss": loss_t.item() / world,
                "lr": lr,
                "grad_norm": window["grad_norm"] / window["n"],
                "samples_per_s": samples_per_step * window["n"] / window["time"],
                "data_wait_fraction": window["wait"] / window["time"],
                "step": done,
            }
            if rank == 0:  # the ETA from all of this run's steps so far: with its checkpoints and samples
                eta = (t.steps - done) * (time.perf_counter() - run_start) / (done - start_step)
                print(
                    f"[train] step {done}/{t.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                    f"{metrics['samples_per_s']:.1f} samples/s data-wait {100 * metrics['data_wait_fraction']:.1f}% "
                    f"ETA {eta:.0f}s",
                    flush=True,
                )
                log.metrics(metrics, step=done)
            window = _new_window()
        if rank == 0 and t.sample_every and (done % t.sample_every == 0) and done != t.steps:
            log.held_out(cfg, ema.model, done)
        # Only checkpoints go to Ray Train (the metrics reach MLflow and the log above): a worker's report
        # waits until the controller has taken the one before, which it looks for every 2 s
        # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report at every log step held steps to 2 s each (the
        # ZeRO smoke runs, debug preset with log_every 1: 8 steps in 16 s, 6-7 s without)
        if done % t.checkpoint_every == 0 or done == t.steps:
            _save_and_report(engine, ema, cfg, rank, done, metrics)
    if rank == 0:
        print(f"[train] finished {t.steps - start_step} steps in {time.perf_counter() - run_start:.0f}s", flush=True)
        log.metrics({"model_state_bytes_rank0": E.model_state_bytes(engine)["total_bytes"]}, step=t.steps)


def _save_and_report(engine, ema: E.EMA, cfg: Config, rank: int, step: int, metrics: dict[str, float]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=E.ENGINE_TAG)  # collective: every rank writes its shard
        if rank == 0:
            ema.save(Path(tmp) / E.EMA_FILE)
            progress = {"step": step, "config": cfg.to_dict(), "state_bytes_rank0": E.model_state_bytes(engine)}
            (Path(tmp) / E.PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
