"""Finding register neurons (Algorithm 1 of Jiang et al., 2025), in one batched, streaming pass.

For every image, the outliers O are the patch tokens whose block-output norm at the detection
layer exceeds the threshold (CLS, trained registers and test-time registers never count).
Every neuron up to ``highest_layer`` is scored by its mean activation over O, and the scores
are averaged over the images that have outliers.

The statistics are a :class:`DiscoveryStatistics`: running sums on the model's device, updated
batch by batch, mergeable across processes (``merge``, ``all_reduce``), and saved and restored
with ``state_dict``/``load_state_dict``, so a long run can be sharded over torch.distributed
ranks and resumed after a kill. Per batch only that batch's activations are held, and the
forward pass stops right after the detection layer.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from . import distributed
from .data.batching import Shard, batches, ordered_source
from .errors import (ImageSourceError, InvalidArgumentError, NonFiniteActivationsError, NoOutliersError, check_int,
                     TestTimeRegistersError)
from .hooks import HookManager, StopForward
from .data.sources import ImageFolder, calibration_first, count_hint, image_source, no_images_message
from .layout import TokenLayout
from .neurons import UNKNOWN_MODEL, RegisterNeuron, RegisterNeurons

log = logging.getLogger(__name__)

AUTO = "auto"
#: Auto threshold: from the patch norms of a seeded sample of AUTO_CALIBRATION_IMAGES images, ...
AUTO_CALIBRATION_IMAGES = 32
#: ... median + AUTO_SIGMAS robust standard deviations of the patch norms ...
AUTO_SIGMAS = 6.0
#: ... and never below AUTO_MIN_RATIO times the median patch norm.
AUTO_MIN_RATIO = 3.0
MAD_TO_SIGMA = 1.4826
#: The outliers "stand out" at a layer once their norm is this many times the median ...
STAND_OUT_MIN_RATIO = 2.0
#: ... and at least this fraction of their prominence at the detection layer.
STAND_OUT_FRACTION = 0.5
#: The reference code's sparsity filter: an image's score for a neuron counts only if the neuron
#: is below SPARSITY_ACTIVATION_THRESHOLD on at least SPARSITY_FRAC_THRESHOLD of the image's tokens.
SPARSITY_ACTIVATION_THRESHOLD = 0.5
SPARSITY_FRAC_THRESHOLD = 0.5
#: top_k="auto": the largest / median patch norm to reach on held-out images, and the most neurons to try.
AUTO_TARGET_RATIO = 2.0
AUTO_MAX_TOP_K = 64
#: Version of discovery checkpoints.
CHECKPOINT_FORMAT = 1


def auto_threshold(patch_norms: torch.Tensor) -> float:
    """Robust outlier threshold from patch norms of any shape.

    ``max(median + 6 * 1.4826 * MAD, 3 * median)``: outliers are rare, so the median and the
    median absolute deviation (MAD) describe the ordinary patches only.
    """
    flat = patch_norms.detach().flatten().float()
    median = flat.median()
    mad = (flat - median).abs().median()
    return float(torch.maximum(median + AUTO_SIGMAS * MAD_TO_SIGMA * mad, AUTO_MIN_RATIO * median))


class DiscoveryStatistics:
    """Algorithm 1's running statistics: update per batch, merge, save, restore, finalize.

    Args:
        num_neurons: ``{layer: MLP width}`` of the candidate layers (0..the last candidate).
        detect_layer: the block whose output norms decide the outliers.
        layout: the model's token layout (no test-time registers).
        threshold: the patch-norm threshold; ``None`` until an automatic one is calibrated.
        score: ``"raw"`` or ``"abs"``.
        sparsity: ``(activation_threshold, frac_threshold)`` of the reference's filter, or ``None``.
        device: where the sums live.
        model: the model's name, recorded in the result.
        outlier_rows: score only the rows of outlier tokens (read a few rows instead of the whole
            activation tensor; best on the CPU) rather than a dense product over every token (no
            host synchronisation; best on a GPU). ``None`` chooses by device.

    Every sum is float32 on ``device``. Two statistics of disjoint image sets ``merge`` into the
    statistics of their union, exactly as one pass would have summed them (up to float rounding).
    """

    def __init__(self, num_neurons: dict[int, int], detect_layer: int, layout: TokenLayout, *,
                 threshold: float | None = None, score: Literal["raw", "abs"] = "raw",
                 sparsity: tuple[float, float] | None = None, device: torch.device | str = "cpu",
                 model: str = "unknown", outlier_rows: bool | None = None):
        self.detect_layer = detect_layer
        self.model = model
        self.threshold_mode = "given" if threshold is not None else AUTO
        self.outlier_rows = torch.device(device).type == "cpu" if outlier_rows is None else outlier_rows
        self.layout = layout
        self.threshold = threshold
        self.score = score
        self.sparsity = sparsity
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        self.score_sums = {layer: zeros(width) for layer, width in sorted(num_neurons.items())}   # layer -> [N]
        self.ratio_sums = zeros(detect_layer + 1)     # per layer: outlier norm / median norm, summed over images
        self.counts = zeros(4)   # images seen, images with outliers, non-finite patch norms, detection-layer patch norms
        self.norm_sums = zeros(2)                     # detection-layer patch norms: sum, sum of squares
        self.norm_max = zeros(())
        self.reference_median: float | None = None   # a typical patch norm, for messages
        self.source = None                            # the images gather_statistics read, if it made these
        self.image_size: tuple[int, int] | None = None

    # ---- counters ------------------------------------------------------------------------
    @property
    def images_seen(self) -> int:
        return int(self.counts[0])

    @property
    def images_with_outliers(self) -> int:
        return int(self.counts[1])

    # ---- update and merge ----------------------------------------------------------------
    def update(self, activations: dict[int, torch.Tensor], norms: dict[int, torch.Tensor]) -> None:
        """Add one batch.

        Args:
            activations: ``{layer: [B, L, N]}`` for every candidate layer.
            norms: ``{layer: [B, P]}`` patch norms of the block outputs of layers 0..detect_layer.
        """
        if self.threshold is None:
            raise InvalidArgumentError("the threshold must be set before statistics are updated")
        detect_norms = norms[self.detect_layer]                                   # [B, P]
        all_norms = torch.stack([norms[layer] for layer in range(self.detect_layer + 1)])   # [layers, B, P]
        if self.reference_median is None:
            self.reference_median = float(detect_norms.median())
        is_outlier = detect_norms > self.threshold                                # [B, P]
        outliers_per_image = is_outlier.sum(dim=1, keepdim=True)                  # [B, 1]
        weights = is_outlier.float() / outliers_per_image.clamp(min=1)            # [B, P], rows sum to 0 or 1
        batch = detect_norms.shape[0]
        self.counts += torch.stack([
            torch.tensor(batch, device=self.counts.device, dtype=torch.float32),
            (outliers_per_image > 0).sum().float(),
            (~torch.isfinite(all_norms)).sum().float(),
            torch.tensor(detect_norms.numel(), device=self.counts.device, dtype=torch.float32)])

        seq_len = activations[next(iter(self.score_sums))].shape[1]
        token_weights = weights.new_zeros(batch, seq_len)                        # [B, L], zero off the patches
        token_weights[:, self.layout.patches(seq_len)] = weights
        for layer, total in self.score_sums.items():
            total += self._layer_scores(activations[layer], token_weights)

        medians = all_norms.median(dim=-1).values.clamp_min(torch.finfo(torch.float32).tiny)
        outlier_means = (all_norms * weights).sum(dim=-1)                        # [layers, B]
        self.ratio_sums += (outlier_means / medians).sum(dim=-1)
        self.norm_max = torch.maximum(self.norm_max, detect_norms.max())
        self.norm_sums += torch.stack([detect_norms.sum(), detect_norms.square().sum()])

    def _layer_scores(self, acts: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
        """Summed over the batch: each image's mean activation over its outliers, [N]."""
        batch, seq_len = token_weights.shape
        if self.sparsity is None:
            weights = token_weights.reshape(-1)                                  # [B*L], nonzero at outliers only
            flat = acts.reshape(batch * seq_len, -1)
            if self.outlier_rows:   # outliers are few: read their rows, not the whole tensor
                rows = weights.nonzero()[:, 0]
                weights, flat = weights[rows], flat[rows]
            flat = flat.float()                                                  # a copy only for bf16/fp16
            if self.score == "abs":
                flat = flat.abs()
            return weights @ flat                                                # [N], summed in float32
        values = acts.float().abs() if self.score == "abs" else acts.float()
        per_image = torch.bmm(token_weights[:, None, :], values)[:, 0]           # [B, N]
        activation_threshold, frac_threshold = self.sparsity
        image_acts = acts[:, self.layout.image_tokens(seq_len)]                  # [B, T, N]
        sparse = (image_acts < activation_threshold).float().mean(dim=1) >= frac_threshold   # [B, N]
        return (per_image * sparse).sum(dim=0)

    def _tensors(self) -> list[tuple[torch.Tensor, str]]:
        return [*((total, "sum") for total in self.score_sums.values()), (self.ratio_sums, "sum"),
                (self.counts, "sum"), (self.norm_sums, "sum"), (self.norm_max, "max")]

    def _settings(self) -> tuple:
        """What two statistics must share to be merged (besides the model and the threshold)."""
        return (self.detect_layer, self.score, self.sparsity, self.layout.num_cls, self.layout.num_trained_registers,
                {layer: len(total) for layer, total in self.score_sums.items()})

    def _check_compatible(self, other: "DiscoveryStatistics") -> None:
        if self._settings() != other._settings() or (self.model, self.threshold) != (other.model, other.threshold):
            raise InvalidArgumentError("cannot merge statistics gathered with different models, settings or thresholds")

    def merge(self, other: "DiscoveryStatistics") -> "DiscoveryStatistics":
        """Add ``other``'s images to these statistics (in place); returns ``self``."""
        self._check_compatible(other)
        for (mine, op), (theirs, _) in zip(self._tensors(), other._tensors()):
            if op == "max":
                mine.copy_(torch.maximum(mine, theirs.to(mine.device)))
            else:
                mine += theirs.to(mine.device)
        self.reference_median = self.reference_median if self.reference_median is not None else other.reference_median
        self.image_size = self.image_size or other.image_size
        return self

    def all_reduce(self) -> None:
        """Merge the statistics of every torch.distributed rank, on every rank (in place)."""
        if not distributed.is_distributed():
            return
        for tensor, op in self._tensors():
            distributed.all_reduce(tensor, op)
        self.reference_median, self.image_size = distributed.broadcast_object(
            (self.reference_median, self.image_size))

    # ---- saving ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, so that ``torch.load(weights_only=True)`` reads it."""
        return {
            "detect_layer": self.detect_layer, "score": self.score, "model": self.model,
            "threshold_mode": self.threshold_mode,
            "sparsity": list(self.sparsity) if self.sparsity else None, "threshold": self.threshold,
            "num_cls": self.layout.num_cls, "num_trained_registers": self.layout.num_trained_registers,
            "score_sums": {layer: total.cpu() for layer, total in self.score_sums.items()},
            "ratio_sums": self.ratio_sums.cpu(), "counts": self.counts.cpu(), "norm_sums": self.norm_sums.cpu(),
            "norm_max": self.norm_max.cpu(), "reference_median": self.reference_median,
            "image_size": list(self.image_size) if self.image_size else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        settings = (state["detect_layer"], state["score"], tuple(state["sparsity"]) if state["sparsity"] else None,
                    state["num_cls"], state["num_trained_registers"],
                    {layer: len(total) for layer, total in state["score_sums"].items()})
        if settings != self._settings() or self.model not in (UNKNOWN_MODEL, state["model"]):
            raise InvalidArgumentError("these statistics were gathered with another model or other discovery settings")
        device = self.counts.device
        self.threshold, self.threshold_mode, self.model = state["threshold"], state["threshold_mode"], state["model"]
        for layer, total in state["score_sums"].items():
            self.score_sums[layer] = total.to(device)
        self.ratio_sums, self.counts = state["ratio_sums"].to(device), state["counts"].to(device)
        self.norm_sums, self.norm_max = state["norm_sums"].to(device), state["norm_max"].to(device)
        self.reference_median = state["reference_median"]
        self.image_size = tuple(state["image_size"]) if state["image_size"] else None

    # ---- the result ------------------------------------------------------------------------
    def finalize(self, *, top_k: int = 10, highest_layer: int | Literal["auto"] = AUTO) -> RegisterNeurons:
        """The ``top_k`` neurons of layers up to ``highest_layer``, best first.

        Raises:
            ImageSourceError: no image was seen.
            NonFiniteActivationsError: NaN or infinite patch norms.
            NoOutliersError: no image had an outlier; the message suggests a threshold.
        """
        check_int("top_k", top_k)
        gathered = max(self.score_sums)
        if highest_layer != AUTO and (isinstance(highest_layer, bool) or not isinstance(highest_layer, int)
                                      or not 0 <= highest_layer <= gathered):
            raise InvalidArgumentError(f"highest_layer must be 'auto' or an int in 0..{gathered} (the layers "
                                       f"gathered), got {highest_layer!r}")
        images_seen, with_outliers, non_finite = (int(value) for value in self.counts[:3].tolist())
        if images_seen == 0:
            raise ImageSourceError("no images were given")
        if non_finite:
            raise NonFiniteActivationsError(
                f"the model produced {non_finite} NaN or infinite patch norms in blocks 0..{self.detect_layer}; "
                "this is usually overflow: run it in float32 or bfloat16")
        if with_outliers == 0:
            raise NoOutliersError(self._no_outlier_message())
        ratios = (self.ratio_sums / with_outliers).tolist()
        if highest_layer == AUTO:
            highest_layer = _stand_out_layer(ratios, self.detect_layer)
        layers = [layer for layer in self.score_sums if layer <= highest_layer]
        scores = torch.cat([self.score_sums[layer] / with_outliers for layer in layers])
        layer_ids = torch.cat([torch.full((len(self.score_sums[layer]),), layer) for layer in layers])
        neuron_ids = torch.cat([torch.arange(len(self.score_sums[layer])) for layer in layers])
        best = scores.topk(min(top_k, len(scores)))
        indices = best.indices.cpu()
        ranked = [RegisterNeuron(layer, neuron, value) for layer, neuron, value in zip(
            layer_ids[indices].tolist(), neuron_ids[indices].tolist(), best.values.tolist())]
        if len(ranked) < top_k:
            log.warning("only %d candidate neurons exist in layers 0..%d (top_k=%d)", len(ranked), highest_layer, top_k)
        width = max(len(total) for total in self.score_sums.values())
        candidate_scores = torch.full((gathered + 1, width), float("nan"))    # [layers, neurons]
        for layer, total in self.score_sums.items():
            candidate_scores[layer, :len(total)] = (total / with_outliers).cpu()
        return RegisterNeurons(
            candidate_scores=candidate_scores, neurons=ranked, model=self.model, detect_layer=self.detect_layer, threshold=float(self.threshold),
            highest_layer=highest_layer, images_seen=images_seen, images_with_outliers=with_outliers,
            image_size=self.image_size, score=self.score, source="find_register_neurons",
            extra={"threshold_mode": self.threshold_mode, "sparsity_filter": self.sparsity is not None,
                   "outlier_norm_ratio_by_layer": [round(r, 4) for r in ratios]},
        )

    def _no_outlier_message(self) -> str:
        largest = float(self.norm_max)
        count = float(self.counts[3])
        mean = float(self.norm_sums[0]) / count
        std = max(float(self.norm_sums[1]) / count - mean ** 2, 0.0) ** 0.5
        median = self.reference_median or float("nan")
        suggestion = mean + 3 * std if mean + 3 * std < largest else 0.9 * largest
        if self.threshold_mode == AUTO:
            verdict = (f"this model shows no high-norm outliers at layer {self.detect_layer}: the largest patch "
                       f"norm in {self.images_seen} images is {largest:.4g}, {largest / median:.1f}x the median "
                       f"patch norm {median:.4g}, below the automatic threshold {self.threshold:.4g}")
        else:
            verdict = (f"no patch norm at layer {self.detect_layer} exceeded the threshold {self.threshold:.4g} in "
                       f"{self.images_seen} images; the largest was {largest:.4g} "
                       f"({largest / median:.1f}x the median patch norm {median:.4g})")
        return (f"{verdict}. To force a search anyway, try threshold={suggestion:.4g} "
                f"(mean + 3 sigma of the patch norms, the paper's heuristic) or another detect_layer.")


def find_register_neurons(hook_manager: HookManager, images, preprocess: Callable | None = None, *,
                          top_k: int | Literal["auto"] = 10, highest_layer: int | Literal["auto"] = AUTO,
                          held_out=None, target_ratio: float = AUTO_TARGET_RATIO, max_top_k: int = AUTO_MAX_TOP_K,
                          **options) -> RegisterNeurons:
    """Find the MLP neurons that write the high-norm outlier tokens.

    Gathers the statistics with :func:`gather_statistics` (every option of which it takes) and
    returns their ``top_k`` neurons of layers up to ``highest_layer``, best first: the last
    candidate layer, or with ``"auto"``, the first layer at which the outlier positions stand
    out in norm.

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
    """
    automatic = top_k == AUTO
    if automatic:   # before the pass, not after it
        if held_out is None:
            raise InvalidArgumentError("top_k='auto' needs held_out images, on which k is chosen")
        check_int("max_top_k", max_top_k)
        _check_target_ratio(target_ratio)
    else:
        check_int("top_k", top_k)
    stats = gather_statistics(hook_manager, images, preprocess, highest_layer=highest_layer, **options)
    result = stats.finalize(top_k=max_top_k if automatic else top_k, highest_layer=highest_layer)
    if automatic:
        result = choose_top_k(hook_manager, result, held_out, preprocess, target_ratio=target_ratio,
                              batch_size=options.get("batch_size", 32), workers=options.get("workers", 0))
    skipped = _total_skipped(stats.source)
    if skipped is not None:
        result.extra["files_skipped"] = skipped
    return result


def gather_statistics(
    hook_manager: HookManager,
    images,
    preprocess: Callable | None = None,
    *,
    threshold: float | Literal["auto"] = AUTO,
    detect_layer: int | None = None,
    highest_layer: int | Literal["auto"] = AUTO,
    score: Literal["raw", "abs"] = "raw",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    sparsity_filter: bool = False,
    sparsity_activation_threshold: float = SPARSITY_ACTIVATION_THRESHOLD,
    sparsity_frac_threshold: float = SPARSITY_FRAC_THRESHOLD,
    seed: int = 0,
    workers: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
) -> DiscoveryStatistics:
    """Run the model over ``images`` and gather Algorithm 1's statistics (see :func:`find_register_neurons`).

    Args:
        hook_manager: the model, described by its architecture's :class:`HookManager`.
        images: a folder path, an :class:`~test_time_registers.images.ImageFolder`, a list of
            PIL images, a preprocessed tensor [N, 3, H, W], or any iterable of PIL images or of
            preprocessed batches (such as your own ``DataLoader``).
        preprocess: PIL image -> tensor [3, H, W]; not needed for tensors.
        threshold: patch-norm threshold at ``detect_layer``, or ``"auto"``: a robust threshold
            (see :func:`auto_threshold`) from the patch norms of a seeded random sample of 32
            images, whatever the batch size. The sample is visited first (smaller batches are
            held until it is in). For a folder it is drawn from the sorted file list with the
            folder's seed, so the order of the files does not matter; for a list or tensor, from
            the positions with ``seed``; an iterable of unknown length gives its first 32.
        detect_layer: block whose output is searched for outliers; default the hook
            manager's ``default_detect_layer``.
        highest_layer: last layer whose neurons are candidates, or ``"auto"``: every layer up to
            ``detect_layer`` is gathered, and :meth:`DiscoveryStatistics.finalize` picks.
        score: ``"raw"`` averages activations (the paper); ``"abs"`` averages their absolute
            values (the reference implementation).
        batch_size: images per forward pass.
        device: where the images go and the statistics live; must be the model's device.
        sparsity_filter: the reference code's filter. Per image with outliers, a neuron's score
            counts only if its activation is below ``sparsity_activation_threshold`` on at least
            ``sparsity_frac_threshold`` of that image's tokens (CLS, trained registers and
            patches); otherwise that image contributes 0 for it. The mean is still taken over
            all images with outliers.
        seed: draws the calibration sample of a list or tensor of images.
        workers: DataLoader processes that decode and preprocess a folder's images.
        checkpoint: save the statistics to this file (atomically) every ``checkpoint_every``
            batches once the threshold is known, and at the end. Under torch.distributed each
            rank writes ``NAME.rankR-of-W.SUFFIX``.
        resume: continue from ``checkpoint``, which must come from a run with the same model,
            images and settings; the result is the one an uninterrupted run gives.
        progress: show a progress bar.

    Under torch.distributed (``torchrun``), each rank reads its shard of the images (positions
    ``rank, rank + world, ...``), the ranks calibrate the automatic threshold together on the
    same sample one process would use, and their statistics are merged with ``all_reduce``:
    every rank gets the statistics one process would have gathered.

    Returns:
        :class:`DiscoveryStatistics`; ``.source`` is the image source as it was read.

    Raises:
        ImageSourceError: no readable image.
        InvalidArgumentError: bad settings, or a checkpoint that does not match them.
    """
    detect_layer, candidate_layers = check_discovery_arguments(hook_manager, 1, threshold, detect_layer,  # top_k: later
                                                               highest_layer, score)
    for name, value in (("sparsity_activation_threshold", sparsity_activation_threshold),
                        ("sparsity_frac_threshold", sparsity_frac_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    check_int("checkpoint_every", checkpoint_every)
    if resume and checkpoint is None:
        raise InvalidArgumentError("resume needs the checkpoint to resume from")
    model_device = hook_manager.device
    if device is not None and not _same_device(torch.device(device), model_device):
        raise InvalidArgumentError(f"the model is on {model_device} but device={device}; move the model first")

    images = image_source(images)
    if threshold == AUTO:
        images = calibration_first(images, AUTO_CALIBRATION_IMAGES, seed)
    source = ordered_source(images)
    shard = distributed.current_shard()
    sparsity = (float(sparsity_activation_threshold), float(sparsity_frac_threshold)) if sparsity_filter else None
    stats = DiscoveryStatistics({layer: hook_manager.num_neurons(layer) for layer in candidate_layers}, detect_layer,
                                hook_manager.layout, threshold=None if threshold == AUTO else float(threshold),
                                score=score, sparsity=sparsity, device=model_device, model=hook_manager.name)
    settings = {"model": hook_manager.name, "detect_layer": detect_layer, "candidate_layers": len(candidate_layers),
                "score": score, "sparsity": list(sparsity) if sparsity else None, "threshold": str(threshold),
                "batch_size": batch_size, "seed": seed, "images": len(source) if source is not None else None,
                "image_names": source.fingerprint if source is not None else None,
                "rank": shard.rank, "world": shard.world}
    saver = _Checkpoints(checkpoint, shard, settings, images) if checkpoint is not None else None
    consumed = saver.restore(stats) if resume else 0

    runner = _Pass(hook_manager, stats, candidate_layers, detect_layer, shard, ordered=source is not None)
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


def _check_target_ratio(target_ratio) -> float:
    if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not target_ratio >= 1:
        raise InvalidArgumentError(f"target_ratio must be a number of at least 1 (a largest / median patch norm), "
                                   f"got {target_ratio!r}")
    return float(target_ratio)


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
    from .analysis.metrics import measure_outliers
    from .intervention import ModifiedModel

    target_ratio = _check_target_ratio(target_ratio)
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
            ratios[k] = measure_outliers(modified, pixels, detect_layer=detect_layer,
                                         batch_size=batch_size).max_over_median
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


def _total_skipped(images) -> int | None:
    """Distinct unreadable files of a folder over every rank, or ``None`` for other sources."""
    if not isinstance(images, ImageFolder):
        return None
    names = distributed.all_gather_objects(images.skipped_names())
    return len(set().union(*names))


class _Pass:
    """The hooks of one discovery pass, and the batches held until the automatic threshold is known."""

    def __init__(self, hook_manager: HookManager, stats: DiscoveryStatistics, candidate_layers: list[int],
                 detect_layer: int, shard: Shard, ordered: bool):
        self.hook_manager, self.stats, self.shard, self.ordered = hook_manager, stats, shard, ordered
        self.candidate_layers, self.detect_layer = candidate_layers, detect_layer
        self.activations: dict[int, torch.Tensor] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self.held: list[tuple[dict, dict, list[int]]] = []   # (activations, norms, sample positions) per batch
        self.held_buffers: dict[int, torch.Tensor] = {}      # the buffers of the last held batch
        # The sample is the first AUTO_CALIBRATION_IMAGES readable images in position order. Positions
        # below ``bound`` are gathered in rounds, the bound doubling while too few of them were readable.
        self.bound = AUTO_CALIBRATION_IMAGES

    def attach(self, hooks) -> None:
        for layer in self.candidate_layers:
            hooks.on_neurons(layer, self._keep_activations(layer))
        for layer in range(self.detect_layer + 1):
            hooks.on_block_output(layer, self._keep_patch_norms(layer))
        hooks.stop_after_block(self.detect_layer)

    def _keep_activations(self, layer: int):
        # Copied into a buffer that lives across batches. Holding the model's own tensor instead
        # would keep the allocator from reusing its memory, and fresh memory for every layer of
        # every batch costs more (page faults, zeroing) than this copy.
        def keep(tensor):
            buffer = self.buffers.get(layer)
            if (buffer is None or buffer.shape[0] < tensor.shape[0] or buffer.shape[1:] != tensor.shape[1:]
                    or buffer.dtype != tensor.dtype):
                buffer = self.buffers[layer] = torch.empty_like(tensor)
            self.activations[layer] = buffer[:tensor.shape[0]].copy_(tensor)

        return keep

    def _keep_patch_norms(self, layer: int):
        def keep(residual):
            patches = residual[:, self.hook_manager.layout.patches(residual.shape[1])]
            self.norms[layer] = torch.linalg.vector_norm(patches.float(), dim=-1)   # [B, P]

        return keep

    def run(self, batch) -> None:
        try:
            self.hook_manager.forward_images(batch.pixel_values)
        except StopForward:
            pass
        self.stats.image_size = tuple(batch.pixel_values.shape[-2:])
        if self.stats.threshold is not None:
            self.stats.update(self.activations, self.norms)
        else:   # held until the sample is in: the buffers now belong to the held batch
            positions = batch.positions if self.ordered else [p * self.shard.world + self.shard.rank
                                                              for p in batch.positions]
            self.held.append((dict(self.activations), dict(self.norms), positions))
            self.held_buffers, self.buffers = self.buffers, {}
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
        self.buffers = self.buffers or self.held_buffers   # reused from now on, not allocated anew
        self.held_buffers = {}


class _Checkpoints:
    """Discovery's statistics on disk, written atomically, checked against the run that reads them."""

    def __init__(self, path: str | os.PathLike, shard: Shard, settings: dict[str, Any], images):
        path = Path(path)
        if shard.world > 1:
            path = path.with_name(f"{path.stem}.rank{shard.rank}-of-{shard.world}{path.suffix}")
        self.path, self.settings, self.images = path, settings, images

    def save(self, stats: DiscoveryStatistics, consumed: int, complete: bool = False) -> None:
        skipped = self.images.skipped_names() if isinstance(self.images, ImageFolder) else []
        state = {"format": CHECKPOINT_FORMAT, "settings": self.settings, "statistics": stats.state_dict(),
                 "consumed": consumed, "skipped": skipped, "complete": complete}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            torch.save(state, temporary)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        log.info("checkpoint: %d images done, saved to %s", consumed, self.path)

    def remove_stale(self) -> None:
        """Temporary files a killed save left behind (only this checkpoint's own)."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def restore(self, stats: DiscoveryStatistics) -> int:
        """Load the statistics into ``stats``; returns how many of this shard's positions were done."""
        self.remove_stale()
        if not self.path.is_file():
            raise InvalidArgumentError(f"no checkpoint to resume from at {self.path}")
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as error:  # truncated or foreign files
            raise InvalidArgumentError(f"{self.path} is not a readable discovery checkpoint ({error})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise InvalidArgumentError(f"{self.path} is not a discovery checkpoint of format {CHECKPOINT_FORMAT}")
        differences = [f"{key} {state['settings'].get(key)!r}, not {value!r}"
                       for key, value in self.settings.items() if state["settings"].get(key) != value]
        if differences:
            raise InvalidArgumentError(f"{self.path} was written by a run with other settings ({'; '.join(differences)}); "
                                       "resume with the same model, images and flags, or start again without resume")
        stats.load_state_dict(state["statistics"])
        if isinstance(self.images, ImageFolder):
            self.images.skipped_files.update(self.images.root / name for name in state["skipped"])
        log.info("resuming from %s: %d images done", self.path, state["consumed"])
        return int(state["consumed"])


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    return wanted.type == actual.type and wanted.index in (None, actual.index)


def check_discovery_arguments(hook_manager, top_k=10, threshold=AUTO, detect_layer=None, highest_layer=AUTO,
                              score="raw") -> tuple[int, list[int]]:
    """Validate discovery's settings for this model; return (detect layer, candidate layers).

    Raises :class:`InvalidArgumentError` (also a ValueError) for bad values, layers the model
    does not have, or layers out of order.
    """
    check_int("top_k", top_k)
    if threshold != AUTO:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise InvalidArgumentError(f"threshold must be a positive number or 'auto', got {threshold!r}")
    if score not in ("raw", "abs"):
        raise InvalidArgumentError(f"score must be 'raw' or 'abs', got {score!r}")
    detect_layer = hook_manager.default_detect_layer if detect_layer is None else detect_layer
    hook_manager.check_layer(detect_layer, "detect_layer")
    if highest_layer == AUTO:
        candidate_layers = list(range(detect_layer + 1))
    else:
        hook_manager.check_layer(highest_layer, "highest_layer")
        if highest_layer > detect_layer:
            raise InvalidArgumentError(f"highest_layer ({highest_layer}) cannot be after detect_layer ({detect_layer}): "
                             "later neurons cannot write the outliers seen there")
        candidate_layers = list(range(highest_layer + 1))
    return detect_layer, candidate_layers


def _stand_out_layer(ratios: list[float], detect_layer: int) -> int:
    """First layer whose outlier positions are clearly above the median patch norm."""
    bar = max(STAND_OUT_MIN_RATIO, STAND_OUT_FRACTION * ratios[detect_layer])
    for layer, ratio in enumerate(ratios):
        if ratio >= bar:
            return layer
    log.warning("the outliers never reach %.1fx the median norm; using highest_layer=%d", bar, detect_layer)
    return detect_layer
