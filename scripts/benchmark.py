#!/usr/bin/env python
"""Speed (and, on CUDA, peak memory) of discovery and of the test-time register, measured side by side.

Every figure is a ratio to a plain batched forward pass over the same images, preprocessing
included, timed in the same process and interleaved with it. The headline ratio uses each
method's fastest run, the usual estimate of its cost on a shared, noisy machine; the ratio of
medians, and of the least process CPU time (which leaves out time stolen by neighbours on a
shared machine), are printed beside it. Target: discovery / forward <= 1.1.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_specs import FORMS, PRECISIONS, load_model  # noqa: E402

import torch  # noqa: E402

from test_time_registers import ModifiedModel, find_register_neurons  # noqa: E402
from test_time_registers.images import batches, take  # noqa: E402


def plain_forward(runner, images, preprocess, batch_size, hook_manager) -> None:
    with torch.no_grad():
        for batch in batches(images, preprocess, batch_size, hook_manager.device, hook_manager.input_dtype):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help=FORMS)
    parser.add_argument("--images", type=Path, help="image folder (default: demo scenes)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    args = parser.parse_args(argv)

    resolved = load_model(args.model, device=args.device, precision=args.precision)
    model, preprocess, hook_manager = resolved.loaded
    if args.images:
        images = take(args.images, args.num_images)
    else:
        from test_time_registers.clip.demo import demo_images
        images = demo_images(args.num_images)
    top_k = len(resolved.planted) if resolved.planted else args.top_k
    device = hook_manager.device

    def discover():
        return find_register_neurons(hook_manager, images, preprocess, top_k=top_k,
                                     batch_size=args.batch_size, progress=False)

    neurons = discover()  # warm-up, and the neurons for the modified model
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
    ratio = min(seconds["discovery"]) / fastest_base
    print(f"discovery / plain forward = {ratio:.3f} (fastest runs; target <= 1.1): "
          f"{'met' if ratio <= 1.1 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
