"""The benchmark suite of issue #7: the platform's speed as ratios against the limit, measured in one run.

    python bench/run.py                         # all, cpu preset (make bench)
    python bench/run.py neighbor_cost serving   # some
    python bench/run.py --quick --preset debug  # tiny counts: a smoke test of the harness
    python bench/run.py --set train.use_gpu=true  # on a GPU machine: training on the GPU too

Each benchmark writes bench/results/<name>.json (the numbers, method, command, config,
machine facts) and prints its headline ratio and goal on its last line; the run ends by
writing bench/results/SUMMARY.md, a table of every ratio against its goal.

    pipeline_overhead  1. full training path (Ray Data -> Ray Train -> DeepSpeed) vs a bare loop
    scaling            2. samples/s with 1 vs 2 workers
    zero_memory        2. model + optimizer bytes per worker, ZeRO 0/1/2/3, 2 workers
    neighbor_cost      3. per-step time with K cached neighbors vs text-only, cached vs recomputed
    guidance_cost      4. batched guided forward vs separate forwards
    serving            5. batching on vs off at concurrency 8, p50/p99, neighbor-cache hit vs miss
    gpu_mfu            6. MFU of the gpu-base bf16 training step (GPU only; else skipped)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:
    # `python bench/run.py` puts bench/ first on sys.path; the repo root must come first instead (bench/serving.py
    # would shadow the `serving` package), then the package folder.
    sys.path[:] = [str(ROOT), str(ROOT / "platform")] + [
        p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"
    ]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

BENCHMARKS = {
    "pipeline_overhead": ("bench.training", "pipeline_overhead"),
    "scaling": ("bench.training", "scaling"),
    "zero_memory": ("bench.training", "zero_memory"),
    "neighbor_cost": ("bench.sampling", "neighbor_cost"),
    "guidance_cost": ("bench.sampling", "guidance_cost"),
    "serving": ("bench.serving", "serving"),
    "gpu_mfu": ("bench.gpu", "gpu_mfu"),
}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    import importlib

    p = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("benchmarks", nargs="*", metavar="NAME", help=f"default: all ({', '.join(BENCHMARKS)})")
    p.add_argument("--preset", default="cpu", help="config preset (default: cpu)")
    p.add_argument("--quick", action="store_true", help="tiny counts: checks the harness, not the speed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override, e.g. --set train.use_gpu=true (repeatable)",
    )
    p.add_argument(
        "--data-root",
        default=str(ROOT / "bench" / "data"),
        help="mined shards at <data-root>/<preset>/ (generated there when missing)",
    )
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (Ray logs, runs) and say where")
    p.add_argument("--peak-tflops", type=float, default=None, help="gpu_mfu: the device's dense bf16 peak")
    args = p.parse_args(argv)
    names = args.benchmarks or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    from bench.common import context, write_report, write_summary
    from neighbor_diffusion.config import override, preset

    overrides = dict(a.split("=", 1) for a in args.set if "=" in a)
    if len(overrides) != len(args.set):
        p.error("--set takes SECTION.FIELD=VALUE")
    cfg = override(preset(args.preset), overrides)
    results = Path(args.results)
    out: dict[str, dict] = {}
    failed = []
    with context(cfg, args.quick, Path(args.data_root).resolve(), results, command.strip(), args.keep_work) as ctx:
        ctx.peak_tflops = args.peak_tflops
        for name in names:
            module, fn = BENCHMARKS[name]
            (results / f"{name}.json").unlink(missing_ok=True)  # no stale numbers if this one fails
            print(f"\n=== {name} ({args.preset}{', quick' if args.quick else ''})", flush=True)
            started = time.perf_counter()
            try:
                report = getattr(importlib.import_module(module), fn)(ctx)
            except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' numbers
                traceback.print_exc()
                failed.append(name)
                print(f"{name}: FAILED (see the traceback above)", flush=True)
                continue
            out[name] = write_report(ctx, name, report, started)
    summary = write_summary(results, list(BENCHMARKS))
    print(f"\n{summary.read_text()}\nwrote {results}/<benchmark>.json and {summary}", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return out


if __name__ == "__main__":
    main()
