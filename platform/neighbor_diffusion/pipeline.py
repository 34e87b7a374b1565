"""`NeighborDiffusionPipeline`: a saved model you can call with a prompt and a few photos.

Directory layout (diffusers style, safetensors only, no pickles):

    neighbor_diffusion.json   the full run config (Config.to_dict) + format version
    unet/                     NeighborUNet.save_pretrained: config.json + safetensors
    scheduler/                the training noise schedule (DDPM scheduler_config.json)
    text_encoder/             only for the "tiny" encoder: its weights; "minilm" and
                              local-folder encoders are referenced, not copied

Usage::

    pipe = NeighborDiffusionPipeline.from_pretrained("runs/.../pipeline")
    images = pipe("a photo of the toy on a snowy field", neighbor_images=[im1, im2], seed=0)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from neighbor_diffusion import diffusion
from neighbor_diffusion.config import Config, image_seeds
from neighbor_diffusion.data.images import ImageError, to_pil, to_tensor
from neighbor_diffusion.model import NeighborFeatures, NeighborUNet
from neighbor_diffusion.text import TextEncoder, TinyTextEncoder, build_text_encoder

FORMAT_VERSION = 1
CONFIG_NAME = "neighbor_diffusion.json"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"  # what NeighborUNet.save_pretrained writes


class NeighborDiffusionPipeline:
    def __init__(
        self, unet: NeighborUNet, text_encoder: TextEncoder, config: Config, device: str | torch.device = "cpu"
    ):
        self.config = config
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval()
        self.image_size = config.model.image_size
        self.max_neighbors = config.model.max_neighbors

    # ------------------------------------------------------------------ building and saving

    @classmethod
    def from_config(cls, config: Config, device: str | torch.device = "cpu") -> NeighborDiffusionPipeline:
        """A freshly initialised model (random UNet, frozen text encoder)."""
        text_encoder = build_text_encoder(config.text.encoder, config.text.max_length)
        unet = NeighborUNet.from_model_config(config.model, text_encoder.dim)
        return cls(unet, text_encoder, config, device)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        diffusion.train_scheduler(self.config.diffusion).save_pretrained(directory / "scheduler")
        if isinstance(self.text_encoder, TinyTextEncoder):
            (directory / "text_encoder").mkdir(exist_ok=True)
            state = {k: v.contiguous() for k, v in self.text_encoder.state_dict().items()}
            save_file(state, directory / "text_encoder" / "model.safetensors")
        meta = {"format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device | None = None
    ) -> NeighborDiffusionPipeline:
        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: not a NeighborDiffusionPipeline folder (no {CONFIG_NAME})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version={meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
            )
        config = Config.from_dict(meta["config"])
        text_encoder = build_text_encoder(config.text.encoder, config.text.max_length)
        if isinstance(text_encoder, TinyTextEncoder):
            text_encoder.load_state_dict(load_file(directory / "text_encoder" / "model.safetensors"))
        # Build from config, then copy the weights in: parameters live in fresh, aligned memory rather
        # than in the mmap of the file, which keeps a loaded model bit-identical to the saved one.
        unet = NeighborUNet.from_config(NeighborUNet.load_config(directory / "unet"))
        if unet.config.cross_attention_dim != text_encoder.dim:  # (was a matmul's shape error at the first prompt)
            raise ValueError(
                f"{meta_path}: text.encoder={config.text.encoder!r} gives {text_encoder.dim}-wide token states, the "
                f"UNet in {directory / 'unet'} takes {unet.config.cross_attention_dim}"
            )
        unet.load_state_dict(load_file(directory / UNET_FILE))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(unet, text_encoder, config, device)

    # ------------------------------------------------------------------ inputs

    def prepare_images(self, images: Sequence[Image.Image], field: str = "neighbor_images") -> torch.Tensor:
        """PIL images of any size and mode -> (K, 3, S, S) in [-1, 1]; errors name the image."""
        return torch.stack([to_tensor(im, self.image_size, f"{field}[{i}]") for i, im in enumerate(images)])

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self.text_encoder.encode(list(captions))
        return states.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_neighbor_set(
        self, images: Sequence[Image.Image], captions: Sequence[str] | None = None
    ) -> NeighborFeatures:
        """K photos of one subject (+ optional captions) -> features for one row (B=1)."""
        if not 1 <= len(images) <= self.max_neighbors:
            raise ValueError(f"neighbor_images: got {len(images)}, need 1..{self.max_neighbors}")
        captions = list(captions) if captions is not None else [""] * len(images)
        if len(captions) != len(images):
            raise ValueError(f"neighbor_captions: got {len(captions)} for {len(images)} neighbor_images")
        K = len(images)
        pixels = self.prepare_images(images).to(self.device)
        states, mask = self.encode_text(captions)
        return self.unet.encode_neighbors(
            pixels[None], states[None], mask[None], torch.ones(1, K, dtype=torch.bool, device=self.device)
        )

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        neighbors: NeighborFeatures | None,
        seeds: Sequence[int],
        num_inference_steps: int | None = None,
        text_guidance: float | None = None,
        neighbor_guidance: float | None = None,
        guidance_mode: str | None = None,
        interleave_ratio: float | None = None,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """One row per prompt (neighbors: one row each, or None); returns (B, 3, S, S) in [-1, 1].

        Row i starts from noise drawn with seeds[i] and takes its interleaved-guidance choices
        from seeds[i], so a row's image does not depend on what else is in the batch.
        """
        d = self.config.diffusion
        S, C = self.image_size, self.unet.config.in_channels
        x_T = torch.stack([torch.randn((C, S, S), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        text_states, text_mask = self.encode_text(prompts)
        return diffusion.sample(
            self.unet,
            diffusion.sampling_scheduler(d, sampler),
            text_states,
            text_mask,
            neighbors.to(self.device) if neighbors is not None else None,
            num_inference_steps=num_inference_steps or d.num_inference_steps,
            text_guidance=d.text_guidance if text_guidance is None else text_guidance,
            neighbor_guidance=d.neighbor_guidance if neighbor_guidance is None else neighbor_guidance,
            guidance_mode=guidance_mode or d.guidance_mode,
            interleave_ratio=d.interleave_ratio if interleave_ratio is None else interleave_ratio,
            x_T=x_T,
            seed=seeds,
            **diffusion.thresholding_of(d),
        )

    def __call__(
        self,
        prompt: str,
        neighbor_images: Sequence[Image.Image] | None = None,
        neighbor_captions: Sequence[str] | None = None,
        num_images: int = 1,
        seed: int = 0,
        output_type: str = "pil",
        **sampling,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate `num_images` images of the neighbors' subject as the prompt describes.

        `sampling` takes generate()'s keywords: num_inference_steps, text_guidance,
        neighbor_guidance, guidance_mode, interleave_ratio, sampler.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt: must be a non-empty string")
        if num_images < 1:
            raise ValueError(f"num_images: got {num_images}, need >= 1")
        neighbors = None
        if neighbor_images:
            neighbors = self.encode_neighbor_set(neighbor_images, neighbor_captions).repeat(num_images)
        x = self.generate([prompt] * num_images, neighbors, image_seeds(seed, num_images), **sampling)
        if output_type == "pt":
            return x
        if output_type != "pil":
            raise ValueError(f"output_type={output_type!r}: must be 'pil' or 'pt'")
        return [to_pil(img) for img in x]


__all__ = ["ImageError", "NeighborDiffusionPipeline"]
