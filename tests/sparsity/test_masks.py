"""Tests for dsparse.sparsity.masks: files, model checks, application and summaries."""

from __future__ import annotations

import re

import pytest
import torch

from dsparse.models import build_model, parameter_users, prunable_parameters
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.vote import solve_vote



def tiny_model():
    torch.manual_seed(0)
    return build_model("resnet18", {"seg": 10, "depth": 1}, base_width=8, head_dilations=(1, 2))


@pytest.fixture(scope="module")
def voted():
    model = tiny_model()
    weights = prunable_parameters(model)
    users = {fqn: parameter_users(model)[fqn] for fqn in weights}
    generator = torch.Generator().manual_seed(0)
    scores = {t: {f: torch.rand(w.shape, generator=generator) for f, w in weights.items() if t in users[f]}
              for t in ("seg", "depth")}
    first = next(iter(weights))
    result = solve_vote(scores, users, sparsity=0.9, dense=[first])
    masks = MaskSet.from_vote(result, method="disparse", criterion="snip", scope="global", sparsity_requested=0.9,
                              dense_layers=[first], num_batches=2)
    return masks, users


def hand_masks() -> MaskSet:
    masks = {"conv.weight": torch.tensor([[True, False], [True, True]]),
             "fc.weight": torch.tensor([False, False, True])}
    task_masks = {
        "a": {"conv.weight": torch.tensor([[True, False], [True, False]]),
              "fc.weight": torch.tensor([False, True, True])},
        "b": {"conv.weight": torch.tensor([[True, False], [False, True]])},
        "c": {"fc.weight": torch.tensor([False, False, False])},
    }
    return MaskSet(masks, {"method": "hand"}, task_masks)


def assert_same(first: MaskSet, second: MaskSet) -> None:
    assert list(first.masks) == list(second.masks)
    assert all(torch.equal(first.masks[f], second.masks[f]) for f in first.masks)
    assert first.meta == second.meta
    assert (first.task_masks is None) == (second.task_masks is None)
    for task, masks in (first.task_masks or {}).items():
        assert list(masks) == list(second.task_masks[task])
        assert all(torch.equal(masks[f], second.task_masks[task][f]) for f in masks)


def test_from_vote_fills_meta_from_the_result(voted):
    masks, _ = voted
    assert masks.meta["num_kept"] == masks.num_kept == round(0.1 * masks.num_total)
    assert masks.meta["sparsity_achieved"] == pytest.approx(masks.sparsity)
    assert masks.meta["method"] == "disparse" and 0 < masks.meta["keep_ratio"] < 0.1
    with pytest.raises(ValueError, match=r"meta keys \['keep_ratio'\] are taken from the vote result"):
        MaskSet.from_vote(solve_vote({"t": {"w": torch.rand(4)}}, {"w": {"t"}}, sparsity=0.5), keep_ratio=0.3)


def test_save_load_round_trip(voted, tmp_path):
    masks, _ = voted
    path = tmp_path / "masks.pt"
    masks.save(path)
    loaded = MaskSet.load(path)
    assert_same(masks, loaded)
    assert loaded.digest() == masks.digest()
    raw = torch.load(path, weights_only=True)  # plain content only
    assert raw["format"] == "dsparse-masks"
    packed_bytes = sum(p["bits"].numel() for p in raw["masks"].values())
    assert packed_bytes <= masks.num_total // 8 + len(masks.masks)  # one bit per weight
    hand = hand_masks()
    hand.save(tmp_path / "hand.pt")
    assert_same(hand, MaskSet.load(tmp_path / "hand.pt"))
    without = MaskSet(hand.masks, {"dense_layers": ("conv.weight",), "nested": {"k": [1, 2.5, None]}})
    without.save(tmp_path / "plain.pt")
    assert_same(without, MaskSet.load(tmp_path / "plain.pt"))


def test_save_is_atomic(tmp_path, monkeypatch):
    masks = hand_masks()
    path = tmp_path / "masks.pt"
    masks.save(path)
    masks.save(path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.pt"]
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"meta\['tasks'\] is a set"):
        MaskSet(masks.masks, {"tasks": {"seg", "depth"}}).save(path)

    def crash_mid_write(payload, file):
        file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        hand_masks().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.pt"], "no temporary file may be left behind"
    assert path.read_bytes() == before, "a failed save must not touch the existing file"


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MaskSet.load(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="cannot be read"):
        MaskSet.load(tmp_path / "garbage.pt")
    hand_masks().save(tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read"):
        MaskSet.load(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a dsparse mask file"):
        MaskSet.load(tmp_path / "foreign.pt")
    raw = torch.load(tmp_path / "good.pt", weights_only=True)
    raw["masks"]["conv.weight"]["bits"] = raw["masks"]["conv.weight"]["bits"][:0]
    torch.save(raw, tmp_path / "bad_bits.pt")
    with pytest.raises(ValueError, match="is corrupt"):
        MaskSet.load(tmp_path / "bad_bits.pt")
    raw["version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 99"):
        MaskSet.load(tmp_path / "future.pt")


def test_masks_must_be_bool():
    with pytest.raises(TypeError, match=r"masks\['w'\] must be a bool tensor.*float32"):
        MaskSet({"w": torch.ones(3)}, {})


def test_check_matches_names_the_parameter(voted):
    masks, _ = voted
    model = tiny_model()
    masks.check_matches(model)
    name = list(masks.masks)[3]
    missing = MaskSet({k: v for k, v in masks.masks.items() if k != name}, {})
    with pytest.raises(ValueError, match=f"prunable parameter '{name}' has no mask"):
        missing.check_matches(model)
    extra = MaskSet({**masks.masks, "trunk.ghost.weight": torch.ones(2, dtype=torch.bool)}, {})
    with pytest.raises(ValueError, match="mask for 'trunk.ghost.weight', which is not a prunable parameter"):
        extra.check_matches(model)
    shape = tuple(masks.masks[name].shape)
    wrong = MaskSet({**masks.masks, name: torch.ones(5, dtype=torch.bool)}, {})
    with pytest.raises(ValueError, match=re.escape(f"'{name}': mask shape (5,) but parameter shape {shape}")):
        wrong.check_matches(model)
    with pytest.raises(ValueError, match="has no mask"):
        missing.apply_(model)


def test_apply_zeros_exactly_the_pruned_weights(voted):
    masks, _ = voted
    model = tiny_model()
    before = {f: w.detach().clone() for f, w in prunable_parameters(model).items()}
    masks.apply_(model)
    for fqn, weight in prunable_parameters(model).items():
        mask = masks.masks[fqn]
        assert torch.all(weight[~mask] == 0), fqn
        assert torch.equal(weight[mask], before[fqn][mask]), fqn
    assert sum(int(torch.count_nonzero(w)) for w in prunable_parameters(model).values()) == masks.num_kept


def test_layer_table_and_format(voted):
    hand = hand_masks()
    rows = hand.layer_table({"conv.weight": frozenset({"b", "a"}), "fc.weight": frozenset({"a", "c"})})
    assert rows == [
        dict(layer="conv.weight", users="a,b", size=4, kept=3, sparsity=0.25),
        dict(layer="fc.weight", users="a,c", size=3, kept=1, sparsity=pytest.approx(2 / 3)),
    ]
    assert hand.layer_table()[0]["users"] == ""
    assert (hand.num_kept, hand.num_total) == (4, 7) and hand.sparsity == pytest.approx(3 / 7)
    text = hand.format_table()
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "users", "size", "kept", "sparsity"]
    assert lines[-1].split() == ["total", "7", "4", "0.4286"]
    masks, users = voted
    table = masks.format_table(users)
    assert "depth,seg" in table and f"{masks.num_kept}" in table.splitlines()[-1]


def test_digest_compares_masks():
    hand = hand_masks()
    same = MaskSet({f: m.clone() for f, m in reversed(hand.masks.items())}, {"other": "meta"})
    assert hand.digest() == same.digest()
    flipped = {f: m.clone() for f, m in hand.masks.items()}
    flipped["fc.weight"][0] = True
    assert MaskSet(flipped, {}).digest() != hand.digest()
    reshaped = {"conv.weight": hand.masks["conv.weight"].reshape(4), "fc.weight": hand.masks["fc.weight"]}
    assert MaskSet(reshaped, {}).digest() != hand.digest()


def test_task_mask_iou():
    iou = hand_masks().task_mask_iou()
    # conv: a={0,2}, b={0,3} -> 1/3; c does not use conv. fc: a={1,2}, c={} -> 0; b does not use fc.
    assert iou == {"conv.weight": {("a", "b"): pytest.approx(1 / 3)}, "fc.weight": {("a", "c"): 0.0}}
    with pytest.raises(ValueError, match="no task masks"):
        MaskSet(hand_masks().masks, {}).task_mask_iou()


def test_task_mask_iou_on_a_vote(voted):
    masks, users = voted
    iou = masks.task_mask_iou()
    shared = [f for f, u in users.items() if len(u) == 2]
    assert list(iou) == shared
    first = masks.meta["dense_layers"][0]
    assert iou[first] == {("seg", "depth"): 1.0}
    assert all(0.0 <= v <= 1.0 for pairs in iou.values() for v in pairs.values())
