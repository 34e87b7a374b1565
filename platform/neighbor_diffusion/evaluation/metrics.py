"""Metrics with ground truth: identity fidelity, text fidelity, copy rate (+ DreamBench-style embedders).

Everything here is a plain function over images (PIL or arrays) and context dicts. The
subject world's renderer is the oracle: **analysis by synthesis**.

- **Text fidelity**: which value of each attribute does the image show? Render the known
  subject in the requested context once per value and take the nearest render
  (`detect`); `estimate_context` does this group by group (style+scene, size+position,
  colour), so one ignored request does not confuse the others. An attribute is realised
  when the estimate equals the request. Checked: `TEXT_ATTRIBUTES`, the style always (a prompt
  naming none asks for a photo); a sketch hides scene and colour, so those are not checked under it.
- **Identity fidelity**: render the subject and 19 other subjects of its class in the
  requested context (centred, both sizes; with a colour change also in their own colours)
  and compare on their footprints (where candidates differ), searching shifts wide enough
  to reach any position, mirrored or not: the same search for every candidate. Reported as
  top-1 among the 20 and as a contrast (closer to the subject than to the average other)
  normalised per example so that an independent true render scores 1 and renders of other
  subjects of the class score 0; a flat grey image scores about 0.1, not the 0.5 a plain
  distance would give it.
- **Copy rate**: the image is within a small distance of a neighbor whose context differs
  from the request, and twice closer to it than to the ground truth of the request.

The distance (`aligned_distances`) is a (masked) mean squared pixel error at the model's
resolution, minimised over small shifts and template variants, computed for all shifts
at once as three matrix products.

Validation (`validate_identity`, `validate_detectors`, `validate_copy`) runs the metrics
on renders that are *not* the templates: another context seed (scene details), a random
1-px shift and pixel noise, as a generated image would differ. The test suite asserts
the issue's bars (>= 95%) on them; `jobs/evaluate.py --validate N` logs them with a run.

DreamBench-style metrics (DINO, CLIP-I, CLIP-T) need embedder weights from a local
folder (`ImageTextEmbedder`); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from neighbor_diffusion.data import world
from neighbor_diffusion.data.world import Context, Subject

# the attributes a prompt can ask for, and their values (None: "not changed" for the optional ones)
VALUES: dict[str, list[Any]] = {
    "scene": list(world.SCENES),
    "position": list(world.POSITIONS),
    "size": list(world.SIZES),
    "orientation": list(world.ORIENTATIONS),
    "color": [None, *world.COLORS],
    "accessory": [None, *world.ACCESSORIES],
    "style": [None, *world.STYLES],
}
# The attributes text fidelity checks (the background, position, size, colour, style). Orientation
# and accessory have detectors too, but at 32x32 a party hat or a 25-degree tilt of a small subject is a
# few pixels: they are not validated to 95% (validate_detectors reports them) and prompts do not ask.
TEXT_ATTRIBUTES = ("style", "scene", "size", "position", "color")
# What the detectors cannot see, measured on renders (validate_detectors): a pencil sketch
# keeps edges only, so colour and scene are not checked under it.
UNCHECKABLE = {("sketch", "color"), ("sketch", "scene")}
NUM_DISTRACTORS = 19  # identity ranks the subject among itself + 19 others of its class
NUM_ANCHORS = 4  # other-subject renders that set identity's 0 (per example)
MAX_SHIFT = 2
IDENTITY_SHIFT = 10  # px at 32x32 (scaled with the size): left and right sit ~9 px from the centre
# copy: mean squared error in [0, 1] units. Measured (validate_copy): jittered copies <= 0.0035, true renders
# of another context >= 0.005 from every neighbor, but a blurred generated copy sits higher: hence the ratio too
COPY_MAX_DISTANCE = 0.02
COPY_RATIO = 0.5


# ---------------------------------------------------------------------------- images and distances


def to_array(img: Image.Image | np.ndarray, size: int | None = None) -> np.ndarray:
    """PIL or array -> (S, S, 3) float32 in [0, 1], resized (box filter) to `size` if given."""
    if isinstance(img, np.ndarray):
        arr = img.astype(np.float32)
        # uint8 by its dtype (a near-black sample's max is 1); floats in [0, 255] by their range
        arr = arr / 255.0 if np.issubdtype(img.dtype, np.integer) or arr.max() > 1.5 else arr
        if size is None or arr.shape[0] == size:
            return arr
        img = Image.fromarray((arr * 255).round().clip(0, 255).astype(np.uint8))
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _shifted(x: np.ndarray, max_shift: int, max_shift_x: int | None = None) -> np.ndarray:
    """(S, S, 3) -> (n_shifts, S, S, 3): x moved by every dy in [-m, m], dx in [-mx, mx], edges replicated."""
    m, S = max_shift, x.shape[0]
    mx = m if max_shift_x is None else max_shift_x
    padded = np.pad(x, ((m, m), (mx, mx), (0, 0)), mode="edge")
    return np.stack(
        [padded[m + dy : m + dy + S, mx + dx : mx + dx + S] for dy in range(-m, m + 1) for dx in range(-mx, mx + 1)]
    )


def aligned_distances(
    x: np.ndarray,
    templates: np.ndarray,
    mask: np.ndarray | None = None,
    max_shift: int = MAX_SHIFT,
    max_shift_x: int | None = None,
) -> np.ndarray:
    """Distance from image x (S, S, 3) to each of J templates (J, V, S, S, 3) with V variants each.

    Mean squared error over `mask` (broadcastable to (J, V, S, S); None: every pixel),
    minimised over shifts of x (vertical up to max_shift, horizontal up to max_shift_x,
    default the same) and over the V variants: returns (J,).
    """
    J, V, S = templates.shape[:3]
    P = S * S
    xs = _shifted(x, max_shift, max_shift_x).reshape(-1, P, 3)  # (n, P, 3)
    t = templates.reshape(J * V, P, 3)
    w = np.ones((J * V, P), np.float32) if mask is None else np.broadcast_to(mask, (J, V, S, S)).reshape(J * V, P)
    w = w.astype(np.float32)
    # sum_p w (x - t)^2 = sum w x^2 - 2 sum w x t + sum w t^2: three matrix products over all shifts at once
    sq = (xs**2).sum(-1) @ w.T  # (n, J*V)
    cross = xs.reshape(len(xs), P * 3) @ (w[:, :, None] * t).reshape(J * V, P * 3).T  # (n, J*V)
    const = (w * (t**2).sum(-1)).sum(-1)  # (J*V,)
    d = (sq - 2 * cross + const) / (3 * np.maximum(w.sum(-1), 1.0))  # mean over masked pixels and channels
    return d.reshape(-1, J, V).min(axis=(0, 2))  # (J,)


def jitter(img: Image.Image | np.ndarray, rng: np.random.Generator, noise: float = 0.03, shift: int = 1) -> np.ndarray:
    """A render made imperfect as a generated image would be: a random shift (<= `shift` px) plus noise."""
    x = to_array(img)
    dy, dx = rng.integers(-shift, shift + 1, size=2)
    x = _shifted(x, shift)[(dy + shift) * (2 * shift + 1) + (dx + shift)]
    return np.clip(x + rng.normal(0, noise, x.shape).astype(np.float32), 0, 1)


def independent_render(subject: Subject, context: Context, size: int, rng: np.random.Generator) -> np.ndarray:
    """A true render that is not any template: another context seed (scene details), 1-px shift, noise."""
    return jitter(world.render(subject, dataclasses.replace(context, seed=context.seed + 7), size), rng)


# ---------------------------------------------------------------------------- rendering templates


def mirrored(context: Context) -> Context:
    """The context whose render, flipped left-right, shows the subject mirrored in place."""
    side = {"left": "right", "right": "left"}.get(context.position, context.position)
    return dataclasses.replace(context, position=side)


@functools.lru_cache(maxsize=2048)  # ~24 KiB each at 32x32; estimates and identity re-render the same contexts
def templates_for(subject: Subject, context: Context, size: int) -> np.ndarray:
    """(2, S, S, 3): the render of `context`, and the subject mirrored in place (other facing / tilt)."""
    flipped = world.render(subject, mirrored(context), size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = np.stack([to_array(world.render(subject, context, size)), to_array(flipped)])
    out.flags.writeable = False  # shared by the cache
    return out


def as_subject(s: Subject | dict[str, Any]) -> Subject:
    return s if isinstance(s, Subject) else Subject.from_dict(s)


def as_context(c: Context | dict[str, Any]) -> Context:
    return c if isinstance(c, Context) else Context.from_dict(c)


# ---------------------------------------------------------------------------- text fidelity


def requested_attributes(context: Context | dict[str, Any]) -> dict[str, Any]:
    """What a caption of this context names (world.caption): scene, position, size, and any change."""
    c = as_context(context)
    out: dict[str, Any] = {"scene": c.scene, "position": c.position, "size": c.size}
    if c.orientation != "upright":
        out["orientation"] = c.orientation
    for name in ("color", "accessory", "style"):
        if getattr(c, name) is not None:
            out[name] = getattr(c, name)
    return out


def checkable(attribute: str, context: Context | dict[str, Any]) -> bool:
    """Whether text fidelity checks this attribute of this context (validated detectors only)."""
    return attribute in TEXT_ATTRIBUTES and (as_context(context).style, attribute) not in UNCHECKABLE


def distinct_colors(subject: Subject | dict, min_distance: float = 100.0) -> list[str]:
    """Colour changes that are visible on this subject: named colours far (RGB) from its own primary."""
    primary = np.array(as_subject(subject).primary, dtype=np.float32)
    return [n for n, c in world.COLORS.items() if np.linalg.norm(np.array(c, np.float32) - primary) > min_distance]


def detect(
    image: Image.Image | np.ndarray, subject: Subject | dict, assumed: Context | dict, attributes: Sequence[str]
) -> dict[str, Any]:
    """The values of `attributes` the image shows: the nearest render over all their combinations,
    every other attribute as `assumed`.

    Only pixels where the candidate renders disagree count (mask): the rest is common to all
    candidates, and there the image's own details (trees, stars of another scene seed) are noise.
    """
    subject, assumed = as_subject(subject), as_context(assumed)
    x = to_array(image)
    combos = [dict(zip(attributes, vs)) for vs in itertools.product(*(VALUES[a] for a in attributes))]
    templates = np.stack(
        [templates_for(subject, dataclasses.replace(assumed, **c), x.shape[0]) for c in combos]
    )  # (n_combos, 2, S, S, 3)
    mask = (np.abs(templates - templates[:1]).max(-1) > 0.02).any(0)  # (2, S, S), per variant
    return combos[int(np.argmin(aligned_distances(x, templates, mask)))]


def detect_attribute(
    image: Image.Image | np.ndarray, subject: Subject | dict, assumed: Context | dict, attribute: str
) -> Any:
    """The value of one attribute the image shows (the rest as `assumed`)."""
    return detect(image, subject, assumed, (attribute,))[attribute]


# Estimation order: what changes the whole picture first, then where the subject is, then its colour.
ESTIMATION_GROUPS = (("style", "scene"), ("size", "position"), ("color",), ("size", "position"))


def estimate_context(
    image: Image.Image | np.ndarray,
    subject: Subject | dict,
    requested: Context | dict,
    groups: Sequence[Sequence[str]] = ESTIMATION_GROUPS,
) -> Context:
    """What the image shows, as a context: start from the request, re-estimate one group at a time.

    Estimating jointly matters: judged with the requested style or scene, a photo that ignored
    "a pencil sketch of" would confuse every detector. Placement is found before colour (colour
    templates need the subject in the right place) and refined after it.
    """
    ctx = as_context(requested)
    for group in groups:
        ctx = dataclasses.replace(ctx, **detect(image, subject, ctx, group))
    return ctx


def text_fidelity(
    image: Image.Image | np.ndarray,
    subject: Subject | dict,
    requested: Context | dict,
    estimate: Context | None = None,
) -> dict[str, bool]:
    """{attribute: realised?} for every attribute the prompt named and the detectors can check; the style
    always ("a photo of ...": no style named is a photo, and a sketch nobody asked for is wrong)."""
    found = estimate or estimate_context(image, subject, requested)
    return {
        a: getattr(found, a) == v
        for a, v in ({"style": None} | requested_attributes(requested)).items()
        if checkable(a, requested) and checkable(a, found)  # a sketch hides scene and colour, asked or not
    }


# ---------------------------------------------------------------------------- identity fidelity


def distractors(subject: Subject, world_seed: int = 0, n: int = NUM_DISTRACTORS) -> list[Subject]:
    """n other subjects of the subject's class: the world's own first, then further world indices."""
    k = world.CLASSES.index(subject.noun)
    out: list[Subject] = []
    i = k
    while len(out) < n:
        s = world.make_subject(i, world_seed)
        if s.seed != subject.seed:
            out.append(s)
        i += len(world.CLASSES)
    return out


def identity_variants(context: Context) -> list[Context]:
    """The contexts every candidate is rendered in: centred (the shift search, IDENTITY_SHIFT, reaches
    left and right, mirrored or not), both sizes, and with a colour change also the subject's own colour."""
    colors = [context.color, None] if context.color else [None]
    return [dataclasses.replace(context, position="center", size=z, color=c) for z in VALUES["size"] for c in colors]


@dataclass
class IdentityReference:
    """Renders for one (subject, context): candidate 0 is the subject, 1.. its distractors."""

    templates: np.ndarray  # (J, V, S, S, 3): V = identity_variants
    mask: np.ndarray  # (V, S, S): where any candidate differs from the subject (their footprints)
    c_same: float  # contrast of an independent same-subject render (normalised identity 1)
    c_other: float  # mean contrast of other same-class subjects' renders (normalised identity 0)


def identity_distances(x: np.ndarray, templates: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(J,) masked distances, minimised over variants, mirroring and shifts wide enough to cover any position.

    The same search for every candidate, so no candidate is favoured by where the image put its subject.
    """
    shift = math.ceil(IDENTITY_SHIFT * x.shape[1] / 32)  # positions scale with the image: 20 px at 64x64
    d = aligned_distances(x, templates, mask, MAX_SHIFT, shift)
    # a mirrored subject is the same subject; with shifts this wide, flipping the whole image finds it
    return np.minimum(d, aligned_distances(x[:, ::-1], templates, mask, MAX_SHIFT, shift))


def contrast(d: np.ndarray) -> float:
    """How much closer the image is to the subject (d[0]) than to the average distractor.

    Unlike a plain distance, this does not reward a blurred or grey image, which is about as
    far from every candidate."""
    return float(d[1:].mean() - d[0])


@functools.lru_cache(maxsize=64)  # one per benchmark example, shared by every method's image
def identity_reference(subject: Subject, context: Context, size: int, world_seed: int = 0) -> IdentityReference:
    candidates = [subject, *distractors(subject, world_seed)]
    variants = identity_variants(context)
    templates = np.stack(
        [np.stack([to_array(world.render(s, v, size)) for v in variants]) for s in candidates]
    )  # (J, V, S, S, 3)
    mask = (np.abs(templates[1:] - templates[:1]).max(-1) > 0.02).any(0)  # (V, S, S)
    rng = np.random.default_rng(world.derive_seed("identity-anchor", subject.seed, context.seed))
    same = independent_render(subject, context, size, rng)
    c_same = contrast(identity_distances(same, templates, mask))
    others = [independent_render(s, context, size, rng) for s in candidates[1 : 1 + NUM_ANCHORS]]
    c_other = float(np.mean([contrast(identity_distances(o, templates, mask)) for o in others]))
    return IdentityReference(templates, mask, c_same, c_other)


def identity_fidelity(
    image: Image.Image | np.ndarray, subject: Subject | dict, requested: Context | dict, world_seed: int = 0
) -> dict[str, float]:
    """{normalised, top1, rank}: how much the image shows *this* subject rather than another of its class.

    The subject and 19 distractors are rendered in the requested context (both sizes; with a
    colour change, also in their own colours) and compared on their footprints, searching
    shifts that cover every position. normalised = (c - c_other) / (c_same - c_other) with
    c = `contrast`, clipped to [-1, 1] so that one odd image cannot dominate a mean: 1 for an
    independent true render of the subject, 0 for renders of other subjects of its class.
    top1: the subject ranks first among the 20 (chance 5%).
    """
    x = to_array(image)
    ref = identity_reference(as_subject(subject), as_context(requested), x.shape[0], world_seed)
    d = identity_distances(x, ref.templates, ref.mask)  # (J,)
    normalised = (contrast(d) - ref.c_other) / max(ref.c_same - ref.c_other, 1e-6)
    return {
        "normalised": float(np.clip(normalised, -1.0, 1.0)),
        "top1": float(np.argmin(d) == 0),
        "rank": float((d < d[0]).sum()),
    }


def evaluate_image(
    image: Image.Image | np.ndarray,
    subject: Subject | dict,
    requested: Context | dict,
    neighbor_images: Sequence[Image.Image | np.ndarray],
    neighbor_contexts: Sequence[Context | dict],
    target: Image.Image | np.ndarray,
    world_seed: int = 0,
) -> dict[str, Any]:
    """Every metric of one generated image."""
    found = estimate_context(image, subject, requested)
    text = text_fidelity(image, subject, requested, estimate=found)
    ident = identity_fidelity(image, subject, requested, world_seed)
    return {
        "identity": ident["normalised"],
        "identity_top1": ident["top1"],
        "text_fidelity": float(np.mean(list(text.values()))) if text else float("nan"),
        "text_checks": {a: bool(v) for a, v in text.items()},
        "copy": bool(is_copy(image, neighbor_images, neighbor_contexts, requested, target)),
        "copy_distance": float(copy_distance(image, neighbor_images).min()),
        "estimated_context": found.to_dict(),
    }


# ---------------------------------------------------------------------------- copy rate


def copy_distance(image: Image.Image | np.ndarray, neighbor_images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    """(K,) whole-image distance of the image to each neighbor (shift-aligned, mirrored too)."""
    x = to_array(image)
    nb = np.stack([to_array(n, x.shape[0]) for n in neighbor_images])  # (K, S, S, 3)
    return aligned_distances(x, np.stack([nb, nb[:, :, ::-1]], axis=1), max_shift=1)


def is_copy(
    image: Image.Image | np.ndarray,
    neighbor_images: Sequence[Image.Image | np.ndarray],
    neighbor_contexts: Sequence[Context | dict],
    requested: Context | dict,
    target: Image.Image | np.ndarray,
    max_distance: float = COPY_MAX_DISTANCE,
    ratio: float = COPY_RATIO,
) -> bool:
    """A near copy of a neighbor whose context differs from what the prompt asked for.

    Near: within `max_distance` of the neighbor *and* `ratio` times closer to it than to the
    ground truth of the prompt (`target`). The relative test keeps a soft (blurred) copy a copy,
    and a correct image that happens to resemble a neighbor (same scene, other position) not one.
    """
    d = copy_distance(image, neighbor_images)  # (K,)
    d_target = float(copy_distance(image, [target])[0])
    want = requested_attributes(requested)
    for dist, ctx in zip(d, neighbor_contexts):
        differs = any(requested_attributes(ctx).get(a) != v for a, v in want.items())
        if differs and dist < max_distance and dist < ratio * d_target:
            return True
    return False


# ---------------------------------------------------------------------------- validation on renders


def _same_class_pool(world_seed: int, noun: str, n: int) -> list[Subject]:
    k = world.CLASSES.index(noun)
    return [world.make_subject(k + len(world.CLASSES) * j, world_seed) for j in range(n)]


def sample_eval_context(
    rng: np.random.Generator, subject: Subject | dict, p_color: float = 0.3, p_style: float = 0.3
) -> Context:
    """A context of the kind the benchmark asks for (and the metrics are validated on).

    Any scene, position and size; upright, no accessory (see TEXT_ATTRIBUTES); a visible
    colour change with probability p_color; a style with probability p_style.
    """
    colors = distinct_colors(subject)
    return Context(
        scene=str(rng.choice(VALUES["scene"])),
        position=str(rng.choice(VALUES["position"])),
        size=str(rng.choice(VALUES["size"])),
        color=str(rng.choice(colors)) if colors and rng.random() < p_color else None,
        style=str(rng.choice(list(world.STYLES))) if rng.random() < p_style else None,
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def validate_identity(
    num_queries: int = 60, size: int = 32, world_seed: int = 0, seed: int = 0, pool: int = NUM_DISTRACTORS + 1
) -> dict[str, float]:
    """Rank the right subject first among `pool` same-class subjects, from independent jittered renders.

    On benchmark-like contexts. Returns top-1 accuracy; the mean normalised score of same-subject
    queries (about 1), of other-subject queries judged against the subject (about 0), and of a
    uniform image of the query's mean colour (a degenerate output: should be about 0, not 0.5).
    """
    rng = np.random.default_rng(world.derive_seed(seed, "validate-identity"))
    top1, same, other, flat = [], [], [], []
    for q in range(num_queries):
        subjects = _same_class_pool(world_seed, world.CLASSES[q % len(world.CLASSES)], pool)
        subject = subjects[int(rng.integers(0, pool))]
        ctx = sample_eval_context(rng, subject)
        query = independent_render(subject, ctx, size, rng)
        r = identity_fidelity(query, subject, ctx, world_seed)
        top1.append(r["top1"])
        same.append(r["normalised"])
        flat.append(identity_fidelity(np.broadcast_to(query.mean((0, 1)), query.shape), subject, ctx)["normalised"])
        impostor = subjects[int(rng.integers(0, pool))]
        if impostor.seed != subject.seed:
            fake = independent_render(impostor, ctx, size, rng)
            other.append(identity_fidelity(fake, subject, ctx, world_seed)["normalised"])
    return {
        "identity_top1": float(np.mean(top1)),
        "identity_same_subject": float(np.mean(same)),
        "identity_other_subject": float(np.mean(other)),
        "identity_flat_image": float(np.mean(flat)),
        "identity_queries": float(num_queries),
    }


def validate_detectors(
    num_queries: int = 60, size: int = 32, world_seed: int = 0, seed: int = 0, p_wrong: float = 0.5
) -> dict[str, float]:
    """Accuracy of text-fidelity verdicts on independent jittered renders of benchmark-like contexts.

    With probability `p_wrong` the request differs from what the image shows in one attribute
    (a model that got that one wrong); the verdict for attribute a is right when "realised"
    equals (shown a == requested a). Also reports the raw accuracy of the orientation and
    accessory detectors on renders that vary them (informational; not used in text fidelity).
    """
    rng = np.random.default_rng(world.derive_seed(seed, "validate-detectors"))
    hits: dict[str, list[bool]] = {a: [] for a in TEXT_ATTRIBUTES}
    extra: dict[str, list[bool]] = {"orientation": [], "accessory": []}
    for _ in range(num_queries):
        subject = world.make_subject(int(rng.integers(0, 200)), world_seed)
        shown = sample_eval_context(rng, subject)
        request = shown
        if rng.random() < p_wrong:
            request = sample_eval_context(rng, subject)
            a = str(rng.choice(TEXT_ATTRIBUTES))
            request = dataclasses.replace(shown, **{a: getattr(request, a)})
        query = independent_render(subject, shown, size, rng)
        for a, realised in text_fidelity(query, subject, request).items():
            hits[a].append(realised == (getattr(shown, a) == getattr(request, a)))
        varied = dataclasses.replace(
            shown,
            orientation=str(rng.choice(VALUES["orientation"])),
            accessory=VALUES["accessory"][int(rng.integers(0, 4))],
        )
        query = independent_render(subject, varied, size, rng)
        for a in extra:
            extra[a].append(detect_attribute(query, subject, varied, a) == getattr(varied, a))
    out = {f"detector_{a}": float(np.mean(h)) for a, h in hits.items() if h}
    out |= {f"detector_{a}_informational": float(np.mean(h)) for a, h in extra.items()}
    out["detector_queries"] = float(num_queries)
    return out


def validate_copy(num_queries: int = 60, size: int = 32, world_seed: int = 0, seed: int = 0) -> dict[str, float]:
    """Copy detector on renders: recall on jittered and on blurred copies of a neighbor, and the
    false-positive rate on independent true renders of the requested (different) context."""
    rng = np.random.default_rng(world.derive_seed(seed, "validate-copy"))
    caught, caught_soft, false_alarm = [], [], []
    for _ in range(num_queries):
        subject = world.make_subject(int(rng.integers(0, 200)), world_seed)
        contexts = [world.sample_context(rng, 0, 0, 0) for _ in range(3)]
        neighbors = [world.render(subject, c, size) for c in contexts]
        request = sample_eval_context(rng, subject)
        if any(requested_attributes(c) == requested_attributes(request) for c in contexts):
            continue  # the prompt asked for a neighbor's own context: copying it is right
        target = world.render(subject, request, size)
        source = neighbors[int(rng.integers(0, 3))]
        copy = jitter(source, rng)
        soft = jitter(source.filter(ImageFilter.GaussianBlur(0.7)), rng, noise=0.05)
        truth = independent_render(subject, request, size, rng)
        caught.append(is_copy(copy, neighbors, contexts, request, target))
        caught_soft.append(is_copy(soft, neighbors, contexts, request, target))
        false_alarm.append(is_copy(truth, neighbors, contexts, request, target))
    return {
        "copy_recall": float(np.mean(caught)),
        "copy_recall_blurred": float(np.mean(caught_soft)),
        "copy_false_positive": float(np.mean(false_alarm)),
    }


# ---------------------------------------------------------------------------- DreamBench-style embedders


class ImageTextEmbedder:
    """DINO / CLIP image (and CLIP text) embeddings from a local transformers folder; nothing downloaded.

    CLIP folders give image and text embeddings (CLIP-I, CLIP-T); any other vision model
    (DINO ViT, DINOv2) gives its CLS token (DINO score).
    """

    def __init__(self, path: str | os.PathLike):
        import torch
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"embedder={str(path)!r}: no transformers model (config.json) in that folder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.torch = torch
        self.kind = "clip" if AutoConfig.from_pretrained(path).model_type == "clip" else "vision"
        self.model = AutoModel.from_pretrained(path).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.tokenizer = None
        if self.kind == "clip":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) L2-normalised embeddings."""
        with self.torch.no_grad():
            pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            if self.kind == "clip":
                e = self.model.get_image_features(pixel_values=pixels)
                e = e if isinstance(e, self.torch.Tensor) else e.pooler_output
            else:
                e = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token, as DreamBooth's DINO
        e = e.float().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-8)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.kind != "clip":
            raise ValueError("text embeddings (CLIP-T) need a CLIP folder")
        with self.torch.no_grad():
            tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            e = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            e = e if isinstance(e, self.torch.Tensor) else e.pooler_output
        e = e.float().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-8)


def image_similarity(embedder: ImageTextEmbedder, generated: Sequence[Image.Image], references: Sequence[Image.Image]):
    """DINO / CLIP-I: mean cosine similarity between each generated image and each real subject photo."""
    return float((embedder.images(generated) @ embedder.images(references).T).mean())


def text_similarity(embedder: ImageTextEmbedder, generated: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """CLIP-T: mean cosine similarity between each generated image and its prompt."""
    return float((embedder.images(generated) * embedder.texts(prompts)).sum(1).mean())


@functools.lru_cache(maxsize=4)
def load_embedder(path: str) -> ImageTextEmbedder:
    return ImageTextEmbedder(path)
