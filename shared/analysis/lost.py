"""LOST object discovery (Siméoni et al., BMVC 2021), as published, and the paper's variant of it.

The published algorithm, on one image's patch features F [P, D]:

1. affinity ``A = F Fᵀ`` (plus ``bias``, which the paper sweeps);
2. each patch's degree: how many *other* patches it has positive affinity with;
3. the seed: the patch of lowest degree (the first, on ties);
4. the seed's expansion: of the ``potential_seeds`` (100) lowest-degree patches, those with positive
   affinity to the seed (the seed itself included);
5. the mask: the patches whose summed affinity to the expansion is positive;
6. the box: around the 4-connected part of the mask that holds the seed.

The official code's default features are the last block's keys, heads concatenated, CLS
excluded (``--which_features k``), neither normalised nor biased. Jiang et al. (Table 5) run it
on the values for OpenCLIP and the keys for DINOv2, L2-normalised, keep the best of the last
four layers and sweep a bias on the affinity over [-1, 0]. :data:`LOST_PRESETS` names both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidArgumentError

#: LOST: the number of lowest-degree patches that may join the seed's expansion.
LOST_POTENTIAL_SEEDS = 100
#: What LOST may read: the attention's keys, queries or values (heads concatenated), or the block's output.
LOST_FEATURES = ("keys", "queries", "values", "tokens")
#: The paper's bias sweep: -1.0, -0.9, ..., 0.0.
PAPER_BIASES = tuple(round(-1 + step / 10, 1) for step in range(11))


@dataclass(frozen=True)
class LostSettings:
    """Which features LOST reads and how.

    Attributes:
        features: one of :data:`LOST_FEATURES`.
        layers: blocks to try, negative counting from the end (``(-1,)``: the last block); with
            more than one (or more than one bias), every combination is scored and the best
            CorLoc is kept, with its layer and bias reported.
        normalize: L2-normalise each patch's features before the affinity.
        biases: added to the affinity; the best is kept.
        potential_seeds: how many lowest-degree patches may join the seed.
    """

    features: str = "keys"
    layers: tuple[int, ...] = (-1,)
    normalize: bool = False
    biases: tuple[float, ...] = (0.0,)
    potential_seeds: int = LOST_POTENTIAL_SEEDS

    def __post_init__(self):
        if self.features not in LOST_FEATURES:
            raise InvalidArgumentError(f"LOST features must be one of {', '.join(LOST_FEATURES)}, got {self.features!r}")
        if not self.layers or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in self.layers):
            raise InvalidArgumentError(f"LOST layers must be a non-empty tuple of ints, got {self.layers!r}")
        if not self.biases or not all(np.isfinite(bias) for bias in self.biases):
            raise InvalidArgumentError(f"LOST biases must be finite numbers, got {self.biases!r}")
        if not isinstance(self.potential_seeds, int) or self.potential_seeds < 1:
            raise InvalidArgumentError(f"LOST potential_seeds must be a positive int, got {self.potential_seeds!r}")

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers as block indices 0..num_layers-1, in the order given, without repeats."""
        resolved = []
        for layer in self.layers:
            index = layer + num_layers if layer < 0 else layer
            if not 0 <= index < num_layers:
                raise InvalidArgumentError(f"LOST layer {layer} does not exist in a model of {num_layers} blocks")
            if index not in resolved:
                resolved.append(index)
        return tuple(resolved)

    @property
    def sweeps(self) -> bool:
        return len(self.layers) > 1 or len(self.biases) > 1

    def describe(self) -> str:
        parts = [self.features, "normalised" if self.normalize else "raw"]
        if len(self.layers) > 1:
            parts.append(f"best of layers {', '.join(str(layer) for layer in self.layers)}")
        elif self.layers != (-1,):
            parts.append(f"layer {self.layers[0]}")
        if len(self.biases) > 1:
            parts.append(f"best bias in [{min(self.biases):g}, {max(self.biases):g}]")
        elif self.biases != (0.0,):
            parts.append(f"bias {self.biases[0]:g}")
        return ", ".join(parts)


#: ``"lost"``: the official algorithm's defaults; ``"paper-openclip"`` and ``"paper-dinov2"``: Table 5 of Jiang et al.
LOST_PRESETS = {
    "lost": LostSettings(),
    "paper-openclip": LostSettings("values", (-4, -3, -2, -1), True, PAPER_BIASES),
    "paper-dinov2": LostSettings("keys", (-4, -3, -2, -1), True, PAPER_BIASES),
}


@dataclass(frozen=True)
class LostBox:
    """LOST's answer for one image, in patches: ``box`` (left, top, right, bottom; right/bottom
    exclusive) and ``seed`` (row, col). ``seed_only`` when nothing had positive affinity to the seed
    (possible with a negative bias) and the box is the seed's patch alone."""

    box: tuple[int, int, int, int]
    seed: tuple[int, int]
    seed_only: bool = False


def lost_boxes(features: torch.Tensor, grid: tuple[int, int], *, bias: float = 0.0, normalize: bool = False,
               potential_seeds: int = LOST_POTENTIAL_SEEDS) -> list[LostBox]:
    """LOST on a batch of images' patch features [B, P, D] (row-major over ``grid`` (rows, cols)).

    The affinities, degrees, seeds and masks are computed on the features' device, batched; only
    the connected component is found on the CPU.
    """
    rows, cols = grid
    if features.ndim != 3 or features.shape[1] != rows * cols:
        raise InvalidArgumentError(f"LOST needs patch features [B, {rows * cols}, D] for a {rows}x{cols} grid, "
                                   f"got {tuple(features.shape)}")
    features = features.float()
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    affinity = features @ features.transpose(1, 2) + bias                          # [B, P, P]
    others = affinity.clone()
    others.diagonal(dim1=1, dim2=2).fill_(0)
    degree = (others > 0).sum(dim=2)                                               # [B, P]
    order = degree.argsort(dim=1, stable=True)                                     # lowest degree first
    seeds = order[:, 0]                                                            # [B]
    potentials = order[:, :potential_seeds]                                        # [B, K]
    batch = torch.arange(len(features), device=features.device)
    to_seed = affinity[batch[:, None], seeds[:, None], potentials]                 # [B, K]
    expansion = torch.zeros_like(degree, dtype=features.dtype)
    expansion.scatter_(1, potentials, (to_seed > 0).to(features.dtype))            # [B, P] 1 where in the expansion
    summed = (expansion[:, :, None] * affinity).sum(dim=1)                         # [B, P]
    masks = (summed > 0).reshape(-1, rows, cols).cpu().numpy()
    answers = []
    for mask, seed in zip(masks, seeds.tolist()):
        start = divmod(seed, cols)
        if not mask[start]:
            row, col = start
            answers.append(LostBox((col, row, col + 1, row + 1), start, seed_only=True))
            continue
        ys, xs = np.nonzero(connected_component(mask, start))
        answers.append(LostBox((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), start))
    return answers


def connected_component(mask: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """The 4-connected part of ``mask`` [rows, cols] that contains ``start`` (which must be in it)."""
    reached = np.zeros_like(mask, dtype=bool)
    reached[start] = True
    frontier = [start]
    while frontier:
        row, col = frontier.pop()
        for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not reached[r, c]:
                reached[r, c] = True
                frontier.append((r, c))
    return reached


@dataclass
class LostSweep:
    """CorLoc hits for every (layer, bias) tried, per image; :meth:`best` picks the combination."""

    combinations: list[tuple[int, float]]
    hits: list[list[bool]] = field(default_factory=list)          # per combination, per image
    boxes: list[list[tuple[float, ...]]] = field(default_factory=list)   # per combination, per image, input pixels

    def __post_init__(self):
        if not self.hits:
            self.hits = [[] for _ in self.combinations]
            self.boxes = [[] for _ in self.combinations]

    def best(self) -> int:
        """The index of the combination with the highest CorLoc (the first of equals)."""
        rates = [np.mean(hits) if hits else 0.0 for hits in self.hits]
        return int(np.argmax(rates))
