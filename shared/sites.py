"""Sites as data: what a :class:`~test_time_registers.HookManager` subclass declares about one architecture.

A declaration names module paths, never modules. The hook manager resolves every path once,
when it is built, against the module it describes, and a path that is missing raises one
:class:`~test_time_registers.UnsupportedModelError` naming the path and the model's class::

    class ViTHookManager(HookManager):
        sites = Sites(
            blocks="layers",                                   # the transformer blocks, in order
            neurons="mlp.fc2",                                 # per block: its input is the neuron activations
            mlp_inputs=(("mlp.fc1", 0),),                      # per block: the rows that feed them (planting)
            patch_embedding="embeddings.patch_embeddings.projection",
            insert=At("embeddings", "output"),                 # where test-time registers go in
            remove=At("layernorm", "input"),                   # where they come out, before any pooling
            attention=EagerAttention("attention"),             # per block: how probabilities are read
            attention_input="layernorm_before",                # per block: what queries, keys and values read
            projections=SeparateProjections(),                 # per block: where queries, keys and values are read
            layout=TokenLayout(num_cls=1),
        )

Paths are dotted (``"blocks.0"`` is block 0 of a ``ModuleList``). Per-block paths are relative to
each block; the others to the described module. Where a family has variants, a path may be a
tuple of alternatives, the first one present in the block wins (``("mlp.fc2", "mlp.w2")``), and
``mlp_inputs`` and ``layout`` may be functions of the block or of the described module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

import torch
from torch import nn

from .errors import UnsupportedModelError
from .layout import TokenLayout

if TYPE_CHECKING:
    from .hooks import Hooks

#: Each input projection that feeds the neurons, with which block of ``num_neurons`` rows it is
#: (a gated MLP that holds gate and value in one layer has two blocks, 0 and 1).
MlpInputs = tuple[tuple[str, int], ...]
Paths = Union[str, tuple[str, ...]]


@dataclass(frozen=True)
class At:
    """A tensor flowing into (``"input"``) or out of (``"output"``) the module at ``path``.

    For inputs, the tensor is the first positional argument, or the keyword argument ``keyword``
    when the module is called with keywords only.
    """

    path: str
    where: Literal["input", "output"]
    keyword: str = "hidden_states"


class AttentionProbe:
    """How one block's attention probabilities [B, heads, L, L] are read; ``path`` is the attention
    module inside the block."""

    path: str

    def attach(self, attention: nn.Module, fn: Callable[[torch.Tensor], None], hooks: "Hooks",
               owners: list[nn.Module]) -> None:
        """Arrange for ``fn(probabilities)``; hand every handle to ``hooks.keep`` and every changed
        setting to ``hooks.on_exit``. ``owners`` are the modules from the model down to the block."""
        raise NotImplementedError


@dataclass(frozen=True)
class NeedWeights(AttentionProbe):
    """An ``nn.MultiheadAttention`` called with ``need_weights=False`` (open_clip): asked for per-head
    weights while the probe is open."""

    path: str = "attn"

    def attach(self, attention, fn, hooks, owners) -> None:
        def ask_for_weights(module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def read_weights(module, args, output):
            fn(output[1])   # [B, heads, L, L]

        hooks.keep(attention.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
        hooks.keep(attention.register_forward_hook(read_weights))


@dataclass(frozen=True)
class Unfused(AttentionProbe):
    """timm's attention: the fused kernel returns no probabilities, so ``switch`` (``fused_attn``)
    is turned off while the probe is open, and ``probabilities`` (``attn_drop``) outputs them."""

    path: str = "attn"
    probabilities: str = "attn_drop"
    switch: str = "fused_attn"

    def attach(self, attention, fn, hooks, owners) -> None:
        if getattr(attention, self.switch):
            setattr(attention, self.switch, False)
            hooks.on_exit(lambda: setattr(attention, self.switch, True))

        def read_probabilities(module, args, output):
            fn(output)   # [B, heads, L, L]

        hooks.keep(attention.get_submodule(self.probabilities).register_forward_hook(read_probabilities))


@dataclass(frozen=True)
class EagerAttention(AttentionProbe):
    """A transformers attention module returning ``(output, weights)``.

    Only the eager path computes the weights, so the innermost ``PreTrainedModel`` holding the
    module is switched to it with transformers' public ``set_attn_implementation("eager")`` while
    the probe is open, and switched back when it closes. The switch is model-wide: while a capture
    is open, other threads running the same model also run eager attention (same results, slower),
    so captures are not thread-safe.
    """

    path: str = "attention"

    def attach(self, attention, fn, hooks, owners) -> None:
        model = next((module for module in reversed(owners) if hasattr(module, "set_attn_implementation")), None)
        if model is None:
            raise UnsupportedModelError(f"no transformers PreTrainedModel holds {type(attention).__name__}")
        previous = model.config._attn_implementation
        if previous != "eager":
            model.set_attn_implementation("eager")   # the fast kernels return no probabilities
            hooks.on_exit(lambda: model.set_attn_implementation(previous))

        def read_weights(module, args, output):
            fn(output[1])   # [B, heads, L, L]

        hooks.keep(attention.register_forward_hook(read_weights))


ProjectionKind = Literal["queries", "keys", "values"]
PROJECTION_KINDS: tuple[ProjectionKind, ...] = ("queries", "keys", "values")


class Projections:
    """How one block's queries, keys or values [B, L, heads * head_dim] (heads concatenated, as
    projected: before any q/k norm or rotary embedding) are read from its attention module."""

    def attach(self, attention: nn.Module, kind: ProjectionKind, fn: Callable[[torch.Tensor], None],
               hooks: "Hooks") -> None:
        """Arrange for ``fn(projection [B, L, heads * head_dim])`` at every call of ``attention``."""
        raise NotImplementedError

    def check(self, attention: nn.Module, owner: str) -> None:
        """Raise :class:`UnsupportedModelError` when ``attention`` lacks what this declaration names."""
        raise NotImplementedError


@dataclass(frozen=True)
class SeparateProjections(Projections):
    """Three linear layers inside the attention module (transformers' ``q_proj``, ``k_proj``, ``v_proj``)."""

    queries: str = "q_proj"
    keys: str = "k_proj"
    values: str = "v_proj"

    def attach(self, attention, kind, fn, hooks) -> None:
        projection = attention.get_submodule(getattr(self, kind))
        hooks.keep(projection.register_forward_hook(lambda module, args, output: fn(output)))

    def check(self, attention, owner) -> None:
        for kind in PROJECTION_KINDS:
            resolve(attention, getattr(self, kind), what=f"{kind} projection", owner=owner)


@dataclass(frozen=True)
class FusedProjections(Projections):
    """One weight [3 * D, hidden_size] holding queries, keys and values in that order, applied to the
    attention module's input: timm's ``qkv`` (its bias, or ``q_bias``/``k_bias``/``v_bias`` as in
    BEiT and Eva, which call ``F.linear`` on the weight themselves) and ``nn.MultiheadAttention``'s
    ``in_proj_weight`` (open_clip). The projection is recomputed from the input with the model's own
    weight and bias; the model's forward is untouched."""

    weight: str = "qkv.weight"
    bias: str | tuple[str, str, str] | None = "qkv.bias"

    def _parameter(self, attention: nn.Module, path: str) -> torch.Tensor | None:
        owner_path, _, name = path.rpartition(".")
        owner = attention.get_submodule(owner_path) if owner_path else attention
        return getattr(owner, name, None)

    def attach(self, attention, kind, fn, hooks) -> None:
        part = PROJECTION_KINDS.index(kind)
        batch_first = getattr(attention, "batch_first", True)

        def project(module, args, kwargs):
            tokens = args[0] if args else next(iter(kwargs.values()))
            if not batch_first:                                   # nn.MultiheadAttention's [L, B, D]
                tokens = tokens.transpose(0, 1)
            weight = self._parameter(attention, self.weight)
            width = weight.shape[0] // 3
            if isinstance(self.bias, tuple):
                bias = self._parameter(attention, self.bias[part])
            else:
                bias = self._parameter(attention, self.bias) if self.bias else None
                bias = None if bias is None else bias[part * width:(part + 1) * width]
            fn(torch.nn.functional.linear(tokens, weight[part * width:(part + 1) * width], bias))

        hooks.keep(attention.register_forward_pre_hook(project, with_kwargs=True))

    def check(self, attention, owner) -> None:
        weight = self._parameter(attention, self.weight) if _has_path(attention, self.weight) else None
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[0] % 3:
            raise UnsupportedModelError(f"{owner} has no fused query-key-value weight [3 * D, hidden] at "
                                        f"{self.weight!r} (in {type(attention).__name__})")


@dataclass(frozen=True)
class FirstPresent(Projections):
    """The first of several declarations that the attention module fits (Eva: fused or separate)."""

    options: tuple[Projections, ...]

    def _chosen(self, attention: nn.Module, owner: str) -> Projections:
        failures = []
        for option in self.options:
            try:
                option.check(attention, owner)
                return option
            except UnsupportedModelError as error:
                failures.append(str(error))
        raise UnsupportedModelError("; ".join(failures))

    def attach(self, attention, kind, fn, hooks) -> None:
        self._chosen(attention, type(attention).__name__).attach(attention, kind, fn, hooks)

    def check(self, attention, owner) -> None:
        self._chosen(attention, owner)


def _has_path(module: nn.Module, path: str) -> bool:
    owner_path, _, name = path.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return False
    return hasattr(owner, name)


@dataclass(frozen=True)
class Sites:
    """Where everything lives in one architecture (see the module docstring).

    Attributes:
        blocks: the ``ModuleList`` of transformer blocks.
        neurons: per block, the MLP's output projection; its input is the neuron activations.
        patch_embedding: the module that takes the pixels (its weight gives their device and dtype).
        insert: where test-time registers are put into the token sequence.
        remove: where they are taken out again, before any pooling or final output.
        attention: per block, how attention probabilities are read.
        attention_input: per block, the module whose output is the attention's input (the
            pre-attention norm); the attention-bias edit writes it. ``None``: not declared.
        projections: where the attention module's queries, keys and values are read (LOST and
            the paper's object-discovery protocol use them). ``None``: not declared.
        mlp_inputs: per block, the input projections that feed the neurons and their row
            blocks, or a function of the block giving them; only planting needs them.
        layout: the token layout (CLS, trained registers) or a function of the described module.
    """

    blocks: str
    neurons: Paths
    patch_embedding: str
    insert: At
    remove: At
    attention: AttentionProbe
    attention_input: str | None = None
    projections: Projections | None = None
    mlp_inputs: MlpInputs | Callable[[nn.Module], MlpInputs] = ()
    layout: TokenLayout | Callable[[nn.Module], TokenLayout] = TokenLayout(num_cls=1)


def resolve(module: nn.Module, paths: Paths, *, what: str, owner: str) -> nn.Module:
    """The submodule at the first of ``paths`` that ``module`` has.

    Raises:
        UnsupportedModelError: none of them, naming the paths and ``owner`` (the model's class).
    """
    for path in (paths,) if isinstance(paths, str) else paths:
        try:
            return module.get_submodule(path) if path else module
        except AttributeError:
            continue
    shown = " or ".join(repr(path) for path in ((paths,) if isinstance(paths, str) else paths))
    raise UnsupportedModelError(f"{owner} has no {what} at {shown} (in {type(module).__name__})")
