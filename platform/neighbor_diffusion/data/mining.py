"""Cluster mining on Ray Data: crawl pairs -> clusters of one subject, as Parquet shards.

    read          WebDataset tars or Parquet files (img2dataset's columns), one task per file
                  (read_binary_files): a damaged file (a cut tar, a Parquet file without its
                  footer or with an unreadable row group) keeps what is readable and is named
    validate      decode (bombs checked before pixels), odd modes -> RGB, resize + crop to
                  model.image_size, caption cleanup, page-URL normalisation, image embedding
                  (an actor pool: the embedder may be a CLIP/DINO model); bad rows get a reason
    deduplicate   duplicate keys (the first occurrence in crawl order wins); in a page, the same picture
                  again (same pixels at model.image_size) is dropped as duplicate_image
    group         by normalised page URL -> drop members far from the group's centre, drop
                  groups whose coherence < data.coherence_threshold or with < min_cluster_size
    encode        captions -> frozen text-encoder token states (actor pool), float16 bytes
    write         Parquet cluster shards (CLUSTER_SCHEMA) + manifest.json

Every dropped row and group is counted by reason, every damaged file named, in the manifest; with ground truth
(the synthetic crawl) the manifest also gives the filter's precision and recall.

The pure functions (`parse_tar`, `parse_parquet`, `validate_record`, `clean_caption`, `normalize_page_url`,
`filter_group`, `DescriptorEmbedder`) are testable without Ray.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import tarfile
import time
import unicodedata
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from neighbor_diffusion.config import Config, ConfigError
from neighbor_diffusion.data import storage
from neighbor_diffusion.data.images import ImageError, decode_image, encode_png, square
from neighbor_diffusion.data.storage import Location

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OK = "ok"
DAMAGED = "damaged_file"  # the status of a damaged crawl file's marker row

# One row per cluster. Caption states are float16 bytes of shape (n, T, D), masks uint8 (n, T).
CLUSTER_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.string()),  # the normalised page URL
        ("num_members", pa.int32()),
        ("image_size", pa.int32()),
        ("images", pa.list_(pa.binary())),  # PNG, image_size x image_size RGB
        ("captions", pa.list_(pa.string())),
        ("keys", pa.list_(pa.string())),
        ("urls", pa.list_(pa.string())),
        ("coherence", pa.float32()),
        ("text_encoder", pa.string()),
        ("text_states", pa.binary()),  # float16, (num_members, T, D), C order
        ("text_mask", pa.binary()),  # uint8 0/1, (num_members, T)
        ("text_shape", pa.list_(pa.int32())),  # [num_members, T, D]
    ]
)


# ---------------------------------------------------------------------------- reading


def _tar_cut(data: bytes, end: int) -> bool:
    """True when a tar does not end as a complete archive (tarfile reads a cut header as EOF)."""
    tail = data[end:]
    return len(data) % 512 != 0 or len(tail) < 1024 or tail.strip(b"\0") != b""


def parse_tar(data: bytes, shard: str) -> tuple[list[dict[str, Any]], str]:
    """WebDataset tar bytes -> records {key, shard, index, image, ext, caption, meta}, and what is wrong
    with the file ("" when nothing): a cut or unreadable tar keeps the records before the damage.

    Members of one sample are consecutive and share the key (the name before the first
    dot); a repeated extension starts a new sample, so a duplicate key yields two records.
    """
    records: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    damage = ""

    def flush() -> None:
        if current is not None:
            records.append(current)

    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        for member in tf:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            ext = ext.lower()
            payload = tf.extractfile(member).read()  # type: ignore[union-attr]
            field = "image" if ext in IMAGE_EXTS else "caption" if ext == "txt" else "meta" if ext == "json" else None
            if field is None:
                continue
            if current is None or current["key"] != key or current[field] is not None:
                flush()
                current = {"key": key, "shard": shard, "index": len(records), "image": None, "ext": "",
                           "caption": None, "meta": None}  # fmt: skip
            current[field] = payload
            if field == "image":
                current["ext"] = ext
        flush()
        if _tar_cut(data, tf.offset):
            damage = f"the tar is cut short ({len(records)} records before the cut kept)"
    except (tarfile.TarError, EOFError, OSError) as e:
        flush()
        damage = f"the tar is cut short or damaged: {e} ({len(records)} records before it kept)"
    return records, damage


PARQUET_COLUMNS = ("key", "jpg", "image", "caption", "url", "page_url", "width", "height")


def parse_parquet(data: bytes, shard: str) -> tuple[list[dict[str, Any]], str]:
    """img2dataset-style Parquet bytes (columns key, jpg or image, caption, page_url; url, width, height
    optional) -> the records of `parse_tar`, and what is wrong with the file ("" when nothing): an
    unreadable row group is skipped and named, the others are kept; a file without its footer (an
    interrupted write) has nothing readable."""
    records: list[dict[str, Any]] = []
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        return records, f"unreadable as Parquet: {e}"
    names = set(pf.schema_arrow.names)
    if missing := _missing_columns(names):
        return records, missing
    columns = [c for c in PARQUET_COLUMNS if c in names and not (c == "image" and "jpg" in names)]
    bad: list[str] = []
    for g in range(pf.num_row_groups):
        try:
            rows = pf.read_row_group(g, columns=columns).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            bad.append(f"row group {g} of {pf.num_row_groups} unreadable: {' '.join(str(e).split())}")
            continue
        records += [_parquet_record(row, shard, len(records) + i) for i, row in enumerate(rows)]
    return records, "; ".join(bad) + (f" ({len(records)} records of the others kept)" if bad else "")


def _missing_columns(names: set[str]) -> str:
    """What a Parquet crawl file with these columns lacks, or ""."""
    missing = [c for c, ok in (("key", "key" in names), ("jpg", bool(names & {"jpg", "image"}))) if not ok]
    if not missing:
        return ""
    return f"no column {' and no '.join(missing)} (Parquet input needs key, jpg or image, caption, page_url)"


def _parquet_record(row: dict[str, Any], shard: str, index: int) -> dict[str, Any]:
    key = "" if row["key"] is None else str(row["key"])
    meta = {"key": key} | {c: row[c] for c in ("url", "page_url", "width", "height") if not _absent(row.get(c))}
    image, caption = row.get("jpg", row.get("image")), row.get("caption")
    if isinstance(image, dict):  # an image struct {bytes, path}, as Hugging Face datasets write it
        image = image.get("bytes")
    if isinstance(caption, str):
        caption = caption.encode()
    return {"key": key, "shard": shard, "index": index, "ext": "jpg",
            "image": image if isinstance(image, bytes) else None,  # another type (a path string): no image
            "caption": caption if isinstance(caption, bytes) else None,  # a number: no caption
            "meta": json.dumps(meta).encode()}  # fmt: skip


def _read_file_rows(row: dict[str, Any], root: str = "") -> list[dict[str, Any]]:
    """Ray flat_map: one crawl file (a .tar or a .parquet) -> its records, plus a marker row (index -1,
    the damage as its caption) when the file is damaged. A record's `shard` is the file's path below
    `root` (data.input): two runs' `00000.tar` in two subfolders are two shards."""
    path, root = row["path"], root.rstrip("/") + "/"
    shard = path[len(root) :] if root != "/" and path.startswith(root) else Path(path).name
    parse = parse_tar if shard.endswith(".tar") else parse_parquet
    records, damage = parse(row["bytes"], shard)
    if damage:
        records.append({"key": "", "shard": shard, "index": -1, "image": None, "ext": "",
                        "caption": damage.encode(), "meta": None})  # fmt: skip
    return records


def _absent(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


# ---------------------------------------------------------------------------- cleaning

_FILENAME = re.compile(r"^[\w\-. ()]+\.(jpe?g|png|gif|webp|bmp|tiff?)$", re.I)
_CAMERA = re.compile(r"^(img|dsc|dscn|dcim|pxl|photo|image|pic)[_\- ]?\d+", re.I)
_BOILERPLATE = {
    "buy now", "click here", "image", "photo", "picture", "untitled", "null", "none", "product photo",
    "product image", "add to cart", "shop now", "thumbnail", "placeholder", "no image", "img",
}  # fmt: skip
_TAGS = re.compile(r"<[^>]+>")


def clean_caption(raw: bytes | None) -> tuple[str, str]:
    """Alt-text bytes -> (normalised caption, OK) or ("", drop reason)."""
    if raw is None:
        return "", "caption_missing"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "caption_not_utf8"
    text = unicodedata.normalize("NFKC", html.unescape(_TAGS.sub(" ", text)))
    text = " ".join(text.split()).strip(" \"'`|-_").lower()
    if not text:
        return "", "caption_empty"
    if _FILENAME.match(text) or _CAMERA.match(text) or text in _BOILERPLATE or len(re.findall(r"[a-z]{2,}", text)) < 2:
        return "", "caption_junk"
    return text, OK


_TRACKING = re.compile(r"^(utm_\w+|ref|fbclid|gclid|mc_\w+|source)$", re.I)


def normalize_page_url(url: str) -> str:
    """Spellings of one page -> one id: scheme, case, www., tracking parameters, fragment, slash.
    ValueError for a URL that does not parse (a port that is no number or out of range, an unclosed "[")."""
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower().removeprefix("www.")
    if parts.port and parts.port not in (80, 443):
        host += f":{parts.port}"
    query = urllib.parse.urlencode(  # a bare "?12345" names a page as "?id=12345" does
        sorted((k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if not _TRACKING.match(k))
    )
    path = parts.path.rstrip("/") or "/"
    return f"{host}{path}" + (f"?{query}" if query else "")


def _image_reason(e: ImageError) -> str:
    if e.reason == "undecodable" and "truncat" in str(e).lower():
        return "image_truncated"
    return f"image_{e.reason}"


def validate_record(rec: dict[str, Any], image_size: int, min_side: int, max_pixels: int) -> dict[str, Any]:
    """One crawl record -> a validated row; `status` is OK or the drop reason.

    Row: key, shard, index, status, page (normalised URL), url, caption, mode (original
    image mode), image (PNG at image_size, empty unless OK).
    """
    out = {"key": rec.get("key") or "", "shard": rec["shard"], "index": int(rec["index"]), "status": OK,
           "page": "", "url": "", "caption": "", "mode": "", "image": b""}  # fmt: skip
    meta_raw = rec.get("meta")
    if rec["index"] == -1:  # marker row of a damaged file (`_read_file_rows`): no pair
        out["status"], out["caption"] = DAMAGED, (rec.get("caption") or b"").decode()
        return out
    if rec.get("image") is None:
        out["status"] = "missing_image"
        return out
    try:
        meta = json.loads(meta_raw) if meta_raw else None
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        out["status"] = "bad_metadata"
        return out
    out["url"] = str(meta.get("url") or "")
    page_url = meta.get("page_url")
    if not isinstance(page_url, str) or not page_url.strip():
        out["status"] = "missing_page_url"
        return out
    try:
        out["page"] = normalize_page_url(page_url)
    except ValueError:
        out["status"] = "bad_page_url"
        return out
    out["caption"], reason = clean_caption(rec.get("caption"))
    if reason != OK:
        out["status"] = reason
        return out
    name = f"{rec['shard']}/{out['key']}.{rec.get('ext') or 'img'}"
    try:
        out["mode"] = _peek_mode(rec["image"])
        img = decode_image(rec["image"], name=name, max_pixels=max_pixels)
    except ImageError as e:
        out["status"] = _image_reason(e)
        return out
    if min(img.size) < min_side:
        out["status"] = "image_too_small"
        return out
    out["image"] = encode_png(square(img, image_size))
    return out


def _peek_mode(data: bytes) -> str:
    try:
        return Image.open(io.BytesIO(data)).mode
    except Exception:
        return ""


# ---------------------------------------------------------------------------- image embedders


class DescriptorEmbedder:
    """An offline image descriptor: the colour distribution of the *foreground*.

    The background is whatever colours the image border shows; pixels far (in RGB) from
    every border colour are foreground. Their joint RGB histogram (6x6x6, soft weights,
    Hellinger-normalised) is the embedding: invariant to scene, position, size and
    rotation, and different between subjects because subjects differ most in colour and
    pattern. Cosine similarity of two embeddings is their Bhattacharyya coefficient.
    """

    dim = 6 * 6 * 6
    SIZE = 32

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self.embed(im) for im in images]).astype(np.float32)  # (N, dim)

    def embed(self, img: Image.Image) -> np.ndarray:
        s = self.SIZE
        x = np.asarray(img.convert("RGB").resize((s, s), Image.Resampling.BOX), dtype=np.float32)  # (s, s, 3)
        ring = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                               x[:, -2:].reshape(-1, 3)])  # fmt: skip
        border = np.unique((ring / 12).round(), axis=0) * 12  # (B, 3) distinct border colours
        pix = x.reshape(-1, 3)
        # (s*s, B) distances -> distance to the nearest border colour
        d = np.sqrt(((pix[:, None, :] - border[None, :, :]) ** 2).sum(-1)).min(1)
        w = np.clip((d - 30.0) / 50.0, 0.0, 1.0)
        if w.sum() < 1.0:  # no foreground found: fall back to the whole image
            w = np.ones_like(w)
        bins = np.minimum((pix / 256.0 * 6).astype(np.int64), 5)
        idx = bins[:, 0] * 36 + bins[:, 1] * 6 + bins[:, 2]
        hist = np.bincount(idx, weights=w, minlength=self.dim)
        return np.sqrt(hist / hist.sum())


class HFImageEmbedder:
    """CLIP (image features) or DINO-style (CLS token) embeddings from a local model folder."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"data.image_embedder={path!r}: no transformers model (config.json) there")
        self.torch = torch
        self.processor = AutoImageProcessor.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "clip":
            from transformers import CLIPVisionModelWithProjection

            self.model = CLIPVisionModelWithProjection.from_pretrained(path).eval()
            self.kind = "clip"
        else:
            self.model = AutoModel.from_pretrained(path).eval()
            self.kind = "cls"

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        with self.torch.no_grad():
            inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            out = self.model(pixel_values=inputs["pixel_values"])
            feats = out.image_embeds if self.kind == "clip" else out.last_hidden_state[:, 0]  # (N, dim)
            feats = self.torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.numpy().astype(np.float32)


def build_image_embedder(name: str) -> DescriptorEmbedder | HFImageEmbedder:
    return DescriptorEmbedder() if name == "descriptor" else HFImageEmbedder(name)


# ---------------------------------------------------------------------------- group filter


def filter_group(embeddings: np.ndarray, outlier_threshold: float) -> tuple[np.ndarray, float]:
    """Which members of one page show its subject, and how coherent they are.

    embeddings: (N, dim). The centre is the mean of the medoid's close members (robust
    to outliers while they are a minority); members with cosine < outlier_threshold to
    the centre are dropped. Coherence: mean pairwise cosine of the kept members.
    Returns (keep (N,) bool, coherence).

    Memory and time are O(N * dim), not O(N^2): a member's summed cosine to all members is
    its dot product with their sum, and the kept members' summed pairwise cosines are their
    sum's squared norm (a 50k-image gallery page would need a 10 GB N x N matrix).
    """
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-8)
    n = len(e)
    if n == 1:
        return np.ones(1, dtype=bool), 0.0
    medoid = int(np.argmax(e @ e.sum(0, dtype=np.float64).astype(e.dtype)))  # the largest mean cosine to the others
    close = e @ e[medoid] >= outlier_threshold
    centre = e[close].mean(0)
    centre /= max(float(np.linalg.norm(centre)), 1e-8)
    keep = e @ centre >= outlier_threshold
    m = int(keep.sum())
    if m < 2:
        return keep, 0.0
    kept = e[keep]
    total = kept.sum(0, dtype=np.float64)
    pair_sum = float(total @ total) - float(np.einsum("ij,ij->", kept, kept, dtype=np.float64))
    return keep, pair_sum / (m * (m - 1))


def cluster_group(batch: dict[str, np.ndarray], outlier_threshold: float, coherence_threshold: float,
                  min_size: int, max_size: int) -> dict[str, list]:  # fmt: skip
    """Ray map_groups: the validated rows of one page -> one cluster row (status OK or why dropped).

    Members are ordered by crawl position; a picture the page shows again (the same pixels at model size: the
    same PNG bytes) is one member, the first (a copy would be its own neighbor: the copy-paste shortcut);
    beyond `max_size`, the most central are kept.
    """
    order = np.lexsort((batch["index"], batch["shard"]))
    again, seen = np.zeros(len(order), dtype=bool), set()
    for j, data in enumerate(batch["image"][order]):
        digest = hashlib.sha256(data).digest()
        again[j] = digest in seen
        seen.add(digest)
    order, copies = order[~again], order[again]
    emb = np.stack([np.frombuffer(b, dtype=np.float32) for b in batch["embedding"][order]])  # (N, dim)
    keep, coherence = filter_group(emb, outlier_threshold)
    if keep.sum() > max_size:
        centre = emb[keep].mean(0)
        score = np.where(keep, emb @ centre, -np.inf)
        keep = np.zeros_like(keep)
        keep[np.argsort(-score, kind="stable")[:max_size]] = True
    m = int(keep.sum())
    status = OK if m >= min_size and coherence >= coherence_threshold else "incoherent"
    if m < min_size:
        status = "cluster_too_small"
    sel = order[keep]
    return {
        "cluster_id": [str(batch["page"][0])],
        "status": [status],
        "num_members": [m],
        "coherence": [coherence],
        "images": [[bytes(b) for b in batch["image"][sel]]],
        "captions": [[str(c) for c in batch["caption"][sel]]],
        "keys": [[str(k) for k in batch["key"][sel]]],
        "urls": [[str(u) for u in batch["url"][sel]]],
        "rejected_keys": [[str(k) for k in batch["key"][order[~keep]]]],
        "duplicate_image_keys": [[str(k) for k in batch["key"][copies]]],
    }


class CaptionEncoder:
    """Ray actor (map_batches class): a batch of cluster rows -> CLUSTER_SCHEMA rows with caption states."""

    def __init__(self, encoder: str, max_length: int, image_size: int, threads: int = 1):
        import torch

        from neighbor_diffusion.text import build_text_encoder

        torch.set_num_threads(threads)  # one actor per core; more threads would oversubscribe
        self.name, self.image_size = encoder, image_size
        self.encoder = build_text_encoder(encoder, max_length)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        flat = [c for r in rows for c in r["captions"]]
        states, mask = self.encoder.encode(flat)  # (sum n, T, D), (sum n, T)
        states = states.numpy().astype(np.float16)
        mask = mask.numpy().astype(np.uint8)
        start = 0
        for r in rows:
            n = len(r["captions"])
            r["text_states"] = states[start : start + n].tobytes()
            r["text_mask"] = mask[start : start + n].tobytes()
            r["text_shape"] = [n, states.shape[1], states.shape[2]]
            r["text_encoder"] = self.name
            r["image_size"] = self.image_size
            start += n
        return pa.Table.from_pylist(rows, schema=CLUSTER_SCHEMA)


# ---------------------------------------------------------------------------- the job

_EMBEDDERS: dict[str, Any] = {}


def _validate_batch(batch: dict[str, np.ndarray], image_size: int, min_side: int, max_pixels: int,
                    embedder: str) -> dict[str, list]:  # fmt: skip
    """Ray map_batches (tasks): validate records and embed the good images (embedder cached per worker)."""
    if embedder not in _EMBEDDERS:
        _EMBEDDERS[embedder] = build_image_embedder(embedder)
    embed = _EMBEDDERS[embedder]
    n = len(batch["key"])
    rows = []
    for i in range(n):
        rec = {k: batch[k][i] for k in batch}
        for k in ("image", "caption", "meta"):  # b"" + has_* flag encode "absent" (Arrow-friendly)
            rec[k] = bytes(rec[k]) if rec[f"has_{k}"] else None
        rows.append(validate_record(rec, image_size, min_side, max_pixels))
    good = [j for j, r in enumerate(rows) if r["status"] == OK]
    embs = embed([Image.open(io.BytesIO(rows[j]["image"])) for j in good]) if good else np.zeros((0, 1))
    out: dict[str, list] = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    if rows:
        out["embedding"] = [b""] * n
        for j, e in zip(good, embs):
            out["embedding"][j] = np.asarray(e, dtype=np.float32).tobytes()
    return out


def _flag_absent(rec: dict[str, Any]) -> dict[str, Any]:
    for k in ("image", "caption", "meta"):
        rec[f"has_{k}"] = rec[k] is not None
        rec[k] = rec[k] if rec[k] is not None else b""
    return rec


def _read_file_flagged(row: dict[str, Any], root: str = "") -> list[dict[str, Any]]:
    return [_flag_absent(r) for r in _read_file_rows(row, root)]


def layout(cfg: Config) -> dict[str, Path | Location]:
    """Where a preset's data lives: <data.root>/<preset>/{crawl, ground_truth.parquet, world.json, clusters, ...};
    `data.root` and `data.input` may be filesystem URIs (s3://bucket/prefix: see `storage`)."""
    base = storage.location(cfg.data.root, "data.root") / cfg.preset
    return {
        "base": base,
        "crawl": storage.location(cfg.data.input, "data.input") if cfg.data.input else base / "crawl",
        "ground_truth": base / "ground_truth.parquet",
        "world": base / "world.json",
        "clusters": base / "clusters",
        "manifest": base / "manifest.json",
    }


def crawl_files(input_dir: str | Path | Location, fmt: str) -> list[str]:
    """The crawl's shard files under `data.input` (.tar for webdataset, else .parquet); FileNotFoundError if none."""
    ext = ".tar" if fmt == "webdataset" else ".parquet"
    input_dir = storage.location(input_dir, "data.input")
    try:
        files = storage.files(input_dir, ext)
        why = "" if files else "no such folder" if not input_dir.is_dir() else f"no {ext} files in it"
    except OSError as e:  # an object store that refuses: no bucket, no access
        files, why = [], str(e)
    if not files:
        raise FileNotFoundError(f"data.input={str(input_dir)!r}: {why} (data.input_format={fmt})")
    if fmt == "parquet":  # columns of another kind of table: said now, not as every file dropped in the mining
        try:
            missing = _missing_columns(set(pq.read_schema(files[0], filesystem=storage.filesystem(input_dir)).names))
        except (pa.ArrowException, OSError, ValueError):  # a damaged file: the mining counts it and goes on
            missing = ""
        if missing:
            raise ConfigError(f"data.input={str(input_dir)!r}: {Path(files[0]).name} has {missing}")
    return files


def read_crawl(input_dir: Path | Location, fmt: str):
    """The crawl as a Ray Dataset of records (key, shard, index, image, ext, caption, meta, has_*)."""
    import ray

    files, fs = crawl_files(input_dir, fmt), storage.filesystem(input_dir)
    # one task per file, Parquet too: a damaged file keeps what is readable and is named (`_read_file_rows`)
    ds = ray.data.read_binary_files(files, include_paths=True, override_num_blocks=len(files), filesystem=fs)
    return ds.flat_map(_read_file_flagged, fn_kwargs={"root": storage.ray_path(input_dir)}), len(files)


def _truth_table(path: Path | Location) -> dict[str, dict[str, Any]] | None:
    if not path.is_file():
        return None
    truth: dict[str, dict[str, Any]] = {}
    for row in storage.read_table(path).to_pylist():
        if row["bad"] == "" and row["key"] not in truth:
            truth[row["key"]] = row
    return truth


def _scores(pos: list[bool], pred: list[bool]) -> dict[str, float | int]:
    tp = sum(p and q for p, q in zip(pos, pred))
    fp = sum((not p) and q for p, q in zip(pos, pred))
    fn = sum(p and not q for p, q in zip(pos, pred))
    return {
        "precision": round(tp / max(tp + fp, 1), 4),
        "recall": round(tp / max(tp + fn, 1), 4),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
    }


def mine(cfg: Config, input_dir: str | Path | Location | None = None, out_dir: str | Path | Location | None = None,
         truth_path: str | Path | Location | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the mining job on the current Ray cluster; writes cluster shards + manifest.json, returns the manifest.
    Folders may be filesystem URIs (see `storage`)."""
    import pandas as pd
    import ray

    paths = layout(cfg)
    input_dir = storage.location(input_dir or paths["crawl"], "data.input")
    out_dir = storage.location(out_dir or paths["base"], "data.root")
    # the synthetic world's ground truth scores its own crawl only, not a crawl given as data.input
    truth_path = storage.location(truth_path) if truth_path else None if cfg.data.input else paths["ground_truth"]
    clusters_dir, manifest_path = out_dir / "clusters", out_dir / "manifest.json"
    d, size = cfg.data, cfg.model.image_size
    t0 = time.perf_counter()

    # 1. read + validate + embed (tasks), materialised: counts and the duplicate check need every row
    records, num_files = read_crawl(input_dir, d.input_format)
    rows = records.map_batches(
        _validate_batch,
        batch_size=64,
        fn_kwargs=dict(
            image_size=size, min_side=d.min_image_side, max_pixels=d.max_image_pixels, embedder=d.image_embedder
        ),  # fmt: skip
    ).materialize()
    table = rows.select_columns(["key", "shard", "index", "status", "page", "mode"]).to_pandas()

    # 2. duplicate keys: the first good occurrence in crawl order wins
    table = table.sort_values(["shard", "index"], kind="stable")
    ok = table["status"] == OK
    dup = ok & table[ok]["key"].duplicated(keep="first").reindex(table.index, fill_value=False)
    table.loc[dup, "status"] = "duplicate_key"
    dup_ids = set(zip(table.loc[dup, "shard"], table.loc[dup, "index"]))

    def keep_rows(batch: pd.DataFrame) -> pd.DataFrame:
        good = batch["status"] == OK
        if dup_ids:
            good &= ~pd.Series([(s, i) in dup_ids for s, i in zip(batch["shard"], batch["index"])], index=batch.index)
        return batch[good]

    # 3. group by page -> similarity filter, one row per page
    groups = (
        rows.map_batches(keep_rows, batch_format="pandas")
        .groupby("page", num_partitions=max(1, min(200, int(ok.sum()) // 2000 + 1)))  # Ray's 200 suits TBs
        .map_groups(
            cluster_group,
            batch_format="numpy",
            fn_kwargs=dict(
                outlier_threshold=d.outlier_threshold,
                coherence_threshold=d.coherence_threshold,
                min_size=d.min_cluster_size,
                max_size=d.max_cluster_size,
            ),  # fmt: skip
        )
        .materialize()
    )
    gstats = groups.select_columns(
        ["cluster_id", "status", "num_members", "keys", "rejected_keys", "duplicate_image_keys"]
    ).to_pandas()

    # 4. caption embeddings (actor pool) -> Parquet cluster shards. The old manifest goes with the old shards:
    # a write that fails half way leaves no manifest for training to take the partial folder by
    if manifest_path.is_file():
        manifest_path.unlink()
    storage.remove_files(clusters_dir, ".parquet")
    good_groups = groups.filter(expr=f"status == '{OK}'").drop_columns(
        ["status", "rejected_keys", "duplicate_image_keys"]
    )
    encoded = good_groups.map_batches(
        CaptionEncoder,
        batch_size=16,
        batch_format="pyarrow",
        fn_constructor_kwargs=dict(encoder=cfg.text.encoder, max_length=cfg.text.max_length, image_size=size),
        compute=ray.data.ActorPoolStrategy(size=d.encode_actors),
        num_cpus=1,
    )
    encoded.write_parquet(
        storage.ray_path(clusters_dir), filesystem=storage.filesystem(clusters_dir), min_rows_per_file=256
    )
    wall = time.perf_counter() - t0

    # 5. manifest: counts in/out, drops by reason, filter scores against ground truth
    pair_drops = Counter(s for s in table["status"] if s not in (OK, DAMAGED))  # a damaged file's marker is no pair
    for _, g in gstats.iterrows():
        pair_drops["outlier"] += len(g["rejected_keys"])
        pair_drops["duplicate_image"] += len(g["duplicate_image_keys"])
        if g["status"] != OK:
            pair_drops[g["status"]] += len(g["keys"])
    real_rows = table[table["status"] != DAMAGED]
    damaged = {}
    if (table["status"] == DAMAGED).any():  # what is wrong with each: its marker row's caption
        marks = rows.filter(expr=f"status == '{DAMAGED}'").select_columns(["shard", "caption"]).to_pandas()
        damaged = dict(zip(marks["shard"], marks["caption"]))
    kept = gstats[gstats["status"] == OK]
    pairs_out = int(kept["num_members"].sum())
    manifest: dict[str, Any] = {
        "preset": cfg.preset,
        "input": str(input_dir),
        "input_format": d.input_format,
        "input_files": num_files,
        "clusters_dir": str(clusters_dir),
        "image_size": size,
        "text_encoder": cfg.text.encoder,
        "text_max_length": cfg.text.max_length,
        "image_embedder": d.image_embedder,
        "pairs_in": len(real_rows),
        "pairs_valid": int((table["status"] == OK).sum()),
        "pairs_out": pairs_out,
        "pairs_dropped_by_reason": dict(sorted(pair_drops.items())),
        "damaged_files": dict(sorted(damaged.items())),  # file name -> what is wrong, what was kept
        "converted_modes": dict(Counter(m for m, s in zip(table["mode"], table["status"]) if s == OK and m != "RGB")),
        "groups_in": len(gstats),
        "clusters_out": len(kept),
        "groups_dropped_by_reason": dict(Counter(s for s in gstats["status"] if s != OK)),
        "cluster_size": {
            "min": int(kept["num_members"].min()) if len(kept) else 0,
            "mean": round(float(kept["num_members"].mean()), 2) if len(kept) else 0.0,
            "max": int(kept["num_members"].max()) if len(kept) else 0,
        },  # fmt: skip
        "wall_s": round(wall, 2),
        "pairs_per_s": round(len(real_rows) / wall, 1),
        "config": cfg.data.__dict__ | {"image_size": size},
    }
    truth = _truth_table(truth_path) if truth_path else None
    if truth is not None:
        manifest["filter"] = _filter_scores(table, gstats, truth)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def _filter_scores(table, gstats, truth: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Precision/recall of the similarity filter over the pairs that reached it (valid, deduplicated).

    Positive: the image shows its page's subject. Predicted: kept in a cluster that was written.
    """
    kept_keys = {k for ks, s in zip(gstats["keys"], gstats["status"]) if s == OK for k in ks}
    copies = {k for ks in gstats["duplicate_image_keys"] for k in ks}
    reached = table[table["status"] == OK]
    pos, pred, kinds = [], [], []
    for key in reached["key"]:
        t = truth.get(key)
        if t is None or key in copies:
            continue
        pos.append(bool(t["is_page_subject"]))
        pred.append(key in kept_keys)
        kinds.append(t["page_kind"])
    out: dict[str, Any] = {"all_pages": _scores(pos, pred)}
    for kind in ("subject", "mixed", "noise"):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        out[f"{kind}_pages"] = _scores([pos[i] for i in sel], [pred[i] for i in sel])
    out["precision"], out["recall"] = out["all_pages"]["precision"], out["all_pages"]["recall"]
    out["recall_subject_pages"] = out["subject_pages"]["recall"]
    return out
