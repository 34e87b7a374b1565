"""Load test of the serving application, on loopback only: latency, throughput, batching, autoscaling.

Starts its own local Ray + Serve (its own temp dir, a free port on 127.0.0.1) on a
`debug` pipeline it creates (or `--model-uri`), then:

1. batching on vs off: two applications live side by side, `/on` (max_batch_size
   `--max-batch-size`) and `/off` (max_batch_size 1), one replica each; at each
   concurrency they are measured one after the other (the idle one costs nothing), so a
   shared machine's changing load hits both alike. Each measurement: `--requests`
   requests (or `--phase-s` seconds, whichever comes first) of one subject with distinct
   seeds; p50/p95/p99 latency, requests/s, images/s, errors, mean rows per pipeline call.
2. autoscaling 1 -> 2 -> 1: load at `--scale-concurrency` until the second replica
   runs (at most `--scale-load-s`), then idle until the deployment is back to one
   replica (at most `--scale-idle-s`); replica counts are sampled from `serve.status()`.

Every loop is bounded in count and time, and only 127.0.0.1 is contacted. Prints a
summary and writes everything as JSON (`--out`).

    PYTHONPATH=platform:. python -m serving.loadtest --out bench/results/serving_loadtest.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform as stdlib_platform
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subject_photos(k: int = 2, size: int = 64, seed: int = 0) -> list[str]:
    """`k` random PNGs (base64) of one made-up subject; another seed, another subject."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def run_load(
    url: str, body: dict[str, Any], concurrency: int, max_requests: int, max_seconds: float, seed0: int
) -> dict[str, Any]:
    """`concurrency` closed-loop clients share a budget of `max_requests` and a deadline."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    rows: list[int] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max(60.0, max_seconds)) as http:
            while time.perf_counter() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                    seed = seed0 + issued[0]
                t = time.perf_counter()
                try:
                    r = http.post("/v1/generate", json={**body, "seed": seed})
                    ok = r.status_code == 200
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    ok, key = False, type(e).__name__
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - t)
                        rows.append(r.json()["batch_rows"])
                    else:
                        errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    n = len(latencies)
    return {
        "concurrency": concurrency,
        "requests_ok": n,
        "errors": errors,
        "wall_s": round(wall, 2),
        "throughput_rps": round(n / wall, 3),
        "images_per_s": round(n * body.get("num_images", 1) / wall, 3),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 1) if n else None,
        "p95_ms": round(percentile(latencies, 95) * 1e3, 1) if n else None,
        "p99_ms": round(percentile(latencies, 99) * 1e3, 1) if n else None,
        "mean_rows_per_call": round(float(np.mean(rows)), 2) if rows else None,
        "latencies_ms": [round(x * 1e3, 1) for x in latencies],
    }


def deploy(cfg: Any, overrides: dict[str, str], name: str, route: str, url: str) -> str:
    """Run the serving application for `cfg` + `overrides` as Serve app `name` at `route`; returns its URL."""
    from ray import serve

    from neighbor_diffusion.config import override
    from serving.app import build_app

    serve.run(build_app(override(cfg, overrides)), name=name, route_prefix=route)
    return url + route.rstrip("/")


def deploy_batching_pair(cfg: Any, base: dict[str, str], url: str, max_batch_size: int) -> dict[str, str]:
    """`/on` (batches of up to `max_batch_size`) and `/off` (max_batch_size 1), one replica each."""
    fixed = {**base, "serve.min_replicas": "1", "serve.max_replicas": "1"}
    return {
        "on": deploy(cfg, {**fixed, "serve.max_batch_size": str(max_batch_size)}, "batch-on", "/on", url),
        "off": deploy(cfg, {**fixed, "serve.max_batch_size": "1"}, "batch-off", "/off", url),
    }


def compare_batching(
    urls: dict[str, str],
    body: dict[str, Any],
    levels: list[int],
    requests: int,
    phase_s: float,
    warmup: bool = True,
    reverse: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """At each concurrency, each mode in turn (the idle one costs nothing; `reverse`: the other order), after a
    warm-up that fills the cache."""
    results: dict[str, list[dict[str, Any]]] = {}
    for mode, u in urls.items():
        if warmup:
            run_load(u, body, 2, 2, 30.0, seed0=10**6)  # first calls, cache fill
        results[mode] = []
    order = list(urls.items())[::-1] if reverse else list(urls.items())
    for c in levels:
        for mode, u in order:
            r = run_load(u, body, c, requests, phase_s, seed0=c * 1000)
            results[mode].append(r)
            shown = {k: v for k, v in r.items() if k != "latencies_ms"}
            print(f"batching {mode:3s} c={c:2d}: {json.dumps(shown)}", flush=True)
    return results


def throughput_ratios(batching: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """requests/s with batching on / off, by concurrency."""
    return {
        str(on["concurrency"]): round(on["throughput_rps"] / off["throughput_rps"], 2)
        for on, off in zip(batching["on"], batching["off"])
        if off["throughput_rps"]
    }


def replicas(app: str, deployment: str = "NeighborDiffusionModel") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m serving.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-uri", default="", help="pipeline folder or models:/...; default: a fresh debug pipeline")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=24, help="per concurrency level and mode")
    p.add_argument("--phase-s", type=float, default=60.0, help="time cap per concurrency level and mode")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--scale-concurrency", type=int, default=8)
    p.add_argument("--scale-load-s", type=float, default=60.0)
    p.add_argument("--scale-idle-s", type=float, default=60.0)
    p.add_argument("--skip-autoscaling", action="store_true")
    p.add_argument("--out", default="bench/results/serving_loadtest.json")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from neighbor_diffusion.config import debug
    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline
    from serving.app import export_pythonpath

    work = Path(tempfile.mkdtemp(prefix="ndlt"))
    model_uri = args.model_uri
    if not model_uri:
        model_uri = str(work / "pipeline")
        NeighborDiffusionPipeline.from_config(debug()).save_pretrained(model_uri)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    levels = [int(c) for c in args.concurrency.split(",")]
    base = {
        "serve.model_uri": model_uri,
        "serve.port": str(port),
        "serve.max_ongoing_requests": str(max(16, 2 * args.max_batch_size)),
        "serve.max_queued_requests": "128",  # latency, not rejection, is measured here
        "serve.batch_wait_timeout_s": "0.05",
        "serve.max_steps": str(max(100, args.steps)),
    }
    body = {"prompt": "a photo of the toy on the beach", "neighbor_images": subject_photos(), "steps": args.steps}
    body["num_images"] = args.num_images
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": stdlib_platform.python_version(), "host": "127.0.0.1"},
        "settings": {k: v for k, v in vars(args).items()},
        "batching": {},
    }

    export_pythonpath()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        # 1. batching on vs off, one replica each, measured alternately
        urls = deploy_batching_pair(debug(), base, url, args.max_batch_size)
        results["batching"] = compare_batching(urls, body, levels, args.requests, args.phase_s)
        results["batching_throughput_ratio_on_over_off"] = throughput_ratios(results["batching"])
        serve.delete("batch-on")
        serve.delete("batch-off")

        # 2. autoscaling 1 -> 2 -> 1
        if not args.skip_autoscaling:
            scale_url = deploy(
                debug(),
                {
                    **base,
                    "serve.min_replicas": "1",
                    "serve.max_replicas": "2",
                    "serve.max_batch_size": str(args.max_batch_size),
                    "serve.target_ongoing_requests": "2",
                    "serve.upscale_delay_s": "1",
                    "serve.downscale_delay_s": "5",
                },
                "autoscale",
                "/",
                url,
            )
            results["autoscaling"] = autoscale(scale_url, body, "autoscale", args)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print("\nbatching throughput ratio on/off by concurrency:", results["batching_throughput_ratio_on_over_off"])
    if "autoscaling" in results:
        a = results["autoscaling"]
        print(
            f"autoscaling: max replicas {a['max_replicas_seen']}, 1->2 after {a['scaled_up_after_s']} s of load, "
            f"2->1 after {a['scaled_down_after_s']} s idle"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


def autoscale(url: str, body: dict[str, Any], app: str, args: argparse.Namespace) -> dict[str, Any]:
    timeline: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def watch() -> None:
        while not stop.is_set():
            timeline.append((round(time.perf_counter() - t0, 1), replicas(app)))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    up_at: list[float] = []
    load_stats: list[dict[str, Any]] = []
    # load in short rounds until the second replica has run for a while (bounded by scale_load_s)
    while time.perf_counter() - t0 < args.scale_load_s:
        load_stats.append(run_load(url, body, args.scale_concurrency, 10**6, 5.0, seed0=len(load_stats) * 10**4))
        if timeline and timeline[-1][1] >= 2:
            if not up_at:
                up_at.append(next(t for t, n in timeline if n >= 2))
            elif time.perf_counter() - t0 - up_at[0] > 10:
                break
    load_end = time.perf_counter() - t0
    while time.perf_counter() - t0 < load_end + args.scale_idle_s:
        time.sleep(1.0)
        if timeline and timeline[-1][0] > load_end and timeline[-1][1] == 1:
            break
    stop.set()
    watcher.join()
    down = [t for t, n in timeline if t > load_end and n == 1]
    for s in load_stats:
        shown = {k: v for k, v in s.items() if k != "latencies_ms"}
        print(f"autoscaling load round: {json.dumps(shown)}", flush=True)
    return {
        "max_replicas_seen": max(n for _, n in timeline),
        "scaled_up_after_s": up_at[0] if up_at else None,
        "load_s": round(load_end, 1),
        "scaled_down_after_s": round(down[0] - load_end, 1) if down else None,
        "timeline": timeline,
        "load_rounds": load_stats,
    }


if __name__ == "__main__":
    main()
