"""Evaluation: the metrics are validated on renders (the issue's >= 95% bars), the benchmark is sound,
the DreamBooth-style baseline trains, and the evaluate job writes its table to disk and MLflow.

Model quality is never asserted here: untrained debug models only exercise the plumbing.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from neighbor_diffusion.config import debug
from neighbor_diffusion.data import world
from neighbor_diffusion.evaluation import baselines, benchmark, metrics

# ---------------------------------------------------------------------------- metric validation on renders


def test_identity_ranks_the_right_subject_among_20():
    r = metrics.validate_identity(num_queries=30, seed=3)
    assert r["identity_top1"] >= 0.95, r
    assert r["identity_same_subject"] > 0.85, r  # normalised: true renders ~ 1
    assert abs(r["identity_other_subject"]) < 0.2, r  # other subjects of the class ~ 0
    assert r["identity_flat_image"] < 0.3, r  # a grey blob is not half a subject


def test_identity_ranks_the_right_subject_at_64x64_too():
    """The shift search scales with the image (left and right sit twice as far from the centre at 64x64):
    a fixed 10 px search ranked 14 of 16 first there."""
    r = metrics.validate_identity(num_queries=16, size=64, seed=3)
    assert r["identity_top1"] >= 0.95 and r["identity_same_subject"] > 0.85, r


def test_identity_of_another_subject_is_low_and_not_top1():
    subject, other = world.make_subject(2), world.make_subject(8)  # both mugs
    ctx = world.Context("lawn", "left", "large", seed=5)
    rng = np.random.default_rng(0)
    own = metrics.identity_fidelity(metrics.independent_render(subject, ctx, 32, rng), subject, ctx)
    wrong = metrics.identity_fidelity(metrics.independent_render(other, ctx, 32, rng), subject, ctx)
    assert own["top1"] == 1.0 and own["normalised"] > 0.8
    assert wrong["top1"] == 0.0 and wrong["normalised"] < 0.3


def test_text_detectors_are_95_percent_accurate_on_renders():
    r = metrics.validate_detectors(num_queries=30, seed=3)
    for a in metrics.TEXT_ATTRIBUTES:
        assert r[f"detector_{a}"] >= 0.95, (a, r)


def test_text_fidelity_flags_what_was_not_drawn():
    subject = world.make_subject(7)
    shown = world.Context("snow", "left", "large", seed=1)
    image = metrics.independent_render(subject, shown, 32, np.random.default_rng(0))
    assert all(metrics.text_fidelity(image, subject, shown).values())
    asked = dataclasses.replace(shown, position="right", style="pop_art", scene="night")
    checks = metrics.text_fidelity(image, subject, asked)
    assert checks == {"scene": False, "position": False, "size": True, "style": False}
    # a sketch hides scene and colour: they are not judged, the style is
    sketch = dataclasses.replace(shown, style="sketch", color="red")
    assert set(metrics.text_fidelity(image, subject, sketch)) == {"position", "size", "style"}
    # a sketch nobody asked for ("a photo of ...") fails the style (scene and colour stay unjudged under it)
    drawn = metrics.independent_render(subject, sketch, 32, np.random.default_rng(0))
    assert metrics.text_fidelity(drawn, subject, dataclasses.replace(shown, color="red")) == {
        "style": False,
        "position": True,
        "size": True,
    }


def test_to_array_scales_integers_by_dtype():
    dark = np.ones((4, 4, 3), np.uint8)  # a near-black sample: max 1 is still 1/255, not white
    np.testing.assert_allclose(metrics.to_array(dark), 1 / 255)
    np.testing.assert_allclose(metrics.to_array(dark.astype(np.float32) * 200), 200 / 255)  # floats by range
    np.testing.assert_allclose(metrics.to_array(np.full((4, 4, 3), 0.5, np.float32)), 0.5)


def test_copy_detector_on_renders():
    r = metrics.validate_copy(num_queries=60, seed=3)
    assert r["copy_recall"] >= 0.95 and r["copy_recall_blurred"] >= 0.9, r
    assert r["copy_false_positive"] <= 0.05, r


def test_copying_a_neighbor_is_only_a_copy_when_the_prompt_asked_for_something_else():
    subject = world.make_subject(4)
    contexts = [world.Context("beach", "left", "small", seed=1), world.Context("city", "right", "large", seed=2)]
    neighbors = [world.render(subject, c, 32) for c in contexts]
    asked = world.Context("forest", "center", "large", seed=3)
    target = world.render(subject, asked, 32)
    assert metrics.is_copy(neighbors[0], neighbors, contexts, asked, target)
    assert not metrics.is_copy(target, neighbors, contexts, asked, target)
    # the prompt asked for the neighbor's own context: reproducing it is right
    assert not metrics.is_copy(neighbors[0], neighbors, contexts, contexts[0], neighbors[0])


def test_aligned_distances_equal_the_naive_computation():
    rng = np.random.default_rng(0)
    x = rng.random((12, 12, 3)).astype(np.float32)
    templates = rng.random((3, 2, 12, 12, 3)).astype(np.float32)
    mask = rng.random((2, 12, 12)) > 0.5
    fast = metrics.aligned_distances(x, templates, mask, 2, 3)
    naive = np.full(3, np.inf)
    for j in range(3):
        for v in range(2):
            for xs in metrics._shifted(x, 2, 3):
                err = ((xs - templates[j, v]) ** 2).mean(-1)
                naive[j] = min(naive[j], err[mask[v]].mean())
    np.testing.assert_allclose(fast, naive, rtol=1e-4, atol=1e-6)
    # an exact template is at distance 0 and is found
    assert metrics.aligned_distances(templates[1, 0], templates, None)[1] == pytest.approx(0, abs=1e-6)


# ---------------------------------------------------------------------------- benchmark


def test_benchmark_uses_heldout_subjects_covers_every_kind_and_is_deterministic():
    cfg = debug()
    a = benchmark.build(cfg, num_subjects=4, prompts_per_subject=2, k=2)
    b = benchmark.build(cfg, num_subjects=4, prompts_per_subject=2, k=2)
    train_ids = {s.subject_id for s in world.split_subjects(cfg)["train"]}
    assert len(a) == 8 and not {e["subject_id"] for e in a} & train_ids
    assert {e["kind"] for e in a} == set(benchmark.KINDS)
    assert [e["prompt"] for e in a] == [e["prompt"] for e in b] and [e["seed"] for e in a] == [e["seed"] for e in b]
    for e in a:
        ctx = world.Context.from_dict(e["context"])
        assert len(e["neighbor_images"]) == 2 and e["target"].size == (32, 32)
        assert ("color" in e["kind"]) == (ctx.color is not None) and ("style" in e["kind"]) == (ctx.style is not None)
        assert ctx.color is None or ctx.color in metrics.distinct_colors(e["subject"])
    seen = {benchmark.context_key(a[0]["context"])}
    c = benchmark.build(cfg, num_subjects=4, prompts_per_subject=2, k=2, seen=seen)
    assert c[0]["novel"] is False and any(e["novel"] for e in c[1:])


def test_summarise_and_markdown():
    rows = [
        {"identity": 1.0, "identity_top1": 1.0, "text_fidelity": 0.5, "copy": True, "kind": "plain",
         "text_checks": {"scene": True, "position": False}, "novel": None},
        {"identity": 0.0, "identity_top1": 0.0, "text_fidelity": 1.0, "copy": False, "kind": "color",
         "text_checks": {"scene": True, "color": True}, "novel": None},
    ]  # fmt: skip
    s = benchmark.summarise(rows)
    assert s["identity"] == 0.5 and s["copy_rate"] == 0.5 and s["text_position"] == 0.0 and s["text_scene"] == 1.0
    assert s["text_fidelity_color"] == 1.0 and np.isnan(s["text_fidelity_style"])
    md = benchmark.markdown_table([{"method": "neighbor", **s}])
    assert "| neighbor | 0.500 |" in md and "n/a" in md


# ---------------------------------------------------------------------------- DreamBooth-style baseline


@pytest.fixture(scope="module")
def debug_pipe():
    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline

    torch.manual_seed(0)
    return NeighborDiffusionPipeline.from_config(debug(), device="cpu")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread does not stall on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rare_token_prompt():
    assert baselines.rare_token_prompt("a photo of the toy on a lawn", "toy") == "a photo of the sks toy on a lawn"
    assert baselines.rare_token_prompt("a pop art poster of red toy", "toy", "zwx") == "a pop art poster of red zwx toy"
    assert baselines.rare_token_prompt("something else", "mug").startswith("sks mug")


def test_dreambooth_finetune_learns_the_subject_and_leaves_the_model_alone(debug_pipe, one_thread):
    ex = world.heldout_examples(debug(), num_subjects=1, k=3)[0]
    before = {k: v.clone() for k, v in debug_pipe.unet.state_dict().items()}
    cfg = baselines.DreamBoothConfig(steps=25, lr=2e-3, prior_images=2, prior_sampling_steps=2)
    # the instance loss at fixed t and noise, before and after fine-tuning
    batch = baselines._text_only_batch(
        debug_pipe, debug_pipe.prepare_images(ex["neighbor_images"]), f"a photo of sks {ex['noun']}"
    )
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(3, 3, 32, 32, generator=g)
    drop = (torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    from neighbor_diffusion import diffusion

    sched = diffusion.train_scheduler(debug_pipe.config.diffusion)

    def loss(unet):
        with torch.no_grad():
            return float(diffusion.training_losses(unet, batch, sched, debug_pipe.config.diffusion, t, noise, drop))

    unet, stats = baselines.dreambooth_finetune(debug_pipe, ex["neighbor_images"], ex["noun"], cfg)
    assert loss(unet) < 0.8 * loss(debug_pipe.unet), stats
    assert stats["seconds"] > stats["prior_seconds"] > 0 and np.isfinite(stats["last_loss"])
    for k, v in debug_pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), f"the text-only model changed: {k}"
    out = baselines.dreambooth_generate(
        debug_pipe, ex["neighbor_images"], ex["noun"], [ex["prompt"]] * 2, [0, 1],
        dataclasses.replace(cfg, steps=2), {"num_inference_steps": 2},
    )  # fmt: skip
    assert out["images"].shape == (2, 32, 32, 3) and out["images"].dtype == np.uint8 and out["adapt_seconds"] > 0


# ---------------------------------------------------------------------------- the job, end to end


def test_evaluate_job_writes_table_report_and_mlflow(tmp_path, monkeypatch, debug_pipe, s3):
    """The report to object storage (moto's S3 server; a local folder is `make demo`'s), a registered version's
    scores on that version, the sampling options as given."""
    import mlflow
    import ray

    from neighbor_diffusion import tracking
    from neighbor_diffusion.data import storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    debug_pipe.save_pretrained(tmp_path / "pipe")
    train_run = tracking.start_run("train", "train")
    with mlflow.start_run(run_name="notebook") as notebook:  # a caller's own run, active meanwhile
        version = tracking.register_pipeline(train_run, tmp_path / "pipe", "nd-eval")
        assert mlflow.active_run().info.run_id == notebook.info.run_id
    assert version.run_id == train_run
    from jobs import evaluate

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = evaluate.main(
            ["--model", "models:/nd-eval@candidate", "--subjects", "1", "--prompts", "2", "--steps", "2",
             "--workers", "1", "--no-dreambooth", "--validate", "0", "--out", "s3://nd-test/eval/run1",
             "--guidance-mode", "interleaved", "--sampler", "dpm++"]
        )  # fmt: skip
    finally:
        ray.shutdown()
    methods = [row["method"] for row in result.table]
    assert methods == ["neighbor", "text_only", "oracle_render"]
    out = storage.location("s3://nd-test/eval/run1")
    report = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in report["table"]] == methods
    assert report["meta"]["sampling"] == {"num_inference_steps": 2, "guidance_mode": "interleaved", "sampler": "dpm++"}
    assert "| neighbor |" in (out / "results.md").read_text()
    assert (out / "samples.png").read_bytes().startswith(b"\x89PNG") and (out / "scores.jsonl").is_file()
    assert not (tmp_path / "runs").exists()  # nothing left in the working dir
    oracle = result.table[-1]  # the metrics' ceiling on these very prompts
    assert oracle["identity_top1"] == 1.0 and oracle["text_fidelity"] == 1.0 and oracle["copy_rate"] == 0.0
    assert result.table[0]["adapt_seconds_per_subject"] > 0

    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(evaluate.EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert "neighbor/identity" in run.data.metrics and "text_only/text_fidelity" in run.data.metrics
    # the registered version evaluated: its logged model holds the scores, its tags the headline numbers
    evaluated = client.get_model_version("nd-eval", version.version)
    model_id = evaluated.source.removeprefix("models:/")
    scores = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert scores["neighbor/identity"] == run.data.metrics["neighbor/identity"] and "text_only/identity" in scores
    assert evaluated.tags["eval.run_id"] == run.info.run_id and evaluated.tags["eval.samples"] == "2"
    assert evaluated.tags["eval.identity"] == f"{result.table[0]['identity']:.3f}"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "results_table.json" in artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {
        "report/results.json", "report/results.md", "report/samples.png"
    }  # fmt: skip


def test_dreambench_scores_on_photos_of_several_sizes(tmp_path, debug_pipe):
    """Real subjects' photos come in any size (a phone's portrait beside its landscape): the neighbor model and
    the text-only baseline each get DINO scores from a local vision model (a tiny ViT saved here)."""
    import ray
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from neighbor_diffusion.evaluation import runner

    vit = tmp_path / "vit"
    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    ).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    root = tmp_path / "dataset" / "backpack"
    root.mkdir(parents=True)
    for i, size in enumerate(((80, 60), (60, 80), (120, 120))):
        Image.new("RGB", size, (200, 30 * i, 30)).save(root / f"{i:02d}.jpg")
    (tmp_path / "dataset" / "prompts.txt").write_text("a {0} {1} in the jungle\n")
    debug_pipe.save_pretrained(tmp_path / "pipe")
    settings = runner.EvalSettings(str(tmp_path / "pipe"), num_inference_steps=2, workers=1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        table = runner.dreambench_scores(settings, str(tmp_path), [str(vit)], prompts_per_subject=1)
    finally:
        ray.shutdown()
    assert [row["method"] for row in table] == ["neighbor", "text_only"]
    assert all(row["samples"] == 1.0 and -1.0 <= row["dino"] <= 1.0 for row in table), table


def test_a_failed_evaluation_leaves_no_empty_report_folder_and_stops_its_ray(tmp_path, monkeypatch, debug_pipe):
    import ray

    from jobs import evaluate
    from neighbor_diffusion.evaluation import runner

    def dies(settings):
        raise RuntimeError("generation actor died")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner, "run", dies)
    debug_pipe.save_pretrained(tmp_path / "pipe")
    ray.shutdown()  # so that the job starts its own Ray, as from the command line
    with pytest.raises(RuntimeError, match="generation actor died"):
        evaluate.main(["--model", str(tmp_path / "pipe"), "--quick", "--validate", "0", "--no-mlflow"])
    assert (tmp_path / "runs" / "eval").is_dir() and not any((tmp_path / "runs" / "eval").iterdir())
    assert not ray.is_initialized()
    (tmp_path / "mine").mkdir()  # a folder the caller made is theirs: kept, even empty
    with pytest.raises(RuntimeError, match="generation actor died"):
        evaluate.main(["--model", str(tmp_path / "pipe"), "--quick", "--validate", "0", "--no-mlflow", "--out", "mine"])
    assert (tmp_path / "mine").is_dir()

    # the benchmark done, MLflow failing midway: the report stays, the run is marked FAILED (was RUNNING for ever)
    from PIL import Image

    from neighbor_diffusion import tracking

    examples = [{"subject_id": "s0", "neighbor_images": [None]}]
    done = runner.EvalResult([{"method": "neighbor", "identity": 0.5}], [], {}, examples, Image.new("RGB", (4, 4)), {})
    monkeypatch.setattr(runner, "run", lambda settings: done)

    def full(*args, **kwargs):
        raise OSError("artifact store full")

    monkeypatch.setattr(tracking, "log_files", full)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(OSError, match="artifact store full"):
        evaluate.main(["--model", str(tmp_path / "pipe"), "--quick", "--validate", "0", "--out", "kept"])
    assert (tmp_path / "kept" / "results.json").is_file()
    from mlflow import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(evaluate.EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"
    assert not ray.is_initialized()


def test_metric_names_mlflow_rejects_are_mapped_not_dropped(tmp_path, monkeypatch):
    """One invalid name used to make MLflow reject the whole batch: every evaluation metric was lost."""
    from mlflow import MlflowClient

    from neighbor_diffusion import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run("names", "names")
    tracking.RunLogger(run_id).metrics({"neighbor/text_fidelity_color+style": 0.5, "neighbor/identity": 0.25}, step=0)
    tracking.end_run(run_id)
    logged = MlflowClient().get_run(run_id).data.metrics
    assert logged == {"neighbor/text_fidelity_color_style": 0.5, "neighbor/identity": 0.25}
