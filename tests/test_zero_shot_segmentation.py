"""Zero-shot segmentation from CLS attention (analysis.zero_shot_segmentation): ImageNet-S's format, the scores by
hand, the demo before and after, the command line with its figure."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_time_registers import ImageSourceError, InvalidArgumentError, ModifiedModel
from test_time_registers.analysis.zero_shot_segmentation import (IGNORED, average_precision, draw_zero_shot_masks,
                                                                 foreground_prediction, image_scores, imagenet_s_folder,
                                                                 mean_iou, pixel_accuracy, read_foreground,
                                                                 zero_shot_segmentation)
from test_time_registers.registry import load_model
from test_time_registers.scripts import evaluate
from tests.generated_formats import write_imagenet_s
from tests.test_cli_messages import error_line


def test_imagenet_s_masks_decode_class_from_red_and_green_and_1000_is_ignored(tmp_path):
    classes = np.array([[0, 1, 300], [1000, 0, 919]])
    rgb = np.stack([classes % 256, classes // 256, np.zeros_like(classes)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "mask.png")
    assert read_foreground(tmp_path / "mask.png").tolist() == [[0, 1, 1], [IGNORED, 0, 1]]
    Image.fromarray(np.array([[0, 5], [0, 0]], np.uint8)).save(tmp_path / "grey.png")     # one channel: the class
    assert read_foreground(tmp_path / "grey.png").tolist() == [[0, 1], [0, 0]]


def test_the_folder_pairs_images_with_masks_and_names_the_rest(tmp_path):
    write_imagenet_s(tmp_path, 6, seed=1)
    orphan = tmp_path / "validation" / "circle" / "no_mask.JPEG"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32)).save(orphan)
    dataset = imagenet_s_folder(tmp_path)
    assert len(dataset) == 6 and dataset.skipped == ["circle/no_mask.JPEG"]
    image, foreground = dataset.items[0].read()
    assert foreground.shape == (image.height, image.width) and set(np.unique(foreground)) == {-1, 0, 1}
    assert len(imagenet_s_folder(tmp_path, limit=2)) == 2
    with pytest.raises(ImageSourceError, match="is not an ImageNet-S folder"):
        imagenet_s_folder(tmp_path / "validation")
    (tmp_path / "train-semi").mkdir()
    (tmp_path / "train-semi-segmentation").mkdir()
    with pytest.raises(ImageSourceError, match="no image with a mask"):
        imagenet_s_folder(tmp_path, split="train-semi")


def test_the_scores_by_hand():
    # AP: ranks + - + -: precisions 1 and 2/3 at the positives
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([True, False, True, False])) == \
        pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(torch.tensor([1.0, 2.0]), torch.tensor([True, True])))
    heatmap = torch.tensor([[0.0, 0.1], [0.9, 1.0]])        # scaled mean 0.5: the bottom row is foreground
    assert foreground_prediction(heatmap).tolist() == [[False, False], [True, True]]
    truth = torch.tensor([[0, IGNORED], [1, 0]], dtype=torch.int8)
    counts, precision = image_scores(heatmap, truth)
    # labelled: 3 pixels; correct: (0,0) bg and (1,0) fg; wrong: (1,1) predicted fg. AP: the background pixel
    # (1,1) ranks above the foreground one, whose precision is 1/2.
    assert counts.tolist() == [2, 3, 1, 2, 1, 2] and precision == pytest.approx(0.5)
    assert pixel_accuracy(counts[None]) == pytest.approx(2 / 3) and mean_iou(counts[None]) == pytest.approx(0.5)
    perfect = torch.tensor([[1, 0], [0, 1]], dtype=torch.int8)
    counts, precision = image_scores(perfect.float(), perfect)
    assert mean_iou(counts[None]) == 1.0 and pixel_accuracy(counts[None]) == 1.0 and precision == 1.0


def test_dataset_scores_are_ratios_of_sums_not_means_of_ratios():
    counts = np.array([[10, 10, 5, 5, 5, 5], [0, 90, 0, 45, 0, 45]], dtype=float)
    assert pixel_accuracy(counts) == pytest.approx(10 / 100)
    assert mean_iou(counts) == pytest.approx(5 / 50)


@pytest.fixture(scope="module")
def demo_segmentation(tmp_path_factory):
    root = write_imagenet_s(tmp_path_factory.mktemp("imagenet_s"), 16, seed=3)
    loaded = load_model("demo")
    variants = {"original": (loaded.hook_manager, loaded.preprocess),
                "register": (ModifiedModel(loaded.model, loaded.hook_manager, loaded.planted).hook_manager,
                             loaded.preprocess)}
    return root, variants, zero_shot_segmentation(variants, imagenet_s_folder(root), batch_size=8, keep_maps=2)


def test_on_the_demo_the_register_puts_the_attention_on_the_objects(demo_segmentation):
    root, variants, (table, results) = demo_segmentation
    assert table.columns == ["original", "register"] and table.images == 16
    rows = {row.label.split(" (")[0]: row for row in table.rows}
    assert set(rows) == {"pixel accuracy", "mIoU", "mAP"}
    for row in table.rows:
        for value, (low, high) in zip(row.values, row.intervals):
            assert 0 <= low <= value <= high <= 1
    for name in ("mIoU", "mAP"):   # the outliers hold the attention; the register gives it back
        before, after = rows[name].values
        assert after > before + 0.2 and rows[name].intervals[1][0] > rows[name].intervals[0][1]
    again, _ = zero_shot_segmentation(variants, imagenet_s_folder(root), batch_size=5)
    assert [row.values for row in again.rows] == [row.values for row in table.rows]   # batches change nothing


def test_the_figure_shows_each_kept_image_per_variant(demo_segmentation):
    _, _, (_, results) = demo_segmentation
    figure = draw_zero_shot_masks(results)
    labels = [ax.get_label() for ax in figure.axes if ax.get_label().startswith("segmentation")]
    assert len(figure.axes) == 2 * 3 and len(labels) == 2 * 2
    assert all(len(result.maps) == 2 and result.maps[0].shape == (224, 224) for result in results)
    with pytest.raises(InvalidArgumentError, match="keep_maps"):
        draw_zero_shot_masks([type(results[0])("x", results[0].counts, results[0].precisions)])


def test_a_model_without_cls_is_refused(tmp_path):
    from test_time_registers import hook_manager_for
    from tests.tiny_models import hf_tower

    siglip = hook_manager_for(hf_tower("siglip"))
    with pytest.raises(InvalidArgumentError, match="no CLS token"):
        zero_shot_segmentation({"siglip": (siglip, lambda image: torch.zeros(3, 32, 32))},
                               imagenet_s_folder(write_imagenet_s(tmp_path, 1)))


def test_the_command_line_runs_the_protocol_with_its_figure_and_json(tmp_path, capsys):
    root = write_imagenet_s(tmp_path / "data", 8, seed=4)
    table, figure = tmp_path / "segmentation.json", tmp_path / "masks.png"
    assert evaluate.main(["--imagenet-s", str(root), "--quiet", "--json", str(table), "--figure", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU (foreground and background)" in printed and f"wrote {figure}" in printed
    written = json.loads(table.read_text())
    assert written["images"] == 8 and [len(row["intervals"]) for row in written["rows"]] == [2, 2, 2]
    assert Image.open(figure).size[0] > 400
    assert evaluate.main(["--imagenet-s", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "is not an ImageNet-S folder" in error_line(capsys)
