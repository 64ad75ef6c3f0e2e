"""Discovery on the planted demo model: it must find exactly what was planted."""

import pytest
import torch

from test_time_registers.clip import ClipHookManager
from test_time_registers import LegacyEdit, ModifiedModel, NoOutliersError, find_register_neurons
from test_time_registers.analysis.metrics import measure_outliers
from tests.tiny_models import hook_count



@pytest.fixture(scope="module")
def found(demo):
    model, preprocess, planted, images = demo
    hm = ClipHookManager(model, name="demo")
    return hm, find_register_neurons(hm, images, preprocess, top_k=len(planted), progress=False)


def test_recovers_exactly_the_planted_neurons(demo, found):
    model, _, planted, images = demo
    hm, neurons = found
    assert sorted(neurons.pairs()) == sorted(planted)
    planted_layer = planted[0][0]
    assert neurons.highest_layer == planted_layer          # where the outliers first stand out
    assert neurons.detect_layer == hm.num_layers - 1
    assert neurons.threshold > 0 and neurons.extra["threshold_mode"] == "auto"
    assert neurons.images_seen == neurons.images_with_outliers == len(images)
    scores = [n.score for n in neurons]
    assert scores == sorted(scores, reverse=True)
    ratios = neurons.extra["outlier_norm_ratio_by_layer"]
    assert max(ratios[:planted_layer]) < 2 <= ratios[planted_layer]
    assert hook_count(model) == 0
    scores_by_layer = neurons.candidate_scores            # every candidate's score, [layers, neurons]
    assert scores_by_layer.shape[0] > neurons.highest_layer and scores_by_layer.shape[1] == hm.num_neurons(0)
    for item in neurons:
        assert scores_by_layer[item.layer, item.neuron].item() == pytest.approx(item.score)
    cut = torch.tensor([n.score for n in neurons]).min()
    assert int((scores_by_layer[:planted_layer + 1] >= cut).sum()) == len(planted)


def test_a_wider_search_still_ranks_the_planted_neurons_first(demo, found):
    _, preprocess, planted, images = demo
    hm, _ = found
    wide = find_register_neurons(hm, images[:32], preprocess, top_k=20, highest_layer=hm.num_layers - 1,
                                 score="abs", sparsity_filter=True, progress=False)
    assert sorted(wide.pairs()[:len(planted)]) == sorted(planted)
    # By construction (clip/demo.py), a planted neuron is GELU(G (is_top - 0.9)) with G >= 125 and
    # is_top ~ 2 on the outliers; the strongest other neuron there, block 3's step GELU(z), has z <= 28.
    assert min(n.score for n in wide[:len(planted)]) > 100 and max(n.score for n in wide[len(planted):]) < 30


def test_batch_size_does_not_change_the_result(demo, found):
    _, preprocess, planted, images = demo
    hm, _ = found
    # 40 images: batches of 1 and 8 hold images until 32 are in; one batch of 40 calibrates at once
    runs = [find_register_neurons(hm, images[:40], preprocess, top_k=len(planted), batch_size=size, progress=False)
            for size in (1, 8, 40)]
    for run in runs[1:]:
        assert run.pairs() == runs[0].pairs()
        assert run.threshold == pytest.approx(runs[0].threshold, rel=1e-5)
        assert run.images_with_outliers == runs[0].images_with_outliers == 40
        torch.testing.assert_close([n.score for n in run], [n.score for n in runs[0]], rtol=1e-4, atol=1e-4)
    few = find_register_neurons(hm, images[:5], preprocess, top_k=len(planted), batch_size=2, progress=False)
    assert sorted(few.pairs()) == sorted(planted) and few.images_seen == 5   # fewer than 32: calibrated on all


def test_a_folder_path_gives_the_same_neurons(tmp_path, demo, found):
    _, preprocess, planted, images = demo
    hm, neurons = found
    for index, image in enumerate(images[:16]):
        image.save(tmp_path / f"{index:03d}.png")
    (tmp_path / "readme.txt").write_text("skipped")
    from_folder = find_register_neurons(hm, tmp_path, preprocess, top_k=len(planted), progress=False)
    from_memory = find_register_neurons(hm, images[:16], preprocess, top_k=len(planted), progress=False)
    assert from_folder.pairs() == from_memory.pairs()
    assert from_folder.images_seen == 16


def test_the_test_time_register_takes_over_the_outliers(demo, found):
    model, preprocess, planted, images = demo
    hm, neurons = found
    before = measure_outliers(hm, images, preprocess)
    modified = ModifiedModel(model, hm, neurons, num_registers=1)
    after = measure_outliers(modified, images, preprocess)
    assert before.worst_max_over_median >= 10
    assert after.worst_max_over_median <= 2                 # every image
    assert after.register_over_median >= 10                 # the register carries the high norm
    assert after.cls_top_patch_attention < 0.5 * before.cls_top_patch_attention
    legacy = measure_outliers(ModifiedModel(model, hm, neurons, num_registers=1, edit=LegacyEdit()), images, preprocess)
    assert legacy.worst_max_over_median <= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_discovery_matches_float32(demo, dtype):
    from test_time_registers.clip.demo import build_demo_model

    _, preprocess, planted, images = demo
    full = find_register_neurons(ClipHookManager(build_demo_model(seed=0)[0]), images[:16], preprocess,
                                 top_k=len(planted), progress=False)
    reduced = find_register_neurons(ClipHookManager(build_demo_model(seed=0)[0].to(dtype)), images[:16], preprocess,
                                    top_k=len(planted), progress=False)
    assert sorted(reduced.pairs()) == sorted(planted)
    expected = {(n.layer, n.neuron): n.score for n in full}
    for item in reduced:   # summed in float32: only the activations themselves are rounded
        assert item.score == pytest.approx(expected[(item.layer, item.neuron)], rel=0.02)


def test_no_outliers_is_said_plainly_with_a_threshold_to_try(clip_hm):
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NoOutliersError, match=r"no high-norm outliers.*largest patch norm.*threshold=") as error:
        find_register_neurons(clip_hm, images, progress=False)
    assert "1." in str(error.value)          # the ratio of largest to median patch norm
    with pytest.raises(NoOutliersError, match="exceeded the threshold 1e\\+06"):
        find_register_neurons(clip_hm, images, threshold=1e6, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k"), ({"threshold": -1.0}, "threshold"), ({"threshold": "high"}, "threshold"),
    ({"score": "median"}, "score"), ({"detect_layer": 3}, "detect_layer"),
    ({"detect_layer": 1, "highest_layer": 2}, "cannot be after"), ({"device": "meta"}, "move the model"),
])
def test_bad_arguments(clip_hm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_register_neurons(clip_hm, torch.zeros(1, 3, 64, 64), progress=False, **kwargs)


def test_non_finite_activations_are_reported_as_such(clip_model, clip_hm):
    from test_time_registers import NonFiniteActivationsError

    with torch.no_grad():
        clip_model.visual.transformer.resblocks[1].mlp.c_proj.bias[0] = float("inf")
    with pytest.raises(NonFiniteActivationsError, match="NaN or infinite patch norms.*float32"):
        find_register_neurons(clip_hm, torch.randn(2, 3, 64, 64), progress=False)
