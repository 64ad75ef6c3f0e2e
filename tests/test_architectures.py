"""One suite over every supported architecture, on tiny real models with planted register neurons."""

import pytest
import torch

from test_time_registers import LegacyEdit, ModifiedModel, PaperEdit, find_register_neurons
from test_time_registers.hooks import _first_tensor
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.planting import marker_images, plant_register_neurons
from tests.tiny_models import ARCHITECTURES, IMAGE_SIZE, LAYERS, hook_count

PLANTED_LAYER = 1



@pytest.fixture(params=ARCHITECTURES, ids=lambda a: a.name)
def arch(request):
    return request.param


@pytest.fixture
def hook_manager(arch):
    return arch.hook_manager(arch.build())


@pytest.fixture
def pixels(hook_manager):
    return marker_images(4, IMAGE_SIZE, hook_manager.patch_size[0], seed=5).pixel_values


def test_the_layout_is_read_from_the_model(arch, hook_manager, pixels):
    layout = hook_manager.layout
    assert (layout.num_cls, layout.num_trained_registers) == (arch.num_cls, arch.num_trained_registers)
    with torch.no_grad(), hook_manager.capture(residual=[0]) as cap:
        hook_manager.forward_images(pixels)
    rows, cols = hook_manager.grid_shape(pixels)
    assert layout.num_patches(cap.residual[0].shape[1]) == rows * cols


def test_every_declared_site_resolves_and_fires_once_per_layer(hook_manager, pixels):
    calls = {}

    def count(site, layer):
        def record(tensor):
            calls[(site, layer)] = calls.get((site, layer), 0) + 1
            assert tensor.shape[0] == len(pixels)
        return record

    with torch.no_grad(), hook_manager.hooks() as hooks:
        for layer in range(LAYERS):
            hooks.on_neurons(layer, count("neurons", layer))
            hooks.on_block_output(layer, count("residual", layer))
            hooks.on_attention(layer, count("attention", layer))
        hooks.on(hook_manager.register_insertion_site(), count("insertion", 0))
        hooks.on(hook_manager.register_removal_site(), count("removal", 0))
        hook_manager.forward_images(pixels)
    expected = {(site, layer): 1 for site in ("neurons", "residual", "attention") for layer in range(LAYERS)}
    expected.update({("insertion", 0): 1, ("removal", 0): 1})
    assert calls == expected
    assert hook_count(hook_manager.model) == 0


def test_identity_edits_are_bit_identical_and_perturbing_edits_are_not(hook_manager, pixels):
    with torch.no_grad():
        plain = _first_tensor(hook_manager.forward_images(pixels))
        with hook_manager.hooks() as hooks:
            for layer in range(LAYERS):
                hooks.on_neurons(layer, torch.clone)
                hooks.on_block_output(layer, torch.clone)
            hooks.on(hook_manager.register_insertion_site(), torch.clone)
            hooks.on(hook_manager.register_removal_site(), torch.clone)
            identical = _first_tensor(hook_manager.forward_images(pixels))
        with hook_manager.hooks() as hooks:
            hooks.on_neurons(2, lambda acts: acts * 1.5)
            perturbed = _first_tensor(hook_manager.forward_images(pixels))
    assert torch.equal(identical, plain)
    assert not torch.equal(perturbed, plain)   # deit3 layer scale (1e-6) keeps the change tiny, but it is there


def test_attention_capture_gives_probabilities_and_restores_the_fast_path(hook_manager, pixels):
    model = hook_manager.model
    settings = lambda: [(getattr(m, "fused_attn", None), getattr(getattr(m, "config", None), "_attn_implementation",  # noqa: E731
                         None)) for m in model.modules()]
    before = settings()
    with torch.no_grad():
        plain = _first_tensor(hook_manager.forward_images(pixels))
        with hook_manager.capture(attention=list(range(LAYERS))) as cap:
            captured_output = _first_tensor(hook_manager.forward_images(pixels))
    assert settings() == before
    for layer in range(LAYERS):
        probabilities = cap.attention[layer]
        seq_len = probabilities.shape[-1]
        assert probabilities.shape[0] == len(pixels) and probabilities.shape[-2] == seq_len
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))
    torch.testing.assert_close(captured_output, plain, atol=1e-5, rtol=1e-5)


def test_planted_neurons_are_found_and_the_register_takes_over(arch, hook_manager):
    patch = hook_manager.patch_size[0]
    planted = plant_register_neurons(hook_manager, marker_images(24, IMAGE_SIZE, patch, seed=0), PLANTED_LAYER, 3)
    held_out = marker_images(24, IMAGE_SIZE, patch, seed=1)
    neurons = find_register_neurons(hook_manager, held_out.pixel_values, top_k=3, progress=False)
    assert sorted(neurons.pairs()) == planted
    assert neurons.highest_layer == PLANTED_LAYER

    before = measure_outliers(hook_manager, held_out.pixel_values)
    modified = ModifiedModel(hook_manager.model, hook_manager, neurons, num_registers=1)
    after = measure_outliers(modified.hook_manager, held_out.pixel_values)
    assert before.worst_max_over_median >= 10
    assert after.worst_max_over_median <= 2
    assert after.register_over_median >= 10

    with torch.no_grad():
        together = _first_tensor(modified.forward_images(held_out.pixel_values[:6]))
        alone = torch.cat([_first_tensor(modified.forward_images(held_out.pixel_values[i:i + 1])) for i in range(6)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert hook_count(hook_manager.model) == 0


def test_trained_registers_and_cls_are_never_outliers_and_keep_their_activations(arch, hook_manager):
    patch = hook_manager.patch_size[0]
    planted = plant_register_neurons(hook_manager, marker_images(24, IMAGE_SIZE, patch, seed=0), PLANTED_LAYER, 3)
    images = marker_images(8, IMAGE_SIZE, patch, seed=2).pixel_values
    columns = [neuron for _, neuron in planted]
    unedited = ModifiedModel(hook_manager.model, hook_manager, [], num_registers=1)
    modified = ModifiedModel(hook_manager.model, hook_manager, planted, num_registers=1)
    with torch.no_grad():
        with unedited.capture(neurons=[PLANTED_LAYER]) as before:
            unedited.forward_images(images)
        with modified.capture(neurons=[PLANTED_LAYER]) as after:
            modified.forward_images(images)
    layout = modified.layout
    trained = layout.trained_registers()
    original = before.neurons[PLANTED_LAYER][:, :, columns]
    edited = after.neurons[PLANTED_LAYER][:, :, columns]
    assert torch.equal(edited[:, trained], original[:, trained])
    assert torch.equal(edited[:, layout.cls()], torch.zeros_like(edited[:, layout.cls()]))
    seq_len = edited.shape[1]
    moved_from = layout.mask(seq_len, cls=True, patches=True)      # the maximum is over CLS and patches only
    torch.testing.assert_close(edited[:, layout.test_time_registers(seq_len)].squeeze(1),
                               original[:, moved_from].amax(dim=1))


@pytest.mark.parametrize("edit", [LegacyEdit("mean"), LegacyEdit("only_outliers"), PaperEdit("mean"),
                                  PaperEdit("only_outliers")], ids=repr)
def test_every_edit_and_scale_leaves_trained_registers_alone(arch, hook_manager, edit):
    images = marker_images(4, IMAGE_SIZE, hook_manager.patch_size[0], seed=3).pixel_values
    neurons = [(1, 5), (1, 9), (2, 4)]
    unedited = ModifiedModel(hook_manager.model, hook_manager, [], num_registers=2)
    modified = ModifiedModel(hook_manager.model, hook_manager, neurons, num_registers=2, edit=edit, scale=[1.0, 0.5])
    with torch.no_grad():
        with unedited.capture(neurons=[1]) as before:
            unedited.forward_images(images)
        with modified.capture(neurons=[1]) as after:
            modified.forward_images(images)
    layout, original, edited = modified.layout, before.neurons[1][:, :, [5, 9]], after.neurons[1][:, :, [5, 9]]
    seq_len = edited.shape[1]
    assert torch.equal(edited[:, layout.trained_registers()], original[:, layout.trained_registers()])
    registers = edited[:, layout.test_time_registers(seq_len)]                 # [B, 2, 2]
    if isinstance(edit, LegacyEdit):
        assert torch.equal(edited[:, layout.cls()], original[:, layout.cls()])   # the reference leaves CLS alone
        flat = original.reshape(len(images), -1)
        peak = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True))          # one signed maximum per image
        torch.testing.assert_close(registers, peak[:, :, None] * torch.tensor([1.0, 0.5])[None, :, None].expand(-1, -1, 2))
    else:
        peaks = original[:, layout.mask(seq_len, cls=True, patches=True)].amax(dim=1)   # [B, 2]
        for column, register in enumerate(modified.get_buffer("_registers_1").tolist()):   # neurons 5, 9
            torch.testing.assert_close(registers[:, register, column], peaks[:, column] * (1.0, 0.5)[register])


def test_no_neurons_and_no_registers_is_bit_identical(hook_manager, pixels):
    modified = ModifiedModel(hook_manager.model, hook_manager, [], num_registers=0)
    args, kwargs = hook_manager.model_inputs(pixels)
    with torch.no_grad():
        assert torch.equal(_first_tensor(modified.forward_images(pixels)),
                           _first_tensor(hook_manager.forward_images(pixels)))
        assert torch.equal(_first_tensor(modified(*args, **kwargs)), _first_tensor(hook_manager.model(*args, **kwargs)))
