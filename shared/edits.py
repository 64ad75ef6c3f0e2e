"""Edits: what happens to one layer's MLP activations under test-time registers (pure tensor code).

Every edit has one signature, ``edit(activations [B, L, N], neurons [K], layout, context) -> activations``:

* :class:`PaperEdit` (the default, the paper's Algorithm 2): each register neuron's maximum over
  the tokens it is moved from, CLS and patches, goes to its register, and those tokens, and the
  other test-time registers, get the "normal value" (zero by default). Trained registers keep
  their own activations, and are not part of the maximum either: taking it over them would copy
  their value, not move it. With several registers, each neuron goes to one register chosen at
  random (seeded).
* :class:`LegacyEdit` reproduces the reference implementation: one signed maximum per layer (the
  value of largest magnitude over all tokens and all of that layer's register neurons) is written
  to every register, and only patch tokens get normal values; CLS is left alone.
* :class:`MoveToPatchesEdit` moves the maxima to chosen patches (a corner, a mask, typographic
  patches; see :func:`patch_mask`) instead of an appended token.
* :class:`AttentionBiasEdit` zeroes the register neurons and lets every query see the register's
  mean key and value (measured by :func:`~test_time_registers.intervention.calibrate_attention_bias`),
  through one appended token whose attention input is pinned at every block.
* Any callable with the same signature, for quick experiments.

``normal_values`` (what the neurons become away from the registers) are the replacement
ablations: zero, mean, only_outliers, same, noise and shuffled.

Token positions come from the layout as slices (:meth:`TokenLayout.parts`), never from
boolean-mask reads, so the built-in edits trace under ``torch.compile`` and ``torch.export``
without a graph break (``graph_safe``; the random normal values excepted).

Every image of a batch is edited from its own activations only. The built-in edits write into
the activation tensor in place when autograd does not need it (the tensor is the input of the
MLP's output projection, which nothing else reads), and into a copy otherwise. Nothing here
needs a model: the edits are tested on tensors alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .errors import InvalidArgumentError, check_int
from .layout import TokenLayout, gather_parts

NormalValues = Literal["zero", "mean", "only_outliers", "same", "noise", "shuffled"]
NORMAL_VALUES = ("zero", "mean", "only_outliers", "same", "noise", "shuffled")
#: The normal values drawn at random, from a ``torch.Generator``: neither traced nor exported.
RANDOM_NORMAL_VALUES = ("noise", "shuffled")


def normal_values_for(values: torch.Tensor, stats: tuple[slice, ...], mode: NormalValues,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """What register-neuron activations become away from the registers (the replacement ablations).

    Args:
        values: activations [B, L, K] of the K register neurons of one layer.
        stats: the token slices whose per-image statistics define "normal" (``layout.parts(...)``).
        mode: ``zero``: 0; ``mean``: the per-image mean over ``stats``; ``only_outliers``:
            values above mean + 1 std (the unbiased std, as ``torch.std`` and the reference code
            compute it) are replaced by the mean, others kept; ``same``: unchanged; ``noise``:
            Gaussian noise with each neuron's per-image mean and std over ``stats``;
            ``shuffled``: each image's values over ``stats`` permuted among those tokens
            (one random permutation per image, shared by the K neurons), so the same values
            stay in the image but move to other tokens.
        generator: the random source of ``noise`` and ``shuffled``, on ``values``' device.

    Returns:
        [B, L, K], to be written wherever the caller edits.
    """
    if mode == "zero":
        return torch.zeros_like(values)
    if mode == "same":
        return values
    if mode not in NORMAL_VALUES:
        raise InvalidArgumentError(f"normal_values must be one of {NORMAL_VALUES}, got {mode!r}")
    selected = gather_parts(values, stats)                             # [B, T, K]
    if mode == "shuffled":
        batch, tokens, _ = selected.shape
        order = torch.rand(batch, tokens, generator=generator, device=values.device).argsort(dim=1)   # [B, T]
        permuted = selected.gather(1, order[:, :, None].expand_as(selected))
        shuffled, start = values.clone(), 0
        for part in stats:
            width = part.stop - part.start
            shuffled[:, part] = permuted[:, start:start + width]
            start += width
        return shuffled
    reference = selected.float()
    mean = reference.mean(dim=1, keepdim=True)                         # [B, 1, K]
    if mode == "mean":
        return mean.to(values.dtype).expand_as(values)
    std = reference.std(dim=1, keepdim=True, unbiased=True)           # [B, 1, K]
    if mode == "only_outliers":
        too_high = values.float() > mean + std
        return torch.where(too_high, mean.to(values.dtype), values)
    noise = torch.randn(values.shape, generator=generator, device=values.device)
    return (mean + std * noise).to(values.dtype)


def _write(acts: torch.Tensor, neurons: torch.Tensor, new_values: torch.Tensor, inplace: bool) -> torch.Tensor:
    edited = acts if inplace else acts.clone()
    edited[:, :, neurons] = new_values
    return edited


def _moved_away(acts: torch.Tensor, neurons: torch.Tensor, layout: TokenLayout, normal_values: NormalValues,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the edits that move register neurons away share.

    Returns ``(new_values [B, L, K], peak [B, K])``: the neurons' activations with the normal
    values on CLS, the patches and the test-time registers (statistics over CLS and the patches;
    trained registers keep theirs), and each neuron's maximum over CLS and the patches.
    """
    seq_len = acts.shape[1]
    moved_from = layout.parts(seq_len, cls=True, patches=True)
    edited = layout.mask(seq_len, cls=True, patches=True, test_time_registers=True, device=acts.device)   # [L]
    values = acts[:, :, neurons]                                       # [B, L, K], a copy
    peak = gather_parts(values, moved_from).amax(dim=1)                # [B, K]
    new_values = torch.where(edited[None, :, None], normal_values_for(values, moved_from, normal_values, generator),
                             values)
    return new_values, peak


def paper_edit(acts: torch.Tensor, neurons: torch.Tensor, register_of_neuron: torch.Tensor,
               layout: TokenLayout, scale: torch.Tensor, normal_values: NormalValues = "zero", *,
               inplace: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 2: move each register neuron's maximum over CLS and the patches onto its register.

    Args:
        acts: MLP activations [B, L, N] of one layer, test-time registers included.
        neurons: long [K], the layer's register neurons.
        register_of_neuron: long [K], which test-time register (0..R-1) each neuron goes to.
        layout: the token layout, with ``num_test_time_registers = R``.
        scale: [R], multiplies the value written to each register.
        normal_values: what the neurons become on CLS, the patches and the other registers (see
            :func:`normal_values_for`; statistics over CLS and the patches).
        inplace: write into ``acts`` instead of a copy.
        generator: the random source of the ``noise`` and ``shuffled`` normal values.

    Returns:
        Activations [B, L, N]: ``acts`` itself when ``inplace``. Trained registers are untouched.
    """
    seq_len = acts.shape[1]
    new_values, peak = _moved_away(acts, neurons, layout, normal_values, generator)
    if layout.num_test_time_registers:
        positions = layout.test_time_registers(seq_len).start + register_of_neuron          # [K]
        columns = torch.arange(len(neurons), device=acts.device)
        new_values[:, positions, columns] = peak * scale[register_of_neuron].to(peak.dtype)
    return _write(acts, neurons, new_values, inplace)


def legacy_edit(acts: torch.Tensor, neurons: torch.Tensor, layout: TokenLayout, scale: torch.Tensor,
                normal_values: NormalValues = "zero", *, inplace: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference implementation's edit, per image.

    One signed maximum per layer, the activation of largest magnitude over all tokens and all
    of the layer's register neurons, goes to every register (times its scale) for every
    register neuron. Only patch tokens get normal values; CLS and trained registers are left
    as they are.

    Shapes as in :func:`paper_edit`.
    """
    batch, seq_len, _ = acts.shape
    values = acts[:, :, neurons]                                       # [B, L, K]
    flat = values.reshape(batch, -1)
    signed_peak = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True))  # [B, 1]
    patches = layout.patches(seq_len)
    new_values = values.clone()
    new_values[:, patches] = normal_values_for(values, (patches,), normal_values, generator)[:, patches]
    registers = layout.test_time_registers(seq_len)
    if layout.num_test_time_registers:
        per_register = signed_peak * scale.to(values.dtype)[None, :]   # [B, R]
        new_values[:, registers, :] = per_register[:, :, None].expand(-1, -1, len(neurons))
    return _write(acts, neurons, new_values, inplace)


@dataclass(frozen=True)
class EditContext:
    """What ModifiedModel tells an edit besides the activations, for one call of one layer.

    ``register_of_neuron`` is long [K], the test-time register each of the layer's neurons goes
    to; ``scale`` is [R], one factor per register.
    """

    layer: int
    register_of_neuron: torch.Tensor
    scale: torch.Tensor


class Edit(Protocol):
    """``edit(activations [B, L, N], neurons [K], layout, context) -> activations [B, L, N]``.

    An edit may declare ``graph_safe = True`` when it traces under ``torch.compile`` without a
    graph break (no boolean-mask indexing, ``.item()``, ``torch.Generator`` or printing). Edits
    that do not declare it run eagerly inside a compiled caller: a graph break inside a module
    hook makes torch 2.14's Dynamo drop the hook's result, which would silently skip the edit.
    """

    def __call__(self, activations: torch.Tensor, neurons: torch.Tensor, layout: TokenLayout,
                 context: EditContext) -> torch.Tensor: ...


def _can_edit_in_place(acts: torch.Tensor) -> bool:
    """True unless autograd may need the unedited activations."""
    return not (torch.is_grad_enabled() and acts.requires_grad)


@dataclass(frozen=True)
class _MovingEdit:
    """What the built-in edits share: the value register neurons get away from the registers.

    ``seed`` seeds the ``noise`` and ``shuffled`` normal values; each layer's call draws from a
    generator seeded with (seed, layer), so the same batch gets the same draw every time.
    """

    normal_values: NormalValues = "zero"
    seed: int = 0

    def __post_init__(self):
        if self.normal_values not in NORMAL_VALUES:
            raise InvalidArgumentError(f"normal_values must be one of {NORMAL_VALUES}, got {self.normal_values!r}")
        check_int("seed", self.seed, minimum=0)

    @property
    def graph_safe(self) -> bool:
        """True when a call traces under ``torch.compile`` without a graph break.

        The ``noise`` and ``shuffled`` normal values draw from a ``torch.Generator``, which
        Dynamo does not trace; with them the edit runs eagerly (see :class:`ModifiedModel`).
        """
        return self.normal_values not in RANDOM_NORMAL_VALUES

    def _generator(self, activations: torch.Tensor, layer: int) -> torch.Generator | None:
        if self.normal_values not in RANDOM_NORMAL_VALUES:
            return None
        return torch.Generator(device=activations.device).manual_seed(self.seed * 1_000_003 + layer)


@dataclass(frozen=True)
class PaperEdit(_MovingEdit):
    """The paper's test-time register: move each neuron's maximum over CLS and patches to its register."""

    def __call__(self, activations, neurons, layout, context: EditContext) -> torch.Tensor:
        return paper_edit(activations, neurons, context.register_of_neuron, layout, context.scale, self.normal_values,
                          inplace=_can_edit_in_place(activations),
                          generator=self._generator(activations, context.layer))


@dataclass(frozen=True)
class LegacyEdit(_MovingEdit):
    """The reference implementation's edit: one signed maximum per layer to every register; CLS untouched."""

    def __call__(self, activations, neurons, layout, context: EditContext) -> torch.Tensor:
        return legacy_edit(activations, neurons, layout, context.scale, self.normal_values,
                           inplace=_can_edit_in_place(activations),
                           generator=self._generator(activations, context.layer))


def patch_mask(grid: tuple[int, int], *, corner: str | None = None, size: int = 1,
               boxes=None, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A bool mask [rows, cols] of patches, for :class:`MoveToPatchesEdit`.

    Args:
        grid: the patch grid (rows, cols), e.g. ``hook_manager.grid_shape(pixels)``.
        corner: ``"top-left"``, ``"top-right"``, ``"bottom-left"`` or ``"bottom-right"``: a
            ``size`` x ``size`` block of patches there.
        boxes: pixel boxes [(left, top, right, bottom), ...] in an image of ``image_size``
            (height, width), e.g. where a typographic attack pasted text; every patch a box
            overlaps is chosen.
    """
    rows, cols = grid
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if (corner is None) == (boxes is None):
        raise InvalidArgumentError("patch_mask needs exactly one of corner= or boxes=")
    if corner is not None:
        check_int("size", size, minimum=1)
        if size > min(rows, cols):
            raise InvalidArgumentError(f"a corner of {size}x{size} patches does not fit a {rows}x{cols} grid")
        corners = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}
        if corner not in corners:
            raise InvalidArgumentError(f"corner must be one of {tuple(corners)}, got {corner!r}")
        bottom, right = corners[corner]
        row_slice = slice(rows - size, rows) if bottom else slice(0, size)
        col_slice = slice(cols - size, cols) if right else slice(0, size)
        mask[row_slice, col_slice] = True
        return mask
    if image_size is None:
        raise InvalidArgumentError("patch_mask(boxes=...) needs image_size=(height, width) of the pixels")
    height, width = image_size
    for left, top, right, bottom in boxes:
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise InvalidArgumentError(f"box {(left, top, right, bottom)} is not inside an image of {image_size}")
        mask[math.floor(top * rows / height):math.ceil(bottom * rows / height),
             math.floor(left * cols / width):math.ceil(right * cols / width)] = True
    return mask


@dataclass(frozen=True)
class MoveToPatchesEdit(_MovingEdit):
    """Move each register neuron's maximum to chosen patches instead of an appended token.

    The paper's variant that puts the outliers where one wants them: a corner
    (``patch_mask(grid, corner="top-left")``), a given mask, or the patches of a typographic
    attack (``patch_mask(grid, boxes=...)``). Each register neuron's maximum over CLS and the
    patches is written, times ``scale``, to every chosen patch; CLS, the other patches and any
    test-time registers get the normal values. Use it with ``num_registers=0``.

    Args:
        patches: bool [rows, cols] or [P] for every image, or [B, rows, cols] / [B, P] one per image.
        scale: multiplies the written maximum.
    """

    patches: torch.Tensor | None = None
    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.patches, torch.Tensor) or self.patches.dtype != torch.bool or \
                not 1 <= self.patches.ndim <= 3 or not bool(self.patches.any()):
            raise InvalidArgumentError("MoveToPatchesEdit needs patches=, a bool mask [rows, cols], [P] or "
                                       "[B, rows, cols] with at least one patch chosen (see patch_mask)")

    def __repr__(self) -> str:
        return (f"MoveToPatchesEdit(patches={int(self.patches.sum())} of {self.patches.shape[-2:].numel()} chosen, "
                f"normal_values={self.normal_values!r}, scale={self.scale})")

    def targets(self, batch: int, num_patches: int, device) -> torch.Tensor:
        """The chosen patches as bool [B, P]."""
        shared = self.patches.ndim == 1 or (self.patches.ndim == 2 and self.patches.numel() == num_patches)
        flat = self.patches.reshape(1, -1) if shared else self.patches.reshape(self.patches.shape[0], -1)
        per_image = not shared
        if flat.shape[1] != num_patches or (per_image and flat.shape[0] != batch):
            raise InvalidArgumentError(f"MoveToPatchesEdit has a mask of shape {list(self.patches.shape)}, but the "
                                       f"batch has {batch} images of {num_patches} patches")
        return flat.to(device).expand(batch, -1)

    def __call__(self, activations, neurons, layout, context: EditContext) -> torch.Tensor:
        batch, seq_len, _ = activations.shape
        new_values, peak = _moved_away(activations, neurons, layout, self.normal_values,
                                       self._generator(activations, context.layer))
        chosen = torch.zeros(batch, seq_len, dtype=torch.bool, device=activations.device)
        chosen[:, layout.patches(seq_len)] = self.targets(batch, layout.num_patches(seq_len), activations.device)
        new_values = torch.where(chosen[:, :, None], (peak * self.scale)[:, None, :], new_values)
        return _write(activations, neurons, new_values, _can_edit_in_place(activations))


@dataclass(frozen=True)
class AttentionBiasEdit(_MovingEdit):
    """The paper's attention-bias variant: zero the register neurons, and let every token attend to a fixed key and value.

    The key and value are the test-time register's mean ones, measured on calibration images
    by :func:`calibrate_attention_bias`. They are held by one appended token whose attention
    input (the output of each block's pre-attention norm, the hook manager's
    ``attention_input_site``) is pinned to the register's mean attention input at that layer;
    the key and value projections are affine, so its key and value are the register's mean key
    and value, an extra key-value pair every query sees, i.e. a bias in attention. The register
    neurons get the normal values (zero) on every token, that one included. Use it with
    ``num_registers=1``; the token is removed before pooling like a test-time register.

    Where an architecture normalises keys after the projection (QK-norm), the pinned input
    gives the key of the mean input rather than the mean key.

    Args:
        attention_inputs: [layers, hidden_size], the register's mean attention input per layer.
    """

    attention_inputs: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.attention_inputs, torch.Tensor) or self.attention_inputs.ndim != 2:
            raise InvalidArgumentError("AttentionBiasEdit needs attention_inputs [layers, hidden_size]; measure them "
                                       "with calibrate_attention_bias(hook_manager, neurons, images, preprocess)")

    def __repr__(self) -> str:
        layers, width = self.attention_inputs.shape
        return f"AttentionBiasEdit(attention_inputs=[{layers}, {width}], normal_values={self.normal_values!r})"

    def __call__(self, activations, neurons, layout, context: EditContext) -> torch.Tensor:
        new_values, _ = _moved_away(activations, neurons, layout, self.normal_values,
                                    self._generator(activations, context.layer))
        return _write(activations, neurons, new_values, _can_edit_in_place(activations))

    def edit_attention_input(self, tokens: torch.Tensor, layout: TokenLayout, layer: int) -> torch.Tensor:
        """Pin the test-time register's attention input [B, L, D] at ``layer`` to the calibrated mean."""
        registers = layout.test_time_registers(tokens.shape[1])
        edited = tokens if not (torch.is_grad_enabled() and tokens.requires_grad) else tokens.clone()
        edited[:, registers] = self.attention_inputs[layer].to(device=tokens.device, dtype=tokens.dtype)
        return edited
