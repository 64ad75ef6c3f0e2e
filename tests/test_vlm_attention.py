"""The answer-token attention overlay of vision-language models (analysis.vlm_attention) and visualize --prompt, on
tiny LLaVAs built from configs: the map against transformers' own eager attention, the restored settings, the
register's effect, the figure's structure and the command line with a processor saved offline."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from test_time_registers import (InvalidArgumentError, ModifiedModel, RegisterNeurons, hook_manager_for,
                                 load_model)
from test_time_registers.analysis.vlm_attention import (answer_attention, check_answer_attention,
                                                         compare_answer_attention, draw_answer_attention, draw_views,
                                                         load_processor, normalised_entropy, prompt_text,
                                                         read_layer_norms, top_norm_mass)
from test_time_registers.analysis.visualize import display_pixels
from test_time_registers.data.sources import IMAGENET_MEAN, IMAGENET_STD
from test_time_registers.errors import ModelLoadError
from test_time_registers.planting import marker_images, plant_register_neurons
from test_time_registers.scripts import visualize
from tests.tiny_models import hook_count
from tests.tiny_vlms import GRID, IMAGE, IMAGE_TOKEN, PATCH, image_tokens, llava, llava_next, paligemma

PANELS_PER_IMAGE = {"input": 1, "norms": 2, "attention": 2, "overlay": 2}


def left_padded(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts whose image tokens sit at different positions: row 0 left-padded by 2, row 1 with more text."""
    ids = torch.tensor([[0, 0, 1, 2] + [IMAGE_TOKEN] * tokens + [3, 4],
                        [1, 2, 5, 6] + [IMAGE_TOKEN] * tokens + [3, 4]])
    mask = torch.tensor([[0, 0] + [1] * (tokens + 4), [1] * (tokens + 6)])
    return ids, mask


def planted(model):
    hook_manager = hook_manager_for(model)
    return hook_manager, plant_register_neurons(hook_manager, marker_images(24, IMAGE, PATCH, seed=0), layer=1,
                                                count=3)


def eager_reference(model, ids, mask, pixels) -> torch.Tensor:
    """[layers, B, T]: transformers' own eager attention of the last prompt row at the image tokens, head mean."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": previous})
    positions = (ids == IMAGE_TOKEN).nonzero()[:, 1].view(len(ids), -1)
    return torch.stack([layer[:, :, -1].gather(-1, positions[:, None].expand(-1, layer.shape[1], -1)).mean(dim=1)
                        for layer in output.attentions])


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_the_map_is_the_eager_attention_of_the_last_prompt_row_at_each_rows_image_tokens(strategy):
    model = llava(strategy=strategy)
    tokens = image_tokens(strategy)
    ids, mask = left_padded(tokens)
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    found = answer_attention(model, ids, pixels, attention_mask=mask)
    reference = eager_reference(model, ids, mask, pixels)
    assert found.per_layer.shape == (2, 2, tokens) and found.grid == (4, 4)
    assert found.positions.tolist() == [list(range(4, 4 + tokens))] * 2
    torch.testing.assert_close(found.per_layer, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found.image_tokens, reference.mean(dim=0), atol=1e-6, rtol=1e-5)
    leading = int(strategy == "full")   # the CLS token is an image token, not a patch
    assert found.leading == leading
    torch.testing.assert_close(found.maps, reference.mean(dim=0)[:, leading:].view(2, 4, 4), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found.on_image, reference.mean(dim=0).sum(dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found.patch_shares.sum(dim=(1, 2)), torch.ones(2))
    assert [len(answer) for answer in found.answer_ids] == [1, 1]


def test_later_answer_tokens_average_their_own_rows():
    model = llava()
    ids, mask = left_padded(GRID)
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    first = answer_attention(model, ids, pixels, attention_mask=mask)
    three = answer_attention(model, ids, pixels, attention_mask=mask, max_new_tokens=3)
    assert three.per_layer.shape == first.per_layer.shape
    assert all(len(answer) <= 3 for answer in three.answer_ids) and not torch.equal(three.per_layer, first.per_layer)


def test_the_language_model_gets_its_attention_back_and_no_hook_stays():
    model = llava()
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = left_padded(GRID)
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=1)   # transformers' hooks
    seen = []
    spy = model.model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(
        (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)))
    before = hook_count(model)
    settings = (model.config._attn_implementation, model.config.text_config._attn_implementation,
                model.config.vision_config._attn_implementation)
    assert settings == ("sdpa", "sdpa", "sdpa")
    for run in (model, modified):
        answer_attention(run, ids, pixels, attention_mask=mask)
    with pytest.raises(InvalidArgumentError, match="beam search"):   # raised by the hook, inside generate
        answer_attention(modified, ids, pixels, attention_mask=mask, num_beams=2)
    assert seen == [("eager", "sdpa")] * 3   # the language model was eager inside, the tower never changed
    assert hook_count(model) == before
    assert (model.config._attn_implementation, model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == settings
    assert model.model.language_model.config._attn_implementation == "sdpa"
    spy.remove()


def test_an_eager_language_model_stays_eager():
    model = llava()
    model.set_attn_implementation({"text_config": "eager"})
    ids, mask = left_padded(GRID)
    answer_attention(model, ids, marker_images(2, IMAGE, PATCH, seed=2).pixel_values, attention_mask=mask)
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_the_register_moves_the_answer_attention_and_flattens_the_norms_at_the_read_layer():
    model = llava()
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = left_padded(GRID)
    pixels = marker_images(2, IMAGE, PATCH, seed=3).pixel_values
    before = answer_attention(model, ids, pixels, attention_mask=mask)
    after = answer_attention(modified, ids, pixels, attention_mask=mask)
    assert (before.maps - after.maps).abs().max() > 1e-4
    assert hook_manager.read_layers == (2,)
    norms_before, norms_after = read_layer_norms(hook_manager, pixels), read_layer_norms(modified.hook_manager, pixels)
    assert norms_before.shape == norms_after.shape == (2, 4, 4)
    ratio = lambda norms: norms.flatten(1).amax(dim=1) / norms.flatten(1).median(dim=1).values  # noqa: E731
    assert (ratio(norms_before) > 5).all() and (ratio(norms_after) <= 2).all()


def test_paligemma_maps_its_tokens_onto_the_grid():
    model = paligemma()
    ids = torch.tensor([[IMAGE_TOKEN] * GRID + [1, 2, 3]])
    found = answer_attention(model, ids, marker_images(1, IMAGE, PATCH, seed=4).pixel_values,
                             token_type_ids=torch.tensor([[0] * (GRID + 3)]))
    assert found.maps.shape == (1, 4, 4) and found.leading == 0 and 0 < float(found.on_image) <= 1


def test_what_is_not_supported_yet_is_refused_with_the_reason():
    model = llava()
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    ids, mask = left_padded(GRID)
    uneven = ids.clone()
    uneven[0, 4] = 7
    with pytest.raises(InvalidArgumentError, match=r"same number of image tokens.*\[15, 16\]"):
        answer_attention(model, uneven, pixels, attention_mask=mask)
    with pytest.raises(InvalidArgumentError, match="3 images for 2 prompts"):
        answer_attention(model, ids, marker_images(3, IMAGE, PATCH, seed=2).pixel_values, attention_mask=mask)
    with pytest.raises(InvalidArgumentError, match="no image token"):
        answer_attention(model, torch.tensor([[1, 2, 3]]), pixels[:1])
    with pytest.raises(InvalidArgumentError, match="not the tower's 4x4 = 16 patches one to one"):
        answer_attention(model, torch.tensor([[IMAGE_TOKEN] * 12 + [3]]), pixels[:1])
    crops = marker_images(3, IMAGE, PATCH, seed=6).pixel_values[None]
    with pytest.raises(InvalidArgumentError, match="anyres tiles.*not supported yet"):
        answer_attention(llava_next(), torch.tensor([[IMAGE_TOKEN] * 16 + [3]]), crops,
                         image_sizes=torch.tensor([[IMAGE, 2 * IMAGE]]))
    assert model.config.text_config._attn_implementation == "sdpa"


def test_the_numbers_beside_the_maps():
    uniform = torch.full((1, 4, 4), 1 / 16)
    one_patch = torch.zeros(1, 4, 4)
    one_patch[0, 1, 2] = 1
    assert math.isclose(float(normalised_entropy(uniform)), 1.0, rel_tol=1e-6)
    assert float(normalised_entropy(one_patch)) == 0.0
    norms = torch.ones(1, 4, 4)
    norms[0, 1, 2], norms[0, 3, 3] = 50, 40
    assert float(top_norm_mass(one_patch, norms, 1)) == 1.0
    assert math.isclose(float(top_norm_mass(uniform, norms, 2)), 2 / 16)


# ---- the figure ---------------------------------------------------------------------------------
def panel_labels(figure) -> list[str]:
    return [ax.get_label() for ax in figure.axes if ax.get_label().split(" ")[0] in PANELS_PER_IMAGE]


@pytest.fixture(scope="module")
def figure_views():
    model = llava()
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = left_padded(GRID)
    pixels = marker_images(2, IMAGE, PATCH, seed=3).pixel_values
    return dict(before=answer_attention(model, ids, pixels, attention_mask=mask),
                after=answer_attention(modified, ids, pixels, attention_mask=mask),
                images=display_pixels(pixels), norms_before=read_layer_norms(hook_manager, pixels),
                norms_after=read_layer_norms(modified.hook_manager, pixels))


def test_the_figure_has_every_labelled_panel_and_saves(figure_views, tmp_path):
    figure = draw_answer_attention(**figure_views, read_layer=2, names=["scene a", "scene b"],
                                   answers={"before": ["w1", "w2"], "after": ["w1", "w3"]}, prompt="<image> w5 w6",
                                   model="tiny LLaVA")
    labels = panel_labels(figure)
    expected = {f"{kind} variant={when} image={image}" for kind in ("norms", "attention", "overlay")
                for when in ("before", "after") for image in (0, 1)} | {"input image=0", "input image=1"}
    assert len(labels) == 2 * sum(PANELS_PER_IMAGE.values()) and set(labels) == expected
    bars = [ax.get_label() for ax in figure.axes if ax.get_label().startswith("colour bar")]
    assert sorted(bars) == [f"colour bar {kind} image={image}" for kind in ("attention", "norms") for image in (0, 1)]
    by_label = {ax.get_label(): ax for ax in figure.axes}
    shown = by_label["attention variant=after image=1"].get_images()[0].get_array()
    torch.testing.assert_close(torch.as_tensor(np.asarray(shown)), figure_views["after"].patch_shares[1])
    caption = by_label["attention variant=before image=0"].get_xlabel()
    assert "top-1 norm patches" in caption and "on image tokens" in caption and "entropy" in caption
    assert by_label["norms variant=after image=0"].get_xlabel().startswith("largest/median")
    assert len(by_label["overlay variant=before image=0"].get_images()) == 2   # the input, the map over it
    path = tmp_path / "answer_attention.png"
    figure.savefig(path, dpi=80)
    assert Image.open(path).size[0] > 500


def test_mismatched_inputs_are_refused(figure_views):
    with pytest.raises(InvalidArgumentError, match="one of each per image"):
        draw_answer_attention(**{**figure_views, "images": figure_views["images"][:1]})


# ---- with a processor, and the command line -------------------------------------------------------
def tiny_processor(strategy: str = "default"):
    """A LlavaProcessor that works offline: a word-level tokenizer (words w0..w94, <image> = the config's id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{index}" for index in range(IMAGE_TOKEN - 4)]
    vocabulary = {word: index for index, word in enumerate(words)} | {"<image>": IMAGE_TOKEN}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1)


def saved_llava(folder, with_tokenizer=True) -> RegisterNeurons:
    """A tiny LLaVA with planted neurons saved like a checkpoint, its image processor (preprocessor_config.json,
    which the tower's transform reads) and, ``with_tokenizer``, its whole processor beside it; the neurons."""
    model = llava()
    _, neurons = planted(model)
    model.save_pretrained(folder)
    processor = tiny_processor()
    if with_tokenizer:
        processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return RegisterNeurons.coerce(neurons)


def image_files(folder, count, seed):
    folder.mkdir()
    pixels = marker_images(count, IMAGE, PATCH, seed=seed).pixel_values
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for index, image in enumerate(pixels):
        array = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"marked_{index:02d}.png")
    return folder


def test_the_processor_expands_the_image_and_the_prompt_finds_its_place(tmp_path):
    processor = tiny_processor()
    assert prompt_text(processor, "w1 <image> w2") == "w1 <image> w2"
    assert prompt_text(processor, "w5 w6") == "<image>\nw5 w6"
    processor.chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                               "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    assert prompt_text(processor, "w5 w6") == "USER: <image> w5 w6 ASSISTANT:"
    assert check_answer_attention(llava(), tiny_processor(), "w5") == (4, 4)
    assert check_answer_attention(llava(strategy="full"), tiny_processor("full"), "w5") == (4, 4)
    with pytest.raises(InvalidArgumentError, match="not the tower's 4x4"):   # the processor counts CLS, the model not
        check_answer_attention(llava(), tiny_processor("full"), "w5")


def test_compare_runs_the_model_and_its_registers_from_pil_images(tmp_path):
    neurons = saved_llava(tmp_path / "llava")
    loaded = load_model(f"hf:{tmp_path / 'llava'}")
    processor = load_processor(str(tmp_path / "llava"))
    images = [Image.open(path) for path in sorted(image_files(tmp_path / "images", 3, 5).glob("*.png"))]
    views = compare_answer_attention(loaded, neurons, images, "w5 w6", processor, batch_size=2, progress=False)
    assert views.names == ["image_0", "image_1", "image_2"] and views.read_layer == 2
    assert views.pixels.shape == (3, IMAGE, IMAGE, 3) and views.norms["after"].shape == (3, 4, 4)
    assert views.attention["before"].maps.shape == (3, 4, 4) and len(views.answers["after"]) == 3
    assert views.prompt == "<image>\nw5 w6"
    numbers = views.numbers()
    assert all(item.max_over_median["before"] > 5 and item.max_over_median["after"] <= 2 for item in numbers)
    assert len(panel_labels(draw_views(views))) == 3 * sum(PANELS_PER_IMAGE.values())
    with pytest.raises(ModelLoadError, match="could not load the processor"):
        load_processor(str(tmp_path / "images"))


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_the_command_line_writes_the_answer_attention_figure(tmp_path, capsys):
    neurons = saved_llava(tmp_path / "llava")
    neurons_file = neurons.save(tmp_path / "neurons.json")
    images = image_files(tmp_path / "images", 3, 1)
    out = tmp_path / "figures"
    assert visualize.main(["--model", f"hf:{tmp_path / 'llava'}", "--neurons", str(neurons_file), "--images",
                           str(images), "--prompt", "w5 w6 w7", "--answer-tokens", "2", "--num-images", "2",
                           "--layers", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (out / "answer_attention.png").is_file() and (out / "all_figures.pdf").is_file()
    assert "patch norms at block 2" in printed and "on the top-1 norm patches" in printed
    assert Image.open(out / "answer_attention.png").size[0] > 500


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """``({"LLAVA", "BARE" (no tokenizer), "DINO" (no language model): hf:DIR}, an image folder)``."""
    from tests.tiny_models import dinov2_model

    folder = tmp_path_factory.mktemp("saved")
    saved_llava(folder / "llava")
    saved_llava(folder / "bare", with_tokenizer=False)
    dinov2_model().save_pretrained(folder / "dino")
    return {name: f"hf:{folder / name.lower()}" for name in ("LLAVA", "BARE", "DINO")}, image_files(folder / "images",
                                                                                                   2, 1)


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "w5"], "--prompt needs a vision-language model given as hf:DIR or hf:ID"),
    (["--answer-tokens", "2"], "--answer-tokens only applies to --prompt"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--model", "LLAVA", "--prompt", "w5", "--answer-tokens", "0"], "--answer-tokens: expected a positive integer"),
    (["--model", "BARE", "--prompt", "w5"], "--prompt: could not load the processor of"),
    (["--model", "DINO", "--prompt", "w5"], "--prompt needs a vision-language model, and no language model reads"),
])
def test_bad_prompt_flags_are_one_line_and_write_nothing(saved_models, tmp_path, capsys, flags, message):
    specs, images = saved_models
    capsys.readouterr()
    out = tmp_path / "figures"
    flags = [specs.get(flag, flag) for flag in flags]
    assert visualize.main(["--images", str(images), "--out", str(out), "--quiet", *flags]) == 2
    assert message in error_line(capsys)
    assert not out.exists()
