"""Benchmarks 3-4 of issue #7: what neighbors and guidance cost per denoising step.

Both run `diffusion.sample` / `diffusion.guided_prediction` on a freshly initialised
model of the preset (timings do not depend on the weights; the neighbor gates are
opened so the branch is live) with random conditions of the preset's shapes: K =
model.max_neighbors neighbors, all real, text states of the encoder's width.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from bench.common import Context, Ratio, Report, interleaved, median, summary, synthetic_batch, torch_threads
from neighbor_diffusion import diffusion
from neighbor_diffusion.config import Config, override


def _model_and_inputs(cfg: Config, batch: int, device: torch.device, seed: int = 0):
    from neighbor_diffusion.model import NeighborUNet
    from neighbor_diffusion.text import text_encoder_dim

    torch.manual_seed(seed)
    model = NeighborUNet.from_model_config(cfg.model, text_encoder_dim(cfg.text.encoder)).to(device).eval()
    with torch.no_grad():
        for attn in model.neighbor_attention.values():
            attn.gate.fill_(0.5)
    return model, synthetic_batch(override(cfg, {"train.batch_size": str(batch)}), device, seed)


def neighbor_cost(ctx: Context) -> Report:
    # sampling runs in this process with every core, as a lone pipeline would; both sides alike
    with torch_threads(os.cpu_count() or 1):
        return _neighbor_cost(ctx)


def guidance_cost(ctx: Context) -> Report:
    with torch_threads(os.cpu_count() or 1):
        return _guidance_cost(ctx)


def _neighbor_cost(ctx: Context) -> Report:
    cfg = ctx.cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps, repeats = (3, 3) if ctx.quick else (10, 7)
    d = cfg.diffusion
    per_batch: dict[str, Any] = {}
    ratios: list[Ratio] = []
    for B in (1,) if ctx.quick else (1, 4):
        model, x = _model_and_inputs(cfg, B, device)

        def encode(model=model, x=x):
            return model.encode_neighbors(
                x["neighbor_images"], x["neighbor_text_states"], x["neighbor_text_mask"], x["neighbor_mask"]
            )

        with torch.no_grad():
            cached = encode()

        def sampler(neighbors, text_guidance, neighbor_guidance, model=model, x=x):
            return lambda: diffusion.sample(
                model,
                diffusion.sampling_scheduler(d),
                x["text_states"],
                x["text_mask"],
                neighbors,
                steps,
                text_guidance=text_guidance,
                neighbor_guidance=neighbor_guidance,
                guidance_mode="joint",
                x_T=x["x_T"],
                **diffusion.thresholding_of(d),
            )

        settings = {
            # one UNet evaluation per step on both sides: the cost of the neighbor layers themselves
            "no_guidance": (1.0, 1.0),
            # the preset's sampling defaults: text-only runs 2 branches per step, with neighbors 3
            "default_guidance": (d.text_guidance, d.neighbor_guidance),
        }
        fns = {}
        for name, (tg, ng) in settings.items():
            fns[f"{name}/text_only"] = sampler(None, tg, ng)
            fns[f"{name}/cached"] = sampler(cached, tg, ng)
            fns[f"{name}/recomputed"] = sampler(encode, tg, ng)
        times = interleaved(fns, repeats=repeats, warmup=1)
        per_step = {k: median(v) / steps for k, v in times.items()}
        with torch.no_grad():
            same = fns["no_guidance/cached"]().sub(fns["no_guidance/recomputed"]()).abs().max().item()
        per_batch[f"B{B}"] = {
            "per_step_ms": {k: round(v * 1e3, 3) for k, v in per_step.items()},
            "per_call_s": {k: summary(v) for k, v in times.items()},
            "max_abs_diff_cached_vs_recomputed_sample": same,
        }
        for name in settings:
            cached_r = per_step[f"{name}/cached"] / per_step[f"{name}/text_only"]
            recomputed_r = per_step[f"{name}/recomputed"] / per_step[f"{name}/cached"]
            per_batch[f"B{B}"][name] = {
                "cached_over_text_only": round(cached_r, 3),
                "recomputed_over_cached": round(recomputed_r, 3),
            }
            if B == 1 and name == "no_guidance":
                ratios.insert(
                    0,
                    Ratio(
                        "per-step time, K neighbors cached / text-only (B=1, one UNet eval per step)",
                        round(cached_r, 3),
                        "<=",
                        1.25,
                    ),
                )
                ratios.append(Ratio("per-step time, recomputed every step / cached (B=1)", round(recomputed_r, 3)))
            else:
                ratios.append(
                    Ratio(
                        f"cached / text-only, B={B}, {name.replace('_', ' ')}",
                        round(cached_r, 3),
                        *(("<=", 1.25) if name == "no_guidance" else (None, None)),
                        note="text-only runs 2 branches, neighbors 3" if name == "default_guidance" else "",
                    ),
                )
    return Report(
        ratios=ratios,
        measured={
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "K": cfg.model.max_neighbors,
            "denoising_steps_per_call": steps,
            "repeats": repeats,
            **per_batch,
        },
        method=(
            f"diffusion.sample ({d.sampler}, {steps} steps per call) with K={cfg.model.max_neighbors} neighbors whose "
            "features are computed once (cached), recomputed by a callable at every step, or no neighbors (text-only); "
            "each call timed whole and divided by its steps; calls interleaved in rotating order, 1 warm-up round "
            f"excluded, median of {repeats}. 'no_guidance' (text and neighbor guidance 1) gives both sides one UNet "
            "evaluation per step, isolating the neighbor layers; 'default_guidance' uses the preset's joint guidance "
            "weights, where text-only evaluates 2 branches and the neighbor model 3."
        ),
        config={"model": cfg.model.__dict__, "diffusion": cfg.diffusion.__dict__, "text": cfg.text.__dict__},
    )


def _guidance_cost(ctx: Context) -> Report:
    cfg = ctx.cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 5 if ctx.quick else 30
    d = cfg.diffusion
    branches = ("full", "no_text", "no_neighbors")
    ratios: list[Ratio] = []
    measured: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(), "branches": branches}
    for B in (1,) if ctx.quick else (1, 4):
        model, x = _model_and_inputs(cfg, B, device)
        with torch.no_grad():
            feats = model.encode_neighbors(
                x["neighbor_images"], x["neighbor_text_states"], x["neighbor_text_mask"], x["neighbor_mask"]
            )
        t = torch.full((B,), 500, device=device, dtype=torch.long)
        args = (model, x["x_T"], t, x["text_states"], x["text_mask"], feats, d.text_guidance, d.neighbor_guidance)

        @torch.no_grad()
        def batched(args=args):
            return diffusion.guided_prediction(*args, branches)

        @torch.no_grad()
        def separate(args=args):
            return diffusion.guided_prediction(*args, branches, batched=False)

        @torch.no_grad()
        def single(args=args):
            return diffusion.guided_prediction(*args, ("full",))

        diff = (batched() - separate()).abs().max().item()
        times = interleaved({"batched": batched, "separate": separate, "single_branch": single}, repeats, warmup=2)
        med = {k: median(v) for k, v in times.items()}
        speedup = med["separate"] / med["batched"]
        measured[f"B{B}"] = {
            "per_call_ms": {k: summary(v, 1e3) for k, v in times.items()},
            "separate_over_batched": round(speedup, 3),
            "batched_3_branches_over_one_branch": round(med["batched"] / med["single_branch"], 3),
            "max_abs_diff_batched_vs_separate": diff,
        }
        ratios.append(
            Ratio(
                f"guided step time: 3 separate forwards / 1 batched forward (B={B})",
                round(speedup, 3),
                note="> 1: batching the branches is faster",
            ),
        )
        ratios.append(
            Ratio(
                f"batched 3-branch forward / one unguided forward (B={B})",
                round(med["batched"] / med["single_branch"], 3),
                note="3 would be no saving",
            )
        )
    return Report(
        ratios=ratios,
        measured={**measured, "repeats": repeats},
        method=(
            "diffusion.guided_prediction with branches full / no_text / no_neighbors (one UNet call on 3B rows) vs "
            "the same with batched=False (one UNet call per branch, B rows each, combined the same way; outputs "
            "checked equal), plus one unguided call for scale; neighbor features precomputed; interleaved rounds, "
            f"2 warm-up rounds excluded, median of {repeats}."
        ),
        config={"model": cfg.model.__dict__, "diffusion": cfg.diffusion.__dict__},
    )
