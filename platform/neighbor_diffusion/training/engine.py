"""DeepSpeed and the pieces around it: config generation and validation, the objective
module the engine wraps, EMA weights, and checkpoint files.

This is the one place where distribution and precision are applied to the
single-device model (STYLE.md principle 3).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neighbor_diffusion import diffusion
from neighbor_diffusion.config import Config, ConfigError
from neighbor_diffusion.data import storage
from neighbor_diffusion.model import NeighborUNet
from neighbor_diffusion.pipeline import UNET_FILE
from neighbor_diffusion.text import text_encoder_dim
from neighbor_diffusion.tracking import is_registry_uri, resolve_pipeline_dir

ENGINE_TAG = "state"  # DeepSpeed checkpoint tag inside every Ray checkpoint
EMA_FILE = "ema.safetensors"
PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------- config


def uses_bf16(precision: str, use_gpu: bool) -> bool:
    """train.precision as it resolves: "auto" is bf16 on GPU, fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and use_gpu)


def deepspeed_config(cfg: Config, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config generated from ours (+ the user's JSON overrides, if any)."""
    t = cfg.train
    bf16 = uses_bf16(t.precision, use_gpu)
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # we hand DeepSpeed a torch AdamW
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if t.offload:  # offloaded optimizer steps need DeepSpeed's CPU Adam (compiled on first use)
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay}}
    if t.deepspeed_overrides:
        ds = _with_overrides(ds, t.deepspeed_overrides)
    return ds


# what the training loop does by train.* itself: an override may not say otherwise
_LOOP_KEYS = {
    ("train_micro_batch_size_per_gpu",): "train.batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("zero_optimization", "stage"): "train.zero_stage",
    ("bf16", "enabled"): "train.precision",
}


def _with_overrides(ds: dict[str, Any], path: str) -> dict[str, Any]:
    """`ds` with the JSON file at `path` merged over it; ConfigError for a file that cannot be read, or one that
    changes what the loop does by train.* (it steps one micro-batch at a time by train.grad_accum, and its EMA
    and grad norm follow train.zero_stage: DeepSpeed stepping otherwise would put the LR schedule, the logged
    grad norm and the checkpoints out of step)."""
    try:
        extra = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.deepspeed_overrides={path!r}: {e}") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"train.deepspeed_overrides={path!r}: must hold a JSON object")
    merged = _merge(ds, extra)
    for keys, field in _LOOP_KEYS.items():
        ours, theirs = _get(ds, keys), _get(merged, keys)
        if theirs != ours:
            raise ConfigError(
                f"train.deepspeed_overrides={path!r} sets {'.'.join(keys)}={theirs!r}, where the loop follows "
                f"{field} ({ours!r} here): set {field} instead"
            )
    return merged


def _get(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate_deepspeed_config(ds: dict[str, Any], world_size: int) -> None:
    """Reject a config DeepSpeed would reject, before any worker starts; messages name the keys."""
    micro, accum = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if None in (micro, accum, total) or micro * accum * world_size != total:
        raise ConfigError(
            f"deepspeed: train_batch_size={total} must equal train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x workers={world_size}"
        )
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig sees world size 1 outside a process group: check the rest on a per-worker copy.
    single = dict(ds, train_batch_size=micro * accum)
    try:
        DeepSpeedConfig(single)
    except Exception as e:
        raise ConfigError(f"deepspeed: {e}") from None


# ---------------------------------------------------------------------------- the model a run starts from

NEIGHBOR_PREFIX = "neighbor_attention."


def is_neighbor_parameter(name: str) -> bool:
    """A neighbor-attention parameter, by its UNet state-dict name (or the objective's `unet.`-prefixed one)."""
    return name.removeprefix("unet.").startswith(NEIGHBOR_PREFIX)


_INIT_FROM_KINDS = "expected a UNet .safetensors file or a pipeline folder, local or on object storage, or models:/"


def init_weights_file(init_from: str, download_dir: str | None = None) -> Path:
    """`train.init_from` -> the UNet safetensors file it names: that file or a pipeline folder, local or on
    object storage (s3://..., see `data.storage`), or a models:/ URI. What is not local is downloaded into
    `download_dir`, or else a new temporary folder."""
    if is_registry_uri(init_from):
        try:
            path = resolve_pipeline_dir(init_from, download_dir, field="train.init_from")
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    elif storage.is_uri(init_from):
        where = storage.location(init_from, "train.init_from")
        try:
            where = where / UNET_FILE if where.is_dir() else where
            data = where.read_bytes()
        except OSError as e:  # no such object, no bucket, no access
            raise ConfigError(f"train.init_from={init_from!r}: cannot read {where} ({e}); {_INIT_FROM_KINDS}") from None
        path = Path(download_dir or tempfile.mkdtemp(prefix="init-from-")) / where.name
        path.write_bytes(data)
    else:
        path = Path(init_from).expanduser()
    if path.is_dir():
        path = path / UNET_FILE
    if not path.is_file():
        raise ConfigError(f"train.init_from={init_from!r}: no file {path} ({_INIT_FROM_KINDS})")
    return path.resolve()


def check_init_from(cfg: Config, download_dir: str | None = None) -> Path | None:
    """Check `train.init_from` against `model.*` before any worker starts (names, shapes, from the
    file's header and a model built on the meta device); returns the file's absolute path."""
    if not cfg.train.init_from:
        return None
    from safetensors import safe_open

    path = init_weights_file(cfg.train.init_from, download_dir)
    try:
        with safe_open(str(path), "pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not is_neighbor_parameter(k)}
    except Exception as e:
        raise ConfigError(f"train.init_from={cfg.train.init_from!r}: {path} is not a safetensors file ({e})") from None
    with torch.device("meta"):
        unet = NeighborUNet.from_model_config(cfg.model, text_encoder_dim(cfg.text.encoder))
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items() if not is_neighbor_parameter(k)}
    problems = [f"{k} missing" for k in sorted(set(want) - set(have))]
    problems += [
        f"{k} is {have[k]}, the model's is {want[k]}" for k in sorted(want) if k in have and have[k] != want[k]
    ]
    problems += [f"{k} is not in the model" for k in sorted(set(have) - set(want))]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(
            f"train.init_from={cfg.train.init_from!r}: {path} does not fit this config's model.*: "
            f"{'; '.join(problems[:3])}{more}. Pass the model.* options it was trained with, or "
            "--train.init_from '' to train from scratch"
        )
    return path


def read_init_from(cfg: Config) -> tuple[str, bytes]:
    """`train.init_from` checked (`check_init_from`) and read, in the driver: (what the run records as its
    init_from: a file's absolute path, or the URI as given; the safetensors file's bytes). The driver puts
    the bytes in Ray's object store, so that workers on every node start from the same weights without a
    shared file system; a URI is downloaded once, into a temporary folder removed here."""
    if not cfg.train.init_from:
        return "", b""
    with tempfile.TemporaryDirectory(prefix="init-from-") as tmp:
        path = check_init_from(cfg, tmp)
        given = cfg.train.init_from
        return (given if is_registry_uri(given) or storage.is_uri(given) else str(path)), path.read_bytes()


def build_unet(cfg: Config, init_weights: bytes | None = None) -> NeighborUNet:
    """The UNet a run starts from, the same on every rank: built from `model.*` (seeded), the backbone
    loaded from `init_weights` (a safetensors file's bytes: `read_init_from`) or else from
    `train.init_from` if set, the neighbor gates at `train.neighbor_gate_init`."""
    t = cfg.train
    torch.manual_seed(t.seed)
    unet = NeighborUNet.from_model_config(cfg.model, text_encoder_dim(cfg.text.encoder))
    state = None  # (the names and shapes of init_from were checked in the driver: check_init_from)
    if init_weights:
        state = safetensors.torch.load(init_weights)
    elif t.init_from:
        state = load_file(init_weights_file(t.init_from))
    if state is not None:
        unet.load_text_to_image_weights(
            {k.removeprefix("unet."): v for k, v in state.items() if not is_neighbor_parameter(k)}
        )
    with torch.no_grad():
        for layer in unet.neighbor_attention.values():
            layer.gate.fill_(t.neighbor_gate_init)
    return unet


def param_groups(module: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the backbone at `train.lr`, the neighbor layers at `train.lr` times
    `train.neighbor_lr_scale` (the LR schedule scales both alike); one group when the scale is 1."""
    if cfg.train.neighbor_lr_scale == 1.0:
        return [{"params": list(module.parameters()), "lr": cfg.train.lr}]
    backbone, neighbor = [], []
    for name, p in module.named_parameters():
        (neighbor if is_neighbor_parameter(name) else backbone).append(p)
    lr = cfg.train.lr
    return [{"params": backbone, "lr": lr}, {"params": neighbor, "lr": lr * cfg.train.neighbor_lr_scale}]


# ---------------------------------------------------------------------------- objective


class DiffusionObjective(nn.Module):
    """What the DeepSpeed engine wraps: forward(batch) -> loss, so every parameter use
    (neighbor encoding included) happens inside the engine's forward (ZeRO-3 hooks)."""

    def __init__(self, unet: NeighborUNet, cfg: Config):
        super().__init__()
        self.unet = unet
        self.diffusion_cfg = cfg.diffusion
        self.scheduler = diffusion.train_scheduler(cfg.diffusion)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        dtype = self.unet.dtype
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        return diffusion.training_losses(self.unet, batch, self.scheduler, self.diffusion_cfg, generator=generator)


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to 10% of the peak rate."""
    warmup, total = cfg.train.warmup_steps, cfg.train.steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """Training randomness (t, noise, dropout) is a function of (seed, rank, step): resuming is exact.
    `micro` < 64 (train.grad_accum <= 64); taken modulo 2**63, the seeds torch takes (a train.seed from about
    3e5 up overflowed it: every worker failed its first step)."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + rank) * 1_000_003 + step) * 64 + micro) % 2**63)


# ---------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of the UNet's weights, kept in fp32 on every rank.

    Under ZeRO-3 a rank holds only a shard of each parameter, so the update gathers
    the full parameters first; the EMA copy is therefore always a complete model,
    which is what sampling and export need.
    """

    def __init__(self, unet: NeighborUNet, decay: float, zero_stage: int):
        self.decay, self.zero_stage = decay, zero_stage
        with self._gathered(unet):
            # a new UNet with the weights, not a deep copy: under ZeRO-3 a copy keeps DeepSpeed's hooks on every
            # submodule, but not its parameters' ds_* attributes, so its forward (held-out samples) failed and
            # left the ranks out of step (the next training step hung)
            self.model = type(unet).from_config(unet.config)
            self.model.load_state_dict(unet.state_dict())
            device = next(unet.parameters()).device
            self.model = self.model.to(device).float().eval().requires_grad_(False)

    def _gathered(self, unet: nn.Module):
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(unet.parameters()), modifier_rank=None)
        import contextlib

        return contextlib.nullcontext()

    @torch.no_grad()
    def update(self, unet: NeighborUNet, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short warm-up, as in common EMA schedules
        with self._gathered(unet):
            for ema_p, p in zip(self.model.parameters(), unet.parameters()):
                ema_p.lerp_(p.detach().to(ema_p.device, torch.float32), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def save(self, path: Path) -> None:
        save_file(self.state_dict(), path)

    def load(self, path: Path) -> None:
        self.model.load_state_dict(load_file(path))


def weights_only_loads(engine) -> None:
    """Make `engine.load_checkpoint` read with `torch.load(weights_only=True)`: DeepSpeed's TorchCheckpointEngine
    passes weights_only=False, so a file put under train.storage_path could run code in every worker that
    resumes. Besides tensors and builtins its checkpoints hold three DeepSpeed types (ZeRO's stage enum, the loss
    scaler, bf16's fragment addresses: found by loading this platform's checkpoints of every ZeRO stage, bf16
    too), allowed by name; another engine a user configures keeps its own loading."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return
    allowed = [ZeroStageEnum, LossScaler, fragment_address]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def read_progress(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((checkpoint_dir / PROGRESS_FILE).read_text())


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of model state this rank holds: parameters (its ZeRO-3 shard, if any) and
    optimizer tensors (master weights and moments of its partition). Measured from the
    tensors themselves, so it reflects what the ZeRO stage really partitioned."""
    seen: set[int] = set()

    def nbytes(t: torch.Tensor) -> int:
        if t.data_ptr() in seen or t.numel() == 0:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    params = 0
    for p in engine.module.parameters():
        params += nbytes(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    opt = 0
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        for p in group["params"]:
            opt += nbytes(p.data)
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                opt += nbytes(v)
    return {"param_bytes": params, "optimizer_bytes": opt, "total_bytes": params + opt}
