"""Test-time registers in the towers of InternVL, Idefics3 and SmolVLM (clip.vlm_towers), alone and inside their
vision-language models: the sites resolve, planted neurons are found at the read layer, the pixel shuffle before
each projector gets the unmodified grid, padded tiles stay masked, and no hook is left; tiny models from configs."""

import pytest
import torch
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Model, Idefics3VisionConfig,
                          Idefics3VisionTransformer, InternVLConfig, InternVLForConditionalGeneration, InternVLModel,
                          InternVLVisionConfig, InternVLVisionModel, SmolVLMConfig, SmolVLMForConditionalGeneration,
                          SmolVLMModel, SmolVLMVisionConfig, SmolVLMVisionTransformer)

from test_time_registers import ModifiedModel, find_register_neurons, hook_manager_for
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.clip.vlm_towers import Idefics3VisionHookManager, InternVLVisionHookManager
from test_time_registers.hf import vision_tower_path
from test_time_registers.planting import marker_images
from tests.tiny_models import hook_count
from tests.tiny_vlms import (GRID, IMAGE, IMAGE_TOKEN, LAYERS, PATCH, generate_seeing_the_projector, planted, prompt,
                             text)

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=IMAGE,
             patch_size=PATCH)
SHUFFLED = GRID // 4                   # image tokens per tile after the 2 x 2 pixel shuffle


def trained_positions(positions: torch.Tensor, seed: int) -> None:
    """Positional embeddings of a trained ViT's strength (norm ~3 per token, above the patch content), so that
    patch norms stay close and planted outliers are the only outliers: these towers start at ~0 (InternVL: zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        positions.copy_(0.5 * torch.randn(positions.shape, generator=generator))


def internvl(layer=-1, seed=0, headless=False, **tower):
    torch.manual_seed(seed)
    config = InternVLConfig(vision_config=InternVLVisionConfig(**TOWER, **tower), text_config=text(),
                            image_token_id=IMAGE_TOKEN, image_seq_length=SHUFFLED, downsample_ratio=0.5,
                            vision_feature_layer=layer, vision_feature_select_strategy="default")
    model = (InternVLModel if headless else InternVLForConditionalGeneration)(config).eval()
    tower_model = model.vision_tower if headless else model.model.vision_tower
    trained_positions(tower_model.embeddings.position_embeddings, seed)
    return model


def idefics3(seed=0, headless=False):
    torch.manual_seed(seed)
    config = Idefics3Config(vision_config=Idefics3VisionConfig(**TOWER), text_config=text(),
                            image_token_id=IMAGE_TOKEN, scale_factor=2)
    model = (Idefics3Model if headless else Idefics3ForConditionalGeneration)(config).eval()
    trained_positions((model if headless else model.model).vision_model.embeddings.position_embedding.weight, seed)
    return model


def smolvlm(seed=0, headless=False):
    torch.manual_seed(seed)
    config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**TOWER), text_config=text(),
                           image_token_id=IMAGE_TOKEN, scale_factor=2)
    model = (SmolVLMModel if headless else SmolVLMForConditionalGeneration)(config).eval()
    trained_positions((model if headless else model.model).vision_model.embeddings.position_embedding.weight, seed)
    return model


#: family: (builder, tower class, its hook manager, where the VLM keeps the tower, the number of CLS tokens).
FAMILIES = {
    "internvl": (internvl, InternVLVisionModel, InternVLVisionHookManager, "vision_tower", 1),
    "idefics3": (idefics3, Idefics3VisionTransformer, Idefics3VisionHookManager, "vision_model", 0),
    "smolvlm": (smolvlm, SmolVLMVisionTransformer, Idefics3VisionHookManager, "vision_model", 0),
}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_tower_alone_and_inside_both_wrappers_resolves_to_its_hook_manager(family):
    build, tower_class, manager_class, attribute, num_cls = FAMILIES[family]
    model, headless = build(), build(headless=True)
    assert vision_tower_path(model) == f"model.{attribute}" and vision_tower_path(headless) == attribute
    tower = model.model.get_submodule(attribute)
    for described in (model, headless, tower):
        hook_manager = hook_manager_for(described)
        assert type(hook_manager) is manager_class and isinstance(hook_manager.root, tower_class)
        assert hook_manager.image_model is hook_manager.root and hook_manager.default_detect_layer == LAYERS - 1
    hook_manager = hook_manager_for(model)
    assert {"generate", "get_image_features"} <= set(hook_manager.forward_methods)
    assert hook_manager.num_layers == LAYERS and hook_manager.patch_size == (PATCH, PATCH)
    assert hook_manager.mlp_output_projection(0) is hook_manager.blocks[0].mlp.fc2
    assert hook_manager.num_neurons(0) == 64 and hook_manager.hidden_size == 32
    assert hook_manager.layout.num_cls == num_cls
    pixels = marker_images(2, IMAGE, PATCH, seed=9).pixel_values
    assert hook_manager.forward_images(pixels).last_hidden_state.shape == (2, num_cls + GRID, 32)
    modified = ModifiedModel(model, hook_manager, [(1, 0), (2, 5)])
    with modified.capture(queries=[3], attention=[3]) as captured:
        output = modified.forward_images(pixels)
    assert output.last_hidden_state.shape == (2, num_cls + GRID, 32)
    assert captured.queries[3].shape == (2, num_cls + GRID + 1, 32)
    assert captured.attention[3].shape == (2, 2, num_cls + GRID + 1, num_cls + GRID + 1)


READS = {"internvl -1": (internvl, {"layer": -1}, 3), "internvl -2": (internvl, {"layer": -2}, 2),
         "idefics3": (idefics3, {}, 3), "smolvlm": (smolvlm, {}, 3)}


@pytest.mark.parametrize("case", READS)
def test_planted_neurons_are_found_at_the_read_layer_and_the_register_takes_their_outliers(case):
    build, options, read_layer = READS[case]
    model = build(**options)
    hook_manager, neurons = planted(model)
    assert hook_manager.read_layers == (read_layer,)
    images = marker_images(24, IMAGE, PATCH, seed=1).pixel_values
    found = find_register_neurons(hook_manager, images, top_k=3, progress=False)
    assert found.detect_layer == read_layer and sorted(found.pairs()) == neurons
    modified = ModifiedModel(model, hook_manager, found)
    before = measure_outliers(hook_manager, images, detect_layer=read_layer)
    after = measure_outliers(modified.hook_manager, images, detect_layer=read_layer)
    assert before.worst_max_over_median > 10 and after.worst_max_over_median <= 2


@pytest.mark.parametrize("layer", [-1, -2])
def test_internvl_generates_and_its_pixel_shuffle_gets_the_unmodified_grid(layer):
    model = internvl(layer)
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = prompt(SHUFFLED, batch=2)
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    generated, seen = generate_seeing_the_projector(modified, model, ids, mask, pixels)
    assert generated.shape == (2, ids.shape[1] + 3)
    assert seen == [torch.Size([2, SHUFFLED, 4 * 32])]     # 16 patches, 2 x 2 shuffled: 4 tokens of 4 patches each
    assert modified.register_tokens.shape == (2, 1, 32)
    with torch.no_grad():
        features = modified.get_image_features(pixel_values=pixels)
        assert features.pooler_output.shape == (2, SHUFFLED, 48)
        assert [state.shape for state in features.hidden_states if state is not None] == [(2, 1 + GRID, 32)]
        with modified.intervention():
            tower = model.model.vision_tower(pixels, output_hidden_states=True)
        assert len(tower.hidden_states) == LAYERS + 1
        assert all(state.shape == (2, 1 + GRID, 32) for state in (tower.last_hidden_state, *tower.hidden_states))
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        assert not torch.equal(modified(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, plain)
        noop = ModifiedModel(model, hook_manager, (), num_registers=0)
        assert torch.equal(noop(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, plain)


@pytest.mark.parametrize("variant", [{"use_mean_pooling": False}, {"use_qk_norm": True, "norm_type": "rms_norm"}],
                         ids=["final-layernorm", "qk-norm-rmsnorm"])
@torch.no_grad()
def test_internvl_tower_variants_keep_the_register_out_of_every_output(variant):
    """InternViT-6B's QK-norm and RMSNorm, and a real final layernorm instead of the mean-pooling Identity."""
    model = internvl(**variant)
    hook_manager = hook_manager_for(model)
    modified = ModifiedModel(model, hook_manager, [(1, 3), (2, 7)])
    pixels = marker_images(2, IMAGE, PATCH, seed=10).pixel_values
    plain = model.model.vision_tower(pixels, output_hidden_states=True)
    with modified.intervention():
        edited = model.model.vision_tower(pixels, output_hidden_states=True)
    assert [state.shape for state in edited.hidden_states] == [state.shape for state in plain.hidden_states]
    assert edited.last_hidden_state.shape == plain.last_hidden_state.shape
    assert not torch.equal(edited.last_hidden_state, plain.last_hidden_state)
    ids, mask = prompt(SHUFFLED)
    generated = modified.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1], max_new_tokens=2)
    assert generated.shape == (1, ids.shape[1] + 2)


def padded_tiles(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images of one tile each, as the processor batches a portrait image with a square one: the first is
    padded with zeros on its right half. ``(pixel_values [2, 1, 3, H, W], pixel_attention_mask [2, 1, H, W],
    padded patches [GRID] of the first)``."""
    pixels = marker_images(2, IMAGE, PATCH, seed=seed).pixel_values
    pixel_mask = torch.ones(2, IMAGE, IMAGE, dtype=torch.long)
    pixels[0, :, :, IMAGE // 2:], pixel_mask[0, :, IMAGE // 2:] = 0, 0
    columns = torch.arange(GRID) % (IMAGE // PATCH)
    return pixels[:, None], pixel_mask[:, None], columns >= IMAGE // PATCH // 2


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_a_padded_tile_keeps_its_padding_masked_and_the_register_sees_only_real_patches(family):
    model = FAMILIES[family][0]()
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    pixels, pixel_mask, padded = padded_tiles(seed=11)
    ids, mask = prompt(SHUFFLED, batch=2)
    noisy = pixels.clone()
    noisy[0, 0, :, :, IMAGE // 2:] = torch.randn(3, IMAGE, IMAGE // 2, generator=torch.Generator().manual_seed(1))
    # An empty register (no neurons: no value moved from any patch) attends and is attended through the extended
    # mask alone, so neither it nor a real patch may depend on the padded pixels.
    empty = ModifiedModel(model, hook_manager, (), num_registers=1)
    with torch.no_grad():
        features = empty.get_image_features(pixel_values=pixels, pixel_attention_mask=pixel_mask)
        register = empty.register_tokens
        changed = empty.get_image_features(pixel_values=noisy, pixel_attention_mask=pixel_mask)
    assert [tuple(f.shape) for f in features.pooler_output] == [(SHUFFLED, 48)] * 2
    torch.testing.assert_close(changed.last_hidden_state[0, ~padded], features.last_hidden_state[0, ~padded])
    torch.testing.assert_close(empty.register_tokens, register)
    assert not torch.allclose(changed.last_hidden_state[0, padded], features.last_hidden_state[0, padded])

    with torch.no_grad(), modified.capture(attention=list(range(LAYERS))) as captured:
        modified.get_image_features(pixel_values=pixels, pixel_attention_mask=pixel_mask)
    register_column = torch.cat([padded, torch.tensor([False])])
    for layer in range(LAYERS):
        attention = captured.attention[layer][0]                                  # [heads, GRID + 1, GRID + 1]
        assert attention.shape == (2, GRID + 1, GRID + 1)
        assert torch.all(attention[:, :, register_column] == 0)                  # padded patches stay masked
        assert torch.all(attention[:, -1, ~register_column] > 0)                 # the register reads every real patch
        assert torch.all(attention[:, :, -1] > 0)                                # and every token reads it

    with torch.no_grad():
        together = modified(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                            pixel_attention_mask=pixel_mask).logits
        alone = torch.cat([modified(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], pixel_values=pixels[i:i + 1],
                                    pixel_attention_mask=pixel_mask[i:i + 1]).logits for i in range(2)])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
        assert not torch.equal(together, plain)
        noop = ModifiedModel(model, hook_manager, (), num_registers=0)
        assert torch.equal(noop(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                pixel_attention_mask=pixel_mask).logits, plain)
    generated = modified.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                  pixel_attention_mask=pixel_mask, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 3)
    assert modified.register_tokens.shape == (2, 1, 32)                          # one register per tile


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_librarys_hooks_are_removed(family):
    """transformers keeps permanent capture hooks on a tower once hidden states were asked for: count ours."""
    model = FAMILIES[family][0]()
    hook_manager, neurons = planted(model)
    ids, mask = prompt(SHUFFLED)
    pixels = marker_images(1, IMAGE, PATCH, seed=4).pixel_values
    pixels = pixels if family == "internvl" else pixels[:, None]          # Idefics3 and SmolVLM: [B, tiles, 3, H, W]
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=1)   # installs its hooks
    before = hook_count(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    modified.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2)
    with torch.no_grad(), modified.capture(attention=[1], keys=[1]):
        modified.forward_images(pixels.flatten(0, -4))
    with pytest.raises(RuntimeError):
        with modified.intervention():
            raise RuntimeError("inside")
    assert hook_count(model) == before
    assert hook_manager.root.config._attn_implementation == "sdpa"     # the eager switch for the capture was undone
