"""Algorithm 1's pure part: its settings, the automatic threshold and the running statistics.

Nothing here runs a model or reads an image. :class:`DiscoverySettings` holds and checks what a
discovery run is asked for (written once, for :func:`~test_time_registers.find_register_neurons`,
:func:`~test_time_registers.gather_statistics`, their checkpoints and the command line);
:func:`auto_threshold` turns patch norms into an outlier threshold; :class:`DiscoveryStatistics`
adds batches of activations and patch norms to running sums on the device, merges, saves and
restores them, and finalizes them into :class:`~test_time_registers.RegisterNeurons`. The data
loop that feeds them is :mod:`test_time_registers.discovery`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from . import distributed
from .errors import (CheckpointError, ImageSourceError, InvalidArgumentError, NonFiniteActivationsError, NoOutliersError,
                     check_int)
from .files import finite_number
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


#: On the CPU, outlier rows are gathered when fewer than 1 / DENSE_FRACTION of the tokens are outliers;
#: above it one dense product reads the activations once instead of copying most of them.
DENSE_FRACTION = 4


def check_target_ratio(target_ratio) -> float:
    if not finite_number(target_ratio) or not target_ratio >= 1:
        raise InvalidArgumentError(f"target_ratio must be a finite number of at least 1 (a largest / median patch norm), "
                                   f"got {target_ratio!r}")
    return float(target_ratio)


@dataclass(frozen=True)
class DiscoverySettings:
    """What a discovery run is asked for, checked on construction (values) and by :meth:`layers` (against a model).

    The one list of Algorithm 1's settings: :func:`~test_time_registers.find_register_neurons` and
    :func:`~test_time_registers.gather_statistics` take these fields as keywords, checkpoints
    record them, and the command line's discovery flags are named after them.

    Args:
        top_k: how many neurons to keep, or ``"auto"``: the fewest that bring held-out images'
            largest / median patch norm to ``target_ratio`` with one test-time register (at most ``max_top_k``).
        threshold: patch-norm threshold at ``detect_layer``, or ``"auto"`` (see :func:`auto_threshold`).
        detect_layer: block whose output is searched for outliers; ``None``: the model's default.
        highest_layer: last layer whose neurons are candidates, or ``"auto"``: where the outliers first stand out.
        score: ``"raw"`` averages activations (the paper); ``"abs"`` their absolute values (the reference code).
        sparsity_filter, sparsity_activation_threshold, sparsity_frac_threshold: the reference code's
            filter (see :meth:`DiscoveryStatistics.update`).
        target_ratio, max_top_k: for ``top_k="auto"``.

    Raises:
        InvalidArgumentError: a value out of range (also a ValueError).
    """

    top_k: int | Literal["auto"] = 10
    threshold: float | Literal["auto"] = AUTO
    detect_layer: int | None = None
    highest_layer: int | Literal["auto"] = AUTO
    score: Literal["raw", "abs"] = "raw"
    sparsity_filter: bool = False
    sparsity_activation_threshold: float = SPARSITY_ACTIVATION_THRESHOLD
    sparsity_frac_threshold: float = SPARSITY_FRAC_THRESHOLD
    target_ratio: float = AUTO_TARGET_RATIO
    max_top_k: int = AUTO_MAX_TOP_K

    def __post_init__(self):
        if self.top_k == AUTO:
            check_int("max_top_k", self.max_top_k)
            check_target_ratio(self.target_ratio)
        else:
            check_int("top_k", self.top_k)
        if self.threshold != AUTO:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
                raise InvalidArgumentError(f"threshold must be a positive number or 'auto', got {self.threshold!r}")
        if self.score not in ("raw", "abs"):
            raise InvalidArgumentError(f"score must be 'raw' or 'abs', got {self.score!r}")
        for name in ("sparsity_activation_threshold", "sparsity_frac_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgumentError(f"{name} must be a number, got {value!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names, which are also the keywords of discovery's functions."""
        return tuple(field.name for field in fields(cls))

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple["DiscoverySettings", dict[str, Any]]:
        """``(settings, the other options)`` from keyword options that mix both."""
        names = set(cls.names())
        return (cls(**{key: value for key, value in options.items() if key in names}),
                {key: value for key, value in options.items() if key not in names})

    @property
    def automatic_top_k(self) -> bool:
        return self.top_k == AUTO

    @property
    def sparsity(self) -> tuple[float, float] | None:
        """``(activation threshold, fraction threshold)`` of the sparsity filter, or ``None`` without it."""
        if not self.sparsity_filter:
            return None
        return float(self.sparsity_activation_threshold), float(self.sparsity_frac_threshold)

    def layers(self, hook_manager) -> tuple[int, list[int]]:
        """``(detect layer, candidate layers)`` on this model.

        Raises:
            InvalidArgumentError: a layer the model does not have, or ``highest_layer`` after ``detect_layer``.
        """
        detect_layer = hook_manager.default_detect_layer if self.detect_layer is None else self.detect_layer
        hook_manager.check_layer(detect_layer, "detect_layer")
        if self.highest_layer == AUTO:
            return detect_layer, list(range(detect_layer + 1))
        hook_manager.check_layer(self.highest_layer, "highest_layer")
        if self.highest_layer > detect_layer:
            raise InvalidArgumentError(f"highest_layer ({self.highest_layer}) cannot be after detect_layer "
                                       f"({detect_layer}): later neurons cannot write the outliers seen there")
        return detect_layer, list(range(self.highest_layer + 1))


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
                if len(rows) * DENSE_FRACTION < len(weights):   # many: the gather would copy most of it
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
        """Tensors (float32, on the CPU) and plain values only; :func:`check_state` says what each field holds.

        A discovery checkpoint stores the tensors as safetensors and the rest as JSON, so nothing
        is unpickled when it is read back.
        """
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

    def load_state_dict(self, state: dict[str, Any], *, origin: str = "the statistics") -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            CheckpointError: ``state`` is not a state of this kind (see :func:`check_state`); names ``origin``.
            InvalidArgumentError: it is one, but of another model or other discovery settings.
        """
        state = check_state(state, origin)
        settings = (state["detect_layer"], state["score"], tuple(state["sparsity"]) if state["sparsity"] else None,
                    state["num_cls"], state["num_trained_registers"],
                    {layer: len(total) for layer, total in state["score_sums"].items()})
        if settings != self._settings() or self.model not in (UNKNOWN_MODEL, state["model"]):
            raise InvalidArgumentError("these statistics were gathered with another model or other discovery settings")
        device = self.counts.device
        self.threshold, self.threshold_mode, self.model = state["threshold"], state["threshold_mode"], state["model"]
        for layer, total in state["score_sums"].items():
            self.score_sums[layer] = total.to(device, copy=True)
        self.ratio_sums, self.counts = state["ratio_sums"].to(device, copy=True), state["counts"].to(device, copy=True)
        self.norm_sums = state["norm_sums"].to(device, copy=True)
        self.norm_max = state["norm_max"].to(device, copy=True)
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


def _stand_out_layer(ratios: list[float], detect_layer: int) -> int:
    """First layer whose outlier positions are clearly above the median patch norm."""
    bar = max(STAND_OUT_MIN_RATIO, STAND_OUT_FRACTION * ratios[detect_layer])
    for layer, ratio in enumerate(ratios):
        if ratio >= bar:
            return layer
    log.warning("the outliers never reach %.1fx the median norm; using highest_layer=%d", bar, detect_layer)
    return detect_layer


#: The fields of :meth:`DiscoveryStatistics.state_dict`, and its tensors.
STATE_FIELDS = ("detect_layer", "score", "model", "threshold_mode", "sparsity", "threshold", "num_cls",
                "num_trained_registers", "score_sums", "ratio_sums", "counts", "norm_sums", "norm_max",
                "reference_median", "image_size")
STATE_TENSORS = ("ratio_sums", "counts", "norm_sums", "norm_max")
#: Bounds of what a state may declare (far above any real model).
MAX_LAYERS = 4096
MAX_NEURONS = 2**22
MAX_COUNT = 2**24    # float32 counts are exact up to here


def _shown(value: Any) -> str:
    """A short, printable description of a value from a file."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _non_negative_int(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def check_state(state: Any, origin: str) -> dict[str, Any]:
    """``state`` if it is a :meth:`DiscoveryStatistics.state_dict`, field by field; else :class:`CheckpointError`.

    Every field must be present with its type and range; every tensor float32, of the shape its
    fields imply (``score_sums``: ``{0..n-1: [width]}`` with n at most ``detect_layer + 1``;
    ``ratio_sums`` [detect_layer + 1]; ``counts`` [4] of whole numbers with no more images with
    outliers than images; ``norm_sums`` [2]; ``norm_max`` []) and finite. The message names
    ``origin`` (the file), the field and what was expected.
    """
    def refuse(name: str, expected: str, got: Any) -> None:
        raise CheckpointError(f"{origin}: {name} must be {expected}, got {_shown(got)}")

    if not isinstance(state, dict):
        refuse("the statistics", "a dict of DiscoveryStatistics.state_dict()'s fields", state)
    missing = [name for name in STATE_FIELDS if name not in state]
    unknown = sorted(str(name) for name in state if name not in STATE_FIELDS)
    if missing or unknown:
        raise CheckpointError(f"{origin}: the statistics lack {', '.join(missing) or 'nothing'} and have unknown "
                              f"fields {', '.join(_shown(name) for name in unknown[:5]) or 'none'}")
    if not _non_negative_int(state["detect_layer"], MAX_LAYERS - 1):
        refuse("detect_layer", f"an int in 0..{MAX_LAYERS - 1}", state["detect_layer"])
    if state["score"] not in ("raw", "abs"):
        refuse("score", "'raw' or 'abs'", state["score"])
    if not isinstance(state["model"], str):
        refuse("model", "a string", state["model"])
    if state["threshold_mode"] not in ("given", AUTO):
        refuse("threshold_mode", "'given' or 'auto'", state["threshold_mode"])
    sparsity = state["sparsity"]
    if sparsity is not None and not (isinstance(sparsity, (list, tuple)) and len(sparsity) == 2
                                     and all(finite_number(value) for value in sparsity)):
        refuse("sparsity", "null or two finite numbers", sparsity)
    threshold = state["threshold"]
    if threshold is not None and not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                      and threshold > 0):   # math.inf: no image anywhere
        refuse("threshold", "null or a positive number", threshold)
    if state["threshold_mode"] == "given" and threshold is None:
        refuse("threshold", "a number when threshold_mode is 'given'", threshold)
    for name in ("num_cls", "num_trained_registers"):
        if not _non_negative_int(state[name], MAX_LAYERS):
            refuse(name, f"an int in 0..{MAX_LAYERS}", state[name])
    median = state["reference_median"]
    if median is not None and not finite_number(median):
        refuse("reference_median", "null or a finite number", median)
    size = state["image_size"]
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                 and all(_non_negative_int(side, 2**20) and side > 0 for side in size)):
        refuse("image_size", "null or two positive ints", size)

    detect_layer = state["detect_layer"]
    sums = state["score_sums"]
    if not isinstance(sums, dict) or not 1 <= len(sums) <= detect_layer + 1 or \
            not all(_non_negative_int(layer, MAX_LAYERS) for layer in sums) or set(sums) != set(range(len(sums))):
        refuse("score_sums", f"a dict of layers 0..n-1, n in 1..{detect_layer + 1} (up to detect_layer)",
               sorted(map(str, sums))[:8] if isinstance(sums, dict) else sums)
    shapes = {**{f"score_sums[{layer}]": None for layer in sums}, "ratio_sums": [detect_layer + 1], "counts": [4],
              "norm_sums": [2], "norm_max": []}
    tensors = {**{f"score_sums[{layer}]": total for layer, total in sums.items()},
               **{name: state[name] for name in STATE_TENSORS}}
    for name, tensor in tensors.items():
        expected = shapes[name]
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or \
                (expected is None and not (tensor.dim() == 1 and 1 <= len(tensor) <= MAX_NEURONS)) or \
                (expected is not None and list(tensor.shape) != expected):
            shape = f"[{', '.join(map(str, expected))}]" if expected is not None else f"[neurons], 1..{MAX_NEURONS}"
            refuse(name, f"a float32 tensor of shape {shape}", tensor)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{origin}: {name} holds NaN or infinite values; sums must be finite (a run "
                                  "whose model overflowed cannot be resumed: run it in float32)")
    counts = state["counts"].tolist()
    if any(value < 0 or value != math.floor(value) or value > MAX_COUNT * 2**10 for value in counts) or \
            counts[1] > counts[0]:
        refuse("counts", "whole numbers >= 0 (images, images with outliers <= images, non-finite norms, "
               "patch norms)", counts)
    return state
