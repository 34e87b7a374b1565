"""The HTTP contract of `POST /v1/generate`: request validation, parsing and the job sent to the model.

The request model is built at replica start from two sources of limits: the loaded
pipeline (`model.max_neighbors`, the sampling defaults) and `ServeConfig` (prompt and
image sizes, steps, guidance: `config.sampling_ranges`, as the pyfunc model checks them).
So the OpenAPI schema at `/openapi.json` states the real limits (`/v1/models` the sampling
ones), and pydantic rejects what breaks them with a 422 whose `loc` names the field.
Images are validated here, in the ingress, by decoding them with the data package's
`decode_image` (size checked before pixels are decoded: decompression bombs); the model
replica only ever sees bytes that decoded once.

JSON bodies carry images as base64 strings (a `data:image/...;base64,` prefix is
accepted, as browsers produce it); multipart bodies carry them as files. Both use the
same field names, the pipeline's own: `neighbor_images`, `neighbor_captions`.
"""

from __future__ import annotations

import binascii
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
)

from neighbor_diffusion.config import (
    GUIDANCE_MODES,
    MAX_SEED,
    SAMPLERS,
    DiffusionConfig,
    Range,
    ServeConfig,
    sampling_ranges,
)
from neighbor_diffusion.data.images import ImageError, decode_image

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")


@dataclass(frozen=True)
class Limits:
    """Everything a request is checked against: the model's shape and the server's bounds."""

    max_neighbors: int
    image_size: int
    max_prompt_chars: int
    max_caption_chars: int
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    sampling: dict[str, Range]  # steps, guidance, ratio: `request_ranges`

    @classmethod
    def of(cls, serve: ServeConfig, sampling: dict[str, Range], max_neighbors: int, image_size: int) -> Limits:
        return cls(
            max_neighbors=max_neighbors,
            image_size=image_size,
            max_prompt_chars=serve.max_prompt_chars,
            max_caption_chars=serve.max_caption_chars,
            max_images=serve.max_images,
            max_image_bytes=serve.max_image_bytes,
            max_image_pixels=serve.max_image_pixels,
            sampling=sampling,
        )


def request_ranges(diffusion: DiffusionConfig, serve: ServeConfig) -> dict[str, Range]:
    """`config.sampling_ranges` by the request's field names (`steps` for `num_inference_steps`)."""
    return {"steps" if k == "num_inference_steps" else k: r for k, r in sampling_ranges(diffusion, serve).items()}


@dataclass
class GenerationJob:
    """One validated request, as the ingress hands it to the model deployment.

    `sampling` holds only what the client set; the model fills in its defaults.
    `neighbor_key` is the content hash of the neighbor set (images' bytes + captions):
    the key of the model's neighbor-feature cache.
    """

    prompt: str
    neighbor_images: list[bytes]
    neighbor_captions: list[str]
    num_images: int
    seed: int
    neighbor_key: str
    sampling: dict[str, Any] = field(default_factory=dict)


def neighbor_set_key(images: list[bytes], captions: list[str]) -> str:
    """sha256 over lengths + bytes + captions, so no two different sets share a key."""
    h = hashlib.sha256()
    for data, caption in zip(images, captions):
        c = caption.encode()
        h.update(len(data).to_bytes(8, "little") + data + len(c).to_bytes(8, "little") + c)
    return h.hexdigest()


def _image_validator(limits: Limits):
    def check(value: Any) -> bytes:
        if isinstance(value, str):  # JSON / urlencoded: base64 text
            try:
                # line breaks allowed: the `base64` command and base64.encodebytes wrap at 76 characters
                value = binascii.a2b_base64("".join(_DATA_URL.sub("", value, count=1).split()), strict_mode=True)
            except (binascii.Error, ValueError):
                raise ValueError("not valid base64") from None
        elif not isinstance(value, bytes):  # multipart: the file's bytes
            raise ValueError("must be a base64 string (JSON) or a file (multipart)")
        if len(value) > limits.max_image_bytes:
            raise ValueError(f"{len(value)} bytes > serve.max_image_bytes={limits.max_image_bytes}")
        try:
            decode_image(value, "image", max_pixels=limits.max_image_pixels)
        except ImageError as e:
            raise ValueError(e.problem) from None
        return value

    return check


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def request_model(limits: Limits) -> type[BaseModel]:
    """The `GenerateRequest` pydantic model for these limits (extra fields are rejected)."""
    ImageData = Annotated[
        bytes,
        PlainValidator(_image_validator(limits)),
        WithJsonSchema(
            {
                "type": "string",
                "contentEncoding": "base64",
                "description": "an image (PNG, JPEG, WebP, ...) as base64, or as a file in multipart",
            }
        ),
    ]
    Prompt = Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars), AfterValidator(_not_blank)]
    Caption = Annotated[str, Field(max_length=limits.max_caption_chars)]

    def within(name: str, **kw: Any) -> Any:
        r = limits.sampling[name]
        return Field(None, ge=r.low, le=r.high if r.high != math.inf else None, **kw)

    def one_caption_per_image(captions: list[str] | None, info: ValidationInfo) -> list[str] | None:
        images = info.data.get("neighbor_images")  # absent when the images were invalid themselves
        if captions is not None and images is not None and len(captions) != len(images):
            raise ValueError(f"got {len(captions)} captions for {len(images)} neighbor_images")
        return captions

    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(extra="forbid"),
        __validators__={"one_caption_per_image": field_validator("neighbor_captions")(one_caption_per_image)},
        prompt=(Prompt, Field(description="what to draw; the subject is given by the neighbor images")),
        neighbor_images=(
            list[ImageData],
            Field(min_length=1, max_length=limits.max_neighbors, description="photos of one subject"),
        ),
        neighbor_captions=(
            list[Caption] | None,
            Field(None, description="one caption per neighbor image (default: empty captions)"),
        ),
        num_images=(int, Field(1, ge=1, le=limits.max_images)),
        steps=(int | None, within("steps", description="denoising steps")),
        text_guidance=(float | None, within("text_guidance", allow_inf_nan=False)),
        neighbor_guidance=(float | None, within("neighbor_guidance", allow_inf_nan=False)),
        guidance_mode=(Literal[GUIDANCE_MODES] | None, None),  # type: ignore[valid-type]
        interleave_ratio=(float | None, within("interleave_ratio", allow_inf_nan=False)),
        sampler=(Literal[SAMPLERS] | None, None),  # type: ignore[valid-type]
        seed=(int | None, Field(None, ge=0, le=MAX_SEED, description="default: random; returned in parameters")),
    )


def to_job(req: BaseModel, seed: int) -> GenerationJob:
    images: list[bytes] = list(req.neighbor_images)
    captions = list(req.neighbor_captions) if req.neighbor_captions is not None else [""] * len(images)
    sampling = {
        name: getattr(req, name)
        for name in ("steps", "text_guidance", "neighbor_guidance", "guidance_mode", "interleave_ratio", "sampler")
        if getattr(req, name) is not None
    }
    return GenerationJob(
        prompt=req.prompt,
        neighbor_images=images,
        neighbor_captions=captions,
        num_images=req.num_images,
        seed=req.seed if req.seed is not None else seed,
        neighbor_key=neighbor_set_key(images, captions),
        sampling=sampling,
    )


def errors_of(e: ValidationError, prefix: tuple[str, ...] = ("body",)) -> list[dict[str, Any]]:
    """pydantic errors -> FastAPI's 422 shape, without echoing inputs (images can be megabytes)."""
    return [
        {"type": err["type"], "loc": [*prefix, *err["loc"]], "msg": err["msg"].removeprefix("Value error, ")}
        for err in e.errors(include_url=False, include_context=False, include_input=False)
    ]


def describe(errors: list[dict[str, Any]]) -> str:
    """`neighbor_images.0: undecodable (...)`: one line naming every bad field."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"] if x not in ("body", "query"))
        parts.append(f"{loc or 'body'}: {err['msg']}")
    return "; ".join(parts)
