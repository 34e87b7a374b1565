"""Shared fixtures: the debug preset, a tiny model, a random batch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from neighbor_diffusion.config import debug  # noqa: E402
from neighbor_diffusion.model import NeighborUNet  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def cfg():
    return debug()


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    return NeighborUNet.from_model_config(cfg.model, cross_attention_dim=32).eval()


def open_gates(model, value=0.7):
    """Give every neighbor gate a non-zero value so the neighbor branch is live."""
    with torch.no_grad():
        for attn in model.neighbor_attention.values():
            attn.gate.fill_(value)
    return model


def random_batch(cfg, B=2, K=None, T=6, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = K or cfg.model.max_neighbors
    S = cfg.model.image_size
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[:, T - 2 :] = False
    neighbor_mask = torch.ones(B, K, dtype=torch.bool)
    neighbor_mask[0, K - 1] = False  # row 0 has one padding neighbor
    return {
        "image": torch.rand(B, 3, S, S, generator=g) * 2 - 1,
        "text_states": torch.randn(B, T, D, generator=g),
        "text_mask": text_mask,
        "neighbor_images": torch.rand(B, K, 3, S, S, generator=g) * 2 - 1,
        "neighbor_text_states": torch.randn(B, K, T, D, generator=g),
        "neighbor_text_mask": text_mask[:, None].expand(B, K, T).clone(),
        "neighbor_mask": neighbor_mask,
    }
