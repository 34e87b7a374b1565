"""Evaluate a trained model on the subject-world benchmark, beside its baselines.

    python jobs/evaluate.py --model runs/neighbor-diffusion/pipeline --quick      # ~2 min on 2 CPU cores
    python jobs/evaluate.py --model models:/neighbor-diffusion@candidate --dreambooth
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/evaluate.py --model ...

Held-out subjects, K demonstrations each, prompts that ask for contexts (including
combinations unseen in training) -> the neighbor model, the text-only baseline (and,
with --dreambooth, per-subject fine-tuning as Ray tasks) -> identity, text fidelity,
copy rate, adaptation seconds per subject -> MLflow (metrics, table, sample grid) and
results.json / results.md in --out (a folder, or a URI such as s3://bucket/eval). The
metrics are validated on renders first (--validate N queries) and those numbers are
logged with the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # for `ray job submit --working-dir .`

from neighbor_diffusion import tracking  # noqa: E402
from neighbor_diffusion.config import GUIDANCE_MODES, SAMPLERS, ConfigError, cli_errors, sampling_ranges  # noqa: E402
from neighbor_diffusion.data import storage  # noqa: E402
from neighbor_diffusion.evaluation import baselines, benchmark, metrics, runner  # noqa: E402

EXPERIMENT = "neighbor-diffusion-eval"
# preset -> benchmark size: (subjects, prompts per subject, sampling steps, validation queries)
PRESET_SIZES = {"debug": (2, 2, 5, 0), "cpu": (8, 4, None, 60)}
QUICK = (4, 2, 20, 0)


def _count(minimum: int):
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{raw}: must be >= {minimum}")
        return value

    parse.__name__ = "int"  # argparse's message: "invalid int value"
    return parse


def _check_sampling(args: argparse.Namespace, ranges: dict) -> None:
    """The sampling flags given, against `config.sampling_ranges` (a NaN is in no range)."""
    flags = {"num_inference_steps": "steps"}
    for name, allowed in ranges.items():
        flag = flags.get(name, name)
        value = getattr(args, flag)
        if value is not None and value not in allowed:
            raise ConfigError(f"--{flag.replace('_', '-')}={value!r}: must be {allowed}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a folder")
    p.add_argument("--preset", default="", help="benchmark size (debug, cpu, ...); default: the model's preset")
    p.add_argument("--quick", action="store_true", help="4 subjects x 2 prompts, 20 steps, no validation")
    p.add_argument("--subjects", type=_count(1), default=None, help="held-out subjects (default: by preset)")
    p.add_argument("--prompts", type=_count(1), default=None, help="prompts per subject (default: by preset)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: by preset / the model)")
    p.add_argument("--text-guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--neighbor-guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default=None, help="default: the model's")
    p.add_argument("--interleave-ratio", type=float, default=None, help="default: the model's")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the model's")
    p.add_argument("--text-only-model", default="", help="a model trained with neighbors always dropped")
    p.add_argument(
        "--dreambooth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the fine-tuning baseline (default: on, off with --quick)",
    )
    p.add_argument("--dreambooth-steps", type=_count(1), default=200)
    p.add_argument("--validate", type=_count(0), default=None, help="metric validation queries on renders (0: skip)")
    p.add_argument("--workers", type=_count(0), default=0, help="generation actors (0: the cluster's CPUs, max 8)")
    p.add_argument("--dreambench", default="", help="a DreamBench-format folder: adds DINO / CLIP-I / CLIP-T")
    p.add_argument("--embedder", action="append", default=[], help="local CLIP or DINO folder (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="report folder or URI, e.g. s3://bucket/eval (default: runs/eval/<time>)")
    p.add_argument("--no-mlflow", action="store_true")
    return p


def main(argv: list[str] | None = None) -> runner.EvalResult:
    p = parser()
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    # every path checked before the benchmark starts, not after it
    with cli_errors(p, (ConfigError, FileNotFoundError)):
        model_dir = str(tracking.resolve_pipeline_dir(args.model, field="--model"))
        # a registered version (pinned now: an alias may move on while the benchmark runs) gets the scores too
        version, model_id = tracking.model_version(args.model) or (None, None)
        text_only_dir = (
            str(tracking.resolve_pipeline_dir(args.text_only_model, field="--text-only-model"))
            if args.text_only_model
            else ""
        )
        model_cfg = runner.load_config(model_dir)
        for cfg in (model_cfg, runner.load_config(text_only_dir)) if text_only_dir else (model_cfg,):
            _check_sampling(args, sampling_ranges(cfg.diffusion))  # the flags as each model takes them
        for flag, path in (("--dreambench", args.dreambench), *(("--embedder", e) for e in args.embedder)):
            if path and not Path(path).is_dir():
                raise FileNotFoundError(f"{flag}={path!r}: no such folder")
        # the report's folder last: made now, so that a bad --out fails here, not after the benchmark
        out = storage.location(args.out or f"runs/eval/{time.strftime('%Y%m%d-%H%M%S')}", "--out")
        made = not storage.is_uri(out) and not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. no such bucket, no access
            raise ConfigError(f"--out={str(out)!r}: {e}") from None
    import ray

    started_ray = not ray.is_initialized()
    run_id = None
    try:
        preset = args.preset or model_cfg.preset
        subjects, prompts, steps, validate = QUICK if args.quick else PRESET_SIZES.get(preset, PRESET_SIZES["cpu"])
        dreambooth_on = args.dreambooth if args.dreambooth is not None else not args.quick

        if started_ray and os.environ.get("RAY_ADDRESS"):
            ray.init()  # under `ray job submit`: the cluster's workers
        elif started_ray:  # spare logical CPUs: actors must not take every CPU, or Ray Data stalls
            ray.init(address="local", num_cpus=(os.cpu_count() or 2) + 2, include_dashboard=False, log_to_driver=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        resources = ray.cluster_resources()
        settings = runner.EvalSettings(
            model_dir=model_dir,
            text_only_dir=text_only_dir,
            num_subjects=args.subjects or subjects,
            prompts_per_subject=args.prompts or prompts,
            num_inference_steps=args.steps or steps,
            text_guidance=args.text_guidance,
            neighbor_guidance=args.neighbor_guidance,
            guidance_mode=args.guidance_mode,
            interleave_ratio=args.interleave_ratio,
            sampler=args.sampler,
            dreambooth=baselines.DreamBoothConfig(steps=args.dreambooth_steps, seed=args.seed)
            if dreambooth_on
            else None,
            workers=args.workers or max(1, min(8, int(resources.get("CPU", 3)) - 2)),
            gpus_per_worker=1.0 if resources.get("GPU", 0) >= 1 else 0.0,
            seed=args.seed,
            extra={"model_uri": args.model, "preset": preset, "quick": args.quick},
        )
        n_validate = validate if args.validate is None else args.validate
        validation = {}
        if n_validate:
            size = model_cfg.model.image_size
            print(f"[evaluate] validating the metrics on {n_validate} renders per check ...", flush=True)
            validation = metrics.validate_identity(n_validate, size) | metrics.validate_detectors(n_validate, size)
            validation |= metrics.validate_copy(n_validate, size)

        shown = f"{args.model} (version {version.version})" if version else model_dir
        print(
            f"[evaluate] {shown}: {settings.num_subjects} subjects x {settings.prompts_per_subject} prompts, "
            f"{settings.workers} workers, dreambooth {'on' if dreambooth_on else 'off'}",
            flush=True,
        )
        result = runner.run(settings)
        meta = runner.meta(settings, result) | {"metric_validation": validation}
        if args.dreambench and args.embedder:
            meta["dreambench"] = runner.dreambench_scores(settings, args.dreambench, args.embedder)
            print(f"[evaluate] DreamBench-style: {meta['dreambench']}", flush=True)
        elif args.dreambench:
            print("[evaluate] --dreambench needs --embedder (a local CLIP or DINO folder); skipped", flush=True)
        meta["seconds"]["total"] = round(time.perf_counter() - t_start, 1)

        with tempfile.TemporaryDirectory() as tmp:  # a URI's report is written here first (MLflow logs local files)
            folder = Path(tmp) if storage.is_uri(out) else out
            json_path, md_path = benchmark.write_report(folder, result.table, meta)
            grid_path = folder / "samples.png"
            result.grid.save(grid_path)
            (folder / "scores.jsonl").write_text("\n".join(json.dumps(r, default=str) for r in result.rows) + "\n")
            files = [json_path, md_path, grid_path, folder / "scores.jsonl"]
            if storage.is_uri(out):
                for f in files:
                    (out / f.name).write_bytes(f.read_bytes())
            if not args.no_mlflow:
                run_id = tracking.start_run(
                    EXPERIMENT, f"eval-{preset}", tags={"model": args.model, "quick": args.quick}
                )
                logger = tracking.RunLogger(run_id)
                logger.params({k: v for k, v in meta.items() if k != "metric_validation"})
                logger.metrics(
                    {
                        f"{row['method']}/{k}": v
                        for row in result.table
                        for k, v in row.items()
                        if isinstance(v, float) and v == v
                    }
                    | {f"validation/{k}": v for k, v in validation.items()},
                    step=0,
                    model_id=model_id,  # also metrics of the logged model the version was registered from
                )
                if version:  # and its headline numbers as tags, which the registry's lists show
                    from mlflow import MlflowClient

                    ours = result.table[0]  # the neighbor model's row
                    tags = {"eval.run_id": run_id, "eval.quick": args.quick, "eval.samples": int(ours["samples"])}
                    tags |= {f"eval.{k}": f"{ours[k]:.3f}" for k in ("identity", "text_fidelity", "copy_rate")}
                    client = MlflowClient()
                    for key, value in tags.items():
                        client.set_model_version_tag(version.name, version.version, key, str(value))
                tracking.log_table(run_id, result.table, "results_table.json")
                tracking.log_files(run_id, files, "report")
                tracking.end_run(run_id)
                print(f"[evaluate] MLflow run {run_id} in experiment {EXPERIMENT}", flush=True)
            print(md_path.read_text())
            shown = f"{out / md_path.name}  grid: {out / grid_path.name}"
            print(f"[evaluate] report: {shown}  ({meta['seconds']['total']:.0f} s)", flush=True)
    except BaseException:
        if run_id:  # the MLflow run says it failed, not RUNNING for ever
            tracking.end_run(run_id, "FAILED")
        if made:  # a report folder this evaluation made and left empty (a failed benchmark) goes again
            with contextlib.suppress(OSError):  # rmdir: only when empty
                out.rmdir()
        raise
    finally:
        if started_ray:
            ray.shutdown()
    return result


if __name__ == "__main__":
    main()
