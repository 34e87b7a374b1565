"""A registered model as an MLflow pyfunc model: `tracking.register_pipeline` logs this file with the
pipeline folder ("models from code": nothing is pickled), and MLflow runs it when it loads the model.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/neighbor-diffusion@candidate")
    out = model.predict({"prompt": "a photo of the toy on a snowy field", "neighbor_images": [png1, png2]},
                        params={"seed": 0})
    out["image"][0]  # PNG bytes

A row: `prompt`, `neighbor_images` (image files' bytes, or base64 strings) and optionally
`neighbor_captions` and `seed` (a column for every row or none: pandas cannot hold a missing integer);
params: `seed` (for rows without one) and the server's sampling options, `num_inference_steps`,
`text_guidance`, `neighbor_guidance`, `guidance_mode`, `interleave_ratio`, `sampler` (left out, or 0 steps,
-1 guidance or ratio, "" mode or sampler: the model's defaults). Each row gives one PNG, the image of
`pipe(prompt, neighbor_images, neighbor_captions, seed=seed)`, so equal rows give equal images unless their
seeds differ. Rows are sampled in batches of up to `serve.max_batch_size` (rows with as many neighbors share
a `pipe.generate` call, as requests do on a Serve replica); a row's image does not depend on the rows beside
it (up to rounding: +-1 of 255).
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from neighbor_diffusion.config import GUIDANCE_MODES, MAX_SEED, SAMPLERS, Config, Range, sampling_ranges
from neighbor_diffusion.tracking import PIPELINE_ARTIFACT

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec(Array("binary"), "neighbor_images"),
            ColSpec(Array("string"), "neighbor_captions", required=False),
            ColSpec("long", "seed", required=False),
        ]
    ),
    outputs=Schema([ColSpec("binary", "image")]),
    params=ParamSchema(
        [
            ParamSpec("seed", "long", 0),
            ParamSpec("num_inference_steps", "long", 0),
            ParamSpec("text_guidance", "double", -1.0),
            ParamSpec("neighbor_guidance", "double", -1.0),
            ParamSpec("guidance_mode", "string", ""),
            ParamSpec("interleave_ratio", "double", -1.0),
            ParamSpec("sampler", "string", ""),
        ]
    ),
)


class InvalidInput(MlflowException, ValueError):
    """A bad row or param: a ValueError to a Python caller, and to a client of `mlflow models serve` a 400 whose
    message ends with this one line (any other exception is MLflow's generic "unexpected error")."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class NeighborDiffusionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from neighbor_diffusion.pipeline import NeighborDiffusionPipeline

        self.pipe = NeighborDiffusionPipeline.from_pretrained(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from neighbor_diffusion.data.images import encode_png, to_pil
        from neighbor_diffusion.model import NeighborFeatures

        try:
            sampling = _sampling(params or {}, self.pipe.config)
            seed = _seed((params or {}).get("seed", 0), "params: seed")
            rows = pd.DataFrame(model_input).to_dict("records")
            for i, row in enumerate(rows):  # every row checked before any is sampled: a bad row 900 loses nothing
                self._inputs(i, row, seed)
        except ValueError as e:
            raise InvalidInput(str(e)) from e
        images: list[bytes] = [b""] * len(rows)
        step = self.pipe.config.serve.max_batch_size  # rows per generate() call, as a Serve replica batches
        for start in range(0, len(rows), step):
            groups: dict[int, list[int]] = defaultdict(list)  # rows with equal neighbor counts batch
            prompts, features, seeds = {}, {}, {}
            for i in range(start, min(start + step, len(rows))):
                prompts[i], neighbors, captions, seeds[i] = self._inputs(i, rows[i], seed)
                features[i] = self.pipe.encode_neighbor_set(neighbors, captions) if neighbors else None
                groups[len(neighbors)].append(i)
            for count, members in groups.items():
                x = self.pipe.generate(
                    [prompts[i] for i in members],
                    NeighborFeatures.cat([features[i] for i in members]) if count else None,
                    [seeds[i] for i in members],
                    **sampling,
                )
                for i, image in zip(members, x):
                    images[i] = encode_png(to_pil(image))
        return pd.DataFrame({"image": images})

    def _inputs(self, i: int, row: dict, seed: int) -> tuple[str, list, list[str] | None, int]:
        """Row i's prompt, decoded neighbor images and captions, and seed (`seed` where the row has none),
        checked as the pipeline and the server check them, within the model's `serve` limits (errors name the
        row and the field)."""
        from neighbor_diffusion.data.images import decode_image

        limits = self.pipe.config.serve
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"row {i}: prompt: must be a non-empty string")
        if len(prompt) > limits.max_prompt_chars:
            raise ValueError(
                f"row {i}: prompt: {len(prompt)} characters > serve.max_prompt_chars={limits.max_prompt_chars}"
            )
        files = _as_list(row.get("neighbor_images"))
        if len(files) > self.pipe.max_neighbors:  # before decoding any
            raise ValueError(f"row {i}: neighbor_images: got {len(files)}, need 1..{self.pipe.max_neighbors}")
        captions = _as_list(row.get("neighbor_captions")) or None
        if captions is not None and len(captions) != len(files):
            raise ValueError(f"row {i}: neighbor_captions: got {len(captions)} for {len(files)} neighbor_images")
        for j, caption in enumerate(captions or []):
            if not isinstance(caption, str):
                raise ValueError(f"row {i}: neighbor_captions[{j}]: must be a string")
            if len(caption) > limits.max_caption_chars:
                raise ValueError(
                    f"row {i}: neighbor_captions[{j}]: {len(caption)} characters > "
                    f"serve.max_caption_chars={limits.max_caption_chars}"
                )
        neighbors = []
        for j, f in enumerate(files):
            name, data = f"row {i}: neighbor_images[{j}]", _file_bytes(f)
            if len(data) > limits.max_image_bytes:
                raise ValueError(f"{name}: {len(data)} bytes > serve.max_image_bytes={limits.max_image_bytes}")
            neighbors.append(decode_image(data, name, max_pixels=limits.max_image_pixels))
        return prompt, neighbors, captions, _seed(row["seed"], f"row {i}: seed") if "seed" in row else seed


def _sampling(params: dict, config: Config) -> dict:
    """`pipe.generate`'s sampling keywords from the params, checked against the server's limits
    (`config.sampling_ranges` with `serve`); a param at its default (0 steps, -1 guidance or ratio, "" mode or
    sampler) is left out: the model's default."""
    allowed: dict = {**sampling_ranges(config.diffusion, config.serve), "guidance_mode": GUIDANCE_MODES}
    allowed["sampler"] = SAMPLERS
    sampling: dict = {}
    for spec in SIGNATURE.params:
        if spec.name not in allowed or params.get(spec.name, spec.default) == spec.default:
            continue
        value, need = params[spec.name], allowed[spec.name]
        if value not in need:  # NaN is in no range
            need = need if isinstance(need, Range) else f"one of {', '.join(need)}"
            default = f"{spec.default!r}: the model's default"
            raise ValueError(f"params: {spec.name}: got {value!r}, must be {need} (or {default})")
        sampling[spec.name] = value
    return sampling


def _seed(value, field: str) -> int:
    """A seed in the server's range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{field}: got {value!r}, need an integer in 0..{MAX_SEED}")
    return int(value)


def _as_list(value) -> list:
    """A row's list column: a list or array; missing (None, or NaN in a DataFrame) is empty."""
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else []


def _file_bytes(f: bytes | str) -> bytes:
    """An image file's bytes; base64 text (how JSON carries them, e.g. to `mlflow models serve`, whose schema
    check hands it on as the text's bytes) is decoded. No image file is all base64 characters."""
    data = f.encode() if isinstance(f, str) else bytes(f)
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        return data


set_model(NeighborDiffusionPyfunc())
