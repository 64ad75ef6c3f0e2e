#!/usr/bin/env python
"""Find the register neurons of a ViT, save them as JSON (or as a folder to publish on the Hugging Face hub,
with --save-pretrained), and show what a test-time register does.

With no arguments it runs offline on the SYNTHETIC demo: a small random OpenCLIP ViT with
planted register neurons, over generated scenes. The before/after table is measured on
held-out images that discovery did not see. Bad input gives one line on stderr and exit code 2.

Installed as the console script ``find-register-neurons``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shlex
import sys
import time
from pathlib import Path

from test_time_registers import ImageFolder, LegacyEdit, ModifiedModel, PaperEdit, RegisterNeurons, find_register_neurons
from test_time_registers.analysis.activation_log import log_activations
from test_time_registers.analysis.figures import require_matplotlib, save_comparison
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.data.batching import Shard
from test_time_registers.data.sources import take
from test_time_registers.neurons import CARD_FILE, HUB_FILE, scores_path_for
from test_time_registers.distributed import device_for_rank, process_group
from test_time_registers.registry import load_model
from test_time_registers.statistics import AUTO_TARGET_RATIO, DiscoverySettings

from test_time_registers.scripts.common import (Parser, UsageError, add_model_flags, check_device, check_output_paths,
                                                checked_neurons, finite_float, layer_or_auto, new_outputs,
                                                non_negative_int, positive_int, positive_int_or_auto, run_main,
                                                threshold_value)

DEMO_IMAGES = 64
DEFAULT_OUT = Path("register_neurons.json")
CHECKPOINT_EVERY = 50
FIGURE_ROWS = 4
#: Flags that only discovery reads: refused together with --neurons. The settings among them are
#: DiscoverySettings' fields, under the same names.
DISCOVERY_FLAGS = ("out", "top_k", "target_ratio", "threshold", "detect_layer", "highest_layer", "score", "checkpoint")
SETTING_FLAGS = tuple(name for name in DISCOVERY_FLAGS if name in DiscoverySettings.names())
#: The flags whose values the neurons a run finds depend on: what --save-pretrained records as the command
#: that reproduces them (given when not at their default; --model always).
REPRODUCING_FLAGS = ("model", "precision", "device", "seed", "images", "num_images", "eval_images", "batch_size",
                     *SETTING_FLAGS)


def target_ratio(text: str) -> float:
    """A largest / median patch norm to reach: finite and at least 1."""
    return finite_float(text, at_least=1, kind="a number of at least 1")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--images", type=Path, help="folder of images, read recursively (default: the model's "
                        "own generated scenes; only the demo has them)")
    parser.add_argument("--num-images", type=positive_int,
                        help=f"images for discovery; a seeded sample of a folder (default: all, or {DEMO_IMAGES} "
                             "generated scenes)")
    parser.add_argument("--eval-images", type=positive_int, default=32,
                        help="held-out images for the before/after table; at most half of a folder")
    parser.add_argument("--out", type=Path, help=f"neuron JSON file to write (default: {DEFAULT_OUT})")
    parser.add_argument("--neurons", help="apply this neuron file, preset:NAME (e.g. preset:dinov2-vitl14) or "
                        f"hf-hub:ORG/REPO[/FILE] (a neuron file on the Hugging Face hub, {HUB_FILE} by default; "
                        "the local cache only when the hub cannot be reached or HF_HUB_OFFLINE=1), instead of "
                        "running discovery")
    parser.add_argument("--save-pretrained", type=Path, metavar="DIR",
                        help=f"write the neurons as a folder to upload to the hub (hf upload ORG/REPO DIR): "
                             f"{HUB_FILE}, its candidate scores and a model card {CARD_FILE}; instead of --out")
    parser.add_argument("--force", action="store_true",
                        help="apply --neurons even if they were found on another model")
    parser.add_argument("--top-k", type=positive_int_or_auto,
                        help="neurons to keep, or 'auto': the fewest that bring the held-out images' largest / median "
                             "patch norm to --target-ratio (default: the planted count for the demo, else 10)")
    parser.add_argument("--target-ratio", type=target_ratio,
                        help=f"with --top-k auto: the largest / median patch norm to reach (default: {AUTO_TARGET_RATIO})")
    parser.add_argument("--threshold", type=threshold_value,
                        help="outlier norm threshold at the detection layer, or 'auto' (default: auto)")
    parser.add_argument("--detect-layer", type=non_negative_int,
                        help="block whose output is searched for outliers (default: the architecture's, "
                             "usually the last)")
    parser.add_argument("--highest-layer", type=layer_or_auto,
                        help="last layer of candidate neurons, or 'auto': where the outliers first stand out "
                             "(default: auto)")
    parser.add_argument("--score", choices=("raw", "abs"),
                        help="average raw activations (the paper) or absolute ones (the reference code) "
                             "(default: raw)")
    parser.add_argument("--num-registers", type=non_negative_int, default=1, help="test-time registers to append")
    parser.add_argument("--legacy", action="store_true", help="reproduce the reference implementation's edit")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="DataLoader processes that decode and preprocess images")
    parser.add_argument("--compile", action="store_true",
                        help="run discovery's forward pass through torch.compile (statistics unchanged; "
                             "compiling takes seconds to minutes, worth it for many images)")
    parser.add_argument("--checkpoint", type=Path, help="save discovery's statistics to this file as it goes "
                        "(one file per rank under torchrun), to continue after a kill with --resume")
    parser.add_argument("--checkpoint-every", type=positive_int,
                        help=f"batches between checkpoints (default: {CHECKPOINT_EVERY})")
    parser.add_argument("--resume", action="store_true", help="continue discovery from --checkpoint")
    parser.add_argument("--log", type=Path, help="write per-image norm maps and neuron activations to this HDF5 file")
    parser.add_argument("--figure", type=Path, help="save a before/after PNG of norm and attention maps")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    if args.neurons:
        given = [f"--{name.replace('_', '-')}" for name in DISCOVERY_FLAGS if getattr(args, name) is not None]
        if given:
            raise UsageError(f"--neurons applies an existing neuron file, so {', '.join(given)} would be ignored; "
                             "drop them, or drop --neurons to run discovery")
    elif args.force:
        raise UsageError("--force only applies to --neurons")
    if args.target_ratio is not None and args.top_k != "auto":
        raise UsageError("--target-ratio only applies to --top-k auto")
    if args.resume and args.checkpoint is None:
        raise UsageError("--resume needs --checkpoint FILE, the checkpoint to continue from")
    if args.checkpoint_every is not None and args.checkpoint is None:
        raise UsageError("--checkpoint-every needs --checkpoint FILE")
    args.checkpoint_every = args.checkpoint_every or CHECKPOINT_EVERY
    if args.save_pretrained is not None and args.out is not None:
        raise UsageError(f"--save-pretrained DIR writes the neuron file as DIR/{HUB_FILE}; drop --out")
    args.out = None if args.neurons or args.save_pretrained else (args.out or DEFAULT_OUT)
    pretrained = None
    if args.save_pretrained is not None:
        if args.save_pretrained.exists() and not args.save_pretrained.is_dir():
            raise UsageError(f"--save-pretrained {args.save_pretrained} is a file; give a folder")
        pretrained = args.save_pretrained / HUB_FILE
    check_output_paths(out=args.out, save_pretrained=pretrained, log=args.log, figure=args.figure,
                       checkpoint=args.checkpoint)
    if args.figure:
        require_matplotlib()


def run(args: argparse.Namespace) -> int:
    """One run; under torchrun every rank runs it, and rank 0 alone prints and writes."""
    check_flags(args)
    device = check_device(device_for_rank(args.device))
    with process_group(device) as shard:
        if shard.rank != 0:
            args.quiet = True
            with contextlib.redirect_stdout(io.StringIO()):
                return discover_and_compare(args, device, shard)
        return discover_and_compare(args, device, shard)


def discover_and_compare(args: argparse.Namespace, device: str, shard: Shard) -> int:
    folder = ImageFolder(args.images, limit=args.num_images, seed=args.seed) if args.images else None

    started = time.perf_counter()
    loaded = load_model(args.model, device=device, precision=args.precision, seed=args.seed)
    model, preprocess, hook_manager = loaded
    if folder is None and loaded.generate_images is None:
        raise UsageError(f"--images DIR is required for {args.model}; only the demo generates its own scenes")
    images, evaluation, described = _image_sets(args, folder, loaded)
    if loaded.synthetic:
        print(f"SYNTHETIC DEMO: a small random OpenCLIP ViT with planted register neurons, on {described}. "
              "No weights were downloaded; the numbers below describe this toy model.")
    print(f"model: {hook_manager.name} ({hook_manager.num_layers} blocks, "
          f"{hook_manager.num_neurons(0)} MLP neurons per block, {args.precision}); {described}")

    if args.neurons:
        neurons = checked_neurons(args.neurons, hook_manager, args.force)
        print(f"loaded {len(neurons)} register neurons from {args.neurons}")
    else:
        given = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
        settings = DiscoverySettings(**{"top_k": len(loaded.planted) if loaded.planted else 10, **given})
        settings.layers(hook_manager)   # bad layers fail before any work
        held_out = {"held_out": evaluation if evaluation is not None else images} if settings.automatic_top_k else {}
        neurons = find_register_neurons(
            hook_manager, images, preprocess, **held_out, **dataclasses.asdict(settings),
            batch_size=args.batch_size, seed=args.seed, workers=args.workers, checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.quiet,
            compile=args.compile)
    if shard.rank != 0:   # every rank holds the merged result; rank 0 writes and reports it
        return 0

    # Every file this run writes: a failure or Ctrl-C from here on leaves none that is new (the
    # checkpoint is the exception by design: it is there to resume from).
    outputs = (args.out, scores_path_for(args.out) if args.out else None, *_pretrained_outputs(args.save_pretrained),
               args.log, args.figure)
    with new_outputs(*outputs):
        if not args.neurons and args.save_pretrained is not None:
            neurons.extra.setdefault("command", reproducing_command(args))
            neurons.extra.setdefault("images", described)
        if args.out:
            neurons.save(args.out)
        if args.save_pretrained is not None:
            neurons.save_pretrained(args.save_pretrained)
        if not args.neurons:
            report_discovery(args, neurons, loaded.planted)
        if args.save_pretrained is not None:
            scores = " and its candidate scores" if neurons.candidate_scores is not None else ""
            print(f"wrote {args.save_pretrained}: {HUB_FILE}{scores}, and the model card {CARD_FILE}; publish it "
                  f"with: hf upload ORG/REPO {shlex.quote(str(args.save_pretrained))}")
        if args.log:
            log_activations(hook_manager, images, neurons, args.log, preprocess, batch_size=args.batch_size,
                            workers=args.workers, progress=not args.quiet)
            print(f"wrote {args.log}")
        compare(args, hook_manager, preprocess, evaluation if evaluation is not None else images, neurons,
                held_out=evaluation is not None)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def report_discovery(args: argparse.Namespace, neurons: RegisterNeurons, planted) -> None:
    print(f"found {len(neurons)} register neurons in {neurons.images_seen} images "
          f"({neurons.images_with_outliers} with outliers): threshold {neurons.threshold:.4g} "
          f"({neurons.extra['threshold_mode']}), detect layer {neurons.detect_layer}, "
          f"highest layer {neurons.highest_layer}")
    if "top_k_auto" in neurons.extra:
        sweep = neurons.extra["top_k_auto"]
        tried = ", ".join(f"k={k}: {ratio:.2f}x" for k, ratio in sweep["ratio_by_k"])
        verdict = "met" if sweep["met"] else "not met even with all candidates"
        print(f"top-k auto: {len(neurons)} neurons; largest / median patch norm on {sweep['held_out_images']} "
              f"held-out images with one register: {tried} (target {sweep['target_ratio']:g}x, {verdict})")
    print_neurons(neurons, planted)
    if args.out:
        print(f"wrote {args.out}")
    if neurons.extra.get("files_skipped"):
        print(f"skipped {neurons.extra['files_skipped']} unreadable or non-image file(s) in {args.images}")


def reproducing_command(args: argparse.Namespace) -> str:
    """The ``find-register-neurons`` command line that finds the same neurons as this run: the flags of
    :data:`REPRODUCING_FLAGS` that are not at their defaults, as they were parsed."""
    defaults = build_parser()
    words = ["find-register-neurons"]
    for name in REPRODUCING_FLAGS:
        value = getattr(args, name)
        if value is None or (name != "model" and value == defaults.get_default(name)):
            continue
        words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)


def _pretrained_outputs(folder: Path | None) -> tuple[Path, ...]:
    """What --save-pretrained writes, for :func:`new_outputs`: the folder if it is new (it is removed whole
    on failure), else the files it writes there."""
    if folder is None:
        return ()
    if not (folder.exists() or folder.is_symlink()):
        return (folder,)
    return folder / HUB_FILE, scores_path_for(folder / HUB_FILE), folder / CARD_FILE


def _image_sets(args, folder: ImageFolder | None, loaded):
    """(discovery images, held-out evaluation images, a description) for this run."""
    if folder is None:
        count = args.num_images or DEMO_IMAGES
        scenes = list(loaded.generate_images(count + args.eval_images, args.seed))
        return scenes[:count], scenes[count:], f"{count} generated scenes"
    if args.neurons:   # nothing is discovered, so every image is held out
        return folder, folder.readable_sample(args.eval_images), f"images from {args.images}"
    rest, held_out = folder.hold_out(args.eval_images)
    return rest, held_out, f"images from {args.images}"


def _report_skipped(images, root) -> None:
    if isinstance(images, ImageFolder) and images.skipped:
        print(f"skipped {images.skipped} unreadable or non-image file(s) in {root}")


def print_neurons(neurons: RegisterNeurons, planted) -> None:
    print(f"  {'rank':>4}  {'layer':>5}  {'neuron':>6}  {'score':>9}")
    for rank, item in enumerate(neurons, start=1):
        print(f"  {rank:>4}  {item.layer:>5}  {item.neuron:>6}  {item.score:>9.3f}")
    if planted:
        found = len(set(neurons.pairs()) & set(map(tuple, planted)))
        print(f"planted neurons recovered: {found} of {len(planted)}")


def compare(args, hook_manager, preprocess, evaluation, neurons, held_out: bool) -> None:
    """The before/after table (and figure) on ``evaluation``: held-out images, unless too few to hold any out."""
    detect_layer = neurons.detect_layer if neurons.detect_layer is not None else hook_manager.default_detect_layer
    attention_layer = hook_manager.num_layers - 1
    modified = ModifiedModel(hook_manager.model, hook_manager, neurons, num_registers=args.num_registers,
                             edit=LegacyEdit() if args.legacy else PaperEdit(), seed=args.seed)
    keep = FIGURE_ROWS if args.figure else 0
    common = dict(detect_layer=detect_layer, attention_layer=attention_layer, batch_size=args.batch_size,
                  keep_maps=keep, workers=args.workers)
    before = measure_outliers(hook_manager, evaluation, preprocess, **common)
    after = measure_outliers(modified.hook_manager, evaluation, preprocess, **common)
    _report_skipped(evaluation, args.images)
    registers = f"{args.num_registers} test-time register" + ("s" if args.num_registers != 1 else "")
    rows = [
        (f"largest / median patch norm, layer {detect_layer} (mean)", before.max_over_median, after.max_over_median, "x"),
        ("largest / median patch norm, worst image", before.worst_max_over_median, after.worst_max_over_median, "x"),
        (f"CLS attention on its top patch, layer {attention_layer}", before.cls_top_patch_attention,
         after.cls_top_patch_attention, ""),
        ("CLS attention on the test-time registers", None, after.cls_register_attention, ""),
        ("register norm / median patch norm", None, after.register_over_median, "x"),
    ]
    if args.neurons:
        which = "images"
    elif held_out:
        which = "held-out images (not used by discovery)"
    else:
        which = "images, the same ones discovery used (the folder has too few to hold any out)"
    print(f"\nbefore/after on {before.images} {which}{' (legacy edit)' if args.legacy else ''}:")
    print(f"  {'':<52} {'before':>9} {'after':>9}   ({registers})")
    for label, old, new, unit in rows:
        if old is None and new is None:
            continue
        print(f"  {label:<52} {_cell(old, unit):>9} {_cell(new, unit):>9}")
    if args.figure:
        norms = f"patch norm, layer {detect_layer}"
        columns = {f"{norms} (before)": before.maps["norms"], f"{norms} (after)": after.maps["norms"]}
        if "cls_attention" in before.maps:
            attention = f"CLS attention, layer {attention_layer}"
            columns.update({f"{attention} (before)": before.maps["cls_attention"],
                            f"{attention} (after)": after.maps["cls_attention"]})
        save_comparison(args.figure, take(evaluation, keep), columns)
        print(f"wrote {args.figure}")


def _cell(value, unit: str) -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def main(argv=None) -> int:
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
