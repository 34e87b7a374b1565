"""Image decoding and conversion shared by the data job, the pipeline and the server.

Every image becomes RGB, is resized so its short side equals the target size and is
center-cropped to a square, then mapped to [-1, 1]. What cannot be converted raises
`ImageError` with the name of the offending input, so callers can count and drop it.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An input that is not a usable image; `reason` is a short machine-readable tag."""

    def __init__(self, name: str, reason: str, detail: str = ""):
        self.name, self.reason, self.detail = name, reason, detail
        super().__init__(f"{name}: {self.problem}")

    @property
    def problem(self) -> str:
        """What is wrong, without the input's name: `undecodable (OSError: ...)`."""
        return self.reason + (f" ({self.detail})" if self.detail else "")


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-f]+>")  # PIL names the BytesIO it was given


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, checking the size *before* decoding pixels (decompression bombs)."""
    if not data:
        raise ImageError(name, "empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(name, "too_large", f"{w}x{h} pixels > {max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, "too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for broken files
        raise ImageError(name, "undecodable", f"{type(e).__name__}: {_OBJECT_REPR.sub('', str(e))}") from None
    return to_rgb(img, name)


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode -> RGB: alpha is composited on white, palettes/CMYK/16-bit/grey are converted."""
    try:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # float32, scaled in place: a 4096x4096 16-bit PNG of ~150 KB took 384 MiB of arrays in float64
            # copies, and a server decodes uploads of that size (serve.max_image_pixels)
            arr = np.asarray(img, dtype=np.float32)
            hi = float(arr.max()) if arr.size and arr.max() > 255 else 255.0
            np.multiply(arr, 255.0 / hi, out=arr)
            np.clip(arr, 0, 255, out=arr)
            img = Image.fromarray(arr.astype(np.uint8), mode="L")
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
            return background
        return img.convert("RGB")
    except Exception as e:
        raise ImageError(name, "bad_mode", f"mode {img.mode}: {e}") from None


def square(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` and center-crop to size x size."""
    return ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def to_tensor(img: Image.Image, size: int, name: str = "image") -> torch.Tensor:
    """PIL (any mode, any size) -> (3, size, size) float32 in [-1, 1]."""
    if not isinstance(img, Image.Image):
        raise ImageError(name, "not_an_image", f"got {type(img).__name__}")
    if min(img.size) < 1:
        raise ImageError(name, "empty", f"size {img.size}")
    arr = np.asarray(square(to_rgb(img, name), size), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def text_cell(text: str, width: int, height: int) -> Image.Image:
    """White cell with `text` wrapped to fit, for labels in image grids."""
    import textwrap

    from PIL import ImageDraw

    cell = Image.new("RGB", (width, height), "white")
    lines = textwrap.wrap(text, max(8, width // 6))[: max(1, height // 13)]
    ImageDraw.Draw(cell).multiline_text((3, 3), "\n".join(lines), fill="black")
    return cell


def grid_of_rows(rows: list[list[Image.Image]], cell: int) -> Image.Image:
    """Paste rows of cells (each `cell` high; any width) left to right, top to bottom."""
    width = max(sum(c.size[0] for c in row) for row in rows)
    grid = Image.new("RGB", (width, cell * len(rows)), (235, 235, 235))
    for r, row in enumerate(rows):
        x = 0
        for c in row:
            grid.paste(c, (x, r * cell))
            x += c.size[0]
    return grid
