"""Exporting a model with its test-time registers baked in (``export_image_model``, ``test-time-registers-export``).

Every exported file is run here once more, by a runner of this test's own, in a fresh Python
process that must not import test_time_registers, at a batch size that neither the export's
example nor its own check used, and compared with ``ModifiedModel`` run in this process. The
demo goes to ONNX and to .pt2, a tiny timm DeiT-III to .pt2 and a tiny transformers DINOv2 (two
outputs) to ONNX; the demo exported without registers gives different outputs, so the registers
really are in the files. Refusals leave nothing behind: no file at the destination, no temporary
file beside it, and no hook on the model.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_time_registers import (ExportError, ExportMismatchError, InvalidArgumentError, ModifiedModel, PaperEdit,
                                 export_image_model)
from test_time_registers import export as export_module
from test_time_registers.data.scenes import demo_images
from test_time_registers.planting import marker_images, plant_register_neurons
from test_time_registers.registry import hook_manager_for, load_model
from test_time_registers.scripts import export as export_cli
from tests.tiny_models import IMAGE_SIZE, dinov2_model, hook_count, timm_model

PLANTED_LAYER = 1
#: The batch size the independent check runs at: not the example's (2) nor the export's own check's (1 and 3).
FRESH_BATCH = 5

#: Runs exported files in a fresh process: argv = jobs JSON, results file. Imports torch and onnxruntime only.
RUNNER = textwrap.dedent("""
    import json, sys
    import torch
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for key, (fmt, path, inputs) in jobs.items():
        pixels = torch.load(inputs)
        if fmt == "onnx":
            import onnxruntime
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            outputs = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
            results[key] = {"names": [output.name for output in session.get_outputs()],
                            "inputs": [(i.name, list(i.shape)) for i in session.get_inputs()],
                            "outputs": [torch.from_numpy(array) for array in outputs]}
        else:
            with torch.no_grad():
                outputs = torch.export.load(path).module()(pixels)
            results[key] = {"names": None, "inputs": None, "outputs": list(outputs)}
    imported = [name for name in sys.modules if name.split(".")[0] == "test_time_registers"]
    assert not imported, imported
    torch.save(results, sys.argv[2])
""")


def run_fresh(folder, jobs: dict[str, tuple[str, object, torch.Tensor]]) -> dict:
    """``{key: (format, file, pixels)}`` -> ``{key: {"names", "inputs", "outputs"}}``, from one fresh process."""
    listing = {}
    for key, (fmt, path, pixels) in jobs.items():
        inputs = folder / f"{key}.inputs.pt"
        torch.save(pixels, inputs)
        listing[key] = (fmt, str(path), str(inputs))
    (folder / "jobs.json").write_text(json.dumps(listing))
    finished = subprocess.run([sys.executable, "-c", RUNNER, str(folder / "jobs.json"), str(folder / "results.pt")],
                              cwd=folder, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    return torch.load(folder / "results.pt")


def tensors(output) -> list[torch.Tensor]:
    return [tensor for _, tensor in export_module.flat_outputs(output)]


def largest_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    assert len(first) == len(second)
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(first, second))


def leftovers(folder) -> list[str]:
    """Whatever an export left in ``folder`` (it must leave only its file, or nothing)."""
    return sorted(path.name for path in folder.iterdir())


def planted(build):
    model = build().eval()
    hook_manager = hook_manager_for(model)
    patch = hook_manager.patch_size[0]
    neurons = plant_register_neurons(hook_manager, marker_images(24, IMAGE_SIZE, patch, seed=0), PLANTED_LAYER, 3)
    return model, hook_manager, neurons, marker_images(8, IMAGE_SIZE, patch, seed=3).pixel_values


# ---- the exports, shared by the module ------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    loaded = load_model("demo")
    pixels = torch.stack([loaded.preprocess(image) for image in demo_images(FRESH_BATCH + 3, seed=1)])
    return loaded, pixels


@pytest.fixture(scope="module")
def exports(demo, tmp_path_factory):
    """``{key: (modified, report)}``: the demo (onnx, pt2), timm (pt2), DINOv2 (onnx, and onnx without registers)."""
    folder = tmp_path_factory.mktemp("exports")
    loaded, pixels = demo
    model, _, hook_manager = loaded
    made = {}
    modified = ModifiedModel(model, hook_manager, loaded.planted, num_registers=1)
    for key, fmt in (("demo_onnx", "onnx"), ("demo_pt2", "pt2")):
        made[key] = modified, export_image_model(modified, folder / f"{key}.{fmt}", example=pixels[:2],
                                                 check_images=pixels[2:5])
    for key, build, fmt in (("timm_pt2", lambda: timm_model(num_classes=0), "pt2"), ("dinov2_onnx", dinov2_model, "onnx")):
        model, hook_manager, neurons, images = planted(build)
        modified = ModifiedModel(model, hook_manager, neurons, num_registers=1)
        made[key] = modified, export_image_model(modified, folder / f"{key}.{fmt}", format=fmt, example=images[:2],
                                                 check_images=images[2:5])
    plain = ModifiedModel(model, hook_manager, [], num_registers=0)   # the same DINOv2 as it was
    made["plain_onnx"] = plain, export_image_model(plain, folder / "plain.onnx", example=images[:2],
                                                   check_images=images[2:5])
    return made


@pytest.fixture(scope="module")
def fresh(exports, demo, tmp_path_factory):
    """Each file's outputs on FRESH_BATCH images, from this test's own fresh process; and those images."""
    _, demo_pixels = demo
    tiny_pixels = marker_images(FRESH_BATCH, IMAGE_SIZE, 8, seed=11).pixel_values
    images = {key: (demo_pixels[-FRESH_BATCH:] if key.startswith("demo") else tiny_pixels) for key in exports}
    results = run_fresh(tmp_path_factory.mktemp("fresh"),
                        {key: (report.format, report.path, images[key]) for key, (_, report) in exports.items()})
    return results, images


# ---- what the files are -------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["demo_onnx", "demo_pt2", "timm_pt2", "dinov2_onnx"])
def test_the_file_matches_the_modified_model_in_a_fresh_process_at_another_batch_size(key, exports, fresh):
    modified, report = exports[key]
    results, images = fresh
    with torch.no_grad():
        expected = tensors(modified.forward_images(images[key]))
    got = results[key]["outputs"]
    assert [tuple(tensor.shape) for tensor in got] == [tuple(tensor.shape) for tensor in expected]
    assert got[0].shape[0] == FRESH_BATCH
    assert largest_difference(got, expected) <= report.tolerance
    # the export's own check, and what it says
    assert report.max_difference <= report.tolerance and report.checked_batch_sizes == (1, 3)
    assert report.relative_tolerance == 1e-4 and report.tolerance == pytest.approx(1e-4 * report.output_scale)
    assert report.path.is_file() and report.path.stat().st_size == report.file_bytes
    assert leftovers(report.path.parent) == sorted(other.path.name for _, other in exports.values())
    assert report.input.name == "pixel_values" and report.input.shape[0] == "batch"
    assert all(output.shape[0] == "batch" for output in report.outputs)
    assert hook_count(modified.model) == 0


def test_onnx_files_record_the_input_and_output_names_with_a_dynamic_batch(exports, fresh):
    results, _ = fresh
    _, report = exports["dinov2_onnx"]
    assert [output.name for output in report.outputs] == ["last_hidden_state", "pooler_output"]
    assert results["dinov2_onnx"]["names"] == ["last_hidden_state", "pooler_output"]
    assert results["dinov2_onnx"]["inputs"] == [("pixel_values", ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])]
    assert [str(output) for output in exports["demo_onnx"][1].outputs] == ["output [batch, 128] float32"]
    assert "torch.onnx dynamo exporter" in exports["demo_onnx"][1].exporter   # onnxscript comes with .[dev]
    assert exports["demo_pt2"][1].exporter == "torch.export (non-strict)"


def test_the_registers_are_baked_in(exports, fresh):
    results, images = fresh
    (modified, with_registers), (_, plain) = exports["dinov2_onnx"], exports["plain_onnx"]
    registers, without = results["dinov2_onnx"]["outputs"], results["plain_onnx"]["outputs"]
    assert largest_difference(registers, without) > 20 * max(with_registers.tolerance, plain.tolerance)
    with torch.no_grad():   # the file without registers is the unmodified model
        unmodified = tensors(modified.base_hook_manager.forward_images(images["plain_onnx"]))
    assert largest_difference(without, unmodified) <= plain.tolerance


def test_exporting_leaves_the_modified_model_working(exports, demo):
    loaded, pixels = demo
    modified, report = exports["demo_pt2"]
    with torch.no_grad():
        edited = tensors(modified.forward_images(pixels[:3]))
        unmodified = tensors(loaded.hook_manager.forward_images(pixels[:3]))
    assert largest_difference(edited, unmodified) > 20 * report.tolerance
    assert not loaded.model.training and hook_count(loaded.model) == 0   # its mode is as it was


def test_report_lines_say_what_was_exported(exports):
    lines = exports["dinov2_onnx"][1].lines()
    assert lines[0].startswith("exported ") and "1 test-time register and 3 register neurons as onnx" in lines[0]
    assert lines[1] == f"  input   pixel_values [batch, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] float32"
    assert lines[2].startswith("  output  last_hidden_state [batch, ")
    assert any(line.startswith("max difference ") and " vs tolerance " in line for line in lines)
    assert re.fullmatch(r"wrote .*dinov2_onnx\.onnx \(\d+(\.\d)? [KM]B\)", lines[-1])


def test_the_torchscript_onnx_exporter_where_onnxscript_is_missing(tmp_path):   # the dynamo one is the default
    model, hook_manager, neurons, images = planted(dinov2_model)
    modified = ModifiedModel(model, hook_manager, neurons, num_registers=1)
    report = export_image_model(modified, tmp_path / "d.onnx", example=images[:2], onnx_exporter="torchscript")
    assert "TorchScript" in report.exporter and report.max_difference <= report.tolerance
    assert report.input.shape[0] == "batch" and report.outputs[0].name == "last_hidden_state"


# ---- refusals -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return planted(lambda: timm_model(num_classes=0))


def data_dependent_edit(activations, neurons, layout, context):
    if activations.amax() > 1e6:   # a branch on the values: torch.export cannot capture it
        return activations
    return PaperEdit()(activations, neurons, layout, context)


data_dependent_edit.graph_safe = True


@pytest.mark.parametrize("edit,message", [
    (PaperEdit(normal_values="noise"), "is not graph_safe"),
    (lambda activations, neurons, layout, context: activations, "is not graph_safe"),
], ids=["noise", "callable"])
def test_edits_that_are_not_graph_safe_are_refused(tiny, tmp_path, edit, message):
    model, hook_manager, neurons, images = tiny
    modified = ModifiedModel(model, hook_manager, neurons, edit=edit)
    with pytest.raises(ExportError, match=message):
        export_image_model(modified, tmp_path / "m.pt2", example=images[:2])
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("out,fmt,message", [
    ("m.pt2", "onnx", "an onnx export is written to a [*].onnx file, not 'm.pt2': name it m.onnx"),
    ("m.onnx", "pt2", "name it m.pt2"),
    ("m.bin", None, "cannot tell the format from 'm.bin'"),
    ("m.onnx", "tflite", "format must be one of onnx, pt2"),
    ("missing/m.onnx", None, "does not exist"),
])
def test_a_file_name_that_disagrees_with_the_format_is_refused(tiny, tmp_path, out, fmt, message):
    model, hook_manager, neurons, images = tiny
    with pytest.raises(InvalidArgumentError, match=message):
        export_image_model(ModifiedModel(model, hook_manager, neurons), tmp_path / out, format=fmt, example=images[:2])
    assert leftovers(tmp_path) == []


def test_onnx_refuses_a_model_that_is_not_float32(tmp_path):
    model = timm_model(num_classes=0).to(torch.bfloat16)
    hook_manager = hook_manager_for(model)
    with pytest.raises(ExportError, match="ONNX export needs a float32 model, but this one has bfloat16 weights"):
        export_image_model(ModifiedModel(model, hook_manager, []), tmp_path / "m.onnx",
                           example=torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert leftovers(tmp_path) == []


def test_onnx_refuses_a_model_run_under_autocast(tiny, tmp_path):
    model, _, neurons, images = tiny
    hook_manager = hook_manager_for(model, autocast_dtype=torch.bfloat16)
    with pytest.raises(ExportError, match="runs under torch.autocast in bfloat16; load it in fp32, or export to pt2"):
        export_image_model(ModifiedModel(model, hook_manager, neurons), tmp_path / "m.onnx", example=images[:2])
    assert leftovers(tmp_path) == []


def test_a_forward_torch_export_cannot_capture_is_refused_in_one_line(tiny, tmp_path):
    model, hook_manager, neurons, images = tiny
    modified = ModifiedModel(model, hook_manager, neurons, edit=data_dependent_edit)
    with pytest.raises(ExportError, match=r"^torch.export cannot capture .+ \(VisionTransformer\) with test-time "
                                          r"registers: ") as raised:
        export_image_model(modified, tmp_path / "m.pt2", example=images[:2])
    assert "\n" not in str(raised.value) and raised.value.__cause__ is not None
    assert leftovers(tmp_path) == [] and hook_count(model) == 0


def test_a_file_that_does_not_match_is_not_written_and_an_old_one_stays(tiny, tmp_path):
    model, hook_manager, neurons, images = tiny
    modified = ModifiedModel(model, hook_manager, neurons)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    with pytest.raises(ExportMismatchError, match=r"max difference \S+ > tolerance 0 \(output at batch size \d\); "
                                                  r"nothing was written to"):
        export_image_model(modified, out, example=images[:2], tolerance=0)
    assert out.read_bytes() == b"the previous export" and leftovers(tmp_path) == ["m.onnx"]


def test_a_tampered_check_is_caught(tiny, tmp_path, monkeypatch):
    model, hook_manager, neurons, images = tiny

    def tampered(artifact, format, batches, device, work):   # the file's outputs, one value changed
        program = torch.export.load(artifact).module()
        with torch.no_grad():
            results = [list(program(batch)) for batch in batches]
        results[-1][0][-1, 0] += 1.0
        return results, "a tampered check"

    monkeypatch.setattr(export_module, "_run_fresh", tampered)
    with pytest.raises(ExportMismatchError, match=r"max difference 1 > tolerance .* \(output at batch size 3\)"):
        export_image_model(ModifiedModel(model, hook_manager, neurons), tmp_path / "m.pt2", example=images[:2],
                           check_images=images[2:5])
    assert leftovers(tmp_path) == []


# ---- the command line -------------------------------------------------------------------------------

def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--format", "onnx", "--out", "m.pt2"], "--out m.pt2 does not end in .onnx, but --format is onnx: name it m.onnx"),
    (["--out", "m.bin"], "--out m.bin: name the file *.onnx or *.pt2, or give --format"),
    (["--out", "m.onnx", "--force"], "--force only applies to --neurons"),
    (["--out", "m.onnx", "--replace", "noise"], "--replace noise draws random values"),
    (["--out", "m.onnx", "--precision", "bf16"], "--format onnx exports float32 models only, not --precision bf16"),
    (["--out", "m.onnx", "--tolerance", "-1"], "--tolerance: expected a non-negative number"),
    (["--format", "tflite", "--out", "m.onnx"], "invalid choice: 'tflite'"),
    ([], "the following arguments are required: --out"),
], ids=["suffix", "no-format", "force", "noise", "precision", "tolerance", "format", "no-out"])
def test_bad_flags_are_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert export_cli.main(flags) == 2
    assert message in error_line(capsys)
    assert leftovers(tmp_path) == []


def test_an_unreadable_neuron_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    neurons = tmp_path / "neurons.json"
    neurons.write_text("{not json")
    assert export_cli.main(["--neurons", str(neurons), "--out", str(tmp_path / "m.onnx")]) == 2
    assert str(neurons) in error_line(capsys)
    assert leftovers(tmp_path) == ["neurons.json"]


def test_the_command_exports_the_demo_to_onnx(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = Path("new") / "demo.onnx"   # relative, in a folder the command makes
    assert export_cli.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC DEMO" in printed and "register neurons: the demo's 4 planted ones" in printed
    assert "  input   pixel_values [batch, 3, 224, 224] float32" in printed
    assert "  output  output [batch, 128] float32" in printed
    tolerance = next(line for line in printed.splitlines() if line.startswith("max difference "))
    words = tolerance.split()
    difference, allowed = float(words[2]), float(words[5])
    assert 0 <= difference <= allowed and "(the default, 0.0001 x output scale" in tolerance
    assert f"wrote {out} (" in printed and out.is_file() and leftovers(out.parent) == ["demo.onnx"]
