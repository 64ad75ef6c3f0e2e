#!/usr/bin/env python
"""The CPU experiment of issue 11: a small ViT trained from scratch on generated scenes, with 0 and with K registers.

Each run trains a timm VisionTransformer (VitRGTS's hyper-parameters through --vit) to tell
the shape of the largest object in a generated scene (4 classes), then reports its held-out
accuracy and, at every block, how far the largest patch norm stands above the median one
(high-norm outlier tokens), the registers' norms, and the CLS token's attention on the
registers. Both runs see the same images in the same order and take the same number of steps:
--minutes sets the epochs from a timed step (or give --epochs). Results go to OUT/results.json
and each model to OUT/registers-K/ (loadable with load_trained_registers).

    nice python experiments/registers_from_scratch.py --out runs/from-scratch

It is an experiment, run from a checkout, not part of the installed package: its defaults are the
README's runs, and it is built from the library's parts (``from_scratch_setup``, ``train``,
``norm_statistics``, ``find_register_neurons``). Bad input gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from test_time_registers.data.labelled import SCENE_TASKS, scene_images
from test_time_registers.discovery import find_register_neurons
from test_time_registers.errors import NoOutliersError
from test_time_registers.training.registers import save_trained_registers
from test_time_registers.training.train import TrainingOptions, accuracy, from_scratch_setup, norm_statistics, train

from test_time_registers.scripts.common import Parser, check_device, non_negative_int, positive_int, run_main
from test_time_registers.scripts.train_registers import positive_float, vit_config

TIMM_NAME = "vit_small_patch16_224"
DEFAULT_VIT = "image_size=64,patch_size=8,dim=128,depth=6,heads=4,mlp_dim=512"
TIMED_STEPS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    parser.add_argument("--registers", type=non_negative_int, nargs="+", default=[0, 4],
                        help="the register counts to compare, one run each")
    parser.add_argument("--vit", type=vit_config, default=vit_config(DEFAULT_VIT),
                        help=f"VitRGTS hyper-parameters KEY=VALUE,... (default: {DEFAULT_VIT})")
    parser.add_argument("--train-images", type=positive_int, default=8000, help="generated training scenes")
    parser.add_argument("--test-images", type=positive_int, default=500, help="held-out scenes (another seed)")
    parser.add_argument("--minutes", type=positive_float, default=13.0,
                        help="training time per run, from which the epochs are set by timing a few steps")
    parser.add_argument("--epochs", type=positive_int, help="epochs per run (instead of --minutes)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per step")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW's peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's weight decay")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (the CPU may be shared)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the scenes and their order")
    parser.add_argument("--out", type=Path, default=Path("registers_from_scratch"), help="folder for the results")
    parser.add_argument("--task", choices=SCENE_TASKS, default="shape",
                        help="what the model learns: the largest object's texture (5 classes) or shape (4 classes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def timed_epochs(args, train_images, size: int) -> int:
    """The epochs that fit --minutes, from the time of a few steps of the largest model."""
    loaded, setup = from_scratch_setup(TIMM_NAME, args.vit, num_registers=max(args.registers),
                                       num_classes=train_images.num_classes,
                                       device=args.device, seed=args.seed)
    pixels = torch.stack([train_images.with_preprocess(loaded.preprocess)[index][0]
                          for index in range(args.batch_size)])
    labels = torch.tensor(train_images.labels[:args.batch_size], device=args.device)
    optimizer = torch.optim.AdamW(setup.registered.parameters(), lr=1e-4)
    setup.registered.train()
    started = None
    for step in range(TIMED_STEPS + 1):
        if step == 1:
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(setup.registered.classify(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_step = (time.perf_counter() - started) / TIMED_STEPS
    steps_per_epoch = -(-len(train_images) // args.batch_size)
    epochs = max(1, int(args.minutes * 60 / (per_step * steps_per_epoch)))
    print(f"{per_step:.2f} s per step of {args.batch_size} at {size} px: {epochs} epoch(s) of {steps_per_epoch} steps "
          f"fit {args.minutes:g} minutes")
    return epochs


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    size = args.vit.get("image_size", 224)
    train_images = scene_images(args.train_images, seed=args.seed, size=size, task=args.task)
    test_images = scene_images(args.test_images, seed=args.seed + 1000, size=size, task=args.task)
    epochs = args.epochs or timed_epochs(args, train_images, size)
    results = {"task": args.task, "vit": args.vit, "timm_model": TIMM_NAME, "train_images": args.train_images,
               "test_images": args.test_images, "epochs": epochs, "batch_size": args.batch_size, "lr": args.lr,
               "weight_decay": args.weight_decay, "seed": args.seed, "runs": {}}
    for registers in args.registers:
        print(f"\n== {registers} register(s) ==")
        loaded, setup = from_scratch_setup(TIMM_NAME, args.vit, num_registers=registers,
                                           num_classes=train_images.num_classes,
                                           device=device, seed=args.seed)
        training = train_images.with_preprocess(loaded.preprocess)
        held_out = test_images.with_preprocess(loaded.preprocess)
        options = TrainingOptions(epochs=epochs, lr=args.lr, batch_size=args.batch_size,
                                  weight_decay=args.weight_decay, seed=args.seed, progress=not args.quiet)

        def report(epoch, loss, train_accuracy):
            print(f"epoch {epoch}/{epochs}: loss {loss:.4f}, training accuracy {100 * train_accuracy:.1f}%", flush=True)

        history = train(setup, training, options, on_epoch=report)
        registered = setup.registered
        view = registered.hook_manager
        run_result = {
            "minutes": round(history.seconds / 60, 2),
            "epoch_losses": [round(loss, 4) for loss in history.epoch_losses],
            "epoch_train_accuracy": [round(value, 4) for value in history.epoch_accuracy],
            "test_accuracy": round(accuracy(registered, held_out), 4),
            "train_accuracy_eval_mode": round(accuracy(registered, training.subset(range(args.test_images))), 4),
            "norms": {key: [round(value, 3) for value in values] if values is not None else None
                      for key, values in norm_statistics(view, held_out).items()},
        }
        try:
            batches = DataLoader(held_out, batch_size=args.batch_size)   # (pixels, labels): preprocessed batches
            neurons = find_register_neurons(view, batches, progress=False)
            run_result["discovery"] = {"neurons": neurons.pairs(), "threshold": neurons.threshold,
                                       "images_with_outliers": neurons.images_with_outliers}
        except NoOutliersError as error:
            run_result["discovery"] = {"no_outliers": str(error)}
        save_trained_registers(args.out / f"registers-{registers}", registered, base_model=setup.base_model,
                               parameters=setup.plan.trainable, seed=args.seed, from_scratch=setup.from_scratch,
                               extra={"history": {"epoch_losses": history.epoch_losses}})
        results["runs"][str(registers)] = run_result
        print(f"{registers} register(s): held-out accuracy {100 * run_result['test_accuracy']:.1f}% after "
              f"{run_result['minutes']:.1f} min")
        print_norms(run_result["norms"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


def print_norms(norms: dict) -> None:
    print(f"  {'block':>5}  {'max/median patch':>16}  {'worst image':>11}  {'register/median':>15}  "
          f"{'CLS attn on regs':>16}")
    for layer, ratio in enumerate(norms["patch_max_over_median"]):
        register = norms["register_over_median"][layer] if norms["register_over_median"] else None
        attention = norms["cls_attention_on_registers"][layer] if norms["cls_attention_on_registers"] else None
        print(f"  {layer:>5}  {ratio:>15.2f}x  {norms['worst_patch_max_over_median'][layer]:>10.2f}x  "
              f"{'-' if register is None else f'{register:.2f}x':>15}  {'-' if attention is None else f'{attention:.3f}':>16}")


def main(argv=None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
