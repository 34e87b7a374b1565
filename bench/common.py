"""What every benchmark shares: the context it runs in, ratios with goals, timing, results files.

A benchmark is a function `run(ctx) -> Report`. It measures both sides of each ratio in
the same process, interleaved where it can, with warm-up excluded and repeats reduced
to their median, and returns every number it measured. `write_report` adds the facts a
reader needs to trust a number (machine, versions, threads, load, command, config, date).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform as stdlib_platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neighbor_diffusion.config import Config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Ratio:
    """One measured ratio and its goal, e.g. Ratio("cached / text-only", 1.08, "<=", 1.25)."""

    name: str
    value: float | None
    op: str | None = None  # ">=" or "<=" ; None: reported without a goal
    goal: float | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.op is None or self.value is None or not math.isfinite(self.value):
            return None
        return self.value >= self.goal if self.op == ">=" else self.value <= self.goal

    def goal_text(self) -> str:
        return f"goal {self.op} {self.goal:g}" if self.op else "no goal in #7"

    def line(self, benchmark: str) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.3g}"
        return f"{benchmark}: {shown} ({self.goal_text()}){f'  [{self.name}]' if self.name else ''}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "goal": self.goal,
            "met": self.met,
            "note": self.note,
        }


@dataclass
class Report:
    """What a benchmark returns: its headline ratio first, then the others, the numbers and the method."""

    ratios: list[Ratio]
    measured: dict[str, Any]
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class Context:
    """Everything a benchmark needs: config, mode, where to work, the shared local Ray (started on demand)."""

    cfg: Config
    quick: bool
    work: Path  # scratch, deleted at the end
    data_root: Path
    results: Path
    command: str
    started: str = field(default_factory=lambda: _now())  # identifies this invocation in SUMMARY.md
    peak_tflops: float | None = None  # gpu_mfu: overrides the device table
    train_runs: dict[str, Any] = field(default_factory=dict)  # training runs shared by benchmarks, by config
    _ray_started: bool = False

    def data_dir(self) -> Path:
        """Mined cluster shards for this preset, generated into `data_root` the first time (jobs/prepare_data.py)."""
        from neighbor_diffusion.config import override
        from neighbor_diffusion.data.mining import layout

        cfg = override(self.cfg, {"data.root": str(self.data_root)})
        paths = layout(cfg)
        if not paths["manifest"].is_file():
            print(f"[bench] no mined data at {paths['base']}: running jobs/prepare_data.py (once)", flush=True)
            env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(self.work / "prep")}
            (self.work / "prep").mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "jobs/prepare_data.py", "--preset", cfg.preset, "--data.root", str(self.data_root)]
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return paths["base"]

    def ray(self):
        """The one local Ray of this run: its own temp dir, `cores + 2` logical CPUs as the training driver
        starts it (room for Ray Data beside the workers), no dashboard, worker logs kept out of our output."""
        import ray

        if not self._ray_started:
            from ray.data import DataContext

            from serving.app import export_pythonpath

            export_pythonpath()  # workers import neighbor_diffusion and serving from this checkout
            num_cpus = self.cfg.train.ray_cpus or (os.cpu_count() or 2) + 2
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=str(self.work / "ray"),
            )
            DataContext.get_current().enable_progress_bars = False
            self._ray_started = True
        return ray

    def close(self) -> None:
        if self._ray_started:
            import ray

            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
            ray.shutdown()
            self._ray_started = False


@contextlib.contextmanager
def context(
    cfg: Config, quick: bool, data_root: Path, results: Path, command: str, keep_work: bool = False
) -> Iterator[Context]:
    # short path: Ray's unix sockets live under it (107-character limit)
    work = Path(tempfile.mkdtemp(prefix="ndb", dir="/tmp" if os.path.isdir("/tmp") else None))
    ctx = Context(cfg, quick, work, data_root, results, command)
    # the bench's own MLflow store: training runs log their per-window metrics there, not in ./mlflow.db
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    try:
        yield ctx
    finally:
        ctx.close()
        if keep_work:
            print(f"[bench] kept the scratch folder {work} (Ray logs under ray/session_*/logs)", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


# ---------------------------------------------------------------------------- timing


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run with `n` intra-op threads (both sides of a ratio get the same), then restore the previous count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved)


def cuda_sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured in rounds (each round calls every fn once, in a rotating
    order), so that a shared machine's changing load hits every side alike. `warmup` rounds are discarded."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            cuda_sync()
            t = time.perf_counter()
            fns[n]()
            cuda_sync()
            if r >= warmup:
                times[n].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summary(xs: list[float], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    """median / min / max / n of a list of timings (times `scale`, e.g. 1e3 for ms)."""
    return {
        "median": round(median(xs) * scale, digits),
        "min": round(min(xs) * scale, digits),
        "max": round(max(xs) * scale, digits),
        "n": len(xs),
    }


# ---------------------------------------------------------------------------- facts and files


def synthetic_batch(cfg: Config, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch of the preset's shapes (`batch_size` rows), every neighbor slot real (the most
    neighbor work), plus `x_T`, a starting noise for sampling."""
    from neighbor_diffusion.text import text_encoder_dim

    g = torch.Generator().manual_seed(seed)
    B, K, T, S = cfg.train.batch_size, cfg.model.max_neighbors, cfg.text.max_length, cfg.model.image_size
    D = text_encoder_dim(cfg.text.encoder)
    text_mask = torch.arange(T)[None].expand(B, T) < max(2, T // 2)
    batch = {
        "image": torch.rand(B, 3, S, S, generator=g) * 2 - 1,
        "text_states": torch.randn(B, T, D, generator=g),
        "text_mask": text_mask,
        "neighbor_images": torch.rand(B, K, 3, S, S, generator=g) * 2 - 1,
        "neighbor_text_states": torch.randn(B, K, T, D, generator=g),
        "neighbor_text_mask": text_mask[:, None].expand(B, K, T).clone(),
        "neighbor_mask": torch.ones(B, K, dtype=torch.bool),
        "x_T": torch.randn(B, 3, S, S, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def machine_facts() -> dict[str, Any]:
    import deepspeed
    import diffusers
    import ray
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_threads_default": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": stdlib_platform.python_version(),
        "os": f"{stdlib_platform.system()} {stdlib_platform.release()} {stdlib_platform.machine()}",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "deepspeed": deepspeed.__version__,
        "diffusers": diffusers.__version__,
        "cuda_device": cuda,
    }


def git_commit() -> str:
    from neighbor_diffusion.tracking import git_commit as commit

    return commit(ROOT)


def write_report(ctx: Context, name: str, report: Report, started: float) -> dict[str, Any]:
    """bench/results/<name>.json; prints every ratio, the headline last."""
    out = {
        "benchmark": name,
        "skipped": report.skipped,
        "headline": report.ratios[0].to_dict() if report.ratios else None,
        "ratios": [r.to_dict() for r in report.ratios],
        "measured": report.measured,
        "method": report.method,
        "quick": ctx.quick,
        "preset": ctx.cfg.preset,
        "command": ctx.command,
        "config": report.config,
        "machine": machine_facts(),
        "git_commit": git_commit(),
        "date": _now(),
        "run_started": ctx.started,
        "duration_s": round(time.perf_counter() - started, 1),
    }
    ctx.results.mkdir(parents=True, exist_ok=True)
    (ctx.results / f"{name}.json").write_text(json.dumps(out, indent=2, default=_jsonable))
    for r in report.ratios[1:]:
        print(r.line(name), flush=True)
    if report.skipped:
        goal = report.ratios[0].goal_text() if report.ratios else ""
        print(f"{name}: skipped: {report.skipped}{f' ({goal})' if goal else ''}", flush=True)
    else:
        print(report.ratios[0].line(name), flush=True)
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_summary(results: Path, names: list[str]) -> Path:
    """bench/results/SUMMARY.md: one row per ratio of every benchmark that has a results file (the headline
    first), with the run it came from."""
    rows = ["| benchmark | ratio | value | goal | met | run |", "| --- | --- | --- | --- | --- | --- |"]
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        run = runs.setdefault(
            f"{r.get('run_started', r['date'])} `{r['command']}`", {"n": len(runs) + 1, "machine": r["machine"]}
        )["n"]
        if r["skipped"]:
            rows.append(
                f"| {name} | {r['ratios'][0]['name'] if r['ratios'] else ''} | skipped: {r['skipped']} | | | {run} |"
            )
        for i, ratio in enumerate(r["ratios"] if not r["skipped"] else []):
            value = "n/a" if ratio["value"] is None else f"{ratio['value']:.3g}"
            goal = f"{ratio['op']} {ratio['goal']:g}" if ratio["op"] else "(none)"
            met = {True: "yes", False: "**no**", None: ""}[ratio["met"]]
            label = f"**{ratio['name']}**" if i == 0 else ratio["name"]
            rows.append(f"| {name if i == 0 else ''} | {label} | {value} | {goal} | {met} | {run} |")
    lines = [
        "# Benchmark summary",
        "",
        "Each ratio's two sides are measured in the same run (interleaved where feasible, warm-up excluded, "
        "medians of repeats); methods and raw numbers are in `<benchmark>.json`. Headline ratios in bold.",
        "",
        *rows,
        "",
        "Runs:",
        "",
    ]
    for label, run in runs.items():
        m = run["machine"]
        lines.append(
            f"{run['n']}. {label}: {m['cpu_count']} CPUs (load average {m['load_average_1_5_15']}), "
            f"CUDA device: {m['cuda_device'] or 'none'}; torch {m['torch']}, ray {m['ray']}, deepspeed {m['deepspeed']}"
        )
    path = results / "SUMMARY.md"
    results.mkdir(parents=True, exist_ok=True)  # a run whose every benchmark failed has written nothing yet
    path.write_text("\n".join(lines) + "\n")
    return path
