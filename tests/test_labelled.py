"""Labelled images (test_time_registers.data.labelled): one reader of class folders, VOC boxes, generated scenes
and CIFAR, for evaluation and training."""

import pytest
from PIL import Image

from test_time_registers import ImageSourceError, InvalidArgumentError
from test_time_registers.data.labelled import folder_images, scene_images, voc_boxes, voc_images
from test_time_registers.data.scenes import SHAPES, TEXTURES, demo_scenes


def _write_voc(root, entries):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name, size, objects in entries:
        Image.new("RGB", size, (90, 120, 150)).save(root / "JPEGImages" / f"{name}.jpg")
        objects_xml = "".join(
            f"<object><name>{label}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{box[0]}</xmin>"
            f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
            for label, box, difficult in objects)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"</size>{objects_xml}</annotation>")


def test_voc_boxes_are_read_zero_based_and_the_largest_box_gives_the_label(tmp_path):
    _write_voc(tmp_path, [("a", (100, 80), [("dog", (1, 1, 10, 20), False), ("cat", (11, 21, 90, 70), True)]),
                          ("b", (60, 60), [("bird", (5, 5, 30, 30), False)])])
    filename, boxes, names = voc_boxes(tmp_path / "Annotations" / "a.xml")
    assert filename == "a.jpg" and names == ["dog", "cat"]
    assert boxes.tolist() == [[0, 0, 10, 20], [10, 20, 90, 70]]     # VOC's 1-based inclusive boxes, made 0-based
    assert voc_boxes(tmp_path / "Annotations" / "a.xml", skip_difficult=True)[2] == ["dog"]
    dataset = voc_images(tmp_path)
    assert dataset.class_names == ["bird", "cat", "dog"] and dataset.has_boxes and dataset.has_labels
    assert [item.label for item in dataset.items] == [1, 0]          # a: cat has the larger box
    assert dataset.items[0].read().size == (100, 80)


def test_bad_voc_folders_are_precise_errors(tmp_path):
    with pytest.raises(ImageSourceError, match="Annotations/"):
        voc_images(tmp_path)
    _write_voc(tmp_path, [("a", (50, 50), [("dog", (1, 1, 10, 10), False)])])
    (tmp_path / "Annotations" / "broken.xml").write_text("<annotation><filename>")
    with pytest.raises(ImageSourceError, match="broken.xml is not a readable VOC annotation"):
        voc_images(tmp_path)


@pytest.fixture
def classes(tmp_path):
    """Two classes of 6 small images each, one sub-folder per class."""
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        folder = tmp_path / "classes" / name
        folder.mkdir(parents=True)
        for index in range(6):
            Image.new("RGB", (40, 40), tuple(c + 5 * index for c in colour)).save(folder / f"{index}.png")
    return tmp_path / "classes"


def test_a_class_folder_gives_labels(classes):
    dataset = folder_images(classes)
    assert dataset.class_names == ["blue", "red"] and [item.label for item in dataset.items] == [0] * 6 + [1] * 6


def test_generated_scenes_are_labelled_by_shape_or_texture():
    shapes, textures = scene_images(12, size=32), scene_images(12, size=32, task="texture")
    scenes = demo_scenes(12, size=32)
    assert shapes.labels == [scene.label for scene in scenes] and shapes.class_names == list(SHAPES)
    assert textures.labels == [scene.texture_label for scene in scenes] and textures.class_names == list(TEXTURES)
    with pytest.raises(InvalidArgumentError, match="task must be one of"):
        scene_images(4, task="colour")
