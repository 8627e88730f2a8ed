"""Read every sample of a dataset the way training will, and report what is wrong.

Errors in a shard otherwise surface hours into a run; ``dsparse data check DIR`` finds
them in one pass: unreadable shards, missing or malformed labels, class ids outside the
manifest's classes, and shards whose sample count differs from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dsparse.data.manifest import load_manifest
from dsparse.data.records import SampleError, decode_sample, read_shard
from dsparse.progress import ProgressMeter


@dataclass
class CheckReport:
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)
    codec: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(data_dir: str | Path, splits: list[str] | None = None, progress: bool = True) -> CheckReport:
    """Decode every sample of ``splits`` (default: all) and collect one line per problem."""
    manifest = load_manifest(data_dir)
    specs, codec = manifest.label_specs(), manifest.dataset_codec()
    report = CheckReport(codec=codec.describe())
    wanted = splits or list(manifest.splits)
    unknown = [s for s in wanted if s not in manifest.splits]
    if unknown:
        raise ValueError(f"{data_dir} has no split(s) {unknown}; it has {sorted(manifest.splits)}")
    shards = [(split, shard) for split in wanted for shard in manifest.splits[split].shards]
    meter = ProgressMeter(f"checking {data_dir}", len(shards), "shards", enabled=progress)
    for split, shard in shards:
        count = 0
        for raw in read_shard(str(Path(data_dir) / shard.name), skip_bad=True):
            try:
                decode_sample(raw, specs, codec, manifest.image_size, manifest.num_classes)
                count += 1
            except SampleError as error:
                report.problems.append(str(error))
        if count != shard.num_samples:
            report.problems.append(f"shard {shard.name} has {count} readable samples, manifest.json says "
                                   f"{shard.num_samples}")
        report.num_samples += count
        meter.add(1, f"{report.num_samples} samples, {len(report.problems)} problem(s)")
    return report
