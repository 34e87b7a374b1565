"""The subject world: deterministic renders, distinct subjects, captions, held-out split, DreamBench loader."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from neighbor_diffusion.config import cpu, debug
from neighbor_diffusion.data import crawl, world
from neighbor_diffusion.data.dreambench import load_dreambench, parse_prompts


def test_render_is_deterministic_and_sized():
    s = world.make_subject(3, world_seed=0)
    ctx = world.Context(scene="snow", position="left", size="small", orientation="tilted", accessory="crown", seed=7)
    a, b = world.render(s, ctx, 64), world.render(s, ctx, 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert world.make_subject(3, 0) == s  # subjects too come from their seed
    other = world.render(s, dataclasses.replace(ctx, seed=8), 64)
    assert other.tobytes() != a.tobytes()  # scene details follow the context seed
    for size in (32, 128, 256):
        assert world.render(s, ctx, size).size == (size, size)
    # every size shows the same picture: 32 px equals the 256 px render box-downsampled
    big = np.asarray(world.render(s, ctx, 256).resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(world.render(s, ctx, 32), dtype=np.float32) - big).mean() < 1.0


def test_render_dict_roundtrip():
    s = world.make_subject(5)
    ctx = world.Context(scene="night", color="red", style="sketch", seed=3)
    again = world.render_dict(json.loads(json.dumps(s.to_dict())), json.loads(json.dumps(ctx.to_dict())), 48)
    assert again.tobytes() == world.render(s, ctx, 48).tobytes()


def _subject_pixels(subject, ctx, size=32):
    return np.asarray(world.render(subject, ctx, size), dtype=np.float32)


def test_same_class_subjects_differ_at_32px():
    subjects = world.world_subjects(cpu())  # 48 subjects, 8 per class
    ctx = world.Context(scene="lawn", position="center", size="large", seed=1)
    background = _subject_pixels(subjects[0], dataclasses.replace(ctx, size="small", position="left"))
    for noun in world.CLASSES:
        same = [s for s in subjects if s.noun == noun]
        assert len(same) >= 8
        imgs = [_subject_pixels(s, ctx) for s in same]
        for i in range(len(imgs)):
            for j in range(i + 1, len(imgs)):
                # mean over the subject's region (centre 16x16), in 0..255: clearly visible differences
                diff = np.abs(imgs[i][8:24, 8:24] - imgs[j][8:24, 8:24]).mean()
                assert diff > 15.0, (noun, same[i].subject_id, same[j].subject_id, diff)
    assert background.shape == (32, 32, 3)


def test_contexts_validate_and_captions_say_them():
    with pytest.raises(ValueError, match="context.scene"):
        world.Context(scene="moon")
    ctx = world.Context(scene="snow", position="right", size="small", orientation="upside_down", color="blue", seed=0)
    text = world.caption("mug", ctx, rng=None)
    for words in ("mug", "snowy field", "on the right", "small", "upside down", "blue"):
        assert words in text
    assert len(world.SCENES) >= 8
    rng = np.random.default_rng(0)
    texts = {world.caption("toy", world.sample_context(rng), rng) for _ in range(50)}
    assert len(texts) > 40  # varied templates and contexts


def test_heldout_split_and_examples():
    cfg = cpu()
    split = world.split_subjects(cfg)
    assert len(split["heldout"]) == cfg.data.num_heldout_subjects
    assert len(split["train"]) + len(split["heldout"]) == cfg.data.num_subjects
    assert not {s.seed for s in split["train"]} & {s.seed for s in split["heldout"]}
    examples = world.heldout_examples(cfg, num_subjects=3, k=2, image_size=32, seed=0)
    assert [e["subject_id"] for e in examples] == [s.subject_id for s in split["heldout"][:3]]
    for e in examples:
        assert len(e["neighbor_images"]) == len(e["neighbor_captions"]) == 2
        assert e["noun"] in e["prompt"] and e["target"].size == (32, 32)
        assert world.render_dict(e["subject"], e["context"], 32).tobytes() == e["target"].tobytes()
    again = world.heldout_examples(cfg, num_subjects=3, k=2, image_size=32, seed=0)
    assert [e["prompt"] for e in again] == [e["prompt"] for e in examples]


def test_heldout_subjects_never_in_training_crawl(tmp_path):
    cfg = debug()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_pages=40, bad_records=1))
    info = crawl.generate_crawl(cfg, tmp_path)
    assert info["pairs"] > 100
    truth = pq.read_table(tmp_path / "ground_truth.parquet").to_pylist()
    manifest = json.loads((tmp_path / "world.json").read_text())
    heldout_ids = {s["subject_id"] for s in manifest["heldout_subjects"]}
    heldout_seeds = set(manifest["heldout_seeds"])
    assert heldout_ids and len(heldout_seeds) == cfg.data.num_heldout_subjects
    seen = {t["subject_id"] for t in truth if t["subject_id"]}
    assert seen and not seen & heldout_ids
    assert {s["seed"] for s in manifest["train_subjects"]}.isdisjoint(heldout_seeds)
    # the crawl is deterministic: the same config writes the same ground truth
    again = tmp_path / "again"
    crawl.generate_crawl(cfg, again)
    assert pq.read_table(again / "ground_truth.parquet").equals(pq.read_table(tmp_path / "ground_truth.parquet"))


DREAMBENCH_PROMPTS = """Classes
subject_name,class
backpack,backpack
dog2,dog

Prompts
Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on a cobblestone street'.format(unique_token, class_token),
]
Live Subject Prompts
prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def test_dreambench_loader(tmp_path):
    root = tmp_path / "dataset"
    for name, color in (("backpack", (200, 30, 30)), ("dog2", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (80, 60), color).save(root / name / f"{i:02d}.jpg")
    (root / "dog2" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "prompts_and_classes.txt").write_text(DREAMBENCH_PROMPTS)
    classes, objects, live = parse_prompts(DREAMBENCH_PROMPTS)
    assert classes == {"backpack": "backpack", "dog2": "dog"} and len(objects) == 2 and len(live) == 1
    subjects = load_dreambench(tmp_path)
    assert [s["subject_id"] for s in subjects] == ["backpack", "dog2"]
    assert subjects[0]["prompts"] == ["a backpack in the jungle", "a backpack on a cobblestone street"]
    assert subjects[1]["prompts"] == ["a dog wearing a red hat"]
    assert len(subjects[1]["neighbor_images"]) == 3  # the broken file is skipped
    assert subjects[0]["target"] is None
