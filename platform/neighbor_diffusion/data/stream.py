"""The training example stream: cluster shards -> (target, K neighbors) examples on Ray Data.

Per cluster and epoch, one example: a random member is the target, k in 1..min(K, n-1)
other members (never the target) are its neighbors, padded to K with zeros and
`neighbor_mask=False`. Each image is flipped left-right with p=0.5 unless its caption
names a side ("on the left" must stay true). Clusters are shuffled per epoch; every
random choice comes from (seed, epoch, cluster_id), so the same seed gives the same
examples in the same order.

Row keys are `diffusion.BATCH_KEYS` (S = model.image_size, K = model.max_neighbors,
T = text.max_length, D = the text encoder's width):

    image (3,S,S) f32 in [-1,1]   text_states (T,D) f32   text_mask (T,) bool
    neighbor_images (K,3,S,S) f32   neighbor_text_states (K,T,D) f32
    neighbor_text_mask (K,T) bool   neighbor_mask (K,) bool

`build_example` is a plain function (no Ray); `training_dataset` wraps it.
"""

from __future__ import annotations

import functools
import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from ray.data._internal.execution.execution_callback import ExecutionCallback

from neighbor_diffusion.config import Config
from neighbor_diffusion.data import storage
from neighbor_diffusion.data.images import square
from neighbor_diffusion.data.storage import Location
from neighbor_diffusion.data.world import derive_seed

# captions that a mirror image would make false: sides, and text that would read backwards
_SIDED = re.compile(r"\b(left|right|text|sign|letters?|logo|written|reads?)\b", re.I)


def shard_files(shard_dir: str | Path | Location) -> list[str]:
    """The cluster shards under `shard_dir` (a folder or a filesystem URI: see `storage`)."""
    files = storage.files(shard_dir, ".parquet")
    if not files:
        raise FileNotFoundError(
            f"shard_dir={str(shard_dir)!r}: no cluster shards (*.parquet); run jobs/prepare_data.py"
        )
    return files


def load_clusters(shard_dir: str | Path | Location) -> list[dict[str, Any]]:
    """All cluster rows (CLUSTER_SCHEMA dicts), sorted by cluster_id. For small data and tests."""
    shard_dir = storage.location(shard_dir)  # a URI resolved once (for S3 that may ask for the bucket's region)
    fs = storage.filesystem(shard_dir)
    rows = [r for f in shard_files(shard_dir) for r in pq.read_table(f, filesystem=fs).to_pylist()]
    return sorted(rows, key=lambda r: r["cluster_id"])


def decode_cluster(cluster: dict[str, Any], image_size: int, members: list[int] | None = None) -> dict[str, Any]:
    """A cluster row -> arrays: images {member: (3,S,S) f32 [-1,1]} (only `members`, default all: an example
    uses at most K+1 of a cluster's images), text_states (n,T,D) f32, text_mask (n,T) bool, captions."""
    n, t, d = (int(v) for v in cluster["text_shape"])
    images = {}
    for i in range(n) if members is None else members:
        img = Image.open(io.BytesIO(cluster["images"][i])).convert("RGB")
        if img.size != (image_size, image_size):  # shards mined at another size still serve
            img = square(img, image_size)
        images[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (3, S, S)
    return {
        "images": images,
        "text_states": np.frombuffer(cluster["text_states"], dtype=np.float16).reshape(n, t, d).astype(np.float32),
        "text_mask": np.frombuffer(cluster["text_mask"], dtype=np.uint8).reshape(n, t).astype(bool),
        "captions": list(cluster["captions"]),
    }


def check_cluster(cluster: dict[str, Any], cfg: Config) -> None:
    """Shards must match the run's text encoder and length; say which field to change if not."""
    cid = cluster.get("cluster_id", "?")
    if cluster["text_encoder"] != cfg.text.encoder:
        raise ValueError(
            f"cluster {cid!r}: captions were encoded with text.encoder={cluster['text_encoder']!r}, the run uses "
            f"text.encoder={cfg.text.encoder!r}; re-run jobs/prepare_data.py with the same text settings"
        )
    if int(cluster["text_shape"][1]) != cfg.text.max_length:
        raise ValueError(
            f"cluster {cid!r}: captions were encoded with text.max_length={cluster['text_shape'][1]}, the run uses "
            f"text.max_length={cfg.text.max_length}"
        )
    n = len(cluster["images"])
    if n < 2:
        raise ValueError(f"cluster {cid!r}: {n} member(s); a cluster needs >= 2")
    t, d = (int(v) for v in cluster["text_shape"][1:])
    got = {"captions": len(cluster["captions"]), "text_shape[0]": int(cluster["text_shape"][0]),
           "text_states bytes": len(cluster["text_states"]), "text_mask bytes": len(cluster["text_mask"])}  # fmt: skip
    need = {"captions": n, "text_shape[0]": n, "text_states bytes": 2 * n * t * d, "text_mask bytes": n * t}
    wrong = [f"{k} {got[k]} (need {want})" for k, want in need.items() if got[k] != want]
    if wrong:
        raise ValueError(f"cluster {cid!r}: {n} images but {', '.join(wrong)}: a damaged shard; re-run prepare_data.py")


def build_example(cluster: dict[str, Any], cfg: Config, rng: np.random.Generator, augment: bool = True) -> dict:
    """One training example from one cluster row (see the module docstring for keys and shapes)."""
    check_cluster(cluster, cfg)
    n, max_k = len(cluster["captions"]), cfg.model.max_neighbors
    target = int(rng.integers(0, n))
    k = int(rng.integers(1, min(max_k, n - 1) + 1))
    others = np.delete(np.arange(n), target)
    chosen = rng.permutation(others)[:k]  # never the target
    flips = rng.random(n) < 0.5  # drawn for every member, so the stream of draws does not depend on k
    c = decode_cluster(cluster, cfg.model.image_size, [target, *map(int, chosen)])
    s, (t, d) = cfg.model.image_size, c["text_states"].shape[1:]

    def image(i: int) -> np.ndarray:
        x = c["images"][i]
        if augment and flips[i] and not _SIDED.search(c["captions"][i]):
            x = x[:, :, ::-1]
        return np.ascontiguousarray(x)

    neighbor_images = np.zeros((max_k, 3, s, s), np.float32)
    neighbor_states = np.zeros((max_k, t, d), np.float32)
    neighbor_text_mask = np.zeros((max_k, t), bool)
    neighbor_mask = np.zeros((max_k,), bool)
    for slot, i in enumerate(chosen):
        neighbor_images[slot] = image(int(i))
        neighbor_states[slot] = c["text_states"][i]
        neighbor_text_mask[slot] = c["text_mask"][i]
        neighbor_mask[slot] = True
    return {
        "image": image(target),  # (3, S, S)
        "text_states": c["text_states"][target],  # (T, D)
        "text_mask": c["text_mask"][target],  # (T,)
        "neighbor_images": neighbor_images,  # (K, 3, S, S)
        "neighbor_text_states": neighbor_states,  # (K, T, D)
        "neighbor_text_mask": neighbor_text_mask,  # (K, T)
        "neighbor_mask": neighbor_mask,  # (K,)
    }


def example_rng(seed: int, epoch: int, cluster_id: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, epoch, cluster_id))


@functools.lru_cache(maxsize=4)  # per worker process: drawn once per epoch, not once per map call
def epoch_order(seed: int, epoch: int, num_clusters: int) -> np.ndarray:
    """The clusters' order in one epoch: a permutation of range(num_clusters), fixed by (seed, epoch)."""
    order = np.random.default_rng(derive_seed(seed, "shuffle", epoch)).permutation(num_clusters)
    order.flags.writeable = False  # shared by every caller (cached)
    return order


def _examples(batch: dict[str, np.ndarray], blocks: list, ends: np.ndarray, cfg: Config, seed: int) -> dict:
    """Ray map_batches: example numbers -> examples (stacked BATCH_KEYS arrays).

    Example number i is epoch i // n, place i % n of that epoch's cluster order; `blocks` are the
    materialized cluster blocks (Arrow tables in the object store), `ends` their cumulative row counts.
    """
    import ray

    n, tables, examples = int(ends[-1]), {}, []
    for i in batch["id"].tolist():
        epoch, place = divmod(int(i), n)
        row = int(epoch_order(seed, epoch, n)[place])
        b = int(np.searchsorted(ends, row, side="right"))
        if b not in tables:
            tables[b] = ray.get(blocks[b])
        cluster = tables[b].slice(row - (int(ends[b - 1]) if b else 0), 1).to_pylist()[0]
        examples.append(build_example(cluster, cfg, example_rng(seed, epoch, str(cluster["cluster_id"]))))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _num_rows(table) -> int:
    return table.num_rows


def training_dataset(
    shard_dir: str | Path | Location, cfg: Config, seed: int, num_epochs: int, examples_per_task: int = 512
):
    """A Ray Dataset of training examples: `num_epochs` passes, clusters shuffled per epoch.

    The compact cluster rows (PNG bytes, float16 states) are read once and held in the object
    store; the stream is two operators whatever the number of epochs: example numbers
    (`ray.data.range`) -> examples (`map_batches`), each built from its cluster row, expanded to
    float32 there, streaming. Order is deterministic given `seed`.
    """
    import ray

    if num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}: must be >= 1")
    shard_dir = storage.location(shard_dir)  # a URI resolved once
    files, fs = shard_files(shard_dir), storage.filesystem(shard_dir)
    # Same seed, same order: the cluster rows must keep the files' order, and the examples their
    # numbers' order. Datasets copy the current DataContext when they are created, so set it for their
    # creation and restore it (Ray Train's split replaces the execution options: trainer.ingest_config
    # keeps the order there). Same for the pacing below.
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.custom_execution_callback_classes
    context.execution_options.preserve_order = True
    context.custom_execution_callback_classes = [*saved[1], _PacedScheduling]
    try:
        clusters = ray.data.read_parquet(files, filesystem=fs).materialize()
        schema = clusters.schema()  # None when no file holds a row: the count below says so
        missing = [c for c in ("cluster_id", "images", "captions", "text_encoder", "text_states", "text_mask",
                               "text_shape") if schema is not None and c not in schema.names]  # fmt: skip
        if missing:
            raise ValueError(f"{shard_dir}: the cluster shards have no column {', '.join(missing)}: not mined here?")
        blocks = clusters.to_arrow_refs()
        count = ray.remote(num_cpus=0)(_num_rows)  # counted where the blocks lie, not fetched here
        ends = np.cumsum(ray.get([count.remote(b) for b in blocks]))
        if not len(ends) or ends[-1] == 0:  # (the workers would wait for a first batch for ever)
            raise ValueError(f"{shard_dir}: the cluster shards hold no rows; re-run jobs/prepare_data.py")
        total = num_epochs * int(ends[-1])
        numbers = ray.data.range(total, override_num_blocks=max(1, -(-total // examples_per_task)))
        out = numbers.map_batches(_examples, batch_size=8, fn_kwargs=dict(blocks=blocks, ends=ends, cfg=cfg, seed=seed))
    finally:
        context.execution_options.preserve_order, context.custom_execution_callback_classes = saved
    return out


class _PacedScheduling(ExecutionCallback):
    """Paces Ray Data's scheduling loop: steps at least `interval` s apart, and at most `max_busy` of a core.

    Ray 2.60's streaming executor waits (`ray.wait`, up to 0.1 s) only while some task runs. When the
    stream is ahead of the trainer, every operator is backpressured, no task runs, and the loop spins.
    Once the examples buffered ahead of the trainer fill Ray Data's share of the object store
    (measured: 2000- and 3000-step cpu-preset runs; 300 steps with a 300 MB store) the loop took
    70-92 % of a core from the trainer. The interval is the executor's own wait while a task runs.
    The cap on the loop's CPU time is for costly steps (a step walks the blocks queued at the input,
    one per `examples_per_task` examples): after a step that took c seconds of the loop thread's CPU,
    a pause of c * (1/max_busy - 1), at most `max_pause`. A step that mostly waited on tasks uses little
    CPU, so a stream that is behind the trainer is barely delayed. Measured without the cap, a cpu-preset
    stream of 96 epochs read at 16 examples/s: the driver took 0.04 of a core at 512 examples per task,
    0.08 at 64; the stream this one replaced (a shuffle and a map per epoch) took 0.53.
    """

    interval = 0.1
    max_busy = 0.1
    max_pause = 1.0

    def __init__(self):
        self._wall: float | None = None  # when the last pause ended
        self._cpu = 0.0  # the executor thread's CPU time then

    def on_execution_step(self, executor) -> None:
        if self._wall is not None:  # (the first step may hold the executor's start-up work: not paced)
            step_cpu = time.thread_time() - self._cpu
            wait = max(self._wall + self.interval - time.perf_counter(), step_cpu * (1 / self.max_busy - 1))
            if wait > 0:
                time.sleep(min(wait, self.max_pause))
        self._wall, self._cpu = time.perf_counter(), time.thread_time()


def cluster_grid(shard_dir: str | Path, num_clusters: int = 8, max_members: int = 8, cell: int = 64,
                 seed: int = 0) -> Image.Image:  # fmt: skip
    """A picture of mined clusters: one row per cluster (randomly chosen), its members left to right."""
    clusters = load_clusters(shard_dir)
    rng = np.random.default_rng(seed)
    chosen = [clusters[i] for i in sorted(rng.choice(len(clusters), min(num_clusters, len(clusters)), replace=False))]
    grid = Image.new("RGB", (cell * max_members, cell * len(chosen)), (255, 255, 255))
    for row, c in enumerate(chosen):
        for col, b in enumerate(c["images"][:max_members]):
            img = Image.open(io.BytesIO(b)).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(img, (col * cell, row * cell))
    return grid
