"""The methods compared, on the same subjects, prompts and seeds.

- **neighbor** (ours): the trained model given the K demonstrations in context; its
  adaptation cost is one forward pass (`encode_neighbor_set`), timed per subject.
- **text_only**: the same model with the neighbors dropped (the condition it learned
  under neighbor dropout), or a separate model trained with neighbors always dropped
  (`--text-only-model`): what the text alone gets.
- **dreambooth**: the text-only model fine-tuned on the K demonstrations of one subject
  (DreamBooth: a rare-token caption "a photo of sks <noun>", plus a prior-preservation
  loss on images the text-only model itself drew for "a photo of a <noun>"), then
  prompted with "sks <noun>". One Ray task per subject; adaptation time = prior images
  + fine-tuning, timed inside the task.

`GenerateBatch` is the Ray Data actor for the first two (it holds one pipeline);
`dreambooth_finetune` is a plain function over a pipeline's UNet, testable on CPU.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from neighbor_diffusion import diffusion
from neighbor_diffusion.data.images import to_pil
from neighbor_diffusion.model import NeighborFeatures, NeighborUNet
from neighbor_diffusion.pipeline import NeighborDiffusionPipeline

NEIGHBOR, TEXT_ONLY, DREAMBOOTH = "neighbor", "text_only", "dreambooth"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8."""
    return np.stack([np.asarray(to_pil(img)) for img in x])


# ---------------------------------------------------------------------------- neighbor model and text-only


class GenerateBatch:
    """Ray Data actor: one pipeline per worker; a batch of requests -> images.

    Rows: row_id, method (neighbor | text_only), prompt, seed, neighbor_pixels (K, S, S, 3)
    uint8, neighbor_captions (JSON list). Neighbor features are computed once per
    subject (rows of one subject share its demonstrations) and timed: that is the
    neighbor model's whole adaptation cost.
    """

    def __init__(self, pipeline_dir: str, sampling: dict[str, Any], threads: int = 1):
        torch.set_num_threads(threads)
        self.pipe = NeighborDiffusionPipeline.from_pretrained(pipeline_dir)
        self.sampling = sampling
        # one untimed pass: an actor's first forward pays for thread pools and kernel choice, not adaptation
        self.pipe.encode_neighbor_set([Image.new("RGB", (self.pipe.image_size,) * 2)], [""])

    def _synchronize(self) -> None:
        if self.pipe.device.type == "cuda":  # kernels run asynchronously: time them done
            torch.cuda.synchronize(self.pipe.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        methods = [str(m) for m in batch["method"]]
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        B = len(prompts)
        images = np.zeros((B, self.pipe.image_size, self.pipe.image_size, 3), np.uint8)
        adapt = np.zeros(B, np.float64)
        gen_seconds = np.zeros(B, np.float64)
        for method in (NEIGHBOR, TEXT_ONLY):
            rows = [i for i in range(B) if methods[i] == method]
            if not rows:
                continue
            neighbors = None
            if method == NEIGHBOR:
                feats, cache = [], {}
                for i in rows:
                    key = str(batch["subject_id"][i])
                    if key not in cache:  # one forward pass per subject and batch, timed
                        t0 = time.perf_counter()
                        pixels = batch["neighbor_pixels"][i]
                        cache[key] = self.pipe.encode_neighbor_set(
                            [Image.fromarray(p) for p in pixels], json.loads(str(batch["neighbor_captions"][i]))
                        )
                        self._synchronize()
                        adapt[i] = time.perf_counter() - t0
                    feats.append(cache[key])
                neighbors = NeighborFeatures.cat(feats)
            t0 = time.perf_counter()
            x = self.pipe.generate([prompts[i] for i in rows], neighbors, [seeds[i] for i in rows], **self.sampling)
            images[rows] = to_uint8(x)
            gen_seconds[rows] = (time.perf_counter() - t0) / len(rows)
        return {
            "row_id": batch["row_id"],
            "image": images,
            "adapt_seconds": adapt,
            "generate_seconds": gen_seconds,
        }


# ---------------------------------------------------------------------------- DreamBooth-style fine-tuning


@dataclass(frozen=True)
class DreamBoothConfig:
    """Per-subject fine-tuning of the text-only model (DreamBooth, Ruiz et al. 2023, at our scale)."""

    steps: int = 200
    lr: float = 2e-4
    rare_token: str = "sks"
    prior_images: int = 6  # drawn by the text-only model for "a photo of a <noun>"
    prior_weight: float = 1.0
    prior_sampling_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"dreambooth.steps={self.steps}: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"dreambooth.lr={self.lr}: must be > 0")
        if self.prior_images < 0:
            raise ValueError(f"dreambooth.prior_images={self.prior_images}: must be >= 0")


def rare_token_prompt(prompt: str, noun: str, token: str = "sks") -> str:
    """'a photo of the toy on a lawn' -> 'a photo of the sks toy on a lawn' (first mention of the noun)."""
    out, n = re.subn(rf"\b{re.escape(noun)}\b", f"{token} {noun}", prompt, count=1)
    return out if n else f"{token} {noun}, {prompt}"


def _text_only_batch(pipe: NeighborDiffusionPipeline, images: torch.Tensor, caption: str) -> dict[str, torch.Tensor]:
    """A training batch with every neighbor slot empty: the text-only condition."""
    B, S = images.shape[0], pipe.image_size
    states, mask = pipe.encode_text([caption] * B)  # (B, T, D), (B, T)
    T, D = states.shape[1:]
    return {
        "image": images,
        "text_states": states,
        "text_mask": mask,
        "neighbor_images": images.new_zeros(B, 1, 3, S, S),
        "neighbor_text_states": states.new_zeros(B, 1, T, D),
        "neighbor_text_mask": torch.zeros(B, 1, T, dtype=torch.bool, device=images.device),
        "neighbor_mask": torch.zeros(B, 1, dtype=torch.bool, device=images.device),
    }


def dreambooth_finetune(
    pipe: NeighborDiffusionPipeline, images: Sequence[Image.Image], noun: str, cfg: DreamBoothConfig
) -> tuple[NeighborUNet, dict[str, float]]:
    """Fine-tune a copy of `pipe.unet` on one subject's K images; `pipe` itself is left unchanged.

    Loss per step: eps-MSE on the K instance images captioned "a photo of <token> <noun>",
    plus `prior_weight` x eps-MSE on the prior images captioned "a photo of a <noun>"
    (prior preservation keeps the class from collapsing onto the subject). Neighbors are
    always dropped and text never is. Returns the tuned UNet (eval mode) and stats,
    including `seconds` (prior images + fine-tuning: the adaptation cost).
    """
    t0 = time.perf_counter()
    device = pipe.device
    g = torch.Generator().manual_seed(cfg.seed)
    instance = _text_only_batch(pipe, pipe.prepare_images(images).to(device), f"a photo of {cfg.rare_token} {noun}")
    prior = None
    if cfg.prior_images and cfg.prior_weight > 0:
        class_prompt = f"a photo of a {noun}"
        seeds = [cfg.seed * 1000 + i for i in range(cfg.prior_images)]
        x_prior = pipe.generate([class_prompt] * cfg.prior_images, None, seeds, cfg.prior_sampling_steps)
        prior = _text_only_batch(pipe, x_prior, class_prompt)
    prior_seconds = time.perf_counter() - t0

    unet = copy.deepcopy(pipe.unet).train().requires_grad_(True)
    scheduler = diffusion.train_scheduler(pipe.config.diffusion)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)

    def keep_text(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        B = batch["image"].shape[0]
        return torch.zeros(B, dtype=torch.bool, device=device), torch.ones(B, dtype=torch.bool, device=device)

    first = last = float("nan")
    for step in range(cfg.steps):
        # left-right flips as augmentation, as in training (the instance captions name no side)
        flip = torch.rand(instance["image"].shape[0], generator=g) < 0.5
        batch = dict(
            instance,
            image=torch.where(flip[:, None, None, None].to(device), instance["image"].flip(-1), instance["image"]),
        )
        loss = diffusion.training_losses(
            unet, batch, scheduler, pipe.config.diffusion, drop=keep_text(batch), generator=g
        )
        if prior is not None:
            loss_prior = diffusion.training_losses(
                unet, prior, scheduler, pipe.config.diffusion, drop=keep_text(prior), generator=g
            )
            loss = loss + cfg.prior_weight * loss_prior
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        optimizer.step()
        first = float(loss.detach()) if step == 0 else first
        last = float(loss.detach())
    unet.eval().requires_grad_(False)
    return unet, {
        "seconds": time.perf_counter() - t0,
        "prior_seconds": prior_seconds,
        "first_loss": first,
        "last_loss": last,
        "steps": float(cfg.steps),
    }


def dreambooth_generate(
    pipe: NeighborDiffusionPipeline,
    subject_images: Sequence[Image.Image],
    noun: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cfg: DreamBoothConfig,
    sampling: dict[str, Any],
) -> dict[str, Any]:
    """Fine-tune on one subject, then draw one image per prompt (rare token inserted, no neighbors)."""
    unet, stats = dreambooth_finetune(pipe, subject_images, noun, cfg)
    tuned = NeighborDiffusionPipeline(unet, pipe.text_encoder, pipe.config, pipe.device)
    t0 = time.perf_counter()
    x = tuned.generate([rare_token_prompt(p, noun, cfg.rare_token) for p in prompts], None, list(seeds), **sampling)
    return {
        "images": to_uint8(x),
        "adapt_seconds": stats["seconds"],
        "generate_seconds": (time.perf_counter() - t0) / len(prompts),
        "stats": stats,
    }


def dreambooth_task(
    pipeline_dir: str,
    subject_pixels: np.ndarray,
    noun: str,
    prompts: list[str],
    seeds: list[int],
    cfg: dict[str, Any],
    sampling: dict[str, Any],
    threads: int = 1,
) -> dict[str, Any]:
    """The body of one Ray task (one subject): load the text-only pipeline, fine-tune, generate."""
    torch.set_num_threads(threads)
    pipe = NeighborDiffusionPipeline.from_pretrained(pipeline_dir)
    images = [Image.fromarray(p) for p in subject_pixels]
    return dreambooth_generate(pipe, images, noun, prompts, seeds, DreamBoothConfig(**cfg), sampling)


def run_dreambooth(
    pipeline_dir: str,
    subjects: list[dict[str, Any]],
    cfg: DreamBoothConfig,
    sampling: dict[str, Any],
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> list[dict[str, Any]]:
    """One Ray task per subject ({subject_id, noun, pixels, prompts, seeds}); results in the same order."""
    import ray

    task = ray.remote(dreambooth_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    refs = [
        task.remote(pipeline_dir, s["pixels"], s["noun"], s["prompts"], s["seeds"], asdict(cfg), sampling)
        for s in subjects
    ]
    return ray.get(refs)
