"""Test-time registers (Algorithm 2 of Jiang et al., 2025), edits as typed objects, and the wrapper that applies them.

``num_registers`` zero tokens are appended after the patches. In every layer with register
neurons, ModifiedModel calls its *edit* on that layer's MLP activations. Every edit has one
signature, ``edit(activations [B, L, N], neurons [K], layout, context) -> activations``:

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
  mean key and value (measured by :func:`calibrate_attention_bias`), through one appended token
  whose attention input is pinned at every block.
* Any callable with the same signature, for quick experiments.

``normal_values`` (what the neurons become away from the registers) are the replacement
ablations: zero, mean, only_outliers, same, noise and shuffled.

Every image of a batch is edited from its own activations only. The built-in edits write into
the activation tensor in place when autograd does not need it (the tensor is the input of the
MLP's output projection, which nothing else reads), and into a copy otherwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from .data import batches
from .errors import ImageSourceError, InvalidArgumentError, check_int
from .hooks import Capture, HookManager
from .images import image_source, no_images_message
from .layout import TokenLayout
from .neurons import RegisterNeurons

NormalValues = Literal["zero", "mean", "only_outliers", "same", "noise", "shuffled"]
NORMAL_VALUES = ("zero", "mean", "only_outliers", "same", "noise", "shuffled")


def normal_values_for(values: torch.Tensor, stats_mask: torch.Tensor, mode: NormalValues,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """What register-neuron activations become away from the registers (the replacement ablations).

    Args:
        values: activations [B, L, K] of the K register neurons of one layer.
        stats_mask: bool [L], the tokens whose per-image statistics define "normal".
        mode: ``zero``: 0; ``mean``: the per-image mean over ``stats_mask``; ``only_outliers``:
            values above mean + 1 std (the unbiased std, as ``torch.std`` and the reference code
            compute it) are replaced by the mean, others kept; ``same``: unchanged; ``noise``:
            Gaussian noise with each neuron's per-image mean and std over ``stats_mask``;
            ``shuffled``: each image's values over ``stats_mask`` permuted among those tokens
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
    reference = values[:, stats_mask].float()                          # [B, T, K]
    if mode == "shuffled":
        batch, tokens, _ = reference.shape
        order = torch.rand(batch, tokens, generator=generator, device=values.device).argsort(dim=1)   # [B, T]
        shuffled = values.clone()
        shuffled[:, stats_mask] = values[:, stats_mask].gather(1, order[:, :, None].expand_as(reference))
        return shuffled
    mean = reference.mean(dim=1, keepdim=True)                         # [B, 1, K]
    if mode == "mean":
        return mean.to(values.dtype).expand_as(values)
    std = reference.std(dim=1, keepdim=True, unbiased=True)           # [B, 1, K]
    if mode == "only_outliers":
        too_high = values.float() > mean + std
        return torch.where(too_high, mean.to(values.dtype), values)
    if mode == "noise":
        noise = torch.randn(values.shape, generator=generator, device=values.device)
        return (mean + std * noise).to(values.dtype)
    raise InvalidArgumentError(f"normal_values must be one of {NORMAL_VALUES}, got {mode!r}")


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
    moved_from = layout.mask(seq_len, cls=True, patches=True, device=acts.device)              # [L]
    edited = moved_from | layout.mask(seq_len, test_time_registers=True, device=acts.device)
    values = acts[:, :, neurons]                                       # [B, L, K], a copy
    peak = values[:, moved_from].amax(dim=1)                           # [B, K]
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
    patch_mask = layout.mask(seq_len, patches=True, device=acts.device)
    new_values = torch.where(patch_mask[None, :, None],
                             normal_values_for(values, patch_mask, normal_values, generator), values)
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
    """``edit(activations [B, L, N], neurons [K], layout, context) -> activations [B, L, N]``."""

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

    def _generator(self, activations: torch.Tensor, layer: int) -> torch.Generator | None:
        if self.normal_values not in ("noise", "shuffled"):
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


class ModifiedModel(nn.Module):
    """Wrap a model so that every forward pass runs with test-time registers.

    ``forward`` takes and returns what the wrapped model's forward does. Test-time registers
    are removed before pooling, so they never reach pooled outputs or returned patch tokens;
    after each call, ``register_tokens`` [B, R, hidden_size] holds them as they left the last
    block. With no neurons and ``num_registers=0`` no hook is placed at all, so the output is
    bit-identical to the model's.

    Args:
        model: the model the hook manager describes (or a module containing it).
        hook_manager: that model's :class:`HookManager`.
        neurons: :class:`RegisterNeurons`, ``[(layer, neuron), ...]`` or ``{layer: [neuron, ...]}``.
        num_registers: test-time registers appended after the patches (0 or more).
        edit: what happens to each layer's activations (:class:`PaperEdit` by default,
            :class:`LegacyEdit` for the reference implementation, or any callable with the
            :class:`Edit` signature).
        scale: a number, or one number per register, multiplying the moved value.
        seed: chooses each neuron's register when there are several.
    """

    def __init__(self, model: nn.Module, hook_manager: HookManager, neurons=(), num_registers: int = 1, *,
                 edit: Edit | None = None, scale: float | Sequence[float] = 1.0, seed: int = 0):
        super().__init__()
        if not any(module is hook_manager.blocks[0] for module in model.modules()):
            raise InvalidArgumentError("the hook manager does not describe this model: build it from the same model")
        check_int("num_registers", num_registers, minimum=0)
        edit = PaperEdit() if edit is None else edit
        if not callable(edit):
            raise InvalidArgumentError(f"edit must be callable as edit(activations, neurons, layout, context), "
                                       f"got {edit!r}")
        self.model = model
        self.hook_manager = hook_manager
        self.neurons = RegisterNeurons.coerce(neurons)
        self.neurons.check_fits(hook_manager)
        self.num_registers = num_registers
        self.edit = edit
        self.scale = _per_register(scale, num_registers)
        self.layout = hook_manager.layout.with_test_time_registers(num_registers)
        self.register_tokens: torch.Tensor | None = None

        generator = torch.Generator().manual_seed(seed)
        assignment = torch.randint(max(num_registers, 1), (len(self.neurons),), generator=generator)
        by_pair = {pair: int(register) for pair, register in zip(self.neurons.pairs(), assignment)}
        # Buffers, so that .to(device) moves the plan once instead of copying it at every call.
        device = hook_manager.device   # where the model is now; .to() moves them with it later
        self.register_buffer("_scale", torch.tensor(self.scale, dtype=torch.float32, device=device),
                             persistent=False)
        self._layers = sorted(self.neurons.by_layer())
        for layer, layer_neurons in self.neurons.by_layer().items():
            registers = [by_pair[(layer, neuron)] for neuron in layer_neurons]
            self.register_buffer(f"_neurons_{layer}", torch.tensor(layer_neurons, device=device), persistent=False)
            self.register_buffer(f"_registers_{layer}", torch.tensor(registers, device=device), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_registers={self.num_registers}, neurons={len(self.neurons)} in layers "
                f"{self._layers}, edit={self.edit!r}, scale={list(self.scale)}")

    @contextlib.contextmanager
    def intervention(self) -> Iterator[None]:
        """Apply the test-time registers to calls of the wrapped model inside this context.

        The hooks are placed ahead of any others on the same modules, so captures and user
        hooks see the edited tensors.
        """
        with self.hook_manager.hooks() as hooks:
            if self.num_registers:
                self.hook_manager.prepare_for_registers(self.num_registers, hooks)
                hooks.on(self.hook_manager.register_insertion_site(), self._append_registers, prepend=True)
                hooks.on(self.hook_manager.register_removal_site(), self._strip_registers, prepend=True)
            for layer in self._layers:
                hooks.on_neurons(layer, self._edit_for(layer), prepend=True)
            if hasattr(self.edit, "edit_attention_input"):
                self._pin_attention_inputs(hooks)
            yield

    def capture(self, **sites) -> contextlib.AbstractContextManager[Capture]:
        """Like :meth:`HookManager.capture`, with this model's layout (registers included)."""
        return self.hook_manager.capture(layout=self.layout, **sites)

    def forward(self, *args, **kwargs):
        """The wrapped model's forward, with test-time registers, under the hook manager's autocast (if any)."""
        with self.intervention(), self.hook_manager.autocast():
            return self.model(*args, **kwargs)

    def forward_images(self, pixel_values: torch.Tensor):
        """The hook manager's image forward [B, 3, H, W], with test-time registers."""
        with self.intervention():
            return self.hook_manager.forward_images(pixel_values)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            hook_manager = self.__dict__.get("hook_manager")
            if hook_manager is None or name not in hook_manager.forward_methods:
                raise
        method = getattr(self.model, name)

        def with_registers(*args, **kwargs):
            with self.intervention(), self.hook_manager.autocast():
                return method(*args, **kwargs)

        with_registers.__doc__ = method.__doc__
        return with_registers

    # ---- hooks -----------------------------------------------------------------------
    def _append_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, seq_len, width = tokens.shape
        zeros = tokens.new_zeros(batch, self.num_registers, width)
        where = self.layout.test_time_registers(seq_len + self.num_registers).start
        return torch.cat([tokens[:, :where], zeros, tokens[:, where:]], dim=1)

    def _strip_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_len = tokens.shape[1]
        self.register_tokens = tokens[:, self.layout.test_time_registers(seq_len)]
        return tokens[:, self.layout.image_tokens(seq_len)]

    def _pin_attention_inputs(self, hooks) -> None:
        """Let an edit write every block's attention input (the attention-bias variant)."""
        if self.num_registers != 1:
            raise InvalidArgumentError(f"{self.edit!r} holds its key and value in one appended token: use "
                                       f"num_registers=1, not {self.num_registers}")
        for layer in range(self.hook_manager.num_layers):
            hooks.on(self.hook_manager.attention_input_site(layer),
                     lambda tokens, layer=layer: self.edit.edit_attention_input(tokens, self.layout, layer), prepend=True)

    def _edit_for(self, layer: int):
        def edit(acts: torch.Tensor) -> torch.Tensor:
            # .to() is a no-op once the wrapper and the model share a device
            neurons = getattr(self, f"_neurons_{layer}").to(acts.device)
            context = EditContext(layer, getattr(self, f"_registers_{layer}").to(acts.device),
                                  self._scale.to(acts.device))
            return self.edit(acts, neurons, self.layout, context)

        return edit


def calibrate_attention_bias(hook_manager: HookManager, neurons, images, preprocess=None, *, batch_size: int = 32,
                              workers: int = 0, edit: Edit | None = None) -> AttentionBiasEdit:
    """Measure the test-time register's mean attention input per layer, for :class:`AttentionBiasEdit`.

    Runs the model with one test-time register (``edit``, :class:`PaperEdit` by default) over
    ``images`` and averages, over the images, the register's row of every block's attention
    input (``hook_manager.attention_input_site``).

    Returns:
        ``AttentionBiasEdit(attention_inputs [layers, hidden_size])``.
    """
    images = image_source(images)
    modified = ModifiedModel(hook_manager.model, hook_manager, neurons, num_registers=1, edit=edit)
    sums: dict[int, torch.Tensor] = {}
    count = 0

    def accumulate(layer: int):
        def add(tokens: torch.Tensor) -> None:
            row = tokens[:, modified.layout.test_time_registers(tokens.shape[1])][:, 0].float().sum(dim=0)   # [D]
            sums[layer] = sums[layer] + row if layer in sums else row

        return add

    with torch.no_grad(), hook_manager.hooks() as hooks:
        for layer in range(hook_manager.num_layers):
            hooks.on(hook_manager.attention_input_site(layer), accumulate(layer))
        for batch in batches(images, preprocess, batch_size, hook_manager.device, hook_manager.input_dtype,
                             workers=workers):
            if batch.names:
                modified.forward_images(batch.pixel_values)
                count += len(batch.names)
    if count == 0:
        raise ImageSourceError(no_images_message(images))
    means = torch.stack([sums[layer] / count for layer in range(hook_manager.num_layers)])
    return AttentionBiasEdit(attention_inputs=means)


def _per_register(scale, num_registers: int) -> tuple[float, ...]:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return (float(scale),) * num_registers
    values = tuple(float(s) for s in scale)
    if len(values) != num_registers:
        raise InvalidArgumentError(f"scale has {len(values)} values but there are {num_registers} registers")
    return values
