"""The Ray Serve application end to end on a local Ray: one server for the module, a `debug` pipeline.

The server runs with small limits (one replica, 2 ongoing + 2 queued requests, few steps),
so overload is reachable with a handful of requests and fuzzed requests stay cheap.
Checks: PNGs of the right size, same seed -> same image, cache hit -> same image with no
encoding, batched rows equal solo rows, every bad input -> a 4xx naming its field,
overload -> 503 + Retry-After with the replicas still healthy, a schema-driven fuzz finds
no 5xx, and the demo page works in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from neighbor_diffusion.config import MAX_SEED, ConfigError, debug, override

STEPS = 2  # sampling steps of the requests that only check plumbing
SERVE_OVERRIDES = {
    "serve.max_replicas": "1",
    "serve.max_ongoing_requests": "2",
    "serve.max_queued_requests": "2",
    "serve.max_batch_size": "4",
    "serve.batch_wait_timeout_s": "0.2",
    "serve.max_steps": "8",
    "serve.max_images": "2",
    "serve.max_prompt_chars": "100",
    "serve.max_caption_chars": "40",
    "serve.max_image_bytes": "100000",
    "serve.max_image_pixels": str(256 * 256),
    "serve.max_request_bytes": "600000",
    "serve.retry_after_s": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int, size: tuple[int, int] = (48, 40), noise: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if noise:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:  # a smooth "photo": a colour gradient
        y, x = np.mgrid[0 : size[1], 0 : size[0]]
        c = rng.integers(0, 256, 3)
        arr = np.stack([(x * 3 + c[0]) % 256, (y * 5 + c[1]) % 256, (x + y + c[2]) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height pixels (a decompression bomb)."""
    raw = zlib.compress(b"\x00" * 64)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from neighbor_diffusion.pipeline import NeighborDiffusionPipeline
    from serving.app import export_pythonpath, start

    pipeline_dir = tmp_path_factory.mktemp("serving") / "pipeline"
    NeighborDiffusionPipeline.from_config(debug()).save_pretrained(pipeline_dir)
    port = free_port()
    cfg = override(debug(), {**SERVE_OVERRIDES, "serve.model_uri": str(pipeline_dir), "serve.port": str(port)})
    export_pythonpath()
    # Our own Ray (address="local", own temp dir): never attach to, or be found by, anyone else's.
    ray_dir = tempfile.mkdtemp(prefix="rsv")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=ray_dir)
    try:
        start(cfg)
        print(f"\n[serving] Ray + Serve up in {time.perf_counter() - t0:.1f}s on port {port}")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, cfg
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def request_body(**fields):
    body = {"prompt": "a photo of the toy on the beach", "neighbor_images": [b64(png_bytes(1)), b64(png_bytes(2))]}
    body.update({"steps": STEPS, **fields})
    return body


# ---------------------------------------------------------------------------- what works


def test_generate_returns_pngs_of_the_model_size(server):
    client, _ = server
    r = client.post("/v1/generate", json=request_body(num_images=2, seed=3, neighbor_captions=["a toy", "the toy"]))
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == 2
    for data in out["images"]:
        img = decode_png(base64.b64decode(data))
        assert img.format == "PNG" and img.size == (32, 32) and img.mode == "RGB"
    p = out["parameters"]
    assert p["seeds"] == [3, 4] and p["steps"] == STEPS and p["num_neighbors"] == 2
    assert p["text_guidance"] == 3.0 and p["guidance_mode"] == "joint"  # the pipeline's defaults
    assert set(out["timings_ms"]) >= {"validate", "neighbor_encode", "queue_and_sample", "total"}


def test_health_models_docs_and_page(server):
    client, _ = server
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/models").json()["data"][0]
    assert info["max_neighbors"] == 3 and info["image_size"] == 32 and info["device"] == "cpu"
    assert info["limits"] == {  # serve.max_steps=8, serve.max_guidance's default 30
        "steps": {"low": 1, "high": 8},
        "text_guidance": {"low": 0, "high": 30.0},
        "neighbor_guidance": {"low": 0, "high": 30.0},
        "interleave_ratio": {"low": 0, "high": 1},
    }
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    fields = body["application/json"]["schema"]["properties"]
    assert fields["neighbor_images"]["maxItems"] == 3
    steps, ratio = fields["steps"]["anyOf"][0], fields["interleave_ratio"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"], ratio["minimum"], ratio["maximum"]) == (1, 8, 0, 1)
    assert client.get("/docs").status_code == 200
    assert "Neighbor Diffusion" in client.get("/").text


def test_same_seed_same_image(server):
    client, _ = server
    a = client.post("/v1/generate", json=request_body(seed=11)).json()["images"][0]
    b = client.post("/v1/generate", json=request_body(seed=11)).json()["images"][0]
    c = client.post("/v1/generate", json=request_body(seed=12)).json()["images"][0]
    assert a == b
    assert a != c
    # base64 wrapped at 76 characters (the `base64` command's output) is the same image
    wrapped = request_body(seed=11)
    wrapped["neighbor_images"] = [base64.encodebytes(base64.b64decode(x)).decode() for x in wrapped["neighbor_images"]]
    assert "\n" in wrapped["neighbor_images"][0]
    assert client.post("/v1/generate", json=wrapped).json()["images"][0] == a
    # the returned seeds can each be sent back, the last one's successor wrapping to 0 (was MAX_SEED + 1: a 422)
    last = client.post("/v1/generate", json=request_body(seed=MAX_SEED, num_images=2)).json()
    assert last["parameters"]["seeds"] == [MAX_SEED, 0]
    again = client.post("/v1/generate", json=request_body(seed=0)).json()["images"][0]
    assert last["images"][1] == again


def test_cache_hit_gives_the_same_image_without_encoding(server):
    client, _ = server
    # a subject never sent before: large noisy photos make encoding cost something
    photos = [b64(png_bytes(100 + i, size=(128, 128), noise=True)) for i in range(3)]
    body = request_body(seed=5, neighbor_images=photos, neighbor_captions=["x", "y", "z"])
    miss = client.post("/v1/generate", json=body).json()
    hit = client.post("/v1/generate", json=body).json()
    assert (miss["cache_hit"], hit["cache_hit"]) == (False, True)
    assert hit["images"] == miss["images"]
    m, h = miss["timings_ms"], hit["timings_ms"]
    print(
        f"\n[serving] neighbor encode: miss {m['neighbor_encode']:.1f} ms, hit {h['neighbor_encode']:.2f} ms; "
        f"total: miss {m['total']:.0f} ms, hit {h['total']:.0f} ms"
    )
    assert h["neighbor_encode"] < m["neighbor_encode"]
    # another caption is another neighbor set: a miss
    other = client.post("/v1/generate", json={**body, "neighbor_captions": ["x", "y", "w"]}).json()
    assert other["cache_hit"] is False


def test_png_response_multipart_and_accept_header(server):
    client, _ = server
    files = [("neighbor_images", (f"n{i}.png", png_bytes(i), "image/png")) for i in (1, 2)]
    form = {"prompt": "a photo of the toy on the beach", "steps": str(STEPS), "seed": "11"}
    r = client.post("/v1/generate?format=png", data=form, files=files)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert decode_png(r.content).size == (32, 32)
    assert r.headers["x-seed"] == "11" and json.loads(r.headers["x-parameters"])["steps"] == STEPS
    # multipart and JSON are the same request: same image
    same = client.post("/v1/generate", json=request_body(seed=11)).json()["images"][0]
    assert base64.b64decode(same) == r.content
    r = client.post("/v1/generate", json=request_body(seed=11), headers={"Accept": "image/png"})
    assert r.headers["content-type"] == "image/png" and r.content == base64.b64decode(same)
    r = client.post("/v1/generate?format=png", json=request_body(num_images=2))
    assert r.status_code == 422 and "format" in r.json()["error"]


@pytest.mark.parametrize("mode", ["joint", "interleaved"])
def test_concurrent_requests_are_batched_and_rows_do_not_depend_on_the_batch(server, mode):
    """Also under interleaved guidance, whose per-step choices come from each row's seed (at the ratio 0.5,
    seeds 21 and 22 choose differently at each of the 4 steps)."""
    client, _ = server
    body = {s: request_body(seed=s, steps=4, guidance_mode=mode) for s in (21, 22)}
    solo = [client.post("/v1/generate", json=body[s]).json() for s in (21, 22)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda s: client.post("/v1/generate", json=body[s]).json(), (21, 22)))
    print(f"\n[serving] {mode}: batch rows when sent together: {[t['batch_rows'] for t in together]}")
    assert max(t["batch_rows"] for t in together) == 2, "two concurrent requests should share a pipeline call"
    for a, b in zip(solo, together):
        pa = np.asarray(decode_png(base64.b64decode(a["images"][0])), dtype=int)
        pb = np.asarray(decode_png(base64.b64decode(b["images"][0])), dtype=int)
        assert np.abs(pa - pb).max() <= 1, "a row's image must not depend on what else is in the batch"


# ---------------------------------------------------------------------------- bad input -> 4xx naming the field

BAD_JSON = [
    ("missing prompt", lambda b: b.pop("prompt"), "prompt"),
    ("empty prompt", lambda b: b.update(prompt=""), "prompt"),
    ("blank prompt", lambda b: b.update(prompt="   "), "prompt"),
    ("overlong prompt", lambda b: b.update(prompt="x" * 101), "prompt"),
    ("prompt not a string", lambda b: b.update(prompt=123), "prompt"),
    ("zero neighbors", lambda b: b.update(neighbor_images=[]), "neighbor_images"),
    (
        "too many neighbors",
        lambda b: b.update(neighbor_images=[b64(png_bytes(i)) for i in range(4)]),
        "neighbor_images",
    ),
    ("neighbors not a list", lambda b: b.update(neighbor_images="abc"), "neighbor_images"),
    ("missing neighbors", lambda b: b.pop("neighbor_images"), "neighbor_images"),
    ("not base64", lambda b: b.update(neighbor_images=["@@@not base64@@@"]), "neighbor_images.0"),
    ("undecodable image", lambda b: b.update(neighbor_images=[b64(b"GIF89a but not really")]), "neighbor_images.0"),
    ("truncated png", lambda b: b.update(neighbor_images=[b64(png_bytes(3)[:60])]), "neighbor_images.0"),
    ("too many pixels", lambda b: b.update(neighbor_images=[b64(png_bytes(3, size=(300, 300)))]), "neighbor_images.0"),
    ("decompression bomb", lambda b: b.update(neighbor_images=[b64(bomb_png(100_000, 100_000))]), "neighbor_images.0"),
    (
        "too many bytes",
        lambda b: b.update(neighbor_images=[b64(png_bytes(4, size=(250, 250), noise=True))]),
        "neighbor_images.0",
    ),
    ("image not a string", lambda b: b.update(neighbor_images=[12]), "neighbor_images.0"),
    ("captions count", lambda b: b.update(neighbor_captions=["only one"]), "neighbor_captions"),
    ("caption too long", lambda b: b.update(neighbor_captions=["x" * 41, "y"]), "neighbor_captions.0"),
    ("steps zero", lambda b: b.update(steps=0), "steps"),
    ("steps above max", lambda b: b.update(steps=9), "steps"),
    ("steps not a number", lambda b: b.update(steps="many"), "steps"),
    ("negative text guidance", lambda b: b.update(text_guidance=-1), "text_guidance"),
    ("huge neighbor guidance", lambda b: b.update(neighbor_guidance=1e6), "neighbor_guidance"),
    ("unknown guidance mode", lambda b: b.update(guidance_mode="bogus"), "guidance_mode"),
    ("interleave ratio > 1", lambda b: b.update(interleave_ratio=1.5), "interleave_ratio"),
    ("unknown sampler", lambda b: b.update(sampler="euler"), "sampler"),
    ("zero images", lambda b: b.update(num_images=0), "num_images"),
    ("too many images", lambda b: b.update(num_images=3), "num_images"),
    ("negative seed", lambda b: b.update(seed=-1), "seed"),
    ("seed too large", lambda b: b.update(seed=2**40), "seed"),
    ("unknown field", lambda b: b.update(negative_prompt="blurry"), "negative_prompt"),
]


@pytest.mark.parametrize("case,mutate,field", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_fields_get_422_naming_the_field(server, case, mutate, field):
    client, _ = server
    body = request_body()
    mutate(body)
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, (case, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error.startswith(field) or f"; {field}" in error, (case, error)


def test_bad_bodies_get_4xx(server):
    client, cfg = server
    cases = {
        "not json": (client.post("/v1/generate", content=b"{nope", headers={"content-type": "application/json"}), 422),
        "json list": (client.post("/v1/generate", json=[1, 2]), 422),
        "wrong content type": (client.post("/v1/generate", content=b"hi", headers={"content-type": "text/plain"}), 415),
        "too large": (client.post("/v1/generate", content=b"x" * (cfg.serve.max_request_bytes + 1)), 413),
        "bad format": (client.post("/v1/generate?format=gif", json=request_body()), 422),
        "bad multipart": (
            client.post(
                "/v1/generate",
                content=b"--zz\r\nnonsense",
                headers={"content-type": "multipart/form-data; boundary=zz"},
            ),
            None,
        ),
        "multipart bad file": (
            client.post(
                "/v1/generate",
                data={"prompt": "a toy"},
                files=[("neighbor_images", ("a.png", b"not an image", "image/png"))],
            ),
            422,
        ),
        "multipart prompt twice": (
            client.post(
                "/v1/generate",
                data={"prompt": ["a", "b"]},
                files=[("neighbor_images", ("a.png", png_bytes(1), "image/png"))],
            ),
            422,
        ),
        "get on generate": (client.get("/v1/generate"), 405),
    }
    for name, (r, want) in cases.items():
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
        assert want is None or r.status_code == want, (name, r.status_code, r.text[:200])
    # the upload named by its place and its filename, PIL's reason once, without the repr of its buffer
    assert cases["multipart bad file"][0].json()["error"] == (
        "neighbor_images.0: file 'a.png': undecodable (UnidentifiedImageError: cannot identify image file)"
    )
    assert "prompt" in cases["multipart prompt twice"][0].json()["error"]


# ---------------------------------------------------------------------------- load


def test_overload_gets_503_with_retry_after_and_replicas_stay_healthy(server):
    from ray import serve

    client, _ = server
    body = request_body(steps=8, num_images=2)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/generate", json=body), range(12)))
    codes = sorted(r.status_code for r in responses)
    print(f"\n[serving] 12 concurrent requests at 2 ongoing + 2 queued: {codes}")
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, codes
    assert all(r.headers.get("retry-after") == "1" for r in rejected)
    assert set(codes) <= {200, 503}
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/generate", json=request_body()).status_code == 200
    status = serve.status().applications["neighbor-diffusion"]
    assert status.status == "RUNNING"
    assert all(d.status == "HEALTHY" for d in status.deployments.values())


def test_schema_driven_fuzz_finds_no_5xx(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    client, _ = server
    base = str(client.base_url).rstrip("/")
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        generate = operation.path == "/v1/generate"
        # negative cases (schema-violating bodies, wrong types, bad query values) need something to violate
        modes = ["negative", "positive"] if generate else ["positive"]
        for mode in map(schemathesis.GenerationMode, modes):
            examples = 40 if generate else 5

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case):
                response = case.call(base_url=base, timeout=60)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:300])

            fuzz()
    print(f"\n[serving] fuzz status codes: {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 80


# ---------------------------------------------------------------------------- the demo page in a browser


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_demo_page_in_headless_chromium(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (Python) not installed")
    client, _ = server
    photos = []
    for i in (1, 2):
        path = tmp_path / f"subject_{i}.png"
        path.write_bytes(png_bytes(40 + i, size=(96, 96)))
        photos.append(str(path))
    shot = Path(os.environ.get("SERVING_ARTIFACTS", tmp_path)) / "demo_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium_path(),
            args=args,
            viewport={"width": 900, "height": 900},
        )
        try:
            page = browser.new_page()
            page.goto(f"{client.base_url}/")
            page.wait_for_function("document.getElementById('kmax').textContent === '3'")
            assert page.get_attribute("#steps", "max") == "8"  # serve.max_steps, from /v1/models
            page.set_input_files("#neighbors", photos)
            page.fill("#captions", "a photo of the toy\nthe toy, side view")
            page.fill("#prompt", "a photo of the toy on a snowy field")
            page.fill("#steps", str(STEPS))
            page.fill("#seed", "7")
            page.click("#go")
            page.wait_for_selector("#results img:nth-child(2)", timeout=60_000)
            sizes = page.eval_on_selector_all("#results img", "els => els.map(e => [e.naturalWidth, e.complete])")
            error = page.text_content("#error")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\n[serving] demo page screenshot: {shot}")
    assert error == ""
    assert sizes == [[32, True], [32, True]]


# ---------------------------------------------------------------------------- config, no Ray needed


def test_serve_config_yaml_is_generated_from_serve_config(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import main

    checked_in = yaml.safe_load((Path(__file__).resolve().parents[1] / "serving" / "serve_config.yaml").read_text())
    out = tmp_path / "serve_config.yaml"
    main(["--preset", "cpu", "--serve.model_uri", "models:/neighbor-diffusion@candidate", "--write-config", str(out)])
    assert yaml.safe_load(out.read_text()) == checked_in, "regenerate: python -m serving.app --write-config ..."
    parsed = ServeDeploySchema.model_validate(checked_in)  # a valid `serve deploy` / serveConfigV2 file
    app = parsed.applications[0]
    assert app.import_path == "serving.app:build_app" and parsed.http_options.host == "127.0.0.1"
    model = next(d for d in app.deployments if d.name == "NeighborDiffusionModel")
    ingress = next(d for d in app.deployments if d.name == "NeighborDiffusionIngress")
    assert ingress.max_ongoing_requests >= model.max_ongoing_requests >= 4
    # a request limit given on the command line reaches build_app on the cluster (was dropped: only the model was
    # written); a file without a model is refused (build_app would fail on the cluster)
    from serving.app import config_from_args

    flags = ["--serve.max_steps", "200", "--serve.num_cpus", "2", "--serve.max_replicas", "3"]
    main(["--preset", "cpu", "--serve.model_uri", "m", *flags, "--write-config", str(out)])
    app = yaml.safe_load(out.read_text())["applications"][0]
    # max_replicas is in the model's autoscaling_config; num_cpus is in args (a replica sets its threads from it)
    assert app["args"] == {"preset": "cpu", "serve": {"model_uri": "m", "max_steps": 200, "num_cpus": 2.0}}
    assert app["deployments"][1]["autoscaling_config"]["max_replicas"] == 3
    assert config_from_args(app["args"]).serve.max_steps == 200
    with pytest.raises(SystemExit):
        main(["--preset", "cpu", "--write-config", str(tmp_path / "none.yaml")])
    assert not (tmp_path / "none.yaml").exists()


def test_app_args_and_serve_config_validation():
    from serving.app import FeatureCache, config_from_args

    cfg = config_from_args({"preset": "debug", "serve": {"model_uri": "x", "max_batch_size": 8}})
    assert cfg.serve.model_uri == "x" and cfg.serve.max_batch_size == 8
    assert config_from_args({"serve.port": 9123}).serve.port == 9123
    with pytest.raises(ConfigError, match="serve.nope"):
        config_from_args({"serve": {"nope": 1}})
    for field, value in [("overload_status_code", "500"), ("ingress_max_ongoing_requests", "1"), ("num_gpus", "-2")]:
        with pytest.raises(ConfigError, match=f"serve.{field}"):
            override(debug(), {f"serve.{field}": value})
    # a `serve deploy` user_config is checked as ServeConfig is (a batch of 0 spun the batcher: replica hung)
    from types import SimpleNamespace

    from serving.app import NeighborDiffusionModel

    replica = SimpleNamespace(cfg=debug().serve, batcher=SimpleNamespace(max_batch_size=4, batch_wait_timeout_s=0.0))
    for bad, message in [({"max_batch_size": 0}, "max_batch_size=0: must be >= 1"),
                         ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s=-1.0: must be >= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            NeighborDiffusionModel.func_or_class.reconfigure(replica, bad)
    assert replica.batcher.max_batch_size == 4  # a refused config changes nothing
    NeighborDiffusionModel.func_or_class.reconfigure(replica, {"max_batch_size": 2})
    assert replica.batcher.max_batch_size == 2
    cache = FeatureCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
