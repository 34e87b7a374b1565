"""Benchmark 5 of issue #7: serving throughput with batching on vs off, latency, neighbor-cache hit vs miss.

Reuses `serving.loadtest`: the same two applications side by side (`/on` batches up to
`serve.max_batch_size` requests, `/off` has max_batch_size 1; one replica each, the
preset's ServeConfig otherwise), the same closed-loop clients, each mode measured in
turn after a warm-up, in rounds ordered on-off, off-on, pooled per mode. The model is a
freshly initialised pipeline of the preset (the sampling work does not depend on the weights).

Ceiling: the same pipeline in this process, with the replica's torch threads, making
`max_batch_size` one-row `generate` calls vs one call of that many rows: what batching
can gain at most, before HTTP, queueing and per-request work dilute it.

Cache: the model deployment keeps neighbor features in an LRU keyed by the content hash
of the neighbor set (`FeatureCache` in serving/app.py). Sequential requests alternate a
subject already seen (hit: no encoding) with a new one (miss: decode + caption encoding +
`encode_neighbor_set`); they go to `/off`, where a lone request never waits for batch-mates.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from bench.common import Context, Ratio, Report, interleaved, median, summary, torch_threads


def cache_hit_vs_miss(url: str, body: dict[str, Any], rounds: int, k: int) -> dict[str, Any]:
    import httpx

    from serving.loadtest import subject_photos

    out: dict[str, dict[str, list[float]]] = {m: {"latency_s": [], "neighbor_encode_ms": []} for m in ("hit", "miss")}
    wrong = 0
    with httpx.Client(base_url=url, timeout=300) as http:
        for i in range(rounds):
            for mode in ("hit", "miss") if i % 2 == 0 else ("miss", "hit"):
                photos = body["neighbor_images"] if mode == "hit" else subject_photos(k, seed=10_000 + i)
                t = time.perf_counter()
                r = http.post("/v1/generate", json={**body, "neighbor_images": photos, "seed": i})
                latency = time.perf_counter() - t
                r.raise_for_status()
                answer = r.json()
                wrong += answer["cache_hit"] != (mode == "hit")
                out[mode]["latency_s"].append(latency)
                out[mode]["neighbor_encode_ms"].append(answer["timings_ms"]["neighbor_encode"])
    return {
        **{
            m: {
                "p50_latency_ms": round(median(v["latency_s"]) * 1e3, 1),
                "median_neighbor_encode_ms": round(median(v["neighbor_encode_ms"]), 2),
                "n": len(v["latency_s"]),
            }
            for m, v in out.items()
        },
        "requests_with_unexpected_cache_result": wrong,
    }


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's load rounds (serving.loadtest.run_load results) as one measurement."""
    from serving.loadtest import percentile

    ok = sum(r["requests_ok"] for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    lat = [x for r in rounds for x in r["latencies_ms"]]
    errors: dict[str, int] = {}
    for r in rounds:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "concurrency": rounds[0]["concurrency"],
        "requests_ok": ok,
        "errors": errors,
        "wall_s": round(wall, 2),
        "throughput_rps": round(ok / wall, 3) if wall else 0.0,
        **{f"p{q}_ms": round(percentile(lat, q), 1) if lat else None for q in (50, 95, 99)},
        "mean_rows_per_call": round(sum((r["mean_rows_per_call"] or 0) * r["requests_ok"] for r in rounds) / ok, 2)
        if ok
        else None,
        "rounds": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in rounds],
    }


def model_level_batching(model_uri: str, rows: int, k: int, threads: int, quick: bool) -> dict[str, Any]:
    """Seconds of `rows` one-row `pipeline.generate` calls vs one call of `rows` rows, in this process with the
    replica's torch threads: the most that batching can gain before any HTTP, queueing or encoding."""
    import torch

    from neighbor_diffusion.data.images import decode_image
    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline
    from serving.loadtest import subject_photos

    pipe = NeighborDiffusionPipeline.from_pretrained(model_uri, device="cuda" if torch.cuda.is_available() else "cpu")
    images = [decode_image(base64.b64decode(p), f"photo[{i}]") for i, p in enumerate(subject_photos(k))]
    steps = 2 if quick else 10
    with torch_threads(threads):
        feats = pipe.encode_neighbor_set(images)

        def call(n: int):
            prompts, seeds = ["a photo of the toy on the beach"] * n, list(range(n))
            return lambda: pipe.generate(prompts, feats.repeat(n), seeds, num_inference_steps=steps)

        one_row, batched = call(1), call(rows)
        fns = {"one_row_calls": lambda: [one_row() for _ in range(rows)], "one_batched_call": batched}
        times = interleaved(fns, repeats=1 if quick else 3, warmup=1)
    return {
        "rows": rows,
        "steps": steps,
        "torch_threads": threads,
        "seconds": {name: summary(v) for name, v in times.items()},
        "ratio": round(median(times["one_row_calls"]) / median(times["one_batched_call"]), 3),
    }


def serving(ctx: Context) -> Report:
    import torch
    from ray import serve

    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline
    from serving import loadtest as L

    cfg = ctx.cfg
    ctx.ray()
    model_uri = str(ctx.work / "pipeline")
    NeighborDiffusionPipeline.from_config(cfg, device="cpu").save_pretrained(model_uri)
    port = L.free_port()
    url = f"http://127.0.0.1:{port}"
    concurrency = 8
    steps = 2 if ctx.quick else cfg.diffusion.num_inference_steps
    requests, n_rounds = (8, 2) if ctx.quick else (32, 2)
    max_batch = cfg.serve.max_batch_size
    threads = max(1, round(cfg.serve.num_cpus))  # what a replica sets
    base = {
        "serve.model_uri": model_uri,
        "serve.port": str(port),
        "serve.max_ongoing_requests": str(max(cfg.serve.max_ongoing_requests, concurrency)),
        "serve.max_queued_requests": "128",  # latency, not rejection, is measured here
    }
    if torch.cuda.device_count() == 1 and cfg.serve.num_gpus < 0:
        base["serve.num_gpus"] = "0.5"  # the on and off replicas live side by side on the one GPU
    K = min(2, cfg.model.max_neighbors)
    body = {
        "prompt": "a photo of the toy on the beach",
        "neighbor_images": L.subject_photos(K),
        "steps": steps,
        "num_images": 1,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        urls = L.deploy_batching_pair(cfg, base, url, max_batch)
        # rounds in A B | B A order, so that a drifting load on a shared machine hits both modes alike
        rounds = [
            L.compare_batching(
                urls,
                body,
                [concurrency],
                requests // n_rounds,
                phase_s=60.0 if ctx.quick else 120.0,
                warmup=r == 0,
                reverse=r % 2 == 1,
            )
            for r in range(n_rounds)
        ]
        cache = cache_hit_vs_miss(urls["off"], body, rounds=2 if ctx.quick else 6, k=K)
    finally:
        for app in ("batch-on", "batch-off"):
            try:
                serve.delete(app)
            except Exception:  # noqa: BLE001 - already gone
                pass
    ceiling = model_level_batching(model_uri, max_batch, K, threads, ctx.quick)  # replicas gone: machine idle
    on, off = (pooled([r[mode][0] for r in rounds]) for mode in ("on", "off"))
    gpu = torch.cuda.is_available()
    goal = 2.0 if gpu else 1.3
    ratio = on["throughput_rps"] / off["throughput_rps"] if off["throughput_rps"] else None
    return Report(
        ratios=[
            Ratio(
                f"requests/s at concurrency {concurrency}: batching on / off",
                round(ratio, 3) if ratio else None,
                ">=",
                goal,
                note=f"max_batch_size {max_batch}, {'GPU' if gpu else 'CPU'} goal",
            ),
            Ratio("p50 latency on / off", round(on["p50_ms"] / off["p50_ms"], 3) if on["p50_ms"] else None),
            Ratio("p99 latency on / off", round(on["p99_ms"] / off["p99_ms"], 3) if on["p99_ms"] else None),
            Ratio(
                f"model-level ceiling: {max_batch} generate calls of 1 row / 1 call of {max_batch} rows",
                ceiling["ratio"],
                note="in process, the replica's threads: what batching can gain before any serving overhead",
            ),
            Ratio(
                "p50 latency, cache miss / hit (concurrency 1)",
                round(cache["miss"]["p50_latency_ms"] / cache["hit"]["p50_latency_ms"], 3),
            ),
        ],
        measured={
            "concurrency": concurrency,
            "steps_per_request": steps,
            "neighbors_per_request": K,
            "max_batch_size_on": max_batch,
            "batching_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
            "replica_torch_threads": threads,
            "device": "cuda" if gpu else "cpu",
            "on": on,
            "off": off,
            "cache": cache,
            "model_level_batching": ceiling,
        },
        method=__doc__.split("\n\n", 1)[1].replace("\n", " "),
        config={"serve": cfg.serve.__dict__, "model": cfg.model.__dict__, "overrides": base},
    )
