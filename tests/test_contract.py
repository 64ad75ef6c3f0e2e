"""The contract every architecture keeps under ModifiedModel: nothing the library adds escapes the model.

Every tensor a caller reads (outputs, hidden states, attentions, intermediates, features) has
the unmodified model's shape; a wrong token count at the removal point raises the library's
error; nested contexts change nothing; the no-op wrapper is bit-identical; and every model
class the registry names resolves on a tiny config.
"""

import open_clip
import pytest
import torch
import transformers

from test_time_registers import (InvalidArgumentError, ModifiedModel, RegisterLeakError, UnsupportedModelError,
                                 hook_manager_for, supported_models)
from test_time_registers.clip import ClipHookManager
from test_time_registers.planting import marker_images
from tests.tiny_models import ARCHITECTURES, CLIP_TEXT, CLIP_VISION, DINOV2, HF_TOWER, IMAGE_SIZE, hook_count

NEURONS = [(1, 0), (1, 5), (2, 1)]


#: The architectures whose models have intermediate methods (timm's and open_clip's).
WITH_INTERMEDIATES = [arch for arch in ARCHITECTURES if not arch.name.startswith(("dinov2", "hf-"))]


def build(arch):
    model = arch.build()
    hook_manager = arch.hook_manager(model)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")   # output_attentions needs the eager path
    pixels = marker_images(2, IMAGE_SIZE, hook_manager.patch_size[0], seed=5).pixel_values
    return model, hook_manager, pixels


@pytest.fixture(params=ARCHITECTURES, ids=lambda a: a.name)
def built(request):
    return build(request.param)


@pytest.fixture(params=WITH_INTERMEDIATES, ids=lambda a: a.name)
def built_with_intermediates(request):
    return build(request.param)


def everything_returned(runner, hook_manager, model, pixels) -> dict:
    """What a caller can read from ``runner`` (the bare model or its ModifiedModel) through every entry point."""
    returned = {"forward_images": hook_manager.forward_images(pixels)}
    if hasattr(model, "config"):      # transformers: every hidden state and attention map
        args, kwargs = hook_manager.model_inputs(pixels)
        returned["forward"] = runner(*args, **kwargs, output_hidden_states=True, output_attentions=True)
    if hasattr(model, "forward_features"):   # timm
        returned["forward_features"] = runner.forward_features(pixels)
        returned["forward_intermediates"] = runner.forward_intermediates(pixels)
        returned["forward_intermediates_nlc"] = runner.forward_intermediates(
            pixels, norm=True, output_fmt="NLC", return_prefix_tokens=True)
        if hasattr(model, "get_intermediate_layers"):
            returned["get_intermediate_layers"] = runner.get_intermediate_layers(
                pixels, n=2, reshape=True, return_prefix_tokens=True, norm=True)
    if hasattr(model, "encode_image"):       # open_clip
        returned["encode_image"] = runner.encode_image(pixels)
        returned["forward_intermediates"] = runner.forward_intermediates(
            image=pixels, image_output_extra_tokens=True, normalize=False)
    return returned


def shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return {key: shapes(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [shapes(item) for item in value]
    return type(value).__name__


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors(item)


@torch.no_grad()
def test_every_returned_tensor_has_the_unmodified_token_count(built):
    model, hook_manager, pixels = built
    modified = ModifiedModel(model, hook_manager, NEURONS, num_registers=2)
    plain = everything_returned(model, hook_manager, model, pixels)
    upstream_hooks = hook_count(model)   # transformers installs its recorders of hidden states once, for good
    with_registers = everything_returned(modified, modified.hook_manager, model, pixels)
    assert shapes(with_registers) == shapes(plain)
    if hasattr(model, "config"):
        hidden = with_registers["forward"]["hidden_states"]
        assert len(hidden) > 1 and all(state.shape[1] == hidden[-1].shape[1] for state in hidden)
    assert modified.register_tokens.shape == (2, 2, hook_manager.hidden_size)
    assert hook_count(model) == upstream_hooks


@torch.no_grad()
def test_intermediate_methods_return_the_register_run_itself(built_with_intermediates):
    """The replay is exact: its final features are those of the forward pass with registers."""
    model, hook_manager, pixels = built_with_intermediates
    modified = ModifiedModel(model, hook_manager, NEURONS, num_registers=2)
    if hasattr(model, "forward_features"):
        final, _ = modified.forward_intermediates(pixels)
        assert torch.equal(final, modified.forward_features(pixels))
        assert not torch.equal(final, model.forward_features(pixels))
    else:
        features = modified.forward_intermediates(image=pixels, normalize=False)["image_features"]
        assert torch.equal(features, modified.encode_image(pixels))
        assert not torch.equal(features, model.encode_image(pixels))


@torch.no_grad()
def test_inside_an_open_context_intermediate_methods_raise_the_librarys_error(built_with_intermediates):
    model, hook_manager, pixels = built_with_intermediates
    modified = ModifiedModel(model, hook_manager, NEURONS, num_registers=1)
    owners = [module for module in (model, *hook_manager.outer_modules) if hasattr(module, "forward_intermediates")]
    assert owners
    with modified.intervention():
        for owner in owners:
            with pytest.raises(RegisterLeakError, match="the tokens the library added: call it on the ModifiedModel"):
                owner.forward_intermediates(pixels)
        with pytest.raises(RegisterLeakError, match="outside an open intervention"):
            (modified.forward_intermediates(pixels) if hasattr(model, "forward_features")
             else modified.forward_intermediates(image=pixels))
    assert all("forward_intermediates" not in vars(owner) for owner in owners)
    assert hook_count(model) == 0


@torch.no_grad()
def test_a_wrong_token_count_at_the_removal_point_raises_the_librarys_error(built):
    model, hook_manager, pixels = built
    modified = ModifiedModel(model, hook_manager, NEURONS, num_registers=1)
    with modified.intervention(), hook_manager.hooks() as hooks:
        hooks.on(hook_manager.register_removal_site(), lambda tokens: tokens[:, :-1], prepend=True)
        with pytest.raises(RegisterLeakError, match="tokens reached the removal point"):
            hook_manager.forward_images(pixels)
    assert hook_count(model) == 0


@torch.no_grad()
def test_nested_contexts_are_no_ops(built):
    model, hook_manager, pixels = built
    modified = ModifiedModel(model, hook_manager, NEURONS, num_registers=2)
    once = modified.forward_images(pixels)
    with modified.intervention():
        with modified.intervention():
            nested = modified.forward_images(pixels)
        inside = hook_manager.forward_images(pixels)   # the bare hook manager, inside the open context
    for expected, got in ((once, nested), (once, inside)):
        assert all(torch.equal(a, b) for a, b in zip(tensors(expected), tensors(got), strict=True))
    other = ModifiedModel(model, hook_manager, NEURONS, num_registers=1)
    with modified.intervention(), pytest.raises(InvalidArgumentError, match="another ModifiedModel"):
        with other.intervention():
            pass
    assert hook_count(model) == 0
    after = modified.forward_images(pixels)
    assert all(torch.equal(a, b) for a, b in zip(tensors(once), tensors(after), strict=True))


@torch.no_grad()
def test_the_no_op_wrapper_is_bit_identical_everywhere(built):
    model, hook_manager, pixels = built
    modified = ModifiedModel(model, hook_manager, (), num_registers=0)
    plain = everything_returned(model, hook_manager, model, pixels)
    wrapped = everything_returned(modified, modified.hook_manager, model, pixels)
    assert shapes(wrapped) == shapes(plain)
    assert all(torch.equal(a, b) for a, b in zip(tensors(plain), tensors(wrapped), strict=True))


#: Architectures whose attention logits are queries . keys alone (no rotary position, no relative bias).
PLAIN_LOGITS = {"openclip", "dinov2", "dinov2-registers", "deit3", "timm-reg4-no-embed-class", "openclip-timm-trunk",
                "openclip-siglip-trunk", "openclip-vitamin-trunk", "hf-clip", "hf-siglip", "hf-siglip2", "hf-vit"}


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_every_architecture_declares_where_queries_keys_and_values_are_read(arch):
    """LOST reads them: [B, L, heads * head_dim], the attention's own; where the logits are q . k alone,
    softmax(q kᵀ / sqrt(d)) is the model's attention. Under test-time registers they carry the register."""
    model, hook_manager, pixels = build(arch)
    last = hook_manager.num_layers - 1
    with torch.no_grad(), hook_manager.capture(queries=[last], keys=[last], values=[last], attention=[last]) as cap:
        hook_manager.forward_images(pixels)
    attention = cap.attention[last]
    batch, heads, length, _ = attention.shape
    for kind in ("queries", "keys", "values"):
        assert getattr(cap, kind)[last].shape[:2] == (batch, length)
    if arch.name in PLAIN_LOGITS:
        q, k = (getattr(cap, kind)[last].reshape(batch, length, heads, -1).transpose(1, 2) for kind in ("queries", "keys"))
        torch.testing.assert_close((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1), attention,
                                   atol=1e-5, rtol=1e-4)
    view = ModifiedModel(model, hook_manager, NEURONS).hook_manager
    with torch.no_grad(), view.capture(keys=[last]) as cap:
        view.forward_images(pixels)
    assert cap.keys[last].shape[1] == length + 1
    assert cap.patches("keys", last).shape[1] == view.layout.num_patches(length + 1)


@torch.no_grad()
def test_returned_attention_maps_lose_the_registers_rows_and_columns():
    """What ``output_attentions`` gives under the intervention: the unmodified [B, heads, L, L], without the
    registers' rows and columns, so each row sums to 1 minus what that token gave the registers."""
    arch = next(arch for arch in ARCHITECTURES if arch.name == "dinov2")
    model = arch.build()
    model.set_attn_implementation("eager")
    hook_manager = arch.hook_manager(model)
    pixels = marker_images(2, IMAGE_SIZE, 8, seed=5).pixel_values
    modified = ModifiedModel(model, hook_manager, NEURONS, num_registers=1)
    attentions = modified(pixel_values=pixels, output_attentions=True).attentions
    sums = torch.stack([attention.sum(dim=-1) for attention in attentions])
    assert attentions[0].shape == model(pixel_values=pixels, output_attentions=True).attentions[0].shape
    assert bool((sums <= 1 + 1e-5).all()) and bool((sums < 1 - 1e-4).any())


# ---- every registered model class resolves ---------------------------------------------------------

def _tiny_config(config_class):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    tower = {key: value for key, value in HF_TOWER.items()}
    if config_class.__name__.startswith("Siglip2"):
        tower = {key: value for key, value in tower.items() if key != "image_size"} | {"num_patches": 64}
    if config_class.__name__.startswith("Dinov2"):
        tower = dict(DINOV2)
    if "vision_config" in config_class.sub_configs:
        # ViP-LLaVA's default read layers (-2, -5, -8, -11, 6) are for a 24-block tower
        reads = {"vision_feature_layers": [-2, -3]} if config_class.__name__.startswith("VipLlava") else {}
        return config_class(vision_config=tower, text_config=text, num_labels=3, **reads)
    if config_class.__name__ == "DINOv3ViTConfig":
        return config_class(**tower, num_register_tokens=4)
    return config_class(**tower, num_labels=3)


#: Classes registered by name are transformers classes (the others are registered by type).
TRANSFORMERS_CLASSES = sorted(name for name, entry in supported_models().items()
                              if "." not in name and entry.unsupported is None)


@pytest.mark.parametrize("name", TRANSFORMERS_CLASSES)
@torch.no_grad()
def test_every_registered_transformers_class_resolves_on_a_tiny_config(name):
    entry = supported_models()[name]
    model_class = getattr(transformers, name)
    model = model_class(_tiny_config(model_class.config_class)).eval()
    hook_manager = hook_manager_for(model)
    assert isinstance(hook_manager, entry.hook_manager) if entry.hook_manager else hook_manager.root is not model
    modified = ModifiedModel(model, hook_manager, NEURONS, num_registers=1)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert shapes(modified.hook_manager.forward_images(pixels)) == shapes(hook_manager.forward_images(pixels))
    if name.endswith("ForImageClassification"):
        assert modified.forward_images(pixels).logits.shape == (2, 3)
    assert hook_count(model) == 0


def test_the_registry_names_the_transformers_classes_the_issue_asks_for():
    wrappers = {"Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification", "ViTForImageClassification",
                "CLIPForImageClassification", "SiglipForImageClassification", "Siglip2ForImageClassification"}
    assert wrappers <= set(TRANSFORMERS_CLASSES)


@torch.no_grad()
def test_open_clip_classes_resolve_through_the_registry():
    vision = dict(CLIP_VISION)
    for model in (open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIP_TEXT),
                  open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIP_TEXT)):
        hook_manager = hook_manager_for(model.eval())
        assert isinstance(hook_manager, ClipHookManager) and hook_manager.root is model.visual
        assert hook_manager.image_model is model.visual and hook_manager.forward_methods == ("encode_image",)
        assert isinstance(hook_manager_for(model.visual), ClipHookManager)


def test_a_model_no_hook_manager_describes_is_refused_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="no hook manager describes Linear; supported: .*Dinov2Model"):
        hook_manager_for(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="has no blocks at 'transformer.resblocks' .*Sequential"):
        ClipHookManager(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch.name in ("openclip", "dinov2", "deit3", "hf-vit")],
                         ids=lambda a: a.name)
@torch.no_grad()
def test_nested_learned_registers_contexts_are_no_ops(arch):
    from test_time_registers import LearnableRegisters, RegisteredModel

    model, hook_manager, pixels = build(arch)
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2, seed=1))
    once = registered.forward_images(pixels)
    with registered.registers_in(), registered.registers_in():
        nested = registered.forward_images(pixels)
        inside = registered.hook_manager.forward_images(pixels)
    for got in (nested, inside):
        assert all(torch.equal(a, b) for a, b in zip(tensors(once), tensors(got), strict=True))
    assert shapes(once) == shapes(hook_manager.forward_images(pixels))
    assert registered.register_tokens.shape == (2, 2, hook_manager.hidden_size)
    assert hook_count(model) == 0


@torch.no_grad()
def test_inside_learned_registers_intermediate_methods_raise_the_librarys_error():
    from test_time_registers import LearnableRegisters, RegisteredModel

    model, hook_manager, pixels = build(next(arch for arch in ARCHITECTURES if arch.name == "deit3"))
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2))
    with registered.registers_in():
        with pytest.raises(RegisterLeakError, match="read the learned registers from register_tokens"):
            model.forward_intermediates(pixels)
    assert "forward_intermediates" not in vars(model) and hook_count(model) == 0
    assert shapes(model.forward_intermediates(pixels)) == shapes(registered.forward_intermediates(pixels))
