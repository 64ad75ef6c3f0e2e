"""Scoped hooks and the abstract :class:`HookManager`.

A hook manager declares where things live in one unmodified model: the MLP neurons, the
block outputs, the attention probabilities, where test-time registers go in and come out,
and the token layout. It never copies model code. Every hook it places lives inside a
:class:`Hooks` context, which removes exactly the handles it added, also on exceptions.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import InvalidArgumentError, UnsupportedModelError
from .layout import TokenLayout

TensorFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _replace_first(value, tensor: torch.Tensor):
    """Put ``tensor`` where the first tensor of a module's output was."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    if isinstance(value, dict):  # transformers ModelOutput is an ordered dict
        value[next(iter(value.keys()))] = tensor
        return value
    raise UnsupportedModelError(f"cannot replace a tensor inside a {type(value).__name__}")


def _first_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[0]
    if isinstance(value, dict):
        return next(iter(value.values()))
    raise UnsupportedModelError(f"cannot find a tensor inside a {type(value).__name__}")


@dataclass(frozen=True)
class HookSite:
    """A tensor flowing into (``"input"``) or out of (``"output"``) a module.

    For inputs, the tensor is the first positional argument, or the keyword argument
    ``keyword`` when the module is called with keywords only. For outputs, it is the output
    itself, or the first element of a tuple or ``ModelOutput``.
    """

    module: nn.Module
    where: Literal["input", "output"]
    keyword: str = "hidden_states"

    def attach(self, fn: TensorFn, *, prepend: bool = False) -> RemovableHandle:
        """Call ``fn(tensor)`` each time the tensor flows; a returned tensor replaces it."""
        if self.where == "input":
            def pre_hook(module, args, kwargs):
                if args:
                    result = fn(args[0])
                    return None if result is None else ((result, *args[1:]), kwargs)
                result = fn(kwargs[self.keyword])
                if result is None:
                    return None
                return args, {**kwargs, self.keyword: result}

            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)
        if self.where == "output":
            def post_hook(module, args, output):
                result = fn(_first_tensor(output))
                return None if result is None else _replace_first(output, result)

            return self.module.register_forward_hook(post_hook, prepend=prepend)
        raise InvalidArgumentError(f"where must be 'input' or 'output', got {self.where!r}")


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; caught by whoever raised the need."""


class _ExitCallback:
    """Looks like a hook handle; ``remove()`` runs a clean-up function once."""

    def __init__(self, callback: Callable[[], None]):
        self._callback = callback

    def remove(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class Hooks:
    """A context manager owning a set of hook handles.

    On exit, and also on any exception, it removes exactly the handles it added and nothing
    else, so hooks a user placed on the same modules stay. Clean-up callbacks registered with
    :meth:`on_exit` run in the same last-in, first-out order.
    """

    def __init__(self, hook_manager: "HookManager"):
        self.hook_manager = hook_manager
        self._handles: list[RemovableHandle | _ExitCallback] = []

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Remove every handle and run every callback, newest first, even if some of them fail.

        The first failure is raised once all are done; later ones are chained to it as notes.
        """
        failures: list[BaseException] = []
        while self._handles:
            try:
                self._handles.pop().remove()
            except BaseException as error:  # noqa: BLE001 - the rest must still be removed
                failures.append(error)
        if failures:
            if hasattr(failures[0], "add_note"):   # Python 3.11 and later
                for later in failures[1:]:
                    failures[0].add_note(f"also failed while closing hooks: {type(later).__name__}: {later}")
            raise failures[0]

    def keep(self, handle: RemovableHandle) -> RemovableHandle:
        """Take ownership of a handle made elsewhere (e.g. by an attention probe)."""
        self._handles.append(handle)
        return handle

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the context closes, e.g. to restore a setting changed for a probe."""
        self._handles.append(_ExitCallback(callback))

    def on(self, site: HookSite, fn: TensorFn, *, prepend: bool = False) -> None:
        self.keep(site.attach(fn, prepend=prepend))

    def on_neurons(self, layer: int, fn: TensorFn, *, prepend: bool = False) -> None:
        """``fn(activations [B, L, num_neurons])`` at every call of layer ``layer``'s MLP."""
        self.on(self.hook_manager.neuron_site(layer), fn, prepend=prepend)

    def on_block_output(self, layer: int, fn: TensorFn, *, prepend: bool = False) -> None:
        """``fn(residual [B, L, hidden_size])`` at the output of block ``layer``."""
        self.on(self.hook_manager.block_output_site(layer), fn, prepend=prepend)

    def on_attention(self, layer: int, fn: Callable[[torch.Tensor], None]) -> None:
        """``fn(probabilities [B, heads, L, L])`` for block ``layer``; read-only."""
        self.hook_manager.attach_attention_probe(layer, fn, self)

    def stop_after_block(self, layer: int) -> None:
        """End the forward pass with :class:`StopForward` once block ``layer`` has run."""
        def stop(_residual):
            raise StopForward

        self.on_block_output(layer, stop)


@dataclass
class Capture:
    """Detached tensors from the most recent forward pass, keyed by layer.

    ``neurons[l]`` is [B, L, num_neurons], ``residual[l]`` is [B, L, hidden_size] and
    ``attention[l]`` is [B, heads, L, L]. ``layout`` says which positions are which.
    """

    layout: TokenLayout
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)

    def patches(self, site: Literal["neurons", "residual"], layer: int) -> torch.Tensor:
        """The patch tokens of a captured sequence: [B, num_patches, features]."""
        tensor = getattr(self, site)[layer]
        return tensor[:, self.layout.patches(tensor.shape[1])]


class HookManager(abc.ABC):
    """Declares the sites of one ViT architecture on an unmodified model.

    A subclass names the blocks, each block's MLP output projection (its input is the
    neuron activations), how attention probabilities are read, where test-time registers
    are inserted and removed, the token layout, and how to run images through the model.
    Everything else (discovery, the intervention, captures, logging) is shared.
    """

    #: Methods of the wrapped model that :class:`~test_time_registers.ModifiedModel` runs under the intervention.
    forward_methods: tuple[str, ...] = ()
    #: ``forward_images`` passes the pixels under this keyword (e.g. ``"pixel_values"``), or positionally.
    pixel_keyword: str | None = None

    def __init__(self, model: nn.Module, name: str | None = None, *, autocast_dtype: torch.dtype | None = None):
        """
        Args:
            model: the unmodified model.
            name: the model's spec (e.g. ``"openclip:ViT-B-16:laion2b_s34b_b88k"``), recorded in
                neuron files so they can be checked against the model they are applied to.
            autocast_dtype: run ``forward_images`` under ``torch.autocast`` in this dtype
                (``torch.bfloat16`` for the ``amp_bf16`` precision), with fp32 weights.
        """
        self.model = model
        self.name = name or self.default_name()
        self.autocast_dtype = autocast_dtype

    def default_name(self) -> str:
        """A name for a model built by hand, from its architecture when nothing better is known."""
        return type(self.model).__name__

    # ---- what a subclass declares ----------------------------------------------------
    @property
    @abc.abstractmethod
    def layout(self) -> TokenLayout:
        """CLS and trained registers of the unmodified model (no test-time registers)."""

    def layout_at(self, block: int) -> TokenLayout:
        """The tokens that really exist at the input of block ``block`` (no test-time registers).

        The same as :attr:`layout` at every block for most models. A model that gains tokens
        part-way (learned registers or CLS inserted at a later block, see
        :mod:`test_time_registers.trained_registers`) has fewer before that block.
        """
        self.check_layer(block, "block")
        return self.layout

    @property
    @abc.abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @abc.abstractmethod
    def mlp_output_projection(self, layer: int) -> nn.Module:
        """The MLP's output projection in block ``layer``; its input is the neuron activations."""

    def mlp_input_projection(self, layer: int) -> nn.Module:
        """The MLP's input projection in block ``layer`` (its output is the pre-activations).

        Optional: only :mod:`test_time_registers.planting` needs it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare mlp_input_projection")

    def mlp_input_rows(self, layer: int) -> tuple[tuple[nn.Module, int], ...]:
        """Every input projection that feeds the neurons of block ``layer``, with the row of neuron 0.

        A plain MLP has one, ``((fc1, 0),)``; a gated one (SwiGLU, GeGLU) two, its value and
        gate rows, e.g. ``((fc1_g, 0), (fc1_x, 0))`` or ``((fc1, 0), (fc1, N))`` when one layer
        holds both halves. Optional: only :mod:`test_time_registers.planting` needs it.
        """
        return ((self.mlp_input_projection(layer), 0),)

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        """Change what the model needs changed to carry ``num_registers`` more tokens, while ``hooks``
        is open (e.g. a prefix count that positions the tokens after it); restore it through
        ``hooks.on_exit``. Most models need nothing."""

    @abc.abstractmethod
    def register_insertion_site(self) -> HookSite:
        """Where test-time registers are appended to the token sequence."""

    @abc.abstractmethod
    def register_removal_site(self) -> HookSite:
        """Where they are taken off again, before any pooling or final output."""

    @abc.abstractmethod
    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None],
                               hooks: Hooks) -> None:
        """Arrange for ``fn(probabilities [B, heads, L, L])`` in block ``layer``.

        Every handle made must be passed to ``hooks.keep``, and every setting changed must be
        restored through ``hooks.on_exit``, so that nothing is left behind.
        """

    @property
    @abc.abstractmethod
    def patch_embedding(self) -> nn.Module:
        """The module that takes the pixels (a patch-embedding convolution).

        Its weight declares where and in what dtype the pixels go: OpenCLIP's ``bf16``
        precision, for example, keeps the positional embedding in float32 but not this.
        """

    @property
    def image_model(self) -> nn.Module:
        """The module ``forward_images`` calls: the whole model, or its image tower."""
        return self.model

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch height and width in pixels: the patch embedding's kernel."""
        kernel = self.patch_embedding.kernel_size
        return (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)

    def model_inputs(self, pixel_values: torch.Tensor) -> tuple[tuple, dict]:
        """The arguments ``(args, kwargs)`` that run :attr:`image_model` on preprocessed images [B, 3, H, W].

        By default the pixels alone, moved to :attr:`device`, cast to :attr:`input_dtype` and passed
        under :attr:`pixel_keyword` (or positionally). A model that takes other inputs (patchified
        pixels with a mask, as SigLIP 2) builds them here.
        """
        pixel_values = pixel_values.to(device=self.device, dtype=self.input_dtype)
        return ((), {self.pixel_keyword: pixel_values}) if self.pixel_keyword else ((pixel_values,), {})

    def forward_images(self, pixel_values: torch.Tensor):
        """Run preprocessed images [B, 3, H, W] through the image model at its declared precision.

        The inputs come from :meth:`model_inputs`, and the call runs under autocast when
        :attr:`autocast_dtype` is set.
        """
        args, kwargs = self.model_inputs(pixel_values)
        with self.autocast():
            return self.image_model(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in :attr:`autocast_dtype` on the model's device, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def block_output_site(self, layer: int) -> HookSite:
        return HookSite(self.blocks[layer], "output")

    #: The module of each block whose output is its attention's input (the pre-attention norm), as a
    #: dotted path inside the block; the site the attention-bias edit writes. ``None``: not declared.
    attention_input: str | None = None

    def attention_input_site(self, layer: int) -> HookSite:
        """The input of block ``layer``'s attention [B, L, hidden_size]: what its queries, keys and values are
        projected from."""
        if self.attention_input is None:
            raise UnsupportedModelError(f"{type(self).__name__} does not declare attention_input (the module whose "
                                        "output is the attention's input), which the attention-bias edit writes")
        return HookSite(self.blocks[layer].get_submodule(self.attention_input), "output")

    # ---- derived ---------------------------------------------------------------------
    def neuron_site(self, layer: int) -> HookSite:
        return HookSite(self.mlp_output_projection(layer), "input")

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def num_neurons(self, layer: int) -> int:
        return self.mlp_output_projection(layer).weight.shape[1]

    @property
    def default_detect_layer(self) -> int:
        """The layer whose block output is searched for outliers when none is given."""
        return self.num_layers - 1

    @property
    def device(self) -> torch.device:
        """Where the pixels go: the device of the patch embedding's weight."""
        return self.patch_embedding.weight.device

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the pixels are cast to: that of the patch embedding's weight."""
        return self.patch_embedding.weight.dtype

    def check_layer(self, layer: int, what: str = "layer") -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(f"{what} must be an int in 0..{self.num_layers - 1}, got {layer!r}")
        return layer

    def grid_shape(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Patch grid (rows, cols) for a batch of preprocessed images [B, 3, H, W]."""
        height, width = pixel_values.shape[-2:]
        return height // self.patch_size[0], width // self.patch_size[1]

    def hooks(self) -> Hooks:
        return Hooks(self)

    def capture(self, *, neurons: Iterable[int] = (), residual: Iterable[int] = (),
                attention: Iterable[int] = (), device: torch.device | str | None = None,
                layout: TokenLayout | None = None) -> "_CaptureContext":
        """Capture detached tensors at the chosen layers and sites while the context is open.

        Reading attention may switch the model to a slower attention path that returns
        probabilities (transformers' eager attention, timm's unfused attention) until the
        context closes. That setting is the model's, so captures are not thread-safe: open
        them on a model from one thread at a time.

        >>> with hm.capture(residual=[11], attention=[11]) as cap:
        ...     hm.forward_images(pixel_values)
        >>> cap.residual[11].shape   # [B, L, hidden_size]
        """
        return _CaptureContext(self, list(neurons), list(residual), list(attention), device,
                               layout or self.layout)

    def run_with_capture(self, pixel_values: torch.Tensor, **sites):
        """Run ``forward_images`` once and return ``(output, Capture)``."""
        with self.capture(**sites) as captured:
            output = self.forward_images(pixel_values)
        return output, captured


class _CaptureContext:
    def __init__(self, hook_manager: HookManager, neurons: list[int], residual: list[int],
                 attention: list[int], device, layout: TokenLayout):
        for layer in (*neurons, *residual, *attention):
            hook_manager.check_layer(layer)
        self._hooks = hook_manager.hooks()
        self._plan = (neurons, residual, attention)
        self._device = device
        self.captured = Capture(layout)

    def _store(self, store: dict, layer: int):
        def record(tensor: torch.Tensor) -> None:
            store[layer] = tensor.detach().to(self._device) if self._device else tensor.detach()

        return record

    def __enter__(self) -> Capture:
        neurons, residual, attention = self._plan
        try:
            for layer in neurons:
                self._hooks.on_neurons(layer, self._store(self.captured.neurons, layer))
            for layer in residual:
                self._hooks.on_block_output(layer, self._store(self.captured.residual, layer))
            for layer in attention:
                self._hooks.on_attention(layer, self._store(self.captured.attention, layer))
        except BaseException:
            self._hooks.close()
            raise
        return self.captured

    def __exit__(self, *exc_info) -> None:
        self._hooks.close()
