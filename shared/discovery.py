"""Finding register neurons (Algorithm 1 of Jiang et al., 2025): the data loop.

For every image, the outliers O are the patch tokens whose block-output norm at the detection
layer exceeds the threshold (CLS, trained registers and test-time registers never count).
Every neuron up to ``highest_layer`` is scored by its mean activation over O, and the scores
are averaged over the images that have outliers.

This module runs the model over the images, in one batched, streaming pass, and feeds a
:class:`~test_time_registers.statistics.DiscoveryStatistics` (the pure part: running sums on the
model's device, mergeable across processes, saved and restored with ``state_dict``), so a long
run can be sharded over torch.distributed ranks and resumed after a kill. Per batch only that
batch's activations are held, and the forward pass stops right after the detection layer.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed, measures
from .data.batching import Shard, batches, ordered_source
from .data.sources import ImageFolder, calibration_first, count_hint, image_source, no_images_message
from .errors import CheckpointError, ImageSourceError, InvalidArgumentError, check_int, first_line
from .files import parse_json, read_bounded, write_atomically
from .hooks import HookManager, StopForward
from .intervention import ModifiedModel
from .layout import TokenLayout
from .neurons import RegisterNeurons
from .statistics import (AUTO, AUTO_CALIBRATION_IMAGES, AUTO_TARGET_RATIO, STATE_TENSORS, DiscoverySettings,
                         DiscoveryStatistics, auto_threshold, check_state, check_target_ratio)

log = logging.getLogger(__name__)

#: Version of discovery checkpoints: 2 is safetensors with JSON metadata (1 was a torch.save file).
CHECKPOINT_FORMAT = 2
#: The safetensors metadata key holding a checkpoint's JSON.
CHECKPOINT_KEY = "test_time_registers.discovery"
#: The largest checkpoint read (its sums are a few MB for the largest models).
MAX_CHECKPOINT_BYTES = 2**30
#: The most skipped file names a checkpoint may list.
MAX_SKIPPED = 10**7


def find_register_neurons(hook_manager: HookManager, images, preprocess: Callable | None = None, *,
                          held_out=None, **options) -> RegisterNeurons:
    """Find the MLP neurons that write the high-norm outlier tokens.

    Takes the settings of :class:`~test_time_registers.statistics.DiscoverySettings` as keywords
    (``top_k=10``, ``threshold="auto"``, ``detect_layer=None``, ``highest_layer="auto"``,
    ``score="raw"``, the sparsity filter's three, ``target_ratio=2.0``, ``max_top_k=64``) and the
    run options of :func:`gather_statistics`. Gathers the statistics and returns their ``top_k``
    neurons of layers up to ``highest_layer``, best first: the last candidate layer, or with
    ``"auto"``, the first layer at which the outlier positions stand out in norm.

    With ``top_k="auto"``, k is the smallest that brings the ``held_out`` images' mean largest /
    median patch norm at the detection layer to ``target_ratio`` or below with one test-time
    register (see :func:`choose_top_k`; at most ``max_top_k``).

    Returns:
        :class:`RegisterNeurons` with the threshold and layers actually used.

    Raises:
        NoOutliersError: no image had a patch above the threshold; the message gives the
            largest patch norm seen and a threshold to try.
        ImageSourceError: no readable image.
        InvalidArgumentError: bad settings, or a checkpoint that does not match them.
        CheckpointError: a checkpoint to resume from is missing or unreadable.
    """
    if options.get("top_k") == AUTO and held_out is None:   # before the pass, not after it
        raise InvalidArgumentError("top_k='auto' needs held_out images, on which k is chosen")
    settings, run = DiscoverySettings.split(options)
    stats = _gather(hook_manager, images, preprocess, settings, **run)
    automatic = settings.automatic_top_k
    result = stats.finalize(top_k=settings.max_top_k if automatic else settings.top_k,
                            highest_layer=settings.highest_layer)
    if automatic:
        result = choose_top_k(hook_manager, result, held_out, preprocess, target_ratio=settings.target_ratio,
                              batch_size=run.get("batch_size", 32), workers=run.get("workers", 0))
    skipped = _total_skipped(stats.source)
    if skipped is not None:
        result.extra["files_skipped"] = skipped
    if hook_manager.read_layers is not None:   # a vision-language model's tower: what its language model reads
        result.extra["tower"] = {"class": type(hook_manager.root).__name__, "read_layers": list(hook_manager.read_layers)}
    return result


def gather_statistics(hook_manager: HookManager, images, preprocess: Callable | None = None, **options
                      ) -> DiscoveryStatistics:
    """Run the model over ``images`` and gather Algorithm 1's statistics (see :func:`find_register_neurons`).

    Takes the settings of :class:`~test_time_registers.statistics.DiscoverySettings` as keywords
    (``threshold``, ``detect_layer``, ``highest_layer``, ``score``, the sparsity filter's; with
    ``highest_layer="auto"`` every layer up to ``detect_layer`` is gathered and
    :meth:`DiscoveryStatistics.finalize` picks), and the run options below.

    Args:
        hook_manager: the model, described by its architecture's :class:`HookManager`.
        images: a folder path, an :class:`~test_time_registers.ImageFolder`, a list of
            PIL images, a preprocessed tensor [N, 3, H, W], or any iterable of PIL images or of
            preprocessed batches (such as your own ``DataLoader``).
        preprocess: PIL image -> tensor [3, H, W]; not needed for tensors.
        batch_size: images per forward pass (32).
        device: where the images go and the statistics live; must be the model's device (``None``).
        seed: draws the calibration sample of a list or tensor of images (0).
        workers: DataLoader processes that decode and preprocess a folder's images (0).
        checkpoint: save the statistics to this file (atomically) every ``checkpoint_every``
            batches (50) once the threshold is known, and at the end. Under torch.distributed each
            rank writes ``NAME.rankR-of-W.SUFFIX``.
        resume: continue from ``checkpoint``, which must come from a run with the same model,
            images and settings; the result is the one an uninterrupted run gives.
        progress: show a progress bar (``True``).
        compile: run the forward pass through ``torch.compile`` (``False``), with the statistics'
            hooks traced into the graph; the statistics are the eager run's up to float rounding.
            Worth it for many images: compiling costs seconds to minutes, once per input shape.

    ``threshold="auto"`` is a robust threshold (see :func:`auto_threshold`) from the patch norms
    of a seeded random sample of 32 images, whatever the batch size. The sample is visited first
    (smaller batches are held until it is in). For a folder it is drawn from the sorted file list
    with the folder's seed, so the order of the files does not matter; for a list or tensor, from
    the positions with ``seed``; an iterable of unknown length gives its first 32.

    With ``sparsity_filter``, per image with outliers, a neuron's score counts only if its
    activation is below ``sparsity_activation_threshold`` on at least ``sparsity_frac_threshold``
    of that image's tokens (CLS, trained registers and patches); otherwise that image contributes
    0 for it. The mean is still taken over all images with outliers.

    Under torch.distributed (``torchrun``), each rank reads its shard of the images (positions
    ``rank, rank + world, ...``), the ranks calibrate the automatic threshold together on the
    same sample one process would use, and their statistics are merged with ``all_reduce``:
    every rank gets the statistics one process would have gathered.

    Returns:
        :class:`DiscoveryStatistics`; ``.source`` is the image source as it was read.

    Raises:
        ImageSourceError: no readable image.
        InvalidArgumentError: bad settings, or a checkpoint that does not match them.
        CheckpointError: a checkpoint to resume from is missing or unreadable.
    """
    settings, run = DiscoverySettings.split(options)
    return _gather(hook_manager, images, preprocess, settings, **run)


def _gather(hook_manager: HookManager, images, preprocess: Callable | None, settings: DiscoverySettings, *,
            batch_size: int = 32, device: torch.device | str | None = None, seed: int = 0, workers: int = 0,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50, resume: bool = False,
            progress: bool = True, compile: bool = False) -> DiscoveryStatistics:
    detect_layer, candidate_layers = settings.layers(hook_manager)
    check_int("checkpoint_every", checkpoint_every)
    if resume and checkpoint is None:
        raise InvalidArgumentError("resume needs the checkpoint to resume from")
    model_device = hook_manager.device
    if device is not None and not _same_device(torch.device(device), model_device):
        raise InvalidArgumentError(f"the model is on {model_device} but device={device}; move the model first")

    threshold = settings.threshold
    images = image_source(images)
    if threshold == AUTO:
        images = calibration_first(images, AUTO_CALIBRATION_IMAGES, seed)
    source = ordered_source(images)
    shard = distributed.current_shard()
    sparsity = settings.sparsity
    stats = DiscoveryStatistics({layer: hook_manager.num_neurons(layer) for layer in candidate_layers}, detect_layer,
                                hook_manager.layout, threshold=None if threshold == AUTO else float(threshold),
                                score=settings.score, sparsity=sparsity, device=model_device, model=hook_manager.name)
    recorded = {"model": hook_manager.name, "detect_layer": detect_layer, "candidate_layers": len(candidate_layers),
                "score": settings.score, "sparsity": list(sparsity) if sparsity else None, "threshold": str(threshold),
                "batch_size": batch_size, "seed": seed, "images": len(source) if source is not None else None,
                "image_names": source.fingerprint if source is not None else None,
                "rank": shard.rank, "world": shard.world}
    saver = _Checkpoints(checkpoint, shard, recorded, images) if checkpoint is not None else None
    consumed = saver.restore(stats) if resume else 0

    runner = _Pass(hook_manager, stats, candidate_layers, detect_layer, shard, ordered=source is not None,
                   compile=compile)
    total = len(range(shard.rank, len(source), shard.world)) if source is not None else count_hint(images)
    bar = tqdm(total=total, initial=consumed, unit="img", desc="finding register neurons",
               disable=not progress or shard.rank != 0)
    since_saved = 0
    with hook_manager.hooks() as hooks, torch.no_grad():
        runner.attach(hooks)
        for batch in batches(source if source is not None else images, preprocess, batch_size, model_device,
                             hook_manager.input_dtype, workers=workers, shard=shard, start=consumed):
            consumed += batch.consumed
            bar.update(batch.consumed)
            if not batch.names:
                continue
            runner.run(batch)
            while stats.threshold is None and runner.calibration_due(consumed):
                runner.calibrate(exhausted=False)
            since_saved += 1
            if saver is not None and stats.threshold is not None and since_saved >= checkpoint_every:
                saver.save(stats, consumed)
                since_saved = 0
        while stats.threshold is None:   # this rank has run out of images; the others may not have
            runner.calibrate(exhausted=True)
        if saver is not None:
            saver.save(stats, consumed, complete=True)
    bar.close()
    stats.all_reduce()
    if stats.images_seen == 0:
        raise ImageSourceError(no_images_message(images))
    stats.source = images
    return stats


def choose_top_k(hook_manager: HookManager, ranked: RegisterNeurons, held_out, preprocess: Callable | None = None, *,
                 target_ratio: float = AUTO_TARGET_RATIO, batch_size: int = 32, workers: int = 0) -> RegisterNeurons:
    """The smallest k for which the best k of ``ranked`` bring the outliers under ``target_ratio``.

    The paper's appendix raises top_k until the outliers are gone; this does it on ``held_out``
    images: with one test-time register and the best k neurons, the mean over the images of
    largest / median patch norm at ``ranked.detect_layer`` must be at most ``target_ratio``.
    k doubles (1, 2, 4, ...) until the target is met, then bisects between the last k that
    missed it and the first that met it (the ratio falls as neurons are added, as a rule).
    If even all of ``ranked`` miss it, all are kept and a warning says so.

    Returns:
        ``ranked.top(k)``, with ``extra["top_k_auto"]``: the target, each k tried and its ratio,
        and whether the target was met.
    """
    target_ratio = check_target_ratio(target_ratio)
    source = image_source(held_out)
    pixels = [batch.pixel_values for batch in batches(source, preprocess, batch_size, hook_manager.device,
                                                      hook_manager.input_dtype, workers=workers) if batch.names]
    if not pixels:
        raise ImageSourceError(no_images_message(source))
    pixels = torch.cat(pixels)     # decoded once, measured for every k
    detect_layer = ranked.detect_layer if ranked.detect_layer is not None else hook_manager.default_detect_layer
    ratios: dict[int, float] = {}

    def ratio(k: int) -> float:
        if k not in ratios:
            modified = ModifiedModel(hook_manager.model, hook_manager, ranked.top(k), num_registers=1)
            ratios[k] = _mean_max_over_median(modified.hook_manager, pixels, detect_layer, batch_size)
            log.info("top_k=%d: largest / median patch norm %.3g (target %.3g)", k, ratios[k], target_ratio)
        return ratios[k]

    missed, k = 0, 1
    while k < len(ranked) and ratio(k) > target_ratio:
        missed, k = k, min(2 * k, len(ranked))
    met = ratio(k) <= target_ratio
    if met:
        while k - missed > 1:          # the target is met at k and missed at `missed`
            middle = (missed + k) // 2
            missed, k = (missed, middle) if ratio(middle) <= target_ratio else (middle, k)
    else:
        log.warning("even the %d best neurons leave a largest / median patch norm of %.3g, above the target %.3g; "
                    "keeping all of them", len(ranked), ratios[k], target_ratio)
    chosen = ranked.top(k)
    chosen.extra = {**ranked.extra, "top_k_auto": {
        "target_ratio": target_ratio, "met": met, "held_out_images": len(pixels),
        "ratio_by_k": [[tried, round(value, 4)] for tried, value in sorted(ratios.items())]}}
    return chosen


def _mean_max_over_median(hook_manager: HookManager, pixels: torch.Tensor, detect_layer: int, batch_size: int) -> float:
    """The mean over images [N, 3, H, W] of largest / median patch norm at ``detect_layer`` (summed in float32)."""
    total = torch.zeros((), dtype=torch.float32, device=hook_manager.device)
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            with hook_manager.capture(residual=[detect_layer]) as captured:
                hook_manager.forward_images(pixels[start:start + batch_size])
            norms = measures.patch_norms(captured.residual[detect_layer], captured.layout)     # [B, P]
            total += measures.max_over_median(norms).sum()
    return float(total / len(pixels))


def _total_skipped(images) -> int | None:
    """Distinct unreadable files of a folder over every rank, or ``None`` for other sources."""
    if not isinstance(images, ImageFolder):
        return None
    names = distributed.all_gather_objects(images.skipped_names())
    return len(set().union(*names))


class _CompiledPass:
    """Discovery's forward pass through ``torch.compile``, one per model and candidate layers.

    Dynamo does not guard on module hooks, so a graph traced with other hooks (another pass's, or
    none, as in a compiled plain forward) could be reused for this one: :meth:`run` reads this
    object's own key, which makes the graph its own. Passes with the same model and layers share it
    (and its compilation), their hooks being the same functions writing into the pass's dictionaries.
    The pass runs to the end: an exception raised in a hook (the eager pass's early stop) would
    break the graph there, and Dynamo (torch 2.14) then drops what that module's hooks did.
    """

    _made: "weakref.WeakKeyDictionary[HookManager, dict[tuple, _CompiledPass]]" = weakref.WeakKeyDictionary()
    _keys = itertools.count()

    def __init__(self, hook_manager: HookManager):
        self.hook_manager = hook_manager
        self.graph_key = f"discovery pass {next(self._keys)}"
        self.activations: dict[int, torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self.compiled = torch.compile(self._forward)

    @classmethod
    def of(cls, hook_manager: HookManager, candidate_layers: list[int], detect_layer: int) -> "_CompiledPass":
        made = cls._made.setdefault(hook_manager, {})
        key = (tuple(candidate_layers), detect_layer)
        if key not in made:
            made[key] = cls(hook_manager)
        return made[key]

    def _forward(self, pixel_values: torch.Tensor) -> None:
        if not self.graph_key:
            raise InvalidArgumentError("a compiled discovery pass without its graph key")
        self.hook_manager.forward_images(pixel_values)

    def run(self, pixel_values: torch.Tensor, activations: dict, norms: dict) -> None:
        """One batch; what the hooks kept moves into ``activations`` and ``norms``."""
        self.compiled(pixel_values)
        activations.update(self.activations)
        norms.update(self.norms)
        self.activations.clear()
        self.norms.clear()


def _keep_activations(into: dict[int, torch.Tensor], layer: int):
    """A hook holding layer ``layer``'s MLP activations [B, L, N] in ``into``.

    The model's own tensor, held until the batch's statistics are in: nothing reads or writes it
    after the MLP's output projection. Copying it into a buffer reused across batches measured
    slower (ViT-B/16, every patch an outlier: 1.17x a plain forward against 1.08x). Compiled, it
    is a graph output, which the graph allocates anyway.
    """
    def keep(tensor):
        into[layer] = tensor

    return keep


def _keep_patch_norms(into: dict[int, torch.Tensor], layer: int, layout: TokenLayout):
    """A hook keeping the patch norms [B, P] of block ``layer``'s output in ``into``."""
    def keep(residual):
        into[layer] = measures.patch_norms(residual, layout)

    return keep


class _Pass:
    """The hooks of one discovery pass, and the batches held until the automatic threshold is known."""

    def __init__(self, hook_manager: HookManager, stats: DiscoveryStatistics, candidate_layers: list[int],
                 detect_layer: int, shard: Shard, ordered: bool, compile: bool = False):
        self.hook_manager, self.stats, self.shard, self.ordered = hook_manager, stats, shard, ordered
        # Compiled at its first call, after ``attach`` placed the hooks: Dynamo traces them into the graph.
        self.compiled = _CompiledPass.of(hook_manager, candidate_layers, detect_layer) if compile else None
        self.forward = (lambda pixels: self.compiled.run(pixels, self.activations, self.norms)) if compile \
            else hook_manager.forward_images
        self.candidate_layers, self.detect_layer = candidate_layers, detect_layer
        self.activations: dict[int, torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self.held: list[tuple[dict, dict, list[int]]] = []   # (activations, norms, sample positions) per batch
        # The sample is the first AUTO_CALIBRATION_IMAGES readable images in position order. Positions
        # below ``bound`` are gathered in rounds, the bound doubling while too few of them were readable.
        self.bound = AUTO_CALIBRATION_IMAGES

    def attach(self, hooks) -> None:
        kept = self.compiled or self   # compiled: into the dictionaries its graph was traced with
        for layer in self.candidate_layers:
            hooks.on_neurons(layer, _keep_activations(kept.activations, layer))
        for layer in range(self.detect_layer + 1):
            hooks.on_block_output(layer, _keep_patch_norms(kept.norms, layer, self.hook_manager.layout))
        if not self.compiled:
            # Compiled, the pass runs to the end: an exception raised in a hook breaks the graph there,
            # and Dynamo (torch 2.14) then drops what that module's other hooks did.
            hooks.stop_after_block(self.detect_layer)

    def run(self, batch) -> None:
        try:
            self.forward(batch.pixel_values)
        except StopForward:
            pass
        self.stats.image_size = tuple(batch.pixel_values.shape[-2:])
        if self.stats.threshold is not None:
            self.stats.update(self.activations, self.norms)
        else:   # held until the sample is in
            positions = batch.positions if self.ordered else [p * self.shard.world + self.shard.rank
                                                              for p in batch.positions]
            self.held.append((dict(self.activations), dict(self.norms), positions))
        self.activations.clear()
        self.norms.clear()

    def calibration_due(self, consumed: int) -> bool:
        """True once this rank has read all its positions below the bound (a stream: its images)."""
        return consumed >= len(range(self.shard.rank, self.bound, self.shard.world))

    def calibrate(self, exhausted: bool) -> None:
        """One round: gather every rank's held images below the bound; if at least the sample size
        were readable, or every rank has run out of images, the first of them set the automatic
        threshold and the held batches count. Otherwise the bound doubles. Every rank makes the same
        rounds, since all decide on the same gathered data."""
        mine = [(position, norms[self.detect_layer][row].cpu())
                for _, norms, positions in self.held for row, position in enumerate(positions)
                if position < self.bound]
        gathered = distributed.all_gather_objects((mine, exhausted))
        sample = sorted((item for items, _ in gathered for item in items), key=lambda item: item[0])
        if len(sample) < AUTO_CALIBRATION_IMAGES and not all(done for _, done in gathered):
            self.bound *= 2
            return
        sample = sample[:AUTO_CALIBRATION_IMAGES]
        if not sample:
            self.stats.threshold = math.inf   # no image anywhere: finalize says so
            return
        calibration = torch.stack([norms for _, norms in sample])
        self.stats.threshold = auto_threshold(calibration)
        self.stats.reference_median = float(calibration.median())
        log.info("auto threshold %.4g from %d images", self.stats.threshold, len(sample))
        for activations, norms, _ in self.held:
            self.stats.update(activations, norms)
        self.held.clear()


@dataclass
class DiscoveryCheckpoint:
    """What a discovery checkpoint holds.

    Attributes:
        settings: the run's recorded settings (model, layers, flags, the images' fingerprint), compared on resume.
        statistics: :meth:`DiscoveryStatistics.state_dict` (checked by :func:`~test_time_registers.statistics.check_state`).
        consumed: how many of this shard's image positions were done.
        skipped: the names of unreadable files met so far (relative to the folder).
        complete: the run reached the end of its images.
    """

    settings: dict[str, Any]
    statistics: dict[str, Any]
    consumed: int
    skipped: list[str]
    complete: bool = False


def _json_number(value):
    """A float for JSON, or ``None`` where it is not finite (an infinite threshold: no image anywhere)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_checkpoint(path: str | os.PathLike, checkpoint: DiscoveryCheckpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically: the sums as safetensors, the rest as JSON in its metadata.

    The same checkpoint always gives the same bytes.
    """
    from safetensors.torch import save_file

    state = dict(checkpoint.statistics)
    tensors = {f"score_sums.{layer}": total.detach().cpu().contiguous() for layer, total in state.pop("score_sums").items()}
    tensors.update({name: state.pop(name).detach().cpu().contiguous() for name in STATE_TENSORS})
    state["threshold"] = _json_number(state["threshold"])
    state["reference_median"] = _json_number(state["reference_median"])
    text = json.dumps({"format": CHECKPOINT_FORMAT, "settings": checkpoint.settings, "statistics": state,
                       "consumed": checkpoint.consumed, "skipped": list(checkpoint.skipped),
                       "complete": checkpoint.complete}, sort_keys=True, allow_nan=False, separators=(",", ":"))
    write_atomically(Path(path), lambda temporary: save_file(tensors, temporary, metadata={CHECKPOINT_KEY: text}))


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes, read as strict JSON; nothing is unpickled."""
    not_one = f"{path} is not a discovery checkpoint (a safetensors file that find-register-neurons writes)"
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else None
    if size is None or size > len(data) - 8 or size < 2:
        if data[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{not_one}: it is a zip archive, like a torch.save file (checkpoints of format 1 "
                                  "were), which this version never unpickles; start the run again without resume")
        if data[:1] == b"\x80":
            raise CheckpointError(f"{not_one}: it is a Python pickle, which this version never unpickles; "
                                  "start the run again without resume")
        raise CheckpointError(f"{not_one}: its first 8 bytes do not give the length of a header inside the file")
    header = parse_json(data[8:8 + size], CheckpointError, f"the header of {path}")
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get(CHECKPOINT_KEY), str):
        raise CheckpointError(f"{not_one}: its safetensors header has no {CHECKPOINT_KEY!r} metadata")
    return metadata


def read_checkpoint(path: str | os.PathLike) -> DiscoveryCheckpoint:
    """Read and check a discovery checkpoint, without unpickling anything.

    Raises:
        CheckpointError: the file is missing, larger than :data:`MAX_CHECKPOINT_BYTES`, not a
            safetensors file with this library's metadata (a pickle, a torch.save zip, random
            bytes), of another format, or any field is of the wrong type, shape or range (see
            :func:`~test_time_registers.statistics.check_state`); one line naming the file and the field.
    """
    from safetensors.torch import load as load_tensors

    path = Path(path)
    data = read_bounded(path, MAX_CHECKPOINT_BYTES, CheckpointError, "discovery checkpoint")
    text = _safetensors_metadata(data, path)[CHECKPOINT_KEY]
    content = parse_json(text, CheckpointError, f"the metadata of {path}")
    fields = {"format", "settings", "statistics", "consumed", "skipped", "complete"}
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        found = content.get("format") if isinstance(content, dict) else None
        raise CheckpointError(f"{path}: format must be {CHECKPOINT_FORMAT}, the discovery checkpoint format this "
                              f"version reads, got {str(found)[:40]!r}")
    if set(content) != fields:
        raise CheckpointError(f"{path}: the metadata must have exactly the fields {', '.join(sorted(fields))}, got "
                              f"{', '.join(sorted(str(key)[:40] for key in content)[:10])}")
    consumed, skipped = content["consumed"], content["skipped"]
    if isinstance(consumed, bool) or not isinstance(consumed, int) or not 0 <= consumed <= 2**53:
        raise CheckpointError(f"{path}: consumed must be an int of at least 0 (images done), got {str(consumed)[:40]}")
    if not isinstance(skipped, list) or len(skipped) > MAX_SKIPPED or not all(isinstance(n, str) for n in skipped):
        raise CheckpointError(f"{path}: skipped must be a list of file names (strings)")
    if not isinstance(content["complete"], bool):
        raise CheckpointError(f"{path}: complete must be true or false, got {str(content['complete'])[:40]}")
    if not isinstance(content["settings"], dict):
        raise CheckpointError(f"{path}: settings must be a JSON object, got {str(content['settings'])[:40]}")
    state = content["statistics"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: statistics must be a JSON object, got {str(state)[:40]}")
    try:
        tensors = load_tensors(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:   # safetensors' own errors, and a panic of its parser (a BaseException)
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(error)[:200]})") from None
    layers = sum(name.startswith("score_sums.") for name in tensors)
    expected = {*(f"score_sums.{layer}" for layer in range(layers)), *STATE_TENSORS}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise CheckpointError(f"{path}: the tensors must be score_sums.0..score_sums.N-1, "
                              f"{', '.join(STATE_TENSORS)}; the file differs in {', '.join(n[:40] for n in odd[:5])}")
    overlap = set(state) & {"score_sums", *STATE_TENSORS}
    if overlap:
        raise CheckpointError(f"{path}: statistics must not hold {', '.join(sorted(overlap))} in its JSON")
    state = {**state, "score_sums": {layer: tensors[f"score_sums.{layer}"] for layer in range(layers)},
             **{name: tensors[name] for name in STATE_TENSORS}}
    check_state(state, str(path))
    if consumed < state["counts"][0]:
        raise CheckpointError(f"{path}: consumed must be at least the images counted ({int(state['counts'][0])}), "
                              f"got {consumed}")
    return DiscoveryCheckpoint(content["settings"], state, consumed, skipped, content["complete"])


class _Checkpoints:
    """Discovery's statistics on disk, written atomically, checked against the run that reads them."""

    def __init__(self, path: str | os.PathLike, shard: Shard, settings: dict[str, Any], images):
        path = Path(path)
        if shard.world > 1:
            path = path.with_name(f"{path.stem}.rank{shard.rank}-of-{shard.world}{path.suffix}")
        self.path, self.settings, self.images, self.shard = path, settings, images, shard

    def save(self, stats: DiscoveryStatistics, consumed: int, complete: bool = False) -> None:
        skipped = self.images.skipped_names() if isinstance(self.images, ImageFolder) else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        write_checkpoint(self.path, DiscoveryCheckpoint(self.settings, stats.state_dict(), consumed, skipped, complete))
        log.info("checkpoint: %d images done, saved to %s", consumed, self.path)

    def remove_stale(self) -> None:
        """Temporary files a killed save left behind (only this checkpoint's own; see :func:`write_atomically`)."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def restore(self, stats: DiscoveryStatistics) -> int:
        """Load the statistics into ``stats``; returns how many of this shard's positions were done."""
        self.remove_stale()
        if not self.path.exists():
            raise CheckpointError(f"no checkpoint to resume from at {self.path}")
        checkpoint = read_checkpoint(self.path)
        recorded = checkpoint.settings
        differences = [f"{key} {_short(recorded.get(key))}, not {_short(value)}"
                       for key, value in self.settings.items() if recorded.get(key) != value]
        if differences:
            raise InvalidArgumentError(f"{self.path} was written by a run with other settings ({'; '.join(differences)}); "
                                       "resume with the same model, images and flags, or start again without resume")
        try:
            stats.load_state_dict(checkpoint.statistics, origin=str(self.path))
        except InvalidArgumentError as error:   # its settings are this run's, so its statistics contradict them
            raise CheckpointError(f"{self.path}: its statistics do not fit the settings it records "
                                  f"({first_line(error)})") from None
        images = self.settings.get("images")
        if images is not None:
            positions = len(range(self.shard.rank, images, self.shard.world))
            if checkpoint.consumed > positions:
                raise CheckpointError(f"{self.path}: consumed must be at most {positions}, the images of this run, "
                                      f"got {checkpoint.consumed}")
        if isinstance(self.images, ImageFolder):
            self.images.skipped_files.update(self.images.root / name for name in checkpoint.skipped)
        log.info("resuming from %s: %d images done", self.path, checkpoint.consumed)
        return checkpoint.consumed


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    return wanted.type == actual.type and wanted.index in (None, actual.index)


def check_discovery_arguments(hook_manager, top_k=10, threshold=AUTO, detect_layer=None, highest_layer=AUTO,
                              score="raw") -> tuple[int, list[int]]:
    """Validate discovery's settings for this model; return (detect layer, candidate layers).

    The same checks as :class:`~test_time_registers.statistics.DiscoverySettings` and its
    :meth:`~test_time_registers.statistics.DiscoverySettings.layers`. Raises
    :class:`InvalidArgumentError` (also a ValueError) for bad values, layers the model does not
    have, or layers out of order.
    """
    return DiscoverySettings(top_k=top_k, threshold=threshold, detect_layer=detect_layer, highest_layer=highest_layer,
                             score=score).layers(hook_manager)
