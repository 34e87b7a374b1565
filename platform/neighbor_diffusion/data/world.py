"""The subject world: procedural subjects, text-described contexts, captions and a renderer.

No subject benchmark can be downloaded here, so we make one whose truth we know.

- A **subject** is drawn from a seed: a class noun ("toy", "mug", ...), composed parts
  whose proportions come from the seed, continuous colours and a fill pattern. Its
  identity is what text cannot describe; the model must take it from the neighbors.
  Subjects of one class are spread around the hue circle (golden-ratio steps) and get
  different patterns and proportions, so two of them differ clearly even at 32x32.
- A **context** is what text does describe: scene, position, size, orientation, and
  rarely a colour change, an accessory or a style. `caption()` words it.
- `render(subject, context, size)` draws any subject in any context at any size,
  deterministically: everything is drawn on a 256x256 canvas with PIL and resized, so
  renders at 32 and 256 px show the same picture. It is the ground truth of evaluation.
- `split_subjects(cfg)` holds subjects out by seed; `heldout_examples(...)` gives
  evaluation examples (neighbors + prompt + ground-truth target) for those subjects.

Shapes and colours are bold on purpose: the `cpu` preset learns this world at 32x32.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from neighbor_diffusion.config import Config

BASE = 256  # every picture is drawn at BASE x BASE, then resized
CLASSES = ("toy", "mug", "creature", "robot", "vase", "backpack")
PATTERNS = ("solid", "stripes", "dots", "checks", "bands", "diagonal")

SCENES: dict[str, dict[str, Any]] = {
    # phrase: how captions say it; sky/ground: colours; ground_y: horizon height (fraction)
    "snow": {"phrase": "on a snowy field", "sky": (170, 195, 225), "ground": (240, 243, 250), "ground_y": 0.55},
    "beach": {"phrase": "on a sandy beach", "sky": (120, 190, 240), "ground": (232, 208, 150), "ground_y": 0.6},
    "forest": {"phrase": "in a forest", "sky": (150, 190, 150), "ground": (70, 100, 50), "ground_y": 0.62},
    "city": {"phrase": "on a city street", "sky": (175, 180, 190), "ground": (90, 90, 98), "ground_y": 0.6},
    "kitchen": {"phrase": "on a kitchen table", "sky": (235, 225, 200), "ground": (150, 100, 60), "ground_y": 0.6},
    "night": {"phrase": "under a night sky", "sky": (20, 25, 60), "ground": (40, 45, 70), "ground_y": 0.7},
    "desert": {"phrase": "in the desert", "sky": (250, 200, 140), "ground": (210, 150, 90), "ground_y": 0.58},
    "lawn": {"phrase": "on a grass lawn", "sky": (160, 210, 245), "ground": (95, 170, 70), "ground_y": 0.55},
    "ocean": {"phrase": "floating on the ocean", "sky": (190, 220, 240), "ground": (30, 90, 160), "ground_y": 0.5},
    "brick": {"phrase": "in front of a brick wall", "sky": (160, 70, 50), "ground": (120, 110, 100), "ground_y": 0.8},
}
POSITIONS = {"left": ("on the left", 0.28), "center": ("in the center", 0.5), "right": ("on the right", 0.72)}
SIZES = {"small": 0.42, "large": 0.7}  # fraction of the canvas the subject's box spans
ORIENTATIONS = {"upright": "", "tilted": "tilted", "sideways": "lying on its side", "upside_down": "upside down"}
COLORS = {
    "red": (215, 35, 35),
    "blue": (35, 70, 210),
    "green": (40, 160, 60),
    "yellow": (245, 205, 30),
    "purple": (130, 50, 170),
    "pink": (240, 120, 170),
    "orange": (245, 130, 20),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
}
ACCESSORIES = {"party_hat": "wearing a party hat", "crown": "wearing a crown", "bow_tie": "with a bow tie"}
STYLES = {"sketch": "a pencil sketch of", "pop_art": "a pop art poster of"}


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any mix of ints and strings (no Python hash randomisation)."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return (
        int(np.random.SeedSequence([abs(int(i)) for i in ints]).generate_state(2, dtype=np.uint32).view(np.uint64)[0])
        >> 1
    )


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


# ---------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class Subject:
    """One procedural subject. `params` are the part proportions of its class, in [0, 1]."""

    subject_id: str
    seed: int
    noun: str
    primary: tuple[int, int, int]
    secondary: tuple[int, int, int]
    accent: tuple[int, int, int]
    pattern: str
    params: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Subject:
        return cls(
            subject_id=d["subject_id"],
            seed=int(d["seed"]),
            noun=d["noun"],
            primary=tuple(d["primary"]),
            secondary=tuple(d["secondary"]),
            accent=tuple(d["accent"]),
            pattern=d["pattern"],
            params=tuple(float(p) for p in d["params"]),
        )


def make_subject(index: int, world_seed: int = 0) -> Subject:
    """Subject number `index` of the world with seed `world_seed`.

    The class cycles with the index; within a class, hues step by the golden ratio so
    that neighbours in index are far apart on the colour wheel.
    """
    seed = derive_seed(world_seed, "subject", index)
    rng = np.random.default_rng(seed)
    noun = CLASSES[index % len(CLASSES)]
    within = index // len(CLASSES)
    hue = (derive_seed(world_seed, noun) % 1000 / 1000 + within * 0.618034 + rng.uniform(-0.03, 0.03)) % 1.0
    primary = _hsv(hue, rng.uniform(0.65, 0.95), rng.uniform(0.7, 0.95))
    # secondary contrasts in hue and value, so the pattern reads at 32x32
    secondary = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.9), rng.choice([0.3, 0.95]))
    accent = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.9), rng.uniform(0.15, 1.0))
    pattern = PATTERNS[(within + int(rng.integers(0, len(PATTERNS)))) % len(PATTERNS)]
    params = tuple(float(x) for x in rng.uniform(0, 1, size=6).round(4))
    return Subject(f"s{index:05d}", seed, noun, primary, secondary, accent, pattern, params)


def world_subjects(cfg: Config) -> list[Subject]:
    return [make_subject(i, cfg.data.seed) for i in range(cfg.data.num_subjects)]


def split_subjects(cfg: Config) -> dict[str, list[Subject]]:
    """{"train": [...], "heldout": [...]}: a seeded choice of `data.num_heldout_subjects` subjects."""
    subjects = world_subjects(cfg)
    rng = np.random.default_rng(derive_seed(cfg.data.seed, "heldout"))
    held = set(rng.choice(len(subjects), size=cfg.data.num_heldout_subjects, replace=False).tolist())
    return {
        "train": [s for i, s in enumerate(subjects) if i not in held],
        "heldout": [s for i, s in enumerate(subjects) if i in held],
    }


def world_manifest(cfg: Config) -> dict[str, Any]:
    """What the world is and how it is split: written next to every crawl."""
    split = split_subjects(cfg)
    return {
        "world_seed": cfg.data.seed,
        "classes": list(CLASSES),
        "scenes": list(SCENES),
        "train_subjects": [s.to_dict() for s in split["train"]],
        "heldout_subjects": [s.to_dict() for s in split["heldout"]],
        "heldout_seeds": [s.seed for s in split["heldout"]],
    }


# ---------------------------------------------------------------------------- contexts and captions


@dataclass(frozen=True)
class Context:
    """What text describes. `seed` varies scene details (stars, trees, tilt direction)."""

    scene: str = "lawn"
    position: str = "center"
    size: str = "large"
    orientation: str = "upright"
    color: str | None = None
    accessory: str | None = None
    style: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("scene", SCENES),
            ("position", POSITIONS),
            ("size", SIZES),
            ("orientation", ORIENTATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"context.{name}={getattr(self, name)!r}: must be one of {sorted(allowed)}")
        for name, allowed in (("color", COLORS), ("accessory", ACCESSORIES), ("style", STYLES)):
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise ValueError(f"context.{name}={v!r}: must be None or one of {sorted(allowed)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Context:
        return cls(**d)


def sample_context(
    rng: np.random.Generator, p_color: float = 0.04, p_accessory: float = 0.08, p_style: float = 0.03
) -> Context:
    """A random context. Colour changes and styles are rare in crawls (they hide the subject's look)."""
    orientation = str(rng.choice(list(ORIENTATIONS), p=[0.7, 0.14, 0.08, 0.08]))
    return Context(
        scene=str(rng.choice(list(SCENES))),
        position=str(rng.choice(list(POSITIONS))),
        size=str(rng.choice(list(SIZES))),
        orientation=orientation,
        color=str(rng.choice(list(COLORS))) if rng.random() < p_color else None,
        accessory=str(rng.choice(list(ACCESSORIES))) if rng.random() < p_accessory else None,
        style=str(rng.choice(list(STYLES))) if rng.random() < p_style else None,
        seed=int(rng.integers(0, 2**31 - 1)),
    )


FULL_TEMPLATES = (
    "a photo of the {np} {scene}, {size}, {position}",
    "the {np} {scene}, {position}, {size}",
    "a {size} {np} {position} {scene}",
    "{np} {scene}, {size} and {position}",
    "a picture of a {size} {np} {scene}, {position}",
)
SHORT_TEMPLATES = ("a photo of the {np} {scene}", "my {np} {scene}", "{np} {scene}")


def caption(noun: str, context: Context, rng: np.random.Generator | None = None, full: bool = True) -> str:
    """Words for a context. `full` names scene, size and position; short templates name the scene only."""
    templates = FULL_TEMPLATES if full else SHORT_TEMPLATES
    template = templates[0] if rng is None else templates[int(rng.integers(0, len(templates)))]
    np_words = [ORIENTATIONS[context.orientation]] if context.orientation != "upright" else []
    np_words += [context.color] if context.color else []
    np_words += [noun]
    np_words += [ACCESSORIES[context.accessory]] if context.accessory else []
    text = template.format(
        np=" ".join(np_words),
        scene=SCENES[context.scene]["phrase"],
        size=context.size,
        position=POSITIONS[context.position][0],
    )
    if context.style:
        text = f"{STYLES[context.style]} {text.removeprefix('a photo of ').removeprefix('a picture of ')}"
    return " ".join(text.split())


# ---------------------------------------------------------------------------- drawing

# Fill patterns: a full-canvas RGB image, pasted through a part's mask.


def _pattern_image(subject: Subject, primary: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (BASE, BASE), primary)
    d = ImageDraw.Draw(img)
    sec, p = subject.secondary, subject.params
    step = int(26 + 18 * p[5])  # bold: 3-5 px at 32x32
    if subject.pattern == "stripes":
        for x in range(0, BASE, step):
            d.rectangle([x, 0, x + step // 2, BASE], fill=sec)
    elif subject.pattern == "bands":
        for y in range(0, BASE, step):
            d.rectangle([0, y, BASE, y + step // 2], fill=sec)
    elif subject.pattern == "dots":
        r = step // 3
        for y in range(0, BASE + step, step):
            for x in range((y // step % 2) * step // 2, BASE + step, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=sec)
    elif subject.pattern == "checks":
        for y in range(0, BASE, step):
            for x in range(0, BASE, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step, y + step], fill=sec)
    elif subject.pattern == "diagonal":
        for x in range(-BASE, BASE, step):
            d.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + BASE, BASE), (x + BASE, BASE)], fill=sec)
    return img


class _Painter:
    """Draws parts on an RGBA sprite: patterned body parts with a dark outline, solid details."""

    OUTLINE = 7

    def __init__(self, fill: Image.Image):
        self.sprite = Image.new("RGBA", (BASE, BASE), (0, 0, 0, 0))
        self.fill = fill
        self.draw = ImageDraw.Draw(self.sprite)

    def body(self, kind: str, box: list[float] | list[tuple[float, float]], **kw: Any) -> None:
        """A patterned part: outline first (drawn wider), then the pattern through the part's mask."""
        mask = Image.new("L", (BASE, BASE), 0)
        md = ImageDraw.Draw(mask)
        getattr(md, kind)(box, fill=255, **kw)
        # dilate by a box blur + threshold: a MaxFilter of this size costs 10x more
        outline = mask.filter(ImageFilter.BoxBlur(self.OUTLINE // 2)).point(lambda v: 255 if v > 8 else 0)
        self.sprite.paste((30, 25, 30, 255), (0, 0), outline)
        self.sprite.paste(self.fill, (0, 0), mask)

    def solid(self, kind: str, box: Any, color: tuple[int, int, int], **kw: Any) -> None:
        getattr(self.draw, kind)(box, fill=color + (255,), **kw)


def _draw_toy(p: _Painter, s: Subject, c: tuple[int, int, int]) -> tuple[float, float]:
    q = s.params
    head_r = 38 + 18 * q[0]
    body_w, body_h = 60 + 30 * q[1], 55 + 25 * q[2]
    hy = 40 + head_r
    if q[3] < 0.5:  # round ears
        er = 16 + 8 * q[4]
        for sx in (-1, 1):
            ex = 128 + sx * head_r * 0.75
            p.body("ellipse", [ex - er, hy - head_r - er * 0.6, ex + er, hy - head_r + er * 1.4])
    else:  # pointy ears
        for sx in (-1, 1):
            ex = 128 + sx * head_r * 0.6
            p.body(
                "polygon", [(ex - 16, hy - head_r + 20), (ex + sx * 14, hy - head_r - 30), (ex + 16, hy - head_r + 14)]
            )
    by = hy + head_r - 8
    p.body("ellipse", [128 - body_w, by, 128 + body_w, by + 2 * body_h])
    p.body("ellipse", [128 - head_r, hy - head_r, 128 + head_r, hy + head_r])
    for sx in (-1, 1):
        p.solid("ellipse", [128 + sx * head_r * 0.4 - 7, hy - 10, 128 + sx * head_r * 0.4 + 7, hy + 4], (20, 20, 20))
    p.solid("ellipse", [116, hy + 8, 140, hy + 22], s.accent)
    return hy - head_r, by + 2 * body_h


def _draw_mug(p: _Painter, s: Subject, c: tuple[int, int, int]) -> tuple[float, float]:
    q = s.params
    w, h = 55 + 30 * q[0], 70 + 40 * q[1]
    top, cx = 128 - h, 118
    hr = 28 + 16 * q[2]  # handle
    if q[3] < 0.5:
        p.body(
            "ellipse", [cx + w - hr * 0.6, 128 - hr * 1.2, cx + w + hr * 1.2, 128 + hr * 1.0], width=int(14 + 8 * q[4])
        )
    else:
        p.body("rectangle", [cx + w - 10, 128 - hr, cx + w + hr, 128 + hr * 0.8], width=int(14 + 8 * q[4]))
    p.body("rectangle", [cx - w, top, cx + w, 128 + h])
    p.solid("ellipse", [cx - w, top - 14, cx + w, top + 14], s.accent)
    p.solid("rectangle", [cx - w, 128 + h - 14, cx + w, 128 + h], s.secondary)
    return top - 14, 128 + h


def _draw_creature(p: _Painter, s: Subject, c: tuple[int, int, int]) -> tuple[float, float]:
    q = s.params
    w, h = 60 + 35 * q[0], 50 + 35 * q[1]
    cy = 130
    legs = 2 + int(q[2] * 2.99)
    for i in range(legs):
        lx = 128 - w * 0.7 + (1.4 * w) * (i + 0.5) / legs
        p.solid("rectangle", [lx - 9, cy + h - 10, lx + 9, cy + h + 35], s.secondary)
    if q[4] > 0.4:  # antennae or horns
        for sx in (-1, 1):
            p.solid("line", [(128 + sx * w * 0.3, cy - h + 10), (128 + sx * w * 0.6, cy - h - 40)], s.accent, width=9)
            p.solid("ellipse", [128 + sx * w * 0.6 - 12, cy - h - 52, 128 + sx * w * 0.6 + 12, cy - h - 28], s.accent)
    p.body("ellipse", [128 - w, cy - h, 128 + w, cy + h])
    eyes = 1 + int(q[3] * 2.99)
    er = 22 - 4 * eyes
    for i in range(eyes):
        ex = 128 - w * 0.45 + (0.9 * w) * (i + 0.5) / eyes
        p.solid("ellipse", [ex - er, cy - h * 0.45 - er, ex + er, cy - h * 0.45 + er], (250, 250, 250))
        p.solid("ellipse", [ex - er / 2, cy - h * 0.45 - er / 2, ex + er / 2, cy - h * 0.45 + er / 2], (15, 15, 15))
    return cy - h - (52 if q[4] > 0.4 else 0), cy + h + 35


def _draw_robot(p: _Painter, s: Subject, c: tuple[int, int, int]) -> tuple[float, float]:
    q = s.params
    hw, hh = 35 + 20 * q[0], 28 + 14 * q[1]
    bw, bh = 45 + 30 * q[2], 50 + 25 * q[3]
    top = 60
    p.solid("line", [(128, top - 25), (128, top)], (60, 60, 60), width=7)
    p.solid("ellipse", [118, top - 38, 138, top - 18], s.accent)
    p.body("rectangle", [128 - hw, top, 128 + hw, top + 2 * hh])
    by = top + 2 * hh + 8
    for sx in (-1, 1):  # arms
        p.solid("rectangle", [128 + sx * bw - 8 * (1 - sx) - 8, by + 10, 128 + sx * (bw + 22), by + 24], s.secondary)
    p.body("rectangle", [128 - bw, by, 128 + bw, by + 2 * bh])
    for sx in (-1, 1):
        ex = 128 + sx * hw * 0.45
        p.solid("rectangle", [ex - 9, top + hh - 12, ex + 9, top + hh + 4], s.accent if q[4] > 0.5 else (250, 240, 80))
    p.solid("rectangle", [128 - bw * 0.5, by + bh * 0.6, 128 + bw * 0.5, by + bh * 1.1], s.secondary)
    return top - 38, by + 2 * bh


def _draw_vase(p: _Painter, s: Subject, c: tuple[int, int, int]) -> tuple[float, float]:
    q = s.params
    top, bottom = 40 + 20 * q[0], 225
    neck, belly, foot = 18 + 18 * q[1], 50 + 35 * q[2], 28 + 20 * q[3]
    by = top + (bottom - top) * (0.45 + 0.3 * q[4])
    pts_r = [(128 + neck * 1.3, top), (128 + neck, top + 25), (128 + belly, by), (128 + foot, bottom)]
    pts = pts_r + [(256 - x, y) for x, y in reversed(pts_r)]
    p.body("polygon", pts)
    p.solid("rectangle", [128 - neck * 1.3, top - 6, 128 + neck * 1.3, top + 8], s.accent)
    return top - 6, bottom


def _draw_backpack(p: _Painter, s: Subject, c: tuple[int, int, int]) -> tuple[float, float]:
    q = s.params
    w, h = 55 + 30 * q[0], 75 + 25 * q[1]
    top = 128 - h
    p.solid("arc", [128 - 26, top - 34, 128 + 26, top + 18], s.secondary, start=180, end=360, width=10)
    p.body("rounded_rectangle", [128 - w, top, 128 + w, 128 + h], radius=int(20 + 30 * q[2]))
    pw, ph = w * (0.5 + 0.3 * q[3]), h * (0.35 + 0.2 * q[4])
    p.solid("rounded_rectangle", [128 - pw, 128 + h - 2 * ph - 10, 128 + pw, 128 + h - 10], s.secondary, radius=12)
    p.solid("rectangle", [128 - pw, 128 + h - 2 * ph - 10, 128 + pw, 128 + h - 2 * ph + 2], s.accent)
    return top - 34, 128 + h


_DRAWERS = {
    "toy": _draw_toy,
    "mug": _draw_mug,
    "creature": _draw_creature,
    "robot": _draw_robot,
    "vase": _draw_vase,
    "backpack": _draw_backpack,
}


def _accessory(p: _Painter, kind: str, top: float) -> None:
    if kind == "party_hat":
        p.solid("polygon", [(100, top + 8), (156, top + 8), (128, top - 55)], (230, 40, 150))
        p.solid("ellipse", [120, top - 63, 136, top - 47], (255, 230, 40))
    elif kind == "crown":
        p.solid("polygon", [(92, top + 6), (164, top + 6), (164, top - 34), (146, top - 12), (128, top - 40),
                            (110, top - 12), (92, top - 34)], (245, 200, 20))  # fmt: skip
    elif kind == "bow_tie":
        y = top + 0.45 * (BASE - top)
        p.solid("polygon", [(128, y), (92, y - 22), (92, y + 22)], (200, 20, 40))
        p.solid("polygon", [(128, y), (164, y - 22), (164, y + 22)], (200, 20, 40))


@functools.lru_cache(maxsize=256)  # crawls draw one subject many times; callers never mutate the sprite
def subject_sprite(subject: Subject, color: str | None = None, accessory: str | None = None) -> Image.Image:
    """The subject alone, RGBA on a transparent BASE x BASE canvas, upright and centred."""
    primary = COLORS[color] if color else subject.primary
    painter = _Painter(_pattern_image(subject, primary))
    top, _ = _DRAWERS[subject.noun](painter, subject, primary)
    if accessory:
        _accessory(painter, accessory, max(top, 40))
    return painter.sprite


def draw_scene(scene: str, seed: int) -> Image.Image:
    """A BASE x BASE background: sky, ground and a few bold scene features."""
    spec = SCENES[scene]
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (BASE, BASE), spec["sky"])
    d = ImageDraw.Draw(img)
    gy = int(BASE * spec["ground_y"])
    d.rectangle([0, gy, BASE, BASE], fill=spec["ground"])
    if scene == "snow":
        for _ in range(30):
            x, y = rng.uniform(0, BASE, 2)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 255, 255))
    elif scene == "beach":
        d.ellipse([190, 15, 235, 60], fill=(255, 230, 90))
        d.rectangle([0, gy - 18, BASE, gy], fill=(60, 140, 200))
    elif scene == "forest":
        for x in rng.uniform(0, BASE, 6):
            d.rectangle([x - 6, gy - 30, x + 6, gy + 5], fill=(90, 60, 30))
            d.polygon([(x - 30, gy - 25), (x + 30, gy - 25), (x, gy - 120 - rng.uniform(0, 40))], fill=(30, 90, 40))
    elif scene == "city":
        for x in range(0, BASE, 50):
            h = rng.uniform(60, 140)
            d.rectangle([x, gy - h, x + 44, gy], fill=(110, 115, 130))
            for wy in range(int(gy - h + 10), gy - 10, 22):
                d.rectangle([x + 8, wy, x + 18, wy + 10], fill=(220, 210, 120))
        d.rectangle([0, gy + 40, BASE, gy + 46], fill=(230, 230, 230))
    elif scene == "kitchen":
        for x in range(0, BASE, 40):
            d.line([(x, 0), (x, gy)], fill=(210, 200, 175), width=3)
        d.rectangle([0, gy, BASE, gy + 10], fill=(120, 75, 40))
    elif scene == "night":
        for _ in range(40):
            x, y = rng.uniform(0, BASE), rng.uniform(0, gy)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 220))
        d.ellipse([25, 20, 60, 55], fill=(240, 240, 200))
    elif scene == "desert":
        d.ellipse([20, 20, 70, 70], fill=(255, 245, 200))
        for x in rng.uniform(0, BASE, 3):
            d.ellipse([x - 70, gy - 20, x + 70, gy + 30], fill=(220, 165, 100))
    elif scene == "lawn":
        for _ in range(3):
            x, y = rng.uniform(0, BASE), rng.uniform(10, gy - 40)
            d.ellipse([x - 30, y - 12, x + 30, y + 12], fill=(250, 250, 250))
    elif scene == "ocean":
        for y in range(gy + 15, BASE, 28):
            for x in range(-20, BASE, 40):
                d.arc([x, y, x + 40, y + 16], 200, 340, fill=(200, 230, 250), width=4)
    elif scene == "brick":
        for row, y in enumerate(range(0, gy, 22)):
            for x in range(-(row % 2) * 24, BASE, 48):
                d.rectangle([x, y, x + 44, y + 18], fill=(185, 85, 60))
    return img


def render(subject: Subject, context: Context, size: int = 64) -> Image.Image:
    """The subject in the context, as an RGB image of size x size (ground truth; deterministic)."""
    if not 8 <= size <= 1024:
        raise ValueError(f"size={size}: must be in 8..1024")
    rng = np.random.default_rng(derive_seed(context.seed, "render"))
    img = draw_scene(context.scene, context.seed)
    sprite = subject_sprite(subject, context.color, context.accessory)
    angle = {"upright": 0.0, "tilted": 25.0 * rng.choice([-1, 1]), "sideways": 90.0, "upside_down": 180.0}[
        context.orientation
    ]
    if angle:
        sprite = sprite.rotate(angle, resample=Image.Resampling.BICUBIC)
    span = int(BASE * SIZES[context.size])
    sprite = sprite.resize((span, span), Image.Resampling.LANCZOS)
    cx = int(BASE * POSITIONS[context.position][1])
    ground = int(BASE * SCENES[context.scene]["ground_y"])
    # stand on the ground line, but keep the whole box inside the canvas
    y = min(BASE - span - 4, max(4, ground + span // 6 - span))
    x = min(BASE - span, max(0, cx - span // 2))
    img.paste(sprite, (x, y), sprite)
    if context.style == "sketch":
        edges = ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES)
        img = ImageOps.invert(edges.point(lambda v: 255 if v > 40 else 0)).convert("RGB")
    elif context.style == "pop_art":
        img = ImageOps.posterize(ImageOps.autocontrast(img), 2)
    if size != BASE:
        img = img.resize((size, size), Image.Resampling.BOX if size < BASE else Image.Resampling.BICUBIC)
    return img


def render_dict(subject: dict[str, Any], context: dict[str, Any], size: int = 64) -> Image.Image:
    """`render` from the JSON-able dicts that examples and ground-truth tables carry."""
    return render(Subject.from_dict(subject), Context.from_dict(context), size)


# ---------------------------------------------------------------------------- held-out evaluation


def heldout_examples(
    cfg: Config, num_subjects: int | None = None, k: int = 3, image_size: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Evaluation examples for held-out subjects (never in a training crawl).

    Each: {subject_id, noun, subject (dict), neighbor_images [PIL]*k, neighbor_captions,
    neighbor_contexts, prompt, context (dict), target (PIL: ground truth of the prompt)}.
    Neighbors show plain contexts; prompts add colour/accessory/style changes more often.
    """
    size = image_size or cfg.model.image_size
    heldout = split_subjects(cfg)["heldout"]
    if num_subjects is not None:
        heldout = heldout[:num_subjects]
    out = []
    for subject in heldout:
        rng = np.random.default_rng(derive_seed(seed, "heldout-example", subject.seed))
        contexts = [sample_context(rng, p_color=0, p_accessory=0, p_style=0) for _ in range(k)]
        prompt_ctx = sample_context(rng, p_color=0.2, p_accessory=0.2, p_style=0.1)
        out.append(
            {
                "subject_id": subject.subject_id,
                "noun": subject.noun,
                "subject": subject.to_dict(),
                "neighbor_images": [render(subject, c, size) for c in contexts],
                "neighbor_captions": [caption(subject.noun, c, rng) for c in contexts],
                "neighbor_contexts": [c.to_dict() for c in contexts],
                "prompt": caption(subject.noun, prompt_ctx, rng),
                "context": prompt_ctx.to_dict(),
                "target": render(subject, prompt_ctx, size),
            }
        )
    return out
