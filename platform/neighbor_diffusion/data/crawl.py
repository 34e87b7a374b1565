"""A synthetic web crawl of the subject world, in the formats `img2dataset` writes.

Output of `generate_crawl(cfg, out_dir)`::

    out_dir/crawl/00000.tar ...     WebDataset shards: <key>.jpg|.png, <key>.txt, <key>.json
                                    (json: url, page_url, key, width, height, status)
      or out_dir/crawl/00000.parquet  columns key, jpg (binary), caption (binary), url,
                                    page_url, width, height (the Parquet alternative)
    out_dir/ground_truth.parquet    per record: page, kind, true subject, context, bad kind
                                    (kept aside: the miner never reads it, only scores with it)
    out_dir/world.json              subjects and the held-out split (by subject seed)

Pages are of three kinds, as on the web: *subject* pages (3-10 images of one subject
in different contexts), *mixed* pages (one subject plus unrelated outliers) and
*noise* pages (unrelated images). Alt texts are sometimes junk (filenames, "buy now",
empty). Page URLs come in several spellings (scheme, www., tracking parameters,
fragments) that the miner must normalise. With `data.bad_records > 0`, every bad-data
case of the issue is injected that many times, plus one truncated shard. Held-out
subjects never appear in a crawl, not even as outliers.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from neighbor_diffusion.config import Config
from neighbor_diffusion.data import storage, world
from neighbor_diffusion.data.storage import Location

JUNK_CAPTIONS = ("IMG_{n}.JPG", "DSC{n:05d}.jpg", "buy now", "click here", "", "image", "product photo", "untitled")
CRAWL_IMAGE_SIZES = (64, 80, 96, 128, 160)
RECORD_DEFECTS = (  # one record each, drawn by `_bad_records`
    "image_undecodable",
    "image_truncated",
    "image_empty",
    "image_too_large",
    "caption_not_utf8",
    "caption_empty",
    "missing_page_url",
    "duplicate_key",
)
BAD_KINDS = (*RECORD_DEFECTS, "duplicate_image")  # and the same picture again on its page (`_repeated_images`)
ODD_MODES = ("CMYK", "P", "RGBA", "I;16")  # good images in unusual modes: must be converted, not dropped


# ---------------------------------------------------------------------------- one record


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def odd_mode_bytes(img: Image.Image, mode: str) -> tuple[bytes, str]:
    """`img` re-encoded in an unusual mode; returns (bytes, extension)."""
    if mode == "CMYK":
        return encode(img.convert("CMYK"), "JPEG"), "jpg"
    if mode == "P":
        return encode(img.quantize(colors=64), "PNG"), "png"
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.new("L", img.size, 255))
        ImageDraw.Draw(rgba).rectangle([0, 0, img.width - 1, 3], fill=(0, 0, 0, 0))  # a transparent strip
        return encode(rgba, "PNG"), "png"
    if mode == "I;16":
        arr = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # 16-bit grey
        return encode(Image.fromarray(arr), "PNG"), "png"  # uint16 -> mode I;16
    raise ValueError(f"mode={mode!r}: must be one of {ODD_MODES}")


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims giant dimensions (a decompression bomb)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def abstract_image(rng: np.random.Generator, size: int) -> Image.Image:
    """An unrelated web image: random bold shapes on a random background."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = rng.uniform(0, size, 2)
        x1, y1 = x0 + rng.uniform(8, size / 2), y0 + rng.uniform(8, size / 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def _junk_caption(rng: np.random.Generator) -> str:
    return str(rng.choice(JUNK_CAPTIONS)).format(n=int(rng.integers(0, 99999)))


def page_url_variant(host: str, path: str, rng: np.random.Generator) -> str:
    """One of the spellings crawls produce for the same page."""
    scheme = "https" if rng.random() < 0.7 else "http"
    www = "www." if rng.random() < 0.3 else ""
    url = f"{scheme}://{www}{host}{path}"
    if rng.random() < 0.25:
        url += "/"
    if rng.random() < 0.3:
        url += f"?utm_source=feed{int(rng.integers(0, 9))}&ref=home"
    if rng.random() < 0.2:
        url += f"#img{int(rng.integers(0, 9))}"
    return url


# ---------------------------------------------------------------------------- pages


def _record(img: Image.Image, caption: str | bytes, page_url: str | None, truth: dict[str, Any]) -> dict[str, Any]:
    return {"image": encode(img, "JPEG", 90), "ext": "jpg", "caption": caption, "page_url": page_url, "truth": truth}


def build_pages(cfg: Config) -> list[dict[str, Any]]:
    """All records of the crawl, in crawl order (pages interleaved), with their ground truth."""
    d = cfg.data
    train = world.split_subjects(cfg)["train"]
    rng = np.random.default_rng(world.derive_seed(d.seed, "crawl"))
    records: list[dict[str, Any]] = []
    for page in range(d.num_pages):
        u = rng.random()
        kind = "mixed" if u < d.p_mixed_pages else "noise" if u < d.p_mixed_pages + d.p_noise_pages else "subject"
        host = f"shop{page % 37}.example.com"
        path = f"/{['products', 'blog', 'gallery', 'p'][page % 4]}/item-{page}"
        canonical = f"https://{host}{path}"

        # the helpers below close over this page's variables; they are only called within this iteration
        def add(img: Image.Image, text: str, subject_id: str, positive: bool, ctx: dict | None, junk: bool) -> None:
            junk = junk or text in JUNK_CAPTIONS or text.upper().endswith(".JPG")
            truth = {
                "page": page,  # noqa: B023
                "page_kind": kind,  # noqa: B023
                "canonical_page_url": canonical,  # noqa: B023
                "subject_id": subject_id,
                "is_page_subject": positive,
                "context": json.dumps(ctx) if ctx else "",
                "caption_junk": junk,
                "bad": "",
            }
            records.append(_record(img, text, page_url_variant(host, path, rng), truth))  # noqa: B023

        def subject_image(subject: world.Subject, positive: bool) -> None:
            ctx = world.sample_context(rng)
            img = world.render(subject, ctx, int(rng.choice(CRAWL_IMAGE_SIZES)))
            junk = rng.random() < d.p_junk_caption
            text = _junk_caption(rng) if junk else world.caption(subject.noun, ctx, rng, full=rng.random() < 0.8)
            add(img, text, subject.subject_id, positive, ctx.to_dict(), junk)

        def unrelated_image(exclude: set[str]) -> None:
            v = rng.random()
            size = int(rng.choice(CRAWL_IMAGE_SIZES))
            if v < 0.5:  # another subject
                other = train[int(rng.integers(0, len(train)))]
                while other.subject_id in exclude:
                    other = train[int(rng.integers(0, len(train)))]
                exclude.add(other.subject_id)
                subject_image(other, positive=False)
            elif v < 0.75:  # a scene without a subject
                ctx = world.sample_context(rng)
                img = world.draw_scene(ctx.scene, ctx.seed).resize((size, size), Image.Resampling.BOX)
                add(img, f"a photo {world.SCENES[ctx.scene]['phrase']}", "", False, None, False)
            else:
                text = _junk_caption(rng) if rng.random() < 0.5 else "abstract art print"
                add(abstract_image(rng, size), text, "", False, None, False)

        if kind == "noise":
            seen: set[str] = set()
            for _ in range(int(rng.integers(2, 7))):
                unrelated_image(seen)
            continue
        subject = train[int(rng.integers(0, len(train)))]
        n = int(rng.integers(3, 11)) if kind == "subject" else int(rng.integers(3, 7))
        for _ in range(n):
            subject_image(subject, positive=True)
        if kind == "mixed":
            seen = {subject.subject_id}
            for _ in range(int(rng.integers(1, 4))):
                unrelated_image(seen)

    _inject_odd_modes(records, rng, d.bad_records)
    records.extend(_bad_records(records, rng, d.bad_records))
    order = rng.permutation(len(records))  # a crawl lists pages interleaved
    records = [records[i] for i in order]
    # a page that shows a picture again (drawn apart and put last: the records above stay as they were)
    return records + _repeated_images(records, np.random.default_rng(world.derive_seed(d.seed, "again")), d.bad_records)


def _inject_odd_modes(records: list[dict[str, Any]], rng: np.random.Generator, n: int) -> None:
    """Re-encode some good images in odd modes; 16-bit grey only on non-subject images (it loses colour)."""
    for mode in ODD_MODES:
        pool = [r for r in records if r["truth"]["is_page_subject"] != (mode == "I;16") and "mode" not in r["truth"]]
        for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False):
            r = pool[int(i)]
            img = Image.open(io.BytesIO(r["image"]))
            r["image"], r["ext"] = odd_mode_bytes(img, mode)
            r["truth"]["mode"] = mode


def _bad_records(records: list[dict[str, Any]], rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """Extra records, each with one defect; `duplicate_key` is resolved at write time."""
    out = []
    good = [r for r in records if not r["truth"]["caption_junk"]]
    for kind in RECORD_DEFECTS:
        for _ in range(n):
            src = good[int(rng.integers(0, len(good)))]
            r = dict(src, truth=dict(src["truth"], bad=kind))
            if kind == "image_undecodable":
                r["image"] = b"<html><body>404 Not Found</body></html>" + rng.bytes(200)  # an error page
            elif kind == "image_truncated":
                r["image"] = src["image"][: len(src["image"]) * 2 // 3]
            elif kind == "image_empty":
                r["image"] = b""
            elif kind == "image_too_large":
                r["image"], r["ext"] = bomb_png(), "png"
            elif kind == "caption_not_utf8":
                r["caption"] = b"\xff\xfe caf\xe9 \x81"
            elif kind == "caption_empty":
                r["caption"] = "   "
            elif kind == "missing_page_url":
                r["page_url"] = None
            elif kind == "duplicate_key":
                r["duplicate_of"] = src  # same key and bytes as src, in another shard
            out.append(r)
    return out


def _repeated_images(records: list[dict[str, Any]], rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """`n` good records shown again on their page: the same image bytes and caption under a new key."""
    good = [r for r in records if not r["truth"]["bad"] and not r["truth"]["caption_junk"]]
    chosen = rng.choice(len(good), size=min(n, len(good)), replace=False) if n > 0 else []
    return [dict(good[int(i)], truth=dict(good[int(i)]["truth"], bad="duplicate_image")) for i in chosen]


# ---------------------------------------------------------------------------- writing


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # deterministic bytes
    tf.addfile(info, io.BytesIO(data))


def _meta(r: dict[str, Any], key: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"url": f"https://cdn.example.com/img/{key}.{r['ext']}", "key": key, "status": "success"}
    if r["page_url"] is not None:
        meta["page_url"] = r["page_url"]
    try:
        meta["width"], meta["height"] = Image.open(io.BytesIO(r["image"])).size
    except Exception:  # a broken image still gets a record, as a crawler would write it
        meta["width"] = meta["height"] = None
    return meta


def _caption_bytes(caption: str | bytes) -> bytes:
    return caption if isinstance(caption, bytes) else caption.encode()


_EXT = {"webdataset": "tar", "parquet": "parquet"}  # data.input_format -> its shards' extension


def write_crawl(
    records: list[dict[str, Any]], crawl_dir: Path | Location, fmt: str, pairs_per_shard: int
) -> list[dict]:
    """Shard the records (keys as img2dataset makes them: shard id + index); returns ground-truth rows."""
    if fmt not in _EXT:
        raise ValueError(f"data.input_format={fmt!r}: must be 'webdataset' or 'parquet'")
    crawl_dir.mkdir(parents=True, exist_ok=True)
    normal = [r for r in records if "duplicate_of" not in r]
    dups = [r for r in records if "duplicate_of" in r]
    shards = [normal[i : i + pairs_per_shard] for i in range(0, len(normal), pairs_per_shard)]
    truth_rows = []
    keyed: list[list[tuple[str, dict]]] = []
    for s, shard in enumerate(shards):
        rows = []
        for i, r in enumerate(shard):
            key = f"{s:05d}{i:04d}"
            r["key"] = key
            rows.append((key, r))
        keyed.append(rows)
    if dups:  # copies of earlier records under the same key, in the last shard (as a re-run crawl would)
        keyed[-1].extend((d["duplicate_of"]["key"], d) for d in dups)
    for s, rows in enumerate(keyed):
        for key, r in rows:
            truth_rows.append({"key": key, "shard": s, **{k: v for k, v in r["truth"].items() if k != "mode"},
                               "mode": r["truth"].get("mode", "")})  # fmt: skip
        (crawl_dir / f"{s:05d}.{_EXT[fmt]}").write_bytes(_shard_bytes(rows, fmt))
    return truth_rows


def _shard_bytes(rows: list[tuple[str, dict[str, Any]]], fmt: str) -> bytes:
    """(key, record) pairs -> one shard file's bytes, as img2dataset writes it in `fmt`."""
    buf = io.BytesIO()
    if fmt == "webdataset":
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for key, r in rows:
                _add(tf, f"{key}.{r['ext']}", r["image"])
                _add(tf, f"{key}.txt", _caption_bytes(r["caption"]))
                _add(tf, f"{key}.json", json.dumps(_meta(r, key)).encode())
    else:  # parquet
        metas = [_meta(r, key) for key, r in rows]
        table = pa.table(
            {
                "key": [k for k, _ in rows],
                "jpg": pa.array([r["image"] for _, r in rows], pa.binary()),
                "caption": pa.array([_caption_bytes(r["caption"]) for _, r in rows], pa.binary()),
                "url": [m["url"] for m in metas],
                "page_url": pa.array([m.get("page_url") for m in metas], pa.string()),
                "width": pa.array([m["width"] for m in metas], pa.int64()),
                "height": pa.array([m["height"] for m in metas], pa.int64()),
            }
        )
        pq.write_table(table, buf)
    return buf.getvalue()


def write_truncated_shard(
    crawl_dir: Path | Location, rng: np.random.Generator, fmt: str = "webdataset", n: int = 6
) -> list[dict[str, Any]]:
    """A shard of noise records cut in the middle, as an interrupted download leaves it (a tar keeps the records
    before the cut, a Parquet file without its footer none). Returns their truth rows."""
    truth, rows = [], []
    for i in range(n):
        key = f"t{i:08d}"
        r = {"image": encode(abstract_image(rng, 64)), "ext": "jpg", "page_url": f"https://noise.example.com/{i}",
             "caption": "a truncated download"}  # fmt: skip
        rows.append((key, r))
        truth.append({"key": key, "shard": 99999, "page": -1, "page_kind": "noise",
                      "canonical_page_url": r["page_url"], "subject_id": "", "is_page_subject": False,
                      "context": "", "caption_junk": False, "bad": "", "mode": ""})  # fmt: skip
    data = _shard_bytes(rows, fmt)
    (crawl_dir / f"99999.{_EXT[fmt]}").write_bytes(data[: len(data) // 2 + 100])
    return truth


def generate_crawl(cfg: Config, out_dir: str | Path | Location, fmt: str | None = None) -> dict[str, Any]:
    """Write crawl shards, ground truth and the world manifest under `out_dir` (a folder or a
    filesystem URI: see `storage`); returns a summary."""
    out = storage.location(out_dir)
    fmt = fmt or cfg.data.input_format
    crawl_dir = out / "crawl"
    storage.remove_files(crawl_dir)  # stale shards from a bigger crawl would be read too
    records = build_pages(cfg)
    truth = write_crawl(records, crawl_dir, fmt, cfg.data.pairs_per_shard)
    truncated = 0
    if cfg.data.bad_records > 0:
        rows = write_truncated_shard(crawl_dir, np.random.default_rng(world.derive_seed(cfg.data.seed, "trunc")), fmt)
        truth += rows
        truncated = len(rows)
    storage.write_table(pa.Table.from_pylist(truth), out / "ground_truth.parquet")
    (out / "world.json").write_text(json.dumps(world.world_manifest(cfg), indent=1))
    kinds: dict[str, int] = {}
    for t in truth:
        kinds[t["page_kind"]] = kinds.get(t["page_kind"], 0) + 1
    return {
        "crawl_dir": str(crawl_dir),
        "format": fmt,
        "pairs": len(truth),
        "truncated_shard_records": truncated,
        "pages": cfg.data.num_pages,
        "pairs_by_page_kind": kinds,
    }
