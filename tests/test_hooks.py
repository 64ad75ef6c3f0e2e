import pytest
import torch

from test_time_registers import StopForward
from tests.tiny_models import hook_count



def test_capture_shapes_and_attention_rows(clip_hm, pixels):
    with torch.no_grad(), clip_hm.capture(neurons=[0, 2], residual=[1], attention=[2]) as cap:
        clip_hm.forward_images(pixels)
    assert cap.neurons[0].shape == (5, 17, 256)
    assert cap.residual[1].shape == (5, 17, 64)
    assert cap.patches("residual", 1).shape == (5, 16, 64)
    attention = cap.attention[2]
    assert attention.shape == (5, 2, 17, 17)
    torch.testing.assert_close(attention.sum(-1), torch.ones(5, 2, 17))
    assert not any(t.requires_grad for t in (*cap.neurons.values(), attention))
    assert hook_count(clip_hm.model) == 0


def test_attention_capture_matches_the_attention_module(clip_hm, pixels):
    block = clip_hm.blocks[1]
    with torch.no_grad(), clip_hm.capture(residual=[0], attention=[1]) as cap:
        clip_hm.forward_images(pixels)
    normed = block.ln_1(cap.residual[0])
    _, expected = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(cap.attention[1], expected)


def test_capture_does_not_change_the_output(clip_hm, pixels):
    with torch.no_grad():
        plain = clip_hm.forward_images(pixels)
        with clip_hm.capture(neurons=[0], residual=[0, 1, 2]):
            hooked = clip_hm.forward_images(pixels)
    assert torch.equal(plain, hooked)


def test_hooks_are_removed_after_an_exception_and_user_hooks_survive(clip_hm, pixels):
    calls = []
    user_handle = clip_hm.blocks[1].register_forward_hook(lambda *a: calls.append("user"))
    before = hook_count(clip_hm.model)

    def explode(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with clip_hm.hooks() as hooks:
            hooks.on_block_output(1, explode)
            hooks.on_neurons(0, lambda a: None)
            hooks.on_attention(2, lambda p: None)
            clip_hm.forward_images(pixels)
    assert hook_count(clip_hm.model) == before
    calls.clear()
    clip_hm.forward_images(pixels)
    assert calls == ["user"]
    user_handle.remove()
    assert hook_count(clip_hm.model) == 0


def test_stop_after_block_skips_later_blocks(clip_hm, pixels):
    ran = []
    with clip_hm.hooks() as hooks:
        for layer in range(3):
            hooks.on_block_output(layer, lambda x, layer=layer: ran.append(layer))
        hooks.stop_after_block(1)
        with pytest.raises(StopForward):
            clip_hm.forward_images(pixels)
    assert ran == [0, 1]


def test_a_returned_tensor_replaces_the_site(clip_hm, pixels):
    with torch.no_grad():
        with clip_hm.hooks() as hooks:
            hooks.on_neurons(2, torch.zeros_like)
            zeroed = clip_hm.forward_images(pixels)
        plain = clip_hm.forward_images(pixels)
    assert not torch.equal(zeroed, plain)


def test_capture_rejects_layers_out_of_range(clip_hm):
    with pytest.raises(ValueError, match="0..2"):
        clip_hm.capture(residual=[3])
