#!/usr/bin/env python
"""Speed (and, on CUDA, peak memory) of discovery and of the test-time register, measured side by side.

Every figure is a ratio to a plain batched forward pass over the same images, preprocessing
included, timed in the same process and interleaved with it, so machine noise mostly cancels.
Target: discovery / forward <= 1.1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_specs import FORMS, PRECISIONS, load_model  # noqa: E402

import torch  # noqa: E402

from shared import ModifiedModel, find_register_neurons  # noqa: E402
from shared.images import batches, take  # noqa: E402


def plain_forward(runner, images, preprocess, batch_size, hook_manager) -> None:
    with torch.no_grad():
        for batch in batches(images, preprocess, batch_size, hook_manager.device, hook_manager.dtype):
            runner.forward_images(batch.pixel_values)


def timed(fn, device: torch.device) -> tuple[float, int]:
    """Seconds and peak CUDA bytes (0 elsewhere) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return time.perf_counter() - start, peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help=FORMS)
    parser.add_argument("--images", type=Path, help="image folder (default: demo scenes)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    args = parser.parse_args(argv)

    resolved = load_model(args.model, device=args.device, precision=args.precision)
    model, preprocess, hook_manager = resolved.loaded
    if args.images:
        images = take(args.images, args.num_images)
    else:
        from clip.demo import demo_images
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
    peaks = {name: 0 for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            elapsed, peak = timed(run, device)
            seconds[name].append(elapsed)
            peaks[name] = max(peaks[name], peak)

    base = statistics.median(seconds["plain forward"])
    print(f"model {hook_manager.name} on {device} ({args.precision}), {len(images)} images, "
          f"batch {args.batch_size}, median of {args.repeats} interleaved runs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'':<34} {'seconds':>8} {'ratio to plain forward':>24}")
    for name in runs:
        median = statistics.median(seconds[name])
        print(f"  {name:<34} {median:>8.3f} {median / base:>24.3f}")
    if device.type == "cuda":
        print(f"  peak memory: discovery / plain forward = {peaks['discovery'] / peaks['plain forward']:.3f}; "
              f"with register / plain = {peaks['forward with test-time register'] / peaks['plain forward']:.3f}")
    ratio = statistics.median(seconds["discovery"]) / base
    print(f"discovery / plain forward = {ratio:.3f} (target <= 1.1): {'met' if ratio <= 1.1 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
