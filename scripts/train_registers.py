#!/usr/bin/env python
"""Train registers: fine-tune a pretrained ViT with K added registers, or train a ViT with registers from scratch.

Fine-tuning freezes the embedding and the first --freeze-layers blocks and trains the rest, the
new registers and the head, by classification (the model's own timm head, or a new linear
head) or, for models without labels (CLIP, DINOv2), by --objective distill: self-distillation
to the original model's patch tokens and pooled output. --from-scratch trains a timm
VisionTransformer(reg_tokens=K) from random weights (--vit sets VitRGTS's hyper-parameters).

Data: --images DIR (one sub-folder per class), --cifar10/--cifar100 DIR (torchvision's format,
never downloaded), or by default generated scenes labelled by the shape of their largest object.

Only what changed is saved: OUT/registers.safetensors and OUT/registers.json (the base model,
the options, the parameter names, the loss curve). Load it back with
test_time_registers.load_trained_registers(OUT); compare it with test-time registers with
test-time-registers-evaluate --model BASE --trained-model registers:OUT.
Under torchrun, each rank trains on its shard and rank 0 saves. Bad input gives one line on
stderr and exit code 2.

Installed as the console script ``test-time-registers-train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from test_time_registers.analysis.evaluation import input_size
from test_time_registers.data.labelled import cifar_images, folder_images, scene_images
from test_time_registers.distributed import device_for_rank, process_group
from test_time_registers.files import output_folder
from test_time_registers.registry import load_model
from test_time_registers.training.registers import METADATA_FILE, WEIGHTS_FILE, save_trained_registers
from test_time_registers.training.train import (OBJECTIVES, VITRGTS_TO_TIMM, TrainingOptions, fine_tuning_setup,
                                                from_scratch_setup, parameter_digest, train)

from test_time_registers.scripts.common import (Parser, UsageError, add_model_flags, check_device, check_output_paths,
                                                finite_float, non_negative_float, non_negative_int, positive_float,
                                                positive_int, run_main)

DEFAULT_SCENES = 256
DEFAULT_OUT = Path("trained_registers")
SCRATCH_MODEL = "timm:vit_small_patch16_224"
#: Precisions training runs in: float32 weights, optionally under bfloat16 autocast.
TRAINING_PRECISIONS = ("fp32", "amp_bf16")   # training keeps float32 weights


def vit_config(text: str) -> dict:
    """``image_size=64,patch_size=8,dim=192,...`` -> a dict of VitRGTS hyper-parameters."""
    config = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or key not in VITRGTS_TO_TIMM:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {', '.join(VITRGTS_TO_TIMM)}, "
                                             f"got {item!r}")
        if key in ("dropout", "emb_dropout"):
            config[key] = finite_float(value, at_least=0, below=1, kind=f"{key} as a rate in [0, 1)")
            continue
        try:
            config[key] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key} needs a number, got {value!r}") from None
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    add_model_flags(parser, TRAINING_PRECISIONS)
    parser.set_defaults(model=None)
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--images", type=Path, help="folder of images with one sub-folder per class (default: generated "
                      "scenes labelled by their largest shape)")
    data.add_argument("--cifar10", type=Path, help="folder holding torchvision's cifar-10-batches-py/ (not downloaded)")
    data.add_argument("--cifar100", type=Path, help="folder holding torchvision's cifar-100-python/ (not downloaded)")
    parser.add_argument("--num-images", type=positive_int,
                        help=f"images to train on: generated scenes (default {DEFAULT_SCENES}), or a seeded sample of "
                             "the folder or CIFAR training set (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for registers.safetensors and registers.json")
    parser.add_argument("--num-registers", type=non_negative_int, default=4, help="registers to add (K)")
    parser.add_argument("--insert-at", type=non_negative_int, default=0,
                        help="block at whose input the registers go in (0: where test-time registers go in)")
    parser.add_argument("--cls-pos", type=non_negative_int,
                        help="timm ViTs: the block at whose input CLS goes in (default: at the start, as usual)")
    parser.add_argument("--freeze-layers", type=non_negative_int, default=0,
                        help="freeze the patch embedding (the whole embedding) and the first N blocks")
    parser.add_argument("--l2-weight", type=non_negative_float, default=0.0,
                        help="L2 penalty pulling the trained pretrained weights towards their starting values")
    parser.add_argument("--objective", choices=OBJECTIVES, default="classify",
                        help="classify: cross-entropy on the image classes; distill: match the original model's "
                             "patch tokens and pooled output (no labels needed)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="passes over the images")
    parser.add_argument("--lr", type=positive_float, help="peak learning rate of AdamW, after a 5%% warm-up, with a "
                        "cosine decay (default: 1e-4, or 1e-3 with --from-scratch)")
    parser.add_argument("--weight-decay", type=non_negative_float,
                        help="AdamW's weight decay (default: 0, or 0.05 with --from-scratch)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step on each rank")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="DataLoader processes that decode and preprocess images")
    parser.add_argument("--from-scratch", action="store_true",
                        help=f"train a timm VisionTransformer(reg_tokens=K) from random weights (--model names the timm "
                             f"architecture; default {SCRATCH_MODEL})")
    parser.add_argument("--vit", type=vit_config, default={},
                        help="with --from-scratch: VitRGTS hyper-parameters as KEY=VALUE,... with KEY in "
                             f"{', '.join(VITRGTS_TO_TIMM)}, e.g. image_size=64,patch_size=8,dim=192,depth=6,heads=3,"
                             "mlp_dim=768")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    if args.from_scratch:
        import timm   # here, not at start-up: timm takes seconds to import

        given = [flag for flag, value in (("--freeze-layers", args.freeze_layers), ("--l2-weight", args.l2_weight))
                 if value]
        if given:
            raise UsageError(f"--from-scratch trains every weight from random values, so {' and '.join(given)} "
                             "would mean nothing; drop them")
        if args.objective == "distill":
            raise UsageError("--from-scratch has no original model to distill from; use --objective classify")
        prefix, _, reference = (args.model or SCRATCH_MODEL).partition(":")
        name, _, weights = reference.partition(":")
        if prefix not in ("timm", "deit") or not name:
            raise UsageError(f"--from-scratch builds a timm VisionTransformer, but --model {args.model} is not a timm "
                             "model; give --model timm:NAME (e.g. timm:vit_small_patch16_224)")
        if weights not in ("", "random"):
            raise UsageError(f"--from-scratch starts from random weights; give --model {prefix}:{name} without "
                             "a checkpoint")
        if not timm.is_model(name):
            raise UsageError(f"--model {args.model}: unknown timm model {name!r}; see timm.list_models()")
    elif args.vit:
        raise UsageError("--vit sets the architecture of a model trained --from-scratch; add --from-scratch")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")
    check_output_paths(out=args.out / WEIGHTS_FILE)


def load_data(args: argparse.Namespace, size: int):
    """The training images, not yet preprocessed; generated scenes are made ``size`` pixels wide."""
    if args.images:
        return folder_images(args.images, limit=args.num_images, seed=args.seed)
    if args.cifar10 or args.cifar100:
        return cifar_images(args.cifar10 or args.cifar100, 10 if args.cifar10 else 100, limit=args.num_images)
    return scene_images(args.num_images or DEFAULT_SCENES, seed=args.seed, size=size)


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    device = check_device(device_for_rank(args.device))
    with process_group(device) as shard:
        return train_and_save(args, device, shard)


def train_and_save(args: argparse.Namespace, device: str, shard) -> int:
    torch.manual_seed(args.seed)
    say = print if shard.rank == 0 else (lambda *_args, **_kwargs: None)
    options = TrainingOptions(objective=args.objective, epochs=args.epochs,
                              lr=args.lr or (1e-3 if args.from_scratch else 1e-4),
                              batch_size=args.batch_size, workers=args.workers, l2_weight=args.l2_weight,
                              weight_decay=args.weight_decay if args.weight_decay is not None
                              else (0.05 if args.from_scratch else 0.0), seed=args.seed, progress=not args.quiet)
    if args.from_scratch:
        import timm

        timm_name = (args.model or SCRATCH_MODEL).split(":")[1]
        size = args.vit.get("image_size") or timm.models.get_pretrained_cfg(timm_name).input_size[-1]
        data = load_data(args, size)   # the classes set the head, so the images come first
        loaded, setup = from_scratch_setup(timm_name, args.vit, num_registers=args.num_registers,
                                           num_classes=data.num_classes, insert_at=args.insert_at,
                                           cls_pos=args.cls_pos, device=device, seed=args.seed)
        data = data.with_preprocess(loaded.preprocess)
    else:
        loaded = load_model(args.model or "demo", device=device, precision=args.precision, seed=args.seed)
        data = load_data(args, input_size(loaded.preprocess)[0]).with_preprocess(loaded.preprocess)
        probe = torch.stack([data[index][0] for index in range(min(2, len(data)))])
        setup = fine_tuning_setup(loaded, probe, num_registers=args.num_registers, insert_at=args.insert_at,
                                  cls_pos=args.cls_pos, freeze_layers=args.freeze_layers, objective=args.objective,
                                  num_classes=data.num_classes if args.objective == "classify" else 0, seed=args.seed)
    registered, plan = setup.registered, setup.plan
    hook_manager = registered.base_hook_manager
    trained = sum(parameter.numel() for name, parameter in registered.named_parameters() if name in set(plan.trainable))
    total = sum(parameter.numel() for parameter in registered.parameters())
    say(f"model: {setup.base_model} ({hook_manager.num_layers} blocks); {data.description}")
    say(f"training {trained:,} of {total:,} parameters ({len(plan.trainable)} tensors): {args.num_registers} "
        f"register(s) in at block {args.insert_at}, {args.objective}, {options.epochs} epoch(s), lr {options.lr:g}"
        + (f", {shard.world} ranks" if shard.world > 1 else ""))

    def report(epoch: int, loss: float, accuracy: float | None) -> None:
        shown = f", training accuracy {100 * accuracy:.1f}%" if accuracy is not None else ""
        say(f"epoch {epoch}/{options.epochs}: loss {loss:.4f}{shown}")

    history = train(setup, data, options, on_epoch=report)
    if shard.world > 1:   # every rank says what it ended with: they must agree
        print(f"rank {shard.rank}: trained parameters sha256 {parameter_digest(registered, plan.trainable)}",
              flush=True)   # now: the ranks share one stdout, and a rank's exit must not lose its line
    if shard.rank != 0:
        return 0
    options_json = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    extra = {"options": options_json, "data": data.description, "world_size": shard.world,
             "history": {"epoch_losses": history.epoch_losses, "epoch_accuracy": history.epoch_accuracy,
                         "seconds": round(history.seconds, 2)}}
    with output_folder(args.out):   # made only now; a failed save removes it again if it is new
        weights = save_trained_registers(args.out, registered, base_model=setup.base_model,
                                         parameters=plan.trainable, seed=args.seed, head_classes=setup.head_classes,
                                         from_scratch=setup.from_scratch, extra=extra)
    say(f"wrote {weights}")
    say(f"wrote {args.out / METADATA_FILE}")
    say(f"load it with test_time_registers.load_trained_registers({str(args.out)!r}); compare it with "
        f"test-time-registers-evaluate --model {setup.base_model} --trained-model registers:{args.out}")
    return 0


def main(argv=None) -> int:
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
