"""The training job as users run it: killed workers, a killed driver, `ray job submit`, two nodes.

These run `jobs/*.py` in subprocesses on the debug preset and debug data mined once
per module, and take a minute or two each.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(scope="module")
def debug_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    subprocess.run(
        [sys.executable, "jobs/prepare_data.py", "--preset", "debug", "--data.root", str(root)],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return root


def _train_cmd(data_root, storage, run_name, steps, *extra):
    return [
        sys.executable,
        "jobs/train.py",
        "--preset",
        "debug",
        "--data.root",
        str(data_root),
        "--train.storage_path",
        str(storage),
        "--train.run_name",
        run_name,
        "--train.steps",
        str(steps),
        "--train.checkpoint_every",
        "4",
        "--train.log_every",
        "2",
        "--train.num_workers",
        "2",
        "--train.keep_checkpoints",
        "3",
        "--no-register",
        *extra,
    ]


def _latest_step(run_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train has *registered* (written to disk is not enough:
    a checkpoint reported just before a crash may not have reached the controller yet)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0
    return max((r["metrics"]["step"] for r in results), default=0)


def _wait_for_checkpoint(proc, run_dir: Path, timeout=400) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (step := _latest_step(run_dir)) > 0:
            return step
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(1)
    raise TimeoutError("no checkpoint appeared")


def _train_workers(root_pid: int) -> list[psutil.Process]:
    procs = psutil.Process(root_pid).children(recursive=True)
    return [p for p in procs if "RayTrainWorker" in " ".join(p.cmdline() or [])]


def _run(cmd, env, log: Path, **kw):
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, **kw)


def test_killed_worker_resumes_from_latest_checkpoint(debug_data, tmp_path):
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    log = tmp_path / "train.log"
    proc = _run(_train_cmd(debug_data, tmp_path / "runs", "ft", 40, "--train.max_failures", "2"), env, log)
    try:
        reached = _wait_for_checkpoint(proc, tmp_path / "runs" / "ft")
        workers = _train_workers(proc.pid)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        victim = workers[1]
        print("killing", victim.pid, victim.cmdline())
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    resumed = [int(x.split("at step ")[1].split()[0]) for x in text.splitlines() if "resumed from checkpoint" in x]
    assert resumed and resumed[0] >= reached, text[-3000:]
    assert _latest_step(tmp_path / "runs" / "ft") == 40


def test_rerun_of_a_killed_job_continues_from_its_checkpoint(debug_data, tmp_path):
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    cmd = _train_cmd(debug_data, tmp_path / "runs", "rerun", 12)
    first = _run(cmd, env, tmp_path / "first.log", start_new_session=True)
    try:
        reached = _wait_for_checkpoint(first, tmp_path / "runs" / "rerun")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started: a lost head node
        first.wait()
    time.sleep(2)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "resumed from checkpoint at step" in out and "has a checkpoint at step" in out, out[-3000:]
    assert out.count("resumed from checkpoint at step") == 1, out[-3000:]  # the worker's log lines once, not twice
    # no placement-group cleaner on the in-process Ray: it printed a warning a second (its state API is
    # not served) or, beside another local Ray, a traceback
    assert "PlacementGroupCleaner" not in out, out[-3000:]
    assert "Reporting training result" not in out, out[-3000:]  # Ray Train's line per report: quieted in the loop
    resumed = int(out.split("resumed from checkpoint at step ")[1].split()[0])
    assert resumed >= reached > 0
    assert f"steps {resumed}->12" in out and "steps 0->12" not in out, out[-3000:]
    assert _latest_step(tmp_path / "runs" / "rerun") == 12
    # ... and continues as if never stopped: same data position, noise and optimizer state, so the losses
    # it logs after the resume are those of a run that was not stopped
    ref = subprocess.run(
        _train_cmd(debug_data, tmp_path / "runs", "uninterrupted", 12), cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    after = {s: v for s, v in _logged_losses(out).items() if s > resumed}
    assert after and after == {s: v for s, v in _logged_losses(ref.stdout + ref.stderr).items() if s > resumed}


def test_a_run_on_object_storage_resumes_its_mlflow_run_and_refuses_another_model(s3, tmp_path, monkeypatch, capsys):
    """train.storage_path on S3 (infra/'s setting): a re-run finds the earlier run's checkpoint and MLflow run
    there, and refuses a changed model, as with a local folder."""
    from neighbor_diffusion.config import ConfigError, debug, override
    from neighbor_diffusion.data import storage
    from neighbor_diffusion.training import trainer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = override(debug(), {"train.storage_path": "s3://nd-test/runs", "train.run_name": "resume-me"})
    run_dir = storage.location(trainer.storage_root(cfg)) / "resume-me"
    assert not trainer.check_resumable(cfg, run_dir)  # nothing there yet
    run_id = trainer._mlflow_run(cfg, run_dir, resuming=False)
    assert (run_dir / "mlflow_run_id").read_text() == run_id
    progress = {"step": 4, "config": json.loads(json.dumps(cfg.to_dict()))}  # as the loop writes it
    (run_dir / "checkpoint_2026-11-25_00-00-00.000000" / "progress.json").write_text(json.dumps(progress))
    capsys.readouterr()
    assert trainer.check_resumable(cfg, run_dir)
    assert "s3://nd-test/runs/resume-me has a checkpoint at step 4: resuming from it" in capsys.readouterr().out
    assert trainer._mlflow_run(cfg, run_dir, resuming=True) == run_id  # the run id kept on S3: the same MLflow run
    wider = override(cfg, {"model.block_out_channels": "16,48"})
    with pytest.raises(ConfigError, match=r"s3://nd-test/runs/resume-me holds checkpoints of another model"):
        trainer.check_resumable(wider, run_dir)


def _logged_losses(log: str) -> dict[int, str]:
    """{step: loss as logged} from the job log's "[train] step N/M loss X" lines."""
    found = re.findall(r"\[train\] step (\d+)/\d+ loss (\S+)", log)
    return {int(step): loss for step, loss in found}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_head(temp_dir: Path) -> None:
    """Stop exactly the Ray head started under temp_dir (never `ray stop`: it ends every Ray on the machine)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                p.kill()
        except psutil.Error:
            pass


def test_ray_job_submit_against_a_local_head(debug_data, tmp_path, s3):
    """`ray job submit` of the training job to a head node, its data and its checkpoints on object storage (S3 on
    127.0.0.1), as on a cluster whose nodes share no disk (infra/)."""
    import pyarrow.fs as pafs
    import yaml

    bucket = pafs.S3FileSystem(endpoint_override=s3.env["AWS_ENDPOINT_URL"], region="us-east-1")
    pafs.copy_files(str(debug_data), "nd-test/job-data", destination_filesystem=bucket)

    bin_dir = str(Path(sys.executable).parent)
    env = {**ENV, "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    port, dash = _free_port(), _free_port()
    import tempfile

    # short (Unix socket paths are capped at 107 bytes) and unique: it names this head's processes
    temp_dir = Path(tempfile.mkdtemp(prefix="ndray", dir="/tmp"))
    start = subprocess.run(
        [
            f"{bin_dir}/ray",
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        runtime_env = yaml.safe_load((ROOT / "infra/runtime_env/local.yaml").read_text())
        runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
        runtime_env["env_vars"].update(s3.env)  # the S3 endpoint and credentials, for the driver and its workers
        (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
        submit_cmd = [
            f"{bin_dir}/ray",
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--runtime-env",
            str(tmp_path / "runtime_env.yaml"),
            "--",
            "python",
            "jobs/train.py",
            "--preset",
            "debug",
            "--data.root",
            "s3://nd-test/job-data",
            "--train.storage_path",
            "s3://nd-test/job-runs",
            "--train.steps",
            "4",
            "--train.checkpoint_every",
            "4",
            "--train.num_workers",
            "2",
            "--train.cpus_per_worker",
            "0.5",
        ]
        for _ in range(30):  # the head's job agent comes up a little after `ray start` returns
            submit = subprocess.run(submit_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            out = submit.stdout + submit.stderr
            if "No available agent" not in out:
                break
            time.sleep(2)
        assert submit.returncode == 0 and "succeeded" in out, out[-4000:]
        assert "clusters from s3://nd-test/job-data/debug/clusters" in out, out[-4000:]
        assert "[train] step 4/4" in out and "registered neighbor-diffusion version 1" in out, out[-4000:]
    finally:
        _kill_head(temp_dir)
    # on S3: the checkpoint at step 4 and the MLflow run a re-run would continue
    from mlflow import MlflowClient

    from neighbor_diffusion.data import storage

    run_dir = storage.location("s3://nd-test/job-runs/neighbor-diffusion")
    progress = [p / "progress.json" for p in storage.children(run_dir) if p.name.startswith("checkpoint_")]
    assert [json.loads(p.read_text())["step"] for p in progress if p.is_file()] == [4], progress
    version = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_model_version("neighbor-diffusion", "1")
    assert (run_dir / "mlflow_run_id").read_text() == version.run_id


def test_two_node_cluster_places_workers_on_both_nodes(tmp_path, monkeypatch):
    import dataclasses

    import ray
    from ray.cluster_utils import Cluster

    from conftest import synthetic_rows
    from neighbor_diffusion import config as C
    from neighbor_diffusion.training import trainer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address)
        cfg = C.debug()
        cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(
                cfg.train,
                steps=4,
                checkpoint_every=2,
                log_every=2,
                batch_size=4,
                num_workers=2,
                cpus_per_worker=1.5,
                storage_path=str(tmp_path / "shared"),
                run_name="two-nodes",
            ),
        )
        out = trainer.train(cfg, {"train": ray.data.from_items(synthetic_rows(cfg, 64))}, register=False)
        assert out.metrics["step"] == 4
        # the actor table lives in the GCS (the state API would need the dashboard)
        from ray._private.state import state

        workers = [a for a in state.actor_table(None).values() if a["ActorClassName"] == "RayTrainWorker"]
        assert len(workers) == 2 and len({w["Address"]["NodeID"] for w in workers}) == 2, workers
        # both ranks wrote their DeepSpeed shard into the one shared checkpoint
        assert (Path(out.checkpoint_path) / "state" / "mp_rank_00_model_states.pt").is_file()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_bad_setting_ends_a_job_or_the_server_in_one_line_naming_it(debug_data, tmp_path, monkeypatch, capsys, s3):
    """Settings the driver checks end the command as argparse's own errors do (`prog: error: ...`, exit 2),
    before the work starts, not as a traceback or a failed deployment."""
    from jobs import evaluate, prepare_data, train
    from neighbor_diffusion import tracking
    from neighbor_diffusion.config import debug
    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline
    from serving import app

    # a models:/ URI where there is no store (the default one, in the working dir): said, and none made by asking
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for main, argv in [
        (evaluate.main, ["--model", "models:/nd-none@candidate"]),
        (app.main, ["--serve.model_uri", "models:/nd-none/3"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and last.endswith(
            f"='{argv[1]}': no MLflow store: {tmp_path / 'mlflow.db'} does not exist (the default store, mlflow.db in "
            "the working directory: run where the model was trained, or set MLFLOW_TRACKING_URI)"
        ), last
    assert not (tmp_path / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tracking.setup("nd-test")  # the store exists from here on
    NeighborDiffusionPipeline.from_config(debug()).save_pretrained(tmp_path / "pipe")
    cases = [
        (train.main, ["--preset", "debug", "--train.steps", "0"], r"train\.steps=0: must be >= 1"),
        (
            prepare_data.main,
            ["--preset", "debug", "--data.input", str(tmp_path / "crawl")],
            r"data\.input='.*crawl': no such folder \(data\.input_format=webdataset\)",
        ),
        (
            prepare_data.main,
            ["--preset", "debug", "--data.root", "s3://nd-none/data"],
            r"data\.root='s3://nd-none/data': .*Bucket 'nd-none' not found.*",
        ),
        (
            train.main,
            ["--preset", "debug", "--data.root", "nope://data"],
            r"data\.root='nope://data': cannot open it .*",
        ),
        (  # the world's split differs from the mined data's: the samples' held-out subjects would be trained on
            train.main,
            ["--preset", "debug", "--data.root", str(debug_data), "--data.num_heldout_subjects", "5"],
            r"data\.num_heldout_subjects=5, but .*debug was mined with 8: its held-out subjects are others, .*",
        ),
        (evaluate.main, ["--model", str(tmp_path / "nope")], r"--model='.*nope': not a pipeline folder"),
        (
            evaluate.main,
            ["--model", "models:/nd-none@candidate"],
            r"--model='models:/nd-none@candidate': Registered Model with name=nd-none not found \(MLflow store sqlite",
        ),
        (
            evaluate.main,
            ["--model", str(tmp_path / "pipe"), "--dreambench", str(tmp_path / "db")],
            r"--dreambench='.*db': no such folder",
        ),
        (
            evaluate.main,
            ["--model", str(tmp_path / "pipe"), "--subjects", "0"],
            r"argument --subjects: 0: must be >= 1",
        ),
        (
            evaluate.main,
            ["--model", str(tmp_path / "pipe"), "--interleave-ratio", "2"],
            r"--interleave-ratio=2\.0: must be in 0\.\.1",
        ),
        (  # the model's scheduler has 1000 training timesteps: no more sampling steps
            evaluate.main,
            ["--model", str(tmp_path / "pipe"), "--steps", "1001"],
            r"--steps=1001: must be in 1\.\.1000",
        ),
        (
            evaluate.main,
            ["--model", str(tmp_path / "pipe"), "--out", "s3://nd-none/eval"],
            r"--out='s3://nd-none/eval': .*Bucket 'nd-none' not found.*",
        ),
        (app.main, ["--serve.port", "0", "--serve.model_uri", "x"], r"serve\.port=0: must be a TCP port"),
        (app.main, ["--serve.model_uri", "models:/nd-none/3"], r"serve\.model_uri='models:/nd-none/3': .*nd-none"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and err and re.fullmatch(rf".+?: error: {message}.*", err[-1]), (argv, err)
        assert not any("Traceback" in line for line in err), (argv, err)
    assert not (tmp_path / "runs" / "eval").exists()  # no evaluation that failed its checks left a report folder

    # the real command, with Ray started: train.init_from is checked in the driver before any worker starts
    cmd = _train_cmd(debug_data, tmp_path / "runs", "bad-init", 4, "--train.init_from", "models:/nd-none@candidate")
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last == (
        "train.py: error: train.init_from='models:/nd-none@candidate': Registered Model with name=nd-none not found "
        f"(MLflow store sqlite:///{tmp_path}/mlflow.db)"
    ), last
    assert not (tmp_path / "runs" / "bad-init").exists()  # no worker started, no checkpoint folder
