"""The training example stream: invariants of the pure builder, then the Ray Dataset (keys, shapes, determinism)."""

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from neighbor_diffusion.config import debug
from neighbor_diffusion.data import stream
from neighbor_diffusion.data.images import encode_png
from neighbor_diffusion.data.mining import CLUSTER_SCHEMA
from neighbor_diffusion.diffusion import BATCH_KEYS
from neighbor_diffusion.training.trainer import ingest_config

S, T, D = 32, 32, 32  # debug preset: image_size, text.max_length, tiny encoder width


def make_cluster(cid: str, n: int, base: int, captions=None, size: int = S) -> dict:
    """Member i is a flat image of value base+i (so it can be told apart) with text states filled with base+i."""
    images = [encode_png(Image.new("RGB", (size, size), (base + i, 0, 0))) for i in range(n)]
    states = np.stack([np.full((T, D), base + i, np.float16) for i in range(n)])
    mask = np.zeros((n, T), np.uint8)
    mask[:, :5] = 1
    return {
        "cluster_id": cid, "num_members": n, "image_size": S, "images": images,
        "captions": captions or [f"a photo of the toy {i}" for i in range(n)], "keys": [f"{cid}-{i}" for i in range(n)],
        "urls": [""] * n, "coherence": 0.9, "text_encoder": "tiny", "text_states": states.tobytes(),
        "text_mask": mask.tobytes(), "text_shape": [n, T, D],
    }  # fmt: skip


def member_ids(example) -> tuple[int, list[int]]:
    value = lambda img: int(round((float(img[0, 0, 0]) + 1) * 127.5))  # noqa: E731
    k = int(example["neighbor_mask"].sum())
    return value(example["image"]), [value(example["neighbor_images"][j]) for j in range(k)]


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_target_never_a_neighbor_and_k_in_bounds(n):
    cfg = debug()
    max_k = cfg.model.max_neighbors
    ks = set()
    for seed in range(40):
        ex = stream.build_example(make_cluster("c", n, base=100), cfg, np.random.default_rng(seed))
        assert set(ex) == set(BATCH_KEYS)
        target, neighbors = member_ids(ex)
        assert target not in neighbors and len(set(neighbors)) == len(neighbors)
        k = len(neighbors)
        ks.add(k)
        assert 1 <= k <= min(max_k, n - 1)
        # masks: real neighbors first, padding slots zero and False
        assert ex["neighbor_mask"].tolist() == [True] * k + [False] * (max_k - k)
        assert not ex["neighbor_images"][k:].any() and not ex["neighbor_text_states"][k:].any()
        assert not ex["neighbor_text_mask"][k:].any() and ex["neighbor_text_mask"][:k].any(axis=1).all()
        # each neighbor's caption states belong to that neighbor's image
        for j, v in enumerate(neighbors):
            assert ex["neighbor_text_states"][j, 0, 0] == v
        assert ex["text_states"][0, 0] == target
    assert ks == set(range(1, min(max_k, n - 1) + 1))  # every k is drawn


def test_shapes_dtypes_and_determinism():
    cfg = debug()
    c = make_cluster("c", 5, base=50)
    a = stream.build_example(c, cfg, np.random.default_rng(3))
    b = stream.build_example(c, cfg, np.random.default_rng(3))
    K = cfg.model.max_neighbors
    shapes = {"image": (3, S, S), "text_states": (T, D), "text_mask": (T,), "neighbor_images": (K, 3, S, S),
              "neighbor_text_states": (K, T, D), "neighbor_text_mask": (K, T), "neighbor_mask": (K,)}  # fmt: skip
    for key, shape in shapes.items():
        assert a[key].shape == shape, key
        assert a[key].dtype == (bool if "mask" in key else np.float32), key
        np.testing.assert_array_equal(a[key], b[key])
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0


def test_flip_keeps_sided_captions_true():
    cfg = debug()
    img = np.zeros((S, S, 3), np.uint8)
    img[:, : S // 2] = 255  # bright left half
    c = make_cluster("c", 2, base=0, captions=["the toy on the left", "the toy in a forest"])
    c["images"] = [encode_png(Image.fromarray(img))] * 2
    flipped = {0: set(), 1: set()}
    for seed in range(30):
        ex = stream.build_example(c, cfg, np.random.default_rng(seed))
        target = int(round(float(ex["text_states"][0, 0])))
        flipped[target].add(bool(ex["image"][0, 0, 0] < 0))  # left column dark: mirrored
    assert flipped[0] == {False}  # "on the left" is never mirrored
    assert flipped[1] == {False, True}  # other captions are, sometimes


def test_wrong_text_settings_name_the_field():
    cfg = debug()
    bad = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, encoder="minilm"))
    with pytest.raises(ValueError, match="text.encoder"):
        stream.build_example(make_cluster("c", 3, 0), bad, np.random.default_rng(0))


def test_a_damaged_cluster_row_names_its_cluster_and_fields():
    """A bare IndexError or reshape error, hours into a run, named nothing."""
    cfg = debug()
    for field, value, message in [
        ("captions", ["one", "two"], r"captions 2 \(need 3\)"),
        ("text_shape", [4, T, D], r"text_shape\[0\] 4 \(need 3\)"),
        ("text_states", b"\0" * 10, rf"text_states bytes 10 \(need {2 * 3 * T * D}\)"),
        ("text_mask", b"\1" * (2 * T), rf"text_mask bytes {2 * T} \(need {3 * T}\)"),
    ]:
        with pytest.raises(ValueError, match=r"cluster 'c': 3 images but .*" + message):
            stream.build_example(make_cluster("c", 3, 0) | {field: value}, cfg, np.random.default_rng(0))


def test_training_dataset_on_ray(tmp_path, monkeypatch):
    import ray

    steps = {}  # per executor (one per execution of a dataset): when its scheduling loop stepped
    paced = stream._PacedScheduling.on_execution_step

    def recorded(self, executor):
        paced(self, executor)
        steps.setdefault(id(self), []).append(time.perf_counter())

    monkeypatch.setattr(stream._PacedScheduling, "on_execution_step", recorded)
    cfg = debug()
    clusters = [make_cluster(f"c{i:02d}", n=2 + i % 4, base=10 * i) for i in range(12)]
    pq.write_table(pa.Table.from_pylist(clusters[:7], schema=CLUSTER_SCHEMA), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(clusters[7:], schema=CLUSTER_SCHEMA), tmp_path / "b.parquet")
    assert [c["cluster_id"] for c in stream.load_clusters(tmp_path)] == [c["cluster_id"] for c in clusters]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        def run(seed, per_task=512, root=tmp_path, epochs=3, via_train=False):
            targets, batch = [], None
            dataset = stream.training_dataset(str(root), cfg, seed=seed, num_epochs=epochs, examples_per_task=per_task)
            if via_train:  # as a Ray Train worker reads it: split for one worker with the trainer's DataConfig
                workers = ingest_config().configure({"train": dataset}, 1, worker_handles=None, worker_node_ids=None)
                dataset = workers[0]["train"]
            for batch in dataset.iter_torch_batches(batch_size=5):
                targets += [int(round(float(t))) for t in batch["text_states"][:, 0, 0]]
                for example in range(len(batch["image"])):  # neighbors from the target's own cluster
                    target, neighbors = member_ids({k: v[example].numpy() for k, v in batch.items()})
                    assert {v // 10 for v in neighbors} == {target // 10}
            return targets, batch

        first, batch = run(0)
        again, _ = run(0, per_task=5)  # examples split over tasks differently: the same examples
        # ... and as Ray Train hands it to a worker (trainer.ingest_config), over clusters of which every other
        # one is slow to decode (large images), three examples per task: the tasks are ready out of order
        # (with Ray Train's default DataConfig this run's order differed from `in_order` 5 times in 5 here)
        slow = tmp_path / "slow"
        slow.mkdir()
        mixed = [make_cluster(f"s{i:02d}", n=3, base=10 * i, size=3072 if i % 2 else S) for i in range(12)]
        pq.write_table(pa.Table.from_pylist(mixed, schema=CLUSTER_SCHEMA), slow / "a.parquet")
        in_order, _ = run(0, per_task=1, root=slow, epochs=2)
        trained, _ = run(0, per_task=3, root=slow, epochs=2, via_train=True)
        other, _ = run(1)
        # shards with no rows (the workers waited for a first batch for ever) or of something else: said up front
        empty = tmp_path / "empty"
        empty.mkdir()
        pq.write_table(pa.Table.from_pylist([], schema=CLUSTER_SCHEMA), empty / "a.parquet")
        with pytest.raises(ValueError, match=r"empty: the cluster shards hold no rows"):
            stream.training_dataset(str(empty), cfg, seed=0, num_epochs=1)
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        pq.write_table(pa.table({"cluster_id": ["x"], "images": [[b"png"]]}), foreign / "a.parquet")
        with pytest.raises(ValueError, match=r"foreign: the cluster shards have no column captions, text_encoder"):
            stream.training_dataset(str(foreign), cfg, seed=0, num_epochs=1)
        left_in_context = ray.data.DataContext.get_current().custom_execution_callback_classes
    finally:
        ray.shutdown()
    # the loop of the datasets' own executors was paced (a context set after creation would not reach them) ...
    assert len(steps) >= 3 and sum(len(t) for t in steps.values()) > 6
    assert min(min(np.diff(t), default=1.0) for t in steps.values()) >= 0.9 * stream._PacedScheduling.interval
    assert stream._PacedScheduling not in left_in_context  # ... and other datasets are left alone
    assert set(batch) == set(BATCH_KEYS) and batch["neighbor_images"].shape[1:] == (cfg.model.max_neighbors, 3, S, S)
    assert first == again and first != other  # deterministic given the seed
    assert trained == in_order
    epochs = [[t // 10 for t in first[e * 12 : (e + 1) * 12]] for e in range(3)]  # (member i of cluster c: 10c + i)
    assert len(first) == 3 * len(clusters) and all(sorted(e) == list(range(12)) for e in epochs)  # each cluster once
    assert len({tuple(e) for e in epochs}) == 3  # in a new order each epoch


def test_paced_scheduling_caps_the_loops_cpu(monkeypatch):
    """A step that used c seconds of the loop thread's CPU is followed by a pause of c * (1/max_busy - 1)
    (at most max_pause), so the loop takes at most max_busy of a core; cheap steps keep `interval` apart."""
    clock = {"wall": 100.0, "cpu": 5.0}
    slept = []
    monkeypatch.setattr(stream.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(stream.time, "thread_time", lambda: clock["cpu"])
    monkeypatch.setattr(stream.time, "sleep", lambda s: [slept.append(s), clock.update(wall=clock["wall"] + s)])
    paced, P = stream._PacedScheduling(), stream._PacedScheduling

    def step(cpu, wall):
        clock["cpu"] += cpu
        clock["wall"] += wall
        paced.on_execution_step(None)

    step(cpu=0.5, wall=0.5)  # the first step (executor start-up): not paced
    step(cpu=0.05, wall=0.05)  # an expensive step: 9x its CPU time
    step(cpu=0.001, wall=0.001)  # a cheap one: the rest of the interval
    step(cpu=0.0, wall=0.3)  # one that waited on a task for longer than the interval: no pause
    step(cpu=0.5, wall=0.5)  # a very expensive one: capped
    assert slept == pytest.approx([0.05 * (1 / P.max_busy - 1), P.interval - 0.001, P.max_pause])
