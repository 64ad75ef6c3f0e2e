"""The real transformers and timm loaders, offline, on tiny checkpoints the tests save themselves."""

import runpy
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from test_time_registers.deit import DeitHookManager, load_timm
from test_time_registers.dinov2 import DINOV2_VITL14, Dinov2HookManager, load_dinov2
from test_time_registers.registry import load_preset
from test_time_registers import IncompatibleNeuronsError, ModelLoadError, ModifiedModel
from tests.tiny_models import dinov2_model, timm_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "find_register_neurons.py"
main = runpy.run_path(str(SCRIPT))["main"]


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_from_a_saved_directory(tmp_path, registers):
    source = dinov2_model(registers=registers)
    source.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    model, preprocess, hook_manager = load_dinov2(tmp_path)
    assert isinstance(hook_manager, Dinov2HookManager) and not model.training
    assert type(model) is type(source)
    assert hook_manager.layout.num_trained_registers == registers
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    pixels = preprocess(Image.new("RGB", (90, 70), "gray")).unsqueeze(0)
    assert pixels.shape == (1, 3, 64, 64)
    modified = ModifiedModel(model, hook_manager, [(1, 3)], num_registers=2)
    with torch.no_grad():
        output = modified(pixel_values=pixels)
        plain = model(pixel_values=pixels)
    assert type(output) is type(plain)
    assert output.last_hidden_state.shape == plain.last_hidden_state.shape == (1, 1 + registers + 64, 64)
    assert output.pooler_output.shape == (1, 64)
    assert modified.register_tokens.shape == (1, 2, 64)


def test_dinov2_without_an_image_processor_uses_the_standard_transform(tmp_path):
    dinov2_model().save_pretrained(tmp_path)
    _, preprocess, _ = load_dinov2(tmp_path)
    assert preprocess(Image.new("RGB", (300, 400))).shape == (3, 224, 224)


def test_dinov2_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_dinov2(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="cannot download DINOv2 model facebook/dinov2-small: HF_HUB_OFFLINE"):
        load_dinov2("facebook/dinov2-small")          # offline: the hub cannot be reached
    dinov2_model().save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_dinov2(tmp_path / "corrupt")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_from_a_local_checkpoint(tmp_path, suffix):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(source.state_dict(), path)
    model, preprocess, hook_manager = load_timm("vit_tiny_patch16_224", path)
    assert isinstance(hook_manager, DeitHookManager) and not model.training
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert preprocess(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    assert hook_manager.name == f"timm:vit_tiny_patch16_224:{path}"


def test_timm_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown timm model"):
        load_timm("deit3_nonexistent")
    with pytest.raises(ModelLoadError, match="not found"):
        load_timm("vit_tiny_patch16_224", tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_timm("vit_tiny_patch16_224", corrupt)
    with pytest.raises(ModelLoadError, match="cannot download pretrained timm .* timm:vit_tiny_patch16_224:/path"):
        load_timm("vit_tiny_patch16_224")   # pretrained weights cannot be downloaded


def test_distilled_deit_counts_its_distillation_token_as_a_prefix_token():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2)
    layout = DeitHookManager(model.eval()).layout
    assert layout.num_prefix == 2 and layout.num_trained_registers == 0


def test_the_dinov2_large_preset_fits_dinov2_large_and_names_its_source():
    neurons = load_preset("dinov2-vitl14")
    assert len(neurons) == 45 and DINOV2_VITL14.model == "dinov2:facebook/dinov2-large"
    assert neurons.by_layer()[17][:3] == [884, 133, 1427] and sorted(neurons.by_layer()) == [12, 13, 14, 15, 16, 17]
    assert (neurons.detect_layer, neurons.threshold, neurons.highest_layer) == (22, 150.0, 17)
    assert "860df43" in neurons.source
    with torch.device("meta"):   # the real architecture, without allocating its weights
        large = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                         patch_size=14, image_size=518))
    neurons.check_fits(Dinov2HookManager(large))
    with pytest.raises(IncompatibleNeuronsError):
        neurons.check_fits(Dinov2HookManager(dinov2_model()))


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (80, 80), (40 * index, 90, 200)).save(folder / f"{index}.png")
    return folder


def test_cli_runs_dinov2_and_deit_specs_and_reports_a_model_without_outliers(tmp_path, image_folder, capsys):
    dinov2_model().save_pretrained(tmp_path / "dinov2")
    capsys.readouterr()
    for spec, message in ((f"dinov2:{tmp_path / 'dinov2'}", "no high-norm outliers"),
                          (f"timm:vit_tiny_patch16_224:{tmp_path / 'missing.pth'}", "checkpoint not found"),
                          ("dinov2:facebook/dinov2-small", "cannot download DINOv2 model")):
        code = main(["--model", spec, "--images", str(image_folder), "--quiet", "--out", str(tmp_path / "n.json")])
        error = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(error) == 1 and message in error[0], (spec, error)
    assert not (tmp_path / "n.json").exists()
    code = main(["--model", f"dinov2:{tmp_path / 'dinov2'}", "--images", str(image_folder), "--quiet",
                 "--neurons", "preset:dinov2-vitl14"])
    assert code == 2 and "layers 0..3" in capsys.readouterr().err
    code = main(["--model", f"dinov2:{tmp_path / 'dinov2'}", "--images", str(image_folder), "--quiet",
                 "--neurons", "preset:nope"])
    assert code == 2 and "unknown preset" in capsys.readouterr().err
    code = main(["--model", "deit:deit3_nonexistent", "--images", str(image_folder), "--quiet"])
    assert code == 2 and "unknown timm model" in capsys.readouterr().err


def test_dinov2_with_a_swiglu_mlp_reads_neurons_at_the_output_projection():
    """DINOv2 ViT-g uses a SwiGLU MLP: the neurons are the input of ``down_proj``."""
    from tests.tiny_models import DINOV2

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Dinov2Model(Dinov2Config(use_swiglu_ffn=True, **DINOV2)).eval()
    hook_manager = Dinov2HookManager(model)
    assert hook_manager.mlp_output_projection(2) is model.encoder.layer[2].mlp.down_proj
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, before = hook_manager.run_with_capture(pixels, neurons=[2])
        modified = ModifiedModel(model, hook_manager, [(2, 5), (2, 9)], num_registers=1)
        with modified.capture(neurons=[2]) as after:
            output = modified(pixel_values=pixels)
    assert before.neurons[2].shape[-1] == hook_manager.num_neurons(2)
    assert torch.equal(after.neurons[2][:, :65, [5, 9]], torch.zeros(2, 65, 2))
    unedited = ModifiedModel(model, hook_manager, [], num_registers=1)
    with torch.no_grad(), unedited.capture(neurons=[2]) as reference:
        unedited(pixel_values=pixels)
    assert torch.equal(after.neurons[2][:, 65, [5, 9]], reference.neurons[2][:, :, [5, 9]].amax(dim=1))
    assert output.last_hidden_state.shape == (2, 65, 64)


@pytest.mark.parametrize("kind, manager", [("clip", "ClipVisionHookManager"), ("siglip", "SiglipVisionHookManager"),
                                           ("vit", "ViTHookManager")])
def test_hf_specs_pick_the_hook_manager_from_the_model_class(tmp_path, kind, manager):
    from test_time_registers import load_model
    from tests.tiny_models import hf_tower

    source = hf_tower(kind)
    source.save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}", precision="bf16")
    assert type(loaded.hook_manager).__name__ == manager and loaded.hook_manager.name == f"hf:{tmp_path}"
    assert loaded.hook_manager.input_dtype == torch.bfloat16
    for name, value in source.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name].float(), value.to(torch.bfloat16).float())
    assert loaded.preprocess(Image.new("RGB", (300, 200))).shape == (3, 224, 224)   # no processor saved: the default


@pytest.mark.parametrize("prefix", ["hf", "dinov2"])
def test_a_folder_with_only_a_config_builds_random_weights_and_says_so(tmp_path, caplog, prefix):
    from transformers import ViTConfig

    from test_time_registers import load_model
    from tests.tiny_models import DINOV2, HF_TOWER

    (ViTConfig(**HF_TOWER) if prefix == "hf" else Dinov2Config(**DINOV2)).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="test_time_registers"):
        first = load_model(f"{prefix}:{tmp_path}", seed=3)
    assert "no weights: building it with random weights (seed 3)" in caplog.text
    again, other = load_model(f"{prefix}:{tmp_path}", seed=3), load_model(f"{prefix}:{tmp_path}", seed=4)
    for name, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name
    assert not all(torch.equal(other.model.state_dict()[name], value) for name, value in first.model.state_dict().items())
    if prefix == "dinov2":
        assert isinstance(first.hook_manager, Dinov2HookManager) and first.hook_manager.name == f"dinov2:{tmp_path}"


def test_hf_specs_that_cannot_be_served_are_precise_errors(tmp_path):
    from transformers import BertConfig

    from test_time_registers import UnsupportedModelError, load_model

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="no hook manager describes BertModel; supported: "):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ModelLoadError, match="cannot download transformers model openai/clip-vit-base-patch16"):
        load_model("hf:openai/clip-vit-base-patch16")


def test_a_full_clip_model_runs_its_image_features_with_registers():
    from transformers import CLIPConfig, CLIPModel

    from test_time_registers.clip import ClipVisionHookManager
    from tests.tiny_models import HF_TOWER

    config = CLIPConfig(vision_config=HF_TOWER, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=1, num_attention_heads=2))
    model = CLIPModel(config).eval()
    hook_manager = ClipVisionHookManager(model)
    modified = ModifiedModel(model, hook_manager, [(1, 3)], num_registers=2)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = modified.get_image_features(pixel_values=pixels)
        plain = model.get_image_features(pixel_values=pixels)
    plain = getattr(plain, "pooler_output", plain)
    features = getattr(features, "pooler_output", features)
    assert features.shape == plain.shape and not torch.equal(features, plain)
    assert modified.register_tokens.shape == (2, 2, 64)


@pytest.mark.parametrize("name, supported, reason", [
    ("ViT-B-16", True, None),
    ("ViT-B-16-SigLIP", True, None),                  # a timm ViT trunk without CLS, attention pooling
    ("ViT-SO400M-16-SigLIP2-256", True, None),
    ("RN50", False, "a convolutional ResNet has no token sequence"),
    ("convnext_base", False, "a convolutional network has no token sequence"),
    ("MobileCLIP-S1", False, "FastViT mixes tokens by convolution"),
    ("swin_base_patch4_window7_224", False, "Swin attends within windows"),
    ("EVA02-B-16", True, None),                        # an Eva trunk: rotary positions, gated MLPs
    ("ViTamin-S", True, None),                         # a hybrid convolutional stem, GeGLU MLPs
    ("vit_relpos_medium_patch16_cls_224", True, None),  # a relative position bias, no absolute positions
])
def test_open_clip_towers_are_described_or_refused_with_the_reason(name, supported, reason):
    import open_clip

    from test_time_registers import UnsupportedModelError, hook_manager_for
    from test_time_registers.clip import ClipHookManager

    with torch.device("meta"):   # the real architecture, without allocating its weights
        model = open_clip.create_model(name, device="meta")
    if supported:
        hook_manager = hook_manager_for(model)
        assert isinstance(hook_manager, ClipHookManager) == (type(model.visual).__name__ != "TimmModel")
        assert hook_manager.image_model is model.visual and hook_manager.forward_methods == ("encode_image",)
        assert hook_manager.num_layers == len(hook_manager.blocks) > 0
        assert hook_manager.grid_shape(torch.empty(1, 3, 224, 224, device="meta")) == (14, 14)
        return
    with pytest.raises(UnsupportedModelError, match=reason):
        hook_manager_for(model)
    with pytest.raises(UnsupportedModelError, match=reason):
        ClipHookManager(model)


def test_vitamin_takes_the_pixels_at_its_stem_and_reads_its_neurons_at_the_geglu_output():
    import open_clip

    from test_time_registers import hook_manager_for

    with torch.device("meta"):
        model = open_clip.create_model("ViTamin-S", device="meta")
    hook_manager, trunk = hook_manager_for(model), model.visual.trunk
    mlp = trunk.blocks[3].mlp
    assert hook_manager.patch_embedding is trunk.patch_embed.backbone.stem.conv1
    assert hook_manager.patch_size == (16, 16) and hook_manager.layout.num_prefix == 0
    assert hook_manager.mlp_output_projection(3) is mlp.w2 and hook_manager.num_neurons(3) == 768
    assert hook_manager.mlp_input_rows(3) == ((mlp.w0, 0), (mlp.w1, 0))


@pytest.mark.parametrize("name", ["vit_relpos_small_patch16_224", "vit_srelpos_small_patch16_224"])
def test_relative_position_vits_without_a_class_token_give_registers_no_bias(name):
    from test_time_registers.deit import RelPosHookManager

    model = timm_model(name, rel_pos_dim=16)
    hook_manager = RelPosHookManager(model)
    assert hook_manager.layout.num_prefix == 0
    biases = [module for module in model.modules() if hasattr(module, "get_bias")]
    plain = [module.get_bias() for module in biases]
    with hook_manager.hooks() as hooks:
        hook_manager.prepare_for_registers(2, hooks)
        with torch.no_grad():
            for module, bias in zip(biases, plain):
                extended = module.get_bias()
                assert torch.equal(extended[..., :-2, :-2], bias)
                assert torch.equal(extended[..., -2:, :], torch.zeros_like(extended[..., -2:, :]))
                assert torch.equal(extended[..., :, -2:], torch.zeros_like(extended[..., :, -2:]))
    assert not any("get_bias" in vars(module) for module in biases)
    modified = ModifiedModel(model, hook_manager, [(1, 3)], num_registers=2)
    with torch.no_grad():
        assert modified(torch.randn(2, 3, 64, 64)).shape == model(torch.randn(2, 3, 64, 64)).shape


def test_dinov3_loads_by_spec_and_keeps_registers_out_of_its_outputs(tmp_path):
    from test_time_registers import load_model
    from test_time_registers.dinov2 import Dinov3HookManager
    from tests.tiny_models import dinov3_model

    dinov3_model().save_pretrained(tmp_path)
    model, _, hook_manager = load_model(f"hf:{tmp_path}")
    assert isinstance(hook_manager, Dinov3HookManager)
    layout = hook_manager.layout
    assert (layout.num_cls, layout.num_trained_registers, layout.registers_after_prefix) == (1, 4, True)
    pixels = torch.randn(2, 3, 64, 64)
    modified = ModifiedModel(model, hook_manager, [(1, 5)], num_registers=2)
    with torch.no_grad():
        output, plain = modified(pixel_values=pixels), model(pixel_values=pixels)
        with modified.capture(residual=[0]) as captured:
            modified.forward_images(pixels)
    assert output.last_hidden_state.shape == plain.last_hidden_state.shape == (2, 1 + 4 + 64, 64)
    assert modified.register_tokens.shape == (2, 2, 64)
    assert captured.residual[0].shape[1] == 1 + 4 + 2 + 64      # [CLS][4 registers][2 test-time][patches]


def test_siglip2_loads_by_spec_patchifies_like_its_processor_and_keeps_padding_masked(tmp_path):
    import numpy as np
    from transformers import Siglip2ImageProcessor

    from test_time_registers import load_model
    from test_time_registers.clip import Siglip2VisionHookManager
    from tests.tiny_models import hf_tower

    hf_tower("siglip2").config.save_pretrained(tmp_path)       # a config only: random weights
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)
    processor.save_pretrained(tmp_path)
    model, preprocess, hook_manager = load_model(f"hf:{tmp_path}")
    assert isinstance(hook_manager, Siglip2VisionHookManager)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pixels = preprocess(image)
    assert pixels.shape == (3, 64, 64) and hook_manager.grid_shape(pixels[None]) == (8, 8)
    _, inputs = hook_manager.model_inputs(pixels[None])
    expected = processor(images=image, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(inputs["spatial_shapes"], expected["spatial_shapes"])
    assert torch.equal(inputs["pixel_attention_mask"], expected["pixel_attention_mask"].long())

    # A 4 x 8 grid padded to 64 patches, as the processor batches images of other shapes: registers
    # attend to the real patches only, so the padding changes nothing.
    _, alone = hook_manager.model_inputs(torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(1)))
    padded = {"pixel_values": torch.cat([alone["pixel_values"], torch.zeros(1, 32, 192)], dim=1),
              "pixel_attention_mask": torch.cat([torch.ones(1, 32), torch.zeros(1, 32)], dim=1).long(),
              "spatial_shapes": alone["spatial_shapes"]}
    modified = ModifiedModel(model, hook_manager, [], num_registers=2)
    for attention in ("sdpa", "eager"):      # a boolean mask, then an additive one
        model.set_attn_implementation(attention)
        with torch.no_grad():
            unpadded, with_padding = modified(**alone), modified(**padded)
        torch.testing.assert_close(with_padding.last_hidden_state[:, :32], unpadded.last_hidden_state)
        torch.testing.assert_close(with_padding.pooler_output, unpadded.pooler_output)
        assert with_padding.last_hidden_state.shape == (1, 64, 64)
        assert modified.register_tokens.shape == (1, 2, 64)
