"""What the model does on fixed held-out subjects, logged while it trains.

- `sample_grid`: neighbors | prompt | sample | ground truth, for a few subjects.
- `neighbor_use`: the denoising loss with the subject's neighbors over the loss with them
  masked, on the same noisy inputs. 1.0 means the neighbor branch is not used (its gates
  are shut or it has learnt nothing that helps on unseen subjects); below 1 it is. And
  the loss with the subject's own neighbors over the loss with another subject's: below 1
  only when what the branch takes from the neighbors is the subject's identity. And the
  model's x0 error near t = T beside the least error possible there from the prompt alone
  and from the prompt plus the subject (`x0_error_bounds`): how far the model is from
  using the text, and how much the neighbors could add.

The same subjects, prompts, seeds and noise at every logging step, so numbers and grids
from one run (or two runs) can be compared side by side.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import torch
from PIL import Image

from neighbor_diffusion.config import Config
from neighbor_diffusion.data.images import grid_of_rows, text_cell, to_pil
from neighbor_diffusion.model import NeighborUNet

CELL = 96  # pixels per image cell in the grid (samples are upscaled, nearest neighbour)
NUM_SUBJECTS = 4


NEIGHBOR_USE_EXAMPLES = 32
# fractions of the training timesteps. In the subject world a subject's colours still show through the noise
# up to t ~ 0.95 (its ~250 pixels average the noise away), so what only the neighbors know is worth most
# of the loss near t = 1: 0.99 is there.
NEIGHBOR_USE_T = (0.3, 0.6, 0.9, 0.99)


def _held_out_key(cfg: Config) -> str:
    """The key of the caches below: what the held-out examples, their batch and the bounds depend on (the
    world, the model's image size and neighbors, the text encoder), so that runs differing only in how they
    train (the ZeRO stages of the smoke tests, a benchmark's runs) share them (the bounds alone took 7 s
    of each debug-preset run)."""
    return Config(model=cfg.model, text=cfg.text, data=cfg.data).to_json()


@functools.lru_cache(maxsize=4)
def _examples(cfg_json: str, count: int = NUM_SUBJECTS) -> list[dict]:
    """`count` held-out examples: the first subjects, or each subject several times (other seeds) when there
    are fewer."""
    from neighbor_diffusion.data.world import heldout_examples

    cfg = Config.from_dict(json.loads(cfg_json))
    out: list[dict] = []
    for seed in range(1234, 1234 + count):
        out += heldout_examples(cfg, num_subjects=count, k=cfg.model.max_neighbors, seed=seed)
        if len(out) >= count:
            return out[:count]
    return out


@functools.lru_cache(maxsize=2)
def _text_encoder(name: str, max_length: int):
    from neighbor_diffusion.text import build_text_encoder

    return build_text_encoder(name, max_length)


@torch.no_grad()
def sample_grid(cfg: Config, unet: NeighborUNet, num_inference_steps: int | None = None) -> Image.Image:
    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline

    device = next(unet.parameters()).device
    pipe = NeighborDiffusionPipeline(unet, _text_encoder(cfg.text.encoder, cfg.text.max_length), cfg, device)
    was_training = unet.training
    examples = _examples(_held_out_key(cfg))
    rows = []
    for i, ex in enumerate(examples):
        sample = pipe(
            ex["prompt"],
            ex["neighbor_images"],
            ex["neighbor_captions"],
            seed=i,
            num_inference_steps=num_inference_steps,
            output_type="pt",
        )[0]
        cells = [*ex["neighbor_images"], text_cell(ex["prompt"], 2 * CELL, CELL), to_pil(sample), ex["target"]]
        rows.append([c if c.size[1] == CELL else c.resize((CELL, CELL), Image.Resampling.NEAREST) for c in cells])
    unet.train(was_training)
    return grid_of_rows(rows, CELL)


@functools.lru_cache(maxsize=2)
def _neighbor_use_batch(cfg_json: str) -> dict[str, torch.Tensor]:
    """The held-out examples of `neighbor_use` as one training-shaped batch (CPU), built once per config."""
    from neighbor_diffusion.data.images import to_tensor

    cfg = Config.from_dict(json.loads(cfg_json))
    encoder = _text_encoder(cfg.text.encoder, cfg.text.max_length)
    examples = _examples(cfg_json, NEIGHBOR_USE_EXAMPLES)
    S, B, K = cfg.model.image_size, len(examples), len(examples[0]["neighbor_images"])
    text_states, text_mask = encoder.encode([ex["prompt"] for ex in examples])
    n_states, n_mask = encoder.encode([c for ex in examples for c in ex["neighbor_captions"]])
    pixels = [torch.stack([to_tensor(m, S) for m in ex["neighbor_images"]]) for ex in examples]
    return {
        "image": torch.stack([to_tensor(ex["target"], S) for ex in examples]),
        "text_states": text_states,
        "text_mask": text_mask,
        "neighbor_images": torch.stack(pixels),
        "neighbor_text_states": n_states.view(B, K, *n_states.shape[1:]),
        "neighbor_text_mask": n_mask.view(B, K, -1),
        "neighbor_mask": torch.ones(B, K, dtype=torch.bool),
    }


# renders per example behind each estimate of `x0_error_bounds`
BOUND_DRAWS = 24


@functools.lru_cache(maxsize=4)
def x0_error_bounds(cfg_json: str, draws: int = BOUND_DRAWS) -> dict[str, float]:
    """The least x0 error (mean squared, [-1, 1] pixels) possible at t = T, where x_t tells nothing, on
    `neighbor_use`'s examples, estimated with the world's renderer:

    - `x0_bound_prompt`: knowing the prompt. The best prediction is the mean image given the prompt: its
      context (scene, position, size, ...) rendered with other subjects of the class (a prompt never names a
      subject's colours, pattern or proportions) and other scene seeds (nor the scene's details);
    - `x0_bound_subject`: knowing the prompt and the subject, what perfect use of the neighbors allows: the
      same with the subject itself.

    Each is the target's squared error from the mean of `draws` renders, divided by 1 + 1/draws (the error
    the sample mean adds to the posterior variance). Subjects are drawn from past the world's last index.
    """
    from neighbor_diffusion.data import world
    from neighbor_diffusion.data.images import to_tensor

    cfg = Config.from_dict(json.loads(cfg_json))
    S, rng = cfg.model.image_size, np.random.default_rng(0)
    errors: dict[str, list[float]] = {"x0_bound_prompt": [], "x0_bound_subject": []}
    n_classes = len(world.CLASSES)
    first = -(-cfg.data.num_subjects // n_classes)  # within-class index past the world's subjects
    for ex in _examples(cfg_json, NEIGHBOR_USE_EXAMPLES):
        subject = world.Subject.from_dict(ex["subject"])
        target, cls = to_tensor(ex["target"], S), world.CLASSES.index(subject.noun)
        others = [
            world.make_subject((first + int(i)) * n_classes + cls, cfg.data.seed) for i in rng.integers(0, 10**6, draws)
        ]
        for key, subjects in (("x0_bound_prompt", others), ("x0_bound_subject", [subject] * draws)):
            contexts = [
                world.Context.from_dict({**ex["context"], "seed": int(s)}) for s in rng.integers(0, 2**31, draws)
            ]
            mean = torch.stack([to_tensor(world.render(sub, c, S), S) for sub, c in zip(subjects, contexts)]).mean(0)
            errors[key].append((target - mean).pow(2).mean().item() / (1 + 1 / draws))
    return {key: float(np.mean(v)) for key, v in errors.items()}


@torch.no_grad()
def neighbor_use(cfg: Config, unet: NeighborUNet) -> dict[str, float]:
    """How much the model uses the neighbors of held-out subjects, at fixed t and noise.

    `neighbor_loss_ratio_t<t>`: loss with the subject's neighbors / loss with them masked.
    `neighbor_identity_ratio_t<t>`: loss with the subject's neighbors / loss with the previous example's, which
    are another subject's (the examples cycle through the held-out subjects; with only one there is no other,
    and no identity ratio). Both without suffix: the mean over t.
    `x0_error_t<t>` / `x0_error_t<t>_no_neighbors`: the x0 error that the loss at the last t (0.99 T) implies,
    with the neighbors and without, next to `x0_error_bounds` (at t = T; at 0.99 T the noise still hides
    nearly everything: SNR 2.4e-4 per pixel in the cosine schedule, ~0.06 pooled over a subject).
    """
    from neighbor_diffusion import diffusion

    device = next(unet.parameters()).device
    batch = {k: v.to(device) for k, v in _neighbor_use_batch(_held_out_key(cfg)).items()}
    other = {k: v.roll(1, 0) if k.startswith("neighbor_") else v for k, v in batch.items()}
    B = batch["image"].shape[0]
    scheduler = diffusion.train_scheduler(cfg.diffusion)
    noise = torch.randn(batch["image"].shape, generator=torch.Generator().manual_seed(0)).to(device)
    keep, drop = torch.zeros(B, dtype=torch.bool, device=device), torch.ones(B, dtype=torch.bool, device=device)
    was_training = unet.training
    unet.eval()
    loss, identity = {}, {}
    for frac in NEIGHBOR_USE_T:
        t = torch.full((B,), int(frac * (cfg.diffusion.num_train_timesteps - 1)), device=device)
        with_n = diffusion.training_losses(unet, batch, scheduler, cfg.diffusion, t=t, noise=noise, drop=(keep, keep))
        without = diffusion.training_losses(unet, batch, scheduler, cfg.diffusion, t=t, noise=noise, drop=(keep, drop))
        loss[f"neighbor_loss_ratio_t{int(t[0])}"] = (with_n / without).item()
        if cfg.data.num_heldout_subjects > 1:
            others = diffusion.training_losses(
                unet, other, scheduler, cfg.diffusion, t=t, noise=noise, drop=(keep, keep)
            )
            identity[f"neighbor_identity_ratio_t{int(t[0])}"] = (with_n / others).item()
    unet.train(was_training)
    out = {"neighbor_loss_ratio": sum(loss.values()) / len(loss), **loss}
    if identity:
        out = {**out, "neighbor_identity_ratio": sum(identity.values()) / len(identity), **identity}
    to_x0 = diffusion.x0_error_per_loss(scheduler, t[:1], cfg.diffusion).item()
    out[f"x0_error_t{int(t[0])}"] = with_n.item() * to_x0
    out[f"x0_error_t{int(t[0])}_no_neighbors"] = without.item() * to_x0
    return {**out, **x0_error_bounds(_held_out_key(cfg))}
