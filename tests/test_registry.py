"""Architectures register themselves; specs, presets and aliases resolve through the registry."""

import pytest
import torch

from test_time_registers import ModelLoadError, NeuronFileError, load_model, load_neurons, load_preset
from test_time_registers.clip import ClipHookManager
from test_time_registers.deit import DeitHookManager
from test_time_registers.dinov2 import Dinov2HookManager
from test_time_registers.registry import (ENTRY_POINT_GROUP, _ARCHITECTURES, architectures, find_architecture,
                                          installed_prefixes, presets, register_architecture, supported_models)


def test_every_installed_architecture_registers_its_prefix_loader_and_hook_manager():
    registered = architectures()
    assert {"demo", "openclip", "dinov2", "timm", "deit"} <= set(registered)
    models = supported_models()
    assert models["open_clip.transformer.VisionTransformer"].hook_manager is ClipHookManager
    assert models["Dinov2Model"].hook_manager is Dinov2HookManager
    assert models["timm.models.vision_transformer.VisionTransformer"].hook_manager is DeitHookManager
    assert registered["deit"].alias_of == "timm" and registered["deit"].load is registered["timm"].load
    assert registered["deit"].spec.startswith("deit:")
    assert set(installed_prefixes()) >= set(registered)
    assert "dinov2-vitl14" in registered["dinov2"].presets


def test_specs_dispatch_through_the_registry():
    demo = load_model("demo")
    assert demo.synthetic and demo.hook_manager.name == "demo" and len(demo.planted) == 4
    timm_random = load_model("timm:vit_tiny_patch16_224:random")
    assert isinstance(timm_random.hook_manager, DeitHookManager)
    assert timm_random.hook_manager.name == "timm:vit_tiny_patch16_224:random"
    alias = load_model("deit:vit_tiny_patch16_224:random")
    assert isinstance(alias.hook_manager, DeitHookManager)


@pytest.mark.parametrize("spec, message", [
    ("bogus:thing", "unknown model spec prefix 'bogus'; expected one of: .*openclip:NAME"),
    ("openclip:ViT-B-16", "openclip:ViT-B-16 names no weights; write openclip:ViT-B-16:TAG .*openclip:ViT-B-16:random"),
    ("openclip:", "needs a model name"),
    ("timm:", "needs a model name"),
    ("dinov2:", "needs a Hugging Face id"),
    ("demo:extra", "the demo takes no reference"),
])
def test_bad_specs_say_what_to_write(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_an_architecture_registered_at_run_time_is_found_by_its_prefix():
    calls = []

    @register_architecture("tiny-test", spec="tiny-test:NAME")
    def load(reference, *, device, precision, seed):
        calls.append((reference, precision, seed))
        return load_model("timm:vit_tiny_patch16_224:random")

    try:
        assert find_architecture("tiny-test").load is load
        load_model("tiny-test:anything:with:colons", precision="bf16", seed=3)
        assert calls == [("anything:with:colons", "bf16", 3)]
    finally:
        _ARCHITECTURES.pop("tiny-test")


def test_presets_come_from_the_architectures_that_declare_them(tmp_path):
    assert presets()["dinov2-vitl14"].model == "dinov2:facebook/dinov2-large"
    neurons = load_preset("dinov2-vitl14")
    assert neurons.model == "dinov2:facebook/dinov2-large" and len(neurons) == 45
    assert load_neurons("preset:dinov2-vitl14").pairs() == neurons.pairs()
    with pytest.raises(NeuronFileError, match="unknown preset 'nope'; known: dinov2-vitl14"):
        load_neurons("preset:nope")


def test_entry_points_name_the_packages_that_serve_each_prefix():
    from importlib import metadata

    served = {entry.name: entry.value for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert served == {"demo": "test_time_registers.clip", "openclip": "test_time_registers.clip",
                      "dinov2": "test_time_registers.dinov2", "timm": "test_time_registers.deit",
                      "deit": "test_time_registers.deit", "hf": "test_time_registers.hf"}


def test_a_bad_precision_is_a_precise_error():
    from test_time_registers import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="precision must be one of fp32, bf16, fp16, pure_bf16"):
        load_model("demo", precision="fp8")
    assert torch.float32 == load_model("demo", precision="amp_bf16").hook_manager.input_dtype


def test_model_classes_resolve_to_one_description_and_the_registry_refuses_what_is_not_one():
    from test_time_registers import InvalidArgumentError, UnsupportedModelError, hook_manager_for
    from test_time_registers.deit import EvaHookManager
    from test_time_registers.registry import register_model
    from tests.tiny_models import timm_model

    eva = timm_model("eva02_tiny_patch14_224")
    assert type(hook_manager_for(eva)) is EvaHookManager
    with pytest.raises(UnsupportedModelError, match="DeitHookManager does not describe Eva; EvaHookManager does"):
        DeitHookManager(eva)
    with pytest.raises(InvalidArgumentError, match="exactly one of"):
        register_model("SomeModel", hook_manager=DeitHookManager, inside="vit")


def test_loader_options_pass_through_and_options_a_loader_does_not_take_are_refused():
    from test_time_registers import InvalidArgumentError

    loaded = load_model("timm:vit_tiny_patch16_224:random", reg_tokens=2, img_size=64)
    assert loaded.hook_manager.layout.num_trained_registers == 2 and loaded.model.patch_embed.img_size == (64, 64)
    with pytest.raises(InvalidArgumentError, match="the demo: loader takes no option"):
        load_model("demo", reg_tokens=2)
