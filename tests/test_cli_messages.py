"""What a new user hit on the command line: each one, as a test."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from test_time_registers import RegisterNeurons
from test_time_registers.scripts import benchmark, export, find_register_neurons, visualize
from tests.tiny_models import dinov2_model

ROOT = Path(__file__).resolve().parent.parent
main = find_register_neurons.main
DEMO_RUN = ["--num-images", "12", "--eval-images", "4", "--quiet"]


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.fixture
def photos(tmp_path):
    """A folder of 6 small images."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(6):
        Image.new("RGB", (80, 80), (30 * index, 120, 200 - 20 * index)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    dinov2_model().save_pretrained(folder)
    return folder


def test_an_openclip_name_without_weights_says_what_to_write(tmp_path, photos, capsys):
    assert main(["--model", "openclip:ViT-B-16", "--images", str(photos), "--out", str(tmp_path / "n.json")]) == 2
    line = error_line(capsys)
    assert "openclip:ViT-B-16:TAG" in line and "openclip:ViT-B-16:random" in line and "laion2b_s34b_b88k" in line
    assert not (tmp_path / "n.json").exists()


OFFLINE_RUNS = textwrap.dedent("""
    import sys, time
    from test_time_registers.scripts.find_register_neurons import main
    for spec in sys.argv[2:]:
        started = time.perf_counter()
        code = main(["--model", spec, "--images", sys.argv[1], "--quiet", "--out", sys.argv[1] + "/n.json"])
        print(spec, code, round(time.perf_counter() - started, 1), flush=True)
""")


def test_unreachable_hubs_fail_in_one_line_with_how_to_pass_local_files(tmp_path, photos):
    """No HF_HUB_OFFLINE, and a hub that refuses connections: each spec is one line, with no retries."""
    environment = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environment.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    specs = ["openclip:ViT-B-16:laion2b_s34b_b88k", "dinov2:facebook/dinov2-small", "deit:deit3_small_patch16_224"]
    result = subprocess.run([sys.executable, "-c", OFFLINE_RUNS, str(photos), *specs], env=environment,
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    errors = result.stderr.strip().splitlines()
    assert [line.split()[:2] for line in result.stdout.strip().splitlines()] == [[spec, "2"] for spec in specs]
    assert len(errors) == 3, result.stderr
    for error, hint in zip(errors, ("openclip:ViT-B-16:/path/to/checkpoint.safetensors", "then pass dinov2:DIR",
                                    "timm:deit3_small_patch16_224:/path/to/model.safetensors")):
        assert error.startswith("error: cannot download") and "127.0.0.1 cannot be reached" in error, error
        assert hint in error
    assert not (photos / "n.json").exists()


def test_hf_hub_offline_is_honoured(tmp_path, photos, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"   # set by conftest
    assert main(["--model", "dinov2:facebook/dinov2-small", "--images", str(photos), "--quiet"]) == 2
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in error_line(capsys)


@pytest.mark.parametrize("flags", [["--out", "same.x", "--log", "same.x"], ["--log", "a/../same.x", "--figure", "same.x"],
                                   ["--out", "same.x", "--figure", "./same.x"]])
def test_two_outputs_naming_one_file_are_refused_before_any_work(tmp_path, capsys, flags, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert main([*DEMO_RUN, *flags]) == 2
    assert "name the same file" in error_line(capsys)
    assert not (tmp_path / "same.x").exists()


@pytest.fixture
def demo_neurons(tmp_path):
    assert main([*DEMO_RUN, "--out", str(tmp_path / "demo.json")]) == 0
    return tmp_path / "demo.json"


def test_neurons_from_another_model_are_refused_unless_forced(tmp_path, demo_neurons, capsys):
    data = json.loads(demo_neurons.read_text())
    data["model"] = "openclip:ViT-B-16:laion2b_s34b_b88k"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([*DEMO_RUN, "--neurons", str(other)]) == 2
    line = error_line(capsys)
    assert "found on openclip:ViT-B-16:laion2b_s34b_b88k, not on demo" in line and "--force" in line
    assert main([*DEMO_RUN, "--neurons", str(other), "--force"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "warning: these register neurons were found on openclip:ViT-B-16:laion2b_s34b_b88k, not on demo; their "
        "indices fit, so they are applied anyway"]
    assert main([*DEMO_RUN, "--neurons", str(demo_neurons)]) == 0   # the model's own neurons need no --force
    assert capsys.readouterr().err == ""


def test_the_library_warns_about_neurons_from_another_model(caplog, clip_hm):
    neurons = RegisterNeurons.coerce([(0, 1)])
    neurons.model = "openclip:ViT-L-14:openai"
    with caplog.at_level("WARNING", logger="test_time_registers"):
        neurons.check_fits(clip_hm)
        neurons.check_fits(clip_hm)
    assert [record.getMessage() for record in caplog.records] == [
        f"these register neurons were found on openclip:ViT-L-14:openai, not on {clip_hm.name}; their indices fit, "
        "so they are applied anyway"]


def test_neuron_files_record_the_model_by_a_useful_name(clip_hm):
    assert clip_hm.name == "openclip:ViT(width=64, layers=3, patch=16, image=64)"


@pytest.mark.parametrize("flag", [["--top-k", "3"], ["--threshold", "40"], ["--detect-layer", "5"],
                                  ["--highest-layer", "auto"], ["--score", "abs"], ["--out", "x.json"]])
def test_discovery_flags_with_neurons_are_refused(tmp_path, demo_neurons, capsys, flag):
    capsys.readouterr()
    assert main([*DEMO_RUN, "--neurons", str(demo_neurons), *flag]) == 2
    line = error_line(capsys)
    assert f"--neurons applies an existing neuron file, so {flag[0]} would be ignored" in line


def test_force_without_neurons_is_refused(capsys):
    assert main([*DEMO_RUN, "--force"]) == 2
    assert "--force only applies to --neurons" in error_line(capsys)


def test_messages_name_flags_not_parameters(tmp_path, photos, dinov2_dir, capsys):
    spec = f"dinov2:{dinov2_dir}"
    assert main(["--model", spec, "--images", str(photos), "--quiet", "--out", str(tmp_path / "n.json")]) == 2
    line = error_line(capsys)
    assert "no high-norm outliers" in line and re.search(r"try --threshold \d", line) and "--detect-layer" in line
    assert "threshold=" not in line and "detect_layer" not in line
    assert main(["--model", spec, "--images", str(photos), "--quiet", "--detect-layer", "9"]) == 2
    assert error_line(capsys) == "error: --detect-layer must be an int in 0..3, got 9"


def test_no_readable_image_names_the_folder_not_a_function(tmp_path, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.png", "d.jpg"):
        (folder / name).write_bytes(b"not an image")
    assert main(["--images", str(folder), "--quiet", "--out", str(tmp_path / "n.json")]) == 2
    line = error_line(capsys)
    assert "no readable image among the 4 file(s) in" in line and str(folder) in line
    assert "find_register_neurons" not in line


def test_skipped_files_are_named_as_they_are_skipped_then_counted(tmp_path, photos, capsys):
    for index in range(8):
        (photos / f"junk{index}.txt").write_text("text")
    assert main([*DEMO_RUN, "--images", str(photos), "--out", str(tmp_path / "n.json"), "--eval-images", "1"]) == 0
    out = capsys.readouterr().out
    named = re.findall(r"^skipped (junk\d\.txt): ", out, re.MULTILINE)
    assert 1 <= len(named) <= 5 and len(set(named)) == len(named)
    assert re.search(r"^skipped \d+ unreadable or non-image file\(s\) in ", out, re.MULTILINE)


def test_the_progress_bar_over_a_folder_shows_a_total(tmp_path, photos, capsys):
    assert main(["--images", str(photos), "--eval-images", "2", "--out", str(tmp_path / "n.json")]) == 0
    assert "finding register neurons" in (err := capsys.readouterr().err) and "4/4" in err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--batch-size BATCH_SIZE images per forward pass (default: 32)", "(default: register_neurons.json)",
                     "(default: auto)", "(default: raw)", "(default: demo)", "(default: fp32)", "(default: cpu)",
                     "(default: 1)", "amp_bf16"):
        assert expected in text, expected


def _documented_flags(page: str, heading: str) -> set[str]:
    text = (ROOT / "docs" / "pages" / page).read_text().split(f"{heading}\n", 1)[1]
    table = text[text.index("| flag |"):].split("\n\n", 1)[0]
    return {flag for row in table.splitlines()[2:] for flag in re.findall(r"--[a-z][a-z-]*", row.split("|")[1])}


@pytest.mark.parametrize("page, heading, parser", [("find.md", "## On the command line", find_register_neurons.build_parser),
                                                   ("deploy.md", "## Speed", benchmark.build_parser),
                                                   ("deploy.md", "## Export to ONNX and torch.export", export.build_parser),
                                                   ("visualize.md", "# Visualize", visualize.build_parser)])
def test_the_documented_flag_tables_list_every_flag(page, heading, parser):
    flags = {option for action in parser()._actions for option in action.option_strings if option.startswith("--")}
    assert _documented_flags(page, heading) == flags - {"--help"}


def test_the_demo_banner_names_the_images_it_ran_on(tmp_path, photos, capsys):
    assert main(["--images", str(photos), "--quiet", "--eval-images", "2", "--out", str(tmp_path / "n.json")]) == 0
    out = capsys.readouterr().out
    assert f"SYNTHETIC DEMO: a small random OpenCLIP ViT with planted register neurons, on images from {photos}" in out
    assert "generated scenes" not in out


def test_the_table_is_measured_on_held_out_images(tmp_path, photos, capsys):
    assert main([*DEMO_RUN, "--out", str(tmp_path / "n.json")]) == 0
    assert "before/after on 4 held-out images (not used by discovery)" in capsys.readouterr().out
    assert main(["--images", str(photos), "--quiet", "--eval-images", "2", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "in 4 images" in out and "before/after on 2 held-out images (not used by discovery)" in out


@pytest.mark.parametrize("device, message", [("mps", "--device mps: this torch cannot use it"),
                                             ("cuda:0", "CUDA is not available"), ("meta", "cannot run on a meta")])
def test_devices_torch_cannot_use_are_one_line(capsys, device, message):
    import torch

    if device != "meta" and torch.device(device).type == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the message is for machines without it")
    assert main([*DEMO_RUN, "--device", device]) == 2
    assert message in error_line(capsys)


def test_the_benchmark_reports_a_model_without_outliers_like_the_cli(tmp_path, photos, dinov2_dir, capsys):
    spec = ["--model", f"dinov2:{dinov2_dir}", "--images", str(photos), "--num-images", "4", "--repeats", "1"]
    assert benchmark.main(spec) == 2
    line = error_line(capsys)
    assert "no high-norm outliers" in line and "--threshold" in line
    neurons = RegisterNeurons.coerce([(1, 3), (2, 5)]).save(tmp_path / "hand.json")
    assert benchmark.main([*spec, "--threshold", "1", "--neurons", str(neurons)]) == 0
    assert "discovery / plain forward" in capsys.readouterr().out
    assert benchmark.main([*spec, "--model", "openclip:ViT-B-16"]) == 2
    assert "names no weights" in error_line(capsys)
