"""The answer-token attention overlay of vision-language models (analysis.vlm_attention) and visualize --prompt, on
tiny LLaVAs built from configs: the map against transformers' own eager attention, the restored settings, the
register's effect, the figure's structure and the command line with a processor saved offline. Then the other
packings, on tiny Gemma 3, Aya Vision, InternVL, Idefics3, SmolVLM, LLaVA-NeXT and OneVision: each token's place
read from the model's own code and checked by hand and by a feature planted at one patch, the maps against the
eager attention, the figure, and what is refused."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from test_time_registers import InvalidArgumentError, ModifiedModel, RegisterNeurons, load_model
from test_time_registers.analysis.vlm_attention import (answer_attention, check_answer_attention,
                                                         compare_answer_attention, draw_answer_attention, draw_views,
                                                         image_packing, load_processor, normalised_entropy,
                                                         prompt_text, read_layer_norms, shown_view, token_blocks,
                                                         token_rearrangement, top_norm_mass)
from test_time_registers.analysis.visualize import display_pixels
from test_time_registers.data.sources import IMAGENET_MEAN, IMAGENET_STD
from test_time_registers.errors import ModelLoadError
from test_time_registers.hf import vision_tower_path
from test_time_registers.planting import marker_images
from test_time_registers.scripts import visualize
from tests.tiny_models import hook_count
from tests.test_vlm_towers import idefics3, internvl, smolvlm
from tests.tiny_vlms import (GRID, IMAGE, IMAGE_TOKEN, PATCH, aya_vision, gemma3, image_tokens, llava, llava_next,
                             marker_files, onevision, paligemma, planted)

PANELS_PER_IMAGE = {"input": 1, "norms": 2, "attention": 2, "overlay": 2}


def left_padded(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts whose image tokens sit at different positions: row 0 left-padded by 2, row 1 with more text."""
    ids = torch.tensor([[0, 0, 1, 2] + [IMAGE_TOKEN] * tokens + [3, 4],
                        [1, 2, 5, 6] + [IMAGE_TOKEN] * tokens + [3, 4]])
    mask = torch.tensor([[0, 0] + [1] * (tokens + 4), [1] * (tokens + 6)])
    return ids, mask


def eager_reference(model, ids, mask, pixels, **extra) -> torch.Tensor:
    """[layers, B, T]: transformers' own eager attention of the last prompt row at the image tokens, head mean."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True, **extra)
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


def test_what_is_not_supported_is_refused_with_the_reason():
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
    with pytest.raises(InvalidArgumentError, match=r"16 image tokens per prompt, but its own packing of \[3\] crops "
                                                   r"\(image sizes \[\[32, 64\]\]\) gives \[52\]"):
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


# ---- packings other than one token per patch --------------------------------------------------------
#: The patches (row-major on the tower's 4x4 grid) that each of the 4 tokens of a 2x2 pooling or pixel shuffle
#: takes, in the language model's order: written out by hand, to check both the models and image_packing.
BLOCKS = [{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}]


def gemma3_projecting():
    """Gemma 3 with a projection that is not zero (it starts at zero), so that image features carry the patches."""
    model = gemma3()
    with torch.no_grad():
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5,
                              generator=torch.Generator().manual_seed(0))
    return model


#: family: (builder, whether pixel values hold tiles [B, tiles, 3, H, W], the packing's description).
COARSE = {
    "gemma3": (gemma3_projecting, False, "the 2x2 token grid of a 2x2 average pooling"),
    "aya-vision": (aya_vision, False, "the 2x2 token grid of a 2x2 pixel shuffle"),
    "internvl": (internvl, False, "the 2x2 token grid of a 2x2 pixel shuffle"),
    "idefics3": (idefics3, True, "the 2x2 token grid of a 2x2 pixel shuffle"),
    "smolvlm": (smolvlm, True, "the 2x2 token grid of a 2x2 pixel shuffle"),
}
COARSE_TOKENS = GRID // 4
DIAGONALS = [0, 5, 10, 15, 1, 6, 11, 12, 2, 7, 8, 13, 3, 4, 9, 14]   # 4 tokens of patches that are no block


def coarse_pixels(family: str, count: int, seed: int) -> torch.Tensor:
    pixels = marker_images(count, IMAGE, PATCH, seed=seed).pixel_values
    return pixels[:, None] if COARSE[family][1] else pixels


def planted_patch_tokens(model, pixels: torch.Tensor, patch: int) -> list[int]:
    """The image tokens that change when the tower's output (every state the model may read) is zero but for one
    vector at ``patch``: what the model's own get_image_features (reshape, pooling or shuffle, projector) does."""
    tower = model.get_submodule(vision_tower_path(model))
    vector = torch.linspace(1, 2, tower.config.hidden_size)

    def features(planted: bool) -> torch.Tensor:
        def plant(module, args, output):
            for state in (output.last_hidden_state, *(getattr(output, "hidden_states", None) or ())):
                if isinstance(state, torch.Tensor):
                    state.zero_()
                    if planted:
                        state[:, state.shape[1] - GRID + patch] = vector   # CLS (InternVL) first, then the patches
            return output

        handle = tower.register_forward_hook(plant)
        try:
            with torch.no_grad():
                output = model.model.get_image_features(pixel_values=pixels, output_hidden_states=True)
        finally:
            handle.remove()
        pooled = output.pooler_output
        return torch.cat([part.reshape(-1, part.shape[-1]) for part in (pooled if isinstance(pooled, (list, tuple))
                                                                         else [pooled])])

    return ((features(True) - features(False)).abs().amax(dim=-1) > 1e-6).nonzero()[:, 0].tolist()


@pytest.mark.parametrize("family", COARSE)
def test_each_token_takes_the_block_the_models_own_code_gives_it(family):
    model = COARSE[family][0]()
    pixels = coarse_pixels(family, 1, seed=2)
    packing = image_packing(model, pixels, COARSE_TOKENS)
    assert packing.describe() == COARSE[family][2]
    assert (packing.grid, packing.block, packing.patch_grid, packing.leading, packing.view) == ((2, 2), (2, 2),
                                                                                                (4, 4), 0, 0)
    # image_packing: token t sits at cell (row, col) of the 2x2 token grid, the 2x2 block of patches there
    taken = [{(2 * row + r) * 4 + 2 * col + c for r in (0, 1) for c in (0, 1)}
             for _, row, col in packing.places[0].tolist()]
    assert taken == BLOCKS
    assert packing.cells.tolist() == [[0, 1, 2, 3]]                  # the models keep the token grid row-major
    # index-valued features through the model's own rearrangement alone
    _, rearrange = token_rearrangement(model)
    with torch.no_grad():
        shuffled = rearrange(torch.arange(float(GRID)).view(1, GRID, 1))[0]
    if family == "gemma3":       # averages: the mean index of each block
        assert shuffled[:, 0].tolist() == [sum(block) / 4 for block in BLOCKS]
    else:                        # moves: the indices themselves
        assert [set(token.long().tolist()) for token in shuffled] == BLOCKS
    # a feature planted at one patch of the tower's output changes only the token that takes it, end to end
    for patch in range(GRID):
        assert planted_patch_tokens(model, pixels, patch) == [next(t for t, block in enumerate(BLOCKS)
                                                                   if patch in block)]


@pytest.mark.parametrize("family", COARSE)
def test_coarse_maps_are_the_eager_attention_rearranged_onto_the_token_grid(family):
    model = COARSE[family][0]()
    ids, mask = left_padded(COARSE_TOKENS)
    pixels = coarse_pixels(family, 2, seed=3)
    found = answer_attention(model, ids, pixels, attention_mask=mask)
    reference = eager_reference(model, ids, mask, pixels)
    torch.testing.assert_close(found.per_layer, reference, atol=1e-6, rtol=1e-5)
    assert found.positions.tolist() == [list(range(4, 4 + COARSE_TOKENS))] * 2 and found.grid == (2, 2)
    manual = reference.mean(dim=0)[:, [0, 1, 2, 3]].view(2, 2, 2)    # tokens 0..3 at cells (0,0), (0,1), (1,0), (1,1)
    torch.testing.assert_close(found.maps, manual, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found.layer_maps, reference.view(-1, 2, 2, 2), atol=1e-6, rtol=1e-5)
    assert model.config.text_config._attn_implementation == "sdpa"


def row_major_blocks(side: int, scale: int) -> list[set[int]]:
    """Token t of a scale x scale merge of a side x side grid, tokens row-major: the block at its cell."""
    tokens = side // scale
    return [{(row * scale + r) * side + col * scale + c for r in range(scale) for c in range(scale)}
            for row in range(tokens) for col in range(tokens)]


@pytest.mark.parametrize("family, scale, side", [("idefics3", 3, 6), ("idefics3", 4, 8), ("internvl", 4, 8),
                                                 ("aya-vision", 3, 9)])
def test_larger_shuffles_of_the_models_own_code_are_row_major_blocks(family, scale, side):
    """Real checkpoints shuffle by 3 or 4 (SmolVLM) on 26..32-patch grids: index-valued features through the model's
    own pixel shuffle at that scale, against blocks written out by hand, and token_blocks reading the same."""
    model = COARSE[family][0]()
    if family == "idefics3":
        model.model.connector.scale_factor = scale
    elif family == "internvl":
        model.config.downsample_ratio = 1 / scale
    else:
        model.model.multi_modal_projector.downsample_factor = scale
    _, rearrange = token_rearrangement(model)
    with torch.no_grad():
        shuffled = rearrange(torch.arange(float(side * side)).view(1, -1, 1))[0]
    assert [set(token.long().tolist()) for token in shuffled] == row_major_blocks(side, scale)
    grid, block, places = token_blocks(rearrange, (side, side))
    assert grid == (side // scale,) * 2 and block == (scale, scale)
    assert places.tolist() == [[row, col] for row in range(side // scale) for col in range(side // scale)]


def test_tiles_then_the_whole_image_the_map_shows_the_whole_image():
    """Idefics3/SmolVLM: each tile's tokens in turn, the whole image (resized to one tile) last; that is the map."""
    model = idefics3()
    tiles = torch.stack([marker_images(2, IMAGE, PATCH, seed=seed).pixel_values for seed in (4, 5, 6)], dim=1)
    ids, mask = left_padded(3 * COARSE_TOKENS)
    found = answer_attention(model, ids, tiles, attention_mask=mask)
    assert found.packing.view == 2 and found.packing.num_views == 3 and found.grid == (2, 2)
    assert found.packing.places[0, :, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    reference = eager_reference(model, ids, mask, tiles)
    torch.testing.assert_close(found.maps, reference.mean(dim=0)[:, 8:].view(2, 2, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found.on_image, reference.mean(dim=0).sum(dim=-1), atol=1e-6, rtol=1e-5)
    assert torch.equal(shown_view(tiles, found.packing), tiles[:, 2])


def next_expected_places() -> list[list[int]]:
    """LLaVA-NeXT's tokens for a 32x48 image, worked out by hand from its packing: the 4x4 base view, then the 1x2
    tiles as one 4x8 canvas unpadded to the image's 2:3 (canvas columns 1..6 kept), a newline after each row."""
    base = [[0, row, col] for row in range(4) for col in range(4)]
    tiles = []
    for row in range(4):
        tiles += [[1 + column // 4, row, column % 4] for column in range(1, 7)] + [[-1, -1, -1]]
    return base + tiles


def test_llava_next_places_every_token_by_its_own_packing_and_maps_the_base_view():
    model = llava_next()
    sizes = torch.tensor([[IMAGE, 3 * IMAGE // 2]] * 2)
    crops = torch.stack([marker_images(3, IMAGE, PATCH, seed=seed).pixel_values for seed in (6, 7)])  # base + 2 tiles
    with torch.no_grad():   # the model's own count of image tokens for this image
        tokens = model.model.get_image_features(pixel_values=crops, image_sizes=sizes).pooler_output[0].shape[0]
    assert tokens == len(next_expected_places()) == 44
    ids, mask = left_padded(tokens)
    found = answer_attention(model, ids, crops, attention_mask=mask, image_sizes=sizes)
    assert found.packing.places.tolist() == [next_expected_places()] * 2
    assert found.packing.describe() == "the 4x4 base view of the anyres crops (tiles and newlines not drawn)"
    assert found.packing.num_views == 3 and found.grid == (4, 4) and found.packing.view == 0
    reference = eager_reference(model, ids, mask, crops, image_sizes=sizes)
    torch.testing.assert_close(found.per_layer, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found.maps, reference.mean(dim=0)[:, :GRID].view(2, 4, 4), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(found.on_image, reference.mean(dim=0).sum(dim=-1), atol=1e-6, rtol=1e-5)
    assert torch.equal(shown_view(crops, found.packing), crops[:, 0])


def test_onevision_maps_its_base_view_and_refuses_an_interpolated_packing():
    model = onevision()
    sizes = torch.tensor([[IMAGE, IMAGE]])
    crops = marker_images(2, IMAGE, PATCH, seed=8).pixel_values[None]              # base + 1 tile
    ids, mask = left_padded(2 * GRID + 4)                                          # + a newline per tile row
    found = answer_attention(model, ids[:1], crops, attention_mask=mask[:1], image_sizes=sizes)
    assert found.packing.places[0, GRID:].tolist() == sum(([[1, row, col] for col in range(4)] + [[-1, -1, -1]]
                                                            for row in range(4)), [])
    reference = eager_reference(model, ids[:1], mask[:1], crops, image_sizes=sizes)
    torch.testing.assert_close(found.maps, reference.mean(dim=0)[:, :GRID].view(1, 4, 4), atol=1e-6, rtol=1e-5)

    model.config.image_grid_pinpoints = [[IMAGE, 2 * IMAGE]]                       # 1x2 tiles: 2 crops' worth
    wide, wide_sizes = marker_images(3, IMAGE, PATCH, seed=8).pixel_values[None], torch.tensor([[IMAGE, 2 * IMAGE]])
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=wide, image_sizes=wide_sizes,
                                                vision_aspect_ratio="anyres_max_1").pooler_output[0].shape[0]
    ids, mask = left_padded(tokens)
    with pytest.raises(InvalidArgumentError, match=r"mixes the patches.*'anyres_max_1' interpolates"):
        answer_attention(model, ids[:1], wide, attention_mask=mask[:1], image_sizes=wide_sizes,
                         vision_aspect_ratio="anyres_max_1")
    assert model.config.text_config._attn_implementation == "sdpa"


def test_other_packings_are_refused_with_the_reason():
    pixels = marker_images(2, IMAGE, PATCH, seed=2).pixel_values
    with pytest.raises(InvalidArgumentError, match=r"3 images for 2 prompts.*pan-and-scan"):
        answer_attention(gemma3(), *left_padded(COARSE_TOKENS)[:1], marker_images(3, IMAGE, PATCH).pixel_values)
    ids, mask = left_padded(GRID)
    with pytest.raises(InvalidArgumentError, match=r"16 image tokens per prompt, but its 2x2 pixel shuffle of the 4x4 "
                                                   r"patches gives 4 tokens"):
        answer_attention(internvl(), ids, pixels, attention_mask=mask)
    with pytest.raises(InvalidArgumentError, match="2 tiles of 4 tokens each"):
        answer_attention(smolvlm(), *left_padded(COARSE_TOKENS)[:1], torch.stack([pixels, pixels], dim=1))
    crops = marker_images(3, IMAGE, PATCH, seed=6).pixel_values[None]
    with pytest.raises(InvalidArgumentError, match="anyres tiles need pixel values .* and no image_sizes"):
        answer_attention(llava_next(), torch.tensor([[IMAGE_TOKEN] * 44 + [3]]), crops)
    with pytest.raises(InvalidArgumentError, match=r"\[2\] images per prompt; the map takes one"):
        answer_attention(onevision(), torch.tensor([[IMAGE_TOKEN] * 36 + [3]]), crops[:, :2],
                         image_sizes=torch.tensor([[IMAGE, IMAGE]]), batch_num_images=torch.tensor([2]))
    with pytest.raises(InvalidArgumentError, match="does not give each image token one aligned block"):
        token_blocks(lambda features: features[:, DIAGONALS].reshape(1, 4, -1), (4, 4), "a diagonal merge")


def test_top_norm_mass_on_a_token_grid_counts_the_tokens_that_hold_the_patches():
    shares = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
    norms = torch.ones(1, 4, 4)
    norms[0, 0, 3], norms[0, 1, 2], norms[0, 3, 0] = 9, 8, 7       # two in token (0, 1), one in token (1, 0)
    assert math.isclose(float(top_norm_mass(shares, norms, 2)), 0.2, rel_tol=1e-6)
    assert math.isclose(float(top_norm_mass(shares, norms, 3)), 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("family", ["llava-next", "idefics3"])
def test_the_map_is_drawn_on_the_view_it_shows_with_that_views_norms(family):
    """The base view of anyres crops, the whole image (last) of Idefics3 tiles: its pixels and its patch norms."""
    if family == "llava-next":
        model, tokens = llava_next(), 44
        pixels = torch.stack([marker_images(3, IMAGE, PATCH, seed=seed).pixel_values for seed in (6, 7)])
        extra = {"image_sizes": torch.tensor([[IMAGE, 3 * IMAGE // 2]] * 2)}
        expected_view, expected_grid = pixels[:, 0], (4, 4)
    else:
        model, tokens = idefics3(), 2 * COARSE_TOKENS
        pixels = torch.stack([marker_images(2, IMAGE, PATCH, seed=seed).pixel_values for seed in (6, 7)], dim=1)
        extra, expected_view, expected_grid = {}, pixels[:, 1], (2, 2)
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = left_padded(tokens)
    before = answer_attention(model, ids, pixels, attention_mask=mask, **extra)
    after = answer_attention(modified, ids, pixels, attention_mask=mask, **extra)
    shown = shown_view(pixels, before.packing)
    assert torch.equal(shown, expected_view) and before.grid == after.grid == expected_grid
    norms_before, norms_after = read_layer_norms(hook_manager, shown), read_layer_norms(modified.hook_manager, shown)
    ratio = lambda norms: norms.flatten(1).amax(dim=1) / norms.flatten(1).median(dim=1).values  # noqa: E731
    assert bool((ratio(norms_before) > 5).all()) and bool((ratio(norms_after) <= 2).all())
    figure = draw_answer_attention(before, after, display_pixels(shown), norms_before, norms_after)
    assert len(panel_labels(figure)) == 2 * sum(PANELS_PER_IMAGE.values())


def coarse_figure_views(family: str):
    model = COARSE[family][0]()
    hook_manager, neurons = planted(model)
    modified = ModifiedModel(model, hook_manager, neurons)
    ids, mask = left_padded(COARSE_TOKENS)
    pixels = coarse_pixels(family, 2, seed=3)
    before = answer_attention(model, ids, pixels, attention_mask=mask)
    shown = shown_view(pixels, before.packing)
    return dict(before=before, after=answer_attention(modified, ids, pixels, attention_mask=mask),
                images=display_pixels(shown), norms_before=read_layer_norms(hook_manager, shown),
                norms_after=read_layer_norms(modified.hook_manager, shown))


@pytest.mark.parametrize("family", COARSE)
def test_the_figure_draws_the_token_grid_beside_the_patch_norms(family, tmp_path):
    views = coarse_figure_views(family)
    assert views["norms_before"].shape == (2, 4, 4)
    figure = draw_answer_attention(**views, read_layer=3, model=f"tiny {family}")
    by_label = {ax.get_label(): ax for ax in figure.axes}
    assert set(panel_labels(figure)) == {f"{kind} variant={when} image={image}" for kind in ("norms", "attention",
                                                                                            "overlay")
                                         for when in ("before", "after") for image in (0, 1)} | {"input image=0",
                                                                                                "input image=1"}
    shown = by_label["attention variant=after image=1"].get_images()[0].get_array()
    torch.testing.assert_close(torch.as_tensor(np.asarray(shown)), views["after"].patch_shares[1])
    assert np.asarray(by_label["norms variant=before image=0"].get_images()[0].get_array()).shape == (4, 4)
    assert COARSE[family][2] in figure._suptitle.get_text().replace("\n", " ")
    figure.savefig(tmp_path / "figure.png", dpi=60)
    with pytest.raises(InvalidArgumentError, match="share one grid"):
        draw_answer_attention(**{**views, "norms_before": views["norms_before"][:, :2, :2]})


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
    images = [Image.open(path) for path in sorted(marker_files(tmp_path / "images", 3, 5).glob("*.png"))]
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
    images = marker_files(tmp_path / "images", 3, 1)
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
    return {name: f"hf:{folder / name.lower()}" for name in ("LLAVA", "BARE", "DINO")}, marker_files(folder / "images",
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
