import pytest
import torch

from test_time_registers import InvalidArgumentError, LegacyEdit, ModifiedModel, PaperEdit
from tests.tiny_models import hook_count

NEURONS = [(1, 7), (1, 30), (2, 100)]



def test_no_neurons_and_no_registers_is_bit_identical(clip_model, clip_hm, pixels):
    modified = ModifiedModel(clip_model, clip_hm, [], num_registers=0)
    text = torch.randint(0, 100, (5, 8))
    with torch.no_grad():
        assert torch.equal(modified.encode_image(pixels), clip_model.encode_image(pixels))
        for got, want in zip(modified(pixels, text), clip_model(pixels, text)):
            assert torch.equal(got, want)


def test_registers_never_leak_into_outputs(clip_model, clip_hm, pixels):
    clip_model.visual.output_tokens = True
    modified = ModifiedModel(clip_model, clip_hm, NEURONS, num_registers=3)
    with torch.no_grad():
        pooled, tokens = modified.encode_image(pixels)
        plain_pooled, plain_tokens = clip_model.encode_image(pixels)
    assert pooled.shape == plain_pooled.shape and tokens.shape == plain_tokens.shape == (5, 16, 64)
    assert modified.register_tokens.shape == (5, 3, 64)
    assert not torch.equal(pooled, plain_pooled)
    assert hook_count(clip_model) == 0


def test_batch_invariance(clip_model, clip_hm, pixels):
    for options in ({}, {"edit": LegacyEdit("mean")}, {"num_registers": 2, "scale": [1.0, 0.5]}):
        modified = ModifiedModel(clip_model, clip_hm, NEURONS, **options)
        with torch.no_grad():
            together = modified.encode_image(pixels)
            registers = modified.register_tokens
            alone = [modified.encode_image(pixels[i:i + 1]) for i in range(5)]
        torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
        assert registers.shape[0] == 5


def test_edit_seen_by_a_capture_inside_the_intervention(clip_model, clip_hm, pixels):
    modified = ModifiedModel(clip_model, clip_hm, NEURONS, num_registers=1)
    # Layer 1's activations before the edit are those of a model with one register and no edit.
    unedited = ModifiedModel(clip_model, clip_hm, [], num_registers=1)
    with torch.no_grad():
        with unedited.capture(neurons=[1]) as before:
            unedited.forward_images(pixels)
        with modified.capture(neurons=[1]) as after:
            modified.forward_images(pixels)
    edited = after.neurons[1]                                  # [B, 16 patches + CLS + 1 register, 256]
    assert edited.shape == (5, 18, 256)
    assert torch.equal(edited[:, :17, [7, 30]], torch.zeros(5, 17, 2))
    assert torch.equal(edited[:, 17, [7, 30]], before.neurons[1][:, :, [7, 30]].amax(dim=1))
    untouched = [i for i in range(256) if i not in (7, 30)]
    assert torch.equal(edited[:, :, untouched], before.neurons[1][:, :, untouched])
    assert after.patches("neurons", 1).shape == (5, 16, 256)


def test_registers_appended_after_the_positional_embedding_as_zeros(clip_model, clip_hm, pixels):
    modified = ModifiedModel(clip_model, clip_hm, [], num_registers=2)
    seen = {}
    handle = clip_model.visual.ln_pre.register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
    try:
        with torch.no_grad():
            modified.encode_image(pixels)
    finally:
        handle.remove()
    assert seen["inp"].shape == (5, 19, 64)
    assert torch.equal(seen["inp"][:, 17:], torch.zeros(5, 2, 64))
    ln_pre = clip_model.visual.ln_pre
    torch.testing.assert_close(seen["out"][:, 17:], ln_pre.bias.expand(5, 2, 64))


def test_wrong_arguments(clip_model, clip_hm):
    from test_time_registers.clip import ClipHookManager
    from tests.conftest import tiny_clip

    with pytest.raises(InvalidArgumentError, match="num_registers"):
        ModifiedModel(clip_model, clip_hm, NEURONS, num_registers=-1)
    with pytest.raises(InvalidArgumentError, match="normal_values"):
        ModifiedModel(clip_model, clip_hm, NEURONS, edit=PaperEdit("median"))
    with pytest.raises(InvalidArgumentError, match="edit must be callable"):
        ModifiedModel(clip_model, clip_hm, NEURONS, edit="legacy")
    with pytest.raises(InvalidArgumentError, match="scale"):
        ModifiedModel(clip_model, clip_hm, NEURONS, num_registers=2, scale=[1.0])
    with pytest.raises(InvalidArgumentError, match="does not describe"):
        ModifiedModel(tiny_clip(), clip_hm, NEURONS)
    with pytest.raises(AttributeError):
        ModifiedModel(clip_model, ClipHookManager(clip_model.visual), NEURONS).encode_image


def test_a_plain_callable_is_an_edit_with_the_same_signature(clip_model, clip_hm, pixels):
    calls = []

    def halve(activations, neurons, layout, context):
        calls.append((context.layer, tuple(neurons.tolist()), layout.num_test_time_registers, activations.shape))
        return activations * 0.5

    modified = ModifiedModel(clip_model, clip_hm, NEURONS, num_registers=2, edit=halve)
    with torch.no_grad():
        modified.encode_image(pixels)
    assert calls == [(1, (7, 30), 2, (5, 19, 256)), (2, (100,), 2, (5, 19, 256))]
    assert "edit=<function" in repr(modified) and "scale=[1.0, 1.0]" in repr(modified)
