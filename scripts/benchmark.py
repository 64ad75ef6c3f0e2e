#!/usr/bin/env python
"""Speed (and, on CUDA, peak memory) of discovery and of the test-time register, measured side by side.

Every figure is a ratio to a plain batched forward pass over the same images, preprocessing
included, timed in the same process and interleaved with it. The headline ratio uses each
method's fastest run, the usual estimate of its cost on a shared, noisy machine; the ratio of
medians, and of the least process CPU time (which leaves out time stolen by neighbours on a
shared machine), are printed beside it. Targets: discovery / forward <= 1.05, and the forward
pass with test-time registers / forward <= 1.03 (on OpenCLIP ViT-B/16 with 80 neurons over 8
layers: ``--model openclip:ViT-B-16:random --neurons random:80x8 --threshold 1``).

Images per second are printed for each. On CUDA the script also prints peak GPU memory and the
fraction of the GPU's bf16 peak that the plain forward reaches (its matrix FLOPs are counted from
the model's shapes). ``--memory`` measures discovery's peak memory over growing numbers of
images, each in a fresh process (RSS on the CPU, the CUDA peak on a GPU): it must not grow with
the number of images.

Installed as the console script ``test-time-registers-benchmark``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import threading
from concurrent.futures import ProcessPoolExecutor
import statistics
import sys
import time
from pathlib import Path

import torch

from test_time_registers import ModifiedModel, RegisterNeurons, find_register_neurons
from test_time_registers.data.batching import batches
from test_time_registers.data.sources import ImageFolder, take
from test_time_registers.registry import load_model, load_neurons
from test_time_registers.scripts.common import (Parser, UsageError, add_model_flags, check_device,
                                                non_negative_int, positive_float, positive_int, run_main,
                                                threshold_value)


DISCOVERY_TARGET = 1.05
REGISTER_TARGET = 1.03
#: Dense bf16 matrix throughput, TFLOP/s, by GPU name (the datasheets' SXM figures, without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def plain_forward(hook_manager, images, preprocess, batch_size, workers: int = 0, forward=None) -> None:
    """One pass over the images; ``hook_manager`` may be a ModifiedModel's view, which runs with its registers.
    ``forward`` replaces ``hook_manager.forward_images`` (a compiled one)."""
    forward = forward or hook_manager.forward_images
    with torch.no_grad():
        for batch in batches(images, preprocess, batch_size, hook_manager.device, hook_manager.input_dtype,
                             workers=workers):
            if not batch.names:   # every image of it was unreadable
                continue
            forward(batch.pixel_values)


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


def forward_gflop(hook_manager, pixel_values: torch.Tensor) -> float:
    """Matrix GFLOP of one image's forward pass: patch embedding, attention and MLP matmuls.

    Per block: 4 L D^2 (QKV and output projections) + 2 L D N (MLP) + 2 L^2 D (scores and mixing)
    multiply-adds, doubled. ViT-L/14 at 224 px gives about 162.
    """
    with torch.no_grad(), hook_manager.capture(residual=[0]) as captured:
        hook_manager.forward_images(pixel_values[:1])
    tokens, width = captured.residual[0].shape[1:]
    embedding = hook_manager.patch_embedding.weight.numel() * hook_manager.layout.num_patches(tokens)
    blocks = sum(4 * tokens * width ** 2 + 2 * tokens * width * hook_manager.num_neurons(layer) + 2 * tokens ** 2 * width
                 for layer in range(hook_manager.num_layers))
    return 2 * (embedding + blocks) / 1e9


def bf16_peak(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


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
    parser.add_argument("--neurons", help="neuron file, preset:NAME, hf-hub:ORG/REPO[/FILE], or random:KxL (K random neurons spread over "
                        "layers 0..L-1) for the test-time register run, instead of the neurons the warm-up discovery "
                        "finds")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="DataLoader processes that decode and preprocess images")
    parser.add_argument("--compile", action="store_true",
                        help="also time each method through torch.compile (compiled rows and their ratios)")
    parser.add_argument("--memory", type=image_counts, default=(),
                        help="also measure discovery's peak memory over these numbers of images, e.g. 256,2048, "
                             "each in a fresh process")
    parser.add_argument("--peak-tflops", type=positive_float, help="the GPU's dense bf16 TFLOP/s (default: known for "
                        f"{', '.join(BF16_PEAK_TFLOPS)})")
    return parser


def image_counts(text: str) -> tuple[int, ...]:
    return tuple(positive_int(part) for part in text.split(",") if part.strip())


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    loaded = load_model(args.model, device=device, precision=args.precision, seed=args.seed)
    model, preprocess, hook_manager = loaded
    if args.images:
        images = take(ImageFolder(args.images, limit=args.num_images, seed=args.seed), args.num_images)
    elif loaded.generate_images is not None:
        images = list(loaded.generate_images(args.num_images, args.seed))
    else:
        raise UsageError(f"--images DIR is required for {args.model}; only the demo generates its own scenes")
    top_k = len(loaded.planted) if loaded.planted else args.top_k
    device = hook_manager.device
    if device.type == "cuda":   # time the GPU, not the CPU's decoding: preprocess once, onto the device
        images = torch.stack([preprocess(image) for image in images]).to(device, hook_manager.input_dtype)
        preprocess = None

    def discover(compile: bool = False):
        # The highest layer is given (the same candidates "auto" gathers) so that a model without
        # outliers does not warn at every run.
        return find_register_neurons(hook_manager, images, preprocess, top_k=top_k, threshold=args.threshold,
                                     highest_layer=hook_manager.default_detect_layer, batch_size=args.batch_size,
                                     seed=args.seed, workers=args.workers, progress=False, compile=compile)

    found = discover()  # warm-up, and the neurons for the modified model
    neurons = found
    if args.neurons and args.neurons.startswith("random:"):
        neurons = random_neurons(hook_manager, args.neurons, args.seed)
    elif args.neurons:
        neurons = load_neurons(args.neurons, hook_manager)
    modified = ModifiedModel(model, hook_manager, neurons, num_registers=1)
    runs = {
        "plain forward": lambda: plain_forward(hook_manager, images, preprocess, args.batch_size, args.workers),
        "discovery": discover,
        "forward with test-time register": lambda: plain_forward(modified.hook_manager, images, preprocess,
                                                                 args.batch_size, args.workers),
    }
    if args.compile:
        compiled_plain = torch.compile(hook_manager.forward_images)
        compiled_modified = torch.compile(modified.forward_images)
        runs.update({
            "compiled plain forward": lambda: plain_forward(hook_manager, images, preprocess, args.batch_size,
                                                            args.workers, forward=compiled_plain),
            "compiled discovery": lambda: discover(compile=True),
            "compiled forward with test-time register": lambda: plain_forward(
                modified.hook_manager, images, preprocess, args.batch_size, args.workers, forward=compiled_modified),
        })
    for run in runs.values():
        run()  # warm-up (and, with --compile, the compilation)
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
    print(f"  {'':<34} {'fastest s':>9} {'ratio':>7} {'median s':>9} {'ratio':>7} {'CPU s':>7} {'ratio':>7}"
          f" {'images/s':>9}")
    for name in runs:
        fastest, median, cpu = min(seconds[name]), statistics.median(seconds[name]), min(cpu_seconds[name])
        print(f"  {name:<34} {fastest:>9.3f} {fastest / fastest_base:>7.3f} {median:>9.3f} {median / median_base:>7.3f}"
              f" {cpu:>7.3f} {cpu / cpu_base:>7.3f} {len(images) / fastest:>9.1f}")
    gflop = forward_gflop(hook_manager, next(batches(images[:1], preprocess, 1, device, hook_manager.input_dtype))
                          .pixel_values)
    if device.type == "cuda":
        print("  (on CUDA the images are preprocessed onto the GPU beforehand: these times leave out decoding)")
    print(f"  {gflop:.1f} GFLOP per image in the plain forward's matrix products")
    if device.type == "cuda":
        print(f"  {torch.cuda.get_device_name(device)}; peak GPU memory above the weights: "
              + ", ".join(f"{name} {peaks[name] / 2 ** 30:.2f} GiB" for name in runs))
        peak = bf16_peak(device, args.peak_tflops)
        achieved = gflop * len(images) / min(seconds["plain forward"]) / 1e3
        print(f"  plain forward: {achieved:.0f} TFLOP/s" + (f", {achieved / peak:.1%} of the {peak:.0f} TFLOP/s bf16 peak"
                                                            if peak else " (give --peak-tflops for the fraction)"))
    targets = [("discovery", "plain forward", DISCOVERY_TARGET),
               ("forward with test-time register", "plain forward", REGISTER_TARGET)]
    if args.compile:
        targets += [(f"compiled {name}", f"compiled {base}", target) for name, base, target in targets]
        print(f"  compiled plain forward / plain forward = "
              f"{min(seconds['compiled plain forward']) / fastest_base:.3f} (what compiling itself gains)")
    for name, base, target in targets:
        ratio = min(seconds[name]) / min(seconds[base])
        print(f"{name} / {base} = {ratio:.3f} (fastest runs; target <= {target}): "
              f"{'met' if ratio <= target else 'NOT met'}")
    if args.memory:
        report_memory(args, top_k)
    return 0


def report_memory(args: argparse.Namespace, top_k: int) -> None:
    """Discovery's peak memory over each number of images in ``args.memory``, each in a fresh process."""
    settings = {key: getattr(args, key) for key in ("model", "device", "precision", "seed", "images", "batch_size",
                                                    "threshold", "workers")}
    print(f"discovery's peak memory ({'CUDA peak' if torch.device(args.device).type == 'cuda' else 'RSS'}), "
          f"batch {args.batch_size}:")
    first = None
    for count in args.memory:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            loaded_bytes, peak_bytes, seen = pool.submit(_peak_memory, settings, count, top_k).result()
        first = first or peak_bytes
        print(f"  {seen:>6} images: peak {peak_bytes / 2 ** 20:8.1f} MiB, {(peak_bytes - loaded_bytes) / 2 ** 20:7.1f} "
              f"MiB above the loaded model; {peak_bytes / first:.3f}x the first")


def _peak_memory(settings: dict, count: int, top_k: int) -> tuple[int, int, int]:
    """In a fresh process: bytes once the model is loaded, peak bytes of a discovery over up to ``count``
    images, and how many images it saw (a folder may have fewer)."""
    loaded = load_model(settings["model"], device=settings["device"], precision=settings["precision"],
                        seed=settings["seed"])
    device = loaded.hook_manager.device
    if settings["images"]:   # read lazily, never all at once
        images = ImageFolder(settings["images"], limit=count, seed=settings["seed"])
    else:
        images = loaded.generate_images(count, settings["seed"])
    seen = []

    def discover():
        found = find_register_neurons(loaded.hook_manager, images, loaded.preprocess, top_k=top_k,
                                      threshold=settings["threshold"], batch_size=settings["batch_size"],
                                      seed=settings["seed"], workers=settings["workers"], progress=False)
        seen.append(found.images_seen)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        discover()
        return before, torch.cuda.max_memory_allocated(device), seen[0]
    before = _resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample():   # the resident set, every 5 ms, while discovery runs
        while not done.wait(0.005):
            peak[0] = max(peak[0], _resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        discover()
    finally:
        done.set()
        sampler.join()
    return before, max(peak[0], _resident_bytes()), seen[0]


def _resident_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
