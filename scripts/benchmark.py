#!/usr/bin/env python
"""Speed (and, on CUDA, peak memory) of discovery and of the test-time register, measured side by side.

Every figure is a ratio to a plain batched forward pass over the same images, preprocessing
included, timed in the same process and interleaved with it. The headline ratio uses each
method's fastest run, the usual estimate of its cost on a shared, noisy machine; the ratio of
medians, and of the least process CPU time (which leaves out time stolen by neighbours on a
shared machine), are printed beside it. Targets: discovery / forward <= 1.1, and the forward
pass with test-time registers / forward <= 1.03 (on OpenCLIP ViT-B/16 with 80 neurons over 8
layers: ``--model openclip:ViT-B-16:random --neurons random:80x8 --threshold 1``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from test_time_registers import ModifiedModel, RegisterNeurons, find_register_neurons
from test_time_registers.data import batches
from test_time_registers.images import ImageFolder, take
from test_time_registers.registry import load_model, load_neurons
from test_time_registers.scripts.common import (Parser, UsageError, add_model_flags, check_device, positive_int,
                                                run_main, threshold_value)


DISCOVERY_TARGET = 1.1
REGISTER_TARGET = 1.03


def plain_forward(runner, images, preprocess, batch_size, hook_manager) -> None:
    with torch.no_grad():
        for batch in batches(images, preprocess, batch_size, hook_manager.device, hook_manager.input_dtype):
            if not batch.names:   # every image of it was unreadable
                continue
            runner.forward_images(batch.pixel_values)


def timed(fn, device: torch.device) -> tuple[float, int]:
    """Seconds, and peak CUDA bytes above what was allocated before (0 elsewhere), of one call."""
    baseline = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)   # the weights: not part of the run's cost
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else 0
    return time.perf_counter() - start, peak


def random_neurons(hook_manager, spec: str, seed: int) -> RegisterNeurons:
    """``random:KxL``: K distinct neurons drawn with ``seed``, spread evenly over layers 0..L-1."""
    count, _, layers = spec.removeprefix("random:").partition("x")
    if not (count.isdigit() and layers.isdigit() and int(count) >= 1 and 1 <= int(layers) <= hook_manager.num_layers):
        raise UsageError(f"--neurons {spec}: expected random:KxL with K >= 1 and L in 1..{hook_manager.num_layers}")
    generator = torch.Generator().manual_seed(seed)
    count, layers = int(count), int(layers)
    pairs = []
    for layer in range(layers):
        share = count // layers + (layer < count % layers)
        chosen = torch.randperm(hook_manager.num_neurons(layer), generator=generator)[:share]
        pairs += [(layer, int(neuron)) for neuron in chosen]
    return RegisterNeurons.coerce(pairs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--images", type=Path, help="image folder (default: the model's generated scenes; "
                        "only the demo has them)")
    parser.add_argument("--num-images", type=positive_int, default=64, help="images per timed run")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument("--repeats", type=positive_int, default=7, help="interleaved runs of each method")
    parser.add_argument("--top-k", type=positive_int, default=10, help="neurons to find (the demo: its planted count)")
    parser.add_argument("--threshold", type=threshold_value, default="auto",
                        help="discovery's outlier threshold; give one for a model whose outliers the automatic "
                             "threshold misses")
    parser.add_argument("--neurons", help="neuron file, preset:NAME, or random:KxL (K random neurons spread over "
                        "layers 0..L-1) for the test-time register run, instead of the neurons the warm-up discovery "
                        "finds")
    return parser


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    loaded = load_model(args.model, device=device, precision=args.precision, seed=args.seed)
    model, preprocess, hook_manager = loaded
    if args.images:
        images = take(ImageFolder(args.images, limit=args.num_images, seed=args.seed), args.num_images)
    elif loaded.generate_images is not None:
        images = loaded.generate_images(args.num_images, args.seed)
    else:
        raise UsageError(f"--images DIR is required for {args.model}; only the demo generates its own scenes")
    top_k = len(loaded.planted) if loaded.planted else args.top_k
    device = hook_manager.device

    def discover():
        return find_register_neurons(hook_manager, images, preprocess, top_k=top_k, threshold=args.threshold,
                                     batch_size=args.batch_size, seed=args.seed, progress=False)

    found = discover()  # warm-up, and the neurons for the modified model
    neurons = found
    if args.neurons and args.neurons.startswith("random:"):
        neurons = random_neurons(hook_manager, args.neurons, args.seed)
    elif args.neurons:
        neurons = load_neurons(args.neurons, hook_manager)
    modified = ModifiedModel(model, hook_manager, neurons, num_registers=1)
    runs = {
        "plain forward": lambda: plain_forward(hook_manager, images, preprocess, args.batch_size, hook_manager),
        "discovery": discover,
        "forward with test-time register": lambda: plain_forward(modified, images, preprocess, args.batch_size,
                                                                 hook_manager),
    }
    for run in runs.values():
        run()  # warm-up
    seconds = {name: [] for name in runs}
    cpu_seconds = {name: [] for name in runs}
    peaks = {name: 0 for name in runs}
    order = list(runs)
    shuffler = random.Random(0)
    for _ in range(args.repeats):
        shuffler.shuffle(order)   # no method always runs right after another
        for name in order:
            cpu_start = time.process_time()
            elapsed, peak = timed(runs[name], device)
            seconds[name].append(elapsed)
            cpu_seconds[name].append(time.process_time() - cpu_start)
            peaks[name] = max(peaks[name], peak)

    fastest_base = min(seconds["plain forward"])
    median_base = statistics.median(seconds["plain forward"])
    print(f"model {hook_manager.name} on {device} ({args.precision}), {len(images)} images, "
          f"batch {args.batch_size}, {args.repeats} interleaved runs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    cpu_base = min(cpu_seconds["plain forward"])
    print(f"  {'':<34} {'fastest s':>9} {'ratio':>7} {'median s':>9} {'ratio':>7} {'CPU s':>7} {'ratio':>7}")
    for name in runs:
        fastest, median, cpu = min(seconds[name]), statistics.median(seconds[name]), min(cpu_seconds[name])
        print(f"  {name:<34} {fastest:>9.3f} {fastest / fastest_base:>7.3f} {median:>9.3f} {median / median_base:>7.3f}"
              f" {cpu:>7.3f} {cpu / cpu_base:>7.3f}")
    if device.type == "cuda":
        print(f"  peak memory: discovery / plain forward = {peaks['discovery'] / peaks['plain forward']:.3f}; "
              f"with register / plain = {peaks['forward with test-time register'] / peaks['plain forward']:.3f}")
    for name, target in (("discovery", DISCOVERY_TARGET), ("forward with test-time register", REGISTER_TARGET)):
        ratio = min(seconds[name]) / fastest_base
        print(f"{name} / plain forward = {ratio:.3f} (fastest runs; target <= {target}): "
              f"{'met' if ratio <= target else 'NOT met'}")
    return 0


def main(argv=None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
