"""The benchmark harness (bench/run.py) in --quick mode on the debug preset: results files, not speed.

No test here asserts a speed target: the numbers of a shared CI machine say nothing. They
check that every benchmark writes its JSON with finite positive ratios and the facts a
reader needs, that SUMMARY.md lists them, and that the GPU-only MFU path works (on CPU).
"""

from __future__ import annotations

import json
import math

import pytest

MACHINE_KEYS = {"cpu_count", "torch_threads_default", "torch", "ray", "deepspeed", "cuda_device"}


def _check_results(results, names):
    for name in names:
        r = json.loads((results / f"{name}.json").read_text())
        assert r["benchmark"] == name and r["quick"] and r["preset"] == "debug"
        assert MACHINE_KEYS <= set(r["machine"]) and r["date"] and r["command"].startswith("python bench/run.py")
        assert r["method"] and r["config"]
        if r["skipped"]:
            assert r["ratios"][0]["value"] is None  # no made-up numbers
            continue
        for ratio in r["ratios"]:
            # a fraction (data wait) may be 0; every ratio of two measured speeds is positive
            low = 0 if "fraction" in ratio["name"] else 1e-12
            assert math.isfinite(ratio["value"]) and ratio["value"] >= low, (name, ratio)
            assert ratio["met"] in (True, False) if ratio["op"] else ratio["met"] is None
    summary = (results / "SUMMARY.md").read_text()
    assert all(f"| {name} |" in summary for name in names), summary
    return summary


def test_quick_sampling_benchmarks_write_results_and_summary(tmp_path, capsys):
    import torch

    from bench.run import main

    threads = torch.get_num_threads()
    names = ["neighbor_cost", "guidance_cost", "gpu_mfu"]
    main(["--quick", "--preset", "debug", *names, "--results", str(tmp_path)])
    assert torch.get_num_threads() == threads  # benchmarks give the threads back
    _check_results(tmp_path, names)
    out = capsys.readouterr().out
    # each benchmark's last line is its headline ratio with its goal
    assert "neighbor_cost: " in out and "(goal <= 1.25)" in out
    mfu = json.loads((tmp_path / "gpu_mfu.json").read_text())
    if not torch.cuda.is_available():
        assert mfu["skipped"] == "no CUDA device" and "gpu_mfu: skipped: no CUDA device" in out
    r = json.loads((tmp_path / "neighbor_cost.json").read_text())
    assert r["measured"]["B1"]["max_abs_diff_cached_vs_recomputed_sample"] < 1e-5
    r = json.loads((tmp_path / "guidance_cost.json").read_text())
    assert r["measured"]["B1"]["max_abs_diff_batched_vs_separate"] < 1e-4


def test_mfu_measurement_runs_on_cpu():
    """The GPU benchmark's step, FLOP count and variants on the debug model (fp32, CPU, one process)."""
    import dataclasses

    from bench.gpu import measure, peak_flops
    from neighbor_diffusion.config import debug

    cfg = debug()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2))
    m = measure(cfg, ("eager", "channels_last"), steps_per_call=1, repeats=1, warmup=1, use_gpu=False)
    assert not m.get("failed"), m
    assert m["flops_per_step"] > 0 and m["params"] > 0
    assert all(s > 0 for s in m["step_s"].values()) and set(m["step_s"]) == {"eager", "channels_last"}
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("some new GPU") is None and peak_flops("some new GPU", 100) == 100e12


def test_mfu_reports_variants_that_fail_and_the_summary_makes_its_folder(tmp_path, monkeypatch, capsys):
    """On a GPU machine without the text encoder's package every variant failed to build, and the benchmark
    died in its timing (ZeroDivisionError) and then in SUMMARY.md (no results folder) instead of saying why."""
    from bench import gpu
    from bench.common import write_summary
    from neighbor_diffusion.config import debug

    def broken(cfg, variant, use_gpu):
        raise ImportError(f"no package for {variant}")

    monkeypatch.setattr(gpu, "TrainStep", broken)
    m = gpu.measure(debug(), ("eager", "compile"), steps_per_call=1, repeats=1, warmup=1, use_gpu=False)
    assert m["step_s"] == {} and set(m["failed"]) == {"eager", "compile"}
    assert "ImportError: no package for eager" in m["failed"]["eager"]
    assert "variant compile failed: ImportError: no package for compile" in capsys.readouterr().out
    assert write_summary(tmp_path / "new" / "results", ["gpu_mfu"]).is_file()


def test_unknown_benchmark_is_refused():
    from bench.run import main

    with pytest.raises(SystemExit):
        main(["no_such_benchmark"])


@pytest.mark.slow
def test_quick_training_and_serving_benchmarks(tmp_path):
    """Ray Train runs (1 and 2 workers, every ZeRO stage) and two Serve apps, debug preset: a few minutes."""
    from bench.run import main

    names = ["pipeline_overhead", "scaling", "zero_memory", "serving"]
    main(["--quick", "--preset", "debug", *names, "--results", str(tmp_path / "results"),
          "--data-root", str(tmp_path / "data")])  # fmt: skip
    _check_results(tmp_path / "results", names)
    zero = json.loads((tmp_path / "results" / "zero_memory.json").read_text())
    bytes_ = zero["measured"]["state_bytes_rank0"]
    assert bytes_["zero3"]["total_bytes"] < bytes_["zero0"]["total_bytes"]  # partitioning, not speed
    overhead = json.loads((tmp_path / "results" / "pipeline_overhead.json").read_text())
    assert overhead["measured"]["full_path"]["steady"]["windows"] >= 1
