"""Scoped hooks, captures and :class:`HookManager`.

A hook manager describes where things live in one unmodified model (the MLP neurons, the
block outputs, the attention probabilities, where test-time registers go in and come out,
and the token layout) from a declaration, :class:`~test_time_registers.sites.Sites`. It never
copies model code. Every hook it places lives inside a :class:`Hooks` context, which removes
exactly the handles it added, also on exceptions.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import InvalidArgumentError, RegisterLeakError, UnsupportedModelError
from .layout import TokenLayout
from .registry import check_described_by, placement
from .sites import PROJECTION_KINDS, ProjectionKind, Sites, resolve

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


@torch.compiler.disable
def add_hook(module: nn.Module, hook: Callable, *, before: bool, with_kwargs: bool = False,
             prepend: bool = False) -> RemovableHandle:
    """``module.register_forward_pre_hook`` (``before``) or ``register_forward_hook``, never traced.

    Dynamo cannot trace a hook's registration, so inside ``torch.compile`` it runs eagerly: a
    break at the place where an intervention opens, never inside the forward pass it hooks.
    """
    if before:
        return module.register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=prepend)
    return module.register_forward_hook(hook, with_kwargs=with_kwargs, prepend=prepend)


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
    #: Wraps every function attached here (a hook manager view's layout adapter), or None.
    adapt: Callable[[TensorFn], TensorFn] | None = field(default=None, compare=False, repr=False)

    def attach(self, fn: TensorFn, *, prepend: bool = False) -> RemovableHandle:
        """Call ``fn(tensor)`` each time the tensor flows; a returned tensor replaces it."""
        if self.adapt is not None:
            fn = self.adapt(fn)
        if self.where == "input":
            def pre_hook(module, args, kwargs):
                if args:
                    result = fn(args[0])
                    return None if result is None else ((result, *args[1:]), kwargs)
                result = fn(kwargs[self.keyword])
                if result is None:
                    return None
                return args, {**kwargs, self.keyword: result}

            return add_hook(self.module, pre_hook, before=True, with_kwargs=True, prepend=prepend)
        if self.where == "output":
            def post_hook(module, args, output):
                result = fn(_first_tensor(output))
                return None if result is None else _replace_first(output, result)

            return add_hook(self.module, post_hook, before=False, prepend=prepend)
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

    def shadow(self, owner: object, name: str, replacement: Callable) -> None:
        """Make ``owner.name`` be ``replacement`` while the context is open (an instance attribute that
        shadows a method); whatever attribute the instance had before comes back on exit, so nested
        shadows unwind in order."""
        had, previous = name in vars(owner), vars(owner).get(name)
        setattr(owner, name, replacement)
        self.on_exit(lambda: setattr(owner, name, previous) if had else delattr(owner, name))

    def on(self, site: HookSite, fn: TensorFn, *, prepend: bool = False) -> None:
        self.keep(site.attach(fn, prepend=prepend))

    def on_neurons(self, layer: int, fn: TensorFn, *, prepend: bool = False) -> None:
        """``fn(activations [B, L, num_neurons])`` at every call of layer ``layer``'s MLP."""
        self.on(self.hook_manager.neuron_site(layer), fn, prepend=prepend)

    def on_block_output(self, layer: int, fn: TensorFn, *, prepend: bool = False) -> None:
        """``fn(residual [B, L, hidden_size])`` at the output of block ``layer``."""
        self.on(self.hook_manager.block_output_site(layer), fn, prepend=prepend)

    def on_projection(self, layer: int, kind: ProjectionKind, fn: Callable[[torch.Tensor], None]) -> None:
        """``fn(projection [B, L, heads * head_dim])`` for block ``layer``'s ``"queries"``, ``"keys"`` or
        ``"values"``, heads concatenated; read-only."""
        self.hook_manager.attach_projection(layer, kind, fn, self)

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

    ``neurons[l]`` is [B, L, num_neurons], ``residual[l]`` is [B, L, hidden_size],
    ``attention[l]`` is [B, heads, L, L] and ``queries[l]``, ``keys[l]``, ``values[l]`` are
    [B, L, heads * head_dim]. ``layout`` says which positions are which.
    """

    layout: TokenLayout
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def patches(self, site: Literal["neurons", "residual", "queries", "keys", "values"], layer: int) -> torch.Tensor:
        """The patch tokens of a captured sequence: [B, num_patches, features]."""
        tensor = getattr(self, site)[layer]
        return tensor[:, self.layout.patches(tensor.shape[1])]


class Extension:
    """What a wrapper (test-time registers, learned registers) adds to the model it wraps.

    A hook manager :meth:`~HookManager.view` applies it: the view's layout is extended, its sites
    adapted, and its ``forward_images`` runs inside :meth:`running`. The defaults change nothing.
    """

    #: The wrapper, which the view calls its ``model``.
    model: nn.Module

    def extend_layout(self, layout: TokenLayout) -> TokenLayout:
        return layout

    def extend_layout_at(self, block: int, layout: TokenLayout) -> TokenLayout:
        return layout

    def adapt(self, fn: TensorFn, dims: Sequence[int] = (1,)) -> TensorFn:
        """Wrap a hook function so that it sees this wrapper's layout along ``dims``."""
        return fn

    def running(self) -> contextlib.AbstractContextManager:
        """The context every call of the wrapped model runs in."""
        return contextlib.nullcontext()

    def view_name(self, name: str) -> str:
        return name


class HookManager:
    """Describes one ViT architecture on an unmodified model, from a declaration.

    A subclass declares :attr:`sites` (a :class:`~test_time_registers.sites.Sites`) and, where
    it needs them, :attr:`pixel_keyword`, :attr:`forward_methods` and :attr:`intermediate_methods`.
    The constructor resolves every declared path once, against the module the declaration
    describes, which the registry finds inside wrappers (``model.visual`` of an open_clip
    ``CLIP``, ``model.dinov2`` of a ``Dinov2ForImageClassification``, ...). A missing path raises
    :class:`UnsupportedModelError` naming it. Code is left only where behaviour really differs:
    :meth:`prepare_for_registers` (position tensors or masks that grow for extra tokens),
    :meth:`model_inputs` (a model that patchifies its own pixels) and :attr:`patch_size`.
    Everything else (discovery, the intervention, captures, logging) is shared.

    A :meth:`view` shares the resolved sites and knows the tokens a wrapper adds: the hook
    manager of a :class:`~test_time_registers.ModifiedModel` or a
    :class:`~test_time_registers.RegisteredModel` is one.
    """

    #: The declaration; every subclass sets it.
    sites: ClassVar[Sites]
    #: ``forward_images`` passes the pixels under this keyword (e.g. ``"pixel_values"``), or positionally.
    pixel_keyword: ClassVar[str | None] = None
    #: Methods of the model that :class:`~test_time_registers.ModifiedModel` runs under the intervention,
    #: besides those a wrapper's registration names (``encode_image``); the ones the model lacks are dropped.
    forward_methods: tuple[str, ...] = ()
    #: Methods that return intermediate block outputs, with the names their pixel argument may have;
    #: ``ModifiedModel`` runs them so that no test-time register reaches what they return.
    intermediate_methods: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __init__(self, model: nn.Module, name: str | None = None, *, autocast_dtype: torch.dtype | None = None):
        """
        Args:
            model: the unmodified model, or a wrapper of it that the registry knows.
            name: the model's spec (e.g. ``"openclip:ViT-B-16:laion2b_s34b_b88k"``), recorded in
                neuron files so they can be checked against the model they are applied to.
            autocast_dtype: run ``forward_images`` under ``torch.autocast`` in this dtype
                (``torch.bfloat16`` for the ``amp_bf16`` precision), with fp32 weights.

        Raises:
            UnsupportedModelError: a declared path is missing, or the registry says another hook
                manager describes this model.
        """
        sites = getattr(type(self), "sites", None)
        if not isinstance(sites, Sites):
            raise UnsupportedModelError(f"{type(self).__name__} declares no sites: set `sites = Sites(...)` on the class")
        self.model = model
        self.autocast_dtype = autocast_dtype
        #: The hook manager this one is a view of; None for one that is no view.
        self.base: HookManager | None = None
        self._extensions: tuple[Extension, ...] = ()
        self._resolve(model, sites)
        self.name = name or self.default_name()

    def _resolve(self, model: nn.Module, sites: Sites) -> None:
        place = placement(model)
        root = model.get_submodule(place.root) if place.root else model
        check_described_by(root, type(self))
        owner = f"{type(self).__name__} ({type(model).__name__})"
        blocks = resolve(root, sites.blocks, what="blocks", owner=owner)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise UnsupportedModelError(f"{owner}: {sites.blocks!r} is not a non-empty list of blocks")
        self.root = root
        self.blocks: Sequence[nn.Module] = blocks
        self._neurons = [resolve(block, sites.neurons, what="MLP output projection", owner=owner) for block in blocks]
        self._attention = [resolve(block, sites.attention.path, what="attention", owner=owner) for block in blocks]
        if sites.projections is not None:
            for attention in self._attention:
                sites.projections.check(attention, owner)
        self._attention_inputs = None if sites.attention_input is None else [
            resolve(block, sites.attention_input, what="attention input", owner=owner) for block in blocks]
        self.patch_embedding: nn.Module = _first_weighted(
            resolve(root, sites.patch_embedding, what="patch embedding", owner=owner), owner)
        self._insert = resolve(root, sites.insert.path, what="register insertion site", owner=owner)
        self._remove = resolve(root, sites.remove.path, what="register removal site", owner=owner)
        #: The module ``forward_images`` calls: the whole model, its image tower, or the described module.
        self.image_model: nn.Module = model.get_submodule(place.image_model) if place.image_model else model
        parts = place.root.split(".") if place.root else []
        #: The modules from the model down to the described one; each may return what the caller reads.
        self.outer_modules: tuple[nn.Module, ...] = tuple(
            model.get_submodule(".".join(parts[:depth])) if depth else model for depth in range(len(parts) + 1))
        #: The modules whose returns hold only what the image model made (the image model down to the described
        #: one): a vision-language model's or a two-tower model's other outputs are never touched.
        self.returning_modules: tuple[nn.Module, ...] = self.outer_modules[
            len(place.image_model.split(".")) if place.image_model else 0:]
        #: The blocks whose outputs a language model reads (a vision-language model's tower), else None.
        self.read_layers: tuple[int, ...] | None = None if place.reads is None else tuple(
            place.reads(model.get_submodule(place.reader) if place.reader else model, len(blocks)))
        self._layout = sites.layout(root) if callable(sites.layout) else sites.layout
        self.forward_methods = tuple(dict.fromkeys(
            method for method in (*place.forward_methods, *type(self).forward_methods) if hasattr(model, method)))

    def default_name(self) -> str:
        """A name for a model built by hand, from its architecture when nothing better is known."""
        return type(self.root).__name__

    # ---- views -----------------------------------------------------------------------
    def view(self, extension: Extension) -> "HookManager":
        """This hook manager with ``extension`` applied: the same resolved sites, ``extension.model`` as
        its model, its layout extended and its forward run inside ``extension.running()``."""
        view = copy.copy(self)
        view.base = self
        view._extensions = (*self._extensions, extension)
        view.model = extension.model
        view.name = extension.view_name(self.name)
        return view

    def running(self) -> contextlib.AbstractContextManager:
        """The contexts of every extension, the newest entered first (nothing for a plain hook manager)."""
        stack = contextlib.ExitStack()
        for extension in reversed(self._extensions):
            stack.enter_context(extension.running())
        return stack

    def _adapt(self, fn: TensorFn, dims: Sequence[int] = (1,)) -> TensorFn:
        for extension in reversed(self._extensions):
            fn = extension.adapt(fn, dims)
        return fn

    def site(self, module: nn.Module, where: Literal["input", "output"], keyword: str = "hidden_states") -> HookSite:
        """A site of this model; a view's hook functions see the view's layout there."""
        adapt = (lambda fn: self._adapt(fn)) if self._extensions else None
        return HookSite(module, where, keyword, adapt=adapt)

    # ---- the token layout ------------------------------------------------------------
    @property
    def layout(self) -> TokenLayout:
        """CLS and trained registers (and, for a view, what its wrappers add)."""
        layout = self._layout
        for extension in self._extensions:
            layout = extension.extend_layout(layout)
        return layout

    def layout_at(self, block: int) -> TokenLayout:
        """The tokens that really exist at the input of block ``block``.

        The same as :attr:`layout` at every block for most models. A model that gains tokens
        part-way (learned registers or CLS inserted at a later block, see
        :mod:`test_time_registers.training.registers`) has fewer before that block.
        """
        self.check_layer(block, "block")
        layout = self._layout
        for extension in self._extensions:
            layout = extension.extend_layout_at(block, layout)
        return layout

    # ---- sites -----------------------------------------------------------------------
    def mlp_output_projection(self, layer: int) -> nn.Module:
        """The MLP's output projection in block ``layer``; its input is the neuron activations."""
        return self._neurons[layer]

    def mlp_input_rows(self, layer: int) -> tuple[tuple[nn.Module, int], ...]:
        """Every input projection that feeds the neurons of block ``layer``, with the row of neuron 0.

        A plain MLP has one, ``((fc1, 0),)``; a gated one (SwiGLU, GeGLU) two, its value and
        gate rows, e.g. ``((fc1_g, 0), (fc1_x, 0))`` or ``((fc1, 0), (fc1, N))`` when one layer
        holds both halves. Only :mod:`test_time_registers.planting` needs it.
        """
        block = self.blocks[self.check_layer(layer)]
        declared = self.sites.mlp_inputs(block) if callable(self.sites.mlp_inputs) else self.sites.mlp_inputs
        if not declared:
            raise UnsupportedModelError(f"{type(self).__name__} declares no mlp_inputs (the rows that feed the neurons)")
        width = self.num_neurons(layer)
        return tuple((resolve(block, path, what="MLP input projection", owner=type(self).__name__), half * width)
                     for path, half in declared)

    def neuron_site(self, layer: int) -> HookSite:
        return self.site(self._neurons[layer], "input")

    def block_output_site(self, layer: int) -> HookSite:
        return self.site(self.blocks[layer], "output")

    def register_insertion_site(self) -> HookSite:
        """Where test-time registers are put into the token sequence."""
        at = self.sites.insert
        return self.site(self._insert, at.where, at.keyword)

    def register_removal_site(self) -> HookSite:
        """Where they are taken out again, before any pooling or final output."""
        at = self.sites.remove
        return self.site(self._remove, at.where, at.keyword)

    def attention_input_site(self, layer: int) -> HookSite:
        """The input of block ``layer``'s attention [B, L, hidden_size]: what its queries, keys and values are
        projected from."""
        if self._attention_inputs is None:
            raise UnsupportedModelError(f"{type(self).__name__} does not declare attention_input (the module whose "
                                        "output is the attention's input), which the attention-bias edit writes")
        return self.site(self._attention_inputs[layer], "output")

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        """Arrange for ``fn(probabilities [B, heads, L, L])`` in block ``layer``, as :attr:`sites` declares.

        Every handle made goes to ``hooks.keep`` and every setting changed is restored through
        ``hooks.on_exit``, so that nothing is left behind.
        """
        self.sites.attention.attach(self._attention[layer], self._adapt(fn, dims=(2, 3)), hooks,
                                    [*self.outer_modules, self.blocks[layer]])

    def attach_projection(self, layer: int, kind: ProjectionKind, fn: Callable[[torch.Tensor], None],
                          hooks: Hooks) -> None:
        """Arrange for ``fn(projection [B, L, heads * head_dim])``, block ``layer``'s queries, keys or values
        as :attr:`sites` declares them; every handle goes to ``hooks``.

        Raises:
            UnsupportedModelError: the architecture declares no ``projections``.
        """
        if kind not in PROJECTION_KINDS:
            raise InvalidArgumentError(f"kind must be one of {', '.join(PROJECTION_KINDS)}, got {kind!r}")
        if self.sites.projections is None:
            raise UnsupportedModelError(f"{type(self).__name__} does not declare projections (where its attention's "
                                        "queries, keys and values are read)")
        self.sites.projections.attach(self._attention[self.check_layer(layer)], kind, self._adapt(fn), hooks)

    def refuse_intermediate_methods(self, hooks: Hooks, advice: str) -> None:
        """While ``hooks`` is open, the :attr:`intermediate_methods` of the model and of every module around the
        described one raise :class:`RegisterLeakError`: they would read block outputs that hold tokens the
        library added. ``advice`` (formatted with ``name``) says what to call instead."""
        for owner in {id(module): module for module in (self.model, *self.outer_modules)}.values():
            for name in (name for name in self.intermediate_methods if hasattr(owner, name)):
                def refuse(*args, name=name, **kwargs):
                    raise RegisterLeakError(f"{name} reads block outputs that hold the tokens the library added: "
                                            + advice.format(name=name))

                hooks.shadow(owner, name, refuse)

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        """Change what the model needs changed to carry ``num_registers`` more tokens, while ``hooks``
        is open (e.g. a prefix count that positions the tokens after it); restore it through
        ``hooks.on_exit``. Most models need nothing."""

    # ---- running ---------------------------------------------------------------------
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

        The inputs come from :meth:`model_inputs`; the call runs under autocast when
        :attr:`autocast_dtype` is set, and, for a view, with what its wrappers add.
        """
        args, kwargs = self.model_inputs(pixel_values)
        with self.running(), self.autocast():
            return self.image_model(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in :attr:`autocast_dtype` on the model's device, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- derived ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def num_neurons(self, layer: int) -> int:
        return self._neurons[layer].weight.shape[1]

    @property
    def hidden_size(self) -> int:
        """The width of the residual stream: the output size of block 0's MLP output projection."""
        return self._neurons[0].weight.shape[0]

    @property
    def default_detect_layer(self) -> int:
        """The layer whose block output is searched for outliers when none is given: the last block, or in a
        vision-language model the deepest block its language model reads (LLaVA: 22 of 24, not the unused last)."""
        return max(self.read_layers) if self.read_layers else self.num_layers - 1

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
                attention: Iterable[int] = (), queries: Iterable[int] = (), keys: Iterable[int] = (),
                values: Iterable[int] = (), device: torch.device | str | None = None,
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
        projections = {"queries": list(queries), "keys": list(keys), "values": list(values)}
        return _CaptureContext(self, list(neurons), list(residual), list(attention), projections, device,
                               layout or self.layout)

    def run_with_capture(self, pixel_values: torch.Tensor, **sites):
        """Run ``forward_images`` once and return ``(output, Capture)``."""
        with self.capture(**sites) as captured:
            output = self.forward_images(pixel_values)
        return output, captured

    def __repr__(self) -> str:
        extra = "".join(f" + {type(extension).__name__}" for extension in self._extensions)
        return f"{type(self).__name__}({type(self.root).__name__}{extra}, name={self.name!r})"


def _first_weighted(module: nn.Module, owner: str) -> nn.Module:
    """The module itself if it has a weight, else its first convolution (a patch embedding with a stem)."""
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return module
    first = next((child for child in module.modules() if isinstance(child, nn.Conv2d)), None)
    if first is None:
        raise UnsupportedModelError(f"{owner}: no convolution takes the pixels in {type(module).__name__}")
    return first


class _CaptureContext:
    def __init__(self, hook_manager: HookManager, neurons: list[int], residual: list[int],
                 attention: list[int], projections: dict[str, list[int]], device, layout: TokenLayout):
        for layer in (*neurons, *residual, *attention, *(layer for layers in projections.values() for layer in layers)):
            hook_manager.check_layer(layer)
        self._hooks = hook_manager.hooks()
        self._plan = (neurons, residual, attention)
        self._projections = projections
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
            for kind, layers in self._projections.items():
                for layer in layers:
                    self._hooks.on_projection(layer, kind, self._store(getattr(self.captured, kind), layer))
        except BaseException:
            self._hooks.close()
            raise
        return self.captured

    def __exit__(self, *exc_info) -> None:
        self._hooks.close()
