"""Evaluation (analysis.evaluation and the evaluate command): LOST and CorLoc, linear probes, zero-shot, the table."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from test_time_registers import InvalidArgumentError, ModifiedModel
from test_time_registers.analysis.evaluation import (Comparison, box_iou, compare_variants, linear_probe,
                                                     zero_shot_accuracy, zero_shot_classifier)
from test_time_registers.data.labelled import scene_images
from test_time_registers.scripts import evaluate
from tests.test_cli_messages import _documented_flags, error_line
from tests.test_labelled import classes  # noqa: F401 - a fixture


def test_box_iou_by_hand():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou((0, 0, 10, 10), boxes), [1.0, 25 / 175, 0.0])


def test_linear_probe_is_exact_on_separable_features_and_wants_integer_labels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(8)
    features = torch.nn.functional.one_hot(labels, 5).float() * 4 + 0.1 * torch.randn(40, 5, generator=generator)
    assert linear_probe(features, labels, seed=1) == 1.0
    noise = torch.randn(40, 5, generator=generator)
    assert linear_probe(noise, labels, seed=1) == linear_probe(noise, labels, seed=1)   # seeded split
    with pytest.raises(InvalidArgumentError, match="int64"):
        linear_probe(features, labels.to(torch.bfloat16))



def test_a_linear_probe_on_random_features_and_labels_scores_chance():
    """Random features, random labels of 4 classes: nothing generalises, so held-out accuracy is chance, 1/4.

    With 256 feature dimensions and ~280 training images per draw the probe can fit its training split
    perfectly, so a probe that also trained on (or was scored on) its test split would score near 1.0: the
    twin check below shows what memorising gives here. Over 5 draws ~600 images are held out; under chance
    the pooled accuracy has a standard deviation of sqrt(0.25 * 0.75 / 600) ~ 0.018, so 0.25 +- 0.08 is over
    4 standard deviations wide and still far below what memorising scores.
    """
    classes, images, dimensions = 4, 400, 256
    correct = held_out = 0
    for draw in range(5):
        generator = torch.Generator().manual_seed(draw)
        features = torch.randn(images, dimensions, generator=generator)
        labels = torch.randint(0, classes, (images,), generator=generator)
        accuracy = linear_probe(features, labels, seed=draw)
        tested = sum(math.ceil(0.3 * int((labels == label).sum())) for label in range(classes))
        correct += accuracy * tested
        held_out += tested
    assert abs(correct / held_out - 1 / classes) < 0.08, correct / held_out
    # the power of the check: each image twice, so ~70% of the held-out images have their twin in the training
    # split and are answered from memory; expected accuracy ~0.7 + 0.3 / 4 ~ 0.78 (a probe trained on its test
    # split scores 1.00 on the random draws above)
    generator = torch.Generator().manual_seed(9)
    features = torch.randn(images // 2, dimensions, generator=generator)
    labels = torch.randint(0, classes, (images // 2,), generator=generator)
    assert linear_probe(features.repeat(2, 1), labels.repeat(2), seed=0) > 0.6

def test_zero_shot_over_more_than_256_classes_keeps_integer_labels():
    """The reference notebook cast labels to bf16, which rounds 257 to 256: an off-by-one answer counted as right."""
    classes = 300
    classifier = torch.eye(classes)                                  # class c's text embedding is e_c
    labels = torch.arange(classes)
    embeddings = torch.eye(classes)[labels]                          # every image is its own class ...
    assert zero_shot_accuracy(embeddings, classifier, labels) == 1.0
    wrong = labels.clone()
    wrong[257] = 256                                                 # ... except image 257, answered 256
    assert zero_shot_accuracy(torch.eye(classes)[wrong], classifier, labels) == pytest.approx(299 / 300)
    assert labels.to(torch.bfloat16)[257] == 256                     # what a bf16 label would have hidden
    with pytest.raises(InvalidArgumentError, match="int64"):
        zero_shot_accuracy(embeddings, classifier, labels.to(torch.bfloat16))


def test_open_clips_own_classifier_serves_300_classes(demo):
    import open_clip
    from open_clip import zero_shot_metadata

    model = demo[0]
    names = [f"class {index}" for index in range(300)]
    classifier = zero_shot_classifier(model, open_clip.tokenizer.SimpleTokenizer(), names,
                                      zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES[:2], "cpu")
    assert classifier.shape == (model.text_projection.shape[1], 300)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(300))
    labels = torch.arange(300)
    assert zero_shot_accuracy(classifier.T.clone(), classifier, labels) == 1.0


def test_the_comparison_on_the_demo_has_every_row_and_the_register_helps(demo):
    from test_time_registers.clip import ClipHookManager

    model, preprocess, planted, _ = demo
    hm = ClipHookManager(model, name="demo")
    dataset = scene_images(24, seed=1)
    comparison = compare_variants({"original": (hm, preprocess),
                                   "register": (ModifiedModel(model, hm, planted).hook_manager, preprocess)}, dataset)
    rows = {row.label.split(" (")[0].split(",")[0]: row.values for row in comparison.rows}
    assert set(rows) == {"images with outliers", "largest / median patch norm", "CLS attention entropy over patches",
                         "CLS attention on the objects", "LOST CorLoc", "linear probe on CLS features",
                         "linear probe on mean patch features", "linear probe on registers features"}
    assert comparison.columns == ["original", "register"] and comparison.images == 24
    for row in comparison.rows:
        assert len(row.values) == 2
        assert all(value is None or math.isfinite(value) for value in row.values)
    assert rows["images with outliers"] == [1.0, 0.0]
    assert rows["CLS attention on the objects"][1] > rows["CLS attention on the objects"][0]
    assert rows["linear probe on registers features"][0] is None      # the original has no register
    assert 0 <= min(rows["LOST CorLoc"]) <= max(rows["LOST CorLoc"]) <= 1
    text = comparison.format()
    assert "100.0%" in text and text.count("\n") == len(comparison.rows) + 1       # header, rows, the interval legend
    for row in comparison.rows:                       # every number has its 95% interval around it
        for value, interval in zip(row.values, row.intervals):
            assert (value is None) == (interval is None)
            assert value is None or interval[0] - 1e-9 <= value <= interval[1] + 1e-9
    assert Comparison(**{**comparison.__dict__}).to_dict()["rows"][0]["values"] == [1.0, 0.0]


def test_the_cli_prints_the_table_and_writes_json(tmp_path, classes, capsys):
    out = tmp_path / "table.json"
    assert evaluate.main(["--images", str(classes), "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe on CLS features" in printed and "zero-shot accuracy" in printed
    assert "no boxes or masks" in printed
    table = json.loads(out.read_text())
    assert table["columns"] == ["original", "with 1 test-time register"] and table["images"] == 12


@pytest.mark.parametrize("flags, message", [
    (["--images", "/nonexistent"], "image folder not found"),
    (["--voc", "."], "is not a VOC-style folder"),
    (["--edit", "attention-bias", "--num-registers", "2"], "--num-registers 1"),
    (["--model", "timm:vit_tiny_patch16_224:random"], "a data flag (--images, --voc"),
    (["--outlier-ratio", "1"], "--outlier-ratio: expected a number above 1"),
])
def test_bad_input_is_one_line(flags, message, capsys):
    assert evaluate.main([*flags, "--quiet"]) == 2
    assert message in error_line(capsys)


def test_the_attention_bias_edit_and_the_ablations_run_from_the_cli(capsys):
    assert evaluate.main(["--edit", "attention-bias", "--num-images", "8", "--quiet"]) == 0
    assert "with 1 test-time register (attention-bias)" in capsys.readouterr().out
    assert evaluate.main(["--replace", "shuffled", "--num-registers", "0", "--num-images", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "with 0 test-time registers (shuffled elsewhere)" in printed
    outliers = next(line for line in printed.splitlines() if line.startswith("images with outliers"))
    assert outliers.split()[-6:] == ["100.0%", "[100.0,", "100.0]"] * 2     # shuffling moves the outliers, it does not remove them


def test_the_documented_flag_table_lists_every_flag():
    flags = {option for action in evaluate.build_parser()._actions for option in action.option_strings}
    assert _documented_flags("evaluate.md", "# Evaluate") == flags - {"--help", "-h"}


def test_the_figure_shows_each_images_attention_and_boxes_per_column(tmp_path, capsys):
    figure = tmp_path / "discovery.png"
    assert evaluate.main(["--num-images", "6", "--quiet", "--figure", str(figure)]) == 0
    assert f"wrote {figure}" in capsys.readouterr().out
    assert Image.open(figure).size[0] > 400

    from test_time_registers.analysis.evaluation import draw_object_discovery   # the same figure, by structure
    from test_time_registers.registry import load_model

    loaded = load_model("demo")
    dataset = scene_images(5, seed=1)
    comparison = compare_variants({"original": (loaded.hook_manager, loaded.preprocess),
                                   "register": (ModifiedModel(loaded.model, loaded.hook_manager, loaded.planted).hook_manager,
                                                loaded.preprocess)}, dataset, keep_maps=3, batch_size=2)
    drawn = draw_object_discovery(comparison.results)
    labels = [ax.get_label() for ax in drawn.axes if ax.get_label().startswith("attention")]
    assert len(drawn.axes) == 3 * 3 and len(labels) == 3 * 2
    for result in comparison.results:
        assert result.cls_maps.shape == (3, 14, 14) and torch.isfinite(result.cls_maps).all()
        torch.testing.assert_close(result.cls_maps.sum(dim=(1, 2)), torch.ones(3))
        assert len(result.shown) == 3 and result.shown[0][0].size == (224, 224)
    rectangles = sum(len(ax.patches) for ax in drawn.axes)
    true_boxes = sum(len(dataset.items[i].boxes) for i in range(3))
    assert rectangles == 3 * true_boxes + 2 * 3          # true boxes on every panel, one LOST box per map


def test_neurons_of_another_model_are_refused_without_force(tmp_path, capsys):
    from test_time_registers import RegisterNeurons

    foreign = RegisterNeurons.coerce([(4, 10)])
    foreign.model = "openclip:ViT-B-16:laion2b_s34b_b88k"
    path = foreign.save(tmp_path / "foreign.json")
    assert evaluate.main(["--neurons", str(path), "--num-images", "4", "--quiet"]) == 2
    assert "--force" in error_line(capsys)
    assert evaluate.main(["--neurons", str(path), "--num-images", "4", "--quiet", "--force"]) == 0


def test_a_tokenizer_that_does_not_fit_the_text_tower_skips_zero_shot_in_one_line(tmp_path, classes, registered_config,
                                                                                   capsys):
    from test_time_registers import RegisterNeurons

    neurons = RegisterNeurons.coerce([(1, 5), (1, 9)]).save(tmp_path / "hand.json")
    assert evaluate.main(["--model", f"openclip:{registered_config}:random", "--images", str(classes),
                          "--neurons", str(neurons), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "no zero-shot row for original: the tokenizer makes token ids up to" in printed
    assert "embeds only 100" in printed and "zero-shot accuracy" not in printed
    assert "linear probe on CLS features" in printed
