"""Dataset codecs: exact round trips of every task's stored labels in every codec, the
same batches from every encoding, old (PNG, codec-less) datasets, and clear refusals."""

import json
import shutil

import numpy as np
import pytest
import torch

from dsparse.cli import main
from dsparse.config import DataConfig
from dsparse.data.check import check_dataset
from dsparse.data.codecs import LABEL_CODECS, CodecError, DatasetCodec, JpegCodec, PngCodec, ZstdCodec
from dsparse.data.loader import TrainBatches, eval_batches, stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.data.synth.dataset import write_synthetic_dataset
from dsparse.tasks import TASKS
from dsparse.tasks.labels import RGB, LabelError

TASK_NAMES = ["seg", "normal", "depth", "keypoint", "edge"]


def label_values(rng, size=(24, 20)):
    """Values of every label kind, with invalid pixels and the extremes of each encoding."""
    normal = rng.normal(size=(*size, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[0] = 0
    depth = rng.uniform(0, 65.535, size)
    depth[1] = 0
    depth[2, :2] = (65.535, 0.001)
    heat = rng.uniform(0, 1, size)
    heat[3] = -1
    heat[4, :2] = (0, 1)
    seg = rng.integers(0, 13, size)
    seg[5] = 255
    return {"rgb": rng.integers(0, 256, (*size, 3)).astype(np.uint8), "seg": seg, "normal": normal,
            "depth": depth, "keypoint": heat, "edge": heat[::-1].copy()}


@pytest.mark.parametrize("codec", [PngCodec(), ZstdCodec()], ids=["png", "zstd"])
@pytest.mark.parametrize("entry", ["rgb", *TASK_NAMES])
def test_every_label_round_trips_exactly_in_every_lossless_codec(codec, entry):
    spec = RGB if entry == "rgb" else TASKS[entry].label
    stored = spec.to_stored(label_values(np.random.default_rng(0))[entry], 13)
    assert stored.dtype == np.dtype(spec.stored_dtype)
    back = codec.unpack(codec.pack(stored), spec.stored_dtype, stored.shape)
    assert back.dtype == stored.dtype and back.shape == stored.shape
    assert back.tobytes() == stored.tobytes()
    assert sorted(LABEL_CODECS) == ["png", "zstd"]


def test_the_batch_decode_matches_the_per_pixel_rules():
    """The vectorised batch decode gives the values the label table defines."""
    values = label_values(np.random.default_rng(1))
    for task in TASK_NAMES:
        spec = TASKS[task].label
        stored = spec.to_stored(values[task], 13)
        batch = spec.from_stored(torch.from_numpy(np.stack([stored, stored])))
        one = spec.decode_stored(stored)
        if task == "seg":
            np.testing.assert_array_equal(one, values[task])
        elif task == "depth":
            np.testing.assert_array_equal(one, stored.astype(np.float32) / np.float32(1000))
            assert np.abs(one - values[task]).max() <= 0.5 / 1000 + 1e-6
        elif task == "normal":
            valid = np.linalg.norm(values[task], axis=-1) > 0
            assert (one[~valid] == 0).all() and np.abs(one[valid] - values[task][valid]).max() < 0.01
            np.testing.assert_allclose(np.linalg.norm(one[valid], axis=-1), 1, atol=1e-6)
        else:
            invalid = values[task] < 0
            assert (one[invalid] == -1).all() and np.abs(one[~invalid] - values[task][~invalid]).max() <= 1e-5
        expected = torch.from_numpy(one)
        expected = expected.permute(2, 0, 1) if one.ndim == 3 else expected if task == "seg" else expected[None]
        assert torch.equal(batch[0], batch[1]) and torch.equal(batch[0], expected.to(batch.dtype))


def test_jpeg_is_for_the_image_only_and_close():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    smooth = np.clip(np.add.outer(np.arange(32) * 4, np.arange(32) * 3)[..., None] + [0, 20, 40], 0, 255)
    smooth = smooth.astype(np.uint8)
    back = JpegCodec(95).unpack(JpegCodec(95).pack(smooth), "uint8", smooth.shape)
    assert np.abs(back.astype(int) - smooth).max() <= 8
    assert JpegCodec().unpack(JpegCodec().pack(rgb), "uint8", rgb.shape).shape == rgb.shape
    with pytest.raises(ValueError, match="label encoding 'jpeg' is not one of \\['png', 'zstd'\\]"):
        DatasetCodec(labels="jpeg")
    with pytest.raises(ValueError, match="jpeg_quality must be an integer in 1-100"):
        DatasetCodec(labels="zstd", rgb="jpeg", jpeg_quality=0)


def test_zstd_refuses_bytes_of_another_array_before_decompressing():
    stored = np.zeros((8, 8), np.uint16)
    data = ZstdCodec().pack(stored)
    with pytest.raises(CodecError, match="holds 128 bytes, a uint16 array of shape \\[8, 9\\] is 144"):
        ZstdCodec().unpack(data, "uint16", (8, 9))
    with pytest.raises(CodecError, match="not a zstd frame"):
        ZstdCodec().unpack(b"PNG but not really", "uint16", (8, 8))
    with pytest.raises(CodecError, match="corrupt zstd frame"):
        ZstdCodec().unpack(data[:-3], "uint16", (8, 8))


def test_the_damage_checks_do_not_depend_on_the_codec(tmp_path):
    """Encoding refuses what it would damage before any codec sees the array."""
    from dsparse.data.writer import DatasetInfo, DatasetWriteError, write_dataset

    info = DatasetInfo(name="toy", tasks=["depth"])
    far = {"rgb": np.zeros((4, 4, 3), np.uint8), "depth": np.full((4, 4), 70.0, np.float32)}
    for labels in LABEL_CODECS:
        with pytest.raises(DatasetWriteError, match="depth above 65.535 .*use a smaller depth scale"):
            write_dataset(tmp_path / labels, {"train": [("a", far)]}, info, progress=False,
                          codec=DatasetCodec(labels=labels))
        assert not (tmp_path / labels / "manifest.json").exists()
    with pytest.raises(LabelError, match="normals must be unit vectors"):
        TASKS["normal"].label.to_stored(np.full((2, 2, 3), 0.9))


@pytest.fixture(scope="module")
def three_encodings(tmp_path_factory):
    """The same 24 + 8 synthetic scenes in PNG, zstd, and zstd with JPEG images."""
    root = tmp_path_factory.mktemp("encodings")
    codecs = {"png": DatasetCodec(labels="png"), "zstd": DatasetCodec(labels="zstd"),
              "jpeg": DatasetCodec(labels="zstd", rgb="jpeg", jpeg_quality=90)}
    for name, codec in codecs.items():
        write_synthetic_dataset(root / name, num_train=24, num_val=8, size=32, seed=3, shard_size=4, num_procs=1,
                                progress=False, codec=codec)
    return root


def _train_batches(dataset, count, **settings):
    manifest = load_manifest(dataset)
    data = DataConfig(path=str(dataset), batch_size=4, crop_size=24, **{"num_workers": 2, **settings})
    device = "cpu" if settings.get("decode_on") == "device" else None
    spec = stream_spec(data, manifest, "train", TASK_NAMES, seed=5, rank=0, world_size=1, train=True, device=device)
    stream = TrainBatches(spec)
    return [next(stream) for _ in range(count)]


def test_every_lossless_encoding_gives_the_same_batches(three_encodings):
    """A run on a zstd dataset trains on exactly the batches of the PNG one (with workers,
    crops and flips), whether the worker or the trainer decodes; JPEG changes only the image."""
    png = _train_batches(three_encodings / "png", 8)
    runs = {"zstd": _train_batches(three_encodings / "zstd", 8),
            "zstd, decoded by the trainer": _train_batches(three_encodings / "zstd", 8, decode_on="device"),
            "jpeg": _train_batches(three_encodings / "jpeg", 8)}
    for name, batches in runs.items():
        for ours, theirs in zip(png, batches):
            assert ours["__key__"] == theirs["__key__"], name
            for entry in ("rgb", *TASK_NAMES):
                if name == "jpeg" and entry == "rgb":
                    assert not torch.equal(ours[entry], theirs[entry])
                    assert (ours[entry] - theirs[entry]).abs().mean() < 0.2  # normalised units
                    continue
                assert ours[entry].dtype == theirs[entry].dtype and torch.equal(ours[entry], theirs[entry]), \
                    (name, entry)
    assert not runs["zstd, decoded by the trainer"][0]["__stored__"]


def test_evaluation_batches_are_equal_too(three_encodings):
    def batches(name):
        manifest = load_manifest(three_encodings / name)
        spec = stream_spec(DataConfig(path=str(three_encodings / name), eval_batch_size=3, num_workers=0), manifest,
                           "val", TASK_NAMES, seed=0, rank=0, world_size=1, train=False)
        return list(eval_batches(spec))

    for ours, theirs in zip(batches("png"), batches("zstd"), strict=True):
        assert all(torch.equal(ours[entry], theirs[entry]) for entry in ("rgb", *TASK_NAMES))


def test_the_manifest_records_the_codec_and_old_datasets_read_as_png(three_encodings, tmp_path):
    assert load_manifest(three_encodings / "zstd").codec == {"labels": "zstd", "rgb": "zstd", "jpeg_quality": 95}
    jpeg = load_manifest(three_encodings / "jpeg")
    assert jpeg.dataset_codec().describe() == "labels zstd, rgb jpeg (quality 90)"
    assert "lossy_rgb" in jpeg.identity() and "lossy_rgb" not in load_manifest(three_encodings / "zstd").identity()
    old = tmp_path / "old"
    shutil.copytree(three_encodings / "png", old)
    raw = json.loads((old / "manifest.json").read_text())
    del raw["codec"]  # as written before codecs existed
    (old / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(old).dataset_codec() == DatasetCodec(labels="png", rgb="png")
    assert load_manifest(old).identity() == load_manifest(three_encodings / "zstd").identity()
    for dataset in (old, three_encodings / "zstd", three_encodings / "jpeg"):
        report = check_dataset(dataset, progress=False)
        assert report.ok and report.num_samples == 32
    raw["codec"] = {"labels": "lz5"}
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="codec: label encoding 'lz5' is not one of"):
        load_manifest(old)


def test_zstd_shards_of_the_synthetic_set_stay_within_one_and_a_half_of_png(three_encodings):
    sizes = {name: sum(s.num_bytes for s in load_manifest(three_encodings / name).splits["train"].shards)
             for name in ("png", "zstd")}
    assert sizes["zstd"] <= 1.5 * sizes["png"]


def test_the_cli_writes_each_encoding_and_refuses_a_quality_without_jpeg(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "synth", "--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "16",
                 "--procs", "1", "--encoding", "png", "--rgb-encoding", "jpeg", "--jpeg-quality", "80",
                 "--quiet"]) in (0, None)
    assert load_manifest(out).codec == {"labels": "png", "rgb": "jpeg", "jpeg_quality": 80}
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--jpeg-quality", "80"]) == 2
    assert "--jpeg-quality sets the quality of JPEG images; add --rgb-encoding jpeg" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)")
def test_a_stored_batch_decodes_on_the_gpu_to_the_cpu_values(three_encodings):
    """data.decode_on: device on a GPU: uint16 labels travel as int16 bits and widen there."""
    cpu = _train_batches(three_encodings / "zstd", 2, num_workers=0)
    manifest = load_manifest(three_encodings / "zstd")
    data = DataConfig(path=str(three_encodings / "zstd"), batch_size=4, crop_size=24, num_workers=0)
    spec = stream_spec(data, manifest, "train", TASK_NAMES, seed=5, rank=0, world_size=1, train=True, device="cuda")
    assert spec.decode_device == "cuda"  # auto: the GPU decodes
    stream = TrainBatches(spec)
    for ours in cpu:
        theirs = next(stream)
        for entry in ("rgb", *TASK_NAMES):
            assert theirs[entry].is_cuda
            torch.testing.assert_close(theirs[entry].cpu(), ours[entry], rtol=1e-6, atol=1e-6)


def test_a_bad_decode_on_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="data.decode_on must be auto, worker or device, got 'gpu'"):
        DataConfig(decode_on="gpu")
