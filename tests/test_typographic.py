"""Typographic attacks (analysis.typographic): the annotation reader, text boxes through the crop, the protocol on
the demo, and the figure. The data are generated: demo scenes with a wrong class name drawn on each."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from test_time_registers import ImageSourceError, InvalidArgumentError
from test_time_registers.analysis import typographic
from test_time_registers.analysis.geometry import preprocess_geometry
from test_time_registers.analysis.typographic import (ACCURACY_ROW, ATTACK_ROW, COLUMNS, ORIGINAL, RANDOM_ON_TEXT,
                                                      REGISTERS_ON_TEXT, draw_typographic_examples,
                                                      random_control_neurons, text_edited_model, text_patch_mask,
                                                      typographic_attack, typographic_folder)
from test_time_registers.data.scenes import SHAPES, demo_scenes

SCENES = 12
TEMPLATES = ("a photo of a {}.", "a picture of a {}.")


def _draw_wrong_name(image: Image.Image, label: int, rng: np.random.Generator, *, x_range=None):
    """Write another class's name on ``image`` (in place) with PIL's default font; returns (text class, box)."""
    text = int(rng.choice([index for index in range(len(SHAPES)) if index != label]))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), SHAPES[text], font=font)
    width, height = right - left, bottom - top
    low, high = x_range or (0, image.width - width - 1)
    x = int(rng.integers(low, high)) - left
    y = int(rng.integers(0, image.height - height - 1)) - top
    shade = np.asarray(image.convert("L"), dtype=np.float64)[y + top:y + bottom, x + left:x + right].mean()
    draw.text((x, y), SHAPES[text], fill="black" if shade > 128 else "white", font=font)
    return text, list(draw.textbbox((x, y), SHAPES[text], font=font))


def write_typographic_folder(root, count: int = SCENES, seed: int = 0, *, cropped: bool = True,
                             broken: bool = True) -> dict:
    """Write ``count`` attacked demo scenes and annotations.json into ``root``; with ``cropped``, one wider image
    whose text lies in the margin the centre crop removes, and with ``broken``, one file that is not an image."""
    rng = np.random.default_rng(seed)
    entries = []
    for index, scene in enumerate(demo_scenes(count, seed=seed, size=224)):
        image = scene.image.copy()
        text, box = _draw_wrong_name(image, scene.label, rng)
        image.save(root / f"scene{index:02d}.png")
        entries.append({"file": f"scene{index:02d}.png", "label": SHAPES[scene.label], "text": SHAPES[text],
                        "text_box": box})
    if cropped:   # 320 x 224: the crop keeps columns 48..272, the text is left of 45
        scene = demo_scenes(1, seed=seed + 1, size=224)[0]
        wide = Image.new("RGB", (320, 224), (200, 200, 200))
        wide.paste(scene.image, (48, 0))
        text, box = _draw_wrong_name(wide, scene.label, rng, x_range=(0, 2))
        assert box[2] <= 48
        wide.save(root / "cropped.png")
        entries.append({"file": "cropped.png", "label": SHAPES[scene.label], "text": SHAPES[text], "text_box": box})
    if broken:
        (root / "broken.png").write_bytes(b"not a png at all")
        entries.append({"file": "broken.png", "label": SHAPES[0], "text": SHAPES[1], "text_box": [0, 0, 10, 10]})
    annotations = {"classes": list(SHAPES), "images": entries}
    (root / "annotations.json").write_text(json.dumps(annotations))
    return annotations


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("typographic")
    write_typographic_folder(root)
    return root


@pytest.fixture(scope="module")
def loaded():
    from test_time_registers.registry import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def attacked(loaded, folder, one_thread):
    """The protocol on the demo, run twice on fresh reads of the folder (one thread: several times faster on a
    shared 2-core machine)."""
    tokenizer = loaded.tokenizer()
    runs = [typographic_attack(loaded.model, loaded.hook_manager, loaded.preprocess, tokenizer,
                               typographic_folder(folder), loaded.planted, templates=TEMPLATES, device="cpu",
                               seed=0, batch_size=8, examples=3) for _ in range(2)]
    return runs


# ---------------------------------------------------------------------------- the reader

def test_the_generated_folder_reads_back(folder):
    annotations = json.loads((folder / "annotations.json").read_text())
    dataset = typographic_folder(folder)
    assert dataset.classes == list(SHAPES) and len(dataset) == SCENES + 2
    for item, entry in zip(dataset.items, annotations["images"]):
        assert item.name == entry["file"] and item.path == folder / entry["file"]
        assert dataset.classes[item.label] == entry["label"] and dataset.classes[item.text] == entry["text"]
        assert item.label != item.text and list(item.text_box) == entry["text_box"]
    first = dataset.items[0].read()
    assert first.size == (224, 224) and first.mode == "RGB"
    assert len(typographic_folder(folder, limit=3)) == 3
    with pytest.raises(InvalidArgumentError, match="limit"):
        typographic_folder(folder, limit=0)


def _valid_folder(root):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 48), (90, 120, 150)).save(root / name)
    return {"classes": ["cat", "dog", "car"],
            "images": [{"file": "a.png", "label": "cat", "text": "dog", "text_box": [1, 2, 30, 12]},
                       {"file": "b.png", "label": "car", "text": "cat", "text_box": [10, 20, 64, 48]}]}


def _set(path, value):
    """A function that sets the key at ``path`` (a tuple of keys and indices) of the annotations to ``value``."""
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return data

    return change


def _delete(path):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return data

    return change


HOSTILE_ANNOTATIONS = {
    "not an object": (lambda data: [data], "the file must be an object"),
    "no images": (_delete(("images",)), "lacks the key.*'images'"),
    "an unknown key": (_set(("images", 0, "textbox"), [1, 2, 3, 4]), r"images\[0\] has unknown key.*'textbox'"),
    "a missing box": (_delete(("images", 1, "text_box")), r"images\[1\] lacks the key.*'text_box'"),
    "classes not a list": (_set(("classes",), "cat dog"), "'classes' must be a list"),
    "one class": (_set(("classes",), ["cat"]), "'classes' must be a list of two or more"),
    "a repeated class": (_set(("classes",), ["cat", "dog", "cat"]), "'classes' names 'cat' more than once"),
    "images not a list": (_set(("images",), {"file": "a.png"}), "'images' must be a non-empty list"),
    "no image": (_set(("images",), []), "'images' must be a non-empty list"),
    "an entry not an object": (_set(("images", 1), "b.png"), r"images\[1\] must be an object"),
    "a label not a string": (_set(("images", 0, "label"), 0), r"images\[0\]\.label must be a class name"),
    "a label not in classes": (_set(("images", 0, "label"), "bird"), r"images\[0\]\.label 'bird' is not one of"),
    "a text not in classes": (_set(("images", 1, "text"), "Cat"), r"images\[1\]\.text 'Cat' is not one of"),
    "the text is the label": (_set(("images", 1, "text"), "car"), r"images\[1\]\.text is 'car', its true class"),
    "a box of 3 numbers": (_set(("images", 0, "text_box"), [1, 2, 3]), r"images\[0\]\.text_box must be 4 finite"),
    "a box of strings": (_set(("images", 0, "text_box"), ["1", "2", "3", "4"]), r"images\[0\]\.text_box must be"),
    "a box of booleans": (_set(("images", 0, "text_box"), [False, False, True, True]), r"text_box must be 4 finite"),
    "an empty box": (_set(("images", 0, "text_box"), [5, 2, 5, 12]), r"images\[0\]\.text_box must be"),
    "a negative box": (_set(("images", 0, "text_box"), [-1, 2, 5, 12]), r"images\[0\]\.text_box must be"),
    "a box past the image": (_set(("images", 1, "text_box"), [10, 20, 65, 48]),
                             r"images\[1\]\.text_box \[10, 20, 65, 48\] reaches outside its image of 64x48"),
    "a file outside the folder": (_set(("images", 0, "file"), "../x.png"), r"images\[0\]\.file '../x.png' must be "
                                                                           "a path inside"),
    "an absolute file": (_set(("images", 0, "file"), "/etc/hostname"), r"images\[0\]\.file .* must be a path inside"),
    "an unknown file": (_set(("images", 1, "file"), "c.png"), r"images\[1\]\.file 'c.png' is not a file in"),
    "a file not a string": (_set(("images", 1, "file"), 3), r"images\[1\]\.file must be a file name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ANNOTATIONS))
def test_hostile_annotations_are_the_librarys_error_naming_file_and_field(tmp_path, case):
    change, message = HOSTILE_ANNOTATIONS[case]
    annotations = change(_valid_folder(tmp_path))
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(ImageSourceError, match=message) as raised:
        typographic_folder(tmp_path)
    assert str(tmp_path / "annotations.json") in str(raised.value)


@pytest.mark.parametrize("text, message", [
    ("{\"classes\": [", "is not valid JSON"),
    ('{"classes": ["a", "b"], "images": [{"file": "a.png", "label": "a", "text": "b", "text_box": [0, 0, NaN, 4]}]}',
     "NaN"),
    ('{"classes": ["a", "b"], "images": [{"file": "a.png", "label": "a", "text": "b", "text_box": [0, 0, 1e400, 4]}]}',
     r"images\[0\]\.text_box must be 4 finite numbers"),
    ('{"classes": ["a", "b"], "classes": ["c", "d"], "images": []}', "repeats the key"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_annotation_text_that_is_not_strict_json_is_refused(tmp_path, text, message):
    _valid_folder(tmp_path)
    (tmp_path / "annotations.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ImageSourceError, match=message):
        typographic_folder(tmp_path)


def test_a_huge_or_missing_annotation_file_or_folder_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ImageSourceError, match="typographic folder not found"):
        typographic_folder(tmp_path / "nowhere")
    with pytest.raises(ImageSourceError, match="has no annotations.json"):
        typographic_folder(tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps(_valid_folder(tmp_path)))
    assert len(typographic_folder(tmp_path)) == 2
    monkeypatch.setattr(typographic, "MAX_ANNOTATION_BYTES", 64)
    with pytest.raises(ImageSourceError, match=r"annotations.json has \d+ bytes, more than the 64"):
        typographic_folder(tmp_path)


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path):
    inside = tmp_path / "set"
    inside.mkdir()
    annotations = _valid_folder(inside)
    Image.new("RGB", (64, 48)).save(tmp_path / "outside.png")
    (inside / "link.png").symlink_to(tmp_path / "outside.png")
    annotations["images"][0]["file"] = "link.png"
    (inside / "annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(ImageSourceError, match=r"images\[0\]\.file 'link.png' leads outside"):
        typographic_folder(inside)


# ---------------------------------------------------------------------------- the box through the crop

def _rendered_patches(preprocess, size, box) -> torch.Tensor:
    """The patches [14, 14] where a white rectangle at ``box`` on a black image changes the model's input."""
    black = preprocess(Image.new("RGB", size))
    image = Image.new("RGB", size)
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill="white")   # inclusive corners
    changed = (preprocess(image) - black).abs().amax(dim=0) > 0.05                             # [224, 224]
    return changed.reshape(14, 16, 14, 16).any(dim=3).any(dim=1)


@pytest.mark.parametrize("landscape", [True, False])
def test_the_text_mask_follows_the_resize_and_the_centre_crop(loaded, landscape):
    """A 400 x 300 image (or 300 x 400): the shorter side is resized to 224 (x 0.7467 and the longer side to 298,
    x 0.745) and 37 pixels are cropped off each end of the longer side. Each box's patches must be those where the
    same box, rendered and pushed through the same preprocessing, shows. The boxes' edges land at least 3 input
    pixels from patch boundaries, where bicubic resampling cannot blur them into a neighbour."""
    preprocess = loaded.preprocess

    def oriented(box):
        return box if landscape else (box[1], box[0], box[3], box[2])

    size = (400, 300) if landscape else (300, 400)
    geometry = preprocess_geometry(preprocess, size)
    boxes = [(100, 120, 180, 145),    # inside the crop: x 37.5..97.1, y 89.6..108.3
             (10, 40, 80, 70),        # partly cropped off at the left: x 0..22.6
             (150, 10, 260, 30)]      # x 74.75..156.7, y 7.5..22.4
    for box in map(oriented, boxes):
        mask = text_patch_mask(box, geometry, (14, 14), (16, 16))
        assert mask is not None and mask.shape == (14, 14) and mask.dtype == torch.bool
        assert torch.equal(mask, _rendered_patches(preprocess, size, box)), box
    # by hand: x 37.5..97.1 is columns 2..6, y 89.6..108.3 rows 5..6
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[5:7, 2:7] = True
    first = text_patch_mask(oriented(boxes[0]), geometry, (14, 14), (16, 16))
    assert torch.equal(first, expected if landscape else expected.T)
    # an edge exactly on a patch boundary is exclusive: y 120..150 maps to 89.6..112.0, rows 5..6 only
    on_boundary = text_patch_mask(oriented((100, 120, 180, 150)), geometry, (14, 14), (16, 16))
    assert torch.equal(on_boundary, expected if landscape else expected.T)
    # a box in the cropped margin has no patch
    assert text_patch_mask(oriented((0, 200, 40, 230)), geometry, (14, 14), (16, 16)) is None


def test_text_past_the_last_whole_patch_has_no_patch():
    """An input of 230 pixels has 14 patches of 16 (224 pixels): text in the last 6 columns is seen by none."""
    from torchvision import transforms

    geometry = preprocess_geometry(transforms.Compose([transforms.ToTensor()]), (230, 230))
    assert text_patch_mask((225, 10, 230, 20), geometry, (14, 14), (16, 16)) is None
    mask = text_patch_mask((200, 2, 230, 14), geometry, (14, 14), (16, 16))
    assert mask.nonzero().tolist() == [[0, 12], [0, 13]]


# ---------------------------------------------------------------------------- the protocol on the demo

def test_random_control_neurons_are_seeded_disjoint_and_in_the_same_layers(loaded):
    hm, planted = loaded.hook_manager, loaded.planted
    control = random_control_neurons(planted, hm, seed=0)
    assert not set(control.pairs()) & set(planted)
    assert sorted(layer for layer, _ in control.pairs()) == sorted(layer for layer, _ in planted)
    assert control.pairs() == random_control_neurons(planted, hm, seed=0).pairs()
    assert control.pairs() != random_control_neurons(planted, hm, seed=1).pairs()
    assert all(0 <= neuron < hm.num_neurons(layer) for layer, neuron in control.pairs())
    # a layer with no other neuron cannot give a control
    every = [(0, neuron) for neuron in range(hm.num_neurons(0))]
    with pytest.raises(InvalidArgumentError, match="too few for a random control"):
        random_control_neurons(every, hm)


def test_the_attack_on_the_demo_has_three_columns_of_rates_in_their_intervals_and_repeats(attacked, loaded, folder):
    first, second = attacked
    assert first.columns == list(COLUMNS)
    assert [row.label for row in first.rows] == [ATTACK_ROW, ACCURACY_ROW]
    assert first.images == SCENES                       # the cropped image and the broken file are not counted
    for row in first.rows:
        assert row.unit == "%"
        for value, (low, high) in zip(row.values, row.intervals):
            assert 0.0 <= low <= value <= high <= 1.0
    assert first.to_dict() == second.to_dict()          # the same call gives the same numbers
    per_image = first.per_image
    for column, row in ((column, index) for index, column in enumerate(COLUMNS)):
        predicted = per_image.predictions[column]
        assert first.rows[0].values[row] == pytest.approx(float((predicted == per_image.texts).double().mean()))
        assert first.rows[1].values[row] == pytest.approx(float((predicted == per_image.labels).double().mean()))
        assert torch.equal(predicted, second.per_image.predictions[column])
        assert torch.equal(per_image.embeddings[column], second.per_image.embeddings[column])
    # both edits change what the model sees (the demo's random text tower may still name the same class)
    for column in (REGISTERS_ON_TEXT, RANDOM_ON_TEXT):
        assert not torch.allclose(per_image.embeddings[column], per_image.embeddings[ORIGINAL])
    assert per_image.text_patches.shape == (SCENES, 14, 14) and bool(per_image.text_patches.flatten(1).any(1).all())
    # the control is the seeded draw, named in the notes
    assert per_image.random_neurons.pairs() == random_control_neurons(loaded.planted, loaded.hook_manager,
                                                                       seed=0).pairs()
    notes = "\n".join(first.notes)
    assert "cropped.png" in notes and "left out 1 image" in notes
    assert "skipped 1 unreadable image(s): broken.png" in notes
    assert f"layer 4: {', '.join(str(n) for _, n in per_image.random_neurons.pairs())}" in notes
    assert ATTACK_ROW in first.format()


def test_the_attack_refuses_what_it_cannot_measure(loaded, folder):
    dataset = typographic_folder(folder, limit=2)
    tokenizer = loaded.tokenizer()
    arguments = (loaded.model, loaded.hook_manager, loaded.preprocess, tokenizer, dataset)
    with pytest.raises(InvalidArgumentError, match="needs register neurons"):
        typographic_attack(*arguments, [], templates=TEMPLATES)
    with pytest.raises(InvalidArgumentError, match="templates"):
        typographic_attack(*arguments, loaded.planted, templates=())
    only_cropped = typographic_folder(folder)
    only_cropped.items = [item for item in only_cropped.items if item.name in ("cropped.png", "broken.png")]
    with pytest.raises(ImageSourceError, match="no image left to evaluate.*1 unreadable, 1 with their text cropped"):
        typographic_attack(*arguments[:4], only_cropped, loaded.planted, templates=TEMPLATES)


def test_moving_the_planted_neurons_puts_the_outliers_on_the_text(loaded, folder, one_thread):
    """The planted neurons fire in layer 4 on smooth patches; the text is never smooth, so the original's outliers
    lie elsewhere. Moved onto the text, their maxima make every text patch an outlier at the next block; the random
    control leaves the text patches ordinary."""
    from test_time_registers.clip.demo import PLANTED_LAYER

    hm, preprocess = loaded.hook_manager, loaded.preprocess
    dataset = typographic_folder(folder, limit=SCENES)
    images = [item.read() for item in dataset.items]
    pixels = torch.stack([preprocess(image) for image in images])
    geometry = preprocess_geometry(preprocess, images[0].size)
    masks = torch.stack([text_patch_mask(item.text_box, geometry, hm.grid_shape(pixels), hm.patch_size)
                         for item in dataset.items])                                          # [B, 14, 14]
    text = masks.flatten(1)                                                                    # [B, P]
    layer = PLANTED_LAYER + 1

    def patch_norms(runner):
        with torch.no_grad(), runner.capture(residual=[layer]) as captured:
            runner.forward_images(pixels)
        return captured.patches("residual", layer).norm(dim=-1)                                # [B, P]

    original = patch_norms(hm)
    moved = patch_norms(text_edited_model(loaded.model, hm, loaded.planted, masks))
    control = patch_norms(text_edited_model(loaded.model, hm, random_control_neurons(loaded.planted, hm), masks))
    with_outliers = original.amax(dim=1) > 10 * original.median(dim=1).values
    assert int(with_outliers.sum()) >= SCENES // 2
    for index in with_outliers.nonzero()[:, 0].tolist():
        median = original[index].median()
        assert not text[index, original[index].argmax()]                       # the original's outliers: not text
        assert moved[index][text[index]].min() > 10 * moved[index].median()     # every text patch is one now
        assert moved[index][~text[index]].max() < 3 * moved[index].median()     # and nothing else is
        assert control[index][text[index]].max() < 3 * median                   # random neurons: ordinary text
        assert control[index].amax() > 10 * median                              # and the planted outliers stay


# ---------------------------------------------------------------------------- the figure

def test_the_figure_shows_each_kept_image_per_variant_with_its_text_box(attacked):
    comparison = attacked[0]
    figure = draw_typographic_examples(comparison, count=2)
    labelled = {ax.get_label(): ax for ax in figure.axes if ax.get_label().startswith("typographic")}
    assert sorted(labelled) == sorted(f"typographic variant={column} image={row}" for row in range(2)
                                      for column in COLUMNS)
    shown = comparison.per_image.shown
    for row in range(2):
        left, top, right, bottom = shown[row][1]
        for column in COLUMNS:
            ax = labelled[f"typographic variant={column} image={row}"]
            (box,) = ax.patches
            assert box.get_width() == pytest.approx(right - left) and box.get_height() == pytest.approx(bottom - top)
            assert len(ax.images) == (1 if column == ORIGINAL else 2)          # the text patches shaded when moved
            predicted = comparison.per_image.classes[int(comparison.per_image.predictions[column][row])]
            assert ax.get_title().endswith(predicted)
    assert len(draw_typographic_examples(comparison).axes) == 3 * len(COLUMNS)   # every kept image by default
    figure.canvas.draw()
    assert (REGISTERS_ON_TEXT, RANDOM_ON_TEXT) == COLUMNS[1:]


def test_the_command_line_runs_the_attack_with_its_figure_and_json(tmp_path, capsys):
    from test_time_registers.scripts import evaluate
    from tests.test_cli_messages import error_line

    data = tmp_path / "attack"
    data.mkdir()
    write_typographic_folder(data, 6, cropped=False, broken=False)
    table, figure = tmp_path / "attack.json", tmp_path / "attack.png"
    assert evaluate.main(["--typographic", str(data), "--quiet", "--json", str(table), "--figure", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert ATTACK_ROW in printed and "random neurons on the text (control)" in printed
    written = json.loads(table.read_text())
    assert written["columns"] == list(COLUMNS) and written["images"] == 6
    assert all(None not in row["intervals"] for row in written["rows"])
    assert Image.open(figure).size[0] > 400
    assert evaluate.main(["--typographic", str(data), "--trained-model", "demo", "--quiet"]) == 2
    assert "takes no --trained-model" in error_line(capsys)
    assert evaluate.main(["--typographic", str(tmp_path), "--quiet"]) == 2
    assert "annotations.json" in error_line(capsys)
