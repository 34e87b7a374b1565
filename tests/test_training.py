"""Training: DeepSpeed config checks, schedule, EMA, and Ray Train smoke runs per ZeRO stage (and offload)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import open_gates, synthetic_rows
from neighbor_diffusion import config as C
from neighbor_diffusion.pipeline import UNET_FILE
from neighbor_diffusion.training import engine as E


def _cfg(tmp_path, **train):
    cfg = C.debug()
    base = dict(
        steps=8,
        batch_size=4,
        log_every=1,
        checkpoint_every=4,
        lr=3e-3,
        warmup_steps=1,
        num_workers=2,
        cpus_per_worker=1.0,
        storage_path=str(tmp_path / "runs"),
        run_name="smoke",
        sample_every=0,
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{**base, **train}))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generated_deepspeed_config_is_valid(stage):
    cfg = dataclasses.replace(C.debug(), train=dataclasses.replace(C.debug().train, zero_stage=stage, grad_accum=2))
    ds = E.deepspeed_config(cfg, world_size=4, use_gpu=False)
    assert ds["train_batch_size"] == cfg.train.batch_size * 2 * 4
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is False
    E.validate_deepspeed_config(ds, world_size=4)
    assert E.deepspeed_config(cfg, 1, use_gpu=True)["bf16"]["enabled"] is True


def test_inconsistent_batch_sizes_are_rejected_with_the_keys_named(tmp_path):
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"train_batch_size": 999}))
    cfg = dataclasses.replace(C.debug(), train=dataclasses.replace(C.debug().train, deepspeed_overrides=str(override)))
    ds = E.deepspeed_config(cfg, world_size=2, use_gpu=False)
    with pytest.raises(C.ConfigError, match="train_batch_size=999 must equal train_micro_batch_size_per_gpu=8"):
        E.validate_deepspeed_config(ds, world_size=2)
    with pytest.raises(C.ConfigError, match="deepspeed"):
        E.validate_deepspeed_config(
            {**E.deepspeed_config(C.debug(), 1, False), "bf16": {"enabled": True}, "fp16": {"enabled": True}},
            world_size=1,
        )
    # what the loop does by train.* an override may not change (consistent batch sizes passed: DeepSpeed then
    # stepped the optimizer every 4th loop step, the LR schedule 4x slower); other keys are merged
    for extra, message in [
        ({"gradient_accumulation_steps": 4, "train_batch_size": 64}, r"sets gradient_accumulation_steps=4, where the "
         r"loop follows train\.grad_accum \(1 here\): set train\.grad_accum instead"),
        ({"zero_optimization": {"stage": 3}}, r"sets zero_optimization\.stage=3, .* train\.zero_stage \(0 here\)"),
        ({"bf16": {"enabled": True}}, r"sets bf16\.enabled=True, .* train\.precision"),
    ]:  # fmt: skip
        override.write_text(json.dumps(extra))
        with pytest.raises(C.ConfigError, match=message):
            E.deepspeed_config(cfg, world_size=2, use_gpu=False)
    override.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    assert E.deepspeed_config(cfg, 2, False)["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000}
    override.write_text("{not json")
    with pytest.raises(C.ConfigError, match=r"train\.deepspeed_overrides='.*ds\.json': Expecting"):
        E.deepspeed_config(cfg, 2, False)


def test_lr_schedule_warms_up_then_decays():
    cfg = dataclasses.replace(C.debug(), train=dataclasses.replace(C.debug().train, steps=100, warmup_steps=10))
    f = E.lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) < f(20) and f(100) == pytest.approx(0.1)


def test_ema_tracks_the_weights(model):
    ema = E.EMA(model, decay=0.9, zero_stage=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = next(ema.model.parameters()).clone()
    for step in range(200):
        ema.update(model, step)
    after, target = next(ema.model.parameters()), next(model.parameters())
    assert (after - target).abs().max() < 1e-3 < (before - target).abs().max()


def test_neighbor_use_is_one_with_shut_gates_and_moves_when_they_open(cfg, model):
    from neighbor_diffusion.training.samples import _held_out_key, neighbor_use

    # its examples and bounds are computed once for runs that differ in how they train, not in what they see
    other_world = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=cfg.data.seed + 1))
    assert _held_out_key(cfg) == _held_out_key(_train_cfg(cfg, zero_stage=3)) != _held_out_key(other_world)
    shut = neighbor_use(cfg, model)
    ts = ("t299", "t599", "t899", "t989")
    ratios = {f"neighbor_{m}_ratio{t}" for m in ("loss", "identity") for t in ("", *(f"_{t}" for t in ts))}
    errors = {"x0_error_t989", "x0_error_t989_no_neighbors", "x0_bound_prompt", "x0_bound_subject"}
    assert set(shut) == ratios | errors
    assert all(shut[k] == pytest.approx(1.0, abs=1e-6) for k in ratios), shut  # zero gates: the text-only UNet
    assert shut["x0_error_t989"] == pytest.approx(shut["x0_error_t989_no_neighbors"], rel=1e-6)
    # knowing the subject leaves less to guess than the prompt alone; an untrained model is far from either
    assert 0 < shut["x0_bound_subject"] < 0.8 * shut["x0_bound_prompt"] < shut["x0_error_t989"], shut
    open_gates(model)
    opened = neighbor_use(cfg, model)
    # an open (random) branch changes the loss, and changes it differently for another subject's neighbors
    assert abs(opened["neighbor_loss_ratio"] - 1.0) > 1e-3, opened
    assert abs(opened["neighbor_identity_ratio"] - 1.0) > 1e-5, opened
    assert neighbor_use(cfg, model) == opened  # same subjects, t and noise every time: comparable across steps
    assert not model.training


@pytest.mark.parametrize("prediction_type, snr_gamma", [("v_prediction", 0.0), ("epsilon", 0.0), ("v_prediction", 5.0)])
def test_x0_error_is_the_loss_in_x0_units(cfg, model, monkeypatch, prediction_type, snr_gamma):
    """A model whose x0 estimate is 0 everywhere has the x0 error mean(x0^2), whatever it parametrises and
    however the loss weights t."""
    from neighbor_diffusion import diffusion
    from neighbor_diffusion.training.samples import _held_out_key, _neighbor_use_batch, neighbor_use

    dcfg = dataclasses.replace(cfg.diffusion, prediction_type=prediction_type, snr_gamma=snr_gamma)
    cfg = dataclasses.replace(cfg, diffusion=dcfg)
    alpha_bar = diffusion.train_scheduler(cfg.diffusion).alphas_cumprod

    def zero_x0(sample, timestep, *args, **kwargs):  # x_t = sqrt(a) x0 + sqrt(1 - a) eps with x0 = 0
        a = alpha_bar[timestep].view(-1, 1, 1, 1)
        eps = sample / (1 - a).sqrt()
        return a.sqrt() * eps if prediction_type == "v_prediction" else eps  # v = sqrt(a) eps - sqrt(1 - a) x0

    monkeypatch.setattr(model, "forward", zero_x0)
    use = neighbor_use(cfg, model)
    expected = _neighbor_use_batch(_held_out_key(cfg))["image"].pow(2).mean().item()
    assert use["x0_error_t989"] == pytest.approx(expected, rel=1e-3)
    assert use["x0_error_t989_no_neighbors"] == pytest.approx(expected, rel=1e-3)


def test_resuming_a_run_of_another_model_is_refused_with_the_fields_named(tmp_path, capsys):
    from neighbor_diffusion.training.trainer import check_resumable

    cfg = C.debug()
    (tmp_path / "checkpoint_1").mkdir()
    progress = {"step": 4, "config": json.loads(cfg.to_json())}
    (tmp_path / "checkpoint_1" / E.PROGRESS_FILE).write_text(json.dumps(progress))
    assert check_resumable(cfg, tmp_path)  # same model: resumes, and says so
    assert "has a checkpoint at step 4: resuming" in capsys.readouterr().out
    assert not check_resumable(cfg, tmp_path / "elsewhere")
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block_out_channels=(16, 64)))
    with pytest.raises(ValueError, match=r"model\.block_out_channels differ"):
        check_resumable(other, tmp_path)
    # a neighbor lr scale adds an optimizer parameter group: a checkpoint with one cannot take two
    with pytest.raises(ValueError, match=r"train\.neighbor_lr_scale \(1\.0 there\) differ"):
        check_resumable(_train_cfg(cfg, neighbor_lr_scale=5.0), tmp_path)
    # the data position: another split or number of examples per step would repeat or skip examples
    for changed, message in [
        ({"num_workers": 2}, r"train\.num_workers \(1 there\) differ"),
        ({"seed": 1}, r"train\.seed \(0 there\) differ"),
        ({"batch_size": 4}, r"train\.batch_size x train\.grad_accum \(8 there\) differ"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_resumable(_train_cfg(cfg, **changed), tmp_path)
    assert check_resumable(_train_cfg(cfg, batch_size=4, grad_accum=2), tmp_path)  # the same examples per step
    # DeepSpeed's optimizer-state layout: refused before Ray starts (was a ZeRORuntimeException in every worker)
    zero2 = _train_cfg(cfg, zero_stage=2, num_workers=2)
    progress["config"] = json.loads(zero2.to_json())
    (tmp_path / "checkpoint_1" / E.PROGRESS_FILE).write_text(json.dumps(progress))
    assert check_resumable(zero2, tmp_path)
    for changed, message in [
        ({"num_workers": 4}, r"train\.num_workers \(2 there\) differ"),
        ({"zero_stage": 3}, r"train\.zero_stage \(2 there\) differ"),
        ({"offload": True}, r"train\.offload \(False there\) differ"),
        ({"precision": "bf16"}, r"train\.precision \(fp32 there\) differ"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_resumable(_train_cfg(zero2, **changed), tmp_path)
    assert check_resumable(_train_cfg(zero2, precision="fp32", max_failures=5), tmp_path)  # auto on CPU is fp32


def test_a_resumed_run_does_not_read_its_init_from_again(tmp_path, capsys):
    """The base a run started from may be gone when it resumes (a cleaned /tmp): its checkpoint has the weights."""
    from neighbor_diffusion.training.trainer import init_weights_of

    cfg = _train_cfg(C.debug(), init_from=str(tmp_path / "gone.safetensors"))
    resumed, weights = init_weights_of(cfg, resuming=True)
    assert (resumed.train.init_from, weights) == ("", b"")  # workers build the model, then load the checkpoint
    assert "not read: the run resumes from its checkpoint" in capsys.readouterr().out
    with pytest.raises(C.ConfigError, match=r"train\.init_from=.*gone\.safetensors"):
        init_weights_of(cfg, resuming=False)  # a new run still needs it
    assert init_weights_of(C.debug(), resuming=False) == (C.debug(), b"")


def test_a_failed_training_ends_its_mlflow_run_as_failed_and_a_resume_runs_it_again(tmp_path, monkeypatch):
    """Ray Train's error (max_failures used up, say) used to leave the MLflow run RUNNING in the UI for ever. A
    re-run that resumes a checkpoint continues its MLflow run; one that starts from step 0 (no checkpoint, and
    perhaps other settings) gets its own, with its own params."""
    import types

    from mlflow import MlflowClient

    from neighbor_diffusion.training import trainer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(trainer, "start_ray", lambda cfg: None)  # no Ray needed: the trainer is a stand-in
    seen = []

    class DiesAfterFit:
        def fit(self):
            seen.append((run_id(), MlflowClient().get_run(run_id()).info.status))
            return types.SimpleNamespace(error=RuntimeError("the worker group died 3 times"))

    def run_id():
        return (tmp_path / "runs" / "smoke" / "mlflow_run_id").read_text()

    def attempt(cfg):
        with pytest.raises(RuntimeError, match="the worker group died 3 times"):
            trainer.train(cfg, {})
        assert MlflowClient().get_run(run_id()).info.status == "FAILED"
        return run_id()

    monkeypatch.setattr(trainer, "build_trainer", lambda *args, **kwargs: DiesAfterFit())
    first = attempt(_cfg(tmp_path))
    second = attempt(_cfg(tmp_path, lr=1e-4))  # no checkpoint: from step 0, its own run with its own lr
    assert second != first and MlflowClient().get_run(second).data.params["train.lr"] == "0.0001"
    (tmp_path / "runs" / "smoke" / "checkpoint_1").mkdir()
    progress = {"step": 4, "config": json.loads(_cfg(tmp_path, lr=1e-4).to_json())}
    (tmp_path / "runs" / "smoke" / "checkpoint_1" / E.PROGRESS_FILE).write_text(json.dumps(progress))
    assert attempt(_cfg(tmp_path, lr=1e-4)) == second  # resumes: the same MLflow run, RUNNING again while it trains
    assert seen == [(first, "RUNNING"), (second, "RUNNING"), (second, "RUNNING")]
    # a driver killed before its first checkpoint left its run RUNNING: a fresh start marks it KILLED
    shutil.rmtree(tmp_path / "runs" / "smoke" / "checkpoint_1")
    MlflowClient().update_run(second, status="RUNNING")
    assert attempt(_cfg(tmp_path)) not in (first, second)
    assert MlflowClient().get_run(second).info.status == "KILLED"


def _train_cfg(cfg, **train):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_param_groups_give_the_neighbor_layers_their_own_lr(cfg):
    cfg = _train_cfg(cfg, lr=1e-3, neighbor_lr_scale=4.0, warmup_steps=2)
    objective = E.DiffusionObjective(E.build_unet(cfg), cfg)
    backbone, neighbor = E.param_groups(objective, cfg)
    names = {id(p): n for n, p in objective.named_parameters()}
    assert len(backbone["params"]) + len(neighbor["params"]) == len(names)  # every parameter, once
    assert {names[id(p)].split(".")[1] for p in neighbor["params"]} == {"neighbor_attention"}
    assert not any(".neighbor_attention." in names[id(p)] for p in backbone["params"])
    opt = torch.optim.AdamW([backbone, neighbor], lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, E.lr_lambda(cfg))
    assert sched.get_last_lr() == pytest.approx([0.5e-3, 2e-3])  # warm-up scales both groups alike
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([1e-3, 4e-3])
    (single,) = E.param_groups(objective, _train_cfg(cfg, neighbor_lr_scale=1.0))  # as checkpoints before the scale
    assert len(single["params"]) == len(names) and single["lr"] == cfg.train.lr


def _save_unet(unet, path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, path)
    return path


def test_init_from_loads_the_backbone_and_starts_the_neighbor_layers_fresh(cfg, tmp_path):
    base = E.build_unet(_train_cfg(cfg, seed=1))  # another seed: other weights everywhere
    file = _save_unet(base, tmp_path / "pipe" / UNET_FILE)
    fresh = E.build_unet(cfg).state_dict()
    for init_from in (str(file), str(tmp_path / "pipe")):  # the file, or the pipeline folder holding it
        run = _train_cfg(cfg, init_from=init_from, neighbor_gate_init=0.5)
        assert E.check_init_from(run) == file.resolve()
        from_bytes = _train_cfg(cfg, neighbor_gate_init=0.5)  # as a worker gets it: the file's bytes
        got = E.build_unet(run).state_dict()
        assert all(torch.equal(v, got[k]) for k, v in E.build_unet(from_bytes, file.read_bytes()).state_dict().items())
        for k, v in got.items():
            if not E.is_neighbor_parameter(k):
                assert torch.equal(v, base.state_dict()[k]), k
            elif k.endswith(".gate"):
                assert torch.equal(v, torch.full_like(v, 0.5)), k
            else:
                assert torch.equal(v, fresh[k]), k


def test_init_from_on_object_storage_is_read_by_the_driver(cfg, tmp_path, s3):
    """A UNet file or a pipeline folder on S3 (a local S3 store): read as the local one is, recorded as the URI."""
    import pyarrow.fs as pafs

    file = _save_unet(E.build_unet(_train_cfg(cfg, seed=1)), tmp_path / "pipe" / UNET_FILE)
    fs, _ = pafs.FileSystem.from_uri("s3://nd-test")
    pafs.copy_files(str(tmp_path / "pipe"), "nd-test/base/pipe", destination_filesystem=fs)
    for uri in ("s3://nd-test/base/pipe", f"s3://nd-test/base/pipe/{UNET_FILE}"):
        assert E.read_init_from(_train_cfg(cfg, init_from=uri)) == (uri, file.read_bytes())
    with pytest.raises(C.ConfigError, match=r"train\.init_from='s3://nd-test/none': cannot read .*none"):
        E.read_init_from(_train_cfg(cfg, init_from="s3://nd-test/none"))
    with pytest.raises(C.ConfigError, match=r"train\.init_from='s3://nd-test/base': cannot read .*base/unet"):
        E.read_init_from(_train_cfg(cfg, init_from="s3://nd-test/base"))  # a folder, but no pipeline's


def test_init_from_that_does_not_fit_is_refused_with_file_and_keys_named(cfg, tmp_path):
    with pytest.raises(C.ConfigError, match=r"train\.init_from='nowhere': no file"):
        E.check_init_from(_train_cfg(cfg, init_from="nowhere"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(C.ConfigError, match=r"junk\.safetensors is not a safetensors file"):
        E.check_init_from(_train_cfg(cfg, init_from=str(tmp_path / "junk.safetensors")))
    wide = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block_out_channels=(16, 64)))
    file = _save_unet(E.build_unet(wide), tmp_path / "wide.safetensors")
    with pytest.raises(
        C.ConfigError, match=r"wide\.safetensors does not fit .*norm\.bias is \(64,\), the model's is \(32,\)"
    ) as e:
        E.check_init_from(_train_cfg(cfg, init_from=str(file)))
    assert "model.*" in str(e.value) and "--train.init_from ''" in str(e.value)


def test_step_generator_depends_on_rank_and_step():
    a = torch.rand(3, generator=E.step_generator(0, 0, 5, 0))
    assert torch.equal(a, torch.rand(3, generator=E.step_generator(0, 0, 5, 0)))
    assert not torch.equal(a, torch.rand(3, generator=E.step_generator(0, 1, 5, 0)))
    assert not torch.equal(a, torch.rand(3, generator=E.step_generator(0, 0, 6, 0)))
    # any seed a user may give: torch takes only 64-bit seeds (123456789 overflowed it), and a large one is not
    # the same stream as a small one
    for seed in (123_456_789, C.MAX_SEED, -5):
        big = torch.rand(3, generator=E.step_generator(seed, 1, 10**6, 63))
        assert not torch.equal(big, a)
    with pytest.raises(C.ConfigError, match=r"train\.grad_accum=65: must be <= 64"):
        C.override(C.debug(), {"train.grad_accum": "65"})


def test_a_sqlite_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    """Not in the working dir, where a store given by MLFLOW_TRACKING_URI (as the tests' own) left them."""
    import mlflow

    from neighbor_diffusion import tracking

    (tmp_path / "work").mkdir()
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    previous = mlflow.get_tracking_uri()
    try:
        experiment_id = tracking.setup("beside", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
        location = mlflow.get_experiment(experiment_id).artifact_location
    finally:
        mlflow.set_tracking_uri(previous)
    assert location == (tmp_path / "store" / "mlartifacts").as_uri()


def test_the_default_store_in_a_ray_job_s_copy_of_its_working_dir_is_named(tmp_path, monkeypatch, capsys):
    """`ray job submit` runs the job in a copy of the working dir: its default store is not the checkout's."""
    from neighbor_diffusion import tracking

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == tracking.tracking_uri() == f"sqlite:///{copy / 'mlflow.db'}"
    out = capsys.readouterr().out
    assert out.count("MLFLOW_TRACKING_URI is not set: the store is") == 1 and "copy of its working dir" in out
    monkeypatch.chdir(tmp_path)
    tracking.tracking_uri()
    assert capsys.readouterr().out == ""  # a checkout's store: nothing said


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    import os

    d = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
    yield d
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def zero_runs(local_ray, mlflow_store, tmp_path_factory):
    """One 2-worker run per ZeRO stage on the same data; the results are shared by the checks below."""
    from neighbor_diffusion.training import trainer

    tmp = tmp_path_factory.mktemp("zero")
    outcomes = {}
    for stage in (0, 1, 2, 3):
        # samples mid-run too at ZeRO-3 (~35 s a run on 2 cores), where the EMA copy is made from a sharded module
        every = 4 if stage == 3 else 0
        cfg = _cfg(tmp, zero_stage=stage, run_name=f"zero{stage}", registered_model="nd-smoke", sample_every=every)
        ds = local_ray.data.from_items(synthetic_rows(cfg, n=128))
        outcomes[stage] = (cfg, trainer.train(cfg, {"train": ds}))
    return outcomes


def _losses(run_id):
    from mlflow import MlflowClient

    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "loss"), key=lambda m: m.step)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_checkpoints_and_registers(zero_runs, stage):
    from mlflow import MlflowClient

    cfg, out = zero_runs[stage]
    losses = _losses(out.run_id)
    assert len(losses) == cfg.train.steps and all(map(lambda v: v == v and v < 10, losses))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    # checkpoint: DeepSpeed state of both ranks, EMA weights, progress
    ckpt = Path(out.checkpoint_path)
    assert (ckpt / E.EMA_FILE).is_file() and json.loads((ckpt / E.PROGRESS_FILE).read_text())["step"] == 8
    files = {p.name for p in (ckpt / E.ENGINE_TAG).iterdir()}
    if stage == 0:
        assert "mp_rank_00_model_states.pt" in files
    else:
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files, files
    # MLflow: params, metrics, a sample grid, a registered version loading by alias
    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == str(stage) and "model.num_parameters" in run.data.params
    assert {"loss", "lr", "grad_norm", "samples_per_s", "data_wait_fraction"} <= set(run.data.metrics)
    assert run.data.metrics["grad_norm"] > 0
    # the rate logged at step n is the one step n trained at (was the next step's: read after the schedule moved)
    rate = E.lr_lambda(cfg)
    lrs = {m.step: m.value for m in client.get_metric_history(out.run_id, "lr")}
    assert lrs == {n: pytest.approx(cfg.train.lr * rate(n - 1)) for n in range(1, cfg.train.steps + 1)}, lrs
    ratio = run.data.metrics["neighbor_loss_ratio"]  # logged with the final sample grid
    assert (
        ratio > 0
        and ratio == ratio
        and {"neighbor_loss_ratio_t299", "neighbor_loss_ratio_t899", "x0_error_t989", "x0_bound_subject"}
        <= set(run.data.metrics)
    )
    # ... and at ZeRO-3 at step 4, by rank 0 in the middle of the run, from the EMA copy (a deep copy of the
    # sharded module kept DeepSpeed's hooks: that check failed, and the next step hung)
    steps = [4, 8] if stage == 3 else [8]
    assert [m.step for m in client.get_metric_history(out.run_id, "neighbor_loss_ratio")] == steps
    artifacts = {a.path for a in client.list_artifacts(out.run_id, "samples")}
    assert {f"samples/step_{s:06d}.png" for s in steps} <= artifacts
    assert out.model_uri == "models:/nd-smoke@candidate"
    version = client.get_model_version_by_alias("nd-smoke", "candidate")
    assert version.run_id == zero_runs[3][1].run_id  # the last registration holds the alias


class _Payload:  # what a planted checkpoint could unpickle into: code run at load
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoints_are_read_with_weights_only_and_a_planted_pickle_is_refused(zero_runs, tmp_path, capsys):
    """DeepSpeed reads its checkpoints with torch.load(weights_only=False); the loop makes its engine read them
    with weights_only=True: every file of every ZeRO stage's checkpoint loads so, and a pickle that would run
    code does not."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    E.weights_only_loads(engine)
    checkpoints = [Path(zero_runs[stage][1].checkpoint_path) / E.ENGINE_TAG for stage in (0, 1, 2, 3)]
    files = [f for folder in checkpoints for f in folder.glob("*.pt")]
    assert len(files) == 1 + 3 + 3 + 4  # stage 0: one file; 1, 2: model + each rank's optimizer; 3: 2 per rank
    for f in files:
        assert isinstance(engine.checkpoint_engine.load(str(f), map_location="cpu"), dict), f
    torch.save({"module": _Payload()}, tmp_path / "planted.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        engine.checkpoint_engine.load(str(tmp_path / "planted.pt"))
    assert "unpickled code ran" not in capsys.readouterr().out


def test_zero_stages_compute_the_same_losses(zero_runs):
    """Same seed, same data order per rank: ZeRO partitioning must not change the math."""
    ref = _losses(zero_runs[0][1].run_id)
    for stage in (1, 2, 3):
        assert _losses(zero_runs[stage][1].run_id)[:2] == pytest.approx(ref[:2], rel=1e-4), stage


def test_offloaded_optimizer_trains_like_the_one_on_the_worker(zero_runs, local_ray, tmp_path):
    """ZeRO-2 with the optimizer offloaded (DeepSpeed's CPU Adam, compiled on first use, ~1 min): the same first
    loss as the ZeRO-2 run above with torch's AdamW on the worker, the next ones within rounding of it, and
    both ranks' optimizer state in the checkpoint."""
    from pathlib import Path

    from neighbor_diffusion.training import trainer

    cfg = _cfg(tmp_path, zero_stage=2, offload=True, run_name="offload")
    assert E.deepspeed_config(cfg, 2, use_gpu=False)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    out = trainer.train(cfg, {"train": local_ray.data.from_items(synthetic_rows(cfg, n=128))}, register=False)
    ref, got = _losses(zero_runs[2][1].run_id), _losses(out.run_id)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert got == pytest.approx(ref, rel=1e-4) and sum(got[-3:]) < 0.8 * sum(got[:3]), (got, ref)
    assert got != ref  # another Adam ran: here the losses differ from the second step on, by ~1e-7
    files = {p.name for p in (Path(out.checkpoint_path) / E.ENGINE_TAG).iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files, files


def test_registered_model_loads_as_a_pipeline_and_as_an_mlflow_pyfunc_model(zero_runs, monkeypatch):
    import base64
    import io

    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image

    from neighbor_diffusion.data.images import encode_png
    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline
    from neighbor_diffusion.tracking import resolve_pipeline_dir

    uri = "models:/nd-smoke@candidate"
    pipe = NeighborDiffusionPipeline.from_pretrained(resolve_pipeline_dir(uri), "cpu")
    assert pipe.config.train.zero_stage == 3
    photos = [encode_png(Image.new("RGB", (40, 48), color)) for color in [(200, 20, 30), (20, 200, 30)]]
    ref = np.asarray(
        pipe("a mug in snow", [Image.open(io.BytesIO(b)) for b in photos], seed=3, num_inference_steps=2)[0]
    )
    params = {"seed": 3, "num_inference_steps": 2}
    # what an MLflow user does with the registered model: the pipeline's image, as PNG bytes
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict({"prompt": "a mug in snow", "neighbor_images": photos}, params=params)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out["image"][0]))), ref)
    # and what `mlflow models serve` gets: JSON, the images as base64
    request = {"prompt": "a mug in snow", "neighbor_images": [base64.b64encode(b).decode() for b in photos], "seed": 3}
    served = mlflow.models.validate_serving_input(  # the row's seed, not the params' (0 when left out)
        uri, json.dumps({"dataframe_records": [request], "params": {"num_inference_steps": 2}})
    )
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(served["image"][0]))), ref)
    # a bad row or param there is a 400 ending with the line that names it (was MLflow's generic message)
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init() sets it; restored after the test
    scoring = TestClient(scoring_server.init(model))
    for body, line in [
        ({"dataframe_records": [{**request, "prompt": " "}]}, "row 0: prompt: must be a non-empty string"),
        (
            {"dataframe_records": [request], "params": {"sampler": "euler"}},
            "params: sampler: got 'euler', must be one of ddim, dpm++ (or '': the model's default)",
        ),
    ]:
        r = scoring.post("/invocations", json=body)
        assert r.status_code == 400 and r.json()["message"].endswith(f"Error: {line}"), r.text[-500:]
    # batch inference: rows with as many neighbors share a generate() call; each row's image is its own
    pipe = model.unwrap_python_model().pipe
    calls = []
    generate = pipe.generate
    pipe.generate = lambda prompts, *a, **kw: calls.append(list(prompts)) or generate(prompts, *a, **kw)
    prompts = ["a mug in snow", "a mug on sand", "a mug at night", "a mug", "a mug in a forest"]
    batch = pd.DataFrame({"prompt": prompts, "neighbor_images": [photos, photos[:1], photos[::-1], [], photos]})
    images = model.predict(batch, params=params)["image"]
    assert calls == [prompts[0::2][:2], [prompts[1]], [prompts[3]], [prompts[4]]]  # serve.max_batch_size 4
    for i in range(len(batch)):
        alone = model.predict(batch.iloc[[i]], params=params)["image"][0]
        pixels = [np.asarray(Image.open(io.BytesIO(b)), dtype=int) for b in (images[i], alone)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1, f"row {i} depends on the rows beside it"
    # equal rows give equal images unless each has its own seed; they still share a generate() call
    calls.clear()
    seeded = pd.DataFrame({"prompt": ["a mug in snow"] * 3, "neighbor_images": [photos] * 3, "seed": [3, 4, 3]})
    pixels = [np.asarray(Image.open(io.BytesIO(b)), dtype=int) for b in model.predict(seeded, params=params)["image"]]
    assert calls == [["a mug in snow"] * 3]
    assert np.abs(pixels[0] - ref).max() <= 1 and np.abs(pixels[2] - ref).max() <= 1
    assert np.abs(pixels[1] - ref).max() > 10
    # the server's sampling options are params; under interleaved guidance each row takes its per-step choices
    # from its own seed (3 and 4 choose differently at the second step), and rows still share a call
    interleaved = {**params, "guidance_mode": "interleaved", "interleave_ratio": 0.5}
    calls.clear()
    images = model.predict(seeded, params=interleaved)["image"]
    assert calls == [["a mug in snow"] * 3]
    for i in range(len(seeded)):
        alone = model.predict(seeded.iloc[[i]], params=interleaved)["image"][0]
        pixels = [np.asarray(Image.open(io.BytesIO(b)), dtype=int) for b in (images[i], alone)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1, f"interleaved row {i} depends on the rows beside it"
        if i == 0:
            assert np.abs(pixels[0] - ref).max() > 10  # not the joint guidance's image
    for bad, message in [
        ({"num_inference_steps": 1000}, r"params: num_inference_steps: got 1000, must be in 1\.\.100 \(or 0: "),
        ({"sampler": "euler"}, r"params: sampler: got 'euler', must be one of ddim, dpm\+\+ \(or '': "),
        ({"interleave_ratio": 1.5}, r"params: interleave_ratio: got 1.5, must be in 0\.\.1 "),
        ({"text_guidance": float("nan")}, r"params: text_guidance: got nan"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.predict(seeded, params={**params, **bad})
    calls.clear()
    rows = pd.DataFrame({"prompt": ["a mug in snow", "a mug", " "], "neighbor_images": [photos, photos, photos]})
    with pytest.raises(ValueError, match="row 2: prompt"):
        model.predict(rows)
    assert calls == []  # every row is checked before any is sampled
    with pytest.raises(ValueError, match=rf"row 0: neighbor_images: got 9, need 1..{pipe.max_neighbors}"):
        model.predict({"prompt": "a mug in snow", "neighbor_images": [b"not decoded"] * 9})
    with pytest.raises(ValueError, match=r"row 0: neighbor_captions: got 1 for 2 neighbor_images"):
        model.predict({"prompt": "a mug in snow", "neighbor_images": photos, "neighbor_captions": ["a mug"]})
    with pytest.raises(ValueError, match=r"row 1: seed: got -1, need an integer in 0..4294967295"):
        model.predict(pd.DataFrame({"prompt": ["a mug"] * 2, "neighbor_images": [photos] * 2, "seed": [0, -1]}))
    with pytest.raises(ValueError, match=r"row 0: neighbor_images\[1\]"):
        model.predict({"prompt": "a mug in snow", "neighbor_images": [photos[0], photos[1][:20]]})
    # within the model's serve.* limits, as the server (each decoded image was up to 4096x4096 whatever they said)
    limits = dataclasses.replace(pipe.config.serve, max_image_pixels=1024 * 1024)  # as an operator might set
    pipe.config = dataclasses.replace(pipe.config, serve=limits)
    big = encode_png(Image.new("RGB", (1200, 1000)))  # 1.2 megapixels, few bytes
    for row, message in [
        ({"prompt": "a" * (limits.max_prompt_chars + 1)}, rf"row 0: prompt: {limits.max_prompt_chars + 1} characters"),
        ({"neighbor_captions": ["a mug", "b" * 201]}, r"row 0: neighbor_captions\[1\]: 201 characters > serve\.max_c"),
        ({"neighbor_images": [photos[0], big]}, r"row 0: neighbor_images\[1\].*1200x1000 pixels > 1048576"),
        # not NULs: MLflow's numpy bytes drop trailing ones
        ({"neighbor_images": [b"\xff" * (limits.max_image_bytes + 1)]}, r"neighbor_images\[0\]: \d+ bytes > serve\."),
    ]:
        with pytest.raises(ValueError, match=message):
            model.predict({"prompt": "a mug in snow", "neighbor_images": photos, **row})


def test_a_run_from_a_base_keeps_its_backbone_and_trains_the_neighbor_layers_at_their_lr(
    zero_runs, local_ray, tmp_path, monkeypatch
):
    """ZeRO-3 on 2 workers from the stage-0 run's backbone (exported as `make base` does), a file the driver
    removes right after reading it, so that the workers can only have the weights from Ray's object store (as
    on nodes that do not share the driver's disk). The backbone's lr is ~0 and the neighbor layers' 1e6 times
    it, so the export keeps the base's backbone and has moved the neighbor layers. Also: a models:/ URI is
    recorded as given and its download removed."""
    import tempfile

    from mlflow import MlflowClient
    from safetensors import safe_open
    from safetensors.torch import load_file

    from neighbor_diffusion.training import trainer

    base_cfg, base_out = zero_runs[0]
    base_dir = base_out.pipeline_dir
    backbone = trainer.export_backbone(base_dir, tmp_path / "base.safetensors", {"command": "make base"})
    with safe_open(str(backbone), "pt") as f:
        assert f.metadata() == {"command": "make base"} and not any(map(E.is_neighbor_parameter, f.keys()))

    (version,) = MlflowClient().search_model_versions(f"run_id='{base_out.run_id}'")
    uri = f"models:/{base_cfg.train.registered_model}/{version.version}"
    downloads = set(Path(tempfile.gettempdir()).glob("init-from-*"))
    assert E.read_init_from(_cfg(tmp_path, init_from=uri)) == (uri, (base_dir / UNET_FILE).read_bytes())
    assert set(Path(tempfile.gettempdir()).glob("init-from-*")) == downloads

    read = E.read_init_from
    monkeypatch.setattr(E, "read_init_from", lambda cfg: (read(cfg), backbone.unlink())[0])
    run = dict(lr=1e-9, warmup_steps=0, neighbor_lr_scale=1e6, neighbor_gate_init=0.5)
    cfg = _cfg(
        tmp_path, zero_stage=3, run_name="from-base", steps=3, checkpoint_every=3, init_from=str(backbone), **run
    )
    out = trainer.train(cfg, {"train": local_ray.data.from_items(synthetic_rows(cfg, n=64))}, register=False)
    assert not backbone.exists()
    base, got = load_file(base_dir / UNET_FILE), load_file(out.pipeline_dir / UNET_FILE)
    fresh = E.build_unet(
        cfg.__class__.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "init_from": ""}})
    )
    moved = []
    for k, v in got.items():
        if not E.is_neighbor_parameter(k):
            assert torch.allclose(v, base[k], atol=1e-6), k
        elif k.endswith(".gate"):
            assert torch.allclose(v, torch.full_like(v, 0.5), atol=0.02), k
        else:
            moved.append((v - fresh.state_dict()[k]).abs().max().item())
    assert moved and min(moved) > 1e-4, moved
