"""Sample grids for fixed held-out subjects: neighbors | prompt | sample | ground truth.

The same subjects, prompts and seeds at every logging step, so grids from one run (or
two runs) can be compared side by side.
"""

from __future__ import annotations

import functools
import json

import torch
from PIL import Image

from neighbor_diffusion.config import Config
from neighbor_diffusion.data.images import grid_of_rows, text_cell, to_pil
from neighbor_diffusion.model import NeighborUNet

CELL = 96  # pixels per image cell in the grid (samples are upscaled, nearest neighbour)
NUM_SUBJECTS = 4


@functools.lru_cache(maxsize=4)
def _examples(cfg_json: str) -> list[dict]:
    from neighbor_diffusion.data.world import heldout_examples

    cfg = Config.from_dict(json.loads(cfg_json))
    return heldout_examples(
        cfg, num_subjects=NUM_SUBJECTS, k=cfg.model.max_neighbors, image_size=cfg.model.image_size, seed=1234
    )


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
    examples = _examples(cfg.to_json())
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
