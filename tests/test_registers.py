"""Learned registers beside test-time ones: layouts at every block, CLS entering late, and every architecture.
Training them is tests/test_train.py; its command, tests/test_train_registers.py."""

import pytest
import torch

from test_time_registers import (InvalidArgumentError, LearnableRegisters, ModifiedModel, RegisteredModel,
                                 UnsupportedModelError, find_register_neurons)
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.clip import ClipHookManager
from test_time_registers.deit import DeitHookManager
from test_time_registers.edits import PaperEdit
from test_time_registers.hooks import HookSite
from test_time_registers.planting import marker_images, plant_register_neurons
from tests.tiny_models import ARCHITECTURES, IMAGE_SIZE, LAYERS, clip_model, hook_count, timm_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pixels():
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def deit3(seed: int = 0):
    """A tiny timm DeiT-III (no_embed_class, layer scale) and its hook manager."""
    model = timm_model("deit3_small_patch16_224", seed=seed)
    return model, DeitHookManager(model)


def manual_forward(model, pixels, registers: torch.Tensor, insert_at: int, cls_pos: int | None = None):
    """timm's forward written out, with ``registers`` [1, K, D] entering after the prefix at block ``insert_at``
    and CLS at block ``cls_pos``: what RegisteredModel must compute."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    batch, count = len(pixels), registers.shape[1]
    held = None
    if cls_pos is not None:
        held, tokens = tokens[:, :1], tokens[:, 1:]
    for index, block in enumerate(model.blocks):
        if index == cls_pos:
            tokens = torch.cat([held, tokens], dim=1)
        if index == insert_at:
            where = 1 if cls_pos is None or index >= cls_pos else 0
            tokens = torch.cat([tokens[:, :where], registers.expand(batch, -1, -1), tokens[:, where:]], dim=1)
        tokens = block(tokens)
    tokens = torch.cat([tokens[:, :1], tokens[:, 1 + count:]], dim=1)
    return model.forward_head(model.norm(tokens))


# ---------------------------------------------------------------------------- the tokens and their layout

def test_learned_registers_before_block_0_are_timm_reg_tokens(pixels):
    with_tokens = timm_model("vit_small_patch16_224", reg_tokens=4, no_embed_class=True)
    plain = timm_model("vit_small_patch16_224", no_embed_class=True)
    plain.load_state_dict({key: value for key, value in with_tokens.state_dict().items() if key != "reg_token"})
    hook_manager = DeitHookManager(plain)
    registers = LearnableRegisters.for_model(hook_manager, 4)
    with torch.no_grad():
        registers.tokens.copy_(with_tokens.reg_token)
    registered = RegisteredModel(plain, hook_manager, registers)
    with torch.no_grad():
        assert torch.equal(registered(pixels), with_tokens(pixels))
    assert registered.hook_manager.layout == DeitHookManager(with_tokens).layout
    assert registered.register_tokens.shape == (3, 4, 64)
    assert hook_count(plain) == 0
    assert isinstance(registers.tokens, torch.nn.Parameter) and registers.tokens.shape == (1, 4, 64)


def test_registers_entering_at_a_later_block_and_the_layout_at_every_block(pixels):
    model, hook_manager = deit3()
    registers = LearnableRegisters.for_model(hook_manager, 3, insert_at=2, seed=1)
    registered = RegisteredModel(model, hook_manager, registers)
    view = registered.hook_manager
    with torch.no_grad():
        assert torch.allclose(registered.forward_images(pixels), manual_forward(model, pixels, registers.tokens, 2),
                              atol=1e-5)
        assert [view.layout_at(block).num_trained_registers for block in range(LAYERS)] == [0, 0, 3, 3]
        assert view.layout.num_trained_registers == 3 and hook_manager.layout_at(1) == hook_manager.layout
        # The tokens that really exist, read on the bare blocks, follow layout_at ...
        true_lengths = {}
        with hook_manager.hooks() as hooks:
            for block in range(LAYERS):
                hooks.on(HookSite(model.blocks[block], "input"),
                         lambda tokens, block=block: true_lengths.__setitem__(block, tokens.shape[1]))
            registered.forward_images(pixels)
        patches = 64
        assert true_lengths == {block: view.layout_at(block).num_prefix + patches for block in range(LAYERS)}
        # ... and every site of the registered model shows the final layout, with zero placeholders before block 2.
        with view.capture(residual=range(LAYERS), neurons=range(LAYERS), attention=[0, 3]) as captured:
            registered.forward_images(pixels)
    learned = view.layout.trained_registers()
    for block in range(LAYERS):
        assert captured.residual[block].shape[1] == captured.neurons[block].shape[1] == 1 + 3 + patches
        empty = bool((captured.neurons[block][:, learned] == 0).all())
        assert empty == (block < 2)
    assert (captured.attention[0][..., learned, :] == 0).all() and (captured.attention[3][..., learned, :] != 0).any()
    assert captured.patches("residual", 0).shape == (3, patches, 64)
    assert hook_count(model) == 0


def test_cls_can_enter_at_a_chosen_block_of_a_timm_vit(pixels):
    model, hook_manager = deit3()
    registers = LearnableRegisters.for_model(hook_manager, 2, insert_at=1, cls_pos=3, seed=2)
    registered = RegisteredModel(model, hook_manager, registers)
    with torch.no_grad():
        expected = manual_forward(model, pixels, registers.tokens, 1, cls_pos=3)
        assert torch.allclose(registered.forward_images(pixels), expected, atol=1e-5)
        with registered.hook_manager.capture(residual=[0, 2, 3]) as captured:
            registered.forward_images(pixels)
    layouts = [registered.hook_manager.layout_at(block) for block in range(LAYERS)]
    assert [(layout.num_cls, layout.num_trained_registers) for layout in layouts] == [(0, 0), (0, 2), (0, 2), (1, 2)]
    assert (captured.residual[0][:, 0] == 0).all() and (captured.residual[2][:, 0] == 0).all()
    assert (captured.residual[3][:, 0] != 0).all()
    assert hook_count(model) == 0
    clip = ClipHookManager(clip_model(layers=2))
    with pytest.raises(UnsupportedModelError, match="cls_pos needs a timm VisionTransformer"):
        RegisteredModel(clip.model, clip, LearnableRegisters.for_model(clip, 1, cls_pos=1))
    with pytest.raises(InvalidArgumentError, match="insert_at must be an int in 0..3"):
        RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 1, insert_at=4))


class Recorder:
    """An edit that keeps what it was given, then applies ``inner``."""

    def __init__(self, inner):
        self.inner, self.seen = inner, {}

    def __call__(self, activations, neurons, layout, context):
        self.seen[context.layer] = (activations.clone(), layout)
        return self.inner(activations, neurons, layout, context)


def test_test_time_registers_on_a_model_with_learned_registers_edit_the_right_tokens(pixels):
    model, hook_manager = deit3()
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2, insert_at=2))
    view = registered.hook_manager
    neurons = [(0, 5), (0, 9), (3, 7)]
    recorder = Recorder(PaperEdit())
    with torch.no_grad():
        modified = ModifiedModel(registered, view, neurons, num_registers=1, edit=recorder)
        true = {}
        with hook_manager.hooks() as hooks:   # the bare sites, placed after the edits: the edited tokens as they are
            for layer in (0, 3):
                hooks.on(hook_manager.neuron_site(layer), lambda acts, layer=layer: true.__setitem__(layer, acts))
            output = modified.forward_images(pixels)
        assert torch.equal(modified(pixels), output) and output.shape == (3, 1000)
    for layer, learned_in in ((0, False), (3, True)):
        seen, layout = recorder.seen[layer]
        assert layout == view.layout.with_test_time_registers(1) and seen.shape[1] == 1 + 2 + 64 + 1
        assert bool((seen[:, layout.trained_registers()] == 0).all()) == (not learned_in)
        real = view.layout_at(layer).with_test_time_registers(1)
        assert true[layer].shape[1] == real.num_prefix + 64 + 1
        for neuron in [n for l, n in neurons if l == layer]:
            moved = seen[:, layout.mask(seen.shape[1], cls=True, patches=True), neuron].amax(dim=1)
            edited = true[layer][:, :, neuron]
            assert (edited[:, real.mask(edited.shape[1], cls=True, patches=True)] == 0).all()
            assert torch.equal(edited[:, real.test_time_registers(edited.shape[1])][:, 0], moved)
    assert hook_count(model) == 0
    bare = ModifiedModel(model, view, neurons, num_registers=1)
    with pytest.raises(InvalidArgumentError, match="run the model through its RegisteredModel"):
        bare(pixels)
    assert hook_count(model) == 0


def test_discovery_and_the_test_time_register_work_on_a_model_with_learned_registers():
    model, hook_manager = deit3()
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2, insert_at=1))
    view = registered.hook_manager
    with torch.no_grad():
        planted = plant_register_neurons(view, marker_images(24, IMAGE_SIZE, 8, seed=0), 1, 3)
    held_out = marker_images(24, IMAGE_SIZE, 8, seed=1).pixel_values
    neurons = find_register_neurons(view, held_out, top_k=3, progress=False)
    assert sorted(neurons.pairs()) == planted
    before = measure_outliers(view, held_out)
    after = measure_outliers(ModifiedModel(registered, view, neurons, num_registers=1).hook_manager, held_out)
    assert before.worst_max_over_median >= 10 and after.worst_max_over_median <= 2
    assert hook_count(model) == 0


def test_a_failing_hook_leaves_nothing_behind_and_the_next_pass_is_clean(pixels):
    model, hook_manager = deit3()
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2, insert_at=2))
    with torch.no_grad():
        expected = registered.forward_images(pixels)

        def fail(_tokens):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"), registered.hook_manager.hooks() as hooks:
            hooks.on_block_output(2, fail)
            registered.forward_images(pixels)
        assert hook_count(model) == 0
        assert torch.equal(registered.forward_images(pixels), expected)


REFUSED = {"openclip-relpos-trunk", "timm-beit", "timm-beit-shared-bias", "hf-siglip2"}   # biases or masks for appended tokens
ONLY_BEFORE_BLOCK_0 = {"openclip-eva-trunk", "timm-eva02"}                                   # a prefix count in every block


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda arch: arch.name)
def test_every_architecture_takes_learned_registers_or_says_why_not(arch, pixels):
    model = arch.build()
    hook_manager = arch.hook_manager(model)
    for insert_at in (0, 1):
        registers = LearnableRegisters.for_model(hook_manager, 2, insert_at=insert_at)
        if arch.name in REFUSED or (insert_at and arch.name in ONLY_BEFORE_BLOCK_0):
            with pytest.raises(UnsupportedModelError):
                RegisteredModel(model, hook_manager, registers)
            continue
        registered = RegisteredModel(model, hook_manager, registers)
        view = registered.hook_manager
        with torch.no_grad():
            with view.capture(residual=[0, LAYERS - 1], neurons=[0]) as captured:
                registered.forward_images(pixels)
            modified = ModifiedModel(registered, view, [(0, 1), (2, 3)], num_registers=1)
            with modified.capture(residual=[0, LAYERS - 1]) as edited:
                modified.forward_images(pixels)
        length = captured.residual[LAYERS - 1].shape[1]
        assert view.layout.num_trained_registers == arch.num_trained_registers + 2
        assert captured.residual[0].shape[1] == captured.neurons[0].shape[1] == length
        assert edited.residual[0].shape[1] == edited.residual[LAYERS - 1].shape[1] == length + 1
        assert registered.register_tokens.shape[:2] == (3, 2) and modified.register_tokens.shape[:2] == (3, 1)
        assert hook_count(model) == 0


def test_models_whose_biases_assume_appended_tokens_are_refused():
    beit = timm_model("beit_base_patch16_224")
    from test_time_registers.deit import BeitHookManager

    hook_manager = BeitHookManager(beit)
    with pytest.raises(UnsupportedModelError, match="relative position bias"):
        RegisteredModel(beit, hook_manager, LearnableRegisters.for_model(hook_manager, 1))
