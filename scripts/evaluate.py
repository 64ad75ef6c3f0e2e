#!/usr/bin/env python
"""Compare a ViT with and without test-time registers (and a model with trained registers) in one table.

Rows: outlier statistics, CLS attention (entropy, share on the objects), LOST object discovery
(CorLoc) where boxes are known, linear probes on CLS / mean-patch / register features where
classes are known, and zero-shot accuracy for CLIP models with a text tower.

With no arguments it runs offline on the SYNTHETIC demo: its planted model, neurons found on
64 generated scenes, and 64 other scenes whose objects' boxes and shapes are known. Bad input
gives one line on stderr and exit code 2.

Installed as the console script ``test-time-registers-evaluate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from test_time_registers import (ImageSourceError, InvalidArgumentError, LegacyEdit, ModifiedModel, PaperEdit, find_register_neurons,
                                 load_trained_registers)
from test_time_registers.analysis.dense_probes import dense_probe
from test_time_registers.analysis.evaluation import (OUTLIER_RATIO, compare_variants, draw_object_discovery,
                                                     zero_shot_classifier)
from test_time_registers.analysis.figures import require_matplotlib
from test_time_registers.analysis.lost import LOST_FEATURES, LOST_PRESETS
from test_time_registers.analysis.typographic import draw_typographic_examples, typographic_attack, typographic_folder
from test_time_registers.analysis.zero_shot_segmentation import (draw_zero_shot_masks, imagenet_s_folder,
                                                                 zero_shot_segmentation)
from test_time_registers.data.dense import depth_folder, segmentation_folder
from test_time_registers.data.labelled import folder_images, scene_images, voc_images
from test_time_registers.data.sources import UnreadableImage
from test_time_registers.errors import first_line
from test_time_registers.files import write_atomically
from test_time_registers.intervention import NORMAL_VALUES, calibrate_attention_bias
from test_time_registers.registry import load_model

from test_time_registers.scripts.common import (Parser, UsageError, add_model_flags, check_device, check_output_paths,
                                                checked_neurons, int_list, new_outputs, non_negative_int,
                                                number_list, positive_int, ratio_above_one, run_main)

DEMO_IMAGES = 64
FIGURE_IMAGES = 4
CALIBRATION_IMAGES = 32
#: open_clip's zero-shot prompt templates, by --templates name (open_clip is imported when they are used).
TEMPLATES = {"simple": "SIMPLE_IMAGENET_TEMPLATES", "openai": "OPENAI_IMAGENET_TEMPLATES"}
EDITS = ("paper", "legacy", "attention-bias")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--neurons", help="register-neuron file, preset:NAME or hf-hub:ORG/REPO[/FILE] (default for the demo: found on "
                        f"{DEMO_IMAGES} generated scenes; required for other models)")
    parser.add_argument("--force", action="store_true", help="apply --neurons even if they were found on another model")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--images", type=Path, help="folder of images; one sub-folder per class gives labels for the "
                      "linear probe and zero-shot rows (default: the demo's generated scenes)")
    data.add_argument("--voc", type=Path, help="VOC-style folder (Annotations/*.xml, JPEGImages/): boxes for LOST "
                      "CorLoc and attention on objects")
    data.add_argument("--imagenet-s", type=Path, metavar="DIR",
                      help="ImageNet-S folder (validation/ and validation-segmentation/): zero-shot segmentation "
                           "from CLS attention instead of the table (pixel accuracy, mIoU, mAP)")
    data.add_argument("--segmentation", type=Path, metavar="DIR",
                      help="ADE20K-style (images/, annotations/) or VOC-style (JPEGImages/, SegmentationClass/) class "
                           "masks: a linear head on frozen patch features, mIoU and pixel accuracy over seeded splits")
    data.add_argument("--depth", type=Path, metavar="DIR",
                      help="NYU-style depth maps (images/, depth/*.png in mm or *.npy in m): a linear head on frozen "
                           "patch features, RMSE and AbsRel over seeded splits")
    data.add_argument("--typographic", type=Path, metavar="DIR",
                      help="images with a written wrong label (DIR/annotations.json names each image's class, the "
                           "written class and the text's box): the typographic attack's success rate, with the "
                           "register neurons and random ones moved onto the text")
    parser.add_argument("--reduce-zero-label", action="store_true",
                        help="with --segmentation: class 0 is 'other' and ignored, 1.. become 0.. (ADE20K)")
    parser.add_argument("--num-images", type=positive_int,
                        help=f"images to evaluate on (default: all; {DEMO_IMAGES} generated scenes for the demo)")
    parser.add_argument("--trained-model", help="a model with trained registers to add as a third column, e.g. "
                        "dinov2:facebook/dinov2-with-registers-large, or registers:DIR for registers fine-tuned by "
                        "test-time-registers-train on the same base model")
    parser.add_argument("--num-registers", type=non_negative_int, default=1, help="test-time registers to append")
    parser.add_argument("--edit", choices=EDITS, default="paper",
                        help="paper: move the maxima to the registers (Algorithm 2); legacy: the reference code's "
                             "edit; attention-bias: zero the neurons and attend to the register's mean key and value")
    parser.add_argument("--replace", choices=NORMAL_VALUES, default="zero",
                        help="what the register neurons become away from the registers (the replacement ablations)")
    parser.add_argument("--detect-layer", type=non_negative_int,
                        help="block whose patch norms give the outlier rows (default: the neuron file's)")
    parser.add_argument("--outlier-ratio", type=ratio_above_one, default=OUTLIER_RATIO,
                        help="an image has outliers when its largest patch norm is this many times its median")
    lost = parser.add_argument_group("LOST (object discovery; CorLoc where boxes are known)")
    lost.add_argument("--lost", choices=tuple(LOST_PRESETS), default="lost",
                      help="lost: the official algorithm (last block's keys, raw); paper-openclip / paper-dinov2: "
                           "Table 5 of Jiang et al. (values / keys, normalised, best of the last 4 layers and of a "
                           "bias in -1..0); the flags below change a preset")
    lost.add_argument("--lost-features", choices=LOST_FEATURES,
                      help="what LOST reads: the attention's keys, queries or values (heads concatenated), or the "
                           "block's output tokens")
    lost.add_argument("--lost-layers", type=int_list,
                      help="blocks to try, negative from the end; the best CorLoc is kept and named "
                           "(write --lost-layers=-4,-3,-2,-1)")
    lost.add_argument("--lost-normalize", action=argparse.BooleanOptionalAction,
                      help="L2-normalise each patch's features first")
    lost.add_argument("--lost-biases", type=number_list,
                      help="biases added to the affinity, the best kept: a comma list or START:STOP:STEP "
                           "(write --lost-biases=-1:0:0.1)")
    parser.add_argument("--templates", choices=tuple(TEMPLATES), default="simple",
                        help="open_clip's zero-shot prompt templates")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument("--json", type=Path, help="also write the table to this JSON file")
    parser.add_argument("--figure", type=Path, help="save a PNG of the CLS attention and LOST boxes on the first "
                        f"{FIGURE_IMAGES} images, per column")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_paths(json=args.json, figure=args.figure)
    if args.figure:
        require_matplotlib()
    if args.edit == "attention-bias" and args.num_registers != 1:
        raise UsageError("--edit attention-bias holds its key and value in one token: use --num-registers 1")
    protocol = _protocol(args)
    device = check_device(args.device)
    loaded = load_model(args.model, device=device, precision=args.precision, seed=args.seed)
    hook_manager = loaded.hook_manager
    if args.figure and protocol in ("table", "zero-shot-segmentation") and hook_manager.layout.num_cls == 0:
        raise UsageError(f"--figure draws CLS attention, and {hook_manager.name} has no CLS token")
    lost = _lost_settings(args, hook_manager.num_layers)
    dataset = _dataset(args, loaded, protocol)
    print(f"model: {hook_manager.name}; {dataset.description}")
    neurons = _neurons(args, loaded)
    detect_layer = args.detect_layer if args.detect_layer is not None else neurons.detect_layer
    if detect_layer is not None:
        hook_manager.check_layer(detect_layer, "--detect-layer")
    keep = FIGURE_IMAGES if args.figure else 0
    if protocol == "typographic":
        comparison = _typographic(args, loaded, neurons, dataset, device, keep)
        _report(args, hook_manager.name, dataset, comparison, lambda: draw_typographic_examples(comparison))
        return 0
    variants, models = _variants(args, loaded, neurons, dataset, device)
    if protocol in ("segmentation-probe", "depth-probe"):
        comparison = dense_probe(variants, dataset, task=dataset.task, seed=args.seed, batch_size=args.batch_size,
                                 progress=not args.quiet)
        draw = None
    elif protocol == "zero-shot-segmentation":
        comparison, results = zero_shot_segmentation(variants, dataset, batch_size=args.batch_size,
                                                     progress=not args.quiet, keep_maps=keep)
        draw = lambda: draw_zero_shot_masks(results)   # noqa: E731
    else:
        comparison = compare_variants(variants, dataset, detect_layer=detect_layer, outlier_ratio=args.outlier_ratio,
                                      zero_shot=_zero_shot(args, models, dataset, device), batch_size=args.batch_size,
                                      seed=args.seed, progress=not args.quiet, keep_maps=keep, lost=lost)
        draw = lambda: draw_object_discovery(comparison.results)   # noqa: E731
    _report(args, hook_manager.name, dataset, comparison, draw)
    return 0


def _report(args, model_name: str, dataset, comparison, draw) -> None:
    """Print the table; write --json and --figure as one unit (a failure or Ctrl-C leaves neither)."""
    print(f"\non {comparison.images} images ({dataset.description}):")
    print(comparison.format())
    with new_outputs(args.json, args.figure):
        if args.json:
            text = json.dumps({"model": model_name, **comparison.to_dict()}, indent=2) + "\n"
            write_atomically(args.json, lambda temporary: Path(temporary).write_text(text))
        if args.figure:
            figure = draw()
            write_atomically(args.figure, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    for path in (args.json, args.figure):
        if path:
            print(f"wrote {path}")


def _protocol(args) -> str:
    """Which evaluation the data flags ask for: the comparison table, or one of the paper's other protocols."""
    if args.imagenet_s:
        return "zero-shot-segmentation"
    if args.segmentation or args.depth:
        if args.figure:
            raise UsageError("--figure draws CLS attention, LOST boxes, zero-shot masks or typographic attacks; the "
                             "dense probes have no figure")
        return "segmentation-probe" if args.segmentation else "depth-probe"
    if args.reduce_zero_label:
        raise UsageError("--reduce-zero-label goes with --segmentation")
    if args.typographic:
        if args.trained_model:
            raise UsageError("--typographic compares the register neurons and random ones moved onto the text; "
                             "it takes no --trained-model")
        return "typographic"
    return "table"


def _typographic(args, loaded, neurons, dataset, device, keep: int):
    """The typographic attack: zero-shot CLIP with its register neurons, and random ones, moved onto the text."""
    if loaded.tokenizer is None or not hasattr(loaded.model, "encode_text"):
        raise UsageError(f"--typographic classifies with a text tower, and {args.model} has none (give an "
                         "openclip: model)")
    try:
        tokenizer = loaded.tokenizer()
    except Exception as error:   # noqa: BLE001 - e.g. a tokenizer that would need the hub
        raise UsageError(f"--typographic: the tokenizer could not be made ({first_line(error)})") from None
    return typographic_attack(loaded.model, loaded.hook_manager, loaded.preprocess, tokenizer, dataset, neurons,
                              templates=_templates(args.templates), device=device, seed=args.seed,
                              batch_size=args.batch_size, progress=not args.quiet, examples=keep)


def _variants(args, loaded, neurons, dataset, device) -> tuple[dict, dict]:
    """``{column: (hook manager, preprocess)}`` (the original, with test-time registers, with trained registers) and
    ``{column: loaded model}`` for the zero-shot classifiers."""
    model, preprocess, hook_manager = loaded
    if args.edit == "attention-bias":
        calibration = _calibration_images(dataset)
        edit = calibrate_attention_bias(hook_manager, neurons, calibration, preprocess, batch_size=args.batch_size)
        edit = dataclasses.replace(edit, normal_values=args.replace, seed=args.seed)
    else:
        edit = (LegacyEdit if args.edit == "legacy" else PaperEdit)(args.replace, seed=args.seed)
    registers = f"{args.num_registers} test-time register" + ("s" if args.num_registers != 1 else "")
    settings = [name for name in (args.edit if args.edit != "paper" else "",
                                  f"{args.replace} elsewhere" if args.replace != "zero" else "") if name]
    if settings:
        registers += f" ({', '.join(settings)})"
    modified = ModifiedModel(model, hook_manager, neurons, args.num_registers, edit=edit, seed=args.seed)
    variants = {"original": (hook_manager, preprocess), f"with {registers}": (modified.hook_manager, preprocess)}
    models = dict.fromkeys(variants, loaded)
    if args.trained_model:
        if args.trained_model.startswith("registers:"):   # registers fine-tuned by test-time-registers-train
            trained = load_trained_registers(args.trained_model.removeprefix("registers:"), device=device,
                                             precision=args.precision)
        else:
            trained = load_model(args.trained_model, device=device, precision=args.precision, seed=args.seed)
        variants["trained registers"] = (trained.hook_manager, trained.preprocess)
        models["trained registers"] = trained
    return variants, models


def _lost_settings(args, num_layers: int):
    """The --lost preset with the --lost-* flags given on top of it, its layers checked against the model."""
    overrides = {field: value for field, value in (("features", args.lost_features), ("layers", args.lost_layers),
                                                   ("normalize", args.lost_normalize), ("biases", args.lost_biases))
                 if value is not None}
    try:
        settings = dataclasses.replace(LOST_PRESETS[args.lost], **overrides)
    except InvalidArgumentError as error:
        raise UsageError(f"--lost: {error}") from None
    try:
        settings.resolved_layers(num_layers)
    except InvalidArgumentError as error:
        raise UsageError(f"--lost-layers: {error}") from None
    return settings


def _calibration_images(dataset) -> list:
    """The first readable images of ``dataset``, up to CALIBRATION_IMAGES (unreadable ones are skipped)."""
    images = []
    for item in dataset.items:
        if len(images) == CALIBRATION_IMAGES:
            break
        try:
            read = item.read()
        except UnreadableImage:
            continue
        images.append(read[0] if isinstance(read, tuple) else read)   # (image, mask) for segmentation sets
    if not images:
        raise UsageError(f"--edit attention-bias: no readable image to calibrate on in {dataset.description}")
    return images


def _dataset(args, loaded, protocol: str):
    if protocol == "zero-shot-segmentation":
        return imagenet_s_folder(args.imagenet_s, limit=args.num_images)
    if protocol == "typographic":
        return typographic_folder(args.typographic, limit=args.num_images)
    if protocol == "segmentation-probe":
        return segmentation_folder(args.segmentation, reduce_zero_label=args.reduce_zero_label, limit=args.num_images)
    if protocol == "depth-probe":
        return depth_folder(args.depth, limit=args.num_images)
    if args.voc:
        return voc_images(args.voc, limit=args.num_images)
    if args.images:
        dataset = folder_images(args.images)
        if args.num_images and args.num_images < len(dataset):
            dataset = dataset.subset(range(args.num_images), f"the first {args.num_images} of {dataset.description}")
        _check_readable(dataset)
        return dataset
    if loaded.generate_images is None:
        raise UsageError(f"a data flag (--images, --voc, --imagenet-s, --segmentation, --depth or --typographic DIR) "
                         f"is required for {args.model}; only the demo generates its own scenes")
    # Scenes with another seed than the ones discovery sees.
    return scene_images(args.num_images or DEMO_IMAGES, seed=args.seed + 1)


def _check_readable(dataset) -> None:
    """Fail before any work if no image of ``dataset`` decodes (reading stops at the first that does)."""
    for item in dataset.items:
        try:
            item.read()
            return
        except UnreadableImage:
            continue
    raise ImageSourceError(f"no readable image among the {len(dataset)} image file(s) of {dataset.description}")


def _neurons(args, loaded):
    hook_manager = loaded.hook_manager
    if args.neurons:
        neurons = checked_neurons(args.neurons, hook_manager, args.force)
        print(f"register neurons: {len(neurons)} from {args.neurons}")
        return neurons
    if loaded.generate_images is None:
        raise UsageError(f"--neurons FILE is required for {args.model}; find them with find-register-neurons")
    scenes = list(loaded.generate_images(DEMO_IMAGES, args.seed))
    neurons = find_register_neurons(hook_manager, scenes, loaded.preprocess, top_k=len(loaded.planted or ()) or 10,
                                    batch_size=args.batch_size, progress=not args.quiet)
    print(f"register neurons: {len(neurons)} found on {DEMO_IMAGES} generated scenes {neurons.pairs()}")
    return neurons


def _zero_shot(args, models: dict, dataset, device) -> dict:
    """A text classifier per column whose model has a text tower, when the images have classes."""
    if not dataset.has_labels:
        return {}
    classifiers, built = {}, {}
    for column, loaded in models.items():
        if loaded.tokenizer is None or not hasattr(loaded.model, "encode_text"):
            continue
        if id(loaded) not in built:
            try:
                tokenizer = loaded.tokenizer()
            except Exception as error:   # noqa: BLE001 - e.g. a tokenizer that would need the hub
                print(f"no zero-shot row for {column}: its tokenizer could not be made ({first_line(error)})")
                continue
            try:
                built[id(loaded)] = zero_shot_classifier(loaded.model, tokenizer, dataset.class_names,
                                                         _templates(args.templates), device)
            except InvalidArgumentError as error:
                print(f"no zero-shot row for {column}: {error}")
                continue
        classifiers[column] = built[id(loaded)]
    return classifiers


def _templates(name: str):
    from open_clip import zero_shot_metadata   # here, not at start-up: open_clip takes seconds to import

    return getattr(zero_shot_metadata, TEMPLATES[name])


#: Flags whose values may start with a minus sign (``--lost-layers -4,-1``), which argparse would take for a flag.
SIGNED_LIST_FLAGS = ("--lost-layers", "--lost-biases")


def _join_signed_lists(argv: list[str]) -> list[str]:
    """``--lost-layers -4,-1`` as ``--lost-layers=-4,-1``."""
    joined, index = [], 0
    while index < len(argv):
        value = argv[index + 1] if index + 1 < len(argv) else ""
        if argv[index] in SIGNED_LIST_FLAGS and value[:1] == "-" and value[1:2] in set("0123456789."):
            joined.append(f"{argv[index]}={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    return joined


def main(argv=None) -> int:
    return run_main(build_parser, run, _join_signed_lists(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
