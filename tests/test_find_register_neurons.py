"""scripts/find_register_neurons.py: the demo run, its files, and one-line usage errors with exit code 2."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from PIL import Image

from test_time_registers import RegisterNeurons
from test_time_registers.analysis.figures import GAP, MARGIN

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "find_register_neurons.py"
main = runpy.run_path(str(SCRIPT))["main"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    args = ["--out", str(folder / "neurons.json"), "--log", str(folder / "log.h5"), "--figure",
            str(folder / "figure.png"), "--num-images", "24", "--eval-images", "8", "--quiet"]
    return folder, main(args)


def test_demo_run_writes_neurons_log_and_figure(demo_run, capsys):
    folder, code = demo_run
    assert code == 0
    neurons = RegisterNeurons.load(folder / "neurons.json")
    from test_time_registers.clip.demo import build_demo_model
    assert sorted(neurons.pairs()) == sorted(build_demo_model(seed=0)[2])
    data = json.loads((folder / "neurons.json").read_text())
    assert data["model"] == "demo" and data["images_with_outliers"] == 24
    with h5py.File(folder / "log.h5", "r") as log:
        assert log.attrs["complete"] and log.attrs["images_written"] == 24
        assert log["patch_norms"].shape == (24, 8, 14, 14)
        assert log["prefix_norms"].shape == (24, 8, 1)
        assert log["neuron_activations"].shape == (24, len(neurons), 197)
        assert json.loads(log.attrs["neurons"]) == [list(p) for p in neurons.pairs()]
        assert log["names"][0].decode() == "image_0"
    width, height = Image.open(folder / "figure.png").size
    assert width == 2 * MARGIN + 5 * 160 + 4 * GAP and height > 4 * 160   # the image and 4 maps, 4 rows


def test_demo_output_names_the_synthetic_model_and_the_before_after_table(tmp_path, capsys):
    code = main(["--out", str(tmp_path / "n.json"), "--num-images", "16", "--eval-images", "4", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "SYNTHETIC DEMO" in out and "planted neurons recovered: 4 of 4" in out
    assert "largest / median patch norm" in out and "CLS attention on its top patch" in out
    row = next(line for line in out.splitlines() if "worst image" in line)
    before, after = (float(cell.rstrip("x")) for cell in row.split()[-2:])
    assert before >= 10 and after <= 2


def test_an_existing_neuron_file_can_be_applied(demo_run, capsys):
    folder, _ = demo_run
    code = main(["--neurons", str(folder / "neurons.json"), "--num-images", "8", "--eval-images", "4", "--quiet",
                 "--num-registers", "2", "--legacy"])
    out = capsys.readouterr().out
    assert code == 0 and "loaded 4 register neurons" in out and "2 test-time registers" in out


def _folder_with(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for file_name, content in files.items():
        (folder / file_name).write_bytes(content)
    return folder


@pytest.mark.parametrize("make_args, names", [
    (lambda t: ["--threshold", "-3"], "argument --threshold: expected a positive number or 'auto', got '-3'"),
    (lambda t: ["--threshold", "abc"], "argument --threshold: expected a positive number or 'auto', got 'abc'"),
    (lambda t: ["--top-k", "0"], "argument --top-k: expected a positive integer, got '0'"),
    (lambda t: ["--batch-size", "two"], "argument --batch-size: expected a positive integer, got 'two'"),
    (lambda t: ["--num-images", "-5"], "argument --num-images: expected a positive integer, got '-5'"),
    (lambda t: ["--highest-layer", "soon"], "argument --highest-layer: expected a non-negative integer, got 'soon'"),
    (lambda t: ["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
    (lambda t: ["--images", str(t / "missing")], "image folder not found: "),
    (lambda t: ["--images", str(_folder_with(t, "empty", {}))], "image folder is empty: "),
    (lambda t: ["--images", str(_folder_with(t, "junk", {"a.txt": b"text", "b.png": b"broken"}))],
     "no readable image among the 2 file(s) in "),
    (lambda t: ["--model", "bogus"], "unknown model spec prefix 'bogus'"),
    (lambda t: ["--model", "openclip:ViT-Nope", "--images", str(_folder_with(t, "imgs", {"a.txt": b""}))],
     "unknown open_clip model 'ViT-Nope'"),
    (lambda t: ["--model", "openclip:ViT-B-16"], "openclip:ViT-B-16 names no weights"),
    (lambda t: ["--detect-layer", "99"], "--detect-layer must be an int in 0..7, got 99"),
    (lambda t: ["--detect-layer", "2", "--highest-layer", "5"], "--highest-layer (5) cannot be after --detect-layer (2)"),
    (lambda t: ["--device", "not-a-device"], "--device: unknown device 'not-a-device'"),
    (lambda t: ["--out", str(t)], "is a folder; give a file name"),
    (lambda t: ["--log", str(_folder_with(t, "logs", {"file.txt": b"x"}) / "file.txt" / "log.h5")],
     "cannot write there"),
    (lambda t: ["--figure", str(_folder_with(t, "figs", {"file.txt": b"x"}) / "file.txt" / "figure.png")],
     "cannot write there"),
    (lambda t: ["--device", "meta"], "--device meta: models cannot run on a meta device"),
    (lambda t: ["--neurons", str(t / "missing.json")], "neuron file not found: "),
    (lambda t: ["--neurons", str(RegisterNeurons.coerce([(3, 5000)]).save(t / "misfit.json"))],
     "register neuron (3, 5000) is out of range: layer 3 of demo has neurons 0..767"),
])
def test_usage_errors_give_one_line_naming_the_problem_and_exit_code_2(tmp_path, capsys, make_args, names):
    out_file = tmp_path / "out" / "neurons.json"
    args = make_args(tmp_path)
    code = main(["--quiet", "--out", str(out_file), *args] if "--out" not in args and "--neurons" not in args
                else ["--quiet", *args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert names in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert not out_file.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    assert main(["--device", "cuda", "--quiet"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_the_script_itself_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--threshold", "nope"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: argument --threshold: expected a positive number or "
                                                  "'auto', got 'nope'"]
    assert list(tmp_path.iterdir()) == []
