#!/usr/bin/env python
"""Draw what a test-time register changes: patch norms, CLS and register attention, neuron scores.

Writes one PNG per figure and one PDF with all of them into --out. Without --neurons, discovery
runs first on the images (the demo: on its 64 generated scenes) with its default settings, and the
figures use what it found, neuron-score heatmap included. With no arguments it runs offline on the
SYNTHETIC demo model. Bad input gives one line on stderr and exit code 2, and no file is written.

With --prompt and a vision-language model (--model hf:DIR, e.g. a LLaVA), it also draws where the
answer looks: the language model's attention from the answer token(s) to the image, before and after,
beside the tower's patch norms at the block the language model reads (answer_attention.png).

Installed as the console script ``test-time-registers-visualize``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from test_time_registers import ImageFolder, NoOutliersError, TestTimeRegistersError, find_register_neurons
from test_time_registers.registry import load_model
from test_time_registers.analysis.figures import require_matplotlib
from test_time_registers.analysis.vlm_attention import (check_answer_attention, compare_answer_attention,
                                                          draw_views, load_processor)
from test_time_registers.analysis.visualize import Page, collect_views, draw_pages, save_pages
from test_time_registers.files import output_folder

from test_time_registers.scripts.common import (Parser, UsageError, add_model_flags, check_device, checked_neurons,
                                                non_negative_int, positive_int, run_main)

DEMO_IMAGES = 64
DEFAULT_OUT = Path("figures")
PDF_NAME = "all_figures.pdf"
ANSWER_PAGE = "answer_attention"
LAYER_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def layer_list(text: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``: comma-separated layers and inclusive ranges, sorted, no repeats."""
    compact = text.replace(" ", "")
    if not LAYER_LIST.match(compact):
        raise argparse.ArgumentTypeError(f"expected layers like 0-11 or 3,5,7, got {text!r}")
    layers: set[int] = set()
    for part in compact.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low > high:
            raise argparse.ArgumentTypeError(f"the range {part} runs backwards; write {high}-{low}")
        layers.update(range(low, high + 1))
    return sorted(layers)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--neurons", help="register neurons to apply: a neuron file (its candidate scores beside it "
                        "give the heatmap), preset:NAME or hf-hub:ORG/REPO[/FILE] (default: run discovery on the images first)")
    parser.add_argument("--force", action="store_true",
                        help="apply --neurons even if they were found on another model")
    parser.add_argument("--images", type=Path, help="folder of images, read recursively (default: the model's own "
                        "generated scenes; only the demo has them)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the PNGs and {PDF_NAME}; created if missing")
    parser.add_argument("--layers", type=layer_list,
                        help="layers of the patch-norm maps, e.g. 0-11 or 3,7,9-11 (default: all)")
    parser.add_argument("--num-images", type=positive_int, default=4,
                        help="images to draw; a seeded sample of a folder")
    parser.add_argument("--num-registers", type=non_negative_int, default=1, help="test-time registers to append")
    parser.add_argument("--attention-layer", type=non_negative_int,
                        help="layer of the per-token attention pages (default: the last)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    parser.add_argument("--prompt", metavar="TEXT", help="a vision-language model (hf:DIR) only: a question about each image; adds "
                        f"{ANSWER_PAGE}.png, the answer's attention to the image before and after. The image goes "
                        "where the processor's placeholder (<image>) is, else through its chat template, else first")
    parser.add_argument("--answer-tokens", type=positive_int, metavar="N",
                        help="with --prompt: answer tokens generated (greedily) and averaged over (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_out_folder(folder: Path) -> None:
    """Fail before any work if ``folder`` cannot be made or written; create nothing yet."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file; give a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {folder}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {folder}: cannot write in {existing}")


def run(args: argparse.Namespace) -> int:
    require_matplotlib()   # before any work: the figures are the point of the run
    if args.force and not args.neurons:
        raise UsageError("--force only applies to --neurons")
    if args.prompt is None and args.answer_tokens is not None:
        raise UsageError("--answer-tokens only applies to --prompt")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty; ask a question about the images")
    if args.prompt is not None and not args.model.startswith("hf:"):
        raise UsageError(f"--prompt needs a vision-language model given as hf:DIR or hf:ID (its processor is read "
                         f"from there), not {args.model}")
    check_out_folder(args.out)
    device = check_device(args.device)
    folder = ImageFolder(args.images) if args.images else None   # a missing or empty folder fails here

    loaded = load_model(args.model, device=device, precision=args.precision, seed=args.seed)
    hook_manager = loaded.hook_manager
    if folder is None and loaded.generate_images is None:
        raise UsageError(f"--images DIR is required for {args.model}; only the demo generates its own scenes")
    last = hook_manager.num_layers - 1
    outside = [layer for layer in args.layers or () if layer > last]
    if outside:
        named = ", ".join(map(str, outside)) if len(outside) <= 3 else f"{outside[0]} to {outside[-1]}"
        raise UsageError(f"--layers: {hook_manager.name} has layers 0..{last}, not {named}")
    if args.attention_layer is not None:
        hook_manager.check_layer(args.attention_layer, "attention_layer")
    processor = _processor(args, loaded) if args.prompt is not None else None

    if folder is None:
        scenes = list(loaded.generate_images(max(DEMO_IMAGES, args.num_images), args.seed))
        shown, discovery_images, described = scenes[:args.num_images], scenes[:DEMO_IMAGES], "generated scenes"
    else:
        shown = folder.readable_sample(args.num_images)   # images that decode: none turns unreadable halfway
        discovery_images, described = folder, f"images from {args.images}"
    if loaded.synthetic:
        print(f"SYNTHETIC DEMO: a small random OpenCLIP ViT with planted register neurons, on {described}. "
              "No weights were downloaded; the figures describe this toy model.")
    print(f"model: {hook_manager.name} ({hook_manager.num_layers} blocks, {args.precision}); {described}")

    neurons = _neurons(args, loaded, discovery_images)
    views = collect_views(hook_manager, shown, loaded.preprocess, neurons, num_images=args.num_images,
                          num_registers=args.num_registers, layers=args.layers, attention_layer=args.attention_layer,
                          batch_size=args.batch_size, seed=args.seed)
    skipped = max(getattr(source, "skipped", 0) for source in (discovery_images, shown))   # folders count them
    if skipped:
        print(f"skipped {skipped} unreadable or non-image file(s) in {args.images}")
    pages, notes = draw_pages(views, neurons)
    for note in notes:
        print(f"note: {note}")
    if processor is not None:
        pages.append(_answer_page(args, loaded, neurons, shown, processor))
    with output_folder(args.out):   # made only now; a failure or Ctrl-C removes it again if it is new
        paths = save_pages(pages, args.out, pdf_name=PDF_NAME)
    print(f"wrote {len(pages)} figures of {views.num_images} image(s) to {args.out}:")
    for path in paths[:-1]:
        print(f"  {path}")
    print(f"  {paths[-1]} (all {len(pages)} pages)")
    return 0


def _neurons(args: argparse.Namespace, loaded, discovery_images):
    """The neurons of --neurons, checked against the model, or those discovery finds."""
    hook_manager = loaded.hook_manager
    if args.neurons:
        neurons = checked_neurons(args.neurons, hook_manager, args.force)
        print(f"loaded {len(neurons)} register neurons from {args.neurons}")
        return neurons
    top_k = len(loaded.planted) if loaded.planted else 10
    try:
        neurons = find_register_neurons(hook_manager, discovery_images, loaded.preprocess, top_k=top_k,
                                        batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    except NoOutliersError as error:
        raise UsageError(f"{error} Run find-register-neurons with those settings, then pass its file with "
                         "--neurons") from None
    print(f"discovery found {len(neurons)} register neurons in {neurons.images_seen} images "
          f"({neurons.images_with_outliers} with outliers): threshold {neurons.threshold:.4g}, "
          f"detect layer {neurons.detect_layer}, highest layer {neurons.highest_layer}")
    return neurons


def _processor(args: argparse.Namespace, loaded):
    """The processor of --model hf:SOURCE, checked to fit a vision-language model the figure supports, before any
    work."""
    hook_manager = loaded.hook_manager
    if hook_manager.read_layers is None:
        raise UsageError(f"--prompt needs a vision-language model, and no language model reads {hook_manager.name}")
    source = args.model.removeprefix("hf:")
    try:
        processor = load_processor(source)
        check_answer_attention(loaded.model, processor, args.prompt)
    except TestTimeRegistersError as error:
        raise UsageError(f"--prompt: {error}") from None
    return processor


def _answer_page(args: argparse.Namespace, loaded, neurons, shown, processor) -> Page:
    """The answer-attention figure of the images shown, with its numbers printed per image."""
    answer_tokens = args.answer_tokens or 1
    views = compare_answer_attention(loaded, neurons, shown, args.prompt, processor, num_images=args.num_images,
                                     num_registers=args.num_registers, max_new_tokens=answer_tokens,
                                     batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    print(f"answer attention ({answer_tokens} answer token(s), mean over the language model's layers and "
          f"heads), patch norms at block {views.read_layer}; before -> after:")
    for index, (name, numbers) in enumerate(zip(views.names, views.numbers())):
        print(f"  image {index} ({name}): answer {views.answers['before'][index]!r} -> "
              f"{views.answers['after'][index]!r}; on the top-{numbers.top_k} norm patches "
              f"{_change(numbers.top_norm_mass, '.1%')}, on image tokens {_change(numbers.on_image, '.1%')}, entropy "
              f"{_change(numbers.entropy, '.3f')} of max, norms largest/median "
              f"{_change(numbers.max_over_median, '.3g')}")
    return Page(ANSWER_PAGE, ANSWER_PAGE, draw_views(views))


def _change(values: dict[str, float], form: str) -> str:
    return f"{values['before']:{form}} -> {values['after']:{form}}"


def main(argv=None) -> int:
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
