"""infra/: nothing can be deployed from here, so every file is checked statically and by local dry runs.

What a cluster would reject is checked against the schema that decides: Ray's cluster-launcher schema
(ships in the ray wheel), Serve's deploy schema, Ray's RuntimeEnv, Kubernetes' own schemas
(kubernetes-validate, for built-in kinds and the pod templates inside KubeRay resources) and a schema
written from the KubeRay ray.io/v1 CRD fields. Generated parts must be current (infra/render.py --check)
and agree with what serving/ builds. A PostgreSQL-backed MLflow server runs for real when the Debian
postgresql binaries are present.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher"


def load_render():
    spec = importlib.util.spec_from_file_location("infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()
RAY_VERSION = render.ray_version()


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def ray_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in docs(p) if d["apiVersion"] == "ray.io/v1"]


def cluster_spec(resource: dict[str, Any]) -> dict[str, Any]:
    spec = resource["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        resource["kind"]
    ]


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for t in pod_templates(spec) for c in t["spec"]["containers"]]


def gpus(group: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in group["template"]["spec"]["containers"]
    )


# ---------------------------------------------------------------------------- parsing, generation, versions


def test_every_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 12
    for path in files:
        assert docs(path), f"{path}: empty"


def test_render_check_passes():
    """The generated blocks (serveConfigV2, runtimeEnvYAML, Ray version pins, plain-ray.yaml) are current."""
    assert render.main(["--check"]) == 0, "run `python infra/render.py`"


def test_replace_block_keeps_the_rest_of_the_file():
    text = "a: 1\nb: |\n  old\n\n  older\nc:\n  d: 2\n"
    assert render.replace_block(text, "b", "x: 1\ny: [2]\n", Path("t")) == "a: 1\nb: |\n  x: 1\n  y: [2]\nc:\n  d: 2\n"


def test_ray_version_is_the_pyproject_pin_everywhere():
    import ray

    assert ray.__version__ == RAY_VERSION
    for path, resource in ray_resources():
        assert cluster_spec(resource)["rayVersion"] == RAY_VERSION, path
    for path in INFRA.glob("docker/Dockerfile*"):
        if path.suffix != ".dockerignore":
            assert f"ARG RAY_VERSION={RAY_VERSION}\n" in path.read_text(), path
    for path in LAUNCHER.glob("*.yaml"):
        assert docs(path)[0]["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311-"), path


def test_image_tags_are_pinned_and_consistent():
    # one project image across every KubeRay resource
    images = {c["image"] for _, r in ray_resources() for c in containers(cluster_spec(r))}
    assert len(images) == 1, images
    (image,) = images
    assert image.endswith(f":{render.pyproject()['project']['version']}-gpu"), image
    # the cluster launcher runs the same CUDA flavour of Ray's image as the Dockerfile builds on
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    cuda = next(line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG CUDA_TAG="))
    assert {docs(p)[0]["docker"]["image"] for p in LAUNCHER.glob("*.yaml")} == {
        f"rayproject/ray:{RAY_VERSION}-py311-{cuda}"
    }
    # every image anywhere has an explicit tag, never `latest`
    refs = [c["image"] for _, r in ray_resources() for c in containers(cluster_spec(r))]
    refs += [s["image"] for s in docs(INFRA / "mlflow/compose.yaml")[0]["services"].values() if "image" in s]
    refs += [
        c["image"]
        for d in docs(INFRA / "mlflow/mlflow.yaml")
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    for path in INFRA.glob("*/Dockerfile*"):
        refs += [line.split()[1] for line in path.read_text().splitlines() if line.startswith("FROM ")]
    for ref in refs:
        name, _, tag = ref.rpartition(":")
        assert name and tag and "/" not in tag and tag != "latest", ref


def test_mlflow_server_version_matches_the_client_pin():
    from packaging.requirements import Requirement

    spec = next(Requirement(d) for d in render.pyproject()["project"]["dependencies"] if d.startswith("mlflow"))
    dockerfile = (INFRA / "mlflow/Dockerfile").read_text()
    version = dockerfile.split("mlflow==", 1)[1].split()[0]
    assert spec.specifier.contains(version), (version, str(spec))
    (deployment,) = [d for d in docs(INFRA / "mlflow/mlflow.yaml") if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{version}")


# ---------------------------------------------------------------------------- KubeRay resources

STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # KubeRay: map[string]string
INT = {"type": "integer", "minimum": 0}
OBJ = {"type": "object"}
POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # its insides: Kubernetes' schema, below
HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": OBJ,
        "enableIngress": {"type": "boolean"},
        "rayStartParams": STR_MAP,
        "template": POD_TEMPLATE,
    },
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "template"],
    "additionalProperties": False,
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string"},
        "replicas": INT,
        "minReplicas": INT,
        "maxReplicas": INT,
        "idleTimeoutSeconds": INT,
        "rayStartParams": STR_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": OBJ,
        "numOfHosts": INT,
    },
}
CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "autoscalerOptions": OBJ,
        "headServiceAnnotations": STR_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {
            "type": "object",
            "required": ["redisAddress"],
            "additionalProperties": False,
            "properties": {
                "redisAddress": {"type": "string"},
                "redisPassword": OBJ,
                "redisUsername": OBJ,
                "externalStorageNamespace": {"type": "string"},
            },
        },
        "headGroupSpec": HEAD_GROUP,
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
}
SPECS = {
    "RayCluster": CLUSTER_SPEC,
    "RayJob": {
        "type": "object",
        "required": ["entrypoint", "rayClusterSpec"],
        "additionalProperties": False,
        "properties": {
            "activeDeadlineSeconds": INT,
            "backoffLimit": INT,
            "rayClusterSpec": CLUSTER_SPEC,
            "submitterPodTemplate": POD_TEMPLATE,
            "metadata": STR_MAP,
            "clusterSelector": STR_MAP,
            "submitterConfig": OBJ,
            "managedBy": {"type": "string"},
            "deletionStrategy": OBJ,
            "entrypoint": {"type": "string"},
            "runtimeEnvYAML": {"type": "string"},
            "jobId": {"type": "string"},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            "entrypointResources": {"type": "string"},
            "entrypointNumCpus": {"type": "number"},
            "entrypointNumGpus": {"type": "number"},
            "ttlSecondsAfterFinished": INT,
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "suspend": {"type": "boolean"},
        },
    },
    "RayService": {
        "type": "object",
        "required": ["serveConfigV2", "rayClusterConfig"],
        "additionalProperties": False,
        "properties": {
            "serviceUnhealthySecondThreshold": INT,
            "deploymentUnhealthySecondThreshold": INT,
            "serveService": OBJ,
            "upgradeStrategy": OBJ,
            "serveConfigV2": {"type": "string"},
            "rayClusterConfig": CLUSTER_SPEC,
            "excludeHeadPodFromServeSvc": {"type": "boolean"},
        },
    },
}


def test_kuberay_resources_match_the_crd_fields():
    kinds = set()
    for path, resource in ray_resources():
        kinds.add(resource["kind"])
        schema = {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"enum": list(SPECS)},
                "metadata": {"type": "object", "required": ["name"]},
                "spec": SPECS[resource["kind"]],
            },
        }
        jsonschema.validate(resource, schema)
        spec = cluster_spec(resource)
        names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
        assert len(names) == len(set(names)), path
        for group in spec.get("workerGroupSpecs", []):
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (path, group["groupName"])
    assert kinds == {"RayCluster", "RayJob", "RayService"}


def test_pod_templates_and_builtin_kinds_match_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version()
    for _, resource in ray_resources():
        for template in pod_templates(cluster_spec(resource)):
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            kv.validate(pod, version, strict=True)
    for path in [INFRA / "mlflow/mlflow.yaml", KUBERAY / "shared-storage.yaml"]:
        for d in docs(path):
            kv.validate(d, version, strict=True)


def test_gcs_fault_tolerance_on_long_lived_clusters_only():
    for path, resource in ray_resources():
        ft = "gcsFaultToleranceOptions" in cluster_spec(resource)
        assert ft == (resource["kind"] != "RayJob"), path


def test_shared_storage_is_mounted_on_every_pod_of_the_data_and_training_clusters():
    (pvc,) = docs(KUBERAY / "shared-storage.yaml")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for path, resource in ray_resources():
        if resource["kind"] == "RayService":
            continue
        for template in pod_templates(cluster_spec(resource)):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            claim = volumes["shared"]["persistentVolumeClaim"]["claimName"]
            assert claim == pvc["metadata"]["name"], path
            mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"]}
            assert "/mnt/shared" in mounts, path


def rayjob(name: str) -> dict[str, Any]:
    (resource,) = docs(KUBERAY / f"rayjob-{name}.yaml")
    return resource


def job_config(resource: dict[str, Any]):
    import argparse

    from neighbor_diffusion.config import add_cli_arguments, from_cli_args

    argv = shlex.split(resource["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv[:2]
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    parser.add_argument("--no-register", action="store_true")
    return from_cli_args(parser.parse_args(argv[2:]))


def test_rayjobs_run_the_jobs_with_valid_flags_on_shared_storage():
    prepare, train = job_config(rayjob("prepare-data")), job_config(rayjob("train"))
    assert prepare.data.root == train.data.root and train.data.root.startswith("/mnt/shared/")
    assert prepare.preset == train.preset == "gpu-base"
    # multi-node: checkpoints must live where every worker and a restarted driver see them
    assert "://" in train.train.storage_path, train.train.storage_path
    assert train.train.use_gpu
    for name in ("prepare-data", "train"):
        spec = rayjob(name)["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["submissionMode"] == "K8sJobMode"  # the submitter pod has the image: working_dir is in it


def test_train_rayjob_has_one_gpu_per_train_worker():
    train = job_config(rayjob("train"))
    groups = rayjob("train")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert sum(g["minReplicas"] * gpus(g) for g in groups) == train.train.num_workers


def test_rayservice_serve_config_is_what_serving_builds():
    from ray.serve.schema import ServeDeploySchema

    from neighbor_diffusion.config import override, preset
    from serving.app import serve_config

    (service,) = docs(KUBERAY / "rayservice.yaml")
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(deployed)  # what the dashboard's serve API accepts
    file_cfg = yaml.safe_load((ROOT / "serving/serve_config.yaml").read_text())
    model_uri = file_cfg["applications"][0]["args"]["serve"]["model_uri"]
    cluster = override(
        preset("gpu-base"),
        {"serve.host": "0.0.0.0", "serve.num_gpus": "1", "serve.num_cpus": "1", "serve.model_uri": model_uri},
    )
    assert deployed == serve_config(cluster)
    # and it differs from the checked-in file only where infra/render.py says
    assert deployed == render.cluster_serve_config(file_cfg)
    # every model replica can get its GPU
    model = next(d for d in deployed["applications"][0]["deployments"] if d["name"] == render.MODEL_DEPLOYMENT)
    needed = model["autoscaling_config"]["max_replicas"] * model["ray_actor_options"]["num_gpus"]
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(g["maxReplicas"] * gpus(g) for g in groups) >= needed


# ---------------------------------------------------------------------------- runtime envs, launcher, Docker


def runtime_envs() -> dict[str, dict[str, Any]]:
    envs = {p.name: docs(p)[0] for p in sorted((INFRA / "runtime_env").glob("*.yaml"))}
    for name in ("prepare-data", "train"):
        envs[f"rayjob-{name}"] = yaml.safe_load(rayjob(name)["spec"]["runtimeEnvYAML"])
    return envs


def test_runtime_envs_are_valid_and_exclude_outputs_not_code():
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    local = docs(INFRA / "runtime_env/local.yaml")[0]
    for name, env in runtime_envs().items():
        # raises on unknown fields and wrong types; a working_dir inside the image is checked here as the repo
        in_image = env["working_dir"] == "/home/ray/neighbor-diffusion"
        RuntimeEnv(**{**env, "working_dir": str(ROOT) if in_image else env["working_dir"]})
        assert all(e.startswith("/") for e in env["excludes"]), f"{name}: anchor excludes (platform/.../data is code)"
        excluded = _get_excludes(ROOT, env["excludes"])  # Ray's own matcher for working_dir uploads
        assert excluded(ROOT / "data/cpu/manifest.json") and excluded(ROOT / "runs/x/checkpoint")
        assert not excluded(ROOT / "platform/neighbor_diffusion/data/mining.py")
        assert env["env_vars"].items() >= local["env_vars"].items(), name
        if name != "local.yaml":
            assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http"), name
    assert set(runtime_envs()["plain-ray.yaml"]["pip"]["packages"]) >= {"torch==2.13.0", "deepspeed==0.19.8"}


def test_local_job_submit_test_uses_the_infra_runtime_env():
    text = (ROOT / "tests/test_training_jobs.py").read_text()
    assert '"infra/runtime_env/local.yaml"' in text
    assert docs(INFRA / "runtime_env/local.yaml")[0]["working_dir"] == "."


def test_other_excludes_are_anchored_too():
    for path in LAUNCHER.glob("*.yaml"):
        assert all(e.startswith("/") for e in docs(path)[0]["rsync_exclude"]), path
    for path in INFRA.glob("docker/*.dockerignore"):
        lines = [x for x in path.read_text().splitlines() if x and not x.startswith("#")]
        assert all(x.startswith(("/", "**/")) for x in lines), path


def test_cluster_launcher_configs_validate_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    for path in LAUNCHER.glob("*.yaml"):
        config = docs(path)[0]
        validate_config(prepare_config(config))  # the schema that ships in the ray wheel
        gpu_types = [t for n, t in config["available_node_types"].items() if n.startswith("gpu")]
        assert gpu_types, path
        for node_type in gpu_types:
            node = node_type["node_config"]
            spot = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or {
                "provisioningModel": "SPOT"
            } in node.get("scheduling", [])
            assert spot, path
        for command in config["setup_commands"]:
            for word in command.split():
                if word.startswith("/home/ray/neighbor-diffusion/"):
                    assert (ROOT / word.removeprefix("/home/ray/neighbor-diffusion/")).exists(), word


def test_dockerfiles_lint_and_prebuild_only_ops_that_exist():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    dockerfiles = [p for p in INFRA.glob("*/Dockerfile*") if p.suffix != ".dockerignore"]
    if hadolint:
        result = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    for path in INFRA.glob("docker/Dockerfile*"):
        if path.suffix == ".dockerignore":
            continue
        text = path.read_text()
        assert "-c constraints.txt" in text and "torch==2.13.0" in text, path
        line = next(x for x in text.replace("\\\n", " ").splitlines() if "prebuild_ops.py" in x)
        accelerator = line.split("DS_ACCELERATOR=", 1)[1].split()[0]
        builders = line.split("prebuild_ops.py", 1)[1].split(";")[0].split()
        assert "FusedAdamBuilder" not in builders  # the trainer passes torch's AdamW
        if accelerator == "cpu":  # the CUDA accelerator cannot be loaded on this machine
            env = {**os.environ, "DS_ACCELERATOR": "cpu"}
            cmd = [sys.executable, str(INFRA / "docker/prebuild_ops.py"), "--dry-run", *builders]
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
    assert (INFRA / "docker/Dockerfile.dockerignore").read_text() == (
        INFRA / "docker/Dockerfile.cpu.dockerignore"
    ).read_text()


def test_compose_keeps_ports_on_loopback_and_secrets_out():
    (compose,) = docs(INFRA / "mlflow/compose.yaml")
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    text = (INFRA / "mlflow/compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text and "change-me" not in text
    args = " ".join(compose["services"]["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg://" in args and "--artifacts-destination=s3://" in args


# ---------------------------------------------------------------------------- a real PostgreSQL-backed MLflow


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up in {timeout} s")


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 (password auth over TCP, as a team's server would have)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (Debian: apt-get install -y postgresql)")
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (the PostgreSQL driver in infra/mlflow)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the package's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str, env: dict[str, str] | None = None) -> None:
        result = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, f"{cmd[0]}: {result.stdout}{result.stderr}"

    # not under pytest's tmp_path: that is private to root, and the server runs as postgres
    base = Path(tempfile.mkdtemp(prefix="nd-infra-pg-"))
    password = os.urandom(12).hex()
    (base / "pw").write_text(password)
    if as_user:
        for path in (base, base / "pw"):
            shutil.chown(path, "postgres")
    port, data = free_port(), base / "data"
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", f"--pwfile={base / 'pw'}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")  # fmt: skip
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "30", "-l", str(base / "log"), "-o", opts, "start")
        try:
            env = {**os.environ, "PGPASSWORD": password}
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow", env=env)
            yield f"postgresql+psycopg://mlflow:{password}@127.0.0.1:{port}/mlflow"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_mlflow_server_with_postgres_backend_logs_runs_and_registers_models(postgres, tmp_path, monkeypatch):
    """The server of infra/mlflow (PostgreSQL + proxied artifacts) with the project's own tracking helpers."""
    import mlflow

    from neighbor_diffusion import tracking

    previous_uri = mlflow.get_tracking_uri()
    port = free_port()
    artifacts = tmp_path / "artifacts"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        f"--backend-store-uri={postgres}",
        f"--artifacts-destination={artifacts.as_uri()}",
        "--serve-artifacts",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=out, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", 90, server, log)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # how jobs point at it (infra/runtime_env)
        tracking.setup("infra-test")
        with mlflow.start_run() as run:
            mlflow.log_param("preset", "debug")
            mlflow.log_metric("loss", 0.5, step=1)
        pipeline = tmp_path / "pipeline"
        pipeline.mkdir()
        (pipeline / "config.json").write_text('{"preset": "debug"}')
        version = tracking.register_pipeline(run.info.run_id, pipeline, "infra-test-model")
        got = mlflow.get_run(run.info.run_id)
        assert got.data.params == {"preset": "debug"} and got.data.metrics == {"loss": 0.5}
        assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: clients need no bucket credentials
        assert list(artifacts.rglob("pipeline/config.json"))  # landed in the artifact destination
        resolved = tracking.resolve_pipeline_dir("models:/infra-test-model@candidate")
        assert (Path(resolved) / "config.json").read_text() == '{"preset": "debug"}'
        assert version.version == "1"
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
