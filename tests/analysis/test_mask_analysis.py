"""Mask analysis on hand-built masks with known IoUs and a known watershed, on masks the
pruning pipeline makes (element and block), and through the CLI."""

import csv
import json
import math

import pytest
import torch

from dsparse.analysis import analyze_masks, group_tasks, plan_branches, stage_of
from dsparse.sparsity.masks import MaskSet

TASKS = ["seg", "depth", "normal"]
LAYERS = [f"trunk.layer{i}.0.conv1.weight" for i in (1, 2, 3, 4)]


def bits(*kept, size=10):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[list(kept)] = True
    return mask


def hand_built() -> MaskSet:
    """Three tasks over four shared layers and one head each:
    layer1: all identical (IoU 1); layer2: seg=depth, normal keeps one more (IoU 4/5 with both);
    layer3: seg/depth IoU 3/5, normal disjoint from both; layer4: seg/depth 1/7, normal disjoint.
    Mean IoU: 1, (1 + 4/5 + 4/5)/3 = 13/15, (3/5)/3 = 1/5, (1/7)/3 = 1/21. Two-level fits:
    split before layer2 leaves 0.379 squared error, before layer3 0.0205, before layer4 0.368,
    so the watershed is layer3, with levels 14/15 and 26/210."""
    per_task = {
        "seg": [bits(0, 1, 2), bits(0, 1, 2, 3), bits(0, 1, 2, 3), bits(0, 1, 2, 3)],
        "depth": [bits(0, 1, 2), bits(0, 1, 2, 3), bits(1, 2, 3, 4), bits(3, 4, 5, 6)],
        "normal": [bits(0, 1, 2), bits(0, 1, 2, 3, 4), bits(7, 8, 9), bits(7, 8, 9)],
    }
    task_masks = {t: dict(zip(LAYERS, masks)) for t, masks in per_task.items()}
    for task in TASKS:
        task_masks[task][f"heads.{task}.weight"] = bits(0, 1)
    final = {layer: task_masks["seg"][layer] | task_masks["depth"][layer] | task_masks["normal"][layer]
             for layer in LAYERS}
    final.update({f"heads.{t}.weight": bits(0, 1) for t in TASKS})
    return MaskSet(final, {"method": "disparse", "sparsity_achieved": 0.5}, task_masks)


def test_iou_per_layer_and_pair_density_and_watershed_match_hand_computation():
    analysis = analyze_masks(hand_built())
    assert analysis.tasks == TASKS and analysis.shared_layers == LAYERS
    assert analysis.iou[LAYERS[0]] == {("seg", "depth"): 1.0, ("seg", "normal"): 1.0, ("depth", "normal"): 1.0}
    assert analysis.iou[LAYERS[1]][("seg", "normal")] == pytest.approx(4 / 5)
    assert analysis.iou[LAYERS[2]] == {("seg", "depth"): pytest.approx(3 / 5), ("seg", "normal"): 0.0,
                                       ("depth", "normal"): 0.0}
    assert analysis.mean_iou(LAYERS[3]) == pytest.approx(1 / 21)
    assert analysis.watershed == LAYERS[2] and analysis.watershed_drop == pytest.approx(14 / 15 - (1 / 5 + 1 / 21) / 2)
    assert analysis.density[LAYERS[2]] == pytest.approx(0.8)  # 0-4 and 7-9 kept
    assert "heads.seg.weight" not in analysis.iou, "a layer one task uses has no pair"


def test_tasks_group_by_iou_after_the_watershed_and_branch_at_its_stage():
    analysis = analyze_masks(hand_built())
    plan = plan_branches(analysis, num_groups=2)
    assert plan.branch_from == "layer3" and plan.groups == [["seg", "depth"], ["normal"]]
    assert plan.group_iou["seg-depth"] == pytest.approx((3 / 5 + 1 / 7) / 2)
    assert plan_branches(analysis).groups == [["seg"], ["depth"], ["normal"]]
    assert group_tasks(TASKS, {}, 1) == [TASKS]
    with pytest.raises(ValueError, match="--groups must be between 1 and the number of tasks"):
        group_tasks(TASKS, {}, 4)
    assert stage_of("shared.stem.0.weight") == "stem" and stage_of("branches.1.layer4.0.conv2.weight") == "layer4"


def test_one_parallel_outlier_does_not_move_the_watershed():
    """A shortcut-like layer with high IoU inside the falling part (module order puts parallel
    1x1 shortcuts between convolutions) must not make the layer after it the watershed."""
    from dsparse.analysis import MaskAnalysis, find_watershed

    layers = [f"l{i}" for i in range(8)]
    levels = [0.95, 0.9, 0.92, 0.88, 0.2, 0.85, 0.1, 0.12]  # l5 is the outlier
    iou = {layer: {("a", "b"): value} for layer, value in zip(layers, levels)}
    analysis = MaskAnalysis(["a", "b"], layers, {layer: 0.5 for layer in layers}, iou)
    assert find_watershed(analysis)[0] == "l4"


def test_masks_without_task_masks_are_refused_in_one_line():
    plain = MaskSet({LAYERS[0]: bits(1)}, {"method": "snip"})
    with pytest.raises(ValueError, match="hold no per-task masks"):
        analyze_masks(plain)


@pytest.mark.parametrize("granularity", ["element", "block"])
def test_pipeline_masks_analyse_with_the_ious_of_their_task_masks(granularity):
    from dsparse.models import build_model
    from dsparse.sparsity import prune
    from dsparse.tasks import build_tasks
    from tests.sparsity.test_distributed_masks import make_batches

    torch.manual_seed(0)
    tasks = build_tasks(["seg", "depth", "normal"], num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=4,
                        head_dilations=(1,))
    masks = prune(model, tasks, iter(make_batches(1)), method="disparse", sparsity=0.8, num_batches=1,
                  granularity=granularity, block=16)
    analysis = analyze_masks(masks)
    for layer, pairs in analysis.iou.items():
        for (a, b), value in pairs.items():
            ka, kb = masks.task_masks[a][layer], masks.task_masks[b][layer]
            union = int((ka | kb).sum())
            assert value == pytest.approx(int((ka & kb).sum()) / union if union else 1.0)
    assert analysis.watershed in analysis.shared_layers


def test_cli_writes_csv_plots_and_summary_for_a_mask_file(tmp_path, capsys):
    from dsparse.cli import main

    path = tmp_path / "masks.pt"
    hand_built().save(path)
    assert main(["analyze", str(path)]) == 0
    out_dir = tmp_path / "masks.pt-analysis"
    rows = list(csv.DictReader((out_dir / "mask_iou.csv").open()))
    assert [r["layer"] for r in rows][:4] == LAYERS
    assert float(rows[2]["iou/seg-depth"]) == pytest.approx(0.6) and rows[2]["watershed"] == "True"
    assert math.isnan(float(rows[4]["mean_iou"]))  # a head
    for name in ("mask_iou.png", "mask_density.png"):
        assert (out_dir / name).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out_dir / "analysis.json").read_text())
    assert summary["watershed"]["layer"] == LAYERS[2] and "change point" in summary["watershed"]["rule"]
    assert "watershed: trunk.layer3.0.conv1.weight" in capsys.readouterr().out
    assert main(["analyze", str(path), "--branch"]) == 2
    assert "needs --config CONFIG" in capsys.readouterr().err
    assert main(["analyze", str(path), "--groups", "2"]) == 2
    assert "add --branch" in capsys.readouterr().err


def test_branched_config_is_a_new_run_not_the_analysed_one():
    """A sweep trial's config names its MLflow run; the branched run must get its own."""
    from dsparse.analysis import branched_config
    from dsparse.config import load_config

    config = load_config("synthetic_tiny", ["tasks=[seg, depth, normal]", "tracking.run_id=abc",
                                            "tracking.parent_run_id=parent", "tracking.run_name=trial-7"])
    branched = branched_config(config, plan_branches(analyze_masks(hand_built()), num_groups=2))
    assert (branched.tracking.run_id, branched.tracking.parent_run_id, branched.tracking.run_name) == (None,) * 3
    assert branched.model.branches == [["seg", "depth"], ["normal"]] and branched.model.branch_from == "layer3"


def test_no_watershed_where_agreement_rises_or_stays():
    from dsparse.analysis import MaskAnalysis, find_watershed

    layers = ["l0", "l1", "l2", "l3"]
    for levels in ([0.2, 0.2, 0.8, 0.8], [0.5] * 4):
        iou = {layer: {("a", "b"): value} for layer, value in zip(layers, levels)}
        assert find_watershed(MaskAnalysis(["a", "b"], layers, dict.fromkeys(layers, 0.5), iou)) == (None, None)


def test_dense_layers_are_left_out_and_data_free_scores_are_refused():
    masks = hand_built()
    masks.meta["dense_layers"] = [LAYERS[0]]
    analysis = analyze_masks(masks)
    assert LAYERS[0] not in analysis.iou and LAYERS[0] in analysis.density
    masks.meta["criterion"] = "magnitude"
    with pytest.raises(ValueError, match="scored by 'magnitude', which gives every task the same score"):
        analyze_masks(masks)


def test_branched_runs_of_sweep_trials_land_beside_the_trials_and_drop_shared_masks(tmp_path):
    from dsparse.analysis import branched_config
    from dsparse.config import load_config

    plan = plan_branches(analyze_masks(hand_built()), num_groups=2)
    trial = tmp_path / "sweep" / "trials" / "seed=0_method=disparse"
    config = load_config("synthetic_tiny", ["tasks=[seg, depth, normal]", f"output_dir={trial}",
                                            "sparsity.method=disparse", "sparsity.masks=/m.pt",
                                            "sparsity.from_checkpoint=/dense"])
    branched = branched_config(config, plan)
    assert branched.output_dir == str(tmp_path / "sweep" / "branched" / "seed=0_method=disparse")
    assert branched.sparsity.masks is None and branched.sparsity.from_checkpoint is None
    masks_only = load_config("synthetic_tiny", ["tasks=[seg, depth, normal]", "sparsity.masks=/m.pt"])
    with pytest.raises(ValueError, match="fits the shared model only; set sparsity.method"):
        branched_config(masks_only, plan)


def test_watershed_tag_spells_no_watershed_as_none():
    from dsparse.analysis.output import watershed_tag

    assert watershed_tag("trunk.layer3.0.conv1.weight") == "trunk.layer3.0.conv1.weight"
    assert watershed_tag(None) == "none"
