"""What the command-line programs share: flags, checks, outputs, and one-line errors with exit code 2.

Each program's ``main`` goes through :func:`run_main`: bad input of any kind is one line on stderr
and exit code 2, Ctrl-C at any moment after the program's module is imported is one line and exit
code 130, and a run that fails leaves no new output behind (:func:`new_outputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from test_time_registers import TestTimeRegistersError
from test_time_registers.precision import PRECISIONS
from test_time_registers.neurons import RegisterNeurons
from test_time_registers.registry import architectures, load_neurons, spec_forms, supported_models

LIBRARY_LOGGER = "test_time_registers"
IMAGES_LOGGER = "test_time_registers.data.sources"
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


class UsageError(Exception):
    """Bad flags or input, reported as one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, and whose help shows every default."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" where a flag has a default."""

    def _get_help_string(self, action):
        text = model_help() if action.dest == "model" else (action.help or "")
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_int_or_auto(text: str):
    return "auto" if text == "auto" else positive_int(text)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def finite_float(text: str, *, above: float | None = None, at_least: float | None = None, below: float | None = None,
                 kind: str = "a number") -> float:
    """``text`` as a finite float within the bounds given; NaN and infinities are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (above is None or value > above) and (at_least is None or value >= at_least)
            and (below is None or value < below)):
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return finite_float(text, above=0, kind="a positive number")


def non_negative_float(text: str) -> float:
    return finite_float(text, at_least=0, kind="a non-negative number")


def ratio_above_one(text: str) -> float:
    """A ratio of norms, such as largest / median: finite and above 1."""
    return finite_float(text, above=1, kind="a number above 1")


def threshold_value(text: str):
    if text == "auto":
        return "auto"
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None


#: Seeds reach torch, numpy and ``random``; numpy's take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated ints, e.g. ``-4,-3,-2,-1`` (pass it as ``--flag=-4,-3``, or argparse takes it for a flag)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    return values


def number_list(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers, or ``START:STOP:STEP`` (both ends included), e.g. ``-1:0:0.1``."""
    if text.count(":") == 2:
        start, stop, step = (finite_float(part) for part in text.split(":"))
        if step <= 0 or stop < start or (stop - start) / step > 10_000:
            raise argparse.ArgumentTypeError(f"expected START:STOP:STEP with START <= STOP and a positive STEP, "
                                             f"got {text!r}")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        return tuple(round(start + index * step, 12) for index in range(count))
    return tuple(finite_float(part, kind="comma-separated numbers") for part in text.split(","))


def layer_or_auto(text: str):
    return "auto" if text == "auto" else non_negative_int(text)


def model_help() -> str:
    """The help of ``--model``, read from the registry when the help is shown (it imports every architecture)."""
    examples = [architecture.examples[0] for architecture in architectures().values()
                if architecture.examples and architecture.alias_of is None]
    return (f"model spec, one of: {spec_forms()}; e.g. {', '.join(examples)}; 'demo' is synthetic and offline; "
            "--list-models describes each")


def list_models() -> str:
    """Every registered architecture (spec, what it loads, examples, presets) and every supported model class."""
    lines = ["Model specs (--model):"]
    for prefix, architecture in architectures().items():
        if architecture.alias_of is not None:
            lines.append(f"  {architecture.spec}  (an alias of {architecture.alias_of}:)")
            continue
        lines.append(f"  {architecture.spec}")
        if architecture.description:
            lines.append(f"      {architecture.description}")
        lines.extend(f"      e.g. {example}" for example in architecture.examples)
        lines.extend(f"      preset:{name}  {preset.description}" for name, preset in architecture.presets.items())
    lines.append("Model classes (what hook_manager_for describes):")
    for name, entry in supported_models().items():
        if entry.hook_manager is not None:
            what = entry.hook_manager.__name__
        elif entry.inside is not None:
            what = f"wraps the model at .{entry.inside}"
        else:
            what = f"unsupported: {entry.unsupported}"
        lines.append(f"  {name}: {what}")
    return "\n".join(lines)


class ListModels(argparse.Action):
    """``--list-models``: print :func:`list_models` and exit, like ``--help``."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(list_models())
        parser.exit()


def add_model_flags(parser: argparse.ArgumentParser, precisions: tuple[str, ...] = tuple(PRECISIONS)) -> None:
    """``--model``, ``--list-models``, ``--device``, ``--precision`` (one of ``precisions``) and ``--seed``."""
    parser.add_argument("--model", default="demo", help="(from the registry)")
    parser.add_argument("--list-models", action=ListModels,
                        help="list every model spec, its examples and presets, and every supported model class, then exit")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--precision", choices=precisions, default="fp32",
                        help="; ".join(f"{PRECISIONS[p].name}: {PRECISIONS[p].description}" for p in precisions))
    parser.add_argument("--seed", type=seed_value, default=0,
                        help="seed of the demo model, image sampling and register choice")


def check_device(name: str) -> str:
    """The device, if this torch can put a tensor there; else a one-line :class:`UsageError`."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r}") from None
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {name}: models cannot run on a {device.type} device; use one of "
                         f"{', '.join(DEVICE_TYPES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError) as error:   # no backend, or an index past the last device
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--device {name}: this torch cannot use it ({reason})") from None
    return name


def checked_neurons(spec: str, hook_manager, force: bool = False) -> RegisterNeurons:
    """The register neurons of ``--neurons SPEC`` (a file, ``preset:NAME`` or ``hf-hub:ORG/REPO[/FILE]``),
    checked against the model.

    Neurons out of the model's range raise the library's error; neurons found on another model
    are a :class:`UsageError` unless ``force``, and then one warning.
    """
    neurons = load_neurons(spec)
    neurons.check_fits(hook_manager, warn_other_model=False)
    mismatch = neurons.model_mismatch(hook_manager)
    if mismatch and not force:
        raise UsageError(f"--neurons {spec}: {mismatch}; pass --force to apply them anyway")
    neurons.check_fits(hook_manager)   # with force: one warning
    return neurons


def check_output_paths(**paths: Path | None) -> None:
    """Fail before any work if an output cannot be written or two flags name one file; create nothing.

    ``paths`` maps a flag name (``out``) to its path, or ``None`` when the flag is unused. A
    missing folder is fine if it can be made inside the nearest one that exists; it is made
    when the output is written (:func:`new_outputs`).
    """
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        option = f"--{flag.replace('_', '-')}"
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name")
        resolved = path.resolve()
        if resolved in seen:
            raise UsageError(f"{seen[resolved]} and {option} name the same file {path}; give each its own file")
        seen[resolved] = option
        existing = path.parent
        while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"{option} {path}: cannot write there ({existing} is a file, not a folder)")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise UsageError(f"{option} {path}: cannot write there ({error.strerror or error})") from None


@contextlib.contextmanager
def new_outputs(*paths: Path | None) -> Iterator[None]:
    """The block writes these files; if it fails (Ctrl-C included), it leaves nothing new behind.

    On entry the missing folders above each path are made. If the block raises, each path that
    did not exist before is removed, and then each folder made here that is left empty (a
    discovery checkpoint written there stays, and keeps its folder). A file that existed before is
    only ever replaced by its writer's atomic rename: if the block fails after that, it holds the
    new, complete output.
    """
    outputs = [Path(path) for path in paths if path is not None]
    existed = {path: path.exists() or path.is_symlink() for path in outputs}
    made: list[Path] = []
    for path in outputs:
        for folder in path.parents:
            if folder.exists() or folder.is_symlink():
                break
            made.append(folder)
    try:
        for folder in sorted(set(made), key=lambda folder: len(folder.parts)):
            folder.mkdir(exist_ok=True)
        yield
    except BaseException:
        for path in outputs:
            if not existed[path]:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for folder in sorted(set(made), key=lambda folder: len(folder.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()   # only if empty
        raise


def in_cli_language(message: str, parser: argparse.ArgumentParser) -> str:
    """Rewrite the library's parameter names as this program's flags.

    ``threshold=53.5`` becomes ``--threshold 53.5`` and ``detect_layer`` becomes ``--detect-layer``,
    for every flag the parser has. A name in single quotes (a file's field, ``'detect_layer'``) is
    quoted from a file, not a parameter, and stays as it is.
    """
    for action in parser._actions:
        flag = next((option for option in action.option_strings if option.startswith("--")), None)
        if flag is None or action.dest == "help":
            continue
        message = re.sub(rf"(?<![\w'.\[]){action.dest}=(\S+?)(?=[\s,;)]|$)", rf"{flag} \1", message)
        if "_" in action.dest:   # plain words like 'images' stay prose
            message = re.sub(rf"(?<![\w'.\[]){action.dest}\b(?!['\]])", flag, message)
    return message


class _TqdmHandler(logging.Handler):
    """Prints log records to stdout without breaking a progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)


@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """Library warnings on stderr, skipped image files on stdout, for the length of one run."""
    library, images, root = logging.getLogger(LIBRARY_LOGGER), logging.getLogger(IMAGES_LOGGER), logging.getLogger()
    quiet = logging.NullHandler()   # other libraries' log lines (open_clip logs download errors) stay off the terminal
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("warning: %(message)s"))
    skips = _TqdmHandler()
    skips.setFormatter(logging.Formatter("%(message)s"))
    saved = (library.level, images.level, images.propagate, library.propagate)
    root.addHandler(quiet)
    library.addHandler(warnings)
    images.addHandler(skips)
    library.setLevel(logging.WARNING)
    images.setLevel(logging.WARNING)
    images.propagate = False
    library.propagate = False   # our warnings are printed once, by the handler above
    try:
        yield
    finally:
        root.removeHandler(quiet)
        library.removeHandler(warnings)
        images.removeHandler(skips)
        library.level, images.level, images.propagate, library.propagate = saved


def run_main(parser: argparse.ArgumentParser | Callable[[], argparse.ArgumentParser],
             run: Callable[[argparse.Namespace], int], argv=None) -> int:
    """Build the parser (``parser`` may be a function that makes it), parse ``argv`` and call ``run``.

    Bad input of any kind is one line on stderr and exit code 2; Ctrl-C, wherever it lands (while
    the parser is built, the model is imported or loaded, or the error is printed), is one line and
    exit code 130. Names that are not valid text are printed with escapes, never as an error.
    """
    prefix, restore = "error: ", _nothing   # first, so that a Ctrl-C from here on is caught below
    try:
        rank = os.environ.get("RANK", "0") if "LOCAL_RANK" in os.environ else "0"
        prefix = "error: " if rank == "0" else f"error: rank {rank}: "   # under torchrun, say which rank failed
        restore = _escape_unprintable(sys.stdout)
        with _ctrl_c_outside_import_callbacks(), cli_logging():
            try:
                if not isinstance(parser, argparse.ArgumentParser):
                    parser = parser()
                return run(parser.parse_args(argv))
            except (UsageError, TestTimeRegistersError) as error:
                message = ' '.join(str(error).split())
                if isinstance(parser, argparse.ArgumentParser):
                    message = in_cli_language(message, parser)
                print(f"{prefix}{message}", file=sys.stderr)
                return 2
            except OSError as error:   # a file that vanished or a disk that filled up mid-run
                print(f"{prefix}{' '.join(str(error).split())}", file=sys.stderr)
                return 2
    except KeyboardInterrupt:
        with contextlib.suppress(KeyboardInterrupt):
            print(f"{prefix}interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        restore()


@contextlib.contextmanager
def _ctrl_c_outside_import_callbacks() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, but never inside the import machinery, whose callbacks would
    swallow it (the run would go on); there it is raised again a moment later, once they are left."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGALRM)}
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in previous.items():
            signal.signal(number, handler)


def _nothing() -> None:
    pass


def _escape_unprintable(stream) -> Callable[[], None]:
    """Make ``stream`` print text it cannot encode with backslash escapes; returns how to undo it."""
    errors = getattr(stream, "errors", None)
    if errors in (None, "backslashreplace") or not hasattr(stream, "reconfigure"):
        return _nothing
    try:
        stream.reconfigure(errors="backslashreplace")
    except (ValueError, OSError, AttributeError, TypeError):
        return _nothing
    return lambda: stream.reconfigure(errors=errors)
