"""Block masks in the real training loop (DeepSpeed): the block-sparse layers train like the
element applier given the same masks, pruned blocks and edge padding stay zero under ZeRO 0
and 2, dynamic block runs resume bit-identically, and mismatched mask files are refused
before anything is written."""

from __future__ import annotations

import pytest
import torch

from dsparse.cli import main
from dsparse.config import config_from_dict
from dsparse.data.synth.dataset import write_synthetic_dataset
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.sparsifier import read_sparsifier_state
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.train.trainer import Trainer, train

from .test_sparse_training import sparse_config

pytestmark = pytest.mark.e2e


def block_config(dataset, run_dir, **kwargs):
    config = sparse_config(dataset, run_dir, **kwargs)
    config["model"]["base_width"] = 16  # 16-channel blocks fit the narrowest layers
    config["sparsity"].update(granularity="block", block=16)
    return config


def losses_of(trainer: Trainer) -> list[float]:
    """Per-step joint training loss, recorded through the tracker's metrics."""
    recorded = []
    original = trainer.tracker.log_metrics

    def spy(metrics, step):
        if "train/loss" in metrics:
            recorded.append(metrics["train/loss"])
        return original(metrics, step)

    trainer.tracker.log_metrics = spy
    trainer.fit()
    return recorded


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_block_layers_train_like_the_element_applier_with_the_same_masks(tiny_dataset, tmp_path, zero_stage):
    block_run = block_config(tiny_dataset, tmp_path / "block", zero_stage=zero_stage, method="random", target=0.7,
                             iterations=4)
    block_run["train"]["log_interval"] = 1
    block_trainer = Trainer(config_from_dict(block_run))
    block_losses = losses_of(block_trainer)
    masks = MaskSet.load(tmp_path / "block" / "masks.pt")
    element_masks = MaskSet(masks.masks, {**masks.meta, "granularity": "element", "block": None})
    element_masks.save(tmp_path / "element_masks.pt")
    element_run = block_config(tiny_dataset, tmp_path / "element", zero_stage=zero_stage, method="random",
                               target=0.7, iterations=4)
    element_run["train"]["log_interval"] = 1
    element_run["sparsity"] = {"masks": str(tmp_path / "element_masks.pt")}
    element_losses = losses_of(Trainer(config_from_dict(element_run)))
    assert len(block_losses) == 4
    torch.testing.assert_close(torch.tensor(block_losses), torch.tensor(element_losses), rtol=1e-4, atol=1e-4)
    weights = block_trainer.sparsifier.state.applier.weights()
    for name, mask in masks.masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0, name
    for layer in block_trainer.sparsifier.state.applier.layers.values():  # edge padding stays zero
        stored = float(layer.blocks.detach().abs().double().sum())
        assert stored == pytest.approx(float(layer.dense_weight().abs().double().sum()), abs=1e-9)


def test_dynamic_block_run_resumes_bit_identically(tiny_dataset, tmp_path):
    def config(name):
        run = block_config(tiny_dataset, tmp_path / name, method="disparse_dynamic", target=0.8, iterations=8,
                           interval=2, end=1.0)
        run["train"]["checkpoint_interval"] = 3
        return config_from_dict(run)

    train(config("straight"))
    train(config("resumed"), stop_after=5)
    summary = train(config("resumed"), resume=True)
    assert summary["sparsity"]["num_updates"] == 4
    a = latest_checkpoint(tmp_path / "straight" / "checkpoints")
    b = latest_checkpoint(tmp_path / "resumed" / "checkpoints")
    assert read_sparsifier_state(a)["masks"]["masks"].keys() == read_sparsifier_state(b)["masks"]["masks"].keys()
    assert MaskSet.from_state_dict(read_sparsifier_state(a)["masks"]).digest() == \
        MaskSet.from_state_dict(read_sparsifier_state(b)["masks"]).digest()
    weights_a, weights_b = load_model_weights(a), load_model_weights(b)
    assert any(name.endswith(".blocks") for name in weights_a), "block layers store blocks"
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_mismatched_mask_file_is_one_line_and_writes_nothing(tiny_dataset, tmp_path, capsys):
    from dsparse.sparsity import prune
    from dsparse.models import build_model
    from dsparse.tasks import build_tasks

    tasks = build_tasks(["seg", "depth"], num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=16,
                        head_dilations=(1, 2))
    prune(model, tasks, None, method="random", sparsity=0.5, granularity="block", block=32).save(tmp_path / "m.pt")
    run_dir = tmp_path / "run"
    code = main(["train", "synthetic_tiny", "--masks", str(tmp_path / "m.pt"), "--set", f"data.path={tiny_dataset}",
                 "--set", "tasks=[seg,depth]", "--set", f"output_dir={run_dir}", "--set", "model.base_width=16",
                 "--set", "model.head_dilations=[1,2]", "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "hold block masks (block 32) but the config asks for element masks" in err[0]
    assert not run_dir.exists(), "nothing may be written for a refused run"


def test_mask_file_of_another_model_is_refused_before_anything_is_written(tiny_dataset, tmp_path, capsys):
    from dsparse.sparsity import prune
    from dsparse.models import build_model
    from dsparse.tasks import build_tasks

    tasks = build_tasks(["seg", "depth"], num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=8,
                        head_dilations=(1, 2))
    prune(model, tasks, None, method="random", sparsity=0.5).save(tmp_path / "narrow.pt")
    run_dir = tmp_path / "run"
    code = main(["train", "synthetic_tiny", "--masks", str(tmp_path / "narrow.pt"), "--set",
                 f"data.path={tiny_dataset}", "--set", "tasks=[seg,depth]", "--set", f"output_dir={run_dir}",
                 "--set", "model.base_width=16", "--set", "model.head_dilations=[1,2]", "--set",
                 "tracking.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "masks do not match the model" in err[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("first, then, message", [
    ({}, ["--set", "sparsity.method=random", "--set", "sparsity.target=0.5"],
     "cannot change sparsity.method: None -> 'random'; sparsity.target: 0.9 -> 0.5"),
    ({"method": "random", "target": 0.5}, ["--set", "sparsity.method=null"], "cannot change sparsity.method: 'random' -> None"),
])
def test_resume_with_other_sparsity_settings_is_one_line(tiny_dataset, tmp_path, capsys, first, then, message):
    run = sparse_config(tiny_dataset, tmp_path / "run", iterations=4)
    run["sparsity"] = first
    train(config_from_dict(run), stop_after=2)
    (tmp_path / "run.yaml").write_text(__import__("yaml").safe_dump(run))
    code = main(["train", str(tmp_path / "run.yaml"), "--resume", *then])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and "resume with those" in err[0]


def test_a_damaged_sparsity_state_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "sparsity.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"sparsity.pt cannot be read .* resume from an earlier one") as error:
        read_sparsifier_state(tmp_path)
    assert "\n" not in str(error.value), "one line: torch's multi-line message is cut to its first line"


def test_triton_kernel_where_it_cannot_run_is_one_line_and_writes_nothing(tiny_dataset, tmp_path, capsys,
                                                                          monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("Triton can run on this machine's GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run_dir = tmp_path / "run"
    code = main(["train", "synthetic_tiny", "--set", f"data.path={tiny_dataset}", "--set", "tasks=[seg,depth]",
                 "--set", f"output_dir={run_dir}", "--set", "model.base_width=16", "--set", "model.head_dilations=[1,2]",
                 "--set", "tracking.enabled=false", "--set", "sparsity.method=random", "--set", "sparsity.target=0.5",
                 "--set", "sparsity.granularity=block", "--set", "sparsity.kernel=triton"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "sparsity.kernel=triton cannot run here" in err[0] and "sparsity.kernel=auto" in err[0]
    assert not run_dir.exists(), "nothing may be written for a refused run"


def test_compiled_and_triton_kernels_train_like_the_pytorch_path(tmp_path):
    """The same block-masked run through DeepSpeed with ``sparsity.kernel=cpu`` (the
    compiled CPU kernels), ``triton`` (CPU: Triton's interpreter) and ``torch``: equal
    losses (fp32, summation order only) and the layers running the kernel asked for.
    16x16 images, batches of 2 and one validation batch keep the interpreter's run short
    (its cost grows with the pixels each kernel covers)."""
    from dsparse.kernels import cpu

    dataset = tmp_path / "data"
    write_synthetic_dataset(dataset, num_train=8, num_val=4, size=16, seed=0, shard_size=4, num_procs=1,
                            progress=False)

    kernels = ["torch"]
    if cpu.available():
        kernels.append("cpu")
    try:
        import dsparse.kernels.ops  # noqa: F401
        kernels.append("triton")
    except ImportError:
        pass
    if len(kernels) == 1:
        pytest.skip("neither the compiled CPU kernels nor Triton run here")
    losses = {}
    for kernel in kernels:
        run = block_config(dataset, tmp_path / kernel, method="random", target=0.8, iterations=2)
        run["sparsity"]["kernel"] = kernel
        run["data"].update(batch_size=2, eval_batch_size=2)
        run["train"].update(log_interval=1, eval_batches=1)
        trainer = Trainer(config_from_dict(run))
        losses[kernel] = losses_of(trainer)
        layers = trainer.sparsifier.state.applier.layers
        assert layers and all(layer.kernel == kernel for layer in layers.values())
        assert layers and all(layer.compute_path(torch.zeros(1)) == kernel for layer in layers.values())
    for kernel in kernels[1:]:
        assert len(losses[kernel]) == 2
        torch.testing.assert_close(torch.tensor(losses[kernel]), torch.tensor(losses["torch"]), rtol=1e-4, atol=1e-4)


def _logged_losses(log: str) -> list[list[float]]:
    """Per-step task losses from the trainer's progress lines (``step k/N | loss seg 1.2 ...``)."""
    steps = []
    for line in log.splitlines():
        if " | loss " in line and "step " in line:
            fields = line.split(" | loss ")[1].split(" | ")[0].split()
            steps.append([float(value) for value in fields[1::2]])
    return steps


def test_two_ranks_train_alike_on_the_compiled_and_pytorch_kernels(tiny_dataset, tmp_path, torchrun_train):
    """A 2-rank DeepSpeed run (ZeRO 1) of block layers on the compiled CPU kernels and on the
    PyTorch path: the same per-step losses up to fp32 summation order (the progress lines
    print 4 decimals; tolerance 2e-3)."""
    from dsparse.kernels import cpu

    if not cpu.available():
        pytest.skip(f"the compiled CPU kernels do not run here: {cpu.unavailable_reason()}")
    losses = {}
    for kernel in ("cpu", "torch"):
        run = block_config(tiny_dataset, tmp_path / kernel, zero_stage=1, method="random", target=0.8, iterations=2)
        run["sparsity"]["kernel"] = kernel
        run["train"].update(log_interval=1, eval_batches=1)
        summary, log = torchrun_train(run, with_log=True)
        assert summary["world_size"] == 2 and summary["status"] == "complete"
        losses[kernel] = _logged_losses(log)
    assert len(losses["cpu"]) == 2 and all(len(step) == 5 for step in losses["cpu"])
    torch.testing.assert_close(torch.tensor(losses["cpu"]), torch.tensor(losses["torch"]), rtol=0, atol=2e-3)
