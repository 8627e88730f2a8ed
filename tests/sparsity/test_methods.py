"""Each pruning method on a tiny model: exact sparsity and the semantics of its baseline."""

import pytest
import torch

from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity import METHODS, prune
from dsparse.tasks import build_tasks

from .test_distributed_masks import make_batches

TASKS = ["seg", "depth", "edge"]


@pytest.fixture
def model_and_tasks():
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=4, head_dilations=(1,))
    return model, tasks


@pytest.mark.parametrize("method", ["disparse", "snip", "random", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_every_method_hits_the_exact_sparsity(model_and_tasks, method, sparsity):
    model, tasks = model_and_tasks
    masks = prune(model, tasks, iter(make_batches(2)), method=method, sparsity=sparsity, num_batches=2)
    assert masks.num_kept == round((1 - sparsity) * masks.num_total)
    assert masks.meta["method"] == method


def test_magnitude_is_global_top_k_of_absolute_weights(model_and_tasks):
    model, tasks = model_and_tasks
    masks = prune(model, tasks, None, method="magnitude", sparsity=0.8, min_density=0)  # no layer floors
    weights = prunable_parameters(model)
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    threshold = flat.sort(descending=True).values[masks.num_kept - 1]
    for name, weight in weights.items():
        kept = weight.detach().abs()[masks.masks[name]]
        pruned = weight.detach().abs()[~masks.masks[name]]
        assert bool((kept >= threshold).all()) and bool((pruned <= threshold).all()), name


def test_random_depends_on_the_seed_only(model_and_tasks):
    model, tasks = model_and_tasks
    first = prune(model, tasks, None, method="random", sparsity=0.7, seed=1)
    again = prune(model, tasks, None, method="random", sparsity=0.7, seed=1)
    other = prune(model, tasks, None, method="random", sparsity=0.7, seed=2)
    assert first.digest() == again.digest() != other.digest()


def test_disparse_differs_from_joint_snip_and_keeps_what_a_task_needs(model_and_tasks):
    model, tasks = model_and_tasks
    batches = make_batches(2)
    disparse = prune(model, tasks, iter(batches), method="disparse", sparsity=0.9, num_batches=2)
    joint = prune(model, tasks, iter(batches), method="snip", sparsity=0.9, num_batches=2)
    assert disparse.digest() != joint.digest()
    # the vote: every kept shared weight was kept by at least one task before the vote
    for name, mask in disparse.masks.items():
        voters = [t for t, per_layer in disparse.task_masks.items() if name in per_layer]
        union = torch.zeros_like(mask)
        for task in voters:
            union |= disparse.task_masks[task][name]
        assert torch.equal(mask, union), name


def test_pretrained_disparse_defaults_to_grad_w2(model_and_tasks):
    model, tasks = model_and_tasks
    masks = prune(model, tasks, iter(make_batches(1)), method="disparse", sparsity=0.5, num_batches=1,
                  pretrained=True)
    assert masks.meta["criterion"] == "grad_w2"


@pytest.mark.parametrize("pretrained_criterion", ["magnitude", "grad_w2"])
def test_pretrained_criterion_setting_chooses_disparse_scoring_of_a_trained_model(model_and_tasks,
                                                                                 pretrained_criterion):
    """The original release prunes trained NYU-v2/Cityscapes models by magnitude, Taskonomy by grad_w2."""
    from dsparse.config import SparsityConfig
    from dsparse.sparsity.methods import MaskInputs, get_method

    model, tasks = model_and_tasks
    batches = make_batches(2)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    settings = SparsityConfig(method="disparse", target=0.6, num_batches=2, pretrained_criterion=pretrained_criterion)
    inputs = MaskInputs(tasks, settings, batches=lambda: iter(batches), pretrained=lambda: trained)
    masks = get_method("disparse").initial_masks(model, inputs)
    expected = prune(model, tasks, iter(batches), method="disparse", sparsity=0.6, num_batches=2,
                     criterion=pretrained_criterion)
    assert masks.meta["criterion"] == pretrained_criterion and masks.digest() == expected.digest()
    at_init = get_method("disparse").initial_masks(model, MaskInputs(tasks, settings, batches=lambda: iter(batches)))
    assert at_init.meta["criterion"] == "snip", "pretrained_criterion does not apply at initialization"
    snip = get_method("snip").initial_masks(model, MaskInputs(tasks, SparsityConfig(
        method="snip", target=0.6, num_batches=2, pretrained_criterion="magnitude"),
        batches=lambda: iter(batches), pretrained=lambda: trained))
    assert snip.meta["criterion"] == "snip", "a baseline keeps its own criterion"


def test_presets_prune_trained_models_as_the_original_release():
    from dsparse.config import load_config

    assert {name: load_config(name).sparsity.pretrained_criterion for name in ("nyuv2", "cityscapes", "taskonomy")} \
        == {"nyuv2": "magnitude", "cityscapes": "magnitude", "taskonomy": "grad_w2"}
    with pytest.raises(ValueError, match="sparsity.pretrained_criterion must be one of"):
        load_config("nyuv2", ["sparsity.pretrained_criterion=taylor"])


def test_keep_first_dense_is_reported_and_counted(model_and_tasks):
    model, tasks = model_and_tasks
    masks = prune(model, tasks, None, method="magnitude", sparsity=0.9, keep_first_dense=True)
    first = next(iter(prunable_parameters(model)))
    assert masks.meta["dense_layers"] == [first] and bool(masks.masks[first].all())
    assert masks.num_kept == round(0.1 * masks.num_total)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "obd"}, r"unknown pruning method 'obd'; known methods: \['adapmtl', 'disparse'"),
    ({"method": "snip", "criterion": "grad_w2"}, "always scores by 'snip'"),
    ({"method": "disparse", "criterion": "taylor"}, "taylor"),
    ({"method": "disparse", "sparsity": 1.0}, r"sparsity must be in \(0, 1\)"),
    ({"method": "disparse", "num_batches": 5}, "needs 5 batches but the data gave only 2"),
])
def test_method_errors(model_and_tasks, kwargs, message):
    model, tasks = model_and_tasks
    arguments = {"sparsity": 0.5, "num_batches": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        prune(model, tasks, iter(make_batches(2)), **arguments)


def test_registry_lists_the_methods():
    assert {"disparse", "snip", "random", "magnitude", "lottery"} <= set(METHODS)


def test_score_init_xavier_scores_an_explicitly_reinitialised_copy(model_and_tasks):
    from copy import deepcopy

    from dsparse.config import SparsityConfig
    from dsparse.sparsity.methods import MaskInputs, get_method

    model, tasks = model_and_tasks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = make_batches(2)
    settings = SparsityConfig(method="disparse", target=0.8, num_batches=2, score_init="xavier")
    inputs = MaskInputs(tasks, settings, seed=3, batches=lambda: iter(batches))
    masks = get_method("disparse").initial_masks(model, inputs)
    explicit = deepcopy(model)
    torch.manual_seed(3)
    for module in explicit.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.xavier_normal_(module.weight)
    expected = prune(explicit, tasks, iter(batches), method="disparse", sparsity=0.8, num_batches=2, seed=3)
    assert masks.digest() == expected.digest()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the trained weights are untouched"
    own = prune(model, tasks, iter(batches), method="disparse", sparsity=0.8, num_batches=2, seed=3)
    assert own.digest() != masks.digest()


def test_score_init_xavier_without_an_effect_is_refused():
    from dsparse.config import SparsityConfig

    with pytest.raises(ValueError, match="no effect with method 'random'"):
        SparsityConfig(method="random", score_init="xavier")
