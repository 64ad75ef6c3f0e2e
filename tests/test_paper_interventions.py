"""The paper's other interventions as edits: replacement ablations, moving outliers to chosen patches,
the attention-bias variant; on hand-computed tensors, the demo and every architecture."""

import pytest
import torch

from test_time_registers import InvalidArgumentError, ModifiedModel, PaperEdit, TokenLayout
from test_time_registers.hooks import _first_tensor
from test_time_registers.edits import AttentionBiasEdit, EditContext, MoveToPatchesEdit, normal_values_for, patch_mask
from test_time_registers.intervention import calibrate_attention_bias
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.planting import marker_images, plant_register_neurons
from tests.tiny_models import ARCHITECTURES, IMAGE_SIZE, LAYERS, hook_count

LAYOUT = TokenLayout(num_cls=1)   # [CLS][4 patches]
CONTEXT = EditContext(layer=3, register_of_neuron=torch.zeros(2, dtype=torch.long), scale=torch.ones(0))


def _activations():
    """[2 images, CLS + 4 patches, 3 neurons]; neurons 0 and 2 are register neurons."""
    acts = torch.arange(30, dtype=torch.float32).reshape(2, 5, 3)
    acts[0, 2, 0] = 100.0
    acts[1, 4, 2] = 80.0
    return acts


def test_shuffled_moves_each_images_values_among_its_own_tokens():
    values = _activations()
    patches = LAYOUT.parts(5, patches=True)
    shuffled = normal_values_for(values, patches, "shuffled", torch.Generator().manual_seed(0))
    assert torch.equal(shuffled[:, 0], values[:, 0])                      # outside the patches: unchanged
    for image in range(2):
        before, after = values[image, 1:], shuffled[image, 1:]
        assert not torch.equal(before, after)
        assert torch.equal(after.sort(dim=0).values, before.sort(dim=0).values)   # same values, other tokens
        order = [int((before[:, 0] == value).nonzero()) for value in after[:, 0]]
        assert torch.equal(after, before[order])                           # one permutation for all neurons
    again = normal_values_for(values, patches, "shuffled", torch.Generator().manual_seed(0))
    assert torch.equal(again, shuffled)


def test_shuffled_over_parts_apart_leaves_the_tokens_between_alone():
    layout = TokenLayout(num_cls=1, num_trained_registers=2)
    values = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    parts = layout.parts(7, cls=True, patches=True)                       # CLS and 4 patches, registers between
    assert parts == (slice(0, 1), slice(3, 7))
    shuffled = normal_values_for(values, parts, "shuffled", torch.Generator().manual_seed(1))
    assert torch.equal(shuffled[:, 1:3], values[:, 1:3])                 # trained registers untouched
    moved = torch.cat([shuffled[:, :1], shuffled[:, 3:]], dim=1)
    original = torch.cat([values[:, :1], values[:, 3:]], dim=1)
    assert torch.equal(moved.sort(dim=1).values, original.sort(dim=1).values) and not torch.equal(moved, original)


def test_noise_has_each_images_mean_and_std():
    values = torch.randn(2, 4001, 3) * torch.tensor([1.0, 5.0, 0.2]) + torch.tensor([3.0, -2.0, 0.0])
    noise = normal_values_for(values, (slice(0, 4001),), "noise", torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise.mean(dim=1), values.mean(dim=1), atol=0.2, rtol=0.05)
    torch.testing.assert_close(noise.std(dim=1), values.std(dim=1), atol=0.05, rtol=0.05)
    assert not torch.equal(noise, values)


@pytest.mark.parametrize("mode", ["noise", "shuffled"])
def test_random_replacements_are_seeded_per_layer(mode):
    acts = _activations()
    neurons = torch.tensor([0, 2])
    layout = LAYOUT.with_test_time_registers(0)
    first = PaperEdit(mode, seed=4)(acts.clone(), neurons, layout, CONTEXT)
    assert torch.equal(PaperEdit(mode, seed=4)(acts.clone(), neurons, layout, CONTEXT), first)
    assert not torch.equal(PaperEdit(mode, seed=5)(acts.clone(), neurons, layout, CONTEXT), first)
    assert torch.equal(first[:, :, 1], acts[:, :, 1])                    # other neurons untouched


def test_patch_mask_corners_and_boxes():
    assert patch_mask((3, 4), corner="top-left").nonzero().tolist() == [[0, 0]]
    assert patch_mask((3, 4), corner="bottom-right", size=2).nonzero().tolist() == [[1, 2], [1, 3], [2, 2], [2, 3]]
    # a 64 x 64 image of 16-px patches: a box over pixels 20..40 x 0..10 touches patch columns 1, 2 and row 0
    assert patch_mask((4, 4), boxes=[(20, 0, 40, 10)], image_size=(64, 64)).nonzero().tolist() == [[0, 1], [0, 2]]
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        patch_mask((4, 4))
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        patch_mask((2, 2), corner="top-left", size=3)
    with pytest.raises(InvalidArgumentError, match="inside"):
        patch_mask((4, 4), boxes=[(0, 0, 80, 10)], image_size=(64, 64))


def test_move_to_patches_writes_each_maximum_to_the_chosen_patches():
    acts = _activations()
    neurons = torch.tensor([0, 2])
    edit = MoveToPatchesEdit(patches=patch_mask((2, 2), corner="bottom-right"))
    edited = edit(acts.clone(), neurons, LAYOUT, CONTEXT)
    expected = acts.clone()
    expected[:, :, [0, 2]] = 0.0
    expected[:, 4, [0, 2]] = acts[:, :, [0, 2]].amax(dim=1)   # patch 3 is the bottom-right one, token 4
    assert torch.equal(edited, expected)
    per_image = torch.tensor([[True, False, False, False], [False, True, True, False]])
    edited = MoveToPatchesEdit(patches=per_image, scale=0.5)(acts.clone(), neurons, LAYOUT, CONTEXT)
    assert edited[0, 1, 0] == 50.0 and edited[1, 2, 2] == edited[1, 3, 2] == 40.0
    assert int((edited[:, :, [0, 2]] != 0).sum()) == 6
    with pytest.raises(InvalidArgumentError, match="3 images"):
        MoveToPatchesEdit(patches=per_image)(torch.zeros(3, 5, 3), neurons, LAYOUT, CONTEXT)
    with pytest.raises(InvalidArgumentError, match="at least one patch"):
        MoveToPatchesEdit(patches=torch.zeros(2, 2, dtype=torch.bool))


def test_move_to_patches_on_the_demo_puts_the_outliers_in_the_corner(demo):
    from test_time_registers.clip import ClipHookManager

    model, preprocess, planted, images = demo
    hm = ClipHookManager(model)
    pixels = torch.stack([preprocess(image) for image in images[:6]])
    grid = hm.grid_shape(pixels)
    modified = ModifiedModel(model, hm, planted, num_registers=0,
                             edit=MoveToPatchesEdit(patches=patch_mask(grid, corner="top-left")))
    with torch.no_grad(), hm.capture(residual=[hm.num_layers - 1]) as plain:
        hm.forward_images(pixels)
    with torch.no_grad(), modified.capture(residual=[hm.num_layers - 1]) as moved:
        modified.forward_images(pixels)
    for captured in (plain, moved):
        norms = captured.patches("residual", hm.num_layers - 1).norm(dim=-1)       # [B, P]
        captured.top = norms.argmax(dim=1)
        captured.ratio = norms.amax(dim=1) / norms.median(dim=1).values
    assert (plain.top != 0).all() and (plain.ratio > 10).all()
    assert (moved.top == 0).all() and (moved.ratio > 10).all()   # the outlier is now the corner patch
    assert hook_count(model) == 0


def test_attention_bias_pins_the_registers_attention_input_and_zeroes_the_neurons(demo):
    from test_time_registers.clip import ClipHookManager

    model, preprocess, planted, images = demo
    hm = ClipHookManager(model)
    calibration = torch.stack([preprocess(image) for image in images[:16]])
    edit = calibrate_attention_bias(hm, planted, calibration)
    assert edit.attention_inputs.shape == (hm.num_layers, model.visual.transformer.width)
    assert torch.isfinite(edit.attention_inputs).all()
    pixels = torch.stack([preprocess(image) for image in images[16:24]])
    biased = ModifiedModel(model, hm, planted, num_registers=1, edit=edit)
    layer = planted[0][0]
    seen = {}
    with torch.no_grad(), hm.hooks() as hooks, biased.capture(neurons=[layer]) as captured:
        for block in range(hm.num_layers):
            hooks.on(hm.attention_input_site(block), lambda tokens, block=block: seen.__setitem__(block, tokens))
        biased.forward_images(pixels)
    for block in range(hm.num_layers):
        torch.testing.assert_close(seen[block][:, -1], edit.attention_inputs[block].expand(len(pixels), -1))
    columns = [neuron for _, neuron in planted]
    assert torch.equal(captured.neurons[layer][:, :, columns], torch.zeros_like(captured.neurons[layer][:, :, columns]))

    # The paper's point: the bias keeps the model close to the one with a test-time register, where
    # zeroing the neurons alone does not.
    register = ModifiedModel(model, hm, planted, num_registers=1)
    zeroed = ModifiedModel(model, hm, planted, num_registers=0)
    with torch.no_grad():
        reference, with_bias, without = (run.forward_images(pixels) for run in (register, biased, zeroed))
    distance = lambda a: (1 - torch.nn.functional.cosine_similarity(a, reference)).mean()  # noqa: E731
    assert distance(with_bias) < distance(without)
    after = measure_outliers(biased.hook_manager, pixels)
    assert after.worst_max_over_median <= 2
    assert hook_count(model) == 0


def test_attention_bias_needs_one_register_and_calibrated_inputs(clip_model, clip_hm):
    edit = AttentionBiasEdit(attention_inputs=torch.zeros(clip_hm.num_layers, 64))
    with pytest.raises(InvalidArgumentError, match="num_registers=1"):
        with ModifiedModel(clip_model, clip_hm, [(0, 1)], num_registers=2, edit=edit).intervention():
            pass
    assert hook_count(clip_model) == 0
    with pytest.raises(InvalidArgumentError, match="calibrate_attention_bias"):
        AttentionBiasEdit()


@pytest.fixture(params=ARCHITECTURES, ids=lambda a: a.name)
def hook_manager(request):
    return request.param.hook_manager(request.param.build())


def test_every_architecture_declares_where_attention_can_be_written(hook_manager):
    """The attention-bias variant on each architecture: its site fires once per layer, and the bias
    brings planted outliers down like the register does."""
    patch = hook_manager.patch_size[0]
    planted = plant_register_neurons(hook_manager, marker_images(24, IMAGE_SIZE, patch, seed=0), 1, 3)
    images = marker_images(12, IMAGE_SIZE, patch, seed=1).pixel_values
    edit = calibrate_attention_bias(hook_manager, planted, images[:8])
    assert edit.attention_inputs.shape[0] == LAYERS and torch.isfinite(edit.attention_inputs).all()
    biased = ModifiedModel(hook_manager.model, hook_manager, planted, num_registers=1, edit=edit)
    with torch.no_grad():
        output = _first_tensor(biased.forward_images(images[8:]))
    assert torch.isfinite(output).all()
    assert measure_outliers(biased.hook_manager, images[8:]).worst_max_over_median <= 2
    assert hook_count(hook_manager.model) == 0


def test_top_k_auto_is_the_smallest_k_that_meets_the_target(demo):
    from test_time_registers import find_register_neurons
    from test_time_registers.clip import ClipHookManager

    model, preprocess, planted, images = demo
    hm = ClipHookManager(model)
    found = find_register_neurons(hm, images[:48], preprocess, top_k="auto", held_out=images[48:], max_top_k=16,
                                  progress=False)
    sweep = found.extra["top_k_auto"]
    ratios = dict(sweep["ratio_by_k"])
    k = len(found)
    assert sweep["met"] and ratios[k] <= 2.0
    assert all(ratio > 2.0 for tried, ratio in ratios.items() if tried < k)
    assert k - 1 in ratios or k == 1                      # the k just below was tried and missed
    assert sorted(found.pairs()) == sorted(planted)       # exactly the planted circuit
    # an unreachable target keeps every candidate, and says so in the result
    strict = find_register_neurons(hm, images[:48], preprocess, top_k="auto", held_out=images[48:56], max_top_k=4,
                                   target_ratio=1.0, progress=False)
    assert len(strict) == 4 and not strict.extra["top_k_auto"]["met"]
    with pytest.raises(InvalidArgumentError, match="held_out"):
        find_register_neurons(hm, images[:4], preprocess, top_k="auto")
    with pytest.raises(InvalidArgumentError, match="target_ratio"):
        find_register_neurons(hm, images[:4], preprocess, top_k="auto", held_out=images[4:8], target_ratio=0.5)
