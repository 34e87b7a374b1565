"""Gated attention from the denoising stream to K neighbors' feature tokens.

Re-Imagen / SuTI add one attention layer that lets the UNet look at the encoded
neighbors. Here it sits *beside* the text cross-attention of a transformer block:
an attention processor computes diffusers' usual cross-attention and adds

    tanh(gate) * Attn(q = W_q h,  k = W_k n,  v = W_v n)

where h is the block's normed hidden state and n are the K*H*W neighbor tokens at
that resolution. The gate starts at zero, so a freshly built (or pretrained-loaded)
model is exactly the text-only UNet. Neighbors carry no index embedding: the layer is
invariant to their order, and padded (masked) neighbors contribute nothing; rows with no
neighbor at all (the no-neighbor guidance branch) skip the layer.

While sampling, the neighbor tokens are the same at every denoising step, and so are
their keys and values: `NeighborUNet.project_neighbors` computes them once into
`NeighborFeatures.kv`, and every step reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


@dataclass
class NeighborFeatures:
    """Encoded neighbors, computed once per request and reused at every denoising step.

    tokens[level]: (B, K*h*w, C) features of the K neighbors at that level.
    mask: (B, K) True for real neighbors, False for padding.
    kv[layer]: that NeighborAttention layer's keys and values of the tokens, (B, heads, K*h*w, d)
        each, when projected ahead (sampling); empty otherwise.
    """

    tokens: dict[int, torch.Tensor]
    mask: torch.Tensor
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def token_mask(self, level: int) -> torch.Tensor:
        B, K = self.mask.shape
        per_neighbor = self.tokens[level].shape[1] // K
        return self.mask.repeat_interleave(per_neighbor, dim=1)  # (B, K*h*w)

    def without_neighbors(self) -> NeighborFeatures:
        """Same shapes, every neighbor masked: the K=0 branch that guidance contrasts with."""
        return NeighborFeatures(self.tokens, torch.zeros_like(self.mask), self.kv)

    def repeat(self, n: int) -> NeighborFeatures:
        """Repeat each row n times (row i -> rows i*n .. i*n+n-1), e.g. for several images per prompt."""
        return NeighborFeatures(
            {lv: t.repeat_interleave(n, dim=0) for lv, t in self.tokens.items()},
            self.mask.repeat_interleave(n, dim=0),
            {key: (k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for key, (k, v) in self.kv.items()},
        )

    @staticmethod
    def cat(parts: list[NeighborFeatures]) -> NeighborFeatures:
        """Rows of all parts; projected keys/values are kept only when every part has them."""
        layers = set(parts[0].kv).intersection(*(p.kv for p in parts[1:]))
        return NeighborFeatures(
            {lv: torch.cat([p.tokens[lv] for p in parts]) for lv in parts[0].tokens},
            torch.cat([p.mask for p in parts]),
            {key: tuple(torch.cat([p.kv[key][i] for p in parts]) for i in (0, 1)) for key in layers},
        )

    def to(self, device: torch.device | str) -> NeighborFeatures:
        return NeighborFeatures(
            {lv: t.to(device) for lv, t in self.tokens.items()},
            self.mask.to(device),
            {key: (k.to(device), v.to(device)) for key, (k, v) in self.kv.items()},
        )


class NeighborAttention(nn.Module):
    """Attention with its own projections from `dim`-wide queries to `dim`-wide neighbor tokens."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(dim))  # zero: the layer starts switched off

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbor tokens (B, K*h*w, C) -> keys, values (B, heads, K*h*w, d)."""
        B, M, C = tokens.shape
        n = self.norm(tokens)
        k = self.to_k(n).view(B, M, self.heads, C // self.heads).transpose(1, 2)
        v = self.to_v(n).view(B, M, self.heads, C // self.heads).transpose(1, 2)
        return k, v

    def forward(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        has_any = token_mask.any(dim=1)  # (B,)
        # Under torch.compile every row takes the dense path: picking rows is a data-dependent branch and shape,
        # which would break the graph at every neighbor layer (49 breaks in the gpu-base UNet).
        if torch.compiler.is_compiling() or has_any.all() or not has_any.any():
            # (with no neighbor in any row, the layer still runs, times zero, so that every parameter is in the
            # graph on every rank, as distributed gradient reduction expects)
            return self._attend(hidden, tokens, token_mask, kv) * has_any[:, None, None].to(hidden.dtype)
        rows = has_any.nonzero().squeeze(1)  # only rows with neighbors: the rest get exactly zero
        kv_rows = None if kv is None else (kv[0][rows], kv[1][rows])
        part = self._attend(hidden[rows], tokens[rows], token_mask[rows], kv_rows)
        return hidden.new_zeros(hidden.shape[0], *part.shape[1:], dtype=part.dtype).index_copy(0, rows, part)

    def _attend(self, hidden, tokens, token_mask, kv) -> torch.Tensor:
        B, N, C = hidden.shape
        q = self.to_q(hidden).view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k, v = kv if kv is not None else self.project(tokens)  # (B, heads, K*h*w, d)
        # A row without neighbors would softmax over nothing (NaN); attend to everything (the caller zeroes it).
        safe_mask = token_mask | ~token_mask.any(dim=1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :])
        out = self.to_out(out.transpose(1, 2).reshape(B, N, C))
        return torch.tanh(self.gate) * out


class NeighborAwareProcessor(AttnProcessor2_0):
    """diffusers' attention, plus neighbor attention where this layer has one.

    Installed on every attention layer of the UNet so that the named `neighbors`
    argument is accepted everywhere (diffusers drops unknown processor kwargs with a
    warning). The NeighborAttention module is owned by the model, not by the
    processor, so the UNet's own state dict stays exactly a plain UNet's.
    """

    def __init__(
        self, neighbor_attention: NeighborAttention | None = None, level: int | None = None, key: str | None = None
    ):
        super().__init__()
        self.neighbor_attention = neighbor_attention
        self.level = level
        self.key = key  # the layer's name in NeighborUNet.neighbor_attention (and in NeighborFeatures.kv)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        neighbors: NeighborFeatures | None = None,
    ) -> torch.Tensor:
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.neighbor_attention is None or neighbors is None:
            return out
        tokens = neighbors.tokens[self.level]
        kv = neighbors.kv.get(self.key)
        return out + self.neighbor_attention(hidden_states, tokens, neighbors.token_mask(self.level), kv)
