"""1 rank and 2 ranks (gloo) derive identical masks from the same batches; a disagreement fails loudly."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsparse.models import build_model
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.methods import verify_masks_agree
from dsparse.sparsity.prune import prune
from dsparse.tasks import build_tasks

TASKS = ["seg", "normal", "depth", "keypoint", "edge"]


def make_batches(num_batches=4, batch=3, size=32):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(num_batches):
        normal = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, generator=generator), dim=1)
        batches.append({"rgb": torch.randn(batch, 3, size, size, generator=generator),
                        "seg": torch.randint(0, 10, (batch, size, size), generator=generator),
                        "normal": normal, "depth": torch.rand(batch, 1, size, size, generator=generator) + 0.5,
                        "keypoint": torch.rand(batch, 1, size, size, generator=generator),
                        "edge": torch.rand(batch, 1, size, size, generator=generator)})
    return batches


def masks_from(batches, method, criterion):
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=8, head_dilations=(1, 2))
    return prune(model, tasks, iter(batches), method=method, criterion=criterion, sparsity=0.9,
                 num_batches=len(batches))


def _worker(rank, world_size, init_file, batches, method, criterion, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        masks = masks_from(batches[rank::world_size], method, criterion)  # each rank scores its own share
        if rank == 0:
            masks.save(out)
    finally:
        dist.destroy_process_group()


def _disagreeing_worker(rank, world_size, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mask = torch.ones(4, 4, dtype=torch.bool)
        mask[0, 0] = rank == 0  # rank 1 differs in one bit
        try:
            verify_masks_agree(MaskSet(masks={"w": mask}, meta={}))
            (result_dir / f"{rank}.txt").write_text("no error")
        except RuntimeError as error:
            (result_dir / f"{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method, criterion", [("disparse", "snip"), ("disparse", "grad_w2"), ("snip", None)])
def test_one_and_two_ranks_give_identical_masks(tmp_path, method, criterion):
    batches = make_batches()
    single = masks_from(batches, method, criterion)
    out = tmp_path / "two_ranks.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), batches, method, criterion, str(out)), nprocs=2)
    double = MaskSet.load(out)
    assert double.digest() == single.digest()
    assert double.num_kept == single.num_kept == round(0.1 * single.num_total)


def test_ranks_that_disagree_fail_loudly(tmp_path):
    mp.spawn(_disagreeing_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2)
    for rank in range(2):
        message = (tmp_path / f"{rank}.txt").read_text()
        assert "mask digests differ across ranks (ranks [1] disagree with rank 0)" in message
