"""The training command (test-time-registers-train): from scratch, by distillation, under torchrun, and its errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_time_registers import load_trained_registers
from test_time_registers.data.labelled import scene_images
from test_time_registers.scripts import train_registers
from test_time_registers.training.train import parameter_digest
from tests.tiny_models import IMAGE_SIZE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = "image_size=32,patch_size=8,dim=32,depth=2,heads=2,mlp_dim=64"


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_the_command_line_writes_the_registers_and_their_metadata(tmp_path, capsys):
    out = tmp_path / "run"
    code = train_registers.main(["--from-scratch", "--model", "timm:vit_small_patch16_224", "--vit", TINY_VIT,
                                 "--num-images", "32", "--epochs", "2", "--batch-size", "16", "--num-registers", "2",
                                 "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "epoch 1/2: loss" in printed and "epoch 2/2: loss" in printed and f"wrote {out}" in printed
    metadata = json.loads((out / "registers.json").read_text())
    assert metadata["from_scratch"]["kwargs"]["reg_tokens"] == 2 and metadata["options"]["epochs"] == 2
    assert len(metadata["history"]["epoch_losses"]) == 2 and "model.reg_token" in metadata["parameters"]
    assert load_trained_registers(out).hook_manager.layout.num_trained_registers == 2


@pytest.fixture(scope="module")
def distilled_clip(tmp_path_factory, registered_config):
    """Registers fine-tuned on a tiny random open_clip model by the command line, by distillation."""
    out = tmp_path_factory.mktemp("clip")
    code = train_registers.main(["--model", f"openclip:{registered_config}:random", "--objective", "distill",
                                 "--freeze-layers", "1", "--l2-weight", "0.01", "--num-images", "8", "--batch-size",
                                 "4", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_the_command_line_fine_tunes_an_openclip_model_by_distillation(distilled_clip):
    out = distilled_clip
    metadata = json.loads((out / "registers.json").read_text())
    assert metadata["base_model"].endswith(":random") and metadata["options"]["objective"] == "distill"
    assert not any(".transformer.resblocks.0." in name for name in metadata["parameters"])
    restored = load_trained_registers(out)
    assert restored.hook_manager.layout.num_trained_registers == 4
    assert restored.hook_manager.forward_methods == ("encode_image",)
    with torch.no_grad():
        assert restored.model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 32)


def test_evaluate_compares_the_fine_tuned_registers_in_its_third_column(tmp_path, distilled_clip, registered_config,
                                                                        capsys):
    from test_time_registers import RegisterNeurons
    from test_time_registers.scripts import evaluate

    spec = f"openclip:{registered_config}:random"
    neurons = tmp_path / "neurons.json"
    RegisterNeurons.coerce([(0, 3), (1, 5)]).save(neurons)
    images = tmp_path / "images"   # no classes: the tiny text tower's vocabulary is too small for zero-shot prompts
    images.mkdir()
    scenes = scene_images(8, size=IMAGE_SIZE, seed=3)
    for index in range(len(scenes)):
        scenes.image(index).save(images / f"{index}.png")
    code = evaluate.main(["--model", spec, "--neurons", str(neurons), "--images", str(images), "--trained-model",
                          f"registers:{distilled_clip}", "--json", str(tmp_path / "table.json"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["columns"] == ["original", "with 1 test-time register", "trained registers"]
    assert all(len(row["values"]) == 3 and row["values"][2] is not None for row in table["rows"][:2])


@pytest.fixture
def empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


@pytest.fixture
def flat_folder(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    scenes = scene_images(2, size=32)
    for index in range(len(scenes)):
        scenes.image(index).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--images", "{empty}"], "image folder is empty"),
    (["--images", "{flat}", "--from-scratch", "--vit", TINY_VIT], "needs images of at least 2 classes"),
    (["--cifar10", "{tmp}/nowhere"], "no CIFAR-10 in .*cifar-10-batches-py"),
    (["--from-scratch", "--model", "demo"], "--from-scratch builds a timm VisionTransformer"),
    (["--from-scratch", "--freeze-layers", "2"], "--freeze-layers would mean nothing"),
    (["--vit", "dim=32"], "--vit sets the architecture .* add --from-scratch"),
    (["--from-scratch", "--vit", "depth=two"], "depth needs a number"),
    (["--from-scratch", "--vit", "width=3"], "KEY one of image_size"),
    (["--precision", "bf16"], r"invalid choice: 'bf16' \(choose from 'fp32', 'amp_bf16'\)"),
    (["--from-scratch", "--vit", TINY_VIT, "--num-images", "8", "--insert-at", "5"], "--insert-at must be an int in 0..1"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, empty_folder, flat_folder, capsys, flags, message):
    flags = [flag.format(empty=empty_folder, flat=flat_folder, tmp=tmp_path) for flag in flags]
    assert train_registers.main([*flags, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert re.search(message, error_line(capsys))
    assert not (tmp_path / "out" / "registers.safetensors").exists()


def test_freezing_more_blocks_than_the_model_has_is_one_line(tmp_path, capsys, registered_config):
    code = train_registers.main(["--model", f"openclip:{registered_config}:random", "--objective", "distill",
                                 "--freeze-layers", "9", "--num-images", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "--freeze-layers 9 but the model has 3 blocks" in error_line(capsys)


def test_torchrun_two_ranks_agree_and_rank_0_saves(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = Path(train_registers.__file__)
    run = subprocess.run([*torchrun, str(script), "--from-scratch", "--vit", TINY_VIT, "--num-images", "32",
                          "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "out"), "--quiet"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    digests = re.findall(r"rank \d: trained parameters sha256 ([0-9a-f]{64})", run.stdout)   # lines may interleave
    assert len(digests) == 2 and digests[0] == digests[1], run.stdout + run.stderr
    assert run.stdout.count("wrote ") == 2   # the weights and the metadata, once
    metadata = json.loads((tmp_path / "out" / "registers.json").read_text())
    assert metadata["world_size"] == 2 and len(metadata["history"]["epoch_losses"]) == 2
    restored = load_trained_registers(tmp_path / "out")
    names = metadata["parameters"]
    assert parameter_digest(restored.model, names) == digests[0]
