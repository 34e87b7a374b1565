"""Shared fixtures: the debug preset, a tiny model, a random batch, a local S3 store."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from neighbor_diffusion.config import debug  # noqa: E402
from neighbor_diffusion.model import NeighborUNet  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def cfg():
    return debug()


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    return NeighborUNet.from_model_config(cfg.model, cross_attention_dim=32).eval()


def open_gates(model, value=0.7):
    """Give every neighbor gate a non-zero value so the neighbor branch is live."""
    with torch.no_grad():
        for attn in model.neighbor_attention.values():
            attn.gate.fill_(value)
    return model


def random_batch(cfg, B=2, K=None, T=6, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = K or cfg.model.max_neighbors
    S = cfg.model.image_size
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[:, T - 2 :] = False
    neighbor_mask = torch.ones(B, K, dtype=torch.bool)
    neighbor_mask[0, K - 1] = False  # row 0 has one padding neighbor
    return {
        "image": torch.rand(B, 3, S, S, generator=g) * 2 - 1,
        "text_states": torch.randn(B, T, D, generator=g),
        "text_mask": text_mask,
        "neighbor_images": torch.rand(B, K, 3, S, S, generator=g) * 2 - 1,
        "neighbor_text_states": torch.randn(B, K, T, D, generator=g),
        "neighbor_text_mask": text_mask[:, None].expand(B, K, T).clone(),
        "neighbor_mask": neighbor_mask,
    }


def synthetic_rows(cfg, n=64, D=32, seed=0):
    """Training rows with the stream's keys and dtypes (numpy), from a few repeated examples,
    so a debug model's loss visibly falls within a few steps."""
    import numpy as np

    S, K, T = cfg.model.image_size, cfg.model.max_neighbors, cfg.text.max_length
    rows = []
    for i in range(n):
        r = np.random.default_rng(seed + i % 4)
        text_mask = np.arange(T) < 5
        rows.append(
            {
                "image": np.tanh(r.normal(size=(3, S, S))).astype(np.float32),
                "text_states": r.normal(size=(T, D)).astype(np.float32),
                "text_mask": text_mask,
                "neighbor_images": np.tanh(r.normal(size=(K, 3, S, S))).astype(np.float32),
                "neighbor_text_states": r.normal(size=(K, T, D)).astype(np.float32),
                "neighbor_text_mask": np.tile(text_mask, (K, 1)),
                "neighbor_mask": np.arange(K) < 1 + i % K,
            }
        )
    return rows


@pytest.fixture(scope="module")
def local_ray():
    """A Ray started in process with spare logical CPUs (so Ray Data never starves beside train workers)."""
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """An S3 store on 127.0.0.1 (moto's server, in a thread of this process) with a bucket `nd-test`, and the
    AWS settings that reach it (`AWS_ENDPOINT_URL`, test credentials) in os.environ while it runs, as a user
    of an S3-compatible store (MinIO) sets them; `s3.env` holds them for subprocesses."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="nd-test")
    server.env = env
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
