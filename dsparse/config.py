"""Run configuration: typed dataclasses, loaded from YAML, validated on construction.

One run = one YAML file. Every section maps to a dataclass below; an unknown key, a wrong
type or an out-of-range value raises ``ValueError`` naming the key and what is accepted,
so a typo never silently falls back to a default. ``--set key.sub=value`` overrides are
parsed as YAML scalars and applied before validation. A field with fixed choices has a
``Literal`` type, the one place its choices are written (``_check_choices`` enforces it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dsparse.kernels import Kernel


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    path: str = "data/synthetic"
    """Dataset directory holding ``manifest.json`` (and the tar shards unless ``shard_url``)."""
    shard_url: str | None = None
    """Where shards are read from when not beside the manifest: a template with ``{name}``,
    a path or a ``pipe:`` command WebDataset runs, e.g.
    ``pipe:aws s3 cp s3://bucket/taskonomy/{name} -``."""
    crop_size: int | None = None
    """Random crop side for training (None = full image); eval always uses full images."""
    scale_range: list[float] | None = None
    """Random rescale factor range for training, e.g. ``[0.5, 1.5]`` (the NYU-v2 recipe):
    image bilinear, labels nearest; needs ``crop_size`` (smaller images are padded with
    invalid labels). None = no rescaling."""
    flip: bool = True
    """Random horizontal flip for training (flips the x component of normals)."""
    batch_size: int = 16
    """Micro-batch size per rank."""
    eval_batch_size: int = 32
    """Batch size per rank for validation and ``dsparse eval``."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 256
    """Sample shuffle buffer per reader (ranks x workers), in samples; 0 disables sample
    shuffling (shards still shuffle). It holds undecoded samples: memory is about
    ``shuffle_buffer`` x the mean shard bytes per sample per reader (logged at start)."""
    resampled: bool = False
    """False: every epoch reads each shard once, split across ranks x workers (needs at
    least that many shards). True: each reader draws shards with replacement and yields
    ``epoch_length`` samples per epoch in total, which works with any number of shards."""
    epoch_length: int | None = None
    """Samples per epoch over all ranks when ``resampled`` (required then)."""
    skip_bad: bool = False
    """Skip (and count) corrupt samples instead of stopping with an error."""
    decode_on: str = "auto"
    """Who turns the stored integer labels into float tensors: ``worker`` (the loader
    processes), ``device`` (the trainer, on its device: the GPU converts, and the workers
    only unpack and crop), ``auto`` (device on a GPU, else worker)."""
    class_weights: bool = False
    """Weight the segmentation loss per class: by the weights the dataset ships (Taskonomy's
    prior, when its manifest has them), else by median-frequency balancing of the
    manifest's class pixel frequencies."""

    def __post_init__(self):
        _check_positive("data.batch_size", self.batch_size)
        _check_positive("data.eval_batch_size", self.eval_batch_size)
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.crop_size is not None:
            _check_positive("data.crop_size", self.crop_size)
        if self.scale_range is not None:
            low_high = self.scale_range
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"data.scale_range must be [low, high] with 0 < low <= high, got {low_high}")
            if self.crop_size is None:
                raise ValueError("data.scale_range needs data.crop_size (rescaled images differ in size; crops make "
                                 "them batchable)")
        if self.shard_url is not None and "{name}" not in self.shard_url:
            raise ValueError(f"data.shard_url must contain {{name}} (the shard file name), got {self.shard_url!r}")
        if self.decode_on not in ("auto", "worker", "device"):
            raise ValueError(f"data.decode_on must be auto, worker or device, got {self.decode_on!r}")
        if self.resampled and not self.epoch_length:
            raise ValueError("data.resampled: true needs data.epoch_length (samples per epoch over all ranks)")


@dataclass
class ModelConfig:
    """Multitask network: dilated ResNet trunk plus one ASPP head per task."""

    arch: str = "resnet18"
    """Trunk architecture, a name of ``dsparse.models``: resnet18, resnet34, mobilenet_v2
    (element masks only)."""
    base_width: int = 64
    """Channels of the first stage (64 = the standard ResNet; the demo uses 16; 32 = the
    standard MobileNetV2)."""
    output_stride: int = 8
    """Input size over feature-map size: later stages trade stride for dilation."""
    head_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    """Dilations of each head's ASPP branches."""
    head_hidden: int | None = None
    """Channels inside each head; None = the trunk's output channels."""
    stem_pool: bool = True
    """Max-pool after the stem convolution (the standard ResNet stem; MobileNetV2 has none)."""
    branches: list[list[str]] | None = None
    """Task groups, each with its own copy of the trunk from ``branch_from`` on (a branched
    network, e.g. from ``dsparse analyze RUN --branch``); None = one trunk shared by all."""
    branch_from: Literal["layer1", "layer2", "layer3", "layer4"] = "layer4"
    """First trunk stage that is branched."""

    def __post_init__(self):
        _check_choices(self, "model")
        _check_positive("model.base_width", self.base_width)
        if not self.head_dilations:
            raise ValueError("model.head_dilations must list at least one dilation")


@dataclass
class OptimizerConfig:
    """The torch optimizer DeepSpeed steps (``dsparse.train.optim``)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    """Which ``torch.optim`` optimizer."""
    lr: float = 1e-3
    """Base learning rate (the schedule multiplies it); may change on resume."""
    weight_decay: float = 5e-4
    """L2 penalty (adam, sgd) or decoupled weight decay (adamw)."""
    momentum: float = 0.9
    """SGD only."""

    def __post_init__(self):
        _check_choices(self, "optimizer")
        _check_positive("optimizer.lr", self.lr)
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule over ``train.iterations``; may change on resume."""

    name: Literal["step", "cosine", "constant"] = "step"
    """step (multiply by gamma every step_size iterations) | cosine | constant"""
    step_size: int = 4000
    """Iterations between multiplications by ``gamma`` (step schedule)."""
    gamma: float = 0.5
    """Factor applied every ``step_size`` iterations (step schedule)."""
    warmup: int = 0
    """Linear warm-up iterations."""

    def __post_init__(self):
        _check_choices(self, "schedule")
        _check_positive("schedule.step_size", self.step_size)
        if self.warmup < 0:
            raise ValueError(f"schedule.warmup must be >= 0, got {self.warmup}")


@dataclass
class TrainConfig:
    """How long the loop runs and how often it reports, validates and checkpoints."""

    iterations: int = 20000
    """Optimizer steps of the whole run."""
    eval_interval: int = 1000
    """Validate every N iterations (and at the end)."""
    eval_batches: int | None = None
    """Limit validation to N batches per rank (None = the whole val split)."""
    log_interval: int = 20
    """Log losses, rate and ETA every N iterations (and at the end)."""
    checkpoint_interval: int = 1000
    """Checkpoint every N iterations (and at the end of each invocation)."""
    keep_checkpoints: int = 2
    """Published checkpoints kept; older ones are deleted."""
    threads: int | Literal["auto", "torch"] | None = "auto"
    """Intra-op threads of each training process: ``auto`` (null: the same), the cores it
    may really use (CPU affinity less what other programs keep busy, within the cgroup CPU
    quota, shared among the node's training processes, within Ray's assignment:
    ``dsparse.cpus``); a number; or ``torch``, torch's default (one per core of the
    machine). The choice and its inputs are logged and written to ``summary.json``."""
    loss_weighting: Literal["fixed", "adaptive"] = "fixed"
    """Task weights of the joint loss: ``fixed`` (``task_weights``) or ``adaptive``
    (AdapMTL's: from ``adaptive_start`` on, each task's mean relative loss change over the
    last ``adaptive_window`` steps, renormalised to sum to the task count;
    ``dsparse.train.loss_weights``)."""
    adaptive_start: int = 5000
    """First step of adaptive weighting (AdapMTL: 5,000); it must come before the end."""
    adaptive_window: int = 500
    """Steps of relative loss change averaged per task (AdapMTL: 500)."""

    def __post_init__(self):
        for name in ("iterations", "eval_interval", "log_interval", "checkpoint_interval", "keep_checkpoints",
                     "adaptive_start", "adaptive_window"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_choices(self, "train")
        if self.loss_weighting == "adaptive" and self.adaptive_start > self.iterations:
            raise ValueError(f"train.loss_weighting: adaptive starts at step {self.adaptive_start} "
                             f"(train.adaptive_start) but the run has {self.iterations} iterations, so it would never "
                             "adapt; lower train.adaptive_start or use loss_weighting: fixed")
        if self.loss_weighting == "fixed" and (self.adaptive_start, self.adaptive_window) != (5000, 500):
            raise ValueError("train.adaptive_start and train.adaptive_window set adaptive loss weighting; add "
                             "train.loss_weighting=adaptive, or leave them out")
        if isinstance(self.threads, str) and self.threads not in ("auto", "torch"):
            raise ValueError(f"train.threads must be a number of threads, auto or torch, got {self.threads!r}")
        if isinstance(self.threads, int):
            _check_positive("train.threads", self.threads)


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (``dsparse.train.engine``)."""

    zero_stage: Literal[0, 1, 2] = 0
    """ZeRO stage 0, 1 or 2 (stage 3 is not supported: masks need whole weights)."""
    gradient_clipping: float = 0.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    bf16: bool = False
    """bf16 mixed precision (GPU only)."""
    config_file: str | None = None
    """A DeepSpeed JSON (e.g. ``cluster/deepspeed/zero1_bf16.json``) merged over the keys
    above; batch-size keys are dsparse's (``data.batch_size``) and may not appear in it."""
    extra: dict = field(default_factory=dict)
    """Raw DeepSpeed config keys merged last, for anything not modelled here."""

    def __post_init__(self):
        _check_choices(self, "deepspeed")


@dataclass
class AdapMTLConfig:
    """``sparsity.method: adapmtl``: learned soft thresholds, one per component (trunk, each
    head or branch), ``w_eff = sign(w) * relu(|w| - sigmoid(s))``; see docs/design.md, "AdapMTL"."""

    sinit: float = -5.0
    """The starting ``s`` of every threshold (sigmoid(-5) = 0.0067). AdapMTL's code
    defaults to -30.5 and its README suggests about -20, for hundreds of thousands of SGD
    steps; with Adam each step moves ``s`` by about the learning rate, so a short run must
    start near the magnitudes it will cut (the sweep sweeps/adapmtl_thresholds.yaml)."""
    threshold_weight_decay: float = 0.05
    """Weight decay of the thresholds' own optimizer group: it pulls ``s`` towards 0
    (threshold 0.5), against the loss, and so sets how fast sparsity grows."""

    def __post_init__(self):
        if not math.isfinite(self.sinit):
            raise ValueError(f"sparsity.adapmtl.sinit must be a finite number, got {self.sinit}")
        if not (math.isfinite(self.threshold_weight_decay) and self.threshold_weight_decay >= 0):
            raise ValueError("sparsity.adapmtl.threshold_weight_decay must be >= 0, got "
                             f"{self.threshold_weight_decay}")


@dataclass
class SparsityConfig:
    """Prune at the start of training (or load a mask file); ``method: null`` = dense."""

    method: str | None = None
    """Static (prune once): disparse | snip | random | magnitude | lottery. Dynamic (masks
    evolve during training): disparse_dynamic | rigl | set | adapmtl (learned thresholds,
    projected to exactly ``target`` at the end). See dsparse.sparsity.methods.METHODS."""
    target: float = 0.9
    """Fraction of prunable weights (Conv2d/Linear weights) to prune, in (0, 1)."""
    criterion: str | None = None
    """Per-task saliency for disparse: snip (default at init) | grad_w2 | magnitude | random;
    None = snip at initialization, ``pretrained_criterion`` with from_checkpoint."""
    pretrained_criterion: str = "grad_w2"
    """DiSparse's criterion for a trained model when ``criterion`` is unset. The original
    release prunes trained NYU-v2 and Cityscapes models by magnitude and Taskonomy ones by
    grad_w2; the presets follow it. Baselines keep their own criterion."""
    num_batches: int = 50
    """Batches of saliency accumulation per rank."""
    scope: Literal["global", "layerwise"] = "global"
    """global (one ranking over all layers per task) | layerwise."""
    keep_first_dense: bool | None = None
    """Keep the first convolution dense (still counted in the sparsity denominator).
    None = on for dynamic methods and for block masks, off for static element masks (see
    ``first_conv_dense``)."""
    from_checkpoint: str | None = None
    """Prune a trained model: load these weights first (lottery: take masks from them,
    then train from the initial weights)."""
    masks: str | None = None
    """Use this mask file (from ``dsparse prune``) instead of pruning."""
    interval: int = 50
    """Dynamic: update the masks every ``interval`` steps (adapmtl: log its sparsity every
    ``interval`` steps)..."""
    end: float = 0.75
    """...until this fraction of train.iterations (NYU-v2/Cityscapes: 15k of 20k)."""
    alpha0: float = 0.5
    """Dynamic: initial drop fraction, decayed by cosine to 0 at ``end``."""
    erk_power: float = 1.0
    """Dynamic: exponent of the ERK layer-density rule (0 = uniform density)."""
    score_init: Literal["model", "xavier"] = "model"
    """What static methods score: model (the weights that are then trained, or the loaded
    trained weights) | xavier (the original DiSparse code's setting: a copy of the network
    re-initialised with Xavier-normal Conv2d/Linear weights, seeded by the run's seed; the
    masks then apply to the model's own weights)."""
    granularity: Literal["element", "block", "channel"] = "element"
    """element (any weight may be pruned; enforced by gradient hooks on dense weights) | block
    (``block x block`` tiles of each weight's GEMM view are kept or pruned whole, and masked
    layers are swapped for block-sparse ones that store and compute only the kept blocks) |
    channel (static methods only: groups of coupled output channels are kept or removed
    whole, and the model is rebuilt physically smaller, dense, with no masks)."""
    budget: Literal["params", "flops"] = "params"
    """What ``target`` removes with channel granularity: the prunable weights (params) or the
    convolutions' and linear layers' FLOPs at the training crop (flops)."""
    channel_multiple: int = 8
    """``granularity: channel``: every pruned group keeps a multiple of this many channels
    (or all of them), the extra ones the best-scored its vote removed: CPU SIMD, ONNX
    Runtime's blocked convolutions and GPU tensor cores work in widths of 8 or 16, and
    other counts run slower per FLOP. 1 keeps the vote's exact counts."""
    block: Literal[16, 32, 64] = 32
    """Block side for ``granularity: block``."""
    min_density: float | None = None
    """The floors of the exact-sparsity solve, so no layer and no task's own head is pruned
    away (the budget stays exact, taken from the other layers): the fewest weights every
    prunable layer keeps as a fraction of the layer (element masks), the fewest blocks of
    every block row as a fraction of the row (block masks), the fewest channels of every
    channel group (channel masks); always at least one. None = the default: 0.001 (one block
    per block row), 0.1 for channel groups; 0 switches the floors off. Dynamic methods hold
    them at every update; AdapMTL's final projection keeps each layer's floor."""
    adapmtl: AdapMTLConfig = field(default_factory=AdapMTLConfig)
    """Settings of ``method: adapmtl`` (an error with any other method)."""
    kernel: Kernel = "auto"
    """What block-sparse layers run: auto (the Triton kernels on CUDA; on the CPU the
    compiled kernels for fp32 where they build, else the PyTorch path) | cpu (always the
    compiled CPU kernels) | triton (always the Triton kernels) | torch (the PyTorch path);
    a kernel asked for by name is an error where it cannot run."""

    def __post_init__(self):
        _check_choices(self, "sparsity")
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"sparsity.target must be in (0, 1), got {self.target}; e.g. 0.9 prunes 90% of weights")
        _check_positive("sparsity.num_batches", self.num_batches)
        _check_positive("sparsity.interval", self.interval)
        if not 0.0 < self.end <= 1.0:
            raise ValueError(f"sparsity.end must be in (0, 1] (a fraction of train.iterations), got {self.end}")
        if not 0.0 < self.alpha0 < 1.0:
            raise ValueError(f"sparsity.alpha0 must be in (0, 1), got {self.alpha0}")
        if self.erk_power < 0:
            raise ValueError(f"sparsity.erk_power must be >= 0, got {self.erk_power}")
        if self.granularity != "block" and self.block != 32:
            raise ValueError(f"sparsity.block={self.block} has no effect with {self.granularity} masks; add "
                             "sparsity.granularity=block (--granularity block) or leave the block out")
        _check_positive("sparsity.channel_multiple", self.channel_multiple)
        if self.granularity != "channel" and self.channel_multiple != 8:
            raise ValueError(f"sparsity.channel_multiple={self.channel_multiple} has no effect with {self.granularity} "
                             "masks; add sparsity.granularity=channel (--granularity channel) or leave it out")
        if self.granularity != "channel" and self.budget != "params":
            raise ValueError(f"sparsity.budget={self.budget} has no effect with {self.granularity} masks (they count "
                             "weights); add sparsity.granularity=channel (--granularity channel) or leave it out")
        from dsparse.sparsity.criteria import CRITERIA

        if self.pretrained_criterion not in CRITERIA:
            raise ValueError(f"sparsity.pretrained_criterion must be one of {sorted(CRITERIA)}, "
                             f"got {self.pretrained_criterion!r}")
        from dsparse.sparsity.methods import get_method, refuse_score_init

        if self.min_density is not None and not 0.0 <= self.min_density < 1.0:
            raise ValueError(f"sparsity.min_density must be in [0, 1), got {self.min_density}; e.g. 0.001 keeps at "
                             "least 0.1% of every layer, 0 switches the floors off")
        if self.method != "adapmtl" and self.adapmtl != AdapMTLConfig():
            raise ValueError(f"sparsity.adapmtl has no effect with method {self.method!r}; set "
                             "sparsity.method=adapmtl or leave sparsity.adapmtl out")
        if self.method is not None:
            get_method(self.method).check(self)  # what the method may be given, worded by the method
        elif self.score_init == "xavier":
            refuse_score_init(None)

    @property
    def enabled(self) -> bool:
        return self.method is not None or self.masks is not None

    def floor_density(self) -> float:
        """The floors (``min_density``, resolved): ``MIN_DENSITY`` of the granularity by default."""
        from dsparse.sparsity.vote import MIN_DENSITY

        return MIN_DENSITY[self.granularity] if self.min_density is None else self.min_density

    def first_conv_dense(self, dynamic: bool) -> bool:
        """Whether the stem convolution stays dense: ``keep_first_dense`` when set, else on
        for dynamic methods (as RigL does) and for block masks (the 3-channel stem is a
        handful of blocks, and pruning them all cuts the network off from its input), off
        for static element masks (the original DiSparse code prunes the stem)."""
        if self.keep_first_dense is not None:
            return self.keep_first_dense
        return dynamic or self.granularity == "block"


@dataclass
class TrackingConfig:
    """MLflow tracking of the run (rank 0 logs)."""

    enabled: bool = True
    """Log to MLflow; false = no tracking at all."""
    uri: str | None = None
    """MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else a local store in ./mlruns."""
    experiment: str = "dsparse"
    """MLflow experiment the run is logged in."""
    run_name: str | None = None
    """MLflow run name; None = the run directory's name."""
    parent_run_id: str | None = None
    """Log as a child of this MLflow run (set by dsparse sweep for its trials)."""
    run_id: str | None = None
    """Log into this existing MLflow run (dsparse sweep creates one per trial, so a trial
    whose workers restart before their first checkpoint still has one run)."""


@dataclass
class RunConfig:
    """Everything one training run needs."""

    tasks: list[str] = field(default_factory=lambda: ["seg", "normal", "depth", "keypoint", "edge"])
    """The tasks trained, names of ``dsparse.tasks.TASKS``; their labels must be in the dataset."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Loss weight per task (lambda_t); missing tasks weigh 1."""
    seed: int = 0
    """Seeds the model's initial weights, the data order, data-free scores and ERK masks."""
    output_dir: str = "runs/default"
    """The run directory (``dsparse.runs.RunLayout``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the shards are and how they are streamed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The multitask network."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length and cadence of the loop."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """The DeepSpeed engine."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    """Pruning method, target and granularity; ``method: null`` = a dense run."""

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists a task twice: {self.tasks}")
        from dsparse.tasks import TASKS

        unknown = [t for t in [*self.tasks, *self.task_weights] if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(set(unknown))}; known tasks: {sorted(TASKS)}")
        unused = sorted(set(self.task_weights) - set(self.tasks))
        if unused:  # e.g. a preset's weights after --set tasks=[...]: harmless, but say so
            warnings.warn(f"task_weights for {unused} have no effect: those tasks are not in tasks {self.tasks}",
                          stacklevel=2)
        for name, weight in self.task_weights.items():
            if not weight > 0:
                raise ValueError(f"task_weights.{name} must be > 0, got {weight}")
        self._check_branches()
        from dsparse.models import MODEL_GRANULARITIES

        supported = MODEL_GRANULARITIES.get(self.model.arch)
        if self.sparsity.enabled and supported and self.sparsity.granularity not in supported:
            raise ValueError(f"model.arch {self.model.arch} supports sparsity.granularity {' or '.join(supported)} only "
                             f"(block-sparse layers and channel pruning need groups=1 convolutions), not "
                             f"{self.sparsity.granularity}; use sparsity.granularity=element or a resnet trunk")

    def _check_branches(self) -> None:
        """Branches must partition the tasks: every task in exactly one group."""
        if self.model.branches is None:
            return
        listed = [t for group in self.model.branches for t in group]
        problems = []
        if any(not group for group in self.model.branches):
            problems.append("a group is empty")
        twice = sorted({t for t in listed if listed.count(t) > 1})
        if twice:
            problems.append(f"{twice} are in two groups")
        unknown = sorted(set(listed) - set(self.tasks))
        if unknown:
            problems.append(f"{unknown} are not in tasks")
        missing = [t for t in self.tasks if t not in listed]
        if missing:
            problems.append(f"{missing} are in no group")
        if problems:
            raise ValueError(f"model.branches must split tasks {self.tasks} into groups: " + "; ".join(problems))

    def with_absolute_paths(self) -> RunConfig:
        """A copy whose file paths (data, output, masks, checkpoint, DeepSpeed file, a local
        SQLite tracking store) are absolute, so the saved config works from any directory."""
        config = copy.deepcopy(self)

        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).expanduser().resolve())

        config.data.path = absolute(config.data.path)
        config.output_dir = absolute(config.output_dir)
        config.sparsity.masks = absolute(config.sparsity.masks)
        config.sparsity.from_checkpoint = absolute(config.sparsity.from_checkpoint)
        config.deepspeed.config_file = absolute(config.deepspeed.config_file)
        url = config.data.shard_url
        if url and not url.startswith("pipe:") and "://" not in url:
            config.data.shard_url = absolute(url)
        uri = config.tracking.uri
        if uri and uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
            config.tracking.uri = "sqlite:///" + absolute(uri[len("sqlite:///"):])
        return config

    def weight_of(self, task: str) -> float:
        return float(self.task_weights.get(task, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _literal_choices(hint) -> tuple | None:
    """The choices of a ``Literal[...]`` (or ``Literal[...] | None``) type, else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(arms) == 1:
            return _literal_choices(arms[0])
    return None


def _check_choices(section, prefix: str) -> None:
    """Refuse a value outside its field's ``Literal`` choices, naming them (the type is
    the one list of choices; ``True`` is not the choice ``1``)."""
    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        choices = _literal_choices(hints[item.name])
        value = getattr(section, item.name)
        if choices is None or (value is None and type(None) in typing.get_args(hints[item.name])):
            continue
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            raise ValueError(f"{prefix}.{item.name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(name: str, value) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _from_dict(cls, values: Any, prefix: str):
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in section {prefix!r}" if prefix else ""
        raise ValueError(f"unknown config key(s) {unknown}{where}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        for inner in choices[:-1]:  # e.g. int | str: the first type the value fits
            try:
                return _coerce(inner, value, key)
            except ValueError:
                pass
        return _coerce(choices[-1], value, key)
    if origin is Literal:  # the section checks the choices (_check_choices)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{key}.{k}") if args else v for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{key} must be of type {hint.__name__}, got {value!r}")
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        dotted, text = item.split("=", 1)
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def config_from_dict(raw: dict, overrides: list[str] = ()) -> RunConfig:
    return _from_dict(RunConfig, apply_overrides(raw or {}, list(overrides)), "")


PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a bundled preset (``synthetic_tiny``, ``nyuv2``...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ValueError(f"config {name_or_path} is neither a file nor a preset; presets: {preset_names()}")


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (file or preset name), apply overrides, validate.

    Raises:
        ValueError: for a missing file, malformed YAML, an unknown key or a bad value.
    """
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    return config_from_dict(raw or {}, overrides)


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically (a reader never sees half a config)."""
    from dsparse.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (for MLflow params)."""
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
