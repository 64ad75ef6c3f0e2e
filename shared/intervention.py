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
* Any callable with the same signature, for quick experiments.

Every image of a batch is edited from its own activations only. The built-in edits write into
the activation tensor in place when autograd does not need it (the tensor is the input of the
MLP's output projection, which nothing else reads), and into a copy otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from .errors import InvalidArgumentError, check_int
from .hooks import Capture, HookManager
from .layout import TokenLayout
from .neurons import RegisterNeurons

NormalValues = Literal["zero", "mean", "only_outliers", "same"]
NORMAL_VALUES = ("zero", "mean", "only_outliers", "same")


def normal_values_for(values: torch.Tensor, stats_mask: torch.Tensor, mode: NormalValues) -> torch.Tensor:
    """What register-neuron activations become away from the registers.

    Args:
        values: activations [B, L, K] of the K register neurons of one layer.
        stats_mask: bool [L], the tokens whose per-image statistics define "normal".
        mode: ``zero``: 0; ``mean``: the per-image mean over ``stats_mask``; ``only_outliers``:
            values above mean + 1 std (the unbiased std, as ``torch.std`` and the reference code
            compute it) are replaced by the mean, others kept; ``same``: unchanged.

    Returns:
        [B, L, K], to be written wherever the caller edits.
    """
    if mode == "zero":
        return torch.zeros_like(values)
    if mode == "same":
        return values
    reference = values[:, stats_mask].float()                          # [B, T, K]
    mean = reference.mean(dim=1, keepdim=True)                         # [B, 1, K]
    if mode == "mean":
        return mean.to(values.dtype).expand_as(values)
    if mode == "only_outliers":
        std = reference.std(dim=1, keepdim=True, unbiased=True)
        too_high = values.float() > mean + std
        return torch.where(too_high, mean.to(values.dtype), values)
    raise InvalidArgumentError(f"normal_values must be one of {NORMAL_VALUES}, got {mode!r}")


def _write(acts: torch.Tensor, neurons: torch.Tensor, new_values: torch.Tensor, inplace: bool) -> torch.Tensor:
    edited = acts if inplace else acts.clone()
    edited[:, :, neurons] = new_values
    return edited


def paper_edit(acts: torch.Tensor, neurons: torch.Tensor, register_of_neuron: torch.Tensor,
               layout: TokenLayout, scale: torch.Tensor, normal_values: NormalValues = "zero", *,
               inplace: bool = False) -> torch.Tensor:
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

    Returns:
        Activations [B, L, N]: ``acts`` itself when ``inplace``. Trained registers are untouched.
    """
    seq_len = acts.shape[1]
    moved_from = layout.mask(seq_len, cls=True, patches=True, device=acts.device)              # [L]
    edited = moved_from | layout.mask(seq_len, test_time_registers=True, device=acts.device)
    values = acts[:, :, neurons]                                       # [B, L, K], a copy
    peak = values[:, moved_from].amax(dim=1)                           # [B, K]
    new_values = torch.where(edited[None, :, None], normal_values_for(values, moved_from, normal_values), values)
    if layout.num_test_time_registers:
        positions = layout.test_time_registers(seq_len).start + register_of_neuron          # [K]
        columns = torch.arange(len(neurons), device=acts.device)
        new_values[:, positions, columns] = peak * scale[register_of_neuron].to(peak.dtype)
    return _write(acts, neurons, new_values, inplace)


def legacy_edit(acts: torch.Tensor, neurons: torch.Tensor, layout: TokenLayout, scale: torch.Tensor,
                normal_values: NormalValues = "zero", *, inplace: bool = False) -> torch.Tensor:
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
    new_values = torch.where(patch_mask[None, :, None], normal_values_for(values, patch_mask, normal_values), values)
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
    """What the built-in edits share: the value register neurons get away from the registers."""

    normal_values: NormalValues = "zero"

    def __post_init__(self):
        if self.normal_values not in NORMAL_VALUES:
            raise InvalidArgumentError(f"normal_values must be one of {NORMAL_VALUES}, got {self.normal_values!r}")


@dataclass(frozen=True)
class PaperEdit(_MovingEdit):
    """The paper's test-time register: move each neuron's maximum over CLS and patches to its register."""

    def __call__(self, activations, neurons, layout, context: EditContext) -> torch.Tensor:
        return paper_edit(activations, neurons, context.register_of_neuron, layout, context.scale, self.normal_values,
                          inplace=_can_edit_in_place(activations))


@dataclass(frozen=True)
class LegacyEdit(_MovingEdit):
    """The reference implementation's edit: one signed maximum per layer to every register; CLS untouched."""

    def __call__(self, activations, neurons, layout, context: EditContext) -> torch.Tensor:
        return legacy_edit(activations, neurons, layout, context.scale, self.normal_values,
                           inplace=_can_edit_in_place(activations))


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

    def _edit_for(self, layer: int):
        def edit(acts: torch.Tensor) -> torch.Tensor:
            # .to() is a no-op once the wrapper and the model share a device
            neurons = getattr(self, f"_neurons_{layer}").to(acts.device)
            context = EditContext(layer, getattr(self, f"_registers_{layer}").to(acts.device),
                                  self._scale.to(acts.device))
            return self.edit(acts, neurons, self.layout, context)

        return edit


def _per_register(scale, num_registers: int) -> tuple[float, ...]:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return (float(scale),) * num_registers
    values = tuple(float(s) for s in scale)
    if len(values) != num_registers:
        raise InvalidArgumentError(f"scale has {len(values)} values but there are {num_registers} registers")
    return values
