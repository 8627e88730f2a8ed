"""The dataset writer: layout, round trip through the label specs, statistics,
determinism, resume after a kill, refusal of labels it would damage, and bad input."""

import json
import multiprocessing
import os
import signal
import tarfile
import time

import numpy as np
import pytest

from dsparse.data.manifest import load_manifest
from dsparse.data.synth import CLASSES, render_scene
from dsparse.data.synth.dataset import scene_seed, write_synthetic_dataset
from dsparse.data.writer import DatasetInfo, DatasetWriteError, parse_shard_size, write_dataset
from dsparse.tasks import TASKS
from dsparse.data.records import decoded_values, read_shard

SIZE = 32
ALL_TASKS = ["seg", "normal", "depth", "keypoint", "edge"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = write_synthetic_dataset(out, num_train=12, num_val=4, size=SIZE, seed=0,
                                       shard_size=5, num_procs=2, progress=False)
    return out, manifest


def read_tar(path, manifest):
    with tarfile.open(path) as tar:
        names = tar.getnames()
    samples = {}
    for raw in read_shard(str(path)):
        values = decoded_values(raw, manifest)
        samples[values.pop("__key__")] = values
    return names, samples


def test_manifest_schema_and_shard_layout(dataset):
    out, manifest = dataset
    assert manifest == load_manifest(out)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "dsparse-webdataset" and raw["version"] == 2
    assert manifest.image_size == (SIZE, SIZE) and manifest.tasks == ALL_TASKS
    assert manifest.classes == list(CLASSES) and manifest.name == "synthetic"
    assert manifest.encodings["depth"]["scale"] == 1000.0
    assert set(manifest.encodings) == set(ALL_TASKS) and all("description" in e for e in manifest.encodings.values())
    assert manifest.source["converter"] == "synthetic" and manifest.source["size"] == SIZE
    train, val = manifest.splits["train"], manifest.splits["val"]
    assert [(s.name, s.num_samples) for s in train.shards] == [
        ("train-000000.tar", 5), ("train-000001.tar", 5), ("train-000002.tar", 2)]
    assert [(s.name, s.num_samples) for s in val.shards] == [("val-000000.tar", 4)]
    assert all(s.num_bytes == (out / s.name).stat().st_size for s in train.shards + val.shards)
    on_disk = sorted(p.name for p in out.iterdir())
    assert on_disk == sorted(["manifest.json"] + [s.name for s in train.shards + val.shards])


def test_tar_contents_round_trip_to_the_renderer(dataset):
    out, manifest = dataset
    for split in ("train", "val"):
        index = 0
        for shard in manifest.splits[split].shards:
            names, samples = read_tar(out / shard.name, manifest)
            assert names == sorted(names, key=lambda n: n.split(".")[0])  # grouped by key
            assert len(samples) == shard.num_samples
            for key in sorted(samples):
                assert key == f"{split}_{index:08d}"
                expected = render_scene(scene_seed(0, split, index), SIZE)
                got = samples[key]
                assert set(got) == {"rgb", *ALL_TASKS}
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
    frequency = np.array(manifest.class_pixel_frequency)
    assert frequency.shape == (len(CLASSES),) and frequency.sum() == pytest.approx(1.0)
    counts, depths, images = np.zeros(len(CLASSES)), [], []
    for i in range(12):
        sample = render_scene(scene_seed(0, "train", i), SIZE)
        counts += np.bincount(sample["seg"].ravel(), minlength=len(CLASSES))
        depths.append(sample["depth"])
        images.append(sample["rgb"].reshape(-1, 3) / 255)
    assert np.allclose(frequency, counts / counts.sum())
    images = np.concatenate(images)
    assert manifest.rgb_mean == pytest.approx(tuple(images.mean(0)))
    assert manifest.rgb_std == pytest.approx(tuple(images.std(0)))
    # over the train split, as stored (millimetres)
    assert manifest.stats["depth_range"] == pytest.approx([min(d.min() for d in depths), max(d.max() for d in depths)],
                                                          abs=6e-4)


def test_output_does_not_depend_on_process_count(dataset, tmp_path):
    out, _ = dataset
    write_synthetic_dataset(tmp_path, num_train=12, num_val=4, size=SIZE, seed=0,
                            shard_size=5, num_procs=1, progress=False)
    for tar in out.glob("*.tar"):
        assert (tmp_path / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert (tmp_path / "manifest.json").read_text() == (out / "manifest.json").read_text()


def test_train_and_val_never_share_seeds():
    train = {scene_seed(0, "train", i) for i in range(1000)}
    val = {scene_seed(0, "val", i) for i in range(1000)}
    other_seed = {scene_seed(1, "train", i) for i in range(1000)}
    assert len(train) == 1000 and not train & val and not train & other_seed


def test_webdataset_reads_the_shards(dataset):
    webdataset = pytest.importorskip("webdataset")
    out, manifest = dataset
    urls = [str(out / s.name) for s in manifest.splits["train"].shards]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"train_{i:08d}" for i in range(12)]
    assert set(samples[0]) >= {f"{e}.zst" for e in ("rgb", *ALL_TASKS)}


# ----------------------------------------------------------- generic samples
def depth_sample(i, size=4, depth=1.5):
    return {"rgb": np.full((size, size, 3), i, np.uint8), "depth": np.full((size, size), depth, np.float32)}


DEPTH_ONLY = DatasetInfo(name="toy", tasks=["depth"])


def test_shards_are_deterministic_and_keys_sorted_within_a_shard(tmp_path):
    samples = [(f"s_{i:04d}", depth_sample(i)) for i in (3, 1, 2, 0, 6, 5, 4)]
    first = write_dataset(tmp_path / "a", {"test": samples}, DEPTH_ONLY, shard_size=3, progress=False)
    write_dataset(tmp_path / "b", {"test": samples}, DEPTH_ONLY, shard_size=3, progress=False)
    assert [(s.name, s.num_samples) for s in first.splits["test"].shards] == [
        ("test-000000.tar", 3), ("test-000001.tar", 3), ("test-000002.tar", 1)]
    for shard in first.splits["test"].shards:
        assert (tmp_path / "a" / shard.name).read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    with tarfile.open(tmp_path / "a" / "test-000000.tar") as tar:
        assert tar.getnames() == ["s_0001.rgb.zst", "s_0001.depth.zst", "s_0002.rgb.zst", "s_0002.depth.zst",
                                  "s_0003.rgb.zst", "s_0003.depth.zst"]


def test_a_byte_target_sizes_shards_from_the_encoded_samples(tmp_path):
    samples = [(f"s_{i:04d}", depth_sample(i, size=16)) for i in range(40)]
    manifest = write_dataset(tmp_path, {"train": samples}, DEPTH_ONLY, shard_size="8KB", min_shards=2,
                             progress=False)
    sizes = [s.num_bytes for s in manifest.splits["train"].shards]
    assert len(sizes) > 2 and max(sizes) <= 8000 * 1.3
    assert parse_shard_size("1GB") == ("bytes", 10**9) and parse_shard_size("256MiB") == ("bytes", 256 * 2**20)
    assert parse_shard_size(200) == ("samples", 200) and parse_shard_size("200") == ("samples", 200)
    for bad in ("0", "-3", "12 parsecs", "MB"):
        with pytest.raises(ValueError, match="shard size"):
            parse_shard_size(bad)


# --------------------------------------------------- labels are never damaged
SEG_INFO = DatasetInfo(name="toy", tasks=["seg", "depth", "keypoint", "edge", "normal"],
                       classes=[f"c{i}" for i in range(10)])


def full_sample(**changes):
    sample = {"rgb": np.zeros((4, 4, 3), np.uint8), "seg": np.zeros((4, 4), np.uint8),
              "depth": np.ones((4, 4), np.float32), "keypoint": np.zeros((4, 4), np.float32),
              "edge": np.zeros((4, 4), np.float32),
              "normal": np.tile(np.array([0, 0, -1], np.float32), (4, 4, 1))}
    for name, (index, value) in changes.items():
        array = sample[name] if not isinstance(value, np.ndarray) else value
        if not isinstance(value, np.ndarray):
            array = array.astype(np.asarray(value).dtype if name != "seg" else array.dtype, copy=True)
            array[index] = value
        sample[name] = array
    return sample


@pytest.mark.parametrize("sample, message", [
    (full_sample(seg=(0, np.full((4, 4), 300, np.int64))), "'seg'.*300 outside the 10 classes"),
    (full_sample(seg=(0, np.full((4, 4), 10, np.int64))), "'seg'.*10 outside the 10 classes.*background"),
    (full_sample(seg=(0, np.full((4, 4), 3.7, np.float32))), "'seg'.*integer array"),
    (full_sample(seg=(0, np.full((4, 4), -1, np.int64))), "'seg'.*-1 outside"),
    (full_sample(edge=(0, np.full((4, 4), 1.5, np.float32))), "'edge'.*\\[0, 1\\].*1.5"),
    (full_sample(keypoint=(0, np.full((4, 4), 2.0, np.float32))), "'keypoint'.*\\[0, 1\\]"),
    (full_sample(depth=(0, np.full((4, 4), 70.0, np.float32))), "'depth'.*above 65.535.*smaller depth scale"),
    (full_sample(depth=(0, np.full((4, 4), 0.0001, np.float32))), "'depth'.*resolution"),
    (full_sample(depth=(0, np.full((4, 4), np.nan, np.float32))), "'depth'.*NaN"),
    (full_sample(normal=(0, np.full((4, 4, 3), 0.9, np.float32))), "'normal'.*unit vectors"),
    (full_sample(rgb=(0, np.full((4, 4, 3), 1.5, np.float32))), "'rgb'.*\\[0, 1\\]"),
    (full_sample(rgb=(0, np.full((4, 4, 3), 300, np.int32))), "'rgb'.*\\[0, 255\\]"),
    (full_sample(depth=(0, np.ones((4, 5), np.float32))), "'depth' is 4x5, the image is 4x4"),
    ({**full_sample(), "instance": np.zeros((4, 4))}, "extra \\['instance'\\]"),
    ({k: v for k, v in full_sample().items() if k != "edge"}, "missing \\['edge'\\]"),
])
def test_labels_the_encoding_would_damage_are_refused_naming_sample_and_task(tmp_path, sample, message):
    samples = {"train": [("good", full_sample()), ("bad_one", sample)]}
    with pytest.raises(DatasetWriteError, match=f"train sample 'bad_one': .*{message}"):
        write_dataset(tmp_path, samples, SEG_INFO, shard_size=4, progress=False)
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("*.tar"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_float_rgb_in_unit_range_is_rescaled_not_stored_black(tmp_path):
    rgb = np.linspace(0, 1, 48, dtype=np.float32).reshape(4, 4, 3)
    write_dataset(tmp_path, {"train": [("a", {"rgb": rgb, "depth": np.ones((4, 4))})]}, DEPTH_ONLY,
                  progress=False)
    manifest = load_manifest(tmp_path)
    _, samples = read_tar(tmp_path / manifest.splits["train"].shards[0].name, manifest)
    np.testing.assert_array_equal(samples["a"]["rgb"], np.round(rgb * 255).astype(np.uint8))


def test_a_depth_scale_keeps_far_depths_and_is_recorded(tmp_path):
    info = DatasetInfo(name="far", tasks=["depth"], encodings={"depth": {"scale": 512}})
    depth = np.full((4, 4), 100.0, np.float32)
    depth[0, 0] = 0.0  # invalid
    write_dataset(tmp_path, {"train": [("a", {"rgb": np.zeros((4, 4, 3), np.uint8), "depth": depth})]}, info,
                  progress=False)
    manifest = load_manifest(tmp_path)
    assert manifest.encodings["depth"]["scale"] == 512
    _, samples = read_tar(tmp_path / "train-000000.tar", manifest)
    np.testing.assert_array_equal(samples["a"]["depth"], depth)


def test_skip_records_bad_samples_in_the_manifest(tmp_path, caplog):
    samples = {"train": [("a", full_sample()), ("b", full_sample(seg=(0, np.full((4, 4), 42, np.int64)))),
                         ("c", full_sample())]}
    manifest = write_dataset(tmp_path, samples, SEG_INFO, shard_size=2, on_error="skip", progress=False)
    assert manifest.splits["train"].num_samples == 2
    assert [(s["split"], s["key"]) for s in manifest.skipped] == [("train", "b")]
    assert "42 outside the 10 classes" in manifest.skipped[0]["error"]
    assert "skipped train sample 'b': 'seg'" in caplog.text, "each skipped sample is reported (as a warning)"


def test_a_split_with_every_sample_skipped_is_an_error(tmp_path):
    bad = full_sample(seg=(0, np.full((4, 4), 42, np.int64)))
    with pytest.raises(DatasetWriteError, match="no usable sample"):
        write_dataset(tmp_path, {"train": [("a", full_sample())], "val": [("b", bad)]}, SEG_INFO,
                      on_error="skip", progress=False)


# --------------------------------------------------------- directory rules
def test_an_existing_dataset_is_never_overwritten_without_asking(tmp_path):
    samples = {"train": [("a", depth_sample(1))]}
    write_dataset(tmp_path, samples, DEPTH_ONLY, progress=False)
    before = (tmp_path / "train-000000.tar").read_bytes()
    with pytest.raises(DatasetWriteError, match="already holds a dataset.*--overwrite"):
        write_dataset(tmp_path, {"train": [("a", depth_sample(2))]}, DEPTH_ONLY, progress=False)
    assert (tmp_path / "train-000000.tar").read_bytes() == before
    write_dataset(tmp_path, {"train": [("a", depth_sample(2))]}, DEPTH_ONLY, progress=False, overwrite=True)
    assert (tmp_path / "train-000000.tar").read_bytes() != before


def test_a_directory_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetWriteError, match="not empty"):
        write_dataset(tmp_path, {"train": [("a", depth_sample(1))]}, DEPTH_ONLY, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_unwritable_directory_is_one_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file" / "sub"  # root ignores permissions; a file in the path cannot be a directory
        (tmp_path / "file").write_text("")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "sub"
    with pytest.raises(DatasetWriteError, match="cannot write to"):
        write_dataset(target, {"train": [("a", depth_sample(1))]}, DEPTH_ONLY, progress=False)


@pytest.mark.parametrize("splits, match", [
    ({"train": [("bad.key", depth_sample(0))]}, "key"),
    ({"train": [("a", depth_sample(0)), ("a", depth_sample(1))]}, "more than once"),
    ({"bad-split": [("a", depth_sample(0))]}, "split"),
    ({"train": []}, "no samples"),
    ({}, "no splits"),
])
def test_bad_arguments_raise_before_anything_is_written(tmp_path, splits, match):
    with pytest.raises(ValueError, match=match):
        write_dataset(tmp_path / "out", splits, DEPTH_ONLY, progress=False)
    assert not (tmp_path / "out").exists()


def test_load_manifest_explains_missing_or_broken_datasets(tmp_path, dataset):
    with pytest.raises(ValueError, match="dsparse data synth --out.*dsparse data convert"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="dsparse-webdataset"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "dsparse-webdataset", "version": 1}))
    with pytest.raises(ValueError, match="version 2"):
        load_manifest(tmp_path)
    good = json.loads((dataset[0] / "manifest.json").read_text())
    for change, match in ((lambda m: m["class_pixel_frequency"].pop(), "class_pixel_frequency"),
                          (lambda m: m["tasks"].append("albedo"), "registered"),
                          (lambda m: m["splits"]["train"]["shards"][0].update(num_samples=0), "num_samples"),
                          (lambda m: m["encodings"]["depth"].update(scale=-1), "scale"),
                          (lambda m: m.update(rgb_std=[0, 1, 1]), "rgb_std")):
        broken = json.loads(json.dumps(good))
        change(broken)
        (tmp_path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            load_manifest(tmp_path)


def test_bad_generator_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        write_synthetic_dataset(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="num_procs"):
        write_synthetic_dataset(tmp_path, num_train=1, num_procs=0)
    assert not (tmp_path / "manifest.json").exists()


def test_a_task_without_a_label_declaration_is_refused():
    from dsparse.tasks import register_task
    from dsparse.tasks.dense import DepthTask

    unlabelled = type("Unlabelled", (DepthTask,), {"label": None})
    with pytest.raises(ValueError, match="label must be a LabelSpec"):
        register_task("unlabelled")(unlabelled)
    assert "unlabelled" not in TASKS


# -------------------------------------------------------------- resume
def _slow_write(out, pause_file):
    """Child process: write the synthetic set, one process, pausing after 2 shards."""
    import dsparse.data.writer as writer

    original = writer._publish

    def publish(out_dir, record):
        result = original(out_dir, record)
        if len(list((out_dir / writer.STATE_DIR).glob("*.tar.json"))) >= 2:
            open(pause_file, "w").close()
            time.sleep(60)
        return result

    writer._publish = publish
    write_synthetic_dataset(out, num_train=12, num_val=4, size=SIZE, seed=0, shard_size=3, num_procs=1,
                            progress=False)


def test_a_killed_write_resumes_to_the_same_bytes(tmp_path):
    reference = tmp_path / "reference"
    write_synthetic_dataset(reference, num_train=12, num_val=4, size=SIZE, seed=0, shard_size=3, num_procs=2,
                            progress=False)
    out, pause = tmp_path / "killed", tmp_path / "paused"
    child = multiprocessing.get_context("spawn").Process(target=_slow_write, args=(out, pause))
    child.start()
    deadline = time.time() + 120
    while not pause.exists() and time.time() < deadline and child.is_alive():
        time.sleep(0.1)
    assert pause.exists(), "the writer never reached its second shard"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(kept) >= 2
    (out / "train-000003.tar").write_bytes(b"stale")  # an unrecorded shard of an earlier attempt
    (out / ".train-000003.tar.abc.tmp").write_bytes(b"half a shard")  # a shard that was being written
    write_synthetic_dataset(out, num_train=12, num_val=4, size=SIZE, seed=0, shard_size=3, num_procs=2,
                            progress=False)
    for name, mtime in kept.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


# ------------------------------------------------- review: resume edge cases
def bad_in_worker(item):
    """A load function for spawn workers: 'bad' items fail, others become samples."""
    if item == "bad":
        raise ValueError("unreadable source file /data/bad.png")
    return depth_sample(int(item))


def test_a_parallel_write_stopped_by_a_bad_sample_leaves_no_partial_files(tmp_path):
    items = [(f"s_{i:03d}", str(i)) for i in range(12)]
    broken = {"train": items[:9] + [("s_009", "bad")] + items[10:]}
    with pytest.raises(DatasetWriteError, match="train sample 's_009': unreadable source file /data/bad.png"):
        write_dataset(tmp_path, broken, DEPTH_ONLY, load=bad_in_worker, shard_size=2, workers=2, progress=False)
    write_dataset(tmp_path, {"train": items}, DEPTH_ONLY, load=bad_in_worker, shard_size=2, workers=2,
                  progress=False, overwrite=True)
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / ".dsparse-writing").exists()
    assert load_manifest(tmp_path).splits["train"].num_samples == 12


def from_file(path):
    """A load function reading a sample's number from a source file (as a converter would)."""
    text = open(path).read()
    if not text.isdigit():
        raise ValueError(f"{path} does not hold a number")
    return depth_sample(int(text))


def test_resume_refuses_changed_sources_and_rewrites_damaged_shards(tmp_path):
    sources = tmp_path / "src"
    sources.mkdir()
    for i in range(7):
        (sources / f"{i}.txt").write_text(str(i) if i != 6 else "oops")
    items = {"train": [(f"s_{i:03d}", str(sources / f"{i}.txt")) for i in range(7)]}
    out = tmp_path / "out"
    with pytest.raises(DatasetWriteError, match="s_006.*6.txt does not hold a number"):
        write_dataset(out, items, DEPTH_ONLY, load=from_file, shard_size=1, progress=False)
    renamed = {"train": [(key, path.replace(".txt", ".text")) for key, path in items["train"]]}
    with pytest.raises(DatasetWriteError, match="unfinished write of different data"):
        write_dataset(out, renamed, DEPTH_ONLY, load=from_file, shard_size=1, progress=False)
    with pytest.raises(DatasetWriteError, match="unfinished write of different data"):
        write_dataset(out, items, DEPTH_ONLY, load=from_file, shard_size=2, progress=False)
    (sources / "6.txt").write_text("6")  # the user fixes the bad file and reruns the same command
    (out / "train-000000.tar").write_bytes(b"damaged after it was recorded")
    manifest = write_dataset(out, items, DEPTH_ONLY, load=from_file, shard_size=1, progress=False)
    assert manifest.splits["train"].num_samples == 7
    assert all(s.num_bytes == (out / s.name).stat().st_size for s in manifest.splits["train"].shards)
    _, samples = read_tar(out / "train-000000.tar", manifest)
    assert list(samples) == ["s_000"]


def die_in_worker(item):
    if item == "die":
        os._exit(3)  # as the kernel's OOM killer would
    return depth_sample(int(item))


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(tmp_path):
    items = {"train": [(f"s_{i:03d}", str(i)) for i in range(10)] + [("s_100", "die")]}  # past the size probe
    with pytest.raises(DatasetWriteError, match="worker process died.*rerun the same command to resume"):
        write_dataset(tmp_path, items, DEPTH_ONLY, load=die_in_worker, shard_size=1, workers=2, progress=False)


def test_more_classes_than_an_8_bit_label_holds_is_refused_up_front(tmp_path):
    info = DatasetInfo(name="big", tasks=["seg"], classes=[f"c{i}" for i in range(300)])
    sample = {"rgb": np.zeros((4, 4, 3), np.uint8), "seg": np.full((4, 4), 260, np.int64)}
    with pytest.raises(ValueError, match="300 classes; at most 255"):
        write_dataset(tmp_path / "out", {"train": [("a", sample)]}, info, progress=False)
    assert not (tmp_path / "out").exists()


def test_writer_processes_die_with_a_killed_parent(tmp_path):
    """kill -9 of `dsparse data convert` (or synth) left its workers and the resource
    tracker running for more than ten minutes."""
    import subprocess
    import sys

    import psutil

    command = [sys.executable, "-m", "dsparse", "--quiet", "data", "synth", "--out", str(tmp_path / "data"),
               "--num-train", "4000", "--num-val", "8", "--size", "64", "--shard-size", "20", "--procs", "2"]
    parent = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(psutil.Process(parent.pid).children(recursive=True)) < 3:
            time.sleep(0.2)  # two workers and the resource tracker
        children = psutil.Process(parent.pid).children(recursive=True)
        assert len(children) >= 3, "the writer never started its workers"
        time.sleep(1.0)  # the workers are encoding shards
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"still running 20 s after their parent was killed: {[p.cmdline()[:3] for p in alive]}"
    finally:
        for process in psutil.Process().children(recursive=True):
            process.kill()


def test_a_second_write_into_a_directory_being_written_is_refused(tmp_path):
    """Two `data convert` runs into one directory interleaved their files (and each removed
    the other's temporary shards); the second now stops at once, naming the first."""
    from dsparse.locks import acquire_lock, release_lock

    out = tmp_path / "out"
    out.mkdir()
    held = acquire_lock(out, "dataset directory", "wait")  # as a running write holds it
    try:
        with pytest.raises(ValueError, match=r"dataset directory .* is in use by pid \d+ on host"):
            write_synthetic_dataset(out, num_train=12, num_val=4, size=SIZE, seed=0, shard_size=6,
                                    num_procs=1, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"], "the refused write wrote something"
    finally:
        release_lock(held)
    write_synthetic_dataset(out, num_train=12, num_val=4, size=SIZE, seed=0, shard_size=6, num_procs=1,
                            progress=False)
    assert (out / "manifest.json").is_file()
