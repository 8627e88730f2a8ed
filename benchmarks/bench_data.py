"""Data pipeline speed: the Taskonomy converter (1 and 2 processes), the training loader
in each dataset encoding, and what they imply for full Taskonomy.

1. Writes a fake Taskonomy source tree in the per-building layout: 512x512 frames of
   the six converted domains (rgb, depth_zbuffer, normal, keypoints2d, edge_texture,
   segment_semantic) with smooth content plus sensor-like noise, saved at PNG's default
   compression so the files cost about what real ones cost to decode.
2. Converts it to 256x256 shards with ``dsparse.data.convert`` using 1 and 2 processes
   (samples/s each, bytes per converted sample).
3. Writes the same 256x256 five-task set (fake views in the label conventions) in each
   encoding (PNG; zstd raw arrays; zstd labels with a JPEG image) and measures, rounds
   alternating between encodings:
   - one loader worker's work, in this process (read, unpack, check, crop 224, flip,
     batch 16), with the float decode in the worker (``data.decode_on: worker``, CPU
     training) and without it (``device``: a GPU converts the stored batch);
   - the training stream end to end with 1 and 2 worker processes.
4. Projects full Taskonomy (4.6M frames, 11.16 TB of source over all domains): the wall
   time to convert with N processes, the storage of the shards per encoding, and the
   loader workers one GPU needs at ResNet-34 training speed (model FLOPs counted here,
   GPU throughput an assumption stated in the table).

Usage::

    python benchmarks/bench_data.py [--frames 400] [--loader-samples 4000] [--rounds 3]

Writes ``benchmarks/results/data-pipeline-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from results_io import publish

TASKONOMY_FRAMES = 4_600_000
TASKONOMY_SOURCE_BYTES = 11.16e12
FRAME = 512


def fake_frame(rng: np.random.Generator, size: int = FRAME) -> dict[str, np.ndarray]:
    """One view in Taskonomy's source encodings: smooth fields with edges, sensor noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)), x * y], -1)
    regions = (np.floor(x * rng.integers(2, 6)) + np.floor(y * rng.integers(2, 6))).astype(np.int64)
    rgb = np.clip(127 + 60 * base + 25 * np.sin(regions)[..., None] + rng.normal(0, 3, base.shape), 0, 255)
    depth = (1024 * (1 + 3 * y + regions % 3)).astype(np.uint16)
    normal = np.clip(127 + 100 * np.stack([np.sin(regions), np.cos(regions), -np.ones_like(x)], -1), 0, 255)
    edges = (np.abs(np.diff(regions, axis=1, prepend=0)) > 0) * 20000
    return {"rgb": rgb.astype(np.uint8), "depth_zbuffer": depth, "normal": normal.astype(np.uint8),
            "keypoints2d": (rng.random((size, size)) < 0.01).astype(np.uint16) * 30000,
            "edge_texture": edges.astype(np.uint16), "segment_semantic": (1 + regions % 17).astype(np.uint8)}


def write_source(root: Path, frames: int, buildings: int) -> int:
    """The fake tree (omnidata layout); returns its size in bytes."""
    rng = np.random.default_rng(0)
    for index in range(frames):
        building = f"bldg{index % buildings}"
        for domain, array in fake_frame(rng).items():
            folder = root / domain / "taskonomy" / building
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / f"point_{index}_view_0_domain_{domain}.png")
    return sum(p.stat().st_size for p in root.rglob("*.png"))


def fake_sample(job: tuple[int, int]) -> dict[str, np.ndarray]:
    """A write_dataset worker: one fake view already in the label specs' conventions."""
    seed, size = job
    frame = fake_frame(np.random.default_rng(seed), size)
    depth = frame["depth_zbuffer"].astype(np.float32) / 512
    normal = frame["normal"].astype(np.float32) / 255 * 2 - 1
    return {"rgb": frame["rgb"], "seg": frame["segment_semantic"] - 1, "depth": depth,
            "normal": normal / np.linalg.norm(normal, axis=-1, keepdims=True),
            "keypoint": frame["keypoints2d"] / 65536, "edge": frame["edge_texture"] / 65536}


ENCODINGS = {"png": {"labels": "png"}, "zstd": {"labels": "zstd"},
             "zstd + jpeg rgb": {"labels": "zstd", "rgb": "jpeg", "jpeg_quality": 95}}


def write_loader_set(out: Path, samples: int, workers: int, encoding: dict) -> None:
    """A ``samples``-sample 256x256 five-task dataset for the loader measurement."""
    from dsparse.data.codecs import DatasetCodec
    from dsparse.data.convert.taskonomy import CLASSES
    from dsparse.data.writer import DatasetInfo, write_dataset

    info = DatasetInfo(name="bench", tasks=["seg", "normal", "depth", "keypoint", "edge"], classes=list(CLASSES),
                       encodings={"depth": {"scale": 512}})
    jobs = [(f"s{i:08d}", (i, 256)) for i in range(samples)]
    write_dataset(out, {"train": jobs}, info, load=fake_sample, workers=workers, shard_size="64MB",
                  codec=DatasetCodec(**encoding), progress=False)


def split_csv(path: Path, buildings: int) -> Path:
    rows = ["id,train,val,test"] + [f"bldg{b},1,0,0" for b in range(buildings)]
    path.write_text("\n".join(rows) + "\n")
    return path


def convert_rate(source: Path, out: Path, split_file: Path, workers: int) -> tuple[float, int, int]:
    from dsparse.data.convert import convert

    start = time.perf_counter()
    manifest = convert("taskonomy", source, out, splits=["train"], workers=workers, split_file=str(split_file),
                       size=256, progress=False)
    seconds = time.perf_counter() - start
    samples = manifest.splits["train"].num_samples
    return samples / seconds, samples, sum(s.num_bytes for s in manifest.splits["train"].shards)


def loader_spec(data: Path, workers: int, decode_on: str):
    from dsparse.config import DataConfig
    from dsparse.data.loader import stream_spec
    from dsparse.data.manifest import load_manifest

    manifest = load_manifest(data)
    config = DataConfig(path=str(data), crop_size=224, batch_size=16, num_workers=workers, resampled=True,
                        epoch_length=10**9, shuffle_buffer=256, decode_on=decode_on)
    device = "cpu" if decode_on == "device" else None
    return stream_spec(config, manifest, "train", manifest.tasks, seed=0, rank=0, world_size=1, train=True,
                       device=device)


def worker_rate(data: Path, decode_on: str, batches: int) -> float:
    """samples/s of one loader worker's work, run in this process (no trainer beside it)."""
    from dsparse.data.loader import make_loader

    stream, loader = make_loader(loader_spec(data, 0, decode_on))
    stream.set_position(0, 0)
    iterator = iter(loader)
    for _ in range(3):  # shuffle-buffer fill
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    assert batch["__stored__"] == (decode_on == "device")
    return batches * 16 / (time.perf_counter() - start)


def legacy_worker_rate(data: Path, batches: int) -> float:
    """The baseline: one worker's work as the loader did it before codecs (2026-12-01): PNG
    members decoded one sample at a time into float arrays with numpy, then cropped,
    flipped and stacked as floats. Same crops, flips and batch size as the others."""
    import torch
    from PIL import Image

    from dsparse.data.manifest import load_manifest
    from dsparse.data.records import read_shard

    manifest = load_manifest(data)
    specs = manifest.label_specs()
    scale = np.float32(specs["depth"].scale)
    mean = torch.tensor(manifest.rgb_mean).view(1, 3, 1, 1)
    std = torch.tensor(manifest.rgb_std).view(1, 3, 1, 1)

    def png(raw, entry):
        import io
        with Image.open(io.BytesIO(raw[f"{entry}.png"])) as image:
            return np.asarray(image)

    def decode(raw):
        normal = png(raw, "normal").astype(np.float32) / 127.5 - 1.0
        length = np.linalg.norm(normal, axis=-1, keepdims=True)
        heat = {t: png(raw, t).astype(np.float32) for t in ("keypoint", "edge")}
        return {"rgb": png(raw, "rgb"), "seg": png(raw, "seg"),
                "normal": np.where(length > 0.5, normal / np.maximum(length, 1e-6), 0.0).astype(np.float32),
                "depth": (png(raw, "depth").astype(np.float32) / scale).astype(np.float32),
                **{t: np.where(r == 0, -1.0, (r - 1) / 65534).astype(np.float32) for t, r in heat.items()}}

    rng = np.random.default_rng(0)
    shards = [str(data / shard.name) for shard in manifest.splits["train"].shards]

    def samples():
        while True:
            yield from read_shard(shards[rng.integers(len(shards))])

    def batch(raws):
        out = []
        for raw in raws:
            sample = decode(raw)
            top, left = rng.integers(256 - 224 + 1, size=2)
            sample = {k: v[top:top + 224, left:left + 224] for k, v in sample.items()}
            if rng.integers(2):
                sample = {k: v[:, ::-1] for k, v in sample.items()}
                sample["normal"] = sample["normal"] * np.array([-1.0, 1.0, 1.0], np.float32)
            out.append(sample)
        rgb = torch.from_numpy(np.stack([s["rgb"] for s in out])).permute(0, 3, 1, 2).contiguous().float() / 255.0
        result = {"rgb": (rgb - mean) / std, "seg": torch.from_numpy(np.stack([s["seg"] for s in out])).long(),
                  "normal": torch.from_numpy(np.stack([s["normal"] for s in out])).permute(0, 3, 1, 2).contiguous()}
        for t in ("depth", "keypoint", "edge"):
            result[t] = torch.from_numpy(np.stack([s[t] for s in out])).unsqueeze(1)
        return result

    stream = samples()
    for _ in range(3):
        batch([next(stream) for _ in range(16)])
    start = time.perf_counter()
    for _ in range(batches):
        batch([next(stream) for _ in range(16)])
    return batches * 16 / (time.perf_counter() - start)


def stream_rate(data: Path, workers: int, batches: int) -> float:
    """samples/s of the training stream (TrainBatches) with ``workers`` worker processes."""
    from dsparse.data.loader import TrainBatches

    stream = TrainBatches(loader_spec(data, workers, "worker"))
    for _ in range(3):  # worker start-up and shuffle-buffer fill
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * 16 / (time.perf_counter() - start)
    stream.close()
    return rate


def measure_loaders(sets: dict[str, Path], batches: int, rounds: int) -> dict[str, dict[str, float]]:
    """Best of ``rounds`` per encoding and setting; encodings alternate within each round."""
    settings = {"worker, float decode": lambda d: worker_rate(d, "worker", batches),
                "worker, stored batch (GPU decodes)": lambda d: worker_rate(d, "device", batches),
                "stream, 1 worker process": lambda d: stream_rate(d, 1, batches),
                "stream, 2 worker processes": lambda d: stream_rate(d, 2, batches)}
    best = {name: {} for name in sets}
    best["baseline"] = {}
    for round_index in range(rounds):
        rate = legacy_worker_rate(sets["png"], batches)
        best["baseline"]["worker, float decode"] = max(rate, best["baseline"].get("worker, float decode", 0.0))
        print(f"round {round_index + 1}/{rounds} baseline (PNG, per-sample float decode): {rate:.0f} samples/s",
              file=sys.stderr)
        for setting, measure in settings.items():
            for name, data in sets.items():
                rate = measure(data)
                best[name][setting] = max(rate, best[name].get(setting, 0.0))
                print(f"round {round_index + 1}/{rounds} {name:>16} {setting}: {rate:.0f} samples/s", file=sys.stderr)
    return best


def resnet34_train_gflops(tasks: list[str]) -> float:
    """fwd+bwd GFLOPs per 224x224 sample of the Taskonomy preset's model (counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dsparse.models import build_model

    channels = {"seg": 17, "normal": 3, "depth": 1, "keypoint": 1, "edge": 1}
    model = build_model("resnet34", {t: channels[t] for t in tasks}, base_width=64, output_stride=8,
                        head_dilations=(6, 12, 18, 24))
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = model(torch.randn(1, 3, 224, 224))
        sum(o.float().mean() for o in outputs.values()).backward()
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--buildings", type=int, default=8)
    parser.add_argument("--loader-samples", type=int, default=4000, help="size of each encoding's 256x256 set")
    parser.add_argument("--loader-batches", type=int, default=60, help="batches of 16 per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all encodings; the best is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--gpu-tflops", type=float, default=200.0,
                        help="assumed achieved bf16 TFLOP/s of one GPU for the projection (about 20%% of an H200 peak)")
    parser.add_argument("--skip-convert", action="store_true", help="measure the loader only")
    parser.add_argument("--keep", default=None, help="keep the source and shards in this directory")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.keep or tempfile.mkdtemp(prefix="dsparse-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    rates, samples, shard_bytes, source_bytes = {}, 0, 0, 0
    try:
        if not args.skip_convert:
            source = work / "source"
            start = time.perf_counter()
            source_bytes = write_source(source, args.frames, args.buildings)
            print(f"wrote {args.frames} fake frames ({source_bytes / 1e6:.0f} MB) in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
            splits = split_csv(work / "split.csv", args.buildings)
            for workers in (1, 2):
                rates[workers], samples, shard_bytes = convert_rate(source, work / f"out{workers}", splits, workers)
                print(f"convert, {workers} process(es): {rates[workers]:.1f} samples/s", file=sys.stderr)
        sets, sizes = {}, {}
        for name, encoding in ENCODINGS.items():
            sets[name] = work / f"loader-{name.replace(' ', '').replace('+', '-')}"
            if not (sets[name] / "manifest.json").exists():
                start = time.perf_counter()
                write_loader_set(sets[name], args.loader_samples, workers=2, encoding=encoding)
                print(f"wrote the {args.loader_samples}-sample {name} set in {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
            sizes[name] = sum(p.stat().st_size for p in sets[name].glob("*.tar")) / args.loader_samples
        loader = measure_loaders(sets, args.loader_batches, args.rounds)
        gflops = resnet34_train_gflops(["seg", "normal", "depth", "keypoint", "edge"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = render(args, source_bytes, rates, samples, shard_bytes, loader, sizes, gflops)
    publish("data-pipeline", report)
    print(json.dumps({"convert": rates, "loader": loader, "bytes_per_sample": sizes, "gflops": gflops}))


def render(args, source_bytes, rates, samples, shard_bytes, loader, sizes, gflops) -> str:
    gpu_rate = args.gpu_tflops * 1e3 / gflops
    png = loader["png"]
    baseline = loader.pop("baseline")["worker, float decode"]
    lines = [
        "# Data pipeline: Taskonomy converter and loader",
        "",
        f"Machine: {os.cpu_count()} cores; torch threads {args.threads}. Loader: {args.loader_samples} fake "
        "256x256 five-task samples per encoding (crop 224, flip, batch 16), best of "
        f"{args.rounds} rounds alternating encodings (`python benchmarks/bench_data.py`).",
        "",
        "## Loader, per encoding",
        "",
        f"Baseline, one worker's work as the loader did it before codecs (PNG, float decode per sample in "
        f"numpy, crops and flips of floats), in the same rounds: **{baseline:.0f} samples/s**.",
        "",
        "| encoding | bytes/sample | one worker, float decode | one worker, stored batch (GPU decodes) | "
        "stream, 1 worker process | stream, 2 worker processes |",
        "|---|---|---|---|---|---|",
    ]
    for name, rate in loader.items():
        cells = [f"{rate[s]:.0f} ({rate[s] / baseline:.2f}x)" for s in
                 ("worker, float decode", "worker, stored batch (GPU decodes)")]
        cells += [f"{rate[s]:.0f}" for s in ("stream, 1 worker process", "stream, 2 worker processes")]
        lines.append(f"| {name} | {sizes[name] / 1e3:.0f} kB ({sizes[name] / sizes['png']:.2f}x) | "
                     + " | ".join(cells) + " |")
    lines += ["", "samples/s (one worker: ratio to the baseline). \"One worker\" is the work of one loader "
              "process run alone in this process; \"stream\" is the training loader end to end (worker "
              "processes, IPC, float decode in the workers) with nothing training beside it.", ""]
    if rates:
        per_frame_source = source_bytes / args.frames
        real_per_frame = TASKONOMY_SOURCE_BYTES / TASKONOMY_FRAMES
        hours = {n: TASKONOMY_FRAMES / (rates[1] * n) / 3600 for n in (16, 64, 256)}
        lines += [
            "## Converter",
            "",
            f"{args.frames} fake 512x512 frames in {args.buildings} buildings (six domains, "
            f"{per_frame_source / 1e6:.2f} MB of PNG per frame), converted to 256x256 in the default encoding.",
            "",
            "| stage | processes | samples/s |",
            "|---|---|---|",
            f"| convert (read 6 PNGs, resize, check, encode, tar) | 1 | {rates[1]:.1f} |",
            f"| convert | 2 | {rates[2]:.1f} ({rates[2] / rates[1]:.2f}x) |",
            "",
            f"- Conversion of 4.6M frames, assuming one process converts {rates[1]:.1f} frames/s as here and "
            f"processes scale linearly (2 measured {rates[2] / rates[1]:.2f}x on 2 cores): "
            + ", ".join(f"{h:.1f} h with N = {n}" for n, h in hours.items()) + ".",
            f"  Real frames carry {real_per_frame / 1e6:.2f} MB of source over all domains; the six converted "
            f"domains here are {per_frame_source / 1e6:.2f} MB: at 1 GB/s they take "
            f"{per_frame_source * TASKONOMY_FRAMES / 1e9 / 3600:.1f} h to read.",
            "",
        ]
    lines += [
        "## Projection to full Taskonomy (4.6M frames)",
        "",
        f"The Taskonomy preset's model (ResNet-34, 5 heads) costs {gflops:.0f} GFLOP per 224x224 sample forward "
        f"and backward (torch's FlopCounterMode). At an assumed {args.gpu_tflops:.0f} TFLOP/s achieved in bf16 on "
        f"one H200 (not measured), one GPU trains {gpu_rate:.0f} samples/s.",
        "",
        "| encoding | storage for 4.6M samples | loader workers per GPU (stored batches, GPU decodes) | "
        "per 8-GPU node |",
        "|---|---|---|---|",
    ]
    lines.append(f"| baseline (PNG, before codecs) | {sizes['png'] * TASKONOMY_FRAMES / 1e12:.2f} TB | "
                 f"{gpu_rate / baseline:.1f} | {8 * gpu_rate / baseline:.0f} cores |")
    for name, rate in loader.items():
        workers = gpu_rate / rate["worker, stored batch (GPU decodes)"]
        lines.append(f"| {name} | {sizes[name] * TASKONOMY_FRAMES / 1e12:.2f} TB | {workers:.1f} | "
                     f"{8 * workers:.0f} cores |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
