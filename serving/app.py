"""Ray Serve application: an HTTP ingress and an autoscaled, batching model deployment.

    client -> proxy -> NeighborDiffusionIngress (FastAPI: read + validate + decode check)
                    -> NeighborDiffusionModel  (neighbor-feature LRU -> batcher -> pipeline.generate -> PNG)

The model comes from `serve.model_uri` (a pipeline folder or `models:/<name>@<alias>`),
never from a request. Neighbors are clean images at t=0, so their features are computed
once per request (`pipeline.encode_neighbor_set`) and kept in a bounded LRU keyed by the
content hash of the neighbor set: a repeated subject skips encoding. Requests waiting
when the model becomes free (up to `max_batch_size`; serving/batching.py says why not
`@serve.batch`) and sharing sampling parameters (and neighbor count) become one
`pipeline.generate` call with one row per image and per-row seeds.

Run locally (blocks; Ctrl-C stops it):

    python -m serving.app --serve.model_uri models:/neighbor-diffusion@candidate
    curl -s -X POST http://127.0.0.1:8000/v1/generate?format=png -o out.png \\
         -F prompt="a photo of the toy on the beach" -F neighbor_images=@photo1.png

`serve run serving/serve_config.yaml` runs the same application from the config file
(`--write-config` regenerates it from `ServeConfig`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import secrets
import signal
import sys
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from neighbor_diffusion.config import (
    Config,
    ServeConfig,
    add_cli_arguments,
    cli_errors,
    from_cli_args,
    image_seeds,
    override,
    preset,
)
from neighbor_diffusion.tracking import is_registry_uri, resolve_pipeline_dir
from serving.batching import Batcher
from serving.schema import (
    MAX_SEED,
    GenerationJob,
    Limits,
    describe,
    errors_of,
    request_model,
    request_ranges,
    to_job,
)

APP_NAME = "neighbor-diffusion"
INGRESS = "NeighborDiffusionIngress"
MODEL = "NeighborDiffusionModel"
PAGE = Path(__file__).with_name("page.html")
LIST_FIELDS = ("neighbor_images", "neighbor_captions")


# ---------------------------------------------------------------------------- model deployment


class FeatureCache:
    """Bounded LRU: neighbor-set content hash -> NeighborFeatures (one row, on the model's device)."""

    def __init__(self, size: int):
        self.size, self.hits, self.misses = size, 0, 0
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {"size": self.size, "entries": len(self._items), "hits": self.hits, "misses": self.misses}


@dataclass(frozen=True)
class SamplingKey:
    """Requests with equal keys can share one pipeline.generate call."""

    num_neighbors: int  # NeighborFeatures.cat needs equal token counts
    steps: int
    text_guidance: float
    neighbor_guidance: float
    guidance_mode: str
    interleave_ratio: float
    sampler: str


@dataclass
class _Sampling:
    prompt: str
    neighbors: Any  # NeighborFeatures, one row
    seed: int
    num_images: int
    key: SamplingKey


@serve.deployment(name=MODEL)
class NeighborDiffusionModel:
    """One replica = one pipeline, one feature cache, one batcher."""

    def __init__(self, serve_cfg: ServeConfig, tracking_uri: str | None = None):
        import torch

        from neighbor_diffusion.pipeline import NeighborDiffusionPipeline

        if tracking_uri:  # resolved by the builder, so replicas agree whatever their working dir
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        torch.set_num_threads(max(1, round(serve_cfg.num_cpus)))
        self.cfg = serve_cfg
        self.pipe = NeighborDiffusionPipeline.from_pretrained(
            resolve_pipeline_dir(serve_cfg.model_uri, field="serve.model_uri")
        )
        self.model_id = model_id(serve_cfg.model_uri)
        self.cache = FeatureCache(serve_cfg.cache_size)
        self.batcher = Batcher(self._sample, serve_cfg.max_batch_size, serve_cfg.batch_wait_timeout_s)
        self.reconfigure(
            {"max_batch_size": serve_cfg.max_batch_size, "batch_wait_timeout_s": serve_cfg.batch_wait_timeout_s}
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batching is a `user_config`: `serve deploy` can change it without restarting replicas. Checked as
        ServeConfig checks it (a batch of 0 rows spun the batcher's loop, and every request on the replica hung)."""
        max_batch_size = int(user_config.get("max_batch_size", self.cfg.max_batch_size))
        batch_wait_timeout_s = float(user_config.get("batch_wait_timeout_s", self.cfg.batch_wait_timeout_s))
        if max_batch_size < 1:
            raise ValueError(f"user_config max_batch_size={max_batch_size}: must be >= 1")
        if not 0 <= batch_wait_timeout_s < float("inf"):
            raise ValueError(f"user_config batch_wait_timeout_s={batch_wait_timeout_s}: must be >= 0 and finite")
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.batcher.max_batch_size = self.max_batch_size
        self.batcher.batch_wait_timeout_s = self.batch_wait_timeout_s

    def info(self) -> dict[str, Any]:
        c, d = self.pipe.config, self.pipe.config.diffusion
        return {
            "id": self.model_id,
            "uri": self.cfg.model_uri,
            "preset": c.preset,
            "image_size": self.pipe.image_size,
            "max_neighbors": self.pipe.max_neighbors,
            "text_encoder": c.text.encoder,
            "device": str(self.pipe.device),
            "defaults": {
                "steps": d.num_inference_steps,
                "text_guidance": d.text_guidance,
                "neighbor_guidance": d.neighbor_guidance,
                "guidance_mode": d.guidance_mode,
                "interleave_ratio": d.interleave_ratio,
                "sampler": d.sampler,
            },
            "limits": request_ranges(d, self.cfg),  # what a request's steps, guidance and ratio may be
            "batching": {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s},
            "neighbor_cache": self.cache.stats(),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    async def generate(self, job: GenerationJob) -> dict[str, Any]:
        # 1. neighbor features: once per request, from the cache when this subject was seen
        t0 = time.perf_counter()
        neighbors = self.cache.get(job.neighbor_key)
        cache_hit = neighbors is not None
        if neighbors is None:
            neighbors = await asyncio.to_thread(self._encode_neighbors, job)
            self.cache.put(job.neighbor_key, neighbors)
        # 2. sampling, batched with other requests that share the sampling parameters
        t1 = time.perf_counter()
        key = self._sampling_key(job)
        pngs, batch_rows = await self.batcher.submit(_Sampling(job.prompt, neighbors, job.seed, job.num_images, key))
        t2 = time.perf_counter()
        parameters = {
            "prompt": job.prompt,
            "num_neighbors": key.num_neighbors,
            "num_images": job.num_images,
            "steps": key.steps,
            "text_guidance": key.text_guidance,
            "neighbor_guidance": key.neighbor_guidance,
            "guidance_mode": key.guidance_mode,
            "interleave_ratio": key.interleave_ratio,
            "sampler": key.sampler,
            "seed": job.seed,
            "seeds": image_seeds(job.seed, job.num_images),
        }
        return {
            "images": pngs,
            "parameters": parameters,
            "cache_hit": cache_hit,
            "batch_rows": batch_rows,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "timings_ms": {"neighbor_encode": (t1 - t0) * 1e3, "queue_and_sample": (t2 - t1) * 1e3},
        }

    def _encode_neighbors(self, job: GenerationJob):
        from neighbor_diffusion.data.images import decode_image

        images = [
            decode_image(data, f"neighbor_images[{i}]", max_pixels=self.cfg.max_image_pixels)
            for i, data in enumerate(job.neighbor_images)
        ]
        return self.pipe.encode_neighbor_set(images, job.neighbor_captions)

    def _sampling_key(self, job: GenerationJob) -> SamplingKey:
        d, s = self.pipe.config.diffusion, job.sampling
        return SamplingKey(
            num_neighbors=len(job.neighbor_images),
            steps=s.get("steps", d.num_inference_steps),
            text_guidance=s.get("text_guidance", d.text_guidance),
            neighbor_guidance=s.get("neighbor_guidance", d.neighbor_guidance),
            guidance_mode=s.get("guidance_mode", d.guidance_mode),
            interleave_ratio=s.get("interleave_ratio", d.interleave_ratio),
            sampler=s.get("sampler", d.sampler),
        )

    async def _sample(self, requests: list[_Sampling]) -> list[tuple[list[bytes], int]]:
        groups: dict[SamplingKey, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.key].append(i)
        out: list[tuple[list[bytes], int]] = [([], 0)] * len(requests)
        for key, members in groups.items():
            # one torch call at a time per replica; off the event loop so requests keep queueing meanwhile
            pngs = await asyncio.to_thread(self._generate, key, [requests[i] for i in members])
            rows = sum(requests[i].num_images for i in members)
            for i in members:
                out[i] = (pngs[: requests[i].num_images], rows)
                pngs = pngs[requests[i].num_images :]
        return out

    def _generate(self, key: SamplingKey, requests: list[_Sampling]) -> list[bytes]:
        from neighbor_diffusion.data.images import encode_png, to_pil
        from neighbor_diffusion.model import NeighborFeatures

        x = self.pipe.generate(
            [r.prompt for r in requests for _ in range(r.num_images)],
            NeighborFeatures.cat([r.neighbors.repeat(r.num_images) for r in requests]),
            [s for r in requests for s in image_seeds(r.seed, r.num_images)],
            num_inference_steps=key.steps,
            text_guidance=key.text_guidance,
            neighbor_guidance=key.neighbor_guidance,
            guidance_mode=key.guidance_mode,
            interleave_ratio=key.interleave_ratio,
            sampler=key.sampler,
        )  # (rows, 3, S, S)
        return [encode_png(to_pil(img)) for img in x]


# ---------------------------------------------------------------------------- HTTP ingress


class GenerateResponse(BaseModel):
    """JSON answer of /v1/generate (with `format=png`: the PNG itself, the rest in X- headers)."""

    images: list[str]  # base64 PNGs
    width: int
    height: int
    model: str
    parameters: dict[str, Any]
    cache_hit: bool
    batch_rows: int
    replica: str
    timings_ms: dict[str, float]


@serve.deployment(name=INGRESS)
@serve.ingress()
class NeighborDiffusionIngress:
    """FastAPI front: everything a client can get wrong is answered here with a 4xx."""

    def __init__(self, model: DeploymentHandle, serve_cfg: ServeConfig):
        self.model, self.cfg = model, serve_cfg

    async def __serve_build_asgi_app__(self) -> FastAPI:
        # The request schema depends on the model (max_neighbors, image size): ask it once.
        info = await self.model.info.remote()
        return make_api(self.model, self.cfg, info)


def make_api(model: DeploymentHandle, cfg: ServeConfig, info: dict[str, Any]) -> FastAPI:
    limits = Limits.of(cfg, info["limits"], info["max_neighbors"], info["image_size"])
    GenerateRequest = request_model(limits)
    # The body is read by hand (size limit, two content types), so its schema is given to OpenAPI here.
    request_schema = GenerateRequest.model_json_schema()
    app = FastAPI(
        title="Neighbor Diffusion",
        version="1",
        description=f"Subject-driven text-to-image by in-context learning. Model: `{info['id']}`.",
    )
    page = PAGE.read_text()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": describe(errors), "detail": errors})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # The ingress answers without touching the model's queue, so it stays up under overload;
        # Serve health-checks the model replicas itself.
        return {"status": "ok", "model": info["id"]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": [await model.info.remote()]}

    body_types = {
        "application/json": {"schema": request_schema},
        "multipart/form-data": {
            "schema": {
                **request_schema,
                "properties": {
                    **request_schema["properties"],
                    "neighbor_images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "minItems": 1,
                        "maxItems": limits.max_neighbors,
                    },
                },
            }
        },
    }

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        openapi_extra={"requestBody": {"required": True, "content": body_types}},
        responses={
            200: {"content": {"image/png": {}}, "description": "PNGs as base64 JSON, or one image/png"},
            400: {"description": "malformed form data"},
            413: {"description": "body larger than serve.max_request_bytes"},
            415: {"description": "not JSON, multipart or urlencoded"},
            422: {"description": "a field is invalid; `error` names it"},
            503: {"description": "overloaded (see Retry-After)"},
        },
    )
    async def generate(request: Request, format: Literal["json", "png"] | None = Query(None)) -> Any:
        # 1. read and validate (decoding the images runs in a thread: it is CPU work)
        t0 = time.perf_counter()
        body = await read_body(request, cfg.max_request_bytes)
        req = await parse_request(request, body, GenerateRequest)
        want_png = format == "png" or (format is None and prefers_png(request.headers.get("accept", "")))
        if want_png and req.num_images != 1:
            msg = f"image/png holds one image, but num_images={req.num_images}: ask for JSON"
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "format"), "msg": msg}])
        job = to_job(req, seed=secrets.randbelow(MAX_SEED + 1))
        # 2. generate
        t1 = time.perf_counter()
        out = await model.generate.remote(job)
        timings = {"validate": (t1 - t0) * 1e3, **out["timings_ms"], "total": (time.perf_counter() - t0) * 1e3}
        if want_png:
            headers = {
                "X-Model": info["id"],
                "X-Seed": str(job.seed),
                "X-Parameters": json.dumps(out["parameters"], ensure_ascii=True),
                "X-Timings-Ms": json.dumps({k: round(v, 2) for k, v in timings.items()}),
                "X-Cache-Hit": str(out["cache_hit"]).lower(),
            }
            return Response(out["images"][0], media_type="image/png", headers=headers)
        return GenerateResponse(
            images=[base64.b64encode(png).decode() for png in out["images"]],
            width=limits.image_size,
            height=limits.image_size,
            model=info["id"],
            parameters=out["parameters"],
            cache_hit=out["cache_hit"],
            batch_rows=out["batch_rows"],
            replica=out["replica"],
            timings_ms=timings,
        )

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) past `limit` bytes whether or not Content-Length is honest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body: {declared} bytes > serve.max_request_bytes={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body: more than serve.max_request_bytes={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, body: bytes, model: type[BaseModel]) -> Any:
    """JSON, multipart or urlencoded body -> a validated request; errors become 422s naming fields."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    filenames: dict[tuple, str] = {}
    if content_type in ("application/json", ""):
        validate = functools.partial(model.model_validate_json, body)
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        data, filenames = await form_fields(request, body)
        validate = functools.partial(model.model_validate, data)
    else:
        raise HTTPException(415, f"content-type {content_type!r}: send application/json or multipart/form-data")
    try:
        return await run_in_threadpool(validate)
    except ValidationError as e:
        errors = errors_of(e)
        for err in errors:  # a bad uploaded file is named by its filename too
            if name := filenames.get(tuple(err["loc"][1:])):
                err["msg"] = f"file {name!r}: {err['msg']}"
        raise RequestValidationError(errors) from None


async def form_fields(request: Request, body: bytes) -> tuple[dict[str, Any], dict[tuple, str]]:
    """Form parts -> the same dict a JSON body gives (files become bytes; list fields may repeat), and each
    uploaded file's filename by its place in that dict: ("neighbor_images", 0) -> "photo1.png"."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=32, max_fields=64)
    data: dict[str, Any] = {}
    filenames: dict[tuple, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if value.filename:  # its place in `data`, as a validation error's loc gives it
                place = (name, len(data.get(name, []))) if name in LIST_FIELDS else (name,)
                filenames[place] = value.filename
            value = await value.read()
        if name in LIST_FIELDS:
            data.setdefault(name, []).append(value)
        elif name in data:
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("body", name), "msg": "given more than once"}]
            )
        else:
            data[name] = value
    return data, filenames


def prefers_png(accept: str) -> bool:
    accept = accept.lower()
    return "image/png" in accept and "application/json" not in accept


# ---------------------------------------------------------------------------- building the application


def model_id(uri: str) -> str:
    if is_registry_uri(uri):
        return uri.split(":/", 1)[1].strip("/")
    path = Path(uri)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def num_gpus(cfg: ServeConfig) -> float:
    """`serve.num_gpus=-1`: one GPU per replica when the cluster (or, before Ray starts, this host) has one."""
    if cfg.num_gpus >= 0:
        return cfg.num_gpus
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def backpressure(cfg: ServeConfig) -> dict[str, Any]:
    return {"status_code": cfg.overload_status_code, "retry_after_s": cfg.retry_after_s}


def model_options(cfg: ServeConfig, gpus: float | None = None) -> dict[str, Any]:
    """Deployment options of the model, all from ServeConfig (and so from the YAML generated from it)."""
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if gpus is not None:
        actor["num_gpus"] = gpus
    return {
        # >= max_batch_size so a full batch can reach the batcher; past it requests wait in the queue
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": backpressure(cfg),
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas,
            "initial_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
        },
        "user_config": {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
        "ray_actor_options": actor,
    }


def ingress_options(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "num_replicas": 1,
        # Serve's default (5) would cap what reaches the model's batcher (STACK_NOTES.md)
        "max_ongoing_requests": cfg.ingress_max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": backpressure(cfg),
        "ray_actor_options": {"num_cpus": 0.25},  # validates and awaits: little CPU
    }


def config_from_args(args: Config | dict[str, Any] | None) -> Config:
    """A Config, or the `args` of a Serve config file: {preset, serve: {...}} or dotted {"serve.x": v}."""
    if isinstance(args, Config):
        return args
    args = dict(args or {})
    base = preset(str(args.pop("preset", "debug")))
    flat: dict[str, str] = {}
    for key, value in args.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return override(base, flat)


def resolve_serve_config(cfg: ServeConfig) -> tuple[ServeConfig, str | None]:
    """Absolute model paths and tracking URI, so replicas find the model from any working dir; an alias pinned
    to the version it names now (`models:/<name>/<version>`), so that every replica, also one started later by
    the autoscaler or a restart, serves that version when the alias moves (redeploy to take the new one)."""
    if not cfg.model_uri:
        raise ValueError("serve.model_uri is empty: give a pipeline folder or models:/<name>@<alias>")
    if is_registry_uri(cfg.model_uri):
        from neighbor_diffusion.tracking import check_registry_uri, tracking_uri

        # in the store: else one line, not 3 failed replicas
        pinned = check_registry_uri(cfg.model_uri, field="serve.model_uri")
        return replace(cfg, model_uri=pinned), tracking_uri()
    # checked here too, so a wrong path fails at once rather than in each replica's start
    return replace(cfg, model_uri=str(resolve_pipeline_dir(cfg.model_uri, field="serve.model_uri").resolve())), None


def build_app(args: Config | dict[str, Any] | None = None) -> serve.Application:
    """The bound application: `serve.run(build_app(cfg))`, or `import_path: serving.app:build_app`."""
    given = config_from_args(args).serve
    cfg, tracking = resolve_serve_config(given)
    if cfg.model_uri != given.model_uri and is_registry_uri(given.model_uri):
        print(f"[serve] serve.model_uri={given.model_uri} is {cfg.model_uri}", flush=True)
    model = NeighborDiffusionModel.options(**model_options(cfg, num_gpus(cfg))).bind(cfg, tracking)
    return NeighborDiffusionIngress.options(**ingress_options(cfg)).bind(model, cfg)


def serve_config(cfg: Config) -> dict[str, Any]:
    """The Serve config file (`serve run` / `serve deploy` / KubeRay serveConfigV2) for this config."""
    s = cfg.serve
    model = model_options(s, s.num_gpus)
    if s.num_gpus < 0:
        # A file's ray_actor_options replace the code's whole dict: leave them out, so that build_app,
        # running on the cluster, gives each replica a GPU when the cluster has one.
        del model["ray_actor_options"]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serving.app:build_app",
                "args": {"preset": cfg.preset, "serve": serve_args(cfg)},
                "deployments": [
                    {"name": INGRESS, **ingress_options(s)},
                    {"name": MODEL, **model},
                ],
            }
        ],
    }


# ServeConfig fields a Serve config file shows as http_options and deployment options, which replace the code's
# (num_cpus is not one: a replica also sets its threads from it, and its copy of the config comes from `args`)
FILE_OPTIONS = {
    "host", "port", "request_timeout_s", "min_replicas", "max_replicas", "target_ongoing_requests",
    "upscale_delay_s", "downscale_delay_s", "max_ongoing_requests", "max_queued_requests", "overload_status_code",
    "retry_after_s", "ingress_max_ongoing_requests", "max_batch_size", "batch_wait_timeout_s", "num_gpus",
}  # fmt: skip


def serve_args(cfg: Config) -> dict[str, Any]:
    """build_app's `serve` args in a Serve config file: the model and every other field that differs from the
    preset's and that the file does not show (a request limit given to --write-config, e.g. --serve.max_steps 200,
    reaches the replicas)."""
    default = preset(cfg.preset).serve
    changed = {f.name: getattr(cfg.serve, f.name) for f in fields(cfg.serve) if f.name not in FILE_OPTIONS}
    return {"model_uri": cfg.serve.model_uri} | {k: v for k, v in changed.items() if v != getattr(default, k)}


def export_pythonpath() -> None:
    """Put `serving` and `neighbor_diffusion` on PYTHONPATH (absolute) for the Ray workers started from here."""
    import neighbor_diffusion

    roots = [str(Path(__file__).resolve().parents[1]), str(Path(neighbor_diffusion.__file__).resolve().parents[1])]
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + [str(Path(p).resolve()) for p in current]))


def start(cfg: Config) -> None:
    """serve.start on cfg.serve.host:port and deploy the application (Ray must be initialised)."""
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.app", description=__doc__.split("\n\n")[0])
    add_cli_arguments(parser)
    parser.add_argument(
        "--ray-address", default=os.environ.get("RAY_ADDRESS") or "local", help="default: a new local Ray"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a new local Ray")
    parser.add_argument("--write-config", metavar="PATH", help="write the Serve config YAML and exit")
    args = parser.parse_args(argv)
    with cli_errors(parser):
        cfg = from_cli_args(args)
    if not cfg.serve.model_uri:  # also in a written config: build_app on the cluster would fail without it
        parser.error("--serve.model_uri is required: a pipeline folder or models:/<name>@<alias>")
    if args.write_config:
        import yaml

        header = "# Generated by `python -m serving.app --write-config` from ServeConfig; tests check it is current.\n"
        Path(args.write_config).write_text(header + yaml.safe_dump(serve_config(cfg), sort_keys=False))
        return
    with cli_errors(parser, (FileNotFoundError,)):
        resolve_serve_config(cfg.serve)  # a wrong model path: one line now, not a failed deployment later
    import ray

    export_pythonpath()
    # SIGTERM (docker stop, kill) must also reach the `finally`, or Ray's agents outlive us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    local = args.ray_address == "local"
    ray.init(address=args.ray_address, num_cpus=args.num_cpus if local else None, include_dashboard=False)
    try:
        start(cfg)
        print(f"serving {cfg.serve.model_uri} at http://{cfg.serve.host}:{cfg.serve.port}/ (API docs: /docs)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
