#!/usr/bin/env python
"""Export a ViT with its test-time registers baked in, as an ONNX graph or a torch.export program (.pt2).

The file takes preprocessed images pixel_values [batch, 3, H, W] (any batch size) and returns what
the model's image method returns, registers and register-neuron edits included: it runs without
this library. Before it is written, it is run in a fresh Python process (ONNX Runtime, or
torch.export.load) on check images at two batch sizes and compared with the model run here; a file
that differs by more than the tolerance is not written. With no --neurons it exports the SYNTHETIC
demo with its own planted register neurons. Bad input gives one line on stderr and exit code 2, and
no file is written.

Installed as the console script ``test-time-registers-export``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from test_time_registers import ImageFolder, LegacyEdit, ModifiedModel, PaperEdit, RegisterNeurons
from test_time_registers.data.batching import batches
from test_time_registers.data.scenes import demo_images
from test_time_registers.edits import NORMAL_VALUES, RANDOM_NORMAL_VALUES
from test_time_registers.export import FORMATS, REPRODUCIBLE_NORMAL_VALUES, export_image_model, format_of
from test_time_registers.registry import load_model

from test_time_registers.scripts.common import (Parser, UsageError, add_model_flags, check_device, check_output_paths,
                                                checked_neurons, new_outputs, non_negative_float, non_negative_int,
                                                positive_int, run_main)

SCENE_SIZE = 224


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--neurons", help="register neurons to bake in: a neuron file, preset:NAME or "
                        "hf-hub:ORG/REPO[/FILE] (default for the demo: its own planted neurons)")
    parser.add_argument("--force", action="store_true", help="apply --neurons even if they were found on another model")
    parser.add_argument("--format", choices=tuple(FORMATS),
                        help="onnx (ONNX Runtime and the like; float32 only) or pt2 (torch.export.load; any precision) "
                             "(default: from the suffix of --out)")
    parser.add_argument("--out", type=Path, required=True, help="the file to write, *.onnx or *.pt2")
    parser.add_argument("--num-registers", type=non_negative_int, default=1, help="test-time registers to append")
    parser.add_argument("--edit", choices=("paper", "legacy"), default="paper",
                        help="paper: move the maxima to the registers (Algorithm 2); legacy: the reference code's edit")
    parser.add_argument("--replace", choices=NORMAL_VALUES, default="zero",
                        help="what the register neurons become away from the registers (not the random "
                             f"{' or '.join(RANDOM_NORMAL_VALUES)}: a graph cannot reproduce them)")
    parser.add_argument("--images", type=Path, help="folder of images to check the file on, read recursively "
                        "(default: generated scenes)")
    parser.add_argument("--num-images", type=positive_int, default=3,
                        help="check images: the file is run on all of them at once, and on one alone")
    parser.add_argument("--batch-size", type=positive_int, default=2,
                        help="images in the example batch the model is traced with (the batch stays dynamic)")
    parser.add_argument("--image-size", type=positive_int,
                        help="export for images of this height and width, resizing the preprocessed images "
                             "(default: the size the model's preprocessing gives)")
    parser.add_argument("--tolerance", type=non_negative_float,
                        help="the largest difference allowed between the file and the model (default: 1e-4 times the "
                             "largest output value in float32, 1e-2 in float16, 5e-2 in bfloat16)")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    if args.force and not args.neurons:
        raise UsageError("--force only applies to --neurons")
    if args.replace in RANDOM_NORMAL_VALUES:
        raise UsageError(f"--replace {args.replace} draws random values at every call, which an exported graph cannot "
                         f"reproduce; use one of {', '.join(REPRODUCIBLE_NORMAL_VALUES)}")
    if args.format is None:
        args.format = format_of(args.out)
        if args.format is None:
            raise UsageError(f"--out {args.out}: name the file *.onnx or *.pt2, or give --format")
    elif args.out.suffix.lower() != FORMATS[args.format]:
        raise UsageError(f"--out {args.out} does not end in {FORMATS[args.format]}, but --format is {args.format}: "
                         f"name it {args.out.with_suffix(FORMATS[args.format]).name}")
    if args.format == "onnx" and args.precision != "fp32":
        raise UsageError(f"--format onnx exports float32 models only, not --precision {args.precision}; use "
                         "--precision fp32, or --format pt2, which keeps every precision")
    check_output_paths(out=args.out)


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    device = check_device(args.device)
    folder = ImageFolder(args.images) if args.images else None   # a missing or empty folder fails here

    loaded = load_model(args.model, device=device, precision=args.precision, seed=args.seed)
    model, preprocess, hook_manager = loaded
    if args.image_size is not None and any(args.image_size % side for side in hook_manager.patch_size):
        raise UsageError(f"--image-size {args.image_size} is not a multiple of the patch size "
                         f"{'x'.join(map(str, hook_manager.patch_size))} of {hook_manager.name}")
    if loaded.synthetic:
        print("SYNTHETIC DEMO: a small random OpenCLIP ViT with planted register neurons. No weights were "
              "downloaded; the exported file is this toy model.")
    neurons = _neurons(args, loaded)
    edit = (LegacyEdit if args.edit == "legacy" else PaperEdit)(args.replace, seed=args.seed)
    modified = ModifiedModel(model, hook_manager, neurons, num_registers=args.num_registers, edit=edit, seed=args.seed)
    pixels, described = _check_images(args, folder, loaded)
    example = pixels[torch.arange(args.batch_size) % len(pixels)]
    print(f"model: {hook_manager.name} ({hook_manager.num_layers} blocks, {args.precision}); checking on {described}")

    with new_outputs(args.out):
        report = export_image_model(modified, args.out, format=args.format, example=example, check_images=pixels,
                                    tolerance=args.tolerance)
    for line in report.lines():
        print(line)
    return 0


def _neurons(args: argparse.Namespace, loaded) -> RegisterNeurons:
    if args.neurons:
        neurons = checked_neurons(args.neurons, loaded.hook_manager, args.force)
        print(f"register neurons: {len(neurons)} from {args.neurons}")
        return neurons
    if not loaded.planted:
        raise UsageError(f"--neurons is required for {args.model}: find them with find-register-neurons, or name a "
                         "preset:NAME or hf-hub: neuron file")
    neurons = RegisterNeurons.coerce(loaded.planted)
    print(f"register neurons: the demo's {len(neurons)} planted ones {neurons.pairs()}")
    return neurons


def _check_images(args: argparse.Namespace, folder: ImageFolder | None, loaded) -> tuple[torch.Tensor, str]:
    """The check images, preprocessed (and resized to --image-size), on the model's device; and what they are."""
    hook_manager = loaded.hook_manager
    if folder is None:
        images, described = demo_images(args.num_images, seed=args.seed, size=SCENE_SIZE), \
            f"{args.num_images} generated scenes"
    else:
        images = folder.readable_sample(args.num_images)
        described = f"{len(images)} images from {args.images}"
    found = [batch.pixel_values for batch in batches(images, loaded.preprocess, args.num_images, hook_manager.device,
                                                      hook_manager.input_dtype) if batch.names]
    pixels = torch.cat(found)
    if args.image_size is not None and tuple(pixels.shape[-2:]) != (args.image_size, args.image_size):
        pixels = torch.nn.functional.interpolate(pixels.float(), size=(args.image_size, args.image_size),
                                                 mode="bicubic", align_corners=False,
                                                 antialias=True).to(hook_manager.input_dtype)
    return pixels, described


def main(argv=None) -> int:
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
