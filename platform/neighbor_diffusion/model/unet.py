"""The neighbor-conditioned pixel-space UNet (Re-Imagen / SuTI style).

How it differs from diffusers' `UNet2DConditionModel`, which it wraps unchanged:

1. `encode_neighbors` runs each of the K neighbor images through the *same* UNet's
   input conv and down blocks (shared weights), at timestep 0, with the neighbor's own
   caption as cross-attention context, and keeps the feature maps at the levels where
   neighbor attention sits, flattened to tokens: (B, K*h*w, C) per level.
2. At those levels every transformer block's text cross-attention gets a gated
   `NeighborAttention` beside it (see neighbor_attention.py). Gates start at zero, so
   the model starts as the text-only UNet, and `self.unet` keeps exactly the state
   dict of a plain UNet: pretrained text-to-image weights load into it unchanged.
3. `forward(..., neighbors=None)` is the text-only UNet; `neighbors` with every row
   masked is the same thing batched with other rows (the K=0 guidance branch).

Single-device code: distribution and precision are applied from `training/`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from neighbor_diffusion.config import ModelConfig
from neighbor_diffusion.model.neighbor_attention import NeighborAttention, NeighborAwareProcessor, NeighborFeatures


def _level_of(processor_name: str, num_levels: int) -> int:
    """'down_blocks.1.attentions.0...' -> 1; mid block -> deepest; up_blocks.j -> num_levels-1-j."""
    parts = processor_name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_levels - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return num_levels - 1
    raise ValueError(f"unexpected attention layer name {processor_name!r}")


class NeighborUNet(ModelMixin, ConfigMixin):
    """eps/v prediction given x_t, t, text token states and (optionally) encoded neighbors."""

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (16, 32),
        layers_per_block: int = 1,
        attention_levels: tuple[int, ...] = (1,),
        neighbor_levels: tuple[int, ...] = (1,),
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        max_neighbors: int = 3,
        cross_attention_dim: int = 32,
    ):
        super().__init__()
        n = len(block_out_channels)
        self.neighbor_levels = tuple(sorted(neighbor_levels))
        down = tuple("CrossAttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(n))
        up = tuple("CrossAttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(n)))
        self.unet = UNet2DConditionModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads (a naming quirk
            # it keeps for old checkpoints); ours is the width of a head, so it gets the heads of each level
            attention_head_dim=tuple(c // attention_head_dim for c in block_out_channels),
            norm_num_groups=norm_num_groups,
        )
        # One NeighborAttention per text cross-attention layer at a neighbor level.
        self.neighbor_attention = nn.ModuleDict()
        self._neighbor_level_of: dict[str, int] = {}  # layer name in neighbor_attention -> its level
        processors = {}
        for name in self.unet.attn_processors:
            level = _level_of(name, n)
            if name.endswith("attn2.processor") and level in self.neighbor_levels:
                key = name.removesuffix(".processor").replace(".", "_")
                self.neighbor_attention[key] = NeighborAttention(block_out_channels[level], attention_head_dim)
                self._neighbor_level_of[key] = level
                processors[name] = NeighborAwareProcessor(self.neighbor_attention[key], level, key)
            else:
                processors[name] = NeighborAwareProcessor()
        self.unet.set_attn_processor(processors)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, cross_attention_dim: int) -> NeighborUNet:
        return cls(
            image_size=cfg.image_size,
            in_channels=cfg.in_channels,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            attention_levels=cfg.attention_levels,
            neighbor_levels=cfg.neighbor_levels,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
            max_neighbors=cfg.max_neighbors,
            cross_attention_dim=cross_attention_dim,
        )

    def load_text_to_image_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a plain `UNet2DConditionModel` of matching config into the text-only part (strict)."""
        self.unet.load_state_dict(state_dict, strict=True)

    # ------------------------------------------------------------------ neighbors

    def encode_neighbors(
        self,
        neighbor_images: torch.Tensor,  # (B, K, C, H, W) in [-1, 1]
        neighbor_text_states: torch.Tensor,  # (B, K, T, D)
        neighbor_text_mask: torch.Tensor,  # (B, K, T) bool
        neighbor_mask: torch.Tensor,  # (B, K) bool, False = padding
    ) -> NeighborFeatures:
        B, K = neighbor_mask.shape
        unet = self.unet
        valid = neighbor_mask.reshape(-1).clone()
        if not valid.any():
            # Encode one padding slot anyway (it stays masked), so that every parameter takes part in
            # the graph on every rank: distributed gradient reduction expects the same set everywhere.
            valid[0] = True
        x = neighbor_images.reshape(B * K, *neighbor_images.shape[2:])[valid]  # only real neighbors are encoded
        text = neighbor_text_states.reshape(B * K, *neighbor_text_states.shape[2:])[valid]
        text_bias = self._mask_to_bias(neighbor_text_mask.reshape(B * K, -1)[valid], x.dtype)

        # 1. time: clean images, t = 0
        t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
        # 2. down path, keeping each level's last feature map before it is downsampled
        h = unet.conv_in(x)
        features: dict[int, torch.Tensor] = {}
        for level, block in enumerate(unet.down_blocks):
            if level > self.neighbor_levels[-1]:
                break
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text, encoder_attention_mask=text_bias)
            else:
                h, res = block(hidden_states=h, temb=emb)
            if level in self.neighbor_levels:
                features[level] = res[-2] if block.downsamplers is not None else res[-1]
        # 3. scatter back into (B, K, ...) with zeros for padding, flatten to tokens
        tokens = {}
        for level, f in features.items():
            full = f.new_zeros(B * K, *f.shape[1:])
            full[valid] = f
            C, h_, w_ = f.shape[1:]
            tokens[level] = full.view(B, K, C, h_ * w_).permute(0, 1, 3, 2).reshape(B, K * h_ * w_, C)
        return NeighborFeatures(tokens, neighbor_mask.bool())

    def project_neighbors(self, neighbors: NeighborFeatures) -> NeighborFeatures:
        """The same features with every neighbor layer's keys and values computed once: for sampling, where
        the neighbors do not change from one denoising step to the next (gradients flow, but training gains
        nothing from it: there the features change every step)."""
        levels = self._neighbor_level_of
        kv = {key: attn.project(neighbors.tokens[levels[key]]) for key, attn in self.neighbor_attention.items()}
        return NeighborFeatures(neighbors.tokens, neighbors.mask, kv)

    @staticmethod
    def _mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # what UNet2DConditionModel.forward does to encoder_attention_mask: (B, 1, T) additive bias
        return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)

    # ------------------------------------------------------------------ denoising

    def forward(
        self,
        sample: torch.Tensor,  # (B, C, H, W) x_t
        timestep: torch.Tensor,  # (B,)
        text_states: torch.Tensor,  # (B, T, D)
        text_mask: torch.Tensor,  # (B, T) bool
        neighbors: NeighborFeatures | None = None,
    ) -> torch.Tensor:
        kwargs = {"neighbors": neighbors} if neighbors is not None else None
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=text_states,
            encoder_attention_mask=text_mask,
            cross_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
