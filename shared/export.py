"""Export a model with its test-time registers baked in: a ``.pt2`` program or an ONNX graph, checked before it is kept.

:func:`export_image_model` captures ``modified.forward_images`` (pixels [B, 3, H, W] in, what the
image method returns out, as a flat tuple of tensors) with a dynamic batch dimension. The
register tokens, the edits of the register neurons and their removal become ordinary operations
of the graph: the file runs without this library, its hooks or its Python code.

Before a file is kept it is run **in a fresh Python process that does not import this library**
(ONNX Runtime for ``.onnx``, ``torch.export.load(...).module()`` for ``.pt2``) on the check
images, at two batch sizes, and its outputs are compared with ``modified.forward_images`` here.
Only a file that matches within the tolerance is moved into place (an atomic rename); nothing
else is left behind.

How each format is captured (torch 2.14):

* ``pt2``: non-strict ``torch.export.export``. Strict export (Dynamo, full graph) refuses the
  ``torch.compiler.disable``-d calls that place the hooks. The intervention is opened around the
  export, so the hooks are on the model before tracing starts and the traced call only nests in
  it: non-strict export puts back every module attribute it saw change while tracing, which
  would leave an intervention opened inside the trace marked as still open.
* ``onnx``: with ``onnxscript`` installed, the dynamo-based exporter converts that same exported
  program; without it, the TorchScript exporter traces the model. That exporter loses an indexed
  assignment whose value tensor was itself changed in place by an earlier indexed assignment
  (the edits write the maxima onto the registers that way), so while it traces, the value of
  every indexed assignment is a fresh copy.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import (ExportError, ExportMismatchError, InvalidArgumentError, InvalidArgumentTypeError,
                     MissingDependencyError, TestTimeRegistersError, first_line)
from .edits import NORMAL_VALUES, RANDOM_NORMAL_VALUES
from .intervention import ModifiedModel

Format = Literal["onnx", "pt2"]
OnnxExporter = Literal["auto", "dynamo", "torchscript"]

#: The normal values an exported graph reproduces: all but the random ones.
REPRODUCIBLE_NORMAL_VALUES = tuple(value for value in NORMAL_VALUES if value not in RANDOM_NORMAL_VALUES)
#: Each format and the suffix its file must have.
FORMATS: dict[str, str] = {"onnx": ".onnx", "pt2": ".pt2"}
#: The name of the exported model's input, and of its dynamic dimension.
INPUT_NAME = "pixel_values"
BATCH = "batch"
#: The default tolerance, relative to the largest absolute value among the outputs, by the least
#: precise floating dtype the model computes in. ONNX Runtime gives about 3e-7 of that in float32.
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2,
                                                torch.bfloat16: 5e-2}
#: The opset the TorchScript and the dynamo-based ONNX exporters write.
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18


@dataclass(frozen=True)
class ExportedTensor:
    """One input or output of an exported model: its name, its shape (``"batch"`` first) and its dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.name} [{', '.join(map(str, self.shape))}] {self.dtype}"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_image_model` wrote, and how well the file, run on its own, matched the model.

    ``max_difference`` is the largest absolute difference between the file's outputs and
    ``modified.forward_images``, over every output and every checked batch size; the file was kept
    because it is at most ``tolerance``.
    """

    path: Path
    format: str
    exporter: str                          # what captured the graph, e.g. "torch.export (non-strict)"
    model: str                             # the hook manager's name of the model
    num_registers: int
    num_neurons: int
    input: ExportedTensor
    outputs: tuple[ExportedTensor, ...]
    checked_batch_sizes: tuple[int, ...]
    checked_with: str                      # what ran the file in the fresh process
    max_difference: float
    tolerance: float
    relative_tolerance: float | None       # the factor of the default tolerance; None when one was given
    output_scale: float                    # the largest absolute value among the outputs
    file_bytes: int
    export_seconds: float
    check_seconds: float

    def lines(self) -> list[str]:
        """The report as lines of text, as the command line prints it."""
        registers = f"{self.num_registers} test-time register" + ("s" if self.num_registers != 1 else "")
        how = ("the default, " if self.relative_tolerance is not None else "")
        scale = (f"{self.relative_tolerance:g} x output scale {self.output_scale:.4g}"
                 if self.relative_tolerance is not None else "given")
        sizes = " and ".join(map(str, self.checked_batch_sizes))
        return [f"exported {self.model} with {registers} and {self.num_neurons} register neurons as {self.format} "
                f"({self.exporter}) in {self.export_seconds:.1f} s",
                f"  input   {self.input}",
                *(f"  output  {output}" for output in self.outputs),
                f"check: {self.checked_with} in a fresh process without test_time_registers, batch sizes {sizes}, "
                f"{self.check_seconds:.1f} s",
                f"max difference {self.max_difference:.3g} vs tolerance {self.tolerance:.3g} ({how}{scale})",
                f"wrote {self.path} ({_size(self.file_bytes)})"]


def export_image_model(modified: ModifiedModel, out: str | os.PathLike, *, format: Format | None = None,
                       example: torch.Tensor, check_images: torch.Tensor | None = None,
                       tolerance: float | None = None, onnx_exporter: OnnxExporter = "auto") -> ExportReport:
    """Export ``modified.forward_images`` with its test-time registers baked in, and keep the file only if it matches.

    The exported model takes ``pixel_values`` [batch, 3, H, W] (H and W those of ``example``, the
    batch dynamic) and returns a flat tuple of tensors: what the image method returns (one
    tensor, or the tensors of a ``ModelOutput`` or tuple, in order, e.g. ``last_hidden_state``
    and ``pooler_output``), under the names recorded in the ONNX graph and in the report.

    Args:
        modified: the model with its registers; its edit must be ``graph_safe``.
        out: the file to write, ending in ``.onnx`` or ``.pt2``; its folder must exist. An
            existing file is replaced only by a file that passed the check.
        format: ``"onnx"`` or ``"pt2"``; by default the suffix of ``out`` says.
        example: preprocessed images [B, 3, H, W] to trace with (a batch of 1 is repeated to 2, so that
            the batch stays dynamic).
        check_images: preprocessed images [N, 3, H, W] to compare on, at batch sizes 1 and N (by
            default ``example``).
        tolerance: the largest absolute difference allowed; by default
            :data:`RELATIVE_TOLERANCE` of the least precise dtype the model computes in, times the
            largest absolute value among the outputs.
        onnx_exporter: ``"dynamo"`` (needs ``onnxscript``), ``"torchscript"``, or ``"auto"``:
            dynamo where ``onnxscript`` is installed.

    Returns:
        :class:`ExportReport`: the names and shapes, the difference and the tolerance, the file's size.

    Raises:
        InvalidArgumentError: a suffix that disagrees with ``format``, a missing folder, images that
            are not [B, 3, H, W], or a negative tolerance.
        ExportError: an edit that is not ``graph_safe``, a forward the exporter cannot capture, a
            precision the format cannot reproduce (ONNX is float32 only), or a file that cannot be run.
        ExportMismatchError: the file runs but does not match within the tolerance.
        MissingDependencyError: ``onnxruntime`` (to check an ONNX file) or ``onnxscript`` (the dynamo
            exporter, when asked for) is not installed.
    """
    if not isinstance(modified, ModifiedModel):
        raise InvalidArgumentTypeError(f"modified must be a ModifiedModel, got {type(modified).__name__}")
    out = Path(out)
    format = _check_format(format, out)
    exporter = _onnx_exporter(onnx_exporter) if format == "onnx" else "torch.export"
    hook_manager = modified.hook_manager
    name = f"{hook_manager.name} ({type(hook_manager.image_model).__name__})"
    _check_edit(modified)
    _check_precision(modified, format)
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not math.isfinite(tolerance) or tolerance < 0):
        raise InvalidArgumentError(f"tolerance must be a finite number of at least 0, got {tolerance!r}")
    example = _pixels("example", example, hook_manager)
    check_images = example if check_images is None else _pixels("check_images", check_images, hook_manager)
    if check_images.shape[1:] != example.shape[1:]:
        raise InvalidArgumentError(f"check_images are {_shape(check_images)} images but example is "
                                   f"{_shape(example)}: the export fixes the image size, so give both the same")
    if len(example) == 1:
        example = torch.cat([example, example])
    if len(check_images) == 1:
        check_images = torch.cat([check_images, check_images])
    sizes = (1, len(check_images))

    with _eval_mode(modified):
        references = [_reference(modified, check_images[:size], name) for size in sizes]
        names = [output_name for output_name, _ in references[0]]
        scale = max((float(tensor.detach().abs().max()) for _, tensor in references[0] if tensor.numel()), default=0.0)
        relative = None
        if tolerance is None:
            relative = RELATIVE_TOLERANCE.get(_loosest_dtype(modified, references[0]), RELATIVE_TOLERANCE[torch.float32])
            tolerance = relative * scale
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent)).resolve()
        try:
            artifact = work / f"model{FORMATS[format]}"
            started = time.perf_counter()
            how = _export(modified, artifact, format, exporter, example, names, name)
            exported = time.perf_counter() - started
            started = time.perf_counter()
            results, checked_with = _run_fresh(artifact, format, [check_images[:size] for size in sizes],
                                               hook_manager.device, work)
            difference = _compare(references, results, sizes, tolerance, format, out, name)
            checked = time.perf_counter() - started
            file_bytes = artifact.stat().st_size
            os.replace(artifact, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    batch_shape = lambda tensor: (BATCH, *tensor.shape[1:])  # noqa: E731
    return ExportReport(
        path=out, format=format, exporter=how, model=hook_manager.name, num_registers=modified.num_registers,
        num_neurons=len(modified.neurons),
        input=ExportedTensor(INPUT_NAME, batch_shape(example), _dtype_name(example.dtype)),
        outputs=tuple(ExportedTensor(output_name, batch_shape(tensor), _dtype_name(tensor.dtype))
                      for output_name, tensor in references[-1]),
        checked_batch_sizes=sizes, checked_with=checked_with, max_difference=difference, tolerance=float(tolerance),
        relative_tolerance=relative, output_scale=scale, file_bytes=file_bytes, export_seconds=exported,
        check_seconds=checked)


# ---- checks before any work --------------------------------------------------------------------

def format_of(path: str | os.PathLike) -> str | None:
    """The format a file's suffix names (``"onnx"`` for ``*.onnx``, ``"pt2"`` for ``*.pt2``), or None."""
    suffix = Path(path).suffix.lower()
    return next((format for format, expected in FORMATS.items() if suffix == expected), None)


def _check_format(format: str | None, out: Path) -> str:
    suffix = out.suffix.lower()
    if format is None:
        format = format_of(out)
        if format is None:
            raise InvalidArgumentError(f"cannot tell the format from {out.name!r}: name the file *.onnx or *.pt2, "
                                       "or give format='onnx' or 'pt2'")
    if format not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if suffix != FORMATS[format]:
        article = "an" if format == "onnx" else "a"
        raise InvalidArgumentError(f"{article} {format} export is written to a *{FORMATS[format]} file, not {out.name!r}: "
                                   f"name it {out.stem}{FORMATS[format]}")
    if out.is_dir():
        raise InvalidArgumentError(f"{out} is a folder; give a file name")
    if not out.parent.is_dir():
        raise InvalidArgumentError(f"the folder of {out} does not exist")
    return format


def _onnx_exporter(choice: str) -> str:
    installed = importlib.util.find_spec("onnxscript") is not None
    if choice not in ("auto", "dynamo", "torchscript"):
        raise InvalidArgumentError(f"onnx_exporter must be 'auto', 'dynamo' or 'torchscript', got {choice!r}")
    if choice == "dynamo" and not installed:
        raise MissingDependencyError("the dynamo-based ONNX exporter needs onnxscript: pip install onnxscript, or use "
                                     "onnx_exporter='torchscript'")
    if importlib.util.find_spec("onnxruntime") is None:
        raise MissingDependencyError("checking an ONNX export needs onnxruntime: pip install onnxruntime")
    return "dynamo" if choice == "dynamo" or (choice == "auto" and installed) else "torchscript"


def _check_edit(modified: ModifiedModel) -> None:
    edit = modified.edit
    if not (len(modified.neurons) or hasattr(edit, "edit_attention_input")):
        return   # the edit never runs
    if not getattr(edit, "graph_safe", False):
        raise ExportError(f"the edit {edit!r} is not graph_safe, so an export could not reproduce it (random normal "
                          "values, or a callable that does not declare graph_safe = True); export with PaperEdit() "
                          f"or LegacyEdit() and normal values {', '.join(REPRODUCIBLE_NORMAL_VALUES[:-1])} or "
                          f"{REPRODUCIBLE_NORMAL_VALUES[-1]}")


def _check_precision(modified: ModifiedModel, format: str) -> None:
    if format != "onnx":
        return   # a .pt2 program keeps every dtype and autocast region; the check confirms it
    hook_manager = modified.hook_manager
    if hook_manager.autocast_dtype is not None:
        raise ExportError(f"ONNX export needs a float32 model run without autocast, but this one runs under "
                          f"torch.autocast in {_dtype_name(hook_manager.autocast_dtype)}; load it in fp32, or export "
                          "to pt2, which keeps autocast")
    others = sorted({_dtype_name(tensor.dtype) for tensor in (*modified.model.parameters(), *modified.model.buffers())
                     if tensor.is_floating_point() and tensor.dtype != torch.float32})
    if others:
        raise ExportError(f"ONNX export needs a float32 model, but this one has {' and '.join(others)} weights, which "
                          "ONNX Runtime cannot run on CPU; load it in fp32, or export to pt2, which keeps every dtype")


def _pixels(what: str, images, hook_manager) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InvalidArgumentTypeError(f"{what} must be a tensor of preprocessed images [B, 3, H, W], "
                                       f"got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or not len(images) or not images.is_floating_point():
        raise InvalidArgumentError(f"{what} must be floating-point preprocessed images [B, 3, H, W] with B >= 1, "
                                   f"got {images.dtype} {_shape(images)}")
    return images.detach().to(device=hook_manager.device, dtype=hook_manager.input_dtype)


# ---- running and capturing ---------------------------------------------------------------------

class ImageForward(nn.Module):
    """``modified.forward_images`` as a module: pixels [B, 3, H, W] -> a flat tuple of tensors."""

    def __init__(self, modified: ModifiedModel):
        super().__init__()
        # Only the image model is a submodule: an exported program keeps the weights of its module's submodules,
        # used or not (a CLIP's text tower). ModifiedModel's own buffers are captured as constants.
        self.image_model = modified.hook_manager.image_model
        self.__dict__["modified"] = modified

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor for _, tensor in flat_outputs(self.modified.forward_images(pixel_values)))


def flat_outputs(value, name: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors inside what an image method returns, in order, with names: ``output`` for a lone
    tensor, the keys of a ``ModelOutput`` or dict, ``output_0``, ``output_1``... in a tuple; None is skipped.

    Raises:
        ExportError: something in it is neither a tensor nor a container of tensors.
    """
    if isinstance(value, torch.Tensor):
        return [(name or "output", value)]
    if value is None:
        return []
    if isinstance(value, dict):
        items = [(f"{name}.{key}" if name else str(key), item) for key, item in value.items()]
    elif isinstance(value, (tuple, list)):
        keys = getattr(value, "_fields", None) or [str(index) for index in range(len(value))]
        items = [(f"{name}.{key}" if name else (key if hasattr(value, "_fields") else f"output_{key}"), item)
                 for key, item in zip(keys, value)]
    else:
        raise ExportError(f"the image method returns a {type(value).__name__} at {name or 'the top'}, which cannot "
                          "be an output of an exported model (only tensors, tuples and dicts of them)")
    return [pair for key, item in items for pair in flat_outputs(item, key)]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """The module in eval mode (no dropout in the graph), each submodule's mode restored after."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def _reference(modified: ModifiedModel, pixels: torch.Tensor, name: str) -> list[tuple[str, torch.Tensor]]:
    try:
        with torch.no_grad():
            outputs = flat_outputs(modified.forward_images(pixels))
    except TestTimeRegistersError:
        raise
    except Exception as error:   # noqa: BLE001 - any failure of the model itself is one line
        raise ExportError(f"{name} with test-time registers cannot run on images {_shape(pixels)}: "
                          f"{first_line(error)}") from error
    if not outputs:
        raise ExportError(f"the image method of {name} returns no tensor to export")
    return [(output_name, tensor.detach()) for output_name, tensor in outputs]


def _loosest_dtype(modified: ModifiedModel, outputs) -> torch.dtype:
    """The least precise floating dtype the model computes in: its weights', autocast's, its outputs'."""
    dtypes = {tensor.dtype for tensor in modified.model.parameters() if tensor.is_floating_point()}
    dtypes |= {tensor.dtype for _, tensor in outputs if tensor.is_floating_point()}
    if modified.hook_manager.autocast_dtype is not None:
        dtypes.add(modified.hook_manager.autocast_dtype)
    known = [dtype for dtype in dtypes if dtype in RELATIVE_TOLERANCE]
    return max(known, key=RELATIVE_TOLERANCE.__getitem__, default=torch.float32)


class _CopiedSetitemValues(TorchFunctionMode):
    """Every indexed assignment ``tensor[index] = value`` gets a copy of ``value``.

    The TorchScript ONNX exporter (torch 2.14) feeds an indexed assignment the value tensor as it
    was before an earlier indexed assignment changed it in place, as in
    ``values[:, registers, columns] = maxima; activations[:, :, neurons] = values``: the copy makes
    the value a new tensor that already holds the change.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__setitem__ and len(args) == 3 and isinstance(args[2], torch.Tensor):
            args = (args[0], args[1], args[2].clone())
        return func(*args, **(kwargs or {}))


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings from the exporters: tracer warnings about constants (the token count is one for a given
    image size), the TorchScript exporter's deprecation, and torch.export's note that ``register_tokens``
    was assigned while tracing (it restores the attribute)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export(modified: ModifiedModel, artifact: Path, format: str, exporter: str, example: torch.Tensor,
            names: Sequence[str], name: str) -> str:
    """Write the file; returns how it was captured."""
    module = ImageForward(modified).eval()
    batch = torch.export.Dim(BATCH)
    stage = "torch.export"
    try:
        with torch.no_grad(), modified.intervention(), _quiet():
            if format == "onnx" and exporter == "torchscript":
                stage = "the TorchScript ONNX exporter"
                with _CopiedSetitemValues():
                    torch.onnx.export(module, (example,), str(artifact), dynamo=False, input_names=[INPUT_NAME],
                                      output_names=list(names), opset_version=TORCHSCRIPT_OPSET,
                                      dynamic_axes={key: {0: BATCH} for key in (INPUT_NAME, *names)})
                return f"torch.onnx TorchScript exporter, opset {TORCHSCRIPT_OPSET}"
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
            captured = "torch.export (non-strict)"
            if format == "pt2":
                torch.export.save(program, str(artifact))
                return captured
            stage = "the dynamo-based ONNX exporter"
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT_NAME],
                                             output_names=list(names), opset_version=DYNAMO_OPSET, verbose=False)
            onnx_program.save(str(artifact), external_data=False)
            _name_batch_dimension(artifact)
            return f"{captured} + torch.onnx dynamo exporter, opset {DYNAMO_OPSET}"
    except (TestTimeRegistersError, KeyboardInterrupt):
        raise
    except Exception as error:   # noqa: BLE001 - whatever the exporter raises, one line naming the model
        advice = ("export to pt2, or install onnxscript for the dynamo-based exporter" if stage.startswith("the Torch")
                  else "its forward has data-dependent control flow or an operation the exporter does not support")
        raise ExportError(f"{stage} cannot capture {name} with test-time registers: {first_line(error)} ({advice})") \
            from error


def _name_batch_dimension(artifact: Path) -> None:
    """Call the first dimension of every input and output ``batch``, as the TorchScript exporter does
    (the dynamo-based one names it after its symbol, ``s0`` or so)."""
    import onnx

    graph_file = onnx.load(str(artifact))
    for value in (*graph_file.graph.input, *graph_file.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        if first.HasField("dim_param"):
            first.dim_param = BATCH
    onnx.save(graph_file, str(artifact))


#: Runs an exported file in a fresh process: argv = format, file, inputs, outputs, device. It imports
#: torch (and onnxruntime) only, and says so before it writes its results.
_RUNNER = """
import sys
import torch
fmt, artifact, inputs, outputs, device = sys.argv[1:6]
batches = torch.load(inputs)
results = []
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for pixels in batches:
        results.append([torch.from_numpy(array) for array in session.run(None, {name: pixels.numpy()})])
    names = [output.name for output in session.get_outputs()]
else:
    program = torch.export.load(artifact).module()
    with torch.no_grad():
        for pixels in batches:
            returned = program(pixels.to(device))
            returned = returned if isinstance(returned, (tuple, list)) else (returned,)
            results.append([tensor.detach().cpu() for tensor in returned])
    names = None
leaked = sorted(module for module in sys.modules if module.split(".")[0] == "test_time_registers")
if leaked:
    sys.exit("the check imported " + ", ".join(leaked))
torch.save({"names": names, "results": results}, outputs)
"""


def _run_fresh(artifact: Path, format: str, batches: list[torch.Tensor], device: torch.device,
               work: Path) -> tuple[list[list[torch.Tensor]], str]:
    """The file's outputs on each batch, from a fresh Python process; and what ran it."""
    inputs, outputs = work / "check_inputs.pt", work / "check_outputs.pt"
    torch.save([batch.cpu() for batch in batches], inputs)
    command = [sys.executable, "-c", _RUNNER, format, str(artifact), str(inputs), str(outputs), str(device)]
    finished = subprocess.run(command, cwd=work, capture_output=True, text=True)
    runner = "onnxruntime (CPUExecutionProvider)" if format == "onnx" else "torch.export.load(...).module()"
    if finished.returncode != 0:
        lines = [line for line in finished.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"it ended with exit code {finished.returncode}"
        if finished.returncode < 0:
            reason = f"it crashed (signal {-finished.returncode})"
        raise ExportError(f"{runner} cannot run the exported {format} file in a fresh process: {reason}")
    loaded = torch.load(outputs)
    return loaded["results"], runner


def _compare(references, results, sizes, tolerance: float, format: str, out: Path, name: str) -> float:
    """The largest difference over every output and batch size; :class:`ExportMismatchError` above the tolerance."""
    worst, where = 0.0, ""
    for size, expected, got in zip(sizes, references, results):
        if len(got) != len(expected):
            raise ExportMismatchError(f"the exported {format} file returns {len(got)} outputs at batch size {size}, "
                                      f"but {name} returns {len(expected)}; nothing was written to {out}")
        for (output_name, reference), tensor in zip(expected, got):
            reference = reference.cpu()
            if tuple(tensor.shape) != tuple(reference.shape):
                raise ExportMismatchError(f"the exported {format} file gives {output_name} {list(tensor.shape)} at "
                                          f"batch size {size}, but {name} gives {list(reference.shape)}; nothing was "
                                          f"written to {out}")
            difference = (tensor.double() - reference.double()).abs()
            largest = float(difference.max()) if difference.numel() else 0.0
            if math.isnan(largest):
                largest = math.inf
            if largest > worst or not where:
                worst, where = largest, f"{output_name} at batch size {size}"
    if not worst <= tolerance:
        raise ExportMismatchError(f"the exported {format} file does not match {name} with test-time registers: max "
                                  f"difference {worst:.3g} > tolerance {tolerance:.3g} ({where}); nothing was written "
                                  f"to {out}; if the difference is rounding, allow it with a larger tolerance")
    return worst


# ---- text ----------------------------------------------------------------------------------------

def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
