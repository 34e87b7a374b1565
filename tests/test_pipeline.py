"""NeighborDiffusionPipeline: image conversion, errors that name the input, save/load."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import open_gates
from neighbor_diffusion.config import debug
from neighbor_diffusion.data.images import ImageError, decode_image, to_tensor
from neighbor_diffusion.pipeline import NeighborDiffusionPipeline


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = NeighborDiffusionPipeline.from_config(debug())
    open_gates(p.unet)
    return p


def _subject(color, size=(48, 40)):
    return Image.new("RGB", size, color)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "1", "I", "F"])
def test_any_mode_becomes_rgb_in_range(mode):
    img = Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)).convert(
        "RGB" if mode in ("I;16", "I", "F") else mode
    )
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray((np.arange(1500).reshape(30, 50) * 40).astype(np.uint16))
        if mode != "I;16":
            img = img.convert(mode)
    x = to_tensor(img, 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_decode_rejects_bad_bytes_with_the_name():
    with pytest.raises(ImageError, match="n0: empty"):
        decode_image(b"", "n0")
    with pytest.raises(ImageError, match="n1: undecodable"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", "n1")
    with pytest.raises(ImageError, match="n1: undecodable") as e:
        decode_image(b"not an image", "n1")
    assert e.value.detail == "UnidentifiedImageError: cannot identify image file"  # not PIL's <BytesIO object at ...>
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="n2: too_large"):
        decode_image(buf.getvalue(), "n2", max_pixels=1000)
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(ImageError, match="n3: undecodable"):
        decode_image(truncated, "n3")


def test_call_returns_images_and_is_seeded(pipe):
    nbs = [_subject((200, 30, 30)), _subject((180, 40, 20), (20, 60))]
    a = pipe("a photo of the toy on a beach", nbs, num_images=2, seed=3, num_inference_steps=4)
    assert len(a) == 2 and a[0].size == (32, 32) and a[0].mode == "RGB"
    b = pipe("a photo of the toy on a beach", nbs, num_images=2, seed=3, num_inference_steps=4)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # different seeds per image


def test_bad_inputs_name_the_field(pipe):
    with pytest.raises(ValueError, match="prompt"):
        pipe("  ", [_subject((1, 2, 3))])
    with pytest.raises(ValueError, match="neighbor_images"):
        pipe("x", [_subject((1, 2, 3))] * (pipe.max_neighbors + 1))
    with pytest.raises(ValueError, match=r"neighbor_images\[1\]"):
        pipe("x", [_subject((1, 2, 3)), "not an image"])
    with pytest.raises(ValueError, match="neighbor_captions"):
        pipe("x", [_subject((1, 2, 3))], neighbor_captions=["a", "b"])
    # one neighbor set (one row) for three prompts: guided branches took other rows' neighbors, silently
    one_row = pipe.encode_neighbor_set([_subject((1, 2, 3))])
    with pytest.raises(ValueError, match=r"neighbors: got 1 rows for 3 prompts"):
        pipe.generate(["a", "b", "c"], one_row, [0, 1, 2], num_inference_steps=2)


def test_images_of_one_call_have_the_server_s_seeds(pipe):
    """Image i has seed + i wrapped into 0..MAX_SEED, as the server gives it (was seed + i unwrapped)."""
    from neighbor_diffusion.config import MAX_SEED

    two = pipe("a toy", num_images=2, seed=MAX_SEED, num_inference_steps=2)
    wrapped = pipe("a toy", seed=0, num_inference_steps=2)
    diff = np.abs(np.asarray(two[1], np.int16) - np.asarray(wrapped[0], np.int16))
    assert diff.max() <= 2, diff.max()  # the same image, up to a batch of 2 against 1 in float kernels


def test_save_load_round_trip_gives_identical_samples(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    files = {p.relative_to(tmp_path / "p").as_posix() for p in (tmp_path / "p").rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    meta = json.loads((tmp_path / "p" / "neighbor_diffusion.json").read_text())
    assert meta["config"]["preset"] == "debug"
    loaded = NeighborDiffusionPipeline.from_pretrained(tmp_path / "p", device="cpu")
    nbs = [_subject((20, 200, 30))]
    kw = dict(seed=7, num_inference_steps=4, output_type="pt")
    torch.testing.assert_close(pipe("a mug in snow", nbs, **kw), loaded("a mug in snow", nbs, **kw), rtol=0, atol=0)
    # its config edited to another text encoder (MiniLM's 384 wide states for a UNet of the tiny one's 32)
    meta["config"]["text"]["encoder"] = "minilm"
    (tmp_path / "p" / "neighbor_diffusion.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"text\.encoder='minilm' gives 384-wide token states, the UNet .* takes 32"):
        NeighborDiffusionPipeline.from_pretrained(tmp_path / "p", device="cpu")


def test_from_pretrained_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a NeighborDiffusionPipeline"):
        NeighborDiffusionPipeline.from_pretrained(tmp_path)


def test_a_model_path_is_a_pipeline_folder_or_a_runs_folder_or_an_error_naming_the_field(pipe, tmp_path):
    from neighbor_diffusion.tracking import resolve_pipeline_dir
    from serving.app import resolve_serve_config

    run = tmp_path / "runs" / "my-run"  # what jobs/train.py writes: runs/<run>/pipeline
    pipe.save_pretrained(run / "pipeline")
    assert resolve_pipeline_dir(str(run / "pipeline")) == run / "pipeline"
    assert resolve_pipeline_dir(str(run)) == run / "pipeline"
    with pytest.raises(FileNotFoundError, match=r"--model='.*nope': .*\(no such folder\)"):
        resolve_pipeline_dir(str(tmp_path / "nope"), field="--model")
    with pytest.raises(
        FileNotFoundError, match=r"--model='.*runs': .*no neighbor_diffusion.json in it or in its pipeline/"
    ):
        resolve_pipeline_dir(str(tmp_path / "runs"), field="--model")
    cfg = debug().serve
    with pytest.raises(FileNotFoundError, match=r"serve.model_uri='.*nope'"):  # before any replica starts
        resolve_serve_config(replace(cfg, model_uri=str(tmp_path / "nope")))
    resolved, tracking = resolve_serve_config(replace(cfg, model_uri=str(run)))
    assert resolved.model_uri == str((run / "pipeline").resolve()) and tracking is None


def test_a_served_alias_is_pinned_to_the_version_it_names(pipe, tmp_path, monkeypatch):
    """Every replica loads the model itself, also one the autoscaler starts later: from the alias, a replica
    started after the alias moved served another version behind the same ingress."""
    import mlflow
    from mlflow import MlflowClient

    from neighbor_diffusion import tracking
    from serving.app import resolve_serve_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tracking.setup("nd-pin")
    pipe.save_pretrained(tmp_path / "pipeline")
    for _ in range(2):
        with mlflow.start_run() as run:
            pass
        tracking.register_pipeline(run.info.run_id, tmp_path / "pipeline", "nd-pin", "candidate")
    cfg = replace(debug().serve, model_uri="models:/nd-pin@candidate")
    resolved, store = resolve_serve_config(cfg)
    assert resolved.model_uri == "models:/nd-pin/2" and store == f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient().set_registered_model_alias("nd-pin", "candidate", "1")
    assert resolve_serve_config(cfg)[0].model_uri == "models:/nd-pin/1"  # a new deployment takes the alias anew
    assert resolve_serve_config(replace(cfg, model_uri="models:/nd-pin/2"))[0].model_uri == "models:/nd-pin/2"
