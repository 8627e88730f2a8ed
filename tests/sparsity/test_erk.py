"""Tests for dsparse.sparsity.erk: ERK densities that hit the global target exactly.

Evidence: a hand-computed example of the formula, exact totals on the tiny ResNet at
several densities and powers (including the case where small layers cap at density 1),
forced-dense layers, and the errors a user can trigger.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity.erk import erk_counts, erk_densities, random_masks

DENSITIES = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 0.95)
POWERS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def resnet_shapes() -> dict[str, torch.Size]:
    torch.manual_seed(0)
    model = build_model("resnet18", {"seg": 10, "depth": 1}, base_width=8, head_dilations=(1, 2))
    return {fqn: w.shape for fqn, w in prunable_parameters(model).items()}


def numel(shape) -> int:
    return math.prod(shape)


def test_hand_example_follows_the_formula():
    # ERK ratios: a = (4+2)/8 = 0.75, b = (10+10)/100 = 0.2. Budget round(0.25 * 108) = 27.
    # factor f: 0.75 f * 8 + 0.2 f * 100 = 27 -> f = 27 / 26; a: 6.2308, b: 20.7692.
    # Floors 6 + 20 = 26; the one left goes to b (fraction .769 > .231).
    shapes = {"a": (4, 2), "b": (10, 10)}
    assert erk_counts(shapes, 0.25) == {"a": 6, "b": 21}
    assert erk_densities(shapes, 0.25) == {"a": 6 / 8, "b": 21 / 100}


def test_hand_example_conv_and_uniform_power():
    # conv (2, 1, 3, 3): ratio (2+1+3+3)/18 = 0.5; linear (6, 3): (6+3)/18 = 0.5: equal densities.
    shapes = {"conv": (2, 1, 3, 3), "fc": (6, 3)}
    assert erk_counts(shapes, 0.5) == {"conv": 9, "fc": 9}
    # power 0: uniform density whatever the shapes; 0.3 * 118 = 35.4 -> 35 kept in total.
    shapes = {"a": (4, 2), "b": (10, 10), "c": (10,)}
    counts = erk_counts(shapes, 0.3, power=0.0)
    assert sum(counts.values()) == 35
    assert all(abs(counts[f] - 0.3 * numel(s)) < 1 for f, s in shapes.items())


def test_capped_layers_become_dense_and_the_rest_is_rescaled():
    # ratios: small (2+2)/4 = 1, big (20+20)/400 = 0.1. Budget round(0.5 * 404) = 202.
    # Uncapped factor 202 / (4 + 40) = 4.59 -> small would have density 4.59: capped at 1,
    # big then takes 202 - 4 = 198.
    shapes = {"small": (2, 2), "big": (20, 20)}
    assert erk_counts(shapes, 0.5) == {"small": 4, "big": 198}


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("density", DENSITIES)
def test_resnet_counts_sum_exactly(resnet_shapes, density, power):
    counts = erk_counts(resnet_shapes, density, power=power)
    total = sum(numel(s) for s in resnet_shapes.values())
    assert list(counts) == list(resnet_shapes)
    assert sum(counts.values()) == round(density * total)
    assert all(0 <= counts[f] <= numel(s) for f, s in resnet_shapes.items())
    densities = erk_densities(resnet_shapes, density, power=power)
    assert {f: round(d * numel(resnet_shapes[f])) for f, d in densities.items()} == counts


def test_resnet_erk_is_denser_for_small_layers(resnet_shapes):
    densities = erk_densities(resnet_shapes, 0.1)
    assert densities["trunk.layer1.0.conv1.weight"] > densities["trunk.layer4.1.conv2.weight"]
    uniform = erk_densities(resnet_shapes, 0.1, power=0.0)
    assert max(uniform.values()) - min(uniform.values()) < 0.01


def test_resnet_capped_case_is_exact(resnet_shapes):
    counts = erk_counts(resnet_shapes, 0.8)
    capped = [f for f, s in resnet_shapes.items() if counts[f] == numel(s)]
    assert capped, "at density 0.8 the small layers must cap at density 1"
    assert "trunk.layer2.0.shortcut.0.weight" in capped  # (16+8+1+1)/128: a high ERK ratio
    # The uncapped layers all have ERK densities below 1, proportional to their ratios.
    ratios = {f: sum(s) / numel(s) for f, s in resnet_shapes.items()}
    free = [f for f in resnet_shapes if f not in capped]
    factors = [counts[f] / numel(resnet_shapes[f]) / ratios[f] for f in free]
    assert max(factors) - min(factors) < 0.05 * max(factors)
    assert max(ratios[f] for f in free) < min(ratios[f] for f in capped)
    total = sum(numel(s) for s in resnet_shapes.values())
    assert sum(counts.values()) == round(0.8 * total)


def test_dense_layers_are_kept_and_count_in_the_budget(resnet_shapes):
    stem, head = "trunk.stem.0.weight", "heads.depth.branches.0.0.weight"
    counts = erk_counts(resnet_shapes, 0.1, dense=[stem, head])
    assert counts[stem] == numel(resnet_shapes[stem]) and counts[head] == numel(resnet_shapes[head])
    total = sum(numel(s) for s in resnet_shapes.values())
    assert sum(counts.values()) == round(0.1 * total)
    free = erk_counts(resnet_shapes, 0.1)
    assert counts["trunk.layer4.1.conv2.weight"] < free["trunk.layer4.1.conv2.weight"]


def test_round_up_to_all_weights_makes_every_layer_dense():
    shapes = {"a": (3, 3), "b": (4, 4)}
    assert erk_counts(shapes, 0.99) == {"a": 9, "b": 16}  # round(0.99 * 25) = 25


@pytest.mark.parametrize("density", [0.0, 1.0, -0.1, 1.5, True, "0.5"])
def test_bad_density(density):
    with pytest.raises(ValueError, match="density must be"):
        erk_counts({"a": (4, 4)}, density)


def test_other_errors():
    with pytest.raises(ValueError, match="more than the"):
        erk_counts({"a": (10, 10), "b": (2, 2)}, 0.5, dense=["a"])
    with pytest.raises(ValueError, match="not in shapes"):
        erk_counts({"a": (4, 4)}, 0.5, dense=["nope"])
    with pytest.raises(ValueError, match="power must be"):
        erk_counts({"a": (4, 4)}, 0.5, power=-1.0)
    with pytest.raises(ValueError, match="shapes is empty"):
        erk_counts({}, 0.5)
    with pytest.raises(ValueError, match="no weights"):
        erk_counts({"a": (0, 4)}, 0.5)


def test_random_masks_exact_and_seeded(resnet_shapes):
    counts = erk_counts(resnet_shapes, 0.2)
    masks = random_masks(resnet_shapes, counts, seed=3)
    assert list(masks) == list(resnet_shapes)
    for fqn, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == resnet_shapes[fqn]
        assert int(mask.sum()) == counts[fqn]
    again = random_masks(resnet_shapes, counts, seed=3)
    assert all(torch.equal(masks[f], again[f]) for f in masks)
    other = random_masks(resnet_shapes, counts, seed=4)
    assert not all(torch.equal(masks[f], other[f]) for f in masks)


def test_random_masks_errors():
    with pytest.raises(ValueError, match="missing"):
        random_masks({"a": (2, 2), "b": (2,)}, {"a": 1}, seed=0)
    with pytest.raises(ValueError, match=r"in \[0, 4\]"):
        random_masks({"a": (2, 2)}, {"a": 5}, seed=0)
