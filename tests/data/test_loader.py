"""The streaming loader: disjoint splits, determinism, exact resume, clear errors."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from dsparse.config import DataConfig
from dsparse.data.loader import (ShardStream, StreamSpec, TrainBatches, augment, check_enough_shards,
                                 eval_batches, make_loader, stream_spec)
from dsparse.data.records import SampleError
from dsparse.data.manifest import load_manifest
from dsparse.tasks.labels import HeatLabel, NormalLabel

TASKS = ["seg", "normal", "depth", "keypoint", "edge"]


def spec_for(dataset, split="train", train=True, **overrides) -> StreamSpec:
    manifest = load_manifest(dataset)
    data = DataConfig(path=str(dataset), batch_size=overrides.pop("batch_size", 2), num_workers=overrides.pop("num_workers", 0),
                      **{k: overrides.pop(k) for k in list(overrides) if k in DataConfig.__dataclass_fields__})
    spec = stream_spec(data, manifest, split, TASKS, seed=0, rank=overrides.pop("rank", 0),
                       world_size=overrides.pop("world_size", 1), train=train)
    assert not overrides, overrides
    return spec


def epoch_keys(spec: StreamSpec, epoch: int = 0) -> list[str]:
    stream, loader = make_loader(spec)
    stream.set_position(epoch, 0)
    return [key for batch in loader for key in batch["__key__"]]


def all_keys(dataset, split):
    manifest = load_manifest(dataset)
    return {f"{split}_{i:08d}" for i in range(manifest.splits[split].num_samples)}


@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_two_workers_see_disjoint_samples_covering_the_split(tiny_dataset, train):
    seen = []
    for rank in range(2):
        spec = spec_for(tiny_dataset, "train", train=train, rank=rank, world_size=2, num_workers=2,
                        batch_size=3, shuffle_buffer=0)
        seen.append(epoch_keys(spec))
    flat = seen[0] + seen[1]
    assert len(flat) == len(set(flat)), "a sample was read twice in one epoch"
    # 8 equal shards over 4 readers: nothing is dropped, the union is the whole split
    assert set(flat) == all_keys(tiny_dataset, "train")
    assert len(seen[0]) == len(seen[1]), "ranks must get the same number of batches"


def test_same_seed_same_stream_and_epochs_differ(tiny_dataset):
    spec = spec_for(tiny_dataset, num_workers=2, batch_size=4)
    assert epoch_keys(spec, 0) == epoch_keys(spec, 0)
    assert epoch_keys(spec, 0) != epoch_keys(spec, 1)
    assert sorted(epoch_keys(spec, 0)) == sorted(epoch_keys(spec, 1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_exact_next_batch(tiny_dataset, num_workers):
    spec = spec_for(tiny_dataset, num_workers=num_workers, batch_size=4, crop_size=24)
    reference = TrainBatches(spec)
    expected = [next(reference) for _ in range(30)]  # crosses epoch boundaries (12 batches/epoch)
    first = TrainBatches(spec)
    for _ in range(17):
        next(first)
    resumed = TrainBatches(spec, first.position())
    for batch, want in zip([next(resumed) for _ in range(13)], expected[17:]):
        assert batch["__key__"] == want["__key__"]
        for name in ["rgb", *TASKS]:
            assert torch.equal(batch[name], want[name]), name


def test_batch_layout_and_dtypes(tiny_dataset):
    batch = next(TrainBatches(spec_for(tiny_dataset, batch_size=4, crop_size=24)))
    assert batch["rgb"].shape == (4, 3, 24, 24) and batch["rgb"].dtype == torch.float32
    assert batch["seg"].shape == (4, 24, 24) and batch["seg"].dtype == torch.int64
    assert batch["normal"].shape == (4, 3, 24, 24)
    for name in ("depth", "keypoint", "edge"):
        assert batch[name].shape == (4, 1, 24, 24)


def test_flip_negates_the_x_component_of_normals():
    spec = NormalLabel()
    sample = {"__key__": "k", "rgb": np.arange(12, dtype=np.uint8).reshape(2, 2, 3),
              "normal": spec.to_stored(np.tile(np.array([0.6, 0.0, -0.8], np.float32), (2, 2, 1)))}

    class AlwaysFlip:
        def integers(self, high):
            return high - 1

    flipped = augment(sample, {"normal": spec}, None, True, AlwaysFlip())
    np.testing.assert_array_equal(flipped["rgb"], sample["rgb"][:, ::-1])
    np.testing.assert_array_equal(flipped["normal"], spec.to_stored(np.tile(np.array([-0.6, 0.0, -0.8], np.float32),
                                                                            (2, 2, 1))))
    decoded = spec.decode_stored(flipped["normal"])
    np.testing.assert_allclose(decoded[..., 0], -0.6, atol=0.01)
    np.testing.assert_allclose(decoded[..., 2], -0.8, atol=0.01)


def test_fewer_shards_than_readers_is_a_clear_error(tiny_dataset):
    spec = spec_for(tiny_dataset, "val", train=True, world_size=2, num_workers=2)  # 3 shards, 4 readers
    with pytest.raises(ValueError, match="3 shard\\(s\\) but 2 rank\\(s\\) x 2 worker\\(s\\) = 4 readers"):
        check_enough_shards(spec)


def test_resampled_mode_feeds_more_readers_than_shards(tiny_dataset):
    spec = spec_for(tiny_dataset, "val", train=True, world_size=2, num_workers=2, resampled=True,
                    epoch_length=32, batch_size=2)
    stream, loader = make_loader(spec)
    stream.set_position(0, 0)
    assert len(list(loader)) == 32 // (4 * 2) * 2  # batches per reader x workers of this rank


def _copy_dataset(source, target):
    shutil.copytree(source, target)
    return target


def _rewrite_first_val_shard(dataset, mutate):
    manifest = json.loads((dataset / "manifest.json").read_text())
    name = manifest["splits"]["val"]["shards"][0]["name"]
    members = []
    with tarfile.open(dataset / name) as tar:
        for member in tar.getmembers():
            members.append((member.name, tar.extractfile(member).read()))
    members = mutate(members)
    with tarfile.open(dataset / name, "w") as tar:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return name


def _eval_all(dataset, skip_bad=False):
    spec = spec_for(dataset, "val", train=False, skip_bad=skip_bad)
    return [batch for batch in eval_batches(spec)]


def test_truncated_shard_names_shard_and_last_key(tiny_dataset, tmp_path):
    dataset = _copy_dataset(tiny_dataset, tmp_path / "d")
    name = load_manifest(dataset).splits["val"].shards[0].name
    data = (dataset / name).read_bytes()
    (dataset / name).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(SampleError, match=f"{name}.*unreadable"):
        _eval_all(dataset)
    batches = _eval_all(dataset, skip_bad=True)
    assert sum(b["__num_bad__"] for b in batches) >= 1
    assert sum(len(b["__key__"]) for b in batches) < 16


@pytest.fixture(params=["zstd", "png"])
def coded_dataset(request, tmp_path):
    """A copy of the tiny dataset in each lossless codec, and the extension of its members."""
    source = request.getfixturevalue("tiny_dataset" if request.param == "zstd" else "tiny_png_dataset")
    dataset = _copy_dataset(source, tmp_path / "d")
    return dataset, load_manifest(dataset).dataset_codec().codec("depth")


def test_missing_label_names_the_sample_key(coded_dataset):
    dataset, codec = coded_dataset
    member = f"val_00000001.depth.{codec.extension}"
    name = _rewrite_first_val_shard(dataset, lambda m: [x for x in m if x[0] != member])
    with pytest.raises(SampleError, match=f"'val_00000001' in shard {name} has no '{member.split('.', 1)[1]}'"):
        _eval_all(dataset)
    batches = _eval_all(dataset, skip_bad=True)
    assert sum(b["__num_bad__"] for b in batches) == 1
    assert sum(len(b["__key__"]) for b in batches) == 15


def test_label_of_wrong_shape_names_the_sample_key(coded_dataset):
    dataset, codec = coded_dataset
    wrong = codec.pack(HeatLabel().to_stored(np.zeros((16, 16), np.float32)))

    def mutate(members):
        return [(n, wrong if n == f"val_00000002.edge.{codec.extension}" else d) for n, d in members]

    _rewrite_first_val_shard(dataset, mutate)
    reason = ("label 'edge' is 16x16, the image is 32x32" if codec.name == "png" else
              "label 'edge': the zstd frame holds 512 bytes, a uint16 array of shape \\[32, 32\\] is 2048")
    with pytest.raises(SampleError, match=f"'val_00000002'.*{reason}"):
        _eval_all(dataset)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong type"])
def test_a_damaged_zstd_member_names_the_sample_key(tiny_dataset, tmp_path, damage):
    from dsparse.data.codecs import ZstdCodec

    dataset = _copy_dataset(tiny_dataset, tmp_path / "d")
    member = "val_00000002.depth.zst"

    def mutate(members):
        def damaged(data):
            if damage == "truncated":
                return data[: len(data) // 2]
            if damage == "garbage":
                return b"\x00" * len(data)
            return ZstdCodec().pack(np.zeros((32, 32), np.uint8))  # an 8-bit array where 16 bits belong
        return [(n, damaged(d) if n == member else d) for n, d in members]

    _rewrite_first_val_shard(dataset, mutate)
    with pytest.raises(SampleError, match="'val_00000002'.*label 'depth': .*(zstd|1024 bytes)"):
        _eval_all(dataset)


def test_stream_spec_rejects_a_task_the_dataset_lacks(tiny_dataset):
    manifest = load_manifest(tiny_dataset)
    with pytest.raises(ValueError, match="no labels for task"):
        stream_spec(DataConfig(path=str(tiny_dataset)), manifest, "train", ["seg", "albedo"], seed=0, rank=0,
                    world_size=1, train=True)


def test_shard_stream_is_an_iterable_dataset():
    assert issubclass(ShardStream, torch.utils.data.IterableDataset)


@pytest.mark.parametrize("resampled", [False, True])
def test_skip_bad_on_only_unreadable_shards_errors_instead_of_spinning(tiny_dataset, tmp_path, resampled):
    dataset = _copy_dataset(tiny_dataset, tmp_path / "d")
    for shard in load_manifest(dataset).splits["val"].shards:
        (dataset / shard.name).write_bytes(b"this is not a tar file" * 100)
    extra = {"resampled": True, "epoch_length": 8} if resampled else {}
    spec = spec_for(dataset, "val", train=True, skip_bad=True, **extra)
    with pytest.raises(SampleError, match="readable"):
        next(TrainBatches(spec))


def test_a_class_id_past_the_manifest_classes_names_the_sample_before_the_loss(coded_dataset):
    dataset, codec = coded_dataset
    num_classes = load_manifest(dataset).num_classes
    wrong = codec.pack(np.full((32, 32), num_classes, np.uint8))

    def mutate(members):
        return [(n, wrong if n == f"val_00000003.seg.{codec.extension}" else d) for n, d in members]

    name = _rewrite_first_val_shard(dataset, mutate)
    with pytest.raises(SampleError, match=f"'val_00000003' in shard {name}: label 'seg': class label: "
                                          f".*{num_classes} outside "
                                          f"the {num_classes} classes.*dsparse data convert"):
        _eval_all(dataset)


def test_class_weights_without_frequencies_is_a_clear_error(tiny_dataset, tmp_path):
    from dsparse.config import load_config
    from dsparse.runs.components import build_run_tasks

    dataset = _copy_dataset(tiny_dataset, tmp_path / "d")
    raw = json.loads((dataset / "manifest.json").read_text())
    raw["class_pixel_frequency"] = None
    (dataset / "manifest.json").write_text(json.dumps(raw))
    config = load_config("synthetic_tiny", [f"data.path={dataset}", "data.class_weights=true"])
    with pytest.raises(ValueError, match="class_weights: true needs class pixel frequencies.*class_weights: false"):
        build_run_tasks(config, load_manifest(dataset))


def test_shards_stream_through_a_pipe_command(tiny_dataset):
    plain = spec_for(tiny_dataset, "val", train=False)
    piped = spec_for(tiny_dataset, "val", train=False, shard_url=f"pipe:cat {tiny_dataset}/{{name}}")
    assert piped.url(piped.shards[0]).startswith("pipe:cat ")
    first, second = list(eval_batches(plain)), list(eval_batches(piped))
    assert [b["__key__"] for b in first] == [b["__key__"] for b in second]
    assert all(torch.equal(a["depth"], b["depth"]) for a, b in zip(first, second))


def test_a_failing_pipe_command_names_the_shard(tiny_dataset):
    spec = spec_for(tiny_dataset, "val", train=False, shard_url="pipe:cat /nonexistent/{name}")
    with pytest.raises(SampleError, match="pipe:cat /nonexistent/val-000000.tar is unreadable"):
        list(eval_batches(spec))


def test_a_shard_url_without_name_is_refused():
    with pytest.raises(ValueError, match="must contain \\{name\\}"):
        DataConfig(shard_url="pipe:cat /data/shard.tar")


def test_random_rescale_keeps_label_values_and_pads_crops_with_invalid_labels(tiny_dataset):
    from dsparse.tasks.labels import ClassLabel, DepthLabel

    labels = {"seg": ClassLabel(), "depth": DepthLabel(), "normal": NormalLabel(), "edge": HeatLabel()}
    rng = np.random.default_rng(0)
    values = {"seg": rng.integers(0, 5, (20, 20)).astype(np.uint8),
              "depth": rng.uniform(1, 3, (20, 20)).astype(np.float32),
              "normal": np.tile(np.array([0.6, 0.0, -0.8], np.float32), (20, 20, 1)),
              "edge": rng.uniform(0, 1, (20, 20)).astype(np.float32)}
    sample = {"__key__": "k", "rgb": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
              **{name: labels[name].to_stored(value, 5) for name, value in values.items()}}
    seen_padding = False
    for seed in range(20):
        out = augment(sample, labels, 24, False, np.random.default_rng(seed), (0.5, 1.5), (1, 2, 3))
        assert all(out[name].shape[:2] == (24, 24) for name in labels) and out["rgb"].shape == (24, 24, 3)
        decoded = {name: labels[name].decode_stored(out[name]) for name in labels}
        padded = decoded["seg"] == 255
        seen_padding |= padded.any()
        assert (decoded["depth"][padded] == 0).all() and (decoded["edge"][padded] == -1).all()
        assert (decoded["normal"][padded] == 0).all() and (out["rgb"][padded] == [1, 2, 3]).all()
        assert set(np.unique(out["seg"][~padded])) <= set(np.unique(sample["seg"]))
        assert set(np.unique(out["depth"][~padded])) <= set(np.unique(sample["depth"]))
    assert seen_padding
    spec = spec_for(tiny_dataset, batch_size=4, crop_size=24, scale_range=[0.5, 1.5])
    batch = next(TrainBatches(spec))
    assert batch["rgb"].shape == (4, 3, 24, 24) and batch["seg"].shape == (4, 24, 24)


def test_scale_range_needs_a_crop():
    with pytest.raises(ValueError, match="scale_range needs data.crop_size"):
        DataConfig(scale_range=[0.5, 1.5])
    with pytest.raises(ValueError, match="0 < low <= high"):
        DataConfig(scale_range=[1.5, 0.5], crop_size=8)


def test_shuffle_buffer_memory_follows_the_encoded_sample_size(tiny_dataset):
    from dsparse.data.loader import shuffle_buffer_bytes

    manifest = load_manifest(tiny_dataset)
    shards = manifest.splits["train"].shards
    per_sample = sum(s.num_bytes for s in shards) / sum(s.num_samples for s in shards)
    spec = spec_for(tiny_dataset, shuffle_buffer=100)
    assert shuffle_buffer_bytes(spec) == int(100 * per_sample)
    assert shuffle_buffer_bytes(spec_for(tiny_dataset, shuffle_buffer=0)) == 0


def test_a_truncated_shard_counts_every_sample_it_lost(tiny_dataset, tmp_path):
    dataset = _copy_dataset(tiny_dataset, tmp_path / "d")
    shard = load_manifest(dataset).splits["val"].shards[0]
    data = (dataset / shard.name).read_bytes()
    (dataset / shard.name).write_bytes(data[: len(data) // 2 + 100])
    batches = _eval_all(dataset, skip_bad=True)
    read = sum(len(b["__key__"]) for b in batches)
    assert sum(b["__num_bad__"] for b in batches) == 16 - read  # exactly what the shard lost


def test_a_manifest_that_overstates_or_understates_a_shard_is_an_error_naming_it(tiny_dataset, tmp_path):
    for change, match in ((+2, "ended after 6 samples, manifest.json says 8"), (-2, "holds more samples than "
                                                                                    "manifest.json says \\(4\\)")):
        dataset = _copy_dataset(tiny_dataset, tmp_path / f"d{change}")
        raw = json.loads((dataset / "manifest.json").read_text())
        shard = raw["splits"]["val"]["shards"][0]
        shard["num_samples"] += change
        (dataset / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(SampleError, match=f"shard .*{shard['name']} {match}"):
            _eval_all(dataset)
    batches = _eval_all(tmp_path / "d2", skip_bad=True)  # short: skip_bad counts the missing samples
    assert sum(b["__num_bad__"] for b in batches) == 2


def test_a_data_error_in_a_loader_worker_is_one_line(tiny_dataset, tmp_path):
    dataset = _copy_dataset(tiny_dataset, tmp_path / "d")
    name = _rewrite_first_val_shard(dataset, lambda m: [x for x in m if x[0] != "val_00000001.depth.zst"])
    spec = spec_for(dataset, "val", train=False, num_workers=1)
    with pytest.raises(SampleError) as caught:
        list(eval_batches(spec))
    message = str(caught.value)
    assert "\n" not in message and f"'val_00000001' in shard {name} has no 'depth.zst'" in message
    assert "Traceback" in caught.value.worker_traceback


def test_batches_are_contiguous_nchw(tiny_dataset):
    """The image came out as a channels-last view (NHWC permuted): oneDNN's conv weight
    gradient then corrupts the heap on some shapes (a 1x1 stride-2 shortcut with 4 input
    channels: `corrupted double-linked list` in every width-4 sweep trial)."""
    batch = next(TrainBatches(spec_for(tiny_dataset, batch_size=4)))
    assert batch["rgb"].is_contiguous()


def test_a_width_4_model_trains_on_loader_batches(tiny_dataset, tmp_path):
    """The crash above, end to end: one training step of the width-4 model the sweep tests
    use, in a child process so that heap corruption fails this test and not the suite."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "dsparse", "--quiet", "train", "synthetic_tiny",
               *[arg for setting in (f"data.path={tiny_dataset}", "data.batch_size=4", "data.num_workers=0",
                                     "model.base_width=4", "model.head_dilations=[1, 2]", "train.iterations=2",
                                     "train.eval_interval=2", "train.checkpoint_interval=2",
                                     f"output_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
                 for arg in ("--set", setting)]]
    import os

    env = {key: value for key, value in os.environ.items()  # this process's group (in-process tests) is not the child's
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
