"""Converters: small fake trees in each source layout, written by the test with known
values, must decode from the shards to the expected arrays per task."""

import json
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

from dsparse.cli import main
from dsparse.data.convert import SourceError, convert
from dsparse.data.convert.taskonomy import CLASSES as TASKONOMY_CLASSES
from dsparse.data.loader import augment
from dsparse.data.manifest import load_manifest
from dsparse.data.writer import DatasetWriteError
from dsparse.data.records import decoded_values, read_shard

H, W = 12, 16


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def npy(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def decoded(out):
    """{split: {key: {entry: array}}} read back through the manifest's label specs."""
    manifest = load_manifest(out)
    result = {}
    for split, info in manifest.splits.items():
        samples = {}
        for shard in info.shards:
            for raw in read_shard(str(out / shard.name)):
                values = decoded_values(raw, manifest)
                samples[values.pop("__key__")] = values
        result[split] = samples
    return manifest, result


def rng_image(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


# ------------------------------------------------------------------ NYU-v2
def nyu_tree(root, train=3, test=2):
    index = {"train": [], "test": []}
    for split, count in (("train", train), ("test", test)):
        for i in range(count):
            stem = f"{split}{i:03d}"
            png(root / "img" / f"{stem}.png", rng_image(i))
            seg = np.full((H, W), i % 40, np.uint8)
            seg[0, :] = 255
            png(root / "seg" / f"{stem}.png", seg)
            normal = np.zeros((H, W, 3), np.uint8)
            normal[...] = np.round((np.array([0.6, 0.0, -0.8]) + 1) / 2 * 255).astype(np.uint8)
            normal[1, :] = 255  # invalid
            png(root / "normal_mask" / f"{stem}.png", normal)
            depth = np.full((H, W), 2.5 + i, np.float32)
            depth[2, :] = 0.0  # invalid
            npy(root / "depth" / f"{stem}.npy", depth)
            index[split].append([f"img/{stem}.png", f"seg/{stem}.png", f"normal_mask/{stem}.png",
                                 f"depth/{stem}.npy"])
    (root / "nyu_v2_3task.json").write_text(json.dumps(index))
    return root


def test_nyuv2_converts_to_the_expected_arrays(tmp_path):
    root = nyu_tree(tmp_path / "nyu")
    manifest, splits = decoded_convert("nyuv2", root, tmp_path / "out", workers=2)
    assert sorted(splits) == ["train", "val"] and len(splits["train"]) == 3 and len(splits["val"]) == 2
    assert manifest.tasks == ["seg", "normal", "depth"] and len(manifest.classes) == 40
    sample = splits["val"]["test001"]
    np.testing.assert_array_equal(sample["rgb"], rng_image(1))
    assert (sample["seg"][0] == 255).all() and (sample["seg"][1:] == 1).all()
    assert (sample["normal"][1] == 0).all()
    np.testing.assert_allclose(sample["normal"][3, 3], [0.6, 0.0, -0.8], atol=0.01)
    assert (sample["depth"][2] == 0).all() and np.allclose(sample["depth"][3:], 3.5)
    normal = manifest.label_specs()["normal"]
    stored = {"__key__": "k", "rgb": sample["rgb"], "normal": normal.to_stored(sample["normal"])}
    flipped = augment(stored, {"normal": normal}, None, True, AlwaysFlip())
    np.testing.assert_allclose(normal.decode_stored(flipped["normal"])[3, 3], [-0.6, 0.0, -0.8], atol=0.01)
    assert manifest.source["converter"] == "nyuv2" and manifest.source["splits"] == {"train": "train", "test": "val"}


class AlwaysFlip:
    def integers(self, high):
        return high - 1


def decoded_convert(name, src, out, **kwargs):
    convert(name, src, out, shard_size=2, progress=False, **kwargs)
    return decoded(out)


def test_nyuv2_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(SourceError, match="missing index file .*nyu_v2_3task.json"):
        convert("nyuv2", tmp_path, tmp_path / "out", progress=False)
    root = nyu_tree(tmp_path / "nyu")
    png(root / "seg" / "train001.png", np.full((H, W), 45, np.uint8))  # past the 40 classes
    with pytest.raises(DatasetWriteError, match="train sample 'train001': 'seg' \\(.*seg/train001.png\\): .*45 outside "
                                                "the 40 classes"):
        convert("nyuv2", root, tmp_path / "a", progress=False)
    png(root / "seg" / "train001.png", np.full((H, W), 3, np.uint16))  # a 16-bit label
    with pytest.raises(DatasetWriteError, match="seg/train001.png is 16-bit.*expected 8-bit"):
        convert("nyuv2", root, tmp_path / "b", progress=False)
    png(root / "seg" / "train001.png", np.full((H + 2, W), 3, np.uint8))
    with pytest.raises(DatasetWriteError, match="seg/train001.png is 14x16 but the image .*img/train001.png is 12x16"):
        convert("nyuv2", root, tmp_path / "c", progress=False)
    (root / "img" / "train002.png").write_bytes(b"\x89PNG not really")
    manifest = convert("nyuv2", root, tmp_path / "d", on_error="skip", progress=False)
    assert manifest.splits["train"].num_samples == 1
    assert sorted(s["key"] for s in manifest.skipped) == ["train001", "train002"]
    assert any("cannot read" in s["error"] and "img/train002.png" in s["error"] for s in manifest.skipped)


def test_a_stopped_conversion_resumes_to_the_same_shards(tmp_path):
    root = nyu_tree(tmp_path / "nyu", train=6, test=2)
    reference = tmp_path / "reference"
    convert("nyuv2", root, reference, shard_size=1, progress=False)
    good = (root / "depth" / "test001.npy").read_bytes()
    (root / "depth" / "test001.npy").write_bytes(b"garbage")  # val is written after train
    with pytest.raises(DatasetWriteError, match="val sample 'test001'.*depth/test001.npy"):
        convert("nyuv2", root, tmp_path / "out", shard_size=1, progress=False)
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    assert written and not (tmp_path / "out" / "manifest.json").exists()
    (root / "depth" / "test001.npy").write_bytes(good)
    convert("nyuv2", root, tmp_path / "out", shard_size=1, progress=False)
    assert all((tmp_path / "out" / n).stat().st_mtime_ns == t for n, t in written.items())
    for path in reference.iterdir():
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name


# --------------------------------------------------------------- Cityscapes
def test_cityscapes_converts_float_images_ignore_labels_and_disparity(tmp_path):
    root = tmp_path / "cs"
    index = {"train": [], "test": []}
    for split, count in (("train", 2), ("test", 1)):
        for i in range(count):
            rgb = rng_image(i).astype(np.float32) / 255
            label = np.full((H, W), 18.0, np.float32)
            label[0] = -1
            disparity = np.full((H, W, 1), 0.25, np.float32)
            disparity[1] = 1e-5  # below the validity threshold
            files = []
            for name, array in (("image", rgb), ("depth", disparity), ("label_2", label), ("label_7", label % 7),
                                ("label_19", label)):
                npy(root / split / name / f"{i}.npy", array)
                files.append(f"{split}/{name}/{i}.npy")
            index[split].append(files)
    (root / "cityscape.json").write_text(json.dumps(index))
    manifest, splits = decoded_convert("cityscapes", root, tmp_path / "out")
    assert manifest.tasks == ["seg", "depth"] and len(manifest.classes) == 19
    assert manifest.encodings["depth"]["scale"] == 100000.0
    sample = next(iter(splits["val"].values()))
    np.testing.assert_array_equal(sample["rgb"], rng_image(0))
    assert (sample["seg"][0] == 255).all() and (sample["seg"][1:] == 18).all()
    assert (sample["depth"][1] == 0).all() and np.allclose(sample["depth"][2:], 0.25, atol=1e-5)
    manifest7, _ = decoded_convert("cityscapes", root, tmp_path / "out7", classes=7)
    assert len(manifest7.classes) == 7


# ---------------------------------------------------------------- Taskonomy
def taskonomy_frame(root, building, point, view, layout, size=32, seg_value=3):
    def where(domain):
        folder = root / domain / "taskonomy" / building if layout == "omnidata" else root / building / domain
        return folder / f"point_{point}_view_{view}_domain_{domain}.png"

    png(where("rgb"), np.random.default_rng(point).integers(0, 256, (size, size, 3), dtype=np.uint8))
    depth = np.full((size, size), 1024, np.uint16)  # 2 m
    depth[0, :] = 65535
    depth[1, :] = 64600  # near the maximum: invalid as in the original
    png(where("depth_zbuffer"), depth)
    normal = np.full((size, size, 3), [204, 127, 25], np.uint8)
    png(where("normal"), normal)
    png(where("keypoints2d"), np.full((size, size), 32768, np.uint16))
    png(where("edge_texture"), np.full((size, size), 16384, np.uint16))
    seg = np.full((size, size), seg_value, np.uint8)
    seg[:, :2] = 0  # uncertain (two columns: a 2x nearest downscale keeps every second)
    png(where("segment_semantic"), seg)


def split_file(path, train, val):
    rows = ["id,train,val,test"] + [f"{b},1,0,0" for b in train] + [f"{b},0,1,0" for b in val]
    path.write_text("\r".join(rows) + "\r")  # the official files end lines with CR only
    return path


@pytest.mark.parametrize("layout", ["omnidata", "original"])
def test_taskonomy_converts_both_layouts(tmp_path, layout):
    root = tmp_path / "tk"
    for point in range(3):
        taskonomy_frame(root, "alpha", point, 0, layout)
    taskonomy_frame(root, "beta", 7, 1, layout, seg_value=17)
    splits_csv = split_file(tmp_path / "split.csv", ["alpha"], ["beta"])
    manifest, splits = decoded_convert("taskonomy", root, tmp_path / "out", split_file=str(splits_csv), size=16)
    assert manifest.image_size == (16, 16) and manifest.classes == list(TASKONOMY_CLASSES)
    assert manifest.encodings["depth"]["scale"] == 512.0
    assert sorted(splits["train"]) == ["alpha_p0_v0", "alpha_p1_v0", "alpha_p2_v0"]
    sample = splits["val"]["beta_p7_v1"]
    assert (sample["depth"][0] == 0).all() and np.allclose(sample["depth"][1:], 2.0)
    assert (sample["seg"][:, 0] == 255).all() and (sample["seg"][:, 1:] == 16).all()
    np.testing.assert_allclose(sample["keypoint"], 0.5, atol=1e-4)
    np.testing.assert_allclose(sample["edge"], 0.25, atol=1e-4)
    assert (sample["normal"][0] == 0).all()  # no depth there
    expected = np.array([204, 127, 25]) / 255 * 2 - 1
    np.testing.assert_allclose(sample["normal"][5, 5], expected / np.linalg.norm(expected), atol=0.01)


def test_taskonomy_missing_buildings_and_wrong_bit_depth(tmp_path):
    root = tmp_path / "tk"
    taskonomy_frame(root, "alpha", 0, 0, "omnidata")
    splits_csv = split_file(tmp_path / "split.csv", ["alpha", "gamma"], ["alpha"])
    with pytest.raises(SourceError, match="building\\(s\\) not under .*\\['gamma'\\].*--on-error skip"):
        convert("taskonomy", root, tmp_path / "a", split_file=str(splits_csv), progress=False)
    manifest = convert("taskonomy", root, tmp_path / "b", split_file=str(splits_csv), on_error="skip",
                       progress=False, size=16)
    assert manifest.source["missing_buildings"] == ["gamma"]
    assert [(s["split"], s["key"]) for s in manifest.skipped] == [("train", "gamma")]
    png(root / "depth_zbuffer" / "taskonomy" / "alpha" / "point_0_view_0_domain_depth_zbuffer.png",
        np.zeros((32, 32), np.uint8))
    with pytest.raises(DatasetWriteError, match="depth_zbuffer.png is 8-bit.*expected 16-bit"):
        convert("taskonomy", root, tmp_path / "c", split_file=str(splits_csv), on_error="stop", progress=False,
                tasks=["depth"], size=16, splits=["val"])
    with pytest.raises(SourceError, match="medium building split is not built in.*--split-file"):
        convert("taskonomy", root, tmp_path / "d", subset="medium", progress=False)


# ------------------------------------------------------------------ folders
def folders_tree(root, num_classes=11, count=(6, 2), size=32):
    for split, n in zip(("train", "val"), count):
        for i in range(n):
            stem = f"img{i:02d}"
            png(root / "images" / split / f"{stem}.png", np.random.default_rng(i).integers(0, 256, (size, size, 3),
                                                                                             dtype=np.uint8))
            seg = (np.arange(size * size).reshape(size, size) % num_classes + 1).astype(np.uint8)  # ids 1..n
            seg[0] = 0  # unlabelled in the source
            png(root / "labels" / "seg" / split / f"{stem}.png", seg)
            depth = np.full((size, size), 1500, np.uint16)  # millimetres
            depth[1] = 0
            png(root / "labels" / "depth" / split / f"{stem}.png", depth)
            npy(root / "labels" / "edge" / split / f"{stem}.npy", np.full((size, size), 0.3, np.float32))
    description = {
        "name": "mine", "classes": [f"c{i}" for i in range(num_classes)],
        "splits": {"train": "images/train/*.png", "val": "images/val/*.png"},
        "tasks": {"seg": {"path": "labels/seg/{split}/{stem}.png", "ignore": [0], "shift": -1},
                  "depth": {"path": "labels/depth/{split}/{stem}.png", "multiply": 0.001, "invalid": [0]},
                  "edge": "labels/edge/{split}/{stem}.npy"},
    }
    (root / "dataset.yaml").write_text(yaml.safe_dump(description, sort_keys=False))
    return root / "dataset.yaml"


def test_folders_converts_by_the_yaml_rules(tmp_path):
    description = folders_tree(tmp_path / "mine")
    manifest, splits = decoded_convert("folders", description, tmp_path / "out")
    assert manifest.name == "mine" and manifest.tasks == ["seg", "depth", "edge"] and len(manifest.classes) == 11
    sample = splits["train"]["img03"]
    assert (sample["seg"][0] == 255).all() and sample["seg"][1:].max() == 10 and sample["seg"][1:].min() == 0
    assert (sample["depth"][1] == 0).all() and np.allclose(sample["depth"][2:], 1.5)
    np.testing.assert_allclose(sample["edge"], 0.3, atol=1e-4)


def test_folders_resizes_images_bilinear_and_labels_nearest(tmp_path):
    description = folders_tree(tmp_path / "mine", count=(2, 1))
    spec = yaml.safe_load(description.read_text())
    spec["size"] = [16, 24]
    description.write_text(yaml.safe_dump(spec, sort_keys=False))
    manifest, splits = decoded_convert("folders", description, tmp_path / "out")
    sample = splits["train"]["img01"]
    assert manifest.image_size == (16, 24) and sample["rgb"].shape == (16, 24, 3)
    source = np.asarray(Image.open(tmp_path / "mine" / "labels" / "seg" / "train" / "img01.png")).astype(np.int64) - 1
    source[source < 0] = 255
    rows, cols = (np.arange(16) * 2 + 1), np.minimum(((np.arange(24) + 0.5) * 32 / 24).astype(int), 31)
    np.testing.assert_array_equal(sample["seg"], source[rows][:, cols])


def test_folders_bad_description_and_class_count(tmp_path):
    description = folders_tree(tmp_path / "mine")
    spec = yaml.safe_load(description.read_text())
    spec["tasks"]["seg"]["shift"] = 0  # ids 1..11 for 11 classes: 11 is out of range
    description.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(DatasetWriteError, match="'seg'.*11 outside the 11 classes"):
        convert("folders", description, tmp_path / "a", progress=False)
    description.write_text("splits: [oops")
    with pytest.raises(SourceError, match="not valid YAML"):
        convert("folders", description, tmp_path / "b", progress=False)
    with pytest.raises(SourceError, match="missing dataset description"):
        convert("folders", tmp_path / "nope.yaml", tmp_path / "c", progress=False)


def test_a_converted_folders_dataset_trains(tmp_path):
    from dsparse.config import load_config
    from dsparse.train.trainer import train

    description = folders_tree(tmp_path / "mine", count=(8, 4))
    convert("folders", description, tmp_path / "data", shard_size=2, progress=False)
    config = load_config("synthetic_tiny", [
        f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}", "tasks=[seg, depth, edge]",
        "task_weights={seg: 1.0, depth: 1.0, edge: 1.0}", "data.batch_size=2", "data.num_workers=0",
        "data.eval_batch_size=2", "model.base_width=4", "model.head_dilations=[1, 2]", "train.iterations=3",
        "train.eval_interval=3", "train.checkpoint_interval=3", "train.log_interval=1", "tracking.enabled=false"])
    summary = train(config)
    assert np.isfinite(summary["final_metrics"]["seg"]["pixel_acc"])


def test_cli_convert_and_check(tmp_path, capsys):
    root = nyu_tree(tmp_path / "nyu")
    assert main(["data", "convert", "nyuv2", str(root), str(tmp_path / "out"), "--workers", "1",
                 "--shard-size", "2"]) == 0
    assert "wrote {'train': 3, 'val': 2} samples in 3 shards" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "out")]) == 0
    assert "5 samples read (labels zstd, rgb zstd), 0 problem(s)" in capsys.readouterr().out
    assert main(["data", "convert", "nyuv2", str(root), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "already holds a dataset" in error
    shard = tmp_path / "out" / load_manifest(tmp_path / "out").splits["train"].shards[0].name
    shard.write_bytes(shard.read_bytes()[:1500])
    assert main(["data", "check", str(tmp_path / "out")]) == 1
    assert "manifest.json says" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "out"), "--json", "--quiet"]) == 1
    result = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert result["ok"] is False and any("manifest.json says" in p for p in result["problems"])


def test_cli_folders_prints_the_train_command_for_its_preset(tmp_path, capsys):
    from dsparse.config import load_config

    description = folders_tree(tmp_path / "mine", count=(4, 2))
    assert main(["data", "convert", "folders", str(description), str(tmp_path / "out"), "--workers", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f'train on it: dsparse train folders --set data.path={tmp_path / "out"} --set "tasks=[seg, depth, edge]"'
    config = load_config("folders", [f"data.path={tmp_path / 'out'}", "tasks=[seg, depth, edge]"])
    assert config.tasks == ["seg", "depth", "edge"]


def test_data_check_of_a_file_names_the_directory_it_wants(tmp_path, capsys):
    """It suggested `dsparse data synth --out FILE`, which cannot write over a file."""
    from dsparse.cli import main

    (tmp_path / "notes.txt").write_text("x")
    assert main(["data", "check", str(tmp_path / "notes.txt")]) == 2
    error = capsys.readouterr().err
    assert "is a file; pass the dataset directory" in error and "data synth" not in error
