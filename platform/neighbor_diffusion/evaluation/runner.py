"""Run the benchmark on Ray: generate every method's samples, score them, build the table and grids.

    settings = EvalSettings(model_dir=..., num_subjects=4, prompts_per_subject=2, ...)
    result = run(settings)            # Ray must be initialised by the caller
    result.table, result.grid, result.rows

Generation: one Ray Dataset of requests (example x method) through `map_batches` with
the `baselines.GenerateBatch` actor class (one pipeline per actor, `workers` actors);
DreamBooth-style fine-tuning as one Ray task per subject. Scoring is pure CPU numpy
(`benchmark.score`) and runs as a Ray Data `map` over the same workers.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neighbor_diffusion.config import Config
from neighbor_diffusion.data.images import grid_of_rows, square, text_cell
from neighbor_diffusion.evaluation import baselines, benchmark

CELL = 64  # pixels per image cell in sample grids
# the settings that are `pipe.generate`'s keywords
SAMPLING = ("num_inference_steps", "text_guidance", "neighbor_guidance", "guidance_mode", "interleave_ratio", "sampler")


@dataclass(frozen=True)
class EvalSettings:
    model_dir: str
    text_only_dir: str = ""  # a model trained with neighbors always dropped; "": the model, neighbors dropped
    num_subjects: int | None = None  # None: every held-out subject
    prompts_per_subject: int = 4
    k: int | None = None  # demonstrations per subject; None: model.max_neighbors
    num_inference_steps: int | None = None  # None: the model's diffusion.num_inference_steps
    text_guidance: float | None = None  # None here and below: the model's
    neighbor_guidance: float | None = None
    guidance_mode: str | None = None
    interleave_ratio: float | None = None
    sampler: str | None = None
    dreambooth: baselines.DreamBoothConfig | None = None  # None: no DreamBooth baseline
    workers: int = 2
    batch_size: int = 8
    gpus_per_worker: float = 0.0
    seed: int = 0
    oracle: bool = True  # score independent true renders too: the metrics' ceiling on these prompts
    extra: dict[str, Any] = field(default_factory=dict)

    def sampling(self) -> dict[str, Any]:
        """`pipe.generate`'s sampling keywords that are set."""
        return {k: getattr(self, k) for k in SAMPLING if getattr(self, k) is not None}


@dataclass
class EvalResult:
    table: list[dict[str, Any]]
    rows: list[dict[str, Any]]  # one per (example, method): scores + example identifiers
    images: dict[str, list[np.ndarray]]  # method -> one (S, S, 3) uint8 per example
    examples: list[dict[str, Any]]
    grid: Image.Image
    seconds: dict[str, float]


def load_config(model_dir: str) -> Config:
    meta = json.loads((Path(model_dir) / "neighbor_diffusion.json").read_text())
    return Config.from_dict(meta["config"])


# ---------------------------------------------------------------------------- generation


def _requests(examples: list[dict[str, Any]], method: str, start: int) -> list[dict[str, Any]]:
    return [
        {
            "row_id": start + i,
            "example": i,
            "method": method,
            "subject_id": ex["subject_id"],
            "prompt": ex["prompt"],
            "seed": ex["seed"],
            "neighbor_pixels": np.stack([np.asarray(im.convert("RGB")) for im in ex["neighbor_images"]]),
            "neighbor_captions": json.dumps(ex["neighbor_captions"]),
        }
        for i, ex in enumerate(examples)
    ]


def generate_ray_data(
    model_dir: str, requests: list[dict[str, Any]], settings: EvalSettings
) -> dict[int, dict[str, Any]]:
    """Requests -> {row_id: {image, adapt_seconds, generate_seconds}} via Ray Data map_batches on actors."""
    import ray

    # rows of one subject side by side, so a batch encodes each subject's neighbors once
    requests = sorted(requests, key=lambda r: (r["method"], r["subject_id"], r["row_id"]))
    ds = ray.data.from_items(requests, override_num_blocks=max(1, min(len(requests), 4 * settings.workers)))
    out = ds.map_batches(
        baselines.GenerateBatch,
        fn_constructor_kwargs={"pipeline_dir": model_dir, "sampling": settings.sampling(), "threads": 1},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.workers),
        num_cpus=1,
        num_gpus=settings.gpus_per_worker,
    ).take_all()
    return {int(r["row_id"]): r for r in out}


def generate_dreambooth(
    model_dir: str, examples: list[dict[str, Any]], settings: EvalSettings
) -> tuple[list[np.ndarray], dict[str, float]]:
    """DreamBooth images (one per example) and adaptation seconds per subject, one Ray task per subject."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_subject[ex["subject_id"]].append(i)
    subjects = [
        {
            "subject_id": sid,
            "noun": examples[idx[0]]["noun"],
            "pixels": np.stack([np.asarray(im.convert("RGB")) for im in examples[idx[0]]["neighbor_images"]]),
            "prompts": [examples[i]["prompt"] for i in idx],
            "seeds": [examples[i]["seed"] for i in idx],
        }
        for sid, idx in by_subject.items()
    ]
    results = baselines.run_dreambooth(
        model_dir, subjects, settings.dreambooth, settings.sampling(), num_gpus=settings.gpus_per_worker
    )
    images: list[np.ndarray] = [None] * len(examples)  # type: ignore[list-item]
    adapt: dict[str, float] = {}
    for s, r in zip(subjects, results):
        for j, i in enumerate(by_subject[s["subject_id"]]):
            images[i] = r["images"][j]
        adapt[s["subject_id"]] = float(r["adapt_seconds"])
    return images, adapt


# ---------------------------------------------------------------------------- scoring


def score_all(
    examples: list[dict[str, Any]], images: dict[str, list[np.ndarray]], world_seed: int
) -> list[dict[str, Any]]:
    """Score every (example, method) image as a Ray Data map (pure numpy, one CPU each)."""
    import ray

    # example-major: one block holds every method's image of an example, which share an identity reference
    items = [{"method": m, "example": i, "image": imgs[i]} for i in range(len(examples)) for m, imgs in images.items()]
    examples_ref = ray.put(examples)

    def score_row(row: dict[str, Any]) -> dict[str, Any]:
        ex = ray.get(examples_ref)[int(row["example"])]
        s = benchmark.score(ex, row["image"], world_seed)
        return {"method": row["method"], "example": int(row["example"]), "score": json.dumps(s)}

    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 16)))
    rows = []
    for r in ds.map(score_row, num_cpus=1).take_all():
        ex = examples[r["example"]]
        s = json.loads(r["score"])
        rows.append(
            {
                "method": r["method"],
                "example": r["example"],
                "subject_id": ex["subject_id"],
                "kind": ex["kind"],
                "novel": ex["novel"],
                "prompt": ex["prompt"],
                "seed": ex["seed"],
                **s,
            }
        )
    return sorted(rows, key=lambda r: (r["method"], r["example"]))


def oracle_images(examples: list[dict[str, Any]], seed: int) -> list[np.ndarray]:
    """Independent true renders of each prompt (another scene seed, 1-px jitter, noise): the metrics' ceiling."""
    from neighbor_diffusion.data import world
    from neighbor_diffusion.evaluation import metrics

    rng = np.random.default_rng(world.derive_seed(seed, "oracle"))
    size = examples[0]["target"].size[0]
    return [
        (
            metrics.independent_render(metrics.as_subject(ex["subject"]), metrics.as_context(ex["context"]), size, rng)
            * 255
        )
        .round()
        .astype(np.uint8)
        for ex in examples
    ]


# ---------------------------------------------------------------------------- grid


def sample_grid(examples: list[dict[str, Any]], images: dict[str, list[np.ndarray]], methods: list[str]) -> Image.Image:
    """One row per example: neighbors | prompt | each method's sample | ground truth; a header row names columns."""

    def cell(img: Image.Image | np.ndarray) -> Image.Image:
        img = img if isinstance(img, Image.Image) else Image.fromarray(img)
        return img.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)

    k = len(examples[0]["neighbor_images"])
    header = [text_cell(f"neighbor {i + 1}", CELL, CELL) for i in range(k)] + [text_cell("prompt", 3 * CELL, CELL)]
    header += [text_cell(m, CELL, CELL) for m in methods] + [text_cell("ground truth", CELL, CELL)]
    rows = [header]
    for i, ex in enumerate(examples):
        row = [cell(im) for im in ex["neighbor_images"]] + [text_cell(f"[{ex['kind']}] {ex['prompt']}", 3 * CELL, CELL)]
        rows.append(row + [cell(images[m][i]) for m in methods] + [cell(ex["target"])])
    return grid_of_rows(rows, CELL)


# ---------------------------------------------------------------------------- the whole run


def run(settings: EvalSettings) -> EvalResult:
    """Build the benchmark, generate with every method, score, and assemble the table."""
    cfg = load_config(settings.model_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    seen = benchmark.training_combinations(cfg)
    examples = benchmark.build(
        cfg, settings.num_subjects, settings.prompts_per_subject, settings.k, settings.seed, seen=seen
    )
    seconds["build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_only_dir = settings.text_only_dir or settings.model_dir
    requests = _requests(examples, baselines.NEIGHBOR, 0)
    out = generate_ray_data(settings.model_dir, requests, settings)
    if text_only_dir == settings.model_dir:
        out |= generate_ray_data(settings.model_dir, _requests(examples, baselines.TEXT_ONLY, len(examples)), settings)
    else:  # a separately trained text-only model: same requests, no neighbors
        out |= generate_ray_data(text_only_dir, _requests(examples, baselines.TEXT_ONLY, len(examples)), settings)
    images = {
        baselines.NEIGHBOR: [out[i]["image"] for i in range(len(examples))],
        baselines.TEXT_ONLY: [out[len(examples) + i]["image"] for i in range(len(examples))],
    }
    adapt: dict[str, dict[str, float]] = {baselines.NEIGHBOR: {}, baselines.TEXT_ONLY: {}}
    for i, ex in enumerate(examples):  # the first (and only) encode of each subject's neighbors
        a = float(out[i]["adapt_seconds"])
        if a > 0:
            adapt[baselines.NEIGHBOR].setdefault(ex["subject_id"], a)
        adapt[baselines.TEXT_ONLY][ex["subject_id"]] = 0.0
    seconds["generate"] = time.perf_counter() - t0

    if settings.dreambooth is not None:
        t0 = time.perf_counter()
        images[baselines.DREAMBOOTH], adapt[baselines.DREAMBOOTH] = generate_dreambooth(
            text_only_dir, examples, settings
        )
        seconds["dreambooth"] = time.perf_counter() - t0
    if settings.oracle:
        images["oracle_render"] = oracle_images(examples, settings.seed)

    t0 = time.perf_counter()
    rows = score_all(examples, images, cfg.data.seed)
    seconds["score"] = time.perf_counter() - t0

    checkpoints = {
        baselines.NEIGHBOR: settings.model_dir,
        baselines.TEXT_ONLY: text_only_dir + ("" if settings.text_only_dir else " (neighbors dropped)"),
        baselines.DREAMBOOTH: f"{text_only_dir} + {getattr(settings.dreambooth, 'steps', 0)} steps/subject",
        "oracle_render": "renderer (independent seed, 1-px jitter, noise)",
    }
    table = []
    for method in images:
        summary = benchmark.summarise([r for r in rows if r["method"] == method])
        per_subject = adapt.get(method)
        summary["adapt_seconds_per_subject"] = (
            float(np.mean(list(per_subject.values()))) if per_subject else float("nan")
        )
        table.append(
            {
                "method": method,
                **summary,
                "checkpoint": checkpoints[method],
                "seeds": f"benchmark seed {settings.seed}; sample seeds per example",
            }
        )
    grid = sample_grid(examples, images, list(images))
    return EvalResult(table, rows, images, examples, grid, seconds)


def meta(settings: EvalSettings, result: EvalResult) -> dict[str, Any]:
    cfg = load_config(settings.model_dir)
    return {
        "model": settings.model_dir,
        "model_preset": cfg.preset,
        "model_train_steps": cfg.train.steps,
        "subjects": len({e["subject_id"] for e in result.examples}),
        "prompts": len(result.examples),
        "neighbors_per_subject": len(result.examples[0]["neighbor_images"]),
        "sampling": settings.sampling() or "model defaults",
        "dreambooth": asdict(settings.dreambooth) if settings.dreambooth else "off",
        "benchmark_seed": settings.seed,
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        **settings.extra,
    }


# ---------------------------------------------------------------------------- DreamBench-style (real photos)


def dreambench_scores(
    settings: EvalSettings, root: str, embedders: list[str], prompts_per_subject: int = 4
) -> list[dict[str, Any]]:
    """DINO / CLIP-I / CLIP-T of the neighbor model and the text-only baseline on DreamBench-format folders.

    There is no ground truth for real photos: image scores compare each sample with the subject's
    photos (which are also its neighbors, as DreamBench compares with the subject's images).
    """
    from neighbor_diffusion.data.dreambench import load_dreambench
    from neighbor_diffusion.evaluation import metrics

    cfg = load_config(settings.model_dir)
    subjects = load_dreambench(root, max_neighbors=settings.k or cfg.model.max_neighbors)
    for s in subjects:  # the model's size, as the pipeline would make them: photos of several sizes stack
        s["model_images"] = [square(im, cfg.model.image_size) for im in s["neighbor_images"]]
    examples = [
        {"subject_id": s["subject_id"], "prompt": p, "seed": settings.seed + j, "neighbor_images": s["model_images"],
         "neighbor_captions": s["neighbor_captions"], "photos": s["neighbor_images"]}
        for s in subjects for j, p in enumerate(s["prompts"][:prompts_per_subject])
    ]  # fmt: skip
    n = len(examples)
    out = generate_ray_data(settings.model_dir, _requests(examples, baselines.NEIGHBOR, 0), settings)
    out |= generate_ray_data(settings.text_only_dir or settings.model_dir,
                             _requests(examples, baselines.TEXT_ONLY, n), settings)  # fmt: skip
    table = []
    for m, start in ((baselines.NEIGHBOR, 0), (baselines.TEXT_ONLY, n)):
        samples = [Image.fromarray(out[start + i]["image"]) for i in range(n)]
        row: dict[str, Any] = {"method": m, "samples": float(n)}
        for path in embedders:
            e = metrics.load_embedder(path)
            name = "clip" if e.kind == "clip" else "dino"
            row[f"{name}_i" if name == "clip" else "dino"] = float(np.mean(
                [metrics.image_similarity(e, [samples[i]], examples[i]["photos"]) for i in range(n)]
            ))  # fmt: skip
            if e.kind == "clip":
                row["clip_t"] = metrics.text_similarity(e, samples, [ex["prompt"] for ex in examples])
        table.append(row)
    return table
