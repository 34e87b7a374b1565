"""A registered model as an MLflow pyfunc model: `tracking.register_pipeline` logs this file with the
pipeline folder ("models from code": nothing is pickled), and MLflow runs it when it loads the model.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/neighbor-diffusion@candidate")
    out = model.predict({"prompt": "a photo of the toy on a snowy field", "neighbor_images": [png1, png2]},
                        params={"seed": 0})
    out["image"][0]  # PNG bytes

A row: `prompt`, `neighbor_images` (image files' bytes, or base64 strings) and optionally
`neighbor_captions`; params: `seed`, `num_inference_steps`, `text_guidance`, `neighbor_guidance` (left
out, or 0 steps and -1 guidance: the model's defaults). Each row gives one PNG, the image of
`pipe(prompt, neighbor_images, neighbor_captions, seed=seed)`.
"""

from __future__ import annotations

import base64
import binascii

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from neighbor_diffusion.tracking import PIPELINE_ARTIFACT

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec(Array("binary"), "neighbor_images"),
            ColSpec(Array("string"), "neighbor_captions", required=False),
        ]
    ),
    outputs=Schema([ColSpec("binary", "image")]),
    params=ParamSchema(
        [
            ParamSpec("seed", "long", 0),
            ParamSpec("num_inference_steps", "long", 0),
            ParamSpec("text_guidance", "double", -1.0),
            ParamSpec("neighbor_guidance", "double", -1.0),
        ]
    ),
)


class NeighborDiffusionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from neighbor_diffusion.pipeline import NeighborDiffusionPipeline

        self.pipe = NeighborDiffusionPipeline.from_pretrained(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from neighbor_diffusion.data.images import decode_image, encode_png

        params = params or {}
        sampling = {k: params[k] for k in ("num_inference_steps",) if params.get(k, 0) > 0}
        sampling |= {k: params[k] for k in ("text_guidance", "neighbor_guidance") if params.get(k, -1) >= 0}
        rows = pd.DataFrame(model_input).to_dict("records")
        images = []
        for i, row in enumerate(rows):
            files = _as_list(row.get("neighbor_images"))
            if len(files) > self.pipe.max_neighbors:  # before decoding any
                raise ValueError(f"row {i}: neighbor_images: got {len(files)}, need 1..{self.pipe.max_neighbors}")
            neighbors = [decode_image(_file_bytes(f), f"row {i}: neighbor_images[{j}]") for j, f in enumerate(files)]
            captions = _as_list(row.get("neighbor_captions")) or None
            try:
                (image,) = self.pipe(
                    row.get("prompt"), neighbors, captions, seed=int(params.get("seed", 0)), **sampling
                )
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from e
            images.append(encode_png(image))
        return pd.DataFrame({"image": images})


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
