"""Test-time registers inside vision-language models (clip.vlm, hf): the tower found by its config, the read layers,
discovery at the read layer, generate() under every read layer and strategy, tiles, refusals, the hf: spec and the
command line, all on tiny models built from configs."""

import pytest
import torch
from PIL import Image

from test_time_registers import ModifiedModel, UnsupportedModelError, find_register_neurons, hook_manager_for
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.data.sources import IMAGENET_MEAN, IMAGENET_STD
from test_time_registers.hf import language_model_reads, vision_tower_path
from test_time_registers.planting import marker_images
from tests.tiny_models import hook_count
from tests.tiny_vlms import (GRID, IMAGE, PATCH, aya_vision, gemma3, generate_seeing_the_projector, image_tokens,
                             llava, llava_next, marker_files, onevision, paligemma, planted, prompt, vip_llava)


def test_the_tower_is_found_by_its_config_and_the_read_layers_by_the_models_settings():
    model = llava(-2)
    assert vision_tower_path(model) == "model.vision_tower"
    assert language_model_reads(model, 4) == (2,)
    assert language_model_reads(llava([-2, -3]), 4) == (2, 1) and language_model_reads(llava(-1), 4) == (3,)
    assert language_model_reads(vip_llava(), 4) == (2, 1, 0)       # ViP-LLaVA's vision_feature_layers
    assert language_model_reads(paligemma(), 4) == (3,)              # last_hidden_state: the last block
    hook_manager = hook_manager_for(model)
    assert hook_manager.root is model.model.vision_tower and hook_manager.image_model is model.model.vision_tower
    assert hook_manager.default_detect_layer == 2                    # the last block is dead compute for LLaVA
    assert {"generate", "get_image_features"} <= set(hook_manager.forward_methods)
    assert language_model_reads(llava([0, -1]), 4) == (3,)                # hidden state 0 is the embeddings
    with pytest.raises(UnsupportedModelError, match="its tower has 4 blocks"):
        language_model_reads(llava(-6), 4)


def test_planted_neurons_are_found_at_the_read_layer_and_the_register_takes_their_outliers():
    model = llava(-2)
    hook_manager, neurons = planted(model)
    images = marker_images(24, IMAGE, PATCH, seed=1).pixel_values
    found = find_register_neurons(hook_manager, images, top_k=3, progress=False)
    assert found.detect_layer == 2 and sorted(found.pairs()) == neurons
    assert found.extra["tower"] == {"class": "CLIPVisionModel", "read_layers": [2]}   # recorded in the neuron file
    modified = ModifiedModel(model, hook_manager, found)
    before = measure_outliers(hook_manager, images, detect_layer=2)
    after = measure_outliers(modified.hook_manager, images, detect_layer=2)
    assert before.worst_max_over_median > 10 and after.worst_max_over_median <= 2


@pytest.mark.parametrize("layer", [-2, -1, [-2, -3]], ids=["-2", "-1", "[-2,-3]"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_generate_works_and_the_projector_gets_the_unmodified_token_count(layer, strategy):
    model = llava(layer, strategy)
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = prompt(image_tokens(strategy), batch=2)
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    generated, seen = generate_seeing_the_projector(modified, model, ids, mask, pixels)
    assert generated.shape == (2, ids.shape[1] + 3)
    width = 32 * (len(layer) if isinstance(layer, list) else 1)
    assert seen == [torch.Size([2, image_tokens(strategy), width])]      # the tower ran once, before prefill
    assert modified.register_tokens.shape == (2, 1, 32)
    with torch.no_grad():   # the register changed what the language model saw
        assert not torch.equal(modified(input_ids=ids, pixel_values=pixels).logits,
                               model(input_ids=ids, pixel_values=pixels).logits)


def test_the_tower_returns_unmodified_hidden_states_inside_the_model():
    model = llava(-2)
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    with torch.no_grad(), modified.intervention():
        output = model.model.vision_tower(pixels, output_hidden_states=True)
    assert all(state.shape == (2, GRID + 1, 32) for state in output.hidden_states)


def test_batches_change_nothing_and_the_no_op_wrapper_is_bit_identical():
    model = llava(-2)
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = prompt(GRID, batch=3)
    pixels = marker_images(3, IMAGE, PATCH, seed=3).pixel_values
    with torch.no_grad():
        together = modified(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        alone = torch.cat([modified(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1],
                                    pixel_values=pixels[i:i + 1]).logits for i in range(3)])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        noop = ModifiedModel(model, hook_manager, (), num_registers=0)
        assert torch.equal(noop(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, plain)


def test_only_the_librarys_hooks_are_removed():
    """transformers keeps permanent capture hooks on the tower once hidden states were asked for: count ours."""
    model = llava(-2)
    hook_manager, neurons = planted(model)
    ids, mask = prompt(GRID)
    pixels = marker_images(1, IMAGE, PATCH, seed=4).pixel_values
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=1)   # installs its hooks
    before = hook_count(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    modified.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2)
    with pytest.raises(RuntimeError):
        with modified.intervention():
            raise RuntimeError("inside")
    assert hook_count(model) == before


def test_vip_llava_reads_several_layers_and_each_is_clean():
    model = vip_llava()
    hook_manager, neurons = planted(model, layer=0)
    assert hook_manager.default_detect_layer == 2
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = prompt(GRID)
    generated = modified.generate(input_ids=ids, attention_mask=mask,
                                  pixel_values=marker_images(1, IMAGE, PATCH, seed=5).pixel_values, max_new_tokens=2)
    assert generated.shape == (1, ids.shape[1] + 2)


def test_llava_next_tiles_are_tower_batch_elements_each_with_its_register():
    model = llava_next()
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    crops = marker_images(3, IMAGE, PATCH, seed=6).pixel_values[None]          # [1 image, 3 crops, 3, H, W]
    image_size = torch.tensor([[IMAGE, 2 * IMAGE]])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=crops, image_sizes=image_size)
        tokens = sum(feature.shape[0] for feature in (features.pooler_output if hasattr(features, "pooler_output")
                                                      else features))
        ids, mask = prompt(tokens)
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=crops, image_sizes=image_size).logits
        edited = modified(input_ids=ids, attention_mask=mask, pixel_values=crops, image_sizes=image_size).logits
    assert edited.shape == plain.shape and not torch.equal(edited, plain)
    assert modified.register_tokens.shape == (3, 1, 32)                          # one register per crop


def test_paligemma_reads_the_last_hidden_state_and_generates():
    model = paligemma()
    hook_manager, neurons = planted(model)
    assert hook_manager.default_detect_layer == 3
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = prompt(GRID)
    generated = modified.generate(input_ids=ids, attention_mask=mask,
                                  pixel_values=marker_images(1, IMAGE, PATCH, seed=7).pixel_values, max_new_tokens=2)
    assert generated.shape == (1, ids.shape[1] + 2)


REFUSED = {
    "Qwen2VLForConditionalGeneration": "packs every image",
    "Qwen2_5_VLForConditionalGeneration": "attends within windows",
    "Qwen3VLForConditionalGeneration": "deepstack",
    "Mistral3ForConditionalGeneration": "block-diagonal mask",
    "Llama4ForConditionalGeneration": "CLS last",
    "MllamaForConditionalGeneration": "multiple of 8",
}


@pytest.mark.parametrize("name", REFUSED)
def test_each_refused_family_says_why_in_one_error(name):
    """The real classes with their default configs, on the meta device (no memory): refused before any weight."""
    import transformers

    cls = getattr(transformers, name)
    with torch.device("meta"):
        model = cls(cls.config_class())
    with pytest.raises(UnsupportedModelError, match=REFUSED[name]):
        hook_manager_for(model)


def test_gemma4_is_refused_when_transformers_has_it():
    import transformers

    if not hasattr(transformers, "Gemma4ForConditionalGeneration"):
        assert "Gemma4ForConditionalGeneration" not in transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()
        return
    cls = transformers.Gemma4ForConditionalGeneration
    with torch.device("meta"):
        model = cls(cls.config_class())
    with pytest.raises(UnsupportedModelError, match="not a plain ViT"):
        hook_manager_for(model)


def saved_llava(folder):
    """A planted tiny LLaVA saved like a checkpoint, with an image processor normalising as marker_images do."""
    from transformers import CLIPImageProcessor

    model = llava(-2)
    _, neurons = planted(model)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                       image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(folder)
    return neurons


def test_the_hf_spec_loads_a_saved_vlm_with_its_tower_at_its_native_size(tmp_path):
    from test_time_registers import load_model

    neurons = saved_llava(tmp_path / "llava")
    loaded = load_model(f"hf:{tmp_path / 'llava'}")
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"       # with its language-model head
    assert loaded.hook_manager.default_detect_layer == 2
    assert loaded.preprocess(Image.new("RGB", (50, 20))).shape == (3, IMAGE, IMAGE)
    images = [Image.open(path) for path in sorted(marker_files(tmp_path / "images", 24, 1).glob("*.png"))]
    found = find_register_neurons(loaded.hook_manager, images, loaded.preprocess, top_k=3, progress=False)
    assert sorted(found.pairs()) == neurons and found.model == f"hf:{tmp_path / 'llava'}"


def test_the_command_line_finds_the_planted_neurons_of_a_saved_llava(tmp_path, capsys):
    from test_time_registers.scripts import find_register_neurons as command

    neurons = saved_llava(tmp_path / "llava")
    images = marker_files(tmp_path / "images", 24, 1)
    out = tmp_path / "neurons.json"
    assert command.main(["--model", f"hf:{tmp_path / 'llava'}", "--images", str(images), "--top-k", "3",
                         "--eval-images", "4", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "detect layer 2" in printed and "before/after" in printed
    from test_time_registers import RegisterNeurons

    assert sorted(RegisterNeurons.load(out).pairs()) == neurons


#: SigLIP-tower families: (builder, crops per image, image tokens the language model gets, extra inputs).
SIGLIP_FAMILIES = {
    "onevision": (onevision, 2, 2 * GRID + 4, {"image_sizes": torch.tensor([[IMAGE, IMAGE]])}),   # + newlines
    "gemma3": (gemma3, 1, 4, {}),
    "aya-vision": (aya_vision, 1, GRID // 4, {}),
}


@pytest.mark.parametrize("family", SIGLIP_FAMILIES)
def test_siglip_families_generate_with_one_register_per_crop(family):
    build, crops, tokens, extra = SIGLIP_FAMILIES[family]
    model = build()
    hook_manager, neurons = planted(model)
    assert hook_manager.default_detect_layer == 3           # last_hidden_state, or hidden state -1
    modified = ModifiedModel(model, hook_manager, neurons)
    pixels = marker_images(crops, IMAGE, PATCH, seed=8).pixel_values
    pixels = pixels[None] if family == "onevision" else pixels
    ids, mask = prompt(tokens)
    with torch.no_grad():
        plain = model.model.get_image_features(pixel_values=pixels, **extra)
        edited = modified.get_image_features(pixel_values=pixels, **extra)
    shapes = lambda features: [tuple(f.shape) for f in (features.pooler_output if hasattr(features, "pooler_output")  # noqa: E731
                                                        else features)]
    assert shapes(edited) == shapes(plain)                   # the language model gets the unmodified token count
    assert modified.register_tokens.shape == (crops, 1, 32)
    generated = modified.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2,
                                  do_sample=False, **extra)
    assert generated.shape == (1, ids.shape[1] + 2)


def test_the_tower_alone_loads_from_the_vlm_checkpoint_with_its_read_layers_and_name(tmp_path):
    """hf-tower: reads the model's config and only the tower's weights; its neurons apply to the whole model."""
    from test_time_registers import load_model

    neurons = saved_llava(tmp_path / "llava")
    whole, tower = load_model(f"hf:{tmp_path / 'llava'}"), load_model(f"hf-tower:{tmp_path / 'llava'}")
    assert type(tower.model).__name__ == "CLIPVisionModel" and tower.hook_manager.default_detect_layer == 2
    reference = whole.model.model.vision_tower.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in tower.model.state_dict().items())
    images = [Image.open(path) for path in sorted(marker_files(tmp_path / "images", 24, 1).glob("*.png"))]
    found = find_register_neurons(tower.hook_manager, images, tower.preprocess, top_k=3, progress=False)
    assert sorted(found.pairs()) == neurons and found.model == whole.hook_manager.name
    found.check_fits(whole.hook_manager)                      # same name, same tower: no --force needed
    from test_time_registers import ModelLoadError
    from tests.tiny_models import hf_tower

    hf_tower("clip").save_pretrained(tmp_path / "clip")
    with pytest.raises(ModelLoadError, match="is not a vision-language model"):
        load_model(f"hf-tower:{tmp_path / 'clip'}")


#: Every wrapped family with a CLIP or SigLIP tower, and the tower block its language model reads.
FAMILIES = {"llava": (llava, 2), "llava-full-last": (lambda: llava(-1, "full"), 3), "vip-llava": (vip_llava, 2),
            "llava-next": (llava_next, 2), "onevision": (onevision, 3), "paligemma": (paligemma, 3),
            "gemma3": (gemma3, 3), "aya-vision": (aya_vision, 3)}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_finds_its_planted_neurons_at_the_block_its_language_model_reads(family):
    build, read = FAMILIES[family]
    model = build()
    hook_manager, neurons = planted(model)
    images = marker_images(24, IMAGE, PATCH, seed=1).pixel_values
    found = find_register_neurons(hook_manager, images, top_k=3, progress=False)
    assert found.detect_layer == read and sorted(found.pairs()) == neurons
    after = measure_outliers(ModifiedModel(model, hook_manager, found).hook_manager, images, detect_layer=read)
    assert measure_outliers(hook_manager, images, detect_layer=read).worst_max_over_median > 10
    assert after.worst_max_over_median <= 2
