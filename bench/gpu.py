"""Benchmark 6 of issue #7 (GPU only): model FLOPs utilisation of the `gpu-base` training step in bf16.

The step is the product's: `DiffusionObjective` (neighbor encoding + denoising loss)
inside a DeepSpeed engine built from `engine.deepspeed_config` (bf16, the preset's ZeRO
stage; one process), AdamW, then the EMA update, as `train_loop_per_worker` does it.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one eager step (forward +
backward): matmul, convolution and attention FLOPs, 2 per multiply-add; elementwise,
normalisation and optimizer work are not counted, so MFU is conservative. Every timed
step reuses the same batch and the same random stream (t, noise, condition dropout),
so each does exactly the counted work. MFU = FLOPs per step / median step time / the
device's peak dense bf16 FLOP/s (table below, or --peak-tflops).

Variants: eager, channels-last activations (parameters stay contiguous: DeepSpeed
cannot broadcast channels-last ones), `torch.compile` of the denoising UNet (neighbor
encoding stays eager: its masked gather has data-dependent shapes), and both.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import torch

from bench.common import Context, Ratio, Report, interleaved, median, summary, synthetic_batch
from neighbor_diffusion.config import Config, preset

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, by device-name substring (first match).
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),  # also GH200
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0e12),
)
VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")
GOAL = 0.40


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


@contextlib.contextmanager
def single_process_group(backend: str):
    """A world of one process, so that DeepSpeed runs here as it runs in a Ray Train worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TrainStep:
    """One variant of the product's training step, on its own DeepSpeed engine."""

    def __init__(self, cfg: Config, variant: str, use_gpu: bool):
        import deepspeed

        from neighbor_diffusion.model import NeighborUNet
        from neighbor_diffusion.text import text_encoder_dim
        from neighbor_diffusion.training import engine as E

        t = cfg.train
        self.cfg, self.variant, self.E = cfg, variant, E
        torch.manual_seed(t.seed)
        unet = NeighborUNet.from_model_config(cfg.model, text_encoder_dim(cfg.text.encoder))
        if "channels_last" in variant:
            # Activations only: DeepSpeed cannot take channels-last parameters (its initial broadcast views each
            # parameter as bytes, which needs stride 1 last). cuDNN/oneDNN run a convolution channels-last when its
            # input is, and its output stays so; entering at conv_in covers denoising and neighbor encoding.
            unet.unet.conv_in.register_forward_pre_hook(
                lambda _, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
            )
        if "compile" in variant:
            unet.compile()  # the denoising forward; DeepSpeed wraps the objective around it unchanged
        objective = E.DiffusionObjective(unet, cfg)
        self.engine, _, _, _ = deepspeed.initialize(
            model=objective,
            config=E.deepspeed_config(cfg, 1, use_gpu),
            optimizer=torch.optim.AdamW(objective.parameters(), lr=t.lr, weight_decay=t.weight_decay),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, E.lr_lambda(cfg)),
        )
        self.ema = E.EMA(self.engine.module.unet, t.ema_decay, t.zero_stage)
        self.batch = synthetic_batch(cfg, self.engine.device)

    def forward_backward(self) -> torch.Tensor:
        loss = self.engine(self.batch, self.E.step_generator(self.cfg.train.seed, 0, 0, 0))
        self.engine.backward(loss)
        return loss

    def __call__(self) -> float:
        loss = self.forward_backward()
        self.engine.step()
        self.ema.update(self.engine.module.unet, 0)
        return loss.item()

    def count_flops(self) -> int:
        """FLOPs of one forward + backward (then the step is completed outside the counter)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.forward_backward()
        self.engine.step()
        return counter.get_total_flops()


def measure(
    cfg: Config, variants: tuple[str, ...], steps_per_call: int, repeats: int, warmup: int, use_gpu: bool
) -> dict[str, Any]:
    """FLOPs per step (eager) and seconds per step of each variant, interleaved. Also runs on CPU (for tests)."""
    backend = "nccl" if use_gpu else "gloo"
    out: dict[str, Any] = {}
    with single_process_group(backend):
        steps = {}
        for v in variants:
            try:
                steps[v] = TrainStep(cfg, v, use_gpu)
                for _ in range(warmup):  # compilation and autotuning happen here
                    steps[v]()
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                out.setdefault("failed", {})[v] = f"{type(e).__name__}: {str(e)[:500]}"
                print(f"variant {v} failed: {out['failed'][v]}", flush=True)
                steps.pop(v, None)
        if not steps:  # every variant failed: report why, time nothing
            return {**out, "step_s": {}}
        if "eager" in steps:
            out["flops_per_step"] = steps["eager"].count_flops()
        fns = {v: (lambda s=s: [s() for _ in range(steps_per_call)]) for v, s in steps.items()}
        times = interleaved(fns, repeats=repeats, warmup=0)
        out["step_s"] = {v: median(ts) / steps_per_call for v, ts in times.items()}
        out["per_call_s"] = {v: summary(ts) for v, ts in times.items()}
        first = next(iter(steps.values()), None)
        if first is not None:  # the EMA update's share of a step (elementwise: not in the FLOP count)
            ema = interleaved({"ema": lambda: first.ema.update(first.engine.module.unet, 0)}, repeats, warmup=1)
            out["ema_update_s"] = median(ema["ema"])
            out["params"] = sum(p.numel() for p in first.engine.module.unet.parameters())
        del steps
    return out


def gpu_mfu(ctx: Context) -> Report:
    cfg = preset("gpu-base")
    if not torch.cuda.is_available():
        return Report(
            ratios=[Ratio("MFU of the gpu-base bf16 training step", None, ">=", GOAL)],
            measured={},
            method=__doc__.split("\n\n", 1)[1],
            config=cfg.to_dict(),
            skipped="no CUDA device",
        )
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name, ctx.peak_tflops)
    m = measure(
        cfg,
        VARIANTS,
        steps_per_call=2 if ctx.quick else 5,
        repeats=2 if ctx.quick else 6,
        warmup=2 if ctx.quick else 5,
        use_gpu=True,
    )
    flops = m.get("flops_per_step")
    mfu = {v: (flops / s / peak if flops and peak else None) for v, s in m["step_s"].items()}
    best = min(m["step_s"], key=m["step_s"].get) if m["step_s"] else None
    ratios = [
        Ratio(f"MFU, bf16, best variant ({best})", round(mfu[best], 3) if best and mfu[best] else None, ">=", GOAL)
    ]
    ratios += [Ratio(f"MFU, {v}", round(x, 3) if x else None) for v, x in mfu.items()]
    ratios += [
        Ratio(f"step time eager / {v}", round(m["step_s"]["eager"] / s, 3))
        for v, s in m["step_s"].items()
        if v != "eager" and "eager" in m["step_s"]
    ]
    return Report(
        ratios=ratios,
        measured={
            "device": name,
            "peak_bf16_flops": peak,
            "peak_source": "--peak-tflops" if ctx.peak_tflops else "PEAK_BF16_FLOPS table",
            "flops_per_step": flops,
            "batch_size": cfg.train.batch_size,
            "mfu": mfu,
            "fastest_variant": best,
            **m,
        },
        method=__doc__.split("\n\n", 1)[1],
        config=cfg.to_dict(),
    )
