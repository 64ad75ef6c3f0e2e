"""Finding register neurons (Algorithm 1 of Jiang et al., 2025), in one batched pass.

For every image, the outliers O are the patch tokens whose block-output norm at the
detection layer exceeds the threshold (CLS, trained registers and test-time registers never
count). Every neuron up to ``highest_layer`` is scored by its mean activation over O, and
the scores are averaged over the images that have outliers. Statistics stream on the
model's device: per batch, only that batch's activations are held, and the forward pass
stops right after the detection layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from .errors import ImageSourceError, InvalidArgumentError, NonFiniteActivationsError, NoOutliersError
from .hooks import HookManager, StopForward
from .images import batches, calibration_first, count_hint, image_source, no_images_message
from .neurons import RegisterNeuron, RegisterNeurons

log = logging.getLogger(__name__)

AUTO = "auto"
#: Auto threshold: from the patch norms of the first AUTO_CALIBRATION_IMAGES images, whatever the
#: batch size, ...
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


def auto_threshold(patch_norms: torch.Tensor) -> float:
    """Robust outlier threshold from patch norms of any shape.

    ``max(median + 6 * 1.4826 * MAD, 3 * median)``: outliers are rare, so the median and the
    median absolute deviation (MAD) describe the ordinary patches only.
    """
    flat = patch_norms.detach().flatten().float()
    median = flat.median()
    mad = (flat - median).abs().median()
    return float(torch.maximum(median + AUTO_SIGMAS * MAD_TO_SIGMA * mad, AUTO_MIN_RATIO * median))


@dataclass
class _Stats:
    """Running sums, all on the model's device."""

    score_sums: dict[int, torch.Tensor]               # layer -> [num_neurons]
    ratio_sums: torch.Tensor                          # [detect_layer + 1]
    images_with_outliers: torch.Tensor                # scalar
    norm_max: torch.Tensor                            # scalar, detection layer
    norm_sum: torch.Tensor
    norm_square_sum: torch.Tensor
    non_finite: torch.Tensor                          # scalar, non-finite patch norms in any layer
    norm_count: int = 0
    images_seen: int = 0
    image_size: tuple[int, int] | None = None
    calibration_median: float | None = None


def find_register_neurons(
    hook_manager: HookManager,
    images,
    preprocess: Callable | None = None,
    *,
    top_k: int = 10,
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
    progress: bool = True,
) -> RegisterNeurons:
    """Find the MLP neurons that write the high-norm outlier tokens.

    Args:
        hook_manager: the model, described by its architecture's :class:`HookManager`.
        images: a folder path, an :class:`~test_time_registers.images.ImageFolder`, an iterable of PIL
            images, or a preprocessed tensor [N, 3, H, W].
        preprocess: PIL image -> tensor [3, H, W]; not needed for tensors.
        top_k: how many (layer, neuron) pairs to return, best first.
        threshold: patch-norm threshold at ``detect_layer``, or ``"auto"``: a robust threshold
            (see :func:`auto_threshold`) from the patch norms of a seeded random sample of 32
            images, whatever the batch size. The sample is visited first (smaller batches are
            held until it is in). For a folder it is drawn from the sorted file list with the
            folder's seed, so the order of the files does not matter; for a list or tensor, from
            the positions with ``seed``; an iterable of unknown length gives its first 32.
        detect_layer: block whose output is searched for outliers; default the hook
            manager's ``default_detect_layer``.
        highest_layer: last layer whose neurons are candidates, or ``"auto"``: the first
            layer at which the outlier positions stand out in norm.
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
        progress: show a progress bar.

    Returns:
        :class:`RegisterNeurons` with the threshold and layers actually used.

    Raises:
        NoOutliersError: no image had a patch above the threshold; the message gives the
            largest patch norm seen and a threshold to try.
        ImageSourceError: no readable image.
    """
    layers = check_discovery_arguments(hook_manager, top_k, threshold, detect_layer, highest_layer, score)
    for name, value in (("sparsity_activation_threshold", sparsity_activation_threshold),
                        ("sparsity_frac_threshold", sparsity_frac_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    images = image_source(images)
    if threshold == AUTO:
        images = calibration_first(images, AUTO_CALIBRATION_IMAGES, seed)
    detect_layer, candidate_layers = layers
    model_device = hook_manager.device
    if device is not None and not _same_device(torch.device(device), model_device):
        raise InvalidArgumentError(f"the model is on {model_device} but device={device}; move the model first")

    stats = _new_stats(hook_manager, candidate_layers, detect_layer, model_device)
    given_threshold = None if threshold == AUTO else float(threshold)
    threshold_value = given_threshold
    pending: list[tuple[dict, dict]] = []   # (activations, norms) of batches waiting for the auto threshold
    activations: dict[int, torch.Tensor] = {}
    buffers: dict[int, torch.Tensor] = {}
    norms: dict[int, torch.Tensor] = {}

    def keep_activations(layer):
        # Copied into a buffer that lives for the whole run. Holding the model's own tensor
        # instead would keep the allocator from reusing its memory, and fresh memory for every
        # layer of every batch costs more (page faults, zeroing) than this copy.
        def keep(tensor):
            buffer = buffers.get(layer)
            if (buffer is None or buffer.shape[0] < tensor.shape[0] or buffer.shape[1:] != tensor.shape[1:]
                    or buffer.dtype != tensor.dtype):
                buffer = buffers[layer] = torch.empty_like(tensor)
            activations[layer] = buffer[:tensor.shape[0]].copy_(tensor)

        return keep

    def keep_patch_norms(layer):
        def keep(residual):
            patches = residual[:, hook_manager.layout.patches(residual.shape[1])]
            norms[layer] = torch.linalg.vector_norm(patches.float(), dim=-1)  # [B, P]

        return keep

    sparsity = (sparsity_activation_threshold, sparsity_frac_threshold) if sparsity_filter else None

    def accumulate(batch_activations, batch_norms):
        _accumulate(stats, threshold_value, batch_activations, batch_norms, hook_manager, detect_layer, score,
                    sparsity)

    bar = tqdm(total=count_hint(images), unit="img", desc="finding register neurons", disable=not progress)
    with hook_manager.hooks() as hooks, torch.no_grad():
        for layer in candidate_layers:
            hooks.on_neurons(layer, keep_activations(layer))
        for layer in range(detect_layer + 1):
            hooks.on_block_output(layer, keep_patch_norms(layer))
        hooks.stop_after_block(detect_layer)
        for batch in batches(images, preprocess, batch_size, model_device, hook_manager.input_dtype):
            try:
                hook_manager.forward_images(batch.pixel_values)
            except StopForward:
                pass
            if threshold_value is None and not pending and len(batch.names) >= AUTO_CALIBRATION_IMAGES:
                threshold_value = _calibrate([norms], detect_layer)      # the usual case: no copies
            if threshold_value is not None:
                accumulate(activations, norms)
            else:   # small batches wait until the calibration images are in; held batches are copies
                pending.append(({layer: acts.clone() for layer, acts in activations.items()}, dict(norms)))
                if sum(len(held[detect_layer]) for _, held in pending) >= AUTO_CALIBRATION_IMAGES:
                    threshold_value = _calibrate([held for _, held in pending], detect_layer)
                    for held in pending:
                        accumulate(*held)
                    pending.clear()
            activations.clear()   # free this batch's activations before the next one is prepared
            norms.clear()
            stats.images_seen += len(batch.names)
            stats.image_size = tuple(batch.pixel_values.shape[-2:])
            bar.update(len(batch.names))
        if pending:   # fewer images than the calibration wants: calibrate on all of them
            threshold_value = _calibrate([held for _, held in pending], detect_layer)
            for held in pending:
                accumulate(*held)
    bar.close()
    if stats.images_seen == 0:
        raise ImageSourceError(no_images_message(images))
    return _finish(stats, threshold_value, hook_manager, detect_layer, highest_layer, top_k,
                   score, sparsity_filter, threshold_mode="given" if given_threshold is not None else AUTO)


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    return wanted.type == actual.type and wanted.index in (None, actual.index)


def check_discovery_arguments(hook_manager, top_k=10, threshold=AUTO, detect_layer=None, highest_layer=AUTO,
                              score="raw") -> tuple[int, list[int]]:
    """Validate discovery's settings for this model; return (detect layer, candidate layers).

    Raises :class:`InvalidArgumentError` (also a ValueError) for bad values, layers the model
    does not have, or layers out of order.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidArgumentError(f"top_k must be a positive int, got {top_k!r}")
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


def _new_stats(hook_manager, candidate_layers, detect_layer, device) -> _Stats:
    zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
    return _Stats(
        score_sums={layer: zeros(hook_manager.num_neurons(layer)) for layer in candidate_layers},
        ratio_sums=zeros(detect_layer + 1),
        images_with_outliers=zeros(()),
        norm_max=zeros(()),
        norm_sum=zeros(()),
        norm_square_sum=zeros(()),
        non_finite=zeros(()),
    )


def _calibrate(norm_batches: list[dict[int, torch.Tensor]], detect_layer: int) -> float:
    """The auto threshold from the detection-layer patch norms of the first calibration images."""
    calibration = torch.cat([norms[detect_layer] for norms in norm_batches])[:AUTO_CALIBRATION_IMAGES]
    threshold = auto_threshold(calibration)
    log.info("auto threshold %.4g from the first %d images", threshold, len(calibration))
    return threshold


def _accumulate(stats: _Stats, threshold: float, activations, norms, hook_manager, detect_layer,
                score, sparsity: tuple[float, float] | None) -> None:
    detect_norms = norms[detect_layer]                                       # [B, P]
    all_norms = torch.stack([norms[layer] for layer in range(detect_layer + 1)])   # [layers, B, P]
    stats.non_finite += (~torch.isfinite(all_norms)).sum()
    if stats.calibration_median is None:
        stats.calibration_median = float(detect_norms.median())
    is_outlier = detect_norms > threshold                                    # [B, P]
    counts = is_outlier.sum(dim=1, keepdim=True)                             # [B, 1]
    weights = is_outlier.float() / counts.clamp(min=1)                       # [B, P], rows sum to 0 or 1
    stats.images_with_outliers += (counts > 0).sum()

    layout = hook_manager.layout
    first = activations[next(iter(stats.score_sums))]
    batch, seq_len = first.shape[:2]
    # Weights over every token (zero off the patches), so the activations need no copy
    token_weights = weights.new_zeros(batch, seq_len)                       # [B, L]
    token_weights[:, layout.patches(seq_len)] = weights
    for layer, total in stats.score_sums.items():
        acts = activations[layer]                                            # [B, L, N]
        if sparsity is None:
            flat = acts.reshape(batch * seq_len, -1).float()                 # a copy only for bf16/fp16
            if score == "abs":
                flat = flat.abs()
            total += (token_weights.reshape(1, -1) @ flat)[0]                # [N], summed in float32
            continue
        values = acts.float().abs() if score == "abs" else acts.float()
        per_image = torch.bmm(token_weights[:, None, :], values)[:, 0]       # [B, N]
        activation_threshold, frac_threshold = sparsity
        image_acts = acts[:, layout.image_tokens(seq_len)]                   # [B, T, N]
        sparse = (image_acts < activation_threshold).float().mean(dim=1) >= frac_threshold   # [B, N]
        total += (per_image * sparse).sum(dim=0)

    medians = all_norms.median(dim=-1).values.clamp_min(torch.finfo(torch.float32).tiny)
    outlier_means = (all_norms * weights).sum(dim=-1)                        # [layers, B]
    stats.ratio_sums += (outlier_means / medians).sum(dim=-1)
    stats.norm_max = torch.maximum(stats.norm_max, detect_norms.max())
    stats.norm_sum += detect_norms.sum()
    stats.norm_square_sum += detect_norms.square().sum()
    stats.norm_count += detect_norms.numel()


def _finish(stats: _Stats, threshold, hook_manager, detect_layer, highest_layer, top_k, score,
            sparsity_filter, threshold_mode) -> RegisterNeurons:
    non_finite = int(stats.non_finite.item())
    if non_finite:
        raise NonFiniteActivationsError(
            f"the model produced {non_finite} NaN or infinite patch norms in blocks 0..{detect_layer} "
            f"({hook_manager.input_dtype}); this is usually overflow: run it in float32 or bfloat16")
    with_outliers = int(stats.images_with_outliers.item())
    if with_outliers == 0:
        raise NoOutliersError(_no_outlier_message(stats, threshold, detect_layer, threshold_mode))

    ratios = (stats.ratio_sums / with_outliers).tolist()
    if highest_layer == AUTO:
        highest_layer = _stand_out_layer(ratios, detect_layer)

    layer_ids, neuron_ids, scores = [], [], []
    for layer in range(highest_layer + 1):
        layer_scores = stats.score_sums[layer] / with_outliers
        scores.append(layer_scores)
        layer_ids.append(torch.full_like(layer_scores, layer, dtype=torch.long))
        neuron_ids.append(torch.arange(len(layer_scores), device=layer_scores.device))
    flat_scores = torch.cat(scores)
    best = flat_scores.topk(min(top_k, len(flat_scores)))
    ranked = [RegisterNeuron(layer, neuron, value) for layer, neuron, value in zip(
        torch.cat(layer_ids)[best.indices].tolist(), torch.cat(neuron_ids)[best.indices].tolist(),
        best.values.tolist())]
    if len(ranked) < top_k:
        log.warning("only %d candidate neurons exist in layers 0..%d (top_k=%d)", len(ranked), highest_layer, top_k)
    return RegisterNeurons(
        neurons=ranked,
        model=hook_manager.name,
        detect_layer=detect_layer,
        threshold=float(threshold),
        highest_layer=highest_layer,
        images_seen=stats.images_seen,
        images_with_outliers=with_outliers,
        image_size=stats.image_size,
        score=score,
        source="find_register_neurons",
        extra={"threshold_mode": threshold_mode, "sparsity_filter": sparsity_filter,
               "outlier_norm_ratio_by_layer": [round(r, 4) for r in ratios]},
    )


def _stand_out_layer(ratios: list[float], detect_layer: int) -> int:
    """First layer whose outlier positions are clearly above the median patch norm."""
    bar = max(STAND_OUT_MIN_RATIO, STAND_OUT_FRACTION * ratios[detect_layer])
    for layer, ratio in enumerate(ratios):
        if ratio >= bar:
            return layer
    log.warning("the outliers never reach %.1fx the median norm; using highest_layer=%d", bar, detect_layer)
    return detect_layer


def _no_outlier_message(stats: _Stats, threshold, detect_layer, threshold_mode) -> str:
    largest = float(stats.norm_max)
    median = stats.calibration_median or float("nan")
    mean = float(stats.norm_sum) / stats.norm_count
    std = max(float(stats.norm_square_sum) / stats.norm_count - mean ** 2, 0.0) ** 0.5
    suggestion = mean + 3 * std if mean + 3 * std < largest else 0.9 * largest
    if threshold_mode == AUTO:
        verdict = (f"this model shows no high-norm outliers at layer {detect_layer}: the largest patch "
                   f"norm in {stats.images_seen} images is {largest:.4g}, {largest / median:.1f}x the median "
                   f"patch norm {median:.4g}, below the automatic threshold {threshold:.4g}")
    else:
        verdict = (f"no patch norm at layer {detect_layer} exceeded the threshold {threshold:.4g} in "
                   f"{stats.images_seen} images; the largest was {largest:.4g} "
                   f"({largest / median:.1f}x the median patch norm {median:.4g})")
    return (f"{verdict}. To force a search anyway, try threshold={suggestion:.4g} "
            f"(mean + 3 sigma of the patch norms, the paper's heuristic) or another detect_layer.")
