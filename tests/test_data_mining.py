"""Cluster mining: every bad-data case is dropped and counted by reason, good data is kept, end to end on Ray."""

import dataclasses
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from neighbor_diffusion.config import debug
from neighbor_diffusion.data import crawl, mining, world

S = 32


def _jpeg(color=(200, 40, 40), size=(64, 64)) -> bytes:
    return crawl.encode(Image.new("RGB", size, color), "JPEG")


def _record(image=None, caption=b"a photo of the toy on a snowy field", meta=None, key="000000001"):
    meta = (
        {"url": "https://cdn.example.com/x.jpg", "page_url": "https://shop.example.com/p/1"} if meta is None else meta
    )
    return {"key": key, "shard": "00000.tar", "index": 0, "image": _jpeg() if image is None else image, "ext": "jpg",
            "caption": caption, "meta": json.dumps(meta).encode()}  # fmt: skip


def _status(rec) -> str:
    return mining.validate_record(rec, S, min_side=16, max_pixels=4096 * 4096)["status"]


@pytest.mark.parametrize(
    "rec, reason",
    [
        (_record(image=b"<html>404</html>"), "image_undecodable"),
        (_record(image=_jpeg()[:300]), "image_truncated"),
        (_record(image=b""), "image_empty"),
        (_record(image=crawl.bomb_png()), "image_too_large"),
        (_record(image=_jpeg(size=(8, 8))), "image_too_small"),
        (_record(caption=b"\xff\xfe caf\xe9"), "caption_not_utf8"),
        (_record(caption=b"   "), "caption_empty"),
        (_record(caption=b"IMG_2041.JPG"), "caption_junk"),
        (_record(caption=b"Buy Now"), "caption_junk"),
        (_record(caption=None), "caption_missing"),
        (_record(meta={"url": "https://cdn.example.com/x.jpg"}), "missing_page_url"),
        (_record(meta={"page_url": "   "}), "missing_page_url"),
        (_record(meta={"page_url": "http://shop.example.com:abc/p"}), "bad_page_url"),  # urllib: ValueError
        (_record(meta={"page_url": "http://shop.example.com:70000/p"}), "bad_page_url"),
        (_record(meta={"page_url": "http://[shop.example.com/p"}), "bad_page_url"),
        (dict(_record(), meta=b"{not json"), "bad_metadata"),
        (dict(_record(), image=None), "missing_image"),
    ],
)
def test_bad_records_are_dropped_with_their_reason(rec, reason):
    assert _status(rec) == reason


@pytest.mark.parametrize("mode", crawl.ODD_MODES)
def test_odd_modes_are_converted_not_dropped(mode):
    data, _ = crawl.odd_mode_bytes(Image.new("RGB", (64, 48), (30, 160, 60)), mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    row = mining.validate_record(_record(image=data), S, 16, 4096 * 4096)
    assert row["status"] == mining.OK and row["mode"] == mode
    out = Image.open(io.BytesIO(row["image"]))
    assert out.mode == "RGB" and out.size == (S, S)


def test_caption_cleanup_and_url_normalisation():
    assert mining.clean_caption(b"  A Photo of the  <b>Mug</b> &amp; friends ") == (
        "a photo of the mug & friends",
        "ok",
    )
    variants = [
        "https://www.Shop.example.com/p/item-3/",
        "http://shop.example.com/p/item-3?utm_source=feed&ref=home",
        "https://shop.example.com/p/item-3#img2",
    ]
    assert len({mining.normalize_page_url(u) for u in variants}) == 1
    assert mining.normalize_page_url("https://a.com/p?id=1") != mining.normalize_page_url("https://a.com/p?id=2")
    # a bare query names its page too (parse_qsl drops "12345" unless it keeps blank values)
    assert mining.normalize_page_url("https://a.com/item.php?12345") != mining.normalize_page_url(
        "https://a.com/item.php?67890"
    )


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_parse_tar_truncated_and_duplicate_keys():
    members = []
    for key in ("a1", "a2", "a2", "a3"):  # a2 twice: a duplicate key
        members += [(f"{key}.jpg", _jpeg()), (f"{key}.txt", b"a toy"), (f"{key}.json", b"{}")]
    data = _tar(members)
    records, damage = mining.parse_tar(data, "s.tar")
    assert damage == "" and [r["key"] for r in records] == ["a1", "a2", "a2", "a3"]
    cut, damage = mining.parse_tar(data[: len(data) // 2 + 7], "s.tar")
    assert 1 <= len(cut) < 4  # what came before the cut is kept
    assert damage.startswith("the tar is cut short") and f"({len(cut)} records before" in damage
    assert [r["key"] for r in cut] == ["a1", "a2", "a2", "a3"][: len(cut)]
    header_cut, damage = mining.parse_tar(data[:1100], "s.tar")  # cut inside a header: tarfile sees EOF
    assert damage.startswith("the tar is cut short")


def test_a_crawl_file_is_named_by_its_path_below_data_input():
    """Two img2dataset runs in one input folder both have a 00000.tar with keys 000000000...: two shards, so that
    the duplicate check (first good occurrence by shard and index) keeps one copy, not none."""
    data = _tar([("000000001.jpg", _jpeg()), ("000000001.txt", b"a toy"), ("000000001.json", b"{}")])
    shards = [
        mining._read_file_rows({"path": f"bucket/in/{run}/00000.tar", "bytes": data}, "bucket/in/")[0]["shard"]
        for run in ("run1", "run2")
    ]
    assert shards == ["run1/00000.tar", "run2/00000.tar"]
    assert mining._read_file_rows({"path": "/in/00000.tar", "bytes": data}, "/in")[0]["shard"] == "00000.tar"


def _parquet(table, row_group_size=2) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def test_parse_parquet_keeps_what_is_readable_and_names_what_is_not(tmp_path):
    import pyarrow as pa

    from neighbor_diffusion.config import ConfigError

    page = "https://shop.example.com/p/1"
    columns = {
        "key": [f"k{i}" for i in range(6)],
        "jpg": [_jpeg((40 * i, 0, 0)) for i in range(6)],
        "caption": ["a photo of the toy"] * 6,  # img2dataset writes a string column
        "page_url": [page] * 5 + [None],
    }
    data = _parquet(pa.table(columns))
    records, damage = mining.parse_parquet(data, "00000.parquet")
    assert damage == "" and [(r["key"], r["index"], r["shard"]) for r in records] == [
        (f"k{i}", i, "00000.parquet") for i in range(6)
    ]
    statuses = [_status(r) for r in records]
    assert statuses == [mining.OK] * 5 + ["missing_page_url"]  # a null page_url is no page_url
    same, _ = mining.parse_parquet(_parquet(pa.table(columns | {"image": columns["jpg"]}).drop(["jpg"])), "i.parquet")
    assert [r["image"] for r in same] == columns["jpg"]  # an `image` column serves as well as `jpg`
    # ... and one of structs {bytes, path}, as Hugging Face datasets write images; another type is no image
    structs = [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(columns["jpg"])]
    hf, _ = mining.parse_parquet(_parquet(pa.table(columns | {"image": structs}).drop(["jpg"])), "hf.parquet")
    assert [r["image"] for r in hf] == columns["jpg"] and [_status(r) for r in hf] == statuses
    odd = columns | {"jpg": [f"{i}.jpg" for i in range(6)], "caption": list(range(6))}  # paths, numbers
    odd_records, _ = mining.parse_parquet(_parquet(pa.table(odd)), "odd.parquet")
    assert [_status(r) for r in odd_records] == ["missing_image"] * 6
    numbers, _ = mining.parse_parquet(_parquet(pa.table(columns | {"caption": list(range(6))})), "n.parquet")
    assert [_status(r) for r in numbers] == ["caption_missing"] * 5 + ["missing_page_url"]

    # a row group whose page header is damaged: the other row groups are kept, the file is named
    pf = pq.ParquetFile(io.BytesIO(data))
    start = pf.metadata.row_group(1).column(0).data_page_offset
    broken = data[:start] + b"\xff" * 64 + data[start + 64 :]
    kept, damage = mining.parse_parquet(broken, "00000.parquet")
    assert [r["key"] for r in kept] == ["k0", "k1", "k4", "k5"]
    assert damage.startswith("row group 1 of 3 unreadable: ") and damage.endswith("(4 records of the others kept)")
    # an interrupted write: no footer, nothing readable
    none, damage = mining.parse_parquet(data[: len(data) // 2], "00000.parquet")
    assert none == [] and damage.startswith("unreadable as Parquet: ") and "footer" in damage
    # another kind of table: nothing read, said by column, and by the job before it starts
    other = _parquet(pa.table({"id": [1], "pixels": [b"x"]}))
    assert mining.parse_parquet(other, "x.parquet") == (
        [],
        "no column key and no jpg (Parquet input needs key, jpg or image, caption, page_url)",
    )
    (tmp_path / "x.parquet").write_bytes(other)
    with pytest.raises(ConfigError, match=r"data\.input='.*': x\.parquet has no column key and no jpg"):
        mining.crawl_files(tmp_path, "parquet")


def test_filter_group_drops_outliers_and_scores_coherence():
    rng = np.random.default_rng(0)
    base = rng.random(16)
    same = np.stack([base + 0.05 * rng.random(16) for _ in range(5)])
    outliers = np.eye(16)[[0, 5]]
    keep, coherence = mining.filter_group(np.concatenate([same, outliers]), outlier_threshold=0.6)
    assert keep.tolist() == [True] * 5 + [False] * 2 and coherence > 0.95
    keep, coherence = mining.filter_group(np.eye(16)[:4], outlier_threshold=0.6)
    assert keep.sum() <= 1 and coherence == 0.0


def test_a_picture_shown_twice_on_a_page_is_one_member():
    """The same pixels twice in a cluster would make a target its own neighbor (the copy-paste shortcut)."""
    rng = np.random.default_rng(0)
    pngs = [crawl.encode(crawl.abstract_image(rng, 32), "PNG") for _ in range(3)]
    emb = np.ones((4, 8), np.float32).tobytes()
    batch = {  # crawl order: shard b before c; the second copy of pngs[0] comes last
        "key": np.array(["k2", "k0", "k1", "k3"]), "shard": np.array(["b", "b", "b", "c"]),
        "index": np.array([2, 0, 1, 0]), "page": np.array(["p"] * 4),
        "image": np.array([pngs[2], pngs[0], pngs[1], pngs[0]], dtype=object),
        "embedding": np.array([emb[:32]] * 4, dtype=object), "caption": np.array(["a", "b", "c", "d"]),
        "url": np.array(["u2", "u0", "u1", "u3"]),
    }  # fmt: skip
    out = mining.cluster_group(batch, outlier_threshold=0.5, coherence_threshold=0.5, min_size=2, max_size=8)
    assert out["keys"] == [["k0", "k1", "k2"]] and out["duplicate_image_keys"] == [["k3"]]
    assert out["num_members"] == [3] and out["rejected_keys"] == [[]] and out["status"] == [mining.OK]


def _filter_group_pairwise(e: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """filter_group's definition, written out with the N x N cosine matrix."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    medoid = int(np.argmax((sim.sum(1) - 1.0) / (len(e) - 1)))
    centre = e[sim[medoid] >= threshold].mean(0)
    keep = e @ (centre / np.linalg.norm(centre)) >= threshold
    m = int(keep.sum())
    return keep, 0.0 if m < 2 else float((sim[np.ix_(keep, keep)].sum() - m) / (m * (m - 1)))


def test_filter_group_matches_pairwise_definition_without_n_squared_memory():
    import tracemalloc

    rng = np.random.default_rng(3)
    for n, subjects in [(2, 1), (7, 2), (40, 3), (300, 5)]:
        centres = rng.random((subjects, 24))
        e = centres[rng.integers(0, subjects, n)] + 0.3 * rng.random((n, 24))
        keep, coherence = mining.filter_group(e.astype(np.float32), outlier_threshold=0.9)
        want_keep, want_coherence = _filter_group_pairwise(e.astype(np.float32), 0.9)
        assert keep.tolist() == want_keep.tolist() and coherence == pytest.approx(want_coherence, abs=1e-5), n
    # a 20k-image gallery page: an N x N float32 matrix would be 1.6 GB
    e = (np.ones(16) + 0.1 * rng.random((20_000, 16))).astype(np.float32)
    tracemalloc.start()
    keep, coherence = mining.filter_group(e, outlier_threshold=0.9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keep.all() and coherence > 0.99 and peak < 50 * 2**20, peak


def test_descriptor_same_subject_closer_than_other_subject():
    embed = mining.DescriptorEmbedder()
    rng = np.random.default_rng(1)
    a, b = world.make_subject(0), world.make_subject(6)  # same class ("toy"), different subjects
    ea = embed([world.render(a, world.sample_context(rng, 0, 0, 0), 96) for _ in range(6)])
    eb = embed([world.render(b, world.sample_context(rng, 0, 0, 0), 96) for _ in range(6)])
    within = (ea @ ea.T)[np.triu_indices(6, 1)].mean()
    across = (ea @ eb.T).mean()
    assert within > across + 0.2, (within, across)


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """The debug preset's crawl (every bad case injected once) mined on a local 2-CPU Ray."""
    import ray

    cfg = debug()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_pages=30, bad_records=1))
    out = tmp_path_factory.mktemp("mined")
    crawl.generate_crawl(cfg, out)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifest = mining.mine(cfg, input_dir=out / "crawl", out_dir=out, truth_path=out / "ground_truth.parquet")
    finally:
        ray.shutdown()
    return cfg, out, manifest


def test_mining_end_to_end_counts_every_bad_case(mined):
    cfg, out, manifest = mined
    drops = manifest["pairs_dropped_by_reason"]
    for kind in crawl.BAD_KINDS:
        if kind == "caption_empty":  # empty alt texts also occur naturally among junk captions
            assert drops.get(kind, 0) >= cfg.data.bad_records, (kind, drops)
        else:
            assert drops.get(kind) == cfg.data.bad_records, (kind, drops)
    assert set(manifest["converted_modes"]) == set(crawl.ODD_MODES)
    # nothing good lost: every valid record of the crawl reached the filter, the cut tar's readable ones too
    truth = pq.read_table(out / "ground_truth.parquet").to_pylist()
    readable_truncated = len(mining.parse_tar((out / "crawl" / "99999.tar").read_bytes(), "99999.tar")[0])
    ((name, damage),) = manifest["damaged_files"].items()
    assert name == "99999.tar" and damage.startswith("the tar is cut short")
    assert f"({readable_truncated} records before" in damage
    good = [t for t in truth if t["bad"] == "" and not t["caption_junk"] and t["shard"] != 99999]
    again = [t for t in truth if t["bad"] == "duplicate_image"]  # valid pairs: dropped in their page's group
    assert manifest["pairs_valid"] == len(good) + readable_truncated + len(again)
    in_groups = ("outlier", "incoherent", "cluster_too_small", "duplicate_image")
    assert manifest["pairs_in"] == manifest["pairs_valid"] + sum(v for k, v in drops.items() if k not in in_groups)
    assert manifest["pairs_valid"] == manifest["pairs_out"] + sum(drops.get(k, 0) for k in in_groups)
    assert manifest["filter"]["precision"] >= 0.9 and manifest["filter"]["recall"] >= 0.85


def test_cluster_shards_follow_the_schema(mined):
    cfg, out, manifest = mined
    files = sorted((out / "clusters").glob("*.parquet"))
    table = pq.read_table(files[0]).schema
    assert table.names == mining.CLUSTER_SCHEMA.names
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(rows) == manifest["clusters_out"] > 0
    assert all(len(set(r["images"])) == len(r["images"]) for r in rows)  # no picture twice (a target its neighbor)
    assert sum(r["num_members"] for r in rows) == manifest["pairs_out"]
    truth = {t["key"]: t for t in pq.read_table(out / "ground_truth.parquet").to_pylist() if t["bad"] == ""}
    for r in rows:
        n = r["num_members"]
        assert n >= cfg.data.min_cluster_size and len(r["images"]) == len(r["captions"]) == len(r["keys"]) == n
        assert r["text_shape"] == [n, cfg.text.max_length, 32] and r["text_encoder"] == "tiny"
        assert len(r["text_states"]) == n * cfg.text.max_length * 32 * 2  # float16
        assert Image.open(io.BytesIO(r["images"][0])).size == (S, S)
        pages = {truth[k]["canonical_page_url"] for k in r["keys"] if k in truth}
        assert len(pages) == 1  # one cluster = one page, however its URL was spelled


def test_a_parquet_crawl_mines_as_its_tars_do(mined, tmp_path):
    """The same crawl written as img2dataset's Parquet: the same clusters; its interrupted file (no footer)
    is named in the manifest, where the cut tar kept its first records."""
    import ray

    cfg, out, manifest = mined
    crawl.generate_crawl(cfg, tmp_path, fmt="parquet")
    assert sorted(p.name for p in (tmp_path / "crawl").iterdir()) == [
        p.name.replace(".tar", ".parquet") for p in sorted((out / "crawl").iterdir())
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg_pq = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, input_format="parquet"))
        got = mining.mine(
            cfg_pq, input_dir=tmp_path / "crawl", out_dir=tmp_path, truth_path=out / "ground_truth.parquet"
        )
    finally:
        ray.shutdown()
    ((name, damage),) = got["damaged_files"].items()
    assert name == "99999.parquet" and damage.startswith("unreadable as Parquet: ") and "footer" in damage
    readable_truncated = len(mining.parse_tar((out / "crawl" / "99999.tar").read_bytes(), "99999.tar")[0])
    assert got["pairs_in"] == manifest["pairs_in"] - readable_truncated
    for k in ("pairs_out", "clusters_out", "filter"):
        assert got[k] == manifest[k], k
    drops, tar_drops = dict(got["pairs_dropped_by_reason"]), dict(manifest["pairs_dropped_by_reason"])
    assert drops.pop("cluster_too_small") == tar_drops.pop("cluster_too_small") - readable_truncated  # noise pages
    assert drops == tar_drops

    def clusters(folder):
        return sorted(tuple(r["keys"]) for f in folder.glob("*.parquet") for r in pq.read_table(f).to_pylist())

    assert clusters(tmp_path / "clusters") == clusters(out / "clusters")


def test_data_on_object_storage_is_the_data_on_disk(mined, s3):
    """data.root on S3 (a local S3 store): the crawl, the mining and the training stream read and write there,
    and give what they give on a local folder, to the byte."""
    import ray

    from neighbor_diffusion.config import ConfigError
    from neighbor_diffusion.data import storage, stream

    cfg, out, manifest = mined
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="s3://nd-test/data"))
    root = mining.layout(cfg)["base"]
    assert str(root) == "s3://nd-test/data/debug" and storage.location(str(root)) == root
    assert storage.is_uri(root) and storage.is_uri(str(root)) and not storage.is_uri(str(out))
    crawl.generate_crawl(cfg, root)
    assert (root / "world.json").read_text() == (out / "world.json").read_text()
    assert [f.rsplit("/", 1)[1] for f in mining.crawl_files(root / "crawl", "webdataset")] == sorted(
        p.name for p in (out / "crawl").glob("*.tar")
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_s3 = mining.mine(cfg)  # data.root's layout: crawl, ground truth and clusters on S3
        first = {}
        for where in (root / "clusters", out / "clusters"):
            dataset = stream.training_dataset(str(where), cfg, seed=0, num_epochs=1)
            batch = next(iter(dataset.iter_batches(batch_size=4)))
            first[str(where)] = batch
    finally:
        ray.shutdown()
    keys = ("pairs_in", "pairs_valid", "pairs_out", "clusters_out", "pairs_dropped_by_reason", "filter")
    assert {k: on_s3[k] for k in keys} == {k: manifest[k] for k in keys}
    assert on_s3["clusters_dir"] == "s3://nd-test/data/debug/clusters"
    assert json.loads((root / "manifest.json").read_text())["clusters_out"] == manifest["clusters_out"]
    assert stream.load_clusters(root / "clusters") == stream.load_clusters(out / "clusters")
    s3_batch, local_batch = first.values()
    assert s3_batch.keys() == local_batch.keys()
    for k in s3_batch:
        np.testing.assert_array_equal(s3_batch[k], local_batch[k], err_msg=k)

    # a place that is not there: said, naming the setting
    with pytest.raises(FileNotFoundError, match=r"data\.input='s3://nd-test/none': no such folder"):
        mining.crawl_files("s3://nd-test/none", "webdataset")
    with pytest.raises(ConfigError, match=r"data\.root='nope://x': cannot open it"):
        mining.layout(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="nope://x")))


def test_a_given_crawl_is_not_scored_against_the_world_and_a_failed_write_leaves_no_manifest(mined, tmp_path):
    """data.input names a crawl of its own: the synthetic world's ground truth beside data.root (from an earlier
    prepare_data) is not its truth. And a mining that fails once the old shards are gone takes their manifest
    with them, so that training does not take a partial folder for the old data."""
    import shutil

    import ray

    cfg, out, manifest = mined
    base = tmp_path / cfg.preset
    base.mkdir()
    shutil.copy(out / "ground_truth.parquet", base / "ground_truth.parquet")
    given = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(tmp_path), input=str(out / "crawl")))
    broken = dataclasses.replace(given, text=dataclasses.replace(given.text, encoder=str(tmp_path / "no-encoder")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = mining.mine(given)
        assert "filter" not in got and got["clusters_out"] == manifest["clusters_out"]
        assert (base / "manifest.json").is_file() and list((base / "clusters").glob("*.parquet"))
        with pytest.raises(Exception, match="no-encoder"):
            mining.mine(broken)
    finally:
        ray.shutdown()
    assert not (base / "manifest.json").exists()
    assert "filter" in manifest  # the world's own crawl is scored
