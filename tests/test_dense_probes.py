"""Dense linear probes (analysis.dense_probes) and their datasets (data.dense): the formats read back, the
targets through a real centre crop, the heads and scores by hand, chance on noise, the demo before and after."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from test_time_registers import ImageSourceError, InvalidArgumentError, ModifiedModel
from test_time_registers.analysis.dense_probes import (DenseFeatures, LinearHead, dense_features, dense_probe,
                                                       dense_splits, depth_scores, fit_depth_head,
                                                       fit_segmentation_head, input_targets, patch_classes,
                                                       patch_depths, probe_splits, segmentation_scores)
from test_time_registers.analysis.geometry import preprocess_geometry
from test_time_registers.data.dense import IGNORED, depth_folder, segmentation_folder
from test_time_registers.data.scenes import SHAPES, demo_scenes
from test_time_registers.registry import load_model

SCENES = 16
#: On the shared 2-core test machine, one thread fits the heads many times faster than two that fight.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- generated datasets

def scene_classes(scene) -> np.ndarray:
    """[H, W] uint8: 0 on the background, 1 + the shape of the topmost object whose box holds an object pixel
    (the scenes keep the union of their objects' pixels, and later objects cover earlier ones)."""
    classes = np.zeros(scene.object_mask.shape, np.uint8)
    for (left, top, right, bottom), shape in zip(scene.boxes, scene.labels):
        region = np.zeros_like(scene.object_mask)
        region[top:bottom, left:right] = True
        classes[region & scene.object_mask] = shape + 1
    return classes


def scene_depth(scene) -> np.ndarray:
    """[H, W] float32 metres: a floor receding towards the top (2 to 5 m), objects standing at 1-2.2 m by
    texture, and the bottom 4 rows invalid (0), as a depth sensor's holes."""
    height, width = scene.object_mask.shape
    depth = np.broadcast_to(2.0 + 3.0 * (1 - np.arange(height) / height)[:, None], (height, width)).astype(np.float32)
    depth = depth.copy()
    for (left, top, right, bottom), texture in zip(scene.boxes, scene.textures):
        region = np.zeros_like(scene.object_mask)
        region[top:bottom, left:right] = True
        depth[region & scene.object_mask] = 1.0 + 0.3 * texture
    depth[-4:] = 0
    return depth


def write_ade(root, scenes, *, ignore_border=True):
    """ADE20K's layout: images/<stem>.jpg and annotations/<stem>.png (single channel), with a ring of 255 ("ignore")
    around the objects; classes.txt names background and the shapes."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        scene.image.save(root / "images" / f"scene_{index:03d}.jpg", quality=95)
        classes = scene_classes(scene)
        if ignore_border:
            grown = np.zeros_like(scene.object_mask)
            grown[1:] |= scene.object_mask[:-1]
            grown[:-1] |= scene.object_mask[1:]
            classes[grown & ~scene.object_mask] = 255
        Image.fromarray(classes, "L").save(root / "annotations" / f"scene_{index:03d}.png")
    (root / "classes.txt").write_text("\n".join(("background", *SHAPES)) + "\n")
    return root


#: VOC's palette colours for the first classes; class 255 (VOC's "void" boundary) is cream.
PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]


def palette_png(classes: np.ndarray, path):
    image = Image.fromarray(classes.astype(np.uint8), "P")
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(PALETTE)] = PALETTE
    colours[255] = (224, 224, 192)
    image.putpalette(colours.reshape(-1).tolist())
    image.save(path)


def write_voc(root, scenes):
    """VOC's layout: JPEGImages/<stem>.jpg, SegmentationClass/<stem>.png (palette), ImageSets/Segmentation/val.txt."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        scene.image.save(root / "JPEGImages" / f"2007_{index:06d}.jpg", quality=95)
        classes = scene_classes(scene)
        classes[:2] = 255
        palette_png(classes, root / "SegmentationClass" / f"2007_{index:06d}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000003\n")
    return root


def write_depth(root, scenes):
    """NYU-style: images/<stem>.png with depth/<stem>.png (16-bit millimetres) for even scenes and
    depth/<stem>.npy (metres) for odd ones."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "depth").mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        scene.image.save(root / "images" / f"scene_{index:03d}.png")
        depth = scene_depth(scene)
        if index % 2 == 0:
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(root / "depth" / f"scene_{index:03d}.png")
        else:
            np.save(root / "depth" / f"scene_{index:03d}.npy", depth)
    return root


@pytest.fixture(scope="module")
def scenes():
    return demo_scenes(SCENES, seed=3)


@pytest.fixture(scope="module")
def loaded():
    return load_model("demo")


# ---------------------------------------------------------------------------- readers

def test_the_ade20k_layout_reads_classes_ignores_255_and_reduces_zero(tmp_path, scenes):
    root = write_ade(tmp_path / "ade", scenes[:4])
    Image.new("RGB", (32, 32)).save(root / "images" / "unlabelled.jpg")
    dataset = segmentation_folder(root)
    assert dataset.task == "segmentation" and len(dataset) == 4
    assert [item.name for item in dataset.items] == [f"scene_{index:03d}.jpg" for index in range(4)]
    assert dataset.unlabelled == ["unlabelled.jpg"]
    assert dataset.class_names == ["background", *SHAPES] and dataset.num_classes == 5
    image, classes = dataset.read(dataset.items[0])
    written = np.asarray(Image.open(root / "annotations" / "scene_000.png")).astype(np.int64)
    assert image.size == (224, 224) and classes.dtype == np.int64 and classes.shape == (224, 224)
    assert (written == 255).any() and (classes[written == 255] == IGNORED).all()
    np.testing.assert_array_equal(classes[written != 255], written[written != 255])

    reduced = segmentation_folder(root, reduce_zero_label=True)
    _, shifted = reduced.read(reduced.items[0])
    assert (shifted[(written == 0) | (written == 255)] == IGNORED).all()
    kept = (written > 0) & (written != 255)
    np.testing.assert_array_equal(shifted[kept], written[kept] - 1)
    assert len(segmentation_folder(root, limit=2)) == 2
    with pytest.raises(InvalidArgumentError, match="names 5 classes"):
        segmentation_folder(root, num_classes=7)


def test_the_ade20k_split_sub_folders(tmp_path, scenes):
    root = tmp_path / "ADEChallengeData2016"
    write_ade(root / "split", scenes[:2])     # images/ and annotations/ one level down, as ADE20K ships them
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    (root / "split" / "images").rename(root / "images" / "validation")
    (root / "split" / "annotations").rename(root / "annotations" / "validation")
    assert len(segmentation_folder(root, split="validation")) == 2
    assert segmentation_folder(root).items[0].name == "validation/scene_000.jpg"
    with pytest.raises(ImageSourceError, match="no split 'training'"):
        segmentation_folder(root, split="training")


def test_the_voc_layout_reads_palette_indices_not_colours(tmp_path, scenes):
    root = write_voc(tmp_path / "voc", scenes[:4])
    Image.new("RGB", (16, 16)).save(root / "JPEGImages" / "2008_000000.jpg")   # a detection-only image: not listed
    palette_png(np.zeros((8, 8)), root / "SegmentationClass" / "2009_000000.png")  # a label map without its image
    dataset = segmentation_folder(root)
    assert len(dataset) == 4 and dataset.unlabelled == ["2009_000000"]
    assert dataset.class_names is None and dataset.num_classes is None
    _, classes = dataset.read(dataset.items[1])
    expected = scene_classes(scenes[1]).astype(np.int64)
    expected[:2] = IGNORED
    np.testing.assert_array_equal(classes, expected)                   # the palette's indices ...
    with Image.open(dataset.items[1].label) as label:
        assert label.mode == "P"
        colours_as_grey = np.asarray(label.convert("L")).astype(np.int64)
    assert (colours_as_grey[expected > 0] != expected[expected > 0]).all()    # ... never its colours
    val = segmentation_folder(root, split="val")
    assert [item.name for item in val.items] == ["2007_000001.jpg", "2007_000003.jpg"]


def test_depth_reads_millimetre_pngs_and_metre_arrays_and_marks_invalid_pixels(tmp_path, scenes):
    root = write_depth(tmp_path / "nyu", scenes[:2])
    np.save(root / "depth" / "odd.npy", np.array([[1.5, np.nan], [-2.0, np.inf]], np.float32))
    Image.new("RGB", (2, 2)).save(root / "images" / "odd.png")
    Image.new("RGB", (2, 2)).save(root / "images" / "no_depth.png")
    dataset = depth_folder(root)
    assert dataset.task == "depth" and len(dataset) == 3 and dataset.unlabelled == ["no_depth.png"]
    assert [item.label.suffix for item in dataset.items] == [".npy", ".png", ".npy"]
    _, from_png = dataset.read(dataset.items[1])             # scene 0: 16-bit millimetres
    truth = scene_depth(scenes[0])
    assert from_png.dtype == np.float32 and Image.open(dataset.items[1].label).mode.startswith("I")
    np.testing.assert_allclose(from_png, np.round(truth * 1000) / 1000, atol=1e-6)
    assert (from_png[-4:] == 0).all() and 1.0 <= from_png[:-4].min() and from_png.max() <= 5.0
    _, from_npy = dataset.read(dataset.items[2])             # scene 1: metres
    np.testing.assert_allclose(from_npy, scene_depth(scenes[1]))
    _, odd = dataset.read(dataset.items[0])
    assert odd.tolist() == [[1.5, 0.0], [0.0, 0.0]]          # NaN, negative and infinite depths are invalid


def test_bad_folders_and_label_maps_are_refused_precisely(tmp_path, scenes):
    with pytest.raises(ImageSourceError, match="is not a segmentation folder"):
        segmentation_folder(tmp_path)
    with pytest.raises(ImageSourceError, match="is not a depth folder"):
        depth_folder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    scenes[0].image.save(tmp_path / "images" / "a.jpg")
    with pytest.raises(ImageSourceError, match="no image with a label map in"):
        segmentation_folder(tmp_path)
    with pytest.raises(InvalidArgumentError, match="limit must be a positive int"):
        segmentation_folder(tmp_path, limit=0)

    Image.fromarray(np.zeros((100, 120), np.uint8)).save(tmp_path / "annotations" / "a.png")
    dataset = segmentation_folder(tmp_path)
    with pytest.raises(ImageSourceError, match=r"a\.png is 120x100 pixels, but its image .*a\.jpg is 224x224"):
        dataset.read(dataset.items[0])
    Image.fromarray(np.full((224, 224, 3), (10, 20, 30), np.uint8)).save(tmp_path / "annotations" / "a.png")
    with pytest.raises(ImageSourceError, match="a colour image .* must hold class indices"):
        dataset.read(dataset.items[0])
    Image.fromarray(np.full((224, 224), 7, np.uint8)).save(tmp_path / "annotations" / "a.png")
    with pytest.raises(ImageSourceError, match="has class 7, but the dataset has 5 classes"):
        segmentation_folder(tmp_path, num_classes=5).read(dataset.items[0])


# ---------------------------------------------------------------------------- targets through the crop

def test_the_targets_follow_a_resize_and_centre_crop(tmp_path, loaded):
    """A 320x240 image through Resize(256) + CenterCrop(224): x scales by 341/320 and 58 columns are cut on the left,
    y scales by 256/240 and 16 rows are cut on top. A label map split at x = 100 (class 1 left, 2 right) with its top
    30 rows ignored lands at column 100 * 341/320 - 58 = 48.6 with exactly 30 * 256/240 - 16 = 16 ignored rows; a
    squashing resize to 224x224 would put the split at column 70 and ignore 28 rows."""
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    classes = np.where(np.arange(320)[None, :] < 100, 1, 2).repeat(240, axis=0).astype(np.int64)
    classes[:30] = IGNORED
    mapped = input_targets(classes, preprocess_geometry(preprocess, (320, 240)), "segmentation")
    assert mapped.shape == (224, 224) and mapped.dtype == torch.int16
    assert (mapped[:16] == IGNORED).all() and (mapped[16:] >= 1).all()
    assert ((mapped[16:] == 1).sum(dim=1) == 49).all()                    # columns 0..48: centres left of 48.6

    patches = patch_classes(mapped[None], (16, 16), 3).reshape(14, 14)
    assert (patches[0] == IGNORED).all()                                  # the first patch row: only ignored pixels
    assert (patches[1:, :3] == 1).all() and (patches[1:, 3:] == 2).all()  # patch column 3 holds 1 pixel of class 1

    # the same through the protocol's own pass, on a dataset in the real format, with the demo model
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for index in range(2):
        Image.new("RGB", (320, 240), (40 * index, 90, 160)).save(tmp_path / "images" / f"wide_{index}.png")
        Image.fromarray(np.where(classes < 0, 255, classes).astype(np.uint8)).save(
            tmp_path / "annotations" / f"wide_{index}.png")
    extracted = dense_features("original", loaded.hook_manager, segmentation_folder(tmp_path), preprocess,
                               progress=False)
    assert extracted.features.shape == (2, 196, loaded.hook_manager.hidden_size) and extracted.grid == (14, 14)
    assert torch.equal(extracted.targets, torch.stack([mapped, mapped]))
    assert extracted.max_class == 2

    depth = np.where(np.arange(320)[None, :] < 100, 1.5, 3.0).repeat(240, axis=0).astype(np.float32)
    depth[:30] = 0
    metres = input_targets(depth, preprocess_geometry(preprocess, (320, 240)), "depth")
    per_patch = patch_depths(metres[None], (16, 16)).reshape(14, 14)
    assert (per_patch[0] == 0).all() and (per_patch[1:, :3] == 1.5).all() and (per_patch[1:, 4:] == 3.0).all()
    assert per_patch[1, 3] == pytest.approx((1.5 + 15 * 3.0) / 16)       # the mean of the patch's valid depths


def test_patch_targets_by_hand():
    maps = torch.tensor([[[0, 0, 1, -1, 2, 1],
                          [1, -1, -1, -1, 1, 2]]], dtype=torch.int16)   # three 2x2 patches
    assert patch_classes(maps, (2, 2), 3).tolist() == [[0, 1, 1]]        # majority; patch 3 ties 1-1: lower class
    assert patch_classes(torch.full((1, 2, 2), -1, dtype=torch.int16), (2, 2), 3).tolist() == [[IGNORED]]
    depths = torch.tensor([[[1.0, 3.0, 0.0, 0.0],
                            [0.0, 2.0, 0.0, 0.0]]])
    assert patch_depths(depths, (2, 2)).tolist() == [[2.0, 0.0]]        # mean of the valid pixels; none: 0


def test_scores_by_hand():
    confusion = torch.tensor([[3, 1, 0],
                              [0, 2, 0],
                              [0, 0, 0]])                                # class 2: no true and no predicted pixel
    scores = segmentation_scores(confusion)
    assert scores["mIoU"] == pytest.approx((3 / 4 + 2 / 3) / 2) and scores["pixel accuracy"] == pytest.approx(5 / 6)

    constant = LinearHead(torch.zeros(1), torch.ones(1), torch.zeros(1, 1), torch.tensor([2.0]))   # 2 m everywhere
    truth = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])                    # one patch of 2x2 pixels, one invalid
    scores = depth_scores(constant, torch.zeros(1, 1, 1), truth, (1, 1), (2, 2))
    assert scores["RMSE"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    assert scores["AbsRel"] == pytest.approx((1 / 1 + 0 / 2 + 2 / 4) / 3)


# ---------------------------------------------------------------------------- the heads

def column_stripes(count: int, classes: int, grid=(4, 4), patch=(4, 4), seed=0):
    """Label maps [N, H, W] whose class depends on the patch column only (each column a random class), and
    features [N, P, 8] that hold each patch's class one-hot, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = grid
    per_column = torch.randint(0, classes, (count, 1, cols), generator=generator).expand(count, rows, cols)
    maps = per_column.repeat_interleave(patch[0], dim=1).repeat_interleave(patch[1], dim=2).to(torch.int16)
    one_hot = torch.nn.functional.one_hot(per_column.reshape(count, -1), classes).float()
    noise = 0.05 * torch.randn(count, rows * cols, 8 - classes, generator=generator)
    return maps, torch.cat([one_hot, noise], dim=2)


def test_the_segmentation_head_is_exact_where_the_features_say_the_class():
    generator = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 5, (200,), generator=generator)
    features = torch.nn.functional.one_hot(classes, 5).float() + 0.05 * torch.randn(200, 5, generator=generator)
    head = fit_segmentation_head(features, classes, 5)
    assert torch.equal(head(features).argmax(dim=1), classes)
    with pytest.raises(InvalidArgumentError, match="int64"):
        fit_segmentation_head(features, classes.int(), 5)

    # the whole protocol: class-bearing features, label maps whose classes change at patch edges only (a bilinear
    # blend of two neighbouring patches' logits leans to the pixel's own patch)
    maps, features = column_stripes(12, 3)
    extracted = DenseFeatures("exact", features, maps, (4, 4), (4, 4), 0)
    splits = probe_splits(extracted, "segmentation", num_classes=3, seeds=3)
    assert [split.scores for split in splits] == [{"mIoU": 1.0, "pixel accuracy": 1.0}] * 3


def test_ridge_recovers_a_linear_depth():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 12, generator=generator)
    weights = torch.randn(12, generator=generator)
    depths = 3.0 + 0.4 * (features @ weights)
    head = fit_depth_head(features, depths, ridge=1e-9)
    torch.testing.assert_close(head(features)[:, 0], depths, atol=1e-4, rtol=0)

    # the whole protocol, at pixel level: each image stands at one depth, which its features say; a quarter of the
    # pixels are invalid (0) and must neither train nor score
    count = 10
    image_depth = 1.0 + 4.0 * torch.rand(count, generator=generator)
    features = torch.cat([image_depth[:, None, None].expand(count, 16, 1), torch.randn(count, 16, 3, generator=generator)],
                         dim=2)
    maps = image_depth[:, None, None].expand(count, 16, 16).clone()
    maps[:, :4] = 0
    extracted = DenseFeatures("exact", features, maps, (4, 4), (4, 4), 0)
    for split in probe_splits(extracted, "depth", seeds=3, ridge=1e-9):
        assert split.scores["RMSE"] < 1e-4 and split.scores["AbsRel"] < 1e-4


def test_splits_are_disjoint_seeded_and_refuse_what_cannot_be_split():
    for offset, (train, test) in enumerate(dense_splits(10, seed=4, seeds=3)):
        assert len(test) == 3 and set(train.tolist()).isdisjoint(test.tolist())
        assert sorted(train.tolist() + test.tolist()) == list(range(10))
        assert torch.equal(test, dense_splits(10, seed=4 + offset, seeds=1)[0][1])     # split k is seed + k's
    assert not torch.equal(dense_splits(10, seed=0)[0][1], dense_splits(10, seed=1)[0][1])
    assert [len(test) for _, test in dense_splits(2, seeds=1)] == [1]
    for fraction in (0, 1, 1.5, -0.1, True, "0.3"):
        with pytest.raises(InvalidArgumentError, match="test_fraction must be a number strictly between 0 and 1"):
            dense_splits(10, test_fraction=fraction)
    with pytest.raises(InvalidArgumentError, match="leaves no image to train on"):
        dense_splits(1)
    with pytest.raises(InvalidArgumentError, match="leaves no image to train on"):
        dense_splits(3, test_fraction=0.9)


def random_dense(count: int, dimensions: int, classes: int, seed: int) -> DenseFeatures:
    """Random features [N, 8, D] and random classes, one per 1x1-pixel patch of a 2x4 grid."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, 8, dimensions, generator=generator)
    maps = torch.randint(0, classes, (count, 2, 4), generator=generator).to(torch.int16)
    return DenseFeatures("noise", features, maps, (2, 4), (1, 1), 0)


def test_random_features_and_labels_score_chance_on_disjoint_splits():
    """Nothing generalises from random features to random classes, so held-out pixel accuracy is chance, 1/4.

    Each split trains on 28 images x 8 patches = 224 patches in 256 dimensions: the head can fit them all, so
    a probe that trained on its test images would score near 1. 5 splits hold out 5 x 96 patches; under chance
    their accuracy has a standard deviation of sqrt(0.25 * 0.75 / 480) ~ 0.02, and 0.25 +- 0.08 is 4 of them.
    """
    splits = probe_splits(random_dense(40, 256, 4, seed=0), "segmentation", num_classes=4)
    for split in splits:
        assert set(split.train).isdisjoint(split.test) and len(split.train) + len(split.test) == 40
    assert len({tuple(split.test) for split in splits}) == 5
    accuracy = np.mean([split.scores["pixel accuracy"] for split in splits])
    assert abs(accuracy - 0.25) < 0.08, accuracy
    # the power of the check: every image twice, so most held-out images have their twin in training and are
    # answered from memory (about 0.72 + 0.28 / 4 ~ 0.79 expected)
    twins = random_dense(20, 256, 4, seed=1)
    twins = DenseFeatures("twins", twins.features.repeat(2, 1, 1), twins.targets.repeat(2, 1, 1), (2, 4), (1, 1), 0)
    remembered = np.mean([split.scores["pixel accuracy"] for split in probe_splits(twins, "segmentation",
                                                                                    num_classes=4)])
    assert remembered > 0.6, remembered


# ---------------------------------------------------------------------------- the demo, end to end

def check_table(comparison, columns, images):
    assert comparison.columns == columns and comparison.images == images and comparison.results == []
    for row in comparison.rows:
        for value, interval in zip(row.values, row.intervals):
            assert math.isfinite(value) and interval is not None
            assert interval[0] - 1e-12 <= value <= interval[1] + 1e-12
            if row.unit == "%":
                assert 0 <= interval[0] <= value <= interval[1] <= 1


def test_segmentation_probes_on_the_demo_before_and_after_its_register(tmp_path, scenes, loaded):
    root = write_ade(tmp_path / "ade", scenes)
    (root / "annotations" / "scene_015.png").write_bytes(b"not a png")       # unreadable: skipped and named
    Image.new("RGB", (32, 32)).save(root / "images" / "orphan.jpg")          # no label map: left out and named
    variants = {"original": (loaded.hook_manager, loaded.preprocess),
                "with register": (ModifiedModel(loaded.model, loaded.hook_manager, loaded.planted).hook_manager,
                                  loaded.preprocess)}
    comparison = dense_probe(variants, segmentation_folder(root), task="segmentation", seeds=3, batch_size=8,
                             progress=False)
    print("\n" + comparison.format())
    check_table(comparison, ["original", "with register"], SCENES - 1)
    assert [row.label for row in comparison.rows] == ["segmentation mIoU (linear head on patch features, 3 splits)",
                                                      "segmentation pixel accuracy (3 splits)"]
    mIoU, accuracy = (row.values for row in comparison.rows)
    assert all(0 < value < 1 for value in mIoU + accuracy)
    assert all(m < a for m, a in zip(mIoU, accuracy))      # rare classes pull mIoU below the background-heavy accuracy
    notes = "\n".join(comparison.notes)
    assert "skipped 1 unreadable image(s) or label map(s): scene_015.jpg" in notes
    assert "1 image(s) without a label map" in notes and "orphan.jpg" in notes
    assert "block 7's output, 14x14 patches" in notes
    again = dense_probe(variants, segmentation_folder(root), task="segmentation", seeds=3, batch_size=8,
                        progress=False)
    assert again.to_dict() == comparison.to_dict()                                      # deterministic


def test_depth_probes_on_the_demo_before_and_after_its_register(tmp_path, scenes, loaded):
    dataset = depth_folder(write_depth(tmp_path / "nyu", scenes))
    variants = {"original": (loaded.hook_manager, loaded.preprocess),
                "with register": (ModifiedModel(loaded.model, loaded.hook_manager, loaded.planted).hook_manager,
                                  loaded.preprocess)}
    comparison = dense_probe(variants, dataset, task="depth", seeds=3, batch_size=8, progress=False)
    print("\n" + comparison.format())
    check_table(comparison, ["original", "with register"], SCENES)
    rmse, absolute_relative = (row.values for row in comparison.rows)
    assert comparison.rows[0].label == "depth RMSE (m; linear head on patch features, 3 splits)"
    floor_spread = float(np.std(np.concatenate([scene_depth(scene)[:-4].ravel() for scene in scenes])))
    assert all(0 < value < floor_spread for value in rmse)          # better than predicting the mean depth
    assert all(0 < value < 1 for value in absolute_relative)
    again = dense_probe(variants, dataset, task="depth", seeds=3, batch_size=8, progress=False, layer=7)
    assert again.to_dict() == comparison.to_dict()                  # deterministic; layer 7 is the last block


def test_bad_arguments_to_the_protocol_are_refused_precisely(tmp_path, scenes, loaded):
    dataset = segmentation_folder(write_ade(tmp_path / "ade", scenes[:3]))
    variants = {"original": (loaded.hook_manager, loaded.preprocess)}
    with pytest.raises(InvalidArgumentError, match="task is 'depth', but .* holds segmentation labels"):
        dense_probe(variants, dataset, task="depth", progress=False)
    with pytest.raises(InvalidArgumentError, match="task must be one of"):
        dense_probe(variants, dataset, task="normals", progress=False)
    with pytest.raises(InvalidArgumentError, match="test_fraction must be a number strictly between 0 and 1"):
        dense_probe(variants, dataset, task="segmentation", test_fraction=1.0, progress=False)
    with pytest.raises(InvalidArgumentError, match="layer must be an int in 0..7"):
        dense_probe(variants, dataset, task="segmentation", layer=8, progress=False)
    with pytest.raises(InvalidArgumentError, match="seeds must be a positive int"):
        dense_probe(variants, dataset, task="segmentation", seeds=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="give at least one variant"):
        dense_probe({}, dataset, task="segmentation", progress=False)

    Image.fromarray(np.zeros((50, 60), np.uint8)).save(tmp_path / "ade" / "annotations" / "scene_001.png")
    with pytest.raises(ImageSourceError, match=r"scene_001\.png is 60x50 pixels, but its image .* is 224x224"):
        dense_probe(variants, segmentation_folder(tmp_path / "ade"), task="segmentation", progress=False)

    for index in range(3):                                           # nothing readable at all
        (tmp_path / "ade" / "annotations" / f"scene_{index:03d}.png").write_bytes(b"")
    with pytest.raises(ImageSourceError, match="no readable image and label map"):
        dense_probe(variants, segmentation_folder(tmp_path / "ade"), task="segmentation", progress=False)

    one = depth_folder(write_depth(tmp_path / "one", scenes[:1]))
    with pytest.raises(InvalidArgumentError, match="leaves no image to train on"):
        dense_probe(variants, one, task="depth", progress=False)


# ---------------------------------------------------------------------------- the command line

def test_the_command_line_runs_both_probes_with_intervals(tmp_path, scenes, capsys):
    from test_time_registers.scripts import evaluate
    from tests.test_cli_messages import error_line

    ade, depth = write_ade(tmp_path / "ade", scenes[:10]), write_depth(tmp_path / "nyu", scenes[:10])
    table = tmp_path / "segmentation.json"
    assert evaluate.main(["--segmentation", str(ade), "--quiet", "--json", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "segmentation mIoU" in printed and "with 1 test-time register" in printed
    rows = json.loads(table.read_text())["rows"]
    assert [row["label"].split(" (")[0] for row in rows] == ["segmentation mIoU", "segmentation pixel accuracy"]
    assert all(interval is not None for row in rows for interval in row["intervals"])
    assert evaluate.main(["--depth", str(depth), "--quiet"]) == 0
    assert "depth RMSE (m" in capsys.readouterr().out
    assert evaluate.main(["--depth", str(depth), "--figure", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert "the dense probes have no figure" in error_line(capsys)
    assert evaluate.main(["--reduce-zero-label", "--quiet"]) == 2
    assert "--reduce-zero-label goes with --segmentation" in error_line(capsys)
    assert not (tmp_path / "x.png").exists()
