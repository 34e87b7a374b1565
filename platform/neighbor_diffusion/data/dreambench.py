"""A loader for DreamBench-style folders: real subjects as held-out evaluation examples.

Layout (as the DreamBooth repository ships it)::

    dataset/<subject>/*.jpg           3-6 photos of one subject per folder
    dataset/prompts_and_classes.txt   "subject_name,class" lines and prompt templates
                                      ('a {0} {1} in the jungle'.format(unique_token, class_token))

A plain prompts file also works: one template per line, `{0}` (dropped: we have no
identifier token, the subject comes from the neighbors) and `{1}` (the class noun).
There is no ground-truth target for real subjects, so examples carry `target=None`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from neighbor_diffusion.data.images import ImageError, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LIVE_CLASSES = {"dog", "cat"}  # DreamBench uses its "live subject" prompts for these
_QUOTED = re.compile(r"""['"]([^'"]*\{[01]?\}[^'"]*)['"]""")
_CLASS_LINE = re.compile(r"^([\w\-]+),([\w\- ]+)$")


def parse_prompts(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """-> (subject -> class, object prompt templates, live prompt templates)."""
    classes: dict[str, str] = {}
    objects: list[str] = []
    live: list[str] = []
    section = "object"
    for line in text.splitlines():
        line = line.strip()
        lower = line.lower()
        if "live" in lower and "prompt" in lower:
            section = "live"
        elif "object" in lower and "prompt" in lower:
            section = "object"
        m = _CLASS_LINE.match(line)
        if m and m.group(1) != "subject_name":
            classes[m.group(1)] = m.group(2).strip()
            continue
        quoted = _QUOTED.findall(line)
        templates = quoted or ([line] if ("{1}" in line or "{}" in line) and "format" not in line else [])
        (live if section == "live" else objects).extend(templates)
    return classes, objects, live


def fill(template: str, noun: str) -> str:
    """'a {0} {1} in the jungle' -> 'a dog in the jungle'."""
    return " ".join(template.replace("{0}", "").replace("{1}", noun).replace("{}", noun).split())


def load_dreambench(
    root: str | Path, prompts_file: str | Path | None = None, max_neighbors: int | None = None
) -> list[dict[str, Any]]:
    """Each subject folder -> {subject_id, noun, neighbor_images, neighbor_captions, prompts, target=None}."""
    root = Path(root)
    if (root / "dataset").is_dir():
        root = root / "dataset"
    if prompts_file is None:
        found = [p for p in (root / "prompts_and_classes.txt", root / "prompts.txt") if p.is_file()]
        prompts_file = found[0] if found else None
    classes, objects, live = parse_prompts(Path(prompts_file).read_text()) if prompts_file else ({}, [], [])
    subjects = sorted(p for p in root.iterdir() if p.is_dir())
    if not subjects:
        raise FileNotFoundError(f"root={str(root)!r}: no subject folders (dataset/<subject>/*.jpg)")
    out = []
    for folder in subjects:
        noun = classes.get(folder.name) or re.sub(r"\d+$", "", folder.name).replace("_", " ")
        images = []
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    images.append(decode_image(f.read_bytes(), name=str(f)))
                except ImageError:
                    continue  # a broken photo must not sink the benchmark
        if not images:
            continue
        images = images[:max_neighbors] if max_neighbors else images
        templates = (live if noun in LIVE_CLASSES and live else objects) or ["a photo of a {1}"]
        out.append(
            {
                "subject_id": folder.name,
                "noun": noun,
                "neighbor_images": images,
                "neighbor_captions": [f"a photo of a {noun}"] * len(images),
                "prompts": [fill(t, noun) for t in templates],
                "target": None,
            }
        )
    return out
