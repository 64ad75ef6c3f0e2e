"""The figures of test_time_registers.analysis.visualize and the visualize command, checked by structure, not pixels."""

import math
import re
import subprocess
import sys
import textwrap

import matplotlib
import pytest
import torch
from PIL import Image

from test_time_registers import ImageSourceError, InvalidArgumentError, RegisterNeurons, find_register_neurons
from test_time_registers.clip import ClipHookManager, SiglipVisionHookManager
from test_time_registers.dinov2 import Dinov2HookManager
from test_time_registers.planting import marker_images, plant_register_neurons
from test_time_registers.scripts import visualize
from test_time_registers.analysis.visualize import (Page, collect_views, draw_cls_attention, draw_neuron_scores,
                                           draw_norm_histogram, draw_norm_maps, draw_pages, draw_token_attention,
                                           norm_histogram, save_pages, score_matrix)
from tests.tiny_models import IMAGE_SIZE, dinov2_model, hf_tower

DEMO_LAYERS = [0, 4, 7]
SHOWN = 2


def panels(page: Page, kind: str) -> dict[str, "matplotlib.axes.Axes"]:
    """The page's axes whose label starts with ``kind``, by label."""
    return {ax.get_label(): ax for ax in page.figure.axes if ax.get_label().split(" ")[0] == kind}


def fields(label: str) -> dict[str, str]:
    return dict(part.split("=") for part in label.split(" ")[1:] if "=" in part)


def array(ax) -> torch.Tensor:
    return torch.as_tensor(ax.get_images()[0].get_array().filled(math.nan), dtype=torch.float64)


@pytest.fixture(scope="module")
def demo_run(demo):
    """Demo neurons found on 16 scenes, and views of 2 other scenes at three layers."""
    model, preprocess, planted, images = demo
    hook_manager = ClipHookManager(model, name="demo")
    neurons = find_register_neurons(hook_manager, images[:16], preprocess, top_k=len(planted), progress=False)
    views = collect_views(hook_manager, images[16:16 + SHOWN], preprocess, neurons, layers=DEMO_LAYERS)
    return hook_manager, neurons, views


@pytest.fixture(scope="module")
def registers_run():
    """A tiny DINOv2 with 4 trained registers and 3 planted register neurons, found by discovery."""
    hook_manager = Dinov2HookManager(dinov2_model(registers=4))
    marked = marker_images(24, IMAGE_SIZE, 8, seed=0)
    planted = plant_register_neurons(hook_manager, marked, 1, 3)
    neurons = find_register_neurons(hook_manager, marked.pixel_values, top_k=3, progress=False)
    assert sorted(neurons.pairs()) == planted
    return hook_manager, neurons, collect_views(hook_manager, marked.pixel_values, None, neurons, num_images=SHOWN)


def test_the_views_hold_every_map_in_its_declared_shape(demo_run):
    hook_manager, neurons, views = demo_run
    grid = (14, 14)
    assert views.grid == grid and views.names == ["image_0", "image_1"] and views.layers == DEMO_LAYERS
    assert views.pixels.shape == (SHOWN, 224, 224, 3) and 0 <= views.pixels.min() and views.pixels.max() <= 1
    for when in ("before", "after"):
        assert views.norms[when].shape == (len(DEMO_LAYERS), SHOWN, *grid)
        assert views.detect_norms[when].shape == (SHOWN, 196)
        assert views.cls_attention[when].shape == (2, SHOWN, 3, *grid)   # the last 2 layers, 3 heads
        assert views.cls_on_patches[when].shape == (2, SHOWN, 3)
        assert all(torch.isfinite(tensor).all() for tensor in (views.norms[when], views.cls_attention[when]))
    assert views.cls_layers == [6, 7] and views.token_layer == 7 and views.detect_layer == neurons.detect_layer == 7
    assert views.register_norms.shape == (SHOWN, 1)
    assert [token.name for token in views.tokens] == ["CLS", "test-time register 0"]
    for token in views.tokens:
        assert token.maps.shape == (SHOWN, *grid) and token.shares.shape == (SHOWN, 3)
        torch.testing.assert_close(token.shares.sum(dim=1), torch.ones(SHOWN), atol=1e-4, rtol=0)
    # the register takes the outliers' norm: the largest patch norm falls to about the median
    before, after = views.detect_norms["before"], views.detect_norms["after"]
    assert (before.amax(dim=1) > 10 * before.median(dim=1).values).all()
    assert (after.amax(dim=1) < 2 * after.median(dim=1).values).all()
    assert (views.register_norms[:, 0] > 10 * after.median(dim=1).values).all()


def test_norm_maps_have_a_row_per_layer_and_a_before_and_after_column_per_image(demo_run):
    _, _, views = demo_run
    page = draw_norm_maps(views)
    maps = panels(page, "norms")
    assert page.name == "norm_maps" and len(maps) == len(DEMO_LAYERS) * SHOWN * 2
    assert len(panels(page, "image")) == SHOWN
    assert len(panels(page, "colour")) == len(DEMO_LAYERS)   # one colour bar per layer row
    for row, layer in enumerate(DEMO_LAYERS):
        row_maps = {label: ax for label, ax in maps.items() if fields(label)["layer"] == str(layer)}
        assert len(row_maps) == 2 * SHOWN
        assert len({ax.get_images()[0].get_clim() for ax in row_maps.values()}) == 1   # one scale per row
        for label, ax in row_maps.items():
            where = fields(label)
            values = array(ax)
            assert values.shape == views.grid and torch.isfinite(values).all()
            torch.testing.assert_close(values, views.norms[where["when"]][row, int(where["image"])].double())
    # at the detection layer the outliers are gone after, while layer 0 comes before the register neurons
    top = {when: max(array(ax).max() for label, ax in maps.items() if fields(label) == {
        "layer": "7", "image": "0", "when": when}) for when in ("before", "after")}
    assert top["before"] > 10 * top["after"]


def test_the_histogram_counts_every_patch_in_log_spaced_bins_and_marks_the_threshold(demo_run):
    _, neurons, views = demo_run
    histogram = norm_histogram(views, bins=30)
    ratios = histogram.edges[1:] / histogram.edges[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])))   # log-spaced
    assert int(histogram.counts["before"].sum()) == int(histogram.counts["after"].sum()) == SHOWN * 196
    assert int(histogram.counts["registers"].sum()) == SHOWN
    above = histogram.edges[1:] > neurons.threshold
    assert histogram.counts["before"][above].sum() > 0 and histogram.counts["after"][above].sum() == 0

    page = draw_norm_histogram(views, bins=30)
    (ax,) = panels(page, "histogram").values()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    marks = [line for line in ax.lines if list(line.get_xdata()) == [neurons.threshold] * 2]
    assert len(marks) == 1 and "threshold" in marks[0].get_label()
    assert {text.get_text().split(",")[0] for text in ax.get_legend().get_texts()} >= {
        "patches", "1 test-time register", f"outlier threshold {neurons.threshold:.4g} (neuron file)"}


def test_cls_attention_has_a_row_per_layer_and_run_and_a_column_per_head(demo_run):
    _, _, views = demo_run
    page = draw_cls_attention(views, 1)
    maps = panels(page, "cls")
    assert page.name == "cls_attention_image1" and len(maps) == 2 * 2 * 3   # 2 layers x before/after x 3 heads
    assert len(panels(page, "image")) == 1 and len(panels(page, "colour")) == 4
    assert "image 1" in page.figure.get_suptitle()
    for label, ax in maps.items():
        where = fields(label)
        values = array(ax)
        assert values.shape == views.grid and where["image"] == "1"
        assert torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
        share = float(ax.get_xlabel().removeprefix("on patches: ").rstrip("%")) / 100
        # the demo's CLS attends the outlier patches before and the register after
        assert share > 0.9 if where["when"] == "before" else share < 0.1
    with pytest.raises(InvalidArgumentError, match="image must be in 0..1"):
        draw_cls_attention(views, 2)


def test_each_token_of_a_model_with_trained_registers_gets_its_own_page(registers_run):
    _, _, views = registers_run
    names = ["CLS"] + [f"trained register {i}" for i in range(4)] + ["test-time register 0"]
    assert [token.name for token in views.tokens] == names and views.grid == (8, 8)
    pages, notes = draw_pages(views)
    tokens = [page for page in pages if page.kind == "token_attention"]
    assert len(tokens) == SHOWN * len(names) and notes == []
    assert len({page.name for page in pages}) == len(pages)
    for page, (image, name) in zip(tokens, [(i, n) for i in range(SHOWN) for n in names]):
        title = page.figure.get_suptitle()
        assert title.startswith(f"{name}, layer 3, image {image}") and "with 1 test-time register" in title
        token_panels = panels(page, "token")
        (ax,) = [ax for label, ax in token_panels.items() if not label.endswith("renormalised")]
        (renormalised,) = [ax for label, ax in token_panels.items() if label.endswith("renormalised")]
        values = array(ax)
        assert values.shape == (8, 8) and torch.isfinite(values).all() and values.min() >= 0
        torch.testing.assert_close(array(renormalised), values / values.sum(), atol=1e-6, rtol=1e-4)
        (bars,) = panels(page, "shares").values()
        shares = [patch.get_width() for patch in bars.patches]
        assert len(shares) == len(names) + 1 and math.isclose(sum(shares), 1, abs_tol=1e-4)
        assert math.isclose(shares[-1], float(values.sum()), rel_tol=1e-4)   # the map is the patches' part
        assert len(panels(page, "image")) == 1


def test_the_neuron_heatmap_marks_the_selected_neurons_and_the_highest_layer(demo_run):
    _, neurons, _ = demo_run
    page = draw_neuron_scores(neurons)
    (ax,) = panels(page, "heatmap").values()
    assert array(ax).shape == tuple(neurons.candidate_scores.shape) == (8, 768)
    (marks,) = ax.collections
    assert sorted(map(tuple, marks.get_offsets().tolist())) == sorted((n, layer) for layer, n in neurons.pairs())
    (line,) = [line for line in ax.lines if "highest" in line.get_label()]
    assert list(line.get_ydata()) == [neurons.highest_layer + 0.5] * 2
    (ranking,) = panels(page, "ranking").values()
    colours = [bar.get_facecolor() for bar in ranking.patches]
    selected = colours[0]
    assert colours.count(selected) == len(neurons) and colours[:len(neurons)] == [selected] * len(neurons)
    assert [label.get_text() for label in ranking.get_xticklabels()][:len(neurons)] == [
        f"{item.layer}:{item.neuron}" for item in neurons]


def test_wide_layers_are_max_pooled_so_no_peak_disappears():
    scores = torch.zeros(2, 3000)
    scores[1, 2999] = 7.0
    scores[0, 2000:] = math.nan
    matrix, factor = score_matrix(scores, max_columns=1024)
    assert factor == 3 and matrix.shape == (2, 1000)
    assert matrix[1, 999] == 7.0 and matrix[0, 666] == 0.0 and matrix[0, 667:].isnan().all()


def test_a_model_without_cls_skips_the_cls_figure_and_neurons_without_scores_skip_the_heatmap():
    hook_manager = SiglipVisionHookManager(hf_tower("siglip"))
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    views = collect_views(hook_manager, pixels, None, [(1, 3), (2, 5)], num_images=1)
    assert views.cls_layers == [] and [token.name for token in views.tokens] == ["test-time register 0"]
    pages, notes = draw_pages(views)
    assert [page.kind for page in pages] == ["norm_maps", "norm_histogram", "token_attention"]
    assert any("no CLS token" in note for note in notes) and any("no candidate scores" in note for note in notes)
    with pytest.raises(InvalidArgumentError, match="no CLS token"):
        draw_cls_attention(views, 0)
    with pytest.raises(InvalidArgumentError, match="rerun discovery"):
        draw_neuron_scores(views.neurons)
    (ax,) = panels(draw_norm_histogram(views), "histogram").values()
    assert "the neurons record no threshold" in ax.get_title()


def test_bad_arguments_are_library_errors(demo_run, tmp_path):
    hook_manager, neurons, _ = demo_run
    with pytest.raises(InvalidArgumentError, match="each of layers must be an int in 0..7, got 8"):
        collect_views(hook_manager, [Image.new("RGB", (64, 64))], None, neurons, layers=[8])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="image folder is empty"):
        collect_views(hook_manager, tmp_path / "empty", None, neurons)


def test_pages_are_saved_as_pngs_and_one_pdf_and_leave_pyplot_alone(demo_run, tmp_path):
    import matplotlib.pyplot as plt

    _, neurons, views = demo_run
    pages, _ = draw_pages(views)
    assert plt.get_fignums() == []   # drawn outside pyplot: nothing to close, nothing leaks
    paths = save_pages(pages, tmp_path / "out")
    assert [path.name for path in paths] == [f"{page.name}.png" for page in pages] + ["all_figures.pdf"]
    assert pdf_pages(paths[-1]) == len(pages)
    assert Image.open(paths[0]).size[0] > 500
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(path.name for path in paths)


def test_a_page_that_fails_to_draw_leaves_no_file(demo_run, tmp_path):
    _, _, views = demo_run
    broken = draw_norm_histogram(views)
    broken.figure.text(0.5, 0.5, r"$\frac{$")   # mathtext that cannot be parsed fails when drawn
    with pytest.raises(ValueError):
        save_pages([draw_norm_maps(views), broken], tmp_path)
    assert list(tmp_path.iterdir()) == []


def pdf_pages(path) -> int:
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", path.read_bytes()))


# ---- the command ------------------------------------------------------------------------------
def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


DEMO_FIGURES = ["norm_maps.png", "norm_histogram.png", "neuron_scores.png", "cls_attention_image0.png",
                "token_attention_image0_cls.png", "token_attention_image0_test_time_register0.png", "all_figures.pdf"]


def test_a_run_discovers_neurons_and_writes_every_figure_and_one_pdf(tmp_path, capsys):
    out = tmp_path / "figures"
    assert visualize.main(["--out", str(out), "--num-images", "1", "--layers", "4,6-7", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC DEMO" in printed and "discovery found 4 register neurons in 64 images" in printed
    assert sorted(path.name for path in out.iterdir()) == sorted(DEMO_FIGURES)
    assert pdf_pages(out / "all_figures.pdf") == len(DEMO_FIGURES) - 1
    for name in DEMO_FIGURES:
        assert str(out / name) in printed


def test_neurons_without_scores_skip_the_heatmap_with_a_note(tmp_path, capsys, demo_run):
    neurons = RegisterNeurons.coerce(demo_run[1].pairs()).save(tmp_path / "hand.json")
    out = tmp_path / "figures"
    assert visualize.main(["--out", str(out), "--num-images", "1", "--layers", "7", "--neurons", str(neurons),
                           "--attention-layer", "3"]) == 0
    printed = capsys.readouterr().out
    assert "note: no neuron-score heatmap: these neurons carry no candidate scores" in printed
    assert "rerun discovery" in printed and not (out / "neuron_scores.png").exists()
    assert pdf_pages(out / "all_figures.pdf") == len(DEMO_FIGURES) - 2


def test_a_folder_is_sampled_and_its_unreadable_files_are_counted(tmp_path, capsys, demo_run):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (90, 70), (60 * index, 120, 200 - 50 * index)).save(photos / f"{index}.png")
    (photos / "notes.txt").write_text("not an image")
    neurons = demo_run[1].save(tmp_path / "demo.json")
    out = tmp_path / "figures"
    assert visualize.main(["--images", str(photos), "--neurons", str(neurons), "--num-images", "4", "--layers", "7",
                           "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 12 figures of 3 image(s)" in printed   # maps, histogram, scores, 3 CLS pages, 3 x 2 token pages
    assert re.search(r"^skipped 1 unreadable or non-image file\(s\) in ", printed, re.MULTILINE)
    assert (tmp_path / "demo.scores.safetensors").is_file() and (out / "neuron_scores.png").is_file()


@pytest.fixture
def dinov2_dir(tmp_path):
    dinov2_model().save_pretrained(tmp_path / "dinov2")
    return tmp_path / "dinov2"


@pytest.mark.parametrize("flags, message", [
    (["--layers", "0-99"], "error: --layers: demo has layers 0..7, not 8 to 99"),
    (["--layers", "9"], "error: --layers: demo has layers 0..7, not 9"),
    (["--layers", "3-1"], "the range 3-1 runs backwards"),
    (["--layers", "all"], "expected layers like 0-11 or 3,5,7, got 'all'"),
    (["--num-images", "0"], "--num-images: expected a positive integer, got '0'"),
    (["--attention-layer", "8"], "error: --attention-layer must be an int in 0..7, got 8"),
    (["--images", "EMPTY"], "image folder is empty"),
    (["--force"], "--force only applies to --neurons"),
    (["--neurons", "preset:dinov2-vitl14"], "names layer 17, but demo has layers 0..7"),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    (tmp_path / "EMPTY").mkdir()
    flags = [str(tmp_path / "EMPTY") if flag == "EMPTY" else flag for flag in flags]
    out = tmp_path / "figures"
    assert visualize.main(["--out", str(out), "--quiet", *flags]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_a_model_without_scenes_needs_images_and_out_must_be_a_folder(tmp_path, capsys, dinov2_dir):
    capsys.readouterr()   # saving the model printed a progress bar
    out = tmp_path / "figures"
    assert visualize.main(["--model", f"dinov2:{dinov2_dir}", "--out", str(out)]) == 2
    assert "--images DIR is required for dinov2:" in error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert visualize.main(["--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in error_line(capsys)
    assert not out.exists()


def test_without_matplotlib_the_command_says_how_to_install_it(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None   # as if it were not installed
        from test_time_registers.scripts.visualize import main
        sys.exit(main(["--out", {str(tmp_path / "figures")!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: figures need matplotlib") and 'pip install "test-time-registers[viz]"' in line
    assert not (tmp_path / "figures").exists()
