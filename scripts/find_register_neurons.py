#!/usr/bin/env python
"""Find the register neurons of a ViT, save them as JSON, and show what a test-time register does.

With no arguments it runs offline on the SYNTHETIC demo: a small random OpenCLIP ViT with
planted register neurons, over generated scenes. Bad input gives one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_specs import FORMS, PRECISIONS, load_model, load_neurons  # noqa: E402

import torch  # noqa: E402

from shared import (ImageFolder, ModifiedModel, RegisterNeurons, TestTimeRegistersError,  # noqa: E402
                    check_discovery_arguments, find_register_neurons)
from shared.activation_log import log_activations  # noqa: E402
from shared.figures import save_comparison  # noqa: E402
from shared.images import take  # noqa: E402
from shared.metrics import measure_outliers  # noqa: E402

DEMO_IMAGES = 64


class UsageError(Exception):
    """Bad flags or input, reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def threshold_value(text: str):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}")
    return value


def layer_or_auto(text: str):
    return "auto" if text == "auto" else non_negative_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help=f"{FORMS} (default: demo, synthetic and offline)")
    parser.add_argument("--images", type=Path, help="folder of images (default: the demo's generated scenes)")
    parser.add_argument("--num-images", type=positive_int,
                        help=f"images to use; a seeded sample of a folder (default: all, or {DEMO_IMAGES} demo scenes)")
    parser.add_argument("--out", type=Path, default=Path("register_neurons.json"), help="neuron JSON file to write")
    parser.add_argument("--neurons", help="apply this neuron file (or preset:NAME, e.g. preset:dinov2-vitl14) "
                        "instead of running discovery")
    parser.add_argument("--top-k", type=positive_int, help="neurons to keep (default: 4 for the demo, else 10)")
    parser.add_argument("--threshold", type=threshold_value, default="auto", help="outlier norm threshold or 'auto'")
    parser.add_argument("--detect-layer", type=non_negative_int, help="block searched for outliers (default: last)")
    parser.add_argument("--highest-layer", type=layer_or_auto, default="auto",
                        help="last layer of candidate neurons, or 'auto' (where the outliers first stand out)")
    parser.add_argument("--score", choices=("raw", "abs"), default="raw", help="average raw or absolute activations")
    parser.add_argument("--num-registers", type=non_negative_int, default=1, help="test-time registers to append")
    parser.add_argument("--legacy", action="store_true", help="reproduce the reference implementation's edit")
    parser.add_argument("--eval-images", type=positive_int, default=32, help="images for the before/after table")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo, image sampling and register choice")
    parser.add_argument("--log", type=Path, help="write per-image norm maps and neuron activations to this HDF5 file")
    parser.add_argument("--figure", type=Path, help="save a before/after PNG of norm and attention maps")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r}") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {name}: models cannot run on a {device.type} device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return name


def check_output_path(path: Path | None, flag: str) -> None:
    """Fail before any work if an output cannot be written, so no run ends with half its files."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None


def run(args) -> int:
    device = check_device(args.device)
    for path, flag in ((args.out, "--out"), (args.log, "--log"), (args.figure, "--figure")):
        check_output_path(path, flag)
    folder = ImageFolder(args.images, limit=args.num_images, seed=args.seed) if args.images else None
    if folder is None and args.model != "demo":
        raise UsageError("--images DIR is required for a real model (the demo scenes are synthetic)")

    started = time.perf_counter()
    resolved = load_model(args.model, device=device, precision=args.precision, seed=args.seed)
    model, preprocess, hook_manager = resolved.loaded
    if resolved.synthetic:
        print("SYNTHETIC DEMO: a small random OpenCLIP ViT with planted register neurons, "
              "on generated scenes. No weights were downloaded; the numbers below describe this toy model.")
    check_discovery_arguments(hook_manager, detect_layer=args.detect_layer, highest_layer=args.highest_layer)
    if folder is not None:
        images, described = folder, f"images from {args.images}"
    else:
        from clip.demo import demo_images

        count = args.num_images or DEMO_IMAGES
        images, described = demo_images(count, seed=args.seed), f"{count} synthetic demo scenes"
    print(f"model: {hook_manager.name} ({hook_manager.num_layers} blocks, "
          f"{hook_manager.num_neurons(0)} MLP neurons per block); {described}")

    skipped = None
    if args.neurons:
        neurons = load_neurons(args.neurons, hook_manager)
        print(f"loaded {len(neurons)} register neurons from {args.neurons}")
    else:
        top_k = args.top_k or (len(resolved.planted) if resolved.planted else 10)
        neurons = find_register_neurons(
            hook_manager, images, preprocess, top_k=top_k, threshold=args.threshold,
            detect_layer=args.detect_layer, highest_layer=args.highest_layer, score=args.score,
            batch_size=args.batch_size, progress=not args.quiet)
        neurons.save(args.out)
        skipped = folder.skipped if folder is not None else 0   # counted over the whole discovery pass
        print(f"found {len(neurons)} register neurons in {neurons.images_seen} images "
              f"({neurons.images_with_outliers} with outliers): threshold {neurons.threshold:.4g} "
              f"({neurons.extra['threshold_mode']}), detect layer {neurons.detect_layer}, "
              f"highest layer {neurons.highest_layer}")
        print_neurons(neurons, resolved.planted)
        print(f"wrote {args.out}")

    if args.log:
        log_activations(hook_manager, images, neurons, args.log, preprocess, batch_size=args.batch_size,
                        progress=not args.quiet)
        print(f"wrote {args.log}")

    compare(args, hook_manager, preprocess, images, neurons)
    if folder is not None:
        skipped = folder.skipped if skipped is None else skipped
        if skipped:
            print(f"skipped {skipped} unreadable or non-image file(s) in {args.images}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def print_neurons(neurons: RegisterNeurons, planted) -> None:
    print(f"  {'rank':>4}  {'layer':>5}  {'neuron':>6}  {'score':>9}")
    for rank, item in enumerate(neurons, start=1):
        print(f"  {rank:>4}  {item.layer:>5}  {item.neuron:>6}  {item.score:>9.3f}")
    if planted:
        found = len(set(neurons.pairs()) & set(map(tuple, planted)))
        print(f"planted neurons recovered: {found} of {len(planted)}")


def compare(args, hook_manager, preprocess, images, neurons) -> None:
    detect_layer = neurons.detect_layer if neurons.detect_layer is not None else hook_manager.default_detect_layer
    attention_layer = hook_manager.num_layers - 1
    evaluation = take(images, args.eval_images)
    modified = ModifiedModel(hook_manager.model, hook_manager, neurons, num_registers=args.num_registers,
                             legacy=args.legacy, seed=args.seed)
    keep = 4 if args.figure else 0
    common = dict(detect_layer=detect_layer, attention_layer=attention_layer, batch_size=args.batch_size,
                  keep_maps=keep)
    before = measure_outliers(hook_manager, evaluation, preprocess, **common)
    after = measure_outliers(modified, evaluation, preprocess, **common)
    registers = f"{args.num_registers} test-time register" + ("s" if args.num_registers != 1 else "")
    rows = [
        (f"largest / median patch norm, layer {detect_layer} (mean)", before.max_over_median, after.max_over_median, "x"),
        ("largest / median patch norm, worst image", before.worst_max_over_median, after.worst_max_over_median, "x"),
        (f"CLS attention on its top patch, layer {attention_layer}", before.cls_top_patch_attention,
         after.cls_top_patch_attention, ""),
        ("CLS attention on the test-time registers", None, after.cls_register_attention, ""),
        ("register norm / median patch norm", None, after.register_over_median, "x"),
    ]
    print(f"\nbefore/after on {before.images} images{' (legacy edit)' if args.legacy else ''}:")
    print(f"  {'':<52} {'before':>9} {'after':>9}   ({registers})")
    for label, old, new, unit in rows:
        if old is None and new is None:
            continue
        print(f"  {label:<52} {_cell(old, unit):>9} {_cell(new, unit):>9}")
    if args.figure:
        columns = {"norms (before)": before.maps["norms"], "norms (after)": after.maps["norms"]}
        if "cls_attention" in before.maps:
            columns.update({"CLS attention (before)": before.maps["cls_attention"],
                            "CLS attention (after)": after.maps["cls_attention"]})
        save_comparison(args.figure, evaluation[:keep], columns)
        print(f"wrote {args.figure}")


def _cell(value, unit: str) -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def main(argv=None) -> int:
    logging.getLogger().addHandler(logging.NullHandler())  # libraries' log lines stay off the terminal
    logging.getLogger("shared").addHandler(_warnings_to_stderr())
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except (UsageError, TestTimeRegistersError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:   # a file that vanished or a disk that filled up mid-run
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _warnings_to_stderr() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    return handler


if __name__ == "__main__":
    sys.exit(main())
