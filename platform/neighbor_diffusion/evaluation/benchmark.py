"""The subject-world benchmark: held-out subjects, K demonstrations each, prompts with ground truth.

For each held-out subject (never in a training crawl, `world.split_subjects`), K
demonstration images in plain contexts, and prompts of four kinds that ask for a context
(scene, position, size; see `metrics.TEXT_ATTRIBUTES`) in growing combinations:

    plain         scene + position + size (every such combination is common in training)
    color         + a visible colour change (4% of crawl images change colour)
    style         + "a pencil sketch of" / "a pop art poster of" (3% of crawl images)
    color+style   + both: about 0.1% of crawl images; the exact combination is unseen

Whether a prompt's exact combination (scene, position, size, colour, style, ...) occurs in
the training crawl is read from the crawl's ground truth when it exists (`novel`); else
it is None, and the kinds tell the story.

`score(examples, images)` runs every metric of `metrics.evaluate_image` on one image per
example and `summarise` aggregates them per method into the results table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neighbor_diffusion.config import Config
from neighbor_diffusion.data import world
from neighbor_diffusion.evaluation import metrics

KINDS = ("plain", "color", "style", "color+style")


def _prompt_context(rng: np.random.Generator, subject: world.Subject, kind: str) -> world.Context:
    ctx = metrics.sample_eval_context(rng, subject, p_color=0.0, p_style=0.0)
    colors = metrics.distinct_colors(subject)
    color = str(rng.choice(colors)) if "color" in kind and colors else None
    # a sketch hides colour, so the combined kind asks for pop art, where the colour stays checkable
    style = ("pop_art" if "color" in kind else str(rng.choice(list(world.STYLES)))) if "style" in kind else None
    return world.Context(ctx.scene, ctx.position, ctx.size, color=color, style=style, seed=ctx.seed)


def context_key(context: world.Context | dict[str, Any]) -> tuple:
    """A context without its seed: what a caption can ask for."""
    c = metrics.as_context(context).to_dict()
    return tuple(c[k] for k in ("scene", "position", "size", "orientation", "color", "accessory", "style"))


def training_combinations(cfg: Config) -> set[tuple] | None:
    """Context keys of every subject image in the training crawl (its ground truth), or None if not mined here."""
    from neighbor_diffusion.data import storage
    from neighbor_diffusion.data.mining import layout

    path = layout(cfg)["ground_truth"]
    if not path.is_file():
        return None
    contexts = storage.read_table(path, columns=["context"]).column("context").to_pylist()
    return {context_key(json.loads(c)) for c in contexts if c}


def build(
    cfg: Config,
    num_subjects: int | None = None,
    prompts_per_subject: int = 4,
    k: int | None = None,
    seed: int = 0,
    seen: set[tuple] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark examples (one per subject x prompt), deterministic in (cfg.data, seed).

    Each: subject_id, noun, subject (dict), neighbor_images [PIL]*K, neighbor_captions,
    neighbor_contexts, prompt, context (dict), kind, novel (bool or None), target (PIL:
    the ground truth of the prompt), seed (the sampling seed).
    """
    size = cfg.model.image_size
    k = k or cfg.model.max_neighbors
    heldout = world.split_subjects(cfg)["heldout"]
    if num_subjects is not None:
        heldout = heldout[:num_subjects]
    examples = []
    for index, subject in enumerate(heldout):
        rng = np.random.default_rng(world.derive_seed(seed, "benchmark", subject.seed))
        contexts = [world.sample_context(rng, p_color=0, p_accessory=0, p_style=0) for _ in range(k)]
        neighbor_images = [world.render(subject, c, size) for c in contexts]
        neighbor_captions = [world.caption(subject.noun, c, rng) for c in contexts]
        for p in range(prompts_per_subject):
            kind = KINDS[(index + p) % len(KINDS)]  # offset per subject: few prompts still cover every kind
            ctx = _prompt_context(rng, subject, kind)
            examples.append(
                {
                    "subject_id": subject.subject_id,
                    "noun": subject.noun,
                    "subject": subject.to_dict(),
                    "neighbor_images": neighbor_images,
                    "neighbor_captions": neighbor_captions,
                    "neighbor_contexts": [c.to_dict() for c in contexts],
                    "prompt": world.caption(subject.noun, ctx, rng),
                    "context": ctx.to_dict(),
                    "kind": kind,
                    "novel": None if seen is None else context_key(ctx) not in seen,
                    "target": world.render(subject, ctx, size),
                    "seed": int(world.derive_seed(seed, "sample", subject.seed, p) % 2**31),
                }
            )
    return examples


def score(example: dict[str, Any], image: Image.Image | np.ndarray, world_seed: int = 0) -> dict[str, Any]:
    """Every metric of one generated image for its example."""
    return metrics.evaluate_image(
        image,
        example["subject"],
        example["context"],
        example["neighbor_images"],
        example["neighbor_contexts"],
        example["target"],
        world_seed,
    )


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Aggregate scored rows of one method: means, per-attribute and per-kind text fidelity, copy rate."""

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if x == x]  # drop NaN (an image with nothing checkable)
        return float(np.mean(xs)) if xs else float("nan")

    out = {
        "identity": mean([r["identity"] for r in rows]),
        "identity_top1": mean([r["identity_top1"] for r in rows]),
        "text_fidelity": mean([r["text_fidelity"] for r in rows]),
        "copy_rate": mean([float(r["copy"]) for r in rows]),
        "samples": float(len(rows)),
    }
    for a in metrics.TEXT_ATTRIBUTES:
        out[f"text_{a}"] = mean([float(r["text_checks"][a]) for r in rows if a in r["text_checks"]])
    for kind in KINDS:
        out[f"text_fidelity_{kind}"] = mean([r["text_fidelity"] for r in rows if r["kind"] == kind])
        out[f"identity_{kind}"] = mean([r["identity"] for r in rows if r["kind"] == kind])
    if any(r.get("novel") is not None for r in rows):
        out["text_fidelity_unseen_combination"] = mean([r["text_fidelity"] for r in rows if r.get("novel")])
        out["text_fidelity_seen_combination"] = mean([r["text_fidelity"] for r in rows if r.get("novel") is False])
    return out


def write_report(path: Path, table: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    """results.json (everything) and results.md (the table and how it was made) next to each other."""
    path.mkdir(parents=True, exist_ok=True)
    json_path, md_path = path / "results.json", path / "results.md"
    json_path.write_text(json.dumps({"meta": meta, "table": table}, indent=2, sort_keys=True, default=str))
    md_path.write_text(markdown_table(table, meta))
    return json_path, md_path


TABLE_COLUMNS = (
    ("method", "method"),
    ("identity", "identity (norm.)"),
    ("identity_top1", "identity top-1 of 20"),
    ("text_fidelity", "text fidelity"),
    ("text_fidelity_color+style", "text fid. colour+style"),
    ("copy_rate", "copy rate"),
    ("adapt_seconds_per_subject", "adaptation s/subject"),
    ("samples", "samples"),
)


def markdown_table(table: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(k, float("nan"))) for k, _ in TABLE_COLUMNS) + " |" for row in table]
    text = "# Neighbor Diffusion: subject-world benchmark\n\n" + "\n".join(lines) + "\n"
    if meta:
        text += "\n## Setup\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in meta.items()) + "\n"
    return text
