"""Shard and manifest writing: layout, round trip through the codec, atomicity, errors."""

import json
import tarfile
from collections import defaultdict

import numpy as np
import pytest

from dsparse.data import codec
from dsparse.data.shards import (
    load_manifest,
    scene_seed,
    write_shards,
    write_synthetic_dataset,
)
from dsparse.data.synth import CLASSES, render_scene

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = write_synthetic_dataset(out, num_train=12, num_val=4, size=SIZE, seed=0,
                                       shard_size=5, num_procs=2, progress=False)
    return out, manifest


def _read_tar(path):
    samples = defaultdict(dict)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            entry = ext.split(".")[0]
            samples[key][entry] = codec.decode(entry, tar.extractfile(member).read())
    return names, dict(samples)


def test_manifest_schema_and_shard_layout(dataset):
    out, manifest = dataset
    assert manifest == load_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "dsparse-webdataset" and manifest["version"] == 1
    assert manifest["image_size"] == [SIZE, SIZE]
    assert manifest["tasks"] == ["seg", "normal", "depth", "keypoint", "edge"]
    assert manifest["classes"] == list(CLASSES) and manifest["ignore_index"] == 255
    assert manifest["encodings"] == codec.ENCODING_DOC
    assert manifest["generator"]["kind"] == "synthetic" and manifest["generator"]["size"] == SIZE
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert [(s["name"], s["num_samples"]) for s in train["shards"]] == [
        ("train-000000.tar", 5), ("train-000001.tar", 5), ("train-000002.tar", 2)]
    assert [(s["name"], s["num_samples"]) for s in val["shards"]] == [("val-000000.tar", 4)]
    assert train["num_samples"] == 12 and val["num_samples"] == 4
    on_disk = sorted(p.name for p in out.iterdir())
    assert on_disk == sorted(["manifest.json"] + [s["name"] for s in train["shards"] + val["shards"]])
    assert not list(out.glob("*.tmp"))


def test_tar_contents_round_trip_to_the_renderer(dataset):
    out, manifest = dataset
    for split in ("train", "val"):
        index = 0
        for shard in manifest["splits"][split]["shards"]:
            names, samples = _read_tar(out / shard["name"])
            assert names == sorted(names, key=lambda n: n.split(".")[0])  # grouped by key
            assert len(samples) == shard["num_samples"]
            for key in sorted(samples):
                assert key == f"{split}_{index:08d}"
                expected = render_scene(scene_seed(0, split, index), SIZE)
                got = samples[key]
                assert set(got) == set(codec.FILE_OF)
                assert np.array_equal(got["rgb"], expected["rgb"])
                assert np.array_equal(got["seg"], expected["seg"])
                assert np.abs(got["depth"] - expected["depth"]).max() <= 1e-3
                cos = (got["normal"] * expected["normal"]).sum(-1)
                assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 1.0
                for entry in ("keypoint", "edge"):
                    assert np.abs(got[entry] - expected[entry]).max() <= 1e-4
                index += 1


def test_statistics_describe_the_train_split(dataset):
    _, manifest = dataset
    frequency = np.array(manifest["class_pixel_frequency"])
    assert frequency.shape == (len(CLASSES),) and (frequency >= 0).all()
    assert frequency.sum() == pytest.approx(1.0)
    expected = np.zeros(len(CLASSES))
    depths = []
    for i in range(12):
        sample = render_scene(scene_seed(0, "train", i), SIZE)
        expected += np.bincount(sample["seg"].ravel(), minlength=len(CLASSES))
        depths.append(sample["depth"])
    assert np.allclose(frequency, expected / expected.sum())
    assert manifest["depth_range"] == pytest.approx([min(d.min() for d in depths),
                                                     max(d.max() for d in depths)])


def test_output_does_not_depend_on_process_count(dataset, tmp_path):
    out, _ = dataset
    write_synthetic_dataset(tmp_path, num_train=12, num_val=4, size=SIZE, seed=0,
                            shard_size=5, num_procs=1, progress=False)
    for tar in out.glob("*.tar"):
        assert (tmp_path / tar.name).read_bytes() == tar.read_bytes(), tar.name


def test_train_and_val_never_share_seeds():
    train = {scene_seed(0, "train", i) for i in range(1000)}
    val = {scene_seed(0, "val", i) for i in range(1000)}
    other_seed = {scene_seed(1, "train", i) for i in range(1000)}
    assert len(train) == 1000 and not train & val and not train & other_seed


def test_webdataset_reads_the_shards(dataset):
    webdataset = pytest.importorskip("webdataset")
    out, manifest = dataset
    urls = [str(out / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"train_{i:08d}" for i in range(12)]
    assert set(samples[0]) >= {f"{e}.png" for e in ("rgb", "seg", "depth", "normal", "keypoint", "edge")}


def _tiny_samples(count, fail_after=None):
    for i in range(count):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("simulated crash")
        yield f"s_{i:04d}", {"rgb": np.full((4, 4, 3), i, np.uint8), "depth": np.full((4, 4), 1.5, np.float32)}


def test_write_shards_is_deterministic_and_generic(tmp_path):
    first = write_shards(tmp_path / "a", "test", _tiny_samples(7), shard_size=3)
    write_shards(tmp_path / "b", "test", _tiny_samples(7), shard_size=3)
    assert first == [{"name": "test-000000.tar", "num_samples": 3},
                     {"name": "test-000001.tar", "num_samples": 3},
                     {"name": "test-000002.tar", "num_samples": 1}]
    for shard in first:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    with tarfile.open(tmp_path / "a" / "test-000000.tar") as tar:
        assert tar.getnames()[:2] == ["s_0000.rgb.png", "s_0000.depth.png"]
    assert write_shards(tmp_path / "c", "test", [], shard_size=3) == []


def test_a_crash_mid_shard_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError, match="simulated"):
        write_shards(tmp_path, "train", _tiny_samples(10, fail_after=4), shard_size=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


@pytest.mark.parametrize("shard_size, samples, match", [
    (0, [], "shard_size"),
    (2, [("bad.key", {"rgb": np.zeros((2, 2, 3), np.uint8)})], "key"),
    (2, [("k", {"rgb": np.zeros((2, 2, 3), np.uint8), "instance": np.zeros((2, 2))})], "instance"),
    (2, [("k", {"seg": np.zeros((2, 2), np.uint8)})], "rgb"),
    (2, [("b", {"rgb": np.zeros((2, 2, 3), np.uint8)}), ("a", {"rgb": np.zeros((2, 2, 3), np.uint8)})], "increase"),
])
def test_write_shards_rejects_bad_input(tmp_path, shard_size, samples, match):
    with pytest.raises(ValueError, match=match):
        write_shards(tmp_path, "train", samples, shard_size)
    assert not list(tmp_path.glob("*.tmp"))


def test_load_manifest_explains_missing_or_broken_datasets(tmp_path):
    with pytest.raises(ValueError, match="dsparse data synth --out"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="dsparse-webdataset"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "dsparse-webdataset", "version": 1}))
    with pytest.raises(ValueError, match="malformed"):
        load_manifest(tmp_path)


def test_bad_generator_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        write_synthetic_dataset(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="num_procs"):
        write_synthetic_dataset(tmp_path, num_train=1, num_procs=0)
    assert not (tmp_path / "manifest.json").exists()
