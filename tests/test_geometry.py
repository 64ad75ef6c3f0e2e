"""Boxes and masks through the real preprocessing (analysis.geometry): DINOv2's, timm's crop_pct 0.9, open_clip's,
transformers' image processors, and padding; each checked against a mask rendered on the image and pushed through
the same transform."""

import numpy as np
import pytest
import timm
from PIL import Image
from torchvision import transforms as T

from test_time_registers import InvalidArgumentError
from test_time_registers.analysis.evaluation import box_iou
from test_time_registers.analysis.geometry import preprocess_geometry, transform_boxes, transform_mask
from test_time_registers.hf import ProcessorTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_transform():
    """DINOv2's evaluation transform: shorter side to 256 (bicubic), centre crop 224."""
    return T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def timm_transform():
    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["crop_pct"] == 0.9
    return timm.data.create_transform(**config)


def open_clip_transform():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(size=224), is_train=False)


def processor(kind):
    from transformers import BitImageProcessor, ViTImageProcessor

    if kind == "dinov2":   # the processor saved with facebook/dinov2-*: shortest edge 256, crop 224
        return ProcessorTransform(BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}))
    return ProcessorTransform(ViTImageProcessor(size={"height": 224, "width": 224}))


TRANSFORMS = {
    "dinov2": dinov2_transform,
    "timm-crop-pct-0.9": timm_transform,
    "open_clip": open_clip_transform,
    "transformers-dinov2-processor": lambda: processor("dinov2"),
    "transformers-vit-processor": lambda: processor("vit"),
    "pad-then-crop": lambda: T.Compose([T.Resize(200), T.Pad((10, 5, 14, 19)), T.CenterCrop((230, 250)), T.ToTensor()]),
}


def rendered_box(preprocess, size, box):
    """Draw ``box`` white on black, push the image through ``preprocess`` and bound what stays bright."""
    width, height = size
    image = np.zeros((height, width, 3), np.uint8)
    left, top, right, bottom = (int(v) for v in box)
    image[top:bottom, left:right] = 255
    channel = preprocess(Image.fromarray(image))[0].numpy()
    ys, xs = np.nonzero(channel > (channel.min() + channel.max()) / 2)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("size", [(640, 480), (333, 517), (224, 224)])
def test_a_box_drawn_on_an_object_lands_on_it_within_a_pixel(name, size):
    preprocess = TRANSFORMS[name]()
    width, height = size
    box = np.array([round(width * 0.62), round(height * 0.1), round(width * 0.97), round(height * 0.45)], dtype=float)
    (mapped,) = transform_boxes(box[None], size, preprocess)
    truth = rendered_box(preprocess, size, box)
    assert np.abs(mapped - truth).max() <= 1.0
    assert box_iou(mapped, truth[None])[0] > 0.97


def test_an_off_centre_box_is_cropped_like_the_image_and_the_naive_resize_is_not():
    """The defect this module fixes: resizing boxes to 224 x 224 by scale alone misses DINOv2's crop."""
    preprocess, size = dinov2_transform(), (640, 480)
    box = np.array([[20.0, 300.0, 200.0, 470.0]])          # near a corner
    (mapped,) = transform_boxes(box, size, preprocess)
    truth = rendered_box(preprocess, size, box[0])
    naive = box[0] * np.array([224 / 640, 224 / 480] * 2)
    assert box_iou(mapped, truth[None])[0] > 0.97 > 0.8 > box_iou(naive, truth[None])[0]


def test_boxes_the_crop_removes_are_dropped_and_the_rest_clipped():
    geometry = preprocess_geometry(dinov2_transform(), (640, 480))
    assert geometry.size == (224, 224)
    np.testing.assert_allclose(geometry.scale, (341 / 640, 256 / 480))     # torchvision truncates the long side
    np.testing.assert_allclose(geometry.offset, (-58.0, -16.0))   # 341 wide after the resize: (341 - 224) // 2
    mapped, kept = geometry.boxes(np.array([[0, 0, 50, 50], [300, 200, 340, 240], [400, 0, 600, 480]]))
    assert kept.tolist() == [False, True, True] and len(mapped) == 2
    assert mapped[1, 2] == 224                                    # clipped at the right edge


@pytest.mark.parametrize("name", ["dinov2", "timm-crop-pct-0.9", "pad-then-crop"])
def test_a_mask_follows_the_image(name):
    preprocess = TRANSFORMS[name]()
    yy, xx = np.mgrid[:375, :500]
    mask = (xx - 330) ** 2 + (yy - 150) ** 2 < 80 ** 2         # a disc
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    channel = preprocess(Image.fromarray(image))[0].numpy()
    rendered = channel > (channel.min() + channel.max()) / 2
    moved = transform_mask(mask, preprocess)
    assert moved.shape == rendered.shape and moved.dtype == bool
    assert (moved != rendered).mean() < 0.01                      # they differ on the disc's edge only
    classes = transform_mask(mask.astype(np.int64) * 7, preprocess)   # class indices keep their values
    assert set(np.unique(classes)) <= {0, 7}


def test_what_the_model_sees_is_the_crop():
    geometry = preprocess_geometry(dinov2_transform(), (640, 480))
    image = Image.new("RGB", (640, 480))
    image.paste((255, 0, 0), (0, 0, 58 * 480 // 256, 480))      # a red band that the crop removes
    view = np.asarray(geometry.view(image))
    assert view.shape == (224, 224, 3) and view[:, 2:, 0].max() < 30


def test_a_step_that_is_no_resize_crop_or_pad_is_named():
    flip = T.Compose([T.RandomHorizontalFlip(p=1.0), T.ToTensor()])
    with pytest.raises(InvalidArgumentError, match="RandomHorizontalFlip"):
        preprocess_geometry(flip, (64, 48))
    crop_and_resize = lambda image: T.functional.to_tensor(image.crop((8, 0, 64, 48)).resize((32, 32)))  # noqa: E731
    with pytest.raises(InvalidArgumentError, match="neither a resize"):
        preprocess_geometry(crop_and_resize, (64, 48))
    with pytest.raises(InvalidArgumentError, match="positive"):
        preprocess_geometry(dinov2_transform(), (0, 10))
    with pytest.raises(InvalidArgumentError, match="a mask of"):
        preprocess_geometry(dinov2_transform(), (64, 48)).mask(np.zeros((10, 10), bool))
