"""Test-time registers (Algorithm 2 of Jiang et al., 2025): :class:`ModifiedModel` runs a model with them.

``num_registers`` zero tokens go in at the hook manager's insertion site. In every layer with
register neurons, ModifiedModel calls its *edit* (:mod:`test_time_registers.edits`) on that
layer's MLP activations. The registers come out at the removal site, before any pooling, and
nothing the wrapped model returns carries them: the removal point checks the token count, the
hidden states and attentions a model returns are stripped too, and methods that return
intermediate block outputs (timm's and open_clip's ``forward_intermediates``) are run so that
they read the block outputs without the registers.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .data.batching import batches
from .data.sources import image_source, no_images_message
from .edits import NORMAL_VALUES, AttentionBiasEdit, Edit, EditContext, PaperEdit  # noqa: F401 - NORMAL_VALUES for the CLI
from .errors import ImageSourceError, InvalidArgumentError, RegisterLeakError, check_int
from .hooks import Capture, Extension, HookManager, add_hook
from .layout import TokenLayout
from .neurons import RegisterNeurons


_GRAPH_KEYS = itertools.count()

#: The intervention open on each model now, by its first block: two different ones would nest.
_OPEN: "weakref.WeakKeyDictionary[nn.Module, ModifiedModel]" = weakref.WeakKeyDictionary()


@dataclass
class _PassState:
    """What one open intervention knows about the forward pass in flight."""

    depth: int = 0                          # open intervention() contexts of this ModifiedModel
    unmodified_length: int | None = None    # tokens at the insertion point, i.e. without the registers

    def reset(self) -> None:
        # In place: torch.export (non-strict) restores module attributes after tracing, so a state
        # object swapped in on exit would be swapped back out, still open.
        self.depth, self.unmodified_length = 0, None


class _TestTimeRegisters(Extension):
    """What a :class:`ModifiedModel` adds, for its hook manager view."""

    def __init__(self, modified: "ModifiedModel"):
        self.model = modified

    def extend_layout(self, layout: TokenLayout) -> TokenLayout:
        return layout.with_test_time_registers(self.model.num_registers)

    def extend_layout_at(self, block: int, layout: TokenLayout) -> TokenLayout:
        return self.extend_layout(layout)

    def running(self) -> contextlib.AbstractContextManager:
        return self.model.intervention()


class ModifiedModel(nn.Module):
    """Wrap a model so that every forward pass runs with test-time registers.

    ``forward`` takes and returns what the wrapped model's forward does, and every tensor it
    returns has the unmodified model's token count: test-time registers are removed before
    pooling, and stripped from returned hidden states and attentions (``output_hidden_states``,
    ``output_attentions``); intermediate methods (timm's ``forward_intermediates`` and
    ``get_intermediate_layers``, open_clip's ``forward_intermediates``) called on the wrapper
    read block outputs without them. After each call, ``register_tokens`` [B, R, hidden_size]
    holds the registers as they left the last block. With no neurons and ``num_registers=0`` no
    hook is placed at all, so the output is bit-identical to the model's.

    ``torch.compile`` of the ModifiedModel, its ``forward_images`` or a forwarded method gives the
    eager answer: the hooks are placed eagerly and the pass, edits included, is one graph of this
    ModifiedModel's own. An edit that does not declare ``graph_safe`` runs eagerly instead.

    ``hook_manager`` is a view of the given hook manager (:meth:`HookManager.view`): the same
    sites, a layout with the test-time registers, and a ``forward_images`` that runs with them;
    analysis code takes it like any hook manager.

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
        self.base_hook_manager = hook_manager
        self.neurons = RegisterNeurons.coerce(neurons)
        self.neurons.check_fits(hook_manager)
        self.num_registers = num_registers
        self.edit = edit
        self._graph_safe = bool(getattr(edit, "graph_safe", False))
        self._graph_key = f"test-time registers {next(_GRAPH_KEYS)}"   # see _run
        self.scale = _per_register(scale, num_registers)
        self.hook_manager = hook_manager.view(_TestTimeRegisters(self))
        self.layout = self.hook_manager.layout
        self.register_tokens: torch.Tensor | None = None
        self._state = _PassState()

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
        hooks see the edited tensors. Entering it again while it is open (a nested call) does
        nothing; another ModifiedModel's intervention on the same model cannot be opened inside it.
        Inside the context, the model's intermediate methods (``forward_intermediates``) raise
        :class:`RegisterLeakError`: call them on the ModifiedModel instead.

        Raises:
            InvalidArgumentError: another ModifiedModel's intervention is open on this model.
        """
        state, base = self._state, self.base_hook_manager
        if state.depth:
            state.depth += 1
            try:
                yield
            finally:
                state.depth -= 1
            return
        key = base.blocks[0]
        other = _OPEN.get(key)
        if other is not None and other is not self:
            raise InvalidArgumentError("another ModifiedModel's intervention is already open on this model; two "
                                       "at once would put two sets of registers in")
        with base.hooks() as hooks:
            _OPEN[key] = self
            state.depth, state.unmodified_length = 1, None
            hooks.on_exit(lambda: (_OPEN.pop(key, None), state.reset()))
            if self.num_registers:
                base.prepare_for_registers(self.num_registers, hooks)
                hooks.on(base.register_insertion_site(), self._append_registers, prepend=True)
                hooks.on(base.register_removal_site(), self._strip_registers, prepend=True)
                for module in base.returning_modules:
                    hooks.keep(add_hook(module, self._strip_returned, before=False))
                base.refuse_intermediate_methods(hooks, "call it on the ModifiedModel (modified.{name}(...)), "
                                                        "which runs it without them")
            for layer in self._layers:
                hooks.on_neurons(layer, self._edit_for(layer), prepend=True)
            if hasattr(self.edit, "edit_attention_input"):
                self._pin_attention_inputs(hooks)
            yield

    def capture(self, **sites) -> contextlib.AbstractContextManager[Capture]:
        """Like :meth:`HookManager.capture`, with this model's layout (registers included)."""
        return self.hook_manager.capture(**sites)

    def forward(self, *args, **kwargs):
        """The wrapped model's forward, with test-time registers, under the hook manager's autocast (if any)."""
        return self._traced_or_eager(self._run, self.model, *args, **kwargs)

    def forward_images(self, pixel_values: torch.Tensor):
        """The hook manager's image forward [B, 3, H, W], with test-time registers."""
        return self._traced_or_eager(self._run, self.hook_manager.forward_images, pixel_values)

    def _run(self, method: Callable, *args, **kwargs):
        # The hooks are placed and removed eagerly (Dynamo cannot trace their registration), so a
        # compiling caller breaks the graph there and traces the whole pass, edits included, as one.
        close = _eagerly(self._open)
        try:
            # Dynamo does not guard on module hooks: a graph traced with another ModifiedModel's hooks
            # would be reused. Reading this instance's own name makes the graph this instance's.
            if not self._graph_key:
                raise RegisterLeakError("a ModifiedModel without its graph key")
            with self.hook_manager.autocast():
                return method(*args, **kwargs)
        finally:
            _eagerly(close)

    def _open(self) -> Callable[[], None]:
        """Open :meth:`intervention`; returns what closes it."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.intervention())
        return stack.close

    def _traced_or_eager(self, run: Callable, *args, **kwargs):
        """``run(...)``, traced by a compiling caller only when the edit declares itself ``graph_safe``.

        A graph break inside a module hook makes Dynamo (torch 2.14) drop the hook's result, so an
        edit that might break the graph runs eagerly inside a compiled caller rather than being skipped.
        """
        return run(*args, **kwargs) if self._graph_safe else _eagerly(run, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            hook_manager, model = self.__dict__.get("hook_manager"), self.__dict__.get("_modules", {}).get("model")
            if hook_manager is None or model is None or not hasattr(model, name) or \
                    name not in (*hook_manager.forward_methods, *hook_manager.intermediate_methods):
                raise
        method = getattr(self.model, name)
        if name in hook_manager.intermediate_methods and self.num_registers:
            replayed = self._replayed(name, method, hook_manager.intermediate_methods[name])

            def run(*args, **kwargs):   # two passes and a dictionary of block outputs: never traced
                return _eagerly(replayed, *args, **kwargs)
        else:
            def run(*args, **kwargs):
                return self._traced_or_eager(self._run, method, *args, **kwargs)

        run.__doc__ = method.__doc__
        return run

    # ---- hooks -----------------------------------------------------------------------
    def _append_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, seq_len, width = tokens.shape
        self._state.unmodified_length = seq_len
        zeros = tokens.new_zeros(batch, self.num_registers, width)
        where = self.layout.test_time_registers(seq_len + self.num_registers).start
        return torch.cat([tokens[:, :where], zeros, tokens[:, where:]], dim=1)

    def _strip_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_len, expected = tokens.shape[1], self._state.unmodified_length
        if expected is None:
            raise RegisterLeakError("the removal point ran before the insertion point in this forward pass: the model "
                                    "was called in a way that skips where test-time registers go in")
        if seq_len != expected + self.num_registers:
            raise RegisterLeakError(f"{seq_len} tokens reached the removal point, but the model had {expected} and "
                                    f"{self.num_registers} test-time register(s) went in: a hook or a wrapper changed "
                                    "the token count in between")
        self.register_tokens = tokens[:, self.layout.test_time_registers(seq_len)]
        return tokens[:, self.layout.image_tokens(seq_len)]

    def _strip_returned(self, module, args, output):
        """Strip the registers from every hidden state [B, L, D] and attention map [B, heads, L, L] returned."""
        if self._state.unmodified_length is None:
            return None
        with_registers = self._state.unmodified_length + self.num_registers
        return _map_tensors(output, lambda tensor: self._without_registers(tensor, with_registers))

    def _without_registers(self, tensor: torch.Tensor, with_registers: int) -> torch.Tensor:
        keep = self.layout.image_tokens(with_registers)
        if isinstance(keep, torch.Tensor):
            keep = keep.to(tensor.device)
        if tensor.ndim == 3 and tensor.shape[1] == with_registers:
            return tensor[:, keep]
        if tensor.ndim == 4 and tensor.shape[-1] == tensor.shape[-2] == with_registers:
            return tensor[:, :, keep][..., keep]
        return tensor

    def _replayed(self, name: str, method: Callable, pixel_names: tuple[str, ...]) -> Callable:
        """Run an intermediate method so that it reads the block outputs of the run with registers, without them.

        The images go once through the model with the registers, keeping each block's output without
        them; then the method runs on the bare model with each block's output replaced by the kept
        one, so everything it returns (intermediates, norms, pooled features) is the register run's,
        at the unmodified model's token count. This costs a second forward pass.
        """
        def run(*args, **kwargs):
            if self._state.depth:
                raise RegisterLeakError(f"{name} runs the model twice, the second time without registers: "
                                        "call it outside an open intervention() context")
            bound = inspect.signature(method).bind_partial(*args, **kwargs).arguments
            pixels = next((bound[key] for key in pixel_names if bound.get(key) is not None), None)
            if pixels is None:   # no images (open_clip's text tower alone)
                return method(*args, **kwargs)
            base, kept = self.base_hook_manager, {}
            with base.hooks() as hooks:
                for layer in range(base.num_layers):
                    hooks.on_block_output(layer, lambda tokens, layer=layer: kept.__setitem__(
                        layer, self._without_registers(tokens, tokens.shape[1])))
                self.hook_manager.forward_images(pixels)
            register_tokens = self.register_tokens
            with base.hooks() as replay, self.hook_manager.autocast():
                for layer in range(base.num_layers):
                    replay.on_block_output(layer, lambda tokens, layer=layer: _replacement(kept[layer], tokens))
                output = method(*args, **kwargs)
            self.register_tokens = register_tokens
            return output

        return run

    def _pin_attention_inputs(self, hooks) -> None:
        """Let an edit write every block's attention input (the attention-bias variant)."""
        if self.num_registers != 1:
            raise InvalidArgumentError(f"{self.edit!r} holds its key and value in one appended token: use "
                                       f"num_registers=1, not {self.num_registers}")
        for layer in range(self.base_hook_manager.num_layers):
            hooks.on(self.base_hook_manager.attention_input_site(layer), self._pin_for(layer), prepend=True)

    def _pin_for(self, layer: int):
        return lambda tokens: self.edit.edit_attention_input(tokens, self.layout, layer)

    def _edit_for(self, layer: int):
        def edit(acts: torch.Tensor) -> torch.Tensor:
            # .to() is a no-op once the wrapper and the model share a device
            neurons = getattr(self, f"_neurons_{layer}").to(acts.device)
            context = EditContext(layer, getattr(self, f"_registers_{layer}").to(acts.device),
                                  self._scale.to(acts.device))
            return self.edit(acts, neurons, self.layout, context)

        return edit


@torch.compiler.disable
def _eagerly(run: Callable, *args, **kwargs):
    """``run(...)`` outside any graph ``torch.compile`` is tracing."""
    return run(*args, **kwargs)


def _replacement(kept: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    if kept.shape != tokens.shape:
        raise RegisterLeakError(f"a block output of the run with registers is {list(kept.shape)} without them, but "
                                f"the bare model's is {list(tokens.shape)}")
    return kept


def _map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``value`` with ``fn`` applied to every tensor inside tuples, lists and dicts (a ``ModelOutput`` is
    changed in place, so that its attributes follow); None where nothing changed."""
    if isinstance(value, torch.Tensor):
        result = fn(value)
        return None if result is value else result
    if isinstance(value, dict):
        changed = {key: _map_tensors(item, fn) for key, item in value.items()}
        for key, item in changed.items():
            if item is not None:
                value[key] = item
        return value if any(item is not None for item in changed.values()) else None
    if isinstance(value, (tuple, list)):
        changed = [_map_tensors(item, fn) for item in value]
        if all(item is None for item in changed):
            return None
        items = [item if new is None else new for item, new in zip(value, changed)]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    return None


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
