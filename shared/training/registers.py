"""Learnable registers beside test-time ones, on any supported model, and their checkpoints.

:class:`LearnableRegisters` holds K tokens, an ``nn.Parameter`` [1, K, hidden_size].
:class:`RegisteredModel` runs a model with them. They use the sites test-time registers use:

* they go in at the hook manager's insertion site (``insert_at=0``, after the positional
  embedding, which they do not get) or at the input of block ``insert_at``;
* they come out at its removal site, before pooling, so pooled outputs, heads and returned
  tokens never see them.

They sit right after the prefix, where trained registers sit (DINOv2-reg, timm ``reg_tokens``)::

    [CLS][trained registers][learned registers][patches]

so to everything that reads a layout they *are* trained registers: the hook manager of a
registered model (``registered.hook_manager``) declares ``num_trained_registers`` plus K, and
test-time registers, discovery and captures work on it unchanged.

For a timm ``VisionTransformer``, CLS can also enter late (``cls_pos``, as in cls-register): it
is taken out at the output of ``norm_pre`` and put back, unchanged, at the input of block
``cls_pos``. It keeps what timm gave it in ``_pos_embed``: ``cls_token + pos_embed[:, 0]`` when
the model embeds the class token (timm's default), the bare ``cls_token`` with
``no_embed_class=True`` (DeiT-III), and ``norm_pre`` applied to it like every other token.

Blocks that run before a group of tokens exists (the learned registers before ``insert_at``,
CLS before ``cls_pos``) show it, through the registered model's hook manager, as zero
placeholder tokens at its place in the final layout: every hook sees one layout at every block,
whatever is written there is dropped, and the model itself never sees a placeholder.
:meth:`HookManager.layout_at` of ``registered.hook_manager`` says which tokens really exist at each block.

A checkpoint (:func:`save_trained_registers`) holds only what training changed, in
safetensors, with JSON metadata naming the base model; :func:`load_trained_registers` loads the
base model and puts it back on (``test-time-registers-evaluate --trained-model registers:DIR``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import (InvalidArgumentError, ModelLoadError, TrainedRegistersError, UnsupportedModelError, check_int,
                      first_line)
from ..files import (MAX_JSON_BYTES, finite_number, output_folder, parse_json, read_bounded, sha256, write_unit)
from ..hooks import Extension, HookManager, TensorFn
from ..layout import TokenLayout
from ..loading import LoadedModel
from ..registry import load_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "registers.safetensors"
METADATA_FILE = "registers.json"
#: The safetensors metadata key holding the JSON metadata.
METADATA_KEY = "test_time_registers"
#: Standard deviation of the learned tokens at initialisation (distinct tokens, so they can specialise).
INIT_STD = 0.02


def pooled_output(output, layout: TokenLayout) -> torch.Tensor:
    """The image-level output [B, F] of an image forward pass.

    A tensor is returned as it is (timm's logits, open_clip's embedding); a ``ModelOutput`` gives
    its ``pooler_output``, else its ``logits`` (a ``...ForImageClassification``), else the CLS token
    of ``last_hidden_state`` (its mean token without one); a tuple gives its first element's.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for key in ("pooler_output", "logits"):
            if output.get(key) is not None:
                return output[key]
        tokens = output["last_hidden_state"]
        return tokens[:, layout.cls().start] if layout.num_cls else tokens.mean(dim=1)
    if isinstance(output, (tuple, list)):
        return pooled_output(output[0], layout)
    raise UnsupportedModelError(f"cannot find the pooled output in a {type(output).__name__}")


class LearnableRegisters(nn.Module):
    """K learned register tokens, ``tokens`` [1, K, hidden_size], and where they go in.

    Args:
        num_registers: K (0 is allowed, e.g. to move CLS alone with ``cls_pos``).
        width: hidden size of the model.
        insert_at: 0: at the hook manager's insertion site, like test-time registers; b > 0: at
            the input of block b.
        cls_pos: timm ViTs only: the block at whose input CLS enters (``None``: at the start, as usual).
        seed: seeds the initial tokens, normal with std :data:`INIT_STD`.
    """

    def __init__(self, num_registers: int, width: int, *, insert_at: int = 0, cls_pos: int | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        check_int("num_registers", num_registers, minimum=0)
        check_int("width", width)
        check_int("insert_at", insert_at, minimum=0)
        if cls_pos is not None:
            check_int("cls_pos", cls_pos, minimum=0)
        generator = torch.Generator().manual_seed(seed)
        initial = INIT_STD * torch.randn(1, num_registers, width, generator=generator)
        self.tokens = nn.Parameter(initial.to(device=device, dtype=dtype))
        self.insert_at = insert_at
        self.cls_pos = cls_pos

    @classmethod
    def for_model(cls, hook_manager: HookManager, num_registers: int, *, insert_at: int = 0,
                  cls_pos: int | None = None, seed: int = 0) -> "LearnableRegisters":
        """Registers as wide as the model, on its device and in its dtype."""
        weight = hook_manager.mlp_output_projection(0).weight
        return cls(num_registers, hook_manager.hidden_size, insert_at=insert_at, cls_pos=cls_pos, seed=seed,
                   dtype=weight.dtype, device=weight.device)

    @property
    def num_registers(self) -> int:
        return self.tokens.shape[1]

    def extra_repr(self) -> str:
        return f"num_registers={self.num_registers}, insert_at={self.insert_at}, cls_pos={self.cls_pos}"

    def check_fits(self, hook_manager: HookManager) -> None:
        """Raise if the model cannot take these registers (see the module docstring)."""
        hook_manager.check_layer(self.insert_at, "insert_at")
        if self.tokens.shape[2] != hook_manager.hidden_size:
            raise InvalidArgumentError(f"the registers are {self.tokens.shape[2]} wide but the model's hidden size "
                                       f"is {hook_manager.hidden_size}")
        name = type(hook_manager).__name__
        prepares = type(hook_manager).prepare_for_registers is not HookManager.prepare_for_registers
        if self.num_registers and prepares and not hook_manager.layout.registers_after_prefix:
            raise UnsupportedModelError(
                f"{name} extends position-dependent tensors (a relative position bias or an "
                "attention mask) for tokens appended after the patches, but learned registers sit after the prefix")
        if self.num_registers and prepares and self.insert_at:
            raise UnsupportedModelError(f"{name} counts extra tokens in every block, so learned "
                                        f"registers must go in before block 0 (insert_at=0), not {self.insert_at}")
        if self.cls_pos is not None:
            hook_manager.check_layer(self.cls_pos, "cls_pos")
            if cls_entry(hook_manager) is None:
                raise UnsupportedModelError(f"cls_pos needs a timm VisionTransformer with a class token, "
                                            f"got {type(hook_manager.root).__name__}")


def cls_entry(hook_manager: HookManager) -> nn.Module | None:
    """Where CLS can be taken out and put back (timm's ``norm_pre``, the registers' insertion site, when
    CLS is the first token and registers go after the patches), or None."""
    norm_pre = getattr(hook_manager.root, "norm_pre", None)
    layout = hook_manager.layout
    if norm_pre is None or not layout.num_cls or layout.registers_after_prefix or \
            hook_manager.register_insertion_site().module is not norm_pre:
        return None
    return norm_pre


@dataclass
class _TokenState:
    """Which token groups are in the sequence now, during one forward pass."""

    active: int = 0                     # open registers_in contexts
    cls_in: bool = True
    registers_in: bool = False
    held_cls: torch.Tensor | None = None   # CLS [B, num_cls, D] while it is out


def _with_placeholders(tensor: torch.Tensor, gaps: Sequence[tuple[int, int]], dims: Sequence[int]) -> torch.Tensor:
    """Zeros inserted along each of ``dims``: ``count`` of them at ``position``, for each gap (ascending)."""
    for dim in dims:
        for position, count in gaps:
            shape = list(tensor.shape)
            shape[dim] = count
            zeros = tensor.new_zeros(shape)
            tensor = torch.cat([tensor.narrow(dim, 0, position), zeros,
                                tensor.narrow(dim, position, tensor.shape[dim] - position)], dim=dim)
    return tensor


def _without_placeholders(tensor: torch.Tensor, gaps: Sequence[tuple[int, int]], dims: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`_with_placeholders`."""
    for dim in dims:
        for position, count in reversed(gaps):
            end = position + count
            tensor = torch.cat([tensor.narrow(dim, 0, position), tensor.narrow(dim, end, tensor.shape[dim] - end)],
                               dim=dim)
    return tensor


class RegisteredModel(nn.Module):
    """A model run with learned registers (and, for timm, CLS entering at a chosen block).

    ``forward`` takes and returns what the wrapped model's forward does; ``forward_images``
    runs preprocessed images [B, 3, H, W] as the hook manager does. After each call,
    ``register_tokens`` [B, K, hidden_size] holds the learned registers as they left the last
    block (detached). Attributes the wrapper lacks are the wrapped model's; its image methods
    (``encode_image`` for CLIP) run with the registers.

    Args:
        model: the model the hook manager describes.
        hook_manager: its hook manager.
        registers: the learned registers.
        classifier: an optional head on the pooled output (``classify``), e.g. a new linear layer.
        name: the name of the registered model (recorded in neuron files found on it).
    """

    def __init__(self, model: nn.Module, hook_manager: HookManager, registers: LearnableRegisters,
                 classifier: nn.Module | None = None, *, name: str | None = None):
        super().__init__()
        if not any(module is hook_manager.blocks[0] for module in model.modules()):
            raise InvalidArgumentError("the hook manager does not describe this model: build it from the same model")
        registers.check_fits(hook_manager)
        self.model = model
        self.registers = registers
        self.classifier = classifier
        self.base_hook_manager = hook_manager
        self.register_tokens: torch.Tensor | None = None
        self._state = _TokenState()
        described = f"{registers.num_registers} learned register" + ("s" if registers.num_registers != 1 else "")
        #: A view of ``hook_manager`` in the final layout (see the module docstring).
        self.hook_manager = hook_manager.view(_LearnedRegisters(self, name or f"{hook_manager.name} with {described}"))

    def extra_repr(self) -> str:
        return f"base={self.base_hook_manager.name!r}"

    # ---- running ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The wrapped model's forward, with the registers, under the hook manager's autocast (if any)."""
        with self.registers_in(), self.base_hook_manager.autocast():
            return self.model(*args, **kwargs)

    def forward_images(self, pixel_values: torch.Tensor):
        """The hook manager's image forward [B, 3, H, W], with the registers."""
        return self.hook_manager.forward_images(pixel_values)

    def pooled(self, output) -> torch.Tensor:
        """The image-level output [B, F] of an image forward (see :func:`pooled_output`)."""
        return pooled_output(output, self.base_hook_manager.layout)

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes]: the pooled output through ``classifier``, or the model's own (timm's head)."""
        pooled = self.pooled(self.forward_images(pixel_values))
        return pooled if self.classifier is None else self.classifier(pooled)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("_"):
                raise
        attribute = getattr(model, name)
        if name not in self.base_hook_manager.forward_methods:
            return attribute

        def with_registers(*args, **kwargs):
            with self.registers_in(), self.base_hook_manager.autocast():
                return attribute(*args, **kwargs)

        with_registers.__doc__ = attribute.__doc__
        return with_registers

    @contextlib.contextmanager
    def registers_in(self) -> Iterator[None]:
        """Every call of the wrapped model inside this context runs with the registers (re-entrant)."""
        state = self._state
        if state.active:
            yield
            return
        base, registers = self.base_hook_manager, self.registers
        with base.hooks() as hooks:
            state.active += 1
            hooks.on_exit(self._leave)
            hooks.on(base.site(base.patch_embedding, "input"), self._start_pass)
            if registers.num_registers:
                base.prepare_for_registers(registers.num_registers, hooks)
                site = (base.register_insertion_site() if registers.insert_at == 0
                        else base.site(base.blocks[registers.insert_at], "input"))
                hooks.on(site, self._insert_registers, prepend=True)
                hooks.on(base.register_removal_site(), self._remove_registers)   # after any test-time registers leave
            if registers.num_registers or registers.cls_pos is not None:
                base.refuse_intermediate_methods(hooks, "run the RegisteredModel's forward or forward_images, and "
                                                        "read the learned registers from register_tokens")
            if registers.cls_pos is not None:
                hooks.on(base.site(cls_entry(base), "output"), self._take_cls, prepend=True)
                hooks.on(base.site(base.blocks[registers.cls_pos], "input"), self._put_cls, prepend=True)
            yield

    # ---- hooks -----------------------------------------------------------------------
    def _leave(self) -> None:
        self._state = _TokenState()

    def _start_pass(self, _pixels: torch.Tensor) -> None:
        """A new forward pass: CLS is in (the embedding adds it), the registers are not yet."""
        state = self._state
        state.cls_in, state.registers_in, state.held_cls = True, False, None

    def _register_position(self) -> int:
        layout = self.base_hook_manager.layout
        return (layout.num_cls if self._state.cls_in else 0) + layout.num_trained_registers

    def _insert_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._state.registers_in:
            raise InvalidArgumentError("the learned registers were inserted twice in one forward pass")
        where = self._register_position()
        learned = self.registers.tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        self._state.registers_in = True
        return torch.cat([tokens[:, :where], learned, tokens[:, where:]], dim=1)

    def _remove_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        where, count = self._register_position(), self.registers.num_registers
        self.register_tokens = tokens[:, where:where + count].detach()
        self._state.registers_in = False
        return torch.cat([tokens[:, :where], tokens[:, where + count:]], dim=1)

    def _take_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        count = self.base_hook_manager.layout.num_cls
        self._state.held_cls = tokens[:, :count]
        self._state.cls_in = False
        return tokens[:, count:]

    def _put_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        held, self._state.held_cls = self._state.held_cls, None
        self._state.cls_in = True
        return torch.cat([held.to(tokens.dtype), tokens], dim=1)

    def placeholders(self) -> list[tuple[int, int]]:
        """The token groups missing from the sequence now: ``(position in the final layout, count)``, ascending."""
        layout, state = self.base_hook_manager.layout, self._state
        gaps = []
        if not state.cls_in:
            gaps.append((0, layout.num_cls))
        if not state.registers_in and self.registers.num_registers:
            gaps.append((layout.num_cls + layout.num_trained_registers, self.registers.num_registers))
        return gaps

    def in_final_layout(self, fn: Callable[[torch.Tensor], Any], dims: Sequence[int] = (1,)):
        """Wrap a hook function so that it always sees the final layout: missing token groups are zero
        placeholders along ``dims`` while it runs, and are dropped again from what it returns."""
        def through_final_layout(tensor: torch.Tensor):
            if not self._state.active:
                raise InvalidArgumentError(
                    "this hook manager describes the model with its learned registers: run the model through its "
                    "RegisteredModel (or hook_manager.forward_images), not the bare model")
            gaps = self.placeholders()
            if not gaps:
                return fn(tensor)
            padded = _with_placeholders(tensor, gaps, dims)
            result = fn(padded)
            return _without_placeholders(padded if result is None else result, gaps, dims)

        return through_final_layout


class _LearnedRegisters(Extension):
    """What a :class:`RegisteredModel` adds, for its hook manager view: the learned registers count as
    trained registers, and every site shows that layout at every block (zero placeholders where
    tokens do not exist yet; ``layout_at(block)`` gives the tokens that really exist there)."""

    def __init__(self, registered: RegisteredModel, name: str):
        self.model = registered
        self.name = name

    def extend_layout(self, layout: TokenLayout) -> TokenLayout:
        return replace(layout, num_trained_registers=layout.num_trained_registers + self.model.registers.num_registers)

    def extend_layout_at(self, block: int, layout: TokenLayout) -> TokenLayout:
        registers = self.model.registers
        cls_in = registers.cls_pos is None or block >= registers.cls_pos
        learned = registers.num_registers if block >= registers.insert_at else 0
        return replace(layout, num_cls=layout.num_cls if cls_in else 0,
                       num_trained_registers=layout.num_trained_registers + learned)

    def adapt(self, fn: TensorFn, dims: Sequence[int] = (1,)) -> TensorFn:
        return self.model.in_final_layout(fn, dims)

    def running(self) -> contextlib.AbstractContextManager:
        return self.model.registers_in()

    def view_name(self, name: str) -> str:
        return self.name


# ---------------------------------------------------------------------------- checkpoints

#: Size limits of a trained-register folder's files.
MAX_WEIGHTS_BYTES = 64 * 2**30
MAX_HEADER_BYTES = 100 * 2**20
#: Bounds of the metadata's counts (far above any real model).
MAX_REGISTERS = 4096
MAX_LAYER = 4096
MAX_FEATURES = 2**24
#: The metadata's keys, and the key of registers.json that names the weights' digest.
METADATA_KEYS = ("format", "base_model", "seed", "learned_registers", "registers_in_layout", "insert_at", "cls_pos",
                 "head_classes", "classifier", "from_scratch", "parameters")
DIGEST_KEY = "weights_sha256"


def save_trained_registers(folder: str | os.PathLike, registered: RegisteredModel, *, base_model: str,
                           parameters: Sequence[str], seed: int = 0, head_classes: int | None = None,
                           from_scratch: dict | None = None, extra: dict | None = None) -> Path:
    """Write what training changed to ``folder/registers.safetensors`` and its metadata to ``folder/registers.json``.

    Args:
        registered: the trained model.
        base_model: the model spec its base loads from (``timm:NAME:random`` for a model trained from scratch).
        parameters: the names, in ``registered.state_dict()``, of the tensors to save: the
            registers, the trained blocks and norms, the head.
        seed: the seed the base model loads with (the demo and config-only folders depend on it).
        head_classes: a timm model whose classifier was reset to this many classes before training.
        from_scratch: ``{"timm_model": NAME, "kwargs": {...}}`` for a model built by ``timm.create_model``.
        extra: more JSON metadata (the training options, the loss curve).

    The two files are written as a unit (:func:`~test_time_registers.files.write_unit`): the
    weights, with the metadata inside them, then ``registers.json``, which repeats the metadata
    and names the weights' SHA-256, so that a reader detects a mismatched pair. A failed save
    replaces nothing, leaves no temporary file, and removes the folder if it made it.
    Returns the path of the weights.
    """
    folder = Path(folder)
    state = registered.state_dict(keep_vars=False)
    unknown = [name for name in parameters if name not in state]
    if unknown:
        raise InvalidArgumentError(f"not tensors of the registered model: {', '.join(unknown[:5])}")
    registers = registered.registers
    classifier = registered.classifier
    clashes = sorted(set(extra or {}) & {*METADATA_KEYS, DIGEST_KEY})
    if clashes:
        raise InvalidArgumentError(f"extra metadata cannot replace {', '.join(clashes)}")
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "base_model": base_model,
        "seed": seed,
        "learned_registers": registers.num_registers,
        "registers_in_layout": registered.hook_manager.layout.num_trained_registers,
        "insert_at": registers.insert_at,
        "cls_pos": registers.cls_pos,
        "head_classes": head_classes,
        "classifier": None if classifier is None else {"in_features": classifier.in_features,
                                                       "out_features": classifier.out_features},
        "from_scratch": from_scratch,
        "parameters": list(parameters),
        **(extra or {}),
    }
    try:
        text = json.dumps(metadata, indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(f"the metadata of trained registers must be finite JSON ({error})") from None
    tensors = {name: state[name].detach().cpu().contiguous() for name in parameters}
    digest: dict[str, str] = {}

    def write_weights(temporary: str) -> None:
        save_file(tensors, temporary, metadata={METADATA_KEY: text})
        digest["sha256"] = sha256(temporary)

    def write_metadata(temporary: str) -> None:
        Path(temporary).write_text(json.dumps({**metadata, DIGEST_KEY: digest["sha256"]}, indent=2) + "\n")

    with output_folder(folder):
        write_unit({folder / WEIGHTS_FILE: write_weights, folder / METADATA_FILE: write_metadata})
    return folder / WEIGHTS_FILE


def _refuse(origin: Path | str, field: str, expected: str, got: Any) -> None:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
    raise TrainedRegistersError(f"{origin}: {field} must be {expected}, got {shown}")


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_trained_metadata(metadata: Any, origin: Path | str) -> dict[str, Any]:
    """``metadata`` if every field of trained registers' metadata has its type and range; else
    :class:`TrainedRegistersError` naming ``origin`` and the field. Keys beyond :data:`METADATA_KEYS`
    (the training options, the loss curve) are kept unchecked."""
    if not isinstance(metadata, dict):
        _refuse(origin, "the metadata", "a JSON object", type(metadata).__name__)
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise TrainedRegistersError(f"{origin}: the metadata lacks {', '.join(missing)}")
    if not _whole(metadata["format"], 0, 2**31):
        _refuse(origin, "format", f"an int (this version reads {CHECKPOINT_FORMAT})", metadata["format"])
    if metadata["format"] > CHECKPOINT_FORMAT:
        raise TrainedRegistersError(f"{origin} has format {metadata['format']}, newer than the {CHECKPOINT_FORMAT} "
                                    "this version reads; upgrade test-time-registers")
    if metadata["format"] != CHECKPOINT_FORMAT:
        _refuse(origin, "format", str(CHECKPOINT_FORMAT), metadata["format"])
    if not isinstance(metadata["base_model"], str) or not metadata["base_model"] or len(metadata["base_model"]) > 1000:
        _refuse(origin, "base_model", "a model spec (a non-empty string)", metadata["base_model"])
    if not _whole(metadata["seed"], 0, 2**63 - 1):
        _refuse(origin, "seed", "an int in 0..2**63-1", metadata["seed"])
    if not _whole(metadata["learned_registers"], 0, MAX_REGISTERS):
        _refuse(origin, "learned_registers", f"an int in 0..{MAX_REGISTERS}", metadata["learned_registers"])
    if not _whole(metadata["registers_in_layout"], metadata["learned_registers"], MAX_REGISTERS + 64):
        _refuse(origin, "registers_in_layout", "an int of at least learned_registers", metadata["registers_in_layout"])
    if not _whole(metadata["insert_at"], 0, MAX_LAYER):
        _refuse(origin, "insert_at", f"an int in 0..{MAX_LAYER}", metadata["insert_at"])
    if metadata["cls_pos"] is not None and not _whole(metadata["cls_pos"], 0, MAX_LAYER):
        _refuse(origin, "cls_pos", f"null or an int in 0..{MAX_LAYER}", metadata["cls_pos"])
    if metadata["head_classes"] is not None and not _whole(metadata["head_classes"], 1, MAX_FEATURES):
        _refuse(origin, "head_classes", f"null or an int in 1..{MAX_FEATURES}", metadata["head_classes"])
    classifier = metadata["classifier"]
    if classifier is not None and not (isinstance(classifier, dict) and set(classifier) == {"in_features", "out_features"}
                                       and all(_whole(value, 1, MAX_FEATURES) for value in classifier.values())):
        _refuse(origin, "classifier", 'null or {"in_features": int, "out_features": int}', classifier)
    scratch = metadata["from_scratch"]
    if scratch is not None:
        if not (isinstance(scratch, dict) and set(scratch) == {"timm_model", "kwargs"}
                and isinstance(scratch["timm_model"], str) and scratch["timm_model"]
                and isinstance(scratch["kwargs"], dict)):
            _refuse(origin, "from_scratch", 'null or {"timm_model": NAME, "kwargs": {...}}', scratch)
        for key, value in scratch["kwargs"].items():
            plain = value is None or isinstance(value, (bool, str)) or finite_number(value)
            if not key.isidentifier() or not plain:
                _refuse(origin, f"from_scratch.kwargs[{key[:40]!r}]", "a keyword with a number, string, bool or null",
                        value)
    parameters = metadata["parameters"]
    if not (isinstance(parameters, list) and all(isinstance(name, str) for name in parameters)
            and len(set(parameters)) == len(parameters)):
        _refuse(origin, "parameters", "a list of distinct tensor names", parameters)
    return metadata


def _safetensors_header(weights: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read strictly (size, nesting, repeated keys) before anything else."""
    try:
        info = weights.stat()
        with open(weights, "rb") as handle:
            start = handle.read(8)
            size = int.from_bytes(start, "little") if len(start) == 8 else None
            if size is None or not 2 <= size <= min(MAX_HEADER_BYTES, info.st_size - 8):
                raise TrainedRegistersError(f"{weights} is not a safetensors file: its first 8 bytes do not give the "
                                            "length of a header inside the file")
            header = handle.read(size)
    except OSError as error:
        raise TrainedRegistersError(f"cannot read {weights}: {error.strerror or error}") from None
    parsed = parse_json(header, TrainedRegistersError, f"the safetensors header of {weights}")
    if not isinstance(parsed, dict):
        _refuse(weights, "the safetensors header", "a JSON object", type(parsed).__name__)
    return parsed


def read_trained_registers(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of trained registers: their folder, or the ``.safetensors`` file alone.

    Every file is size-limited before it is read and parsed as strict JSON; every metadata field is
    checked (:func:`check_trained_metadata`). A folder's ``registers.json`` must repeat the
    metadata inside the weights and name their SHA-256 (the file alone is read from its own
    metadata). The tensors must be exactly the metadata's ``parameters``, floating point and finite.

    Raises:
        TrainedRegistersError: (a :class:`ModelLoadError`) naming the file, the field and what was expected.
    """
    path = Path(path)
    folder_form = path.is_dir()
    weights = path / WEIGHTS_FILE if folder_form else path
    if not weights.exists():
        raise TrainedRegistersError(f"no trained registers at {path} (expected a folder with {WEIGHTS_FILE} and "
                                    f"{METADATA_FILE}, or the {WEIGHTS_FILE} file)")
    if not weights.is_file():
        raise TrainedRegistersError(f"{weights} is not a regular file")
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise TrainedRegistersError(f"{weights} has {size} bytes, more than the {MAX_WEIGHTS_BYTES} trained "
                                    "registers may have")
    header = _safetensors_header(weights)
    embedded = header.get("__metadata__")
    if not isinstance(embedded, dict) or not isinstance(embedded.get(METADATA_KEY), str):
        raise TrainedRegistersError(f"{weights} was not written by test-time-registers-train: it has no "
                                    f"{METADATA_KEY!r} metadata")
    metadata = check_trained_metadata(parse_json(embedded[METADATA_KEY], TrainedRegistersError,
                                                 f"the metadata inside {weights}"), weights)
    if folder_form:
        described = path / METADATA_FILE
        listed = parse_json(read_bounded(described, MAX_JSON_BYTES, TrainedRegistersError, "trained-register metadata"),
                            TrainedRegistersError, str(described))
        check_trained_metadata(listed, described)
        digest = listed.get(DIGEST_KEY)
        if not isinstance(digest, str):
            _refuse(described, DIGEST_KEY, f"the SHA-256 of {WEIGHTS_FILE} (hex)", digest)
        if {key: value for key, value in listed.items() if key != DIGEST_KEY} != metadata:
            differ = sorted(key for key in {*listed, *metadata} - {DIGEST_KEY} if listed.get(key) != metadata.get(key))
            raise TrainedRegistersError(f"{described} disagrees with the metadata inside {weights} (in "
                                        f"{', '.join(str(key)[:40] for key in differ[:5])}); the pair is not one save")
        if digest != sha256(weights):
            raise TrainedRegistersError(f"{described}: {DIGEST_KEY} does not match {weights}; the weights were "
                                        "replaced or damaged after the save")
    try:
        tensors = load_file(weights)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:   # safetensors' errors, and a panic of its parser (a BaseException)
        raise TrainedRegistersError(f"{weights} is not a readable safetensors file ({first_line(error)[:200]})") \
            from None
    if set(tensors) != set(metadata["parameters"]):
        odd = sorted(set(tensors) ^ set(metadata["parameters"]))
        raise TrainedRegistersError(f"{weights}: parameters must name exactly its tensors; they differ in "
                                    f"{', '.join(name[:60] for name in odd[:5])}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            _refuse(weights, name, "a finite floating-point tensor", f"{tensor.dtype} {list(tensor.shape)}")
    return metadata, tensors


def apply_trained_registers(path: str | os.PathLike, base: LoadedModel, *, name: str | None = None) -> LoadedModel:
    """Put a checkpoint's registers, trained weights and head onto an already loaded base model.

    Returns a :class:`LoadedModel` whose model is a :class:`RegisteredModel` in eval mode and whose
    hook manager is its view (``registered.hook_manager``); the rest (preprocess, demo scenes,
    tokenizer) is the base's.

    Raises:
        TrainedRegistersError: the checkpoint is damaged (see :func:`read_trained_registers`), or
            does not fit the base model (a layer, a width or a tensor shape it does not have).
    """
    metadata, tensors = read_trained_registers(path)
    hook_manager = base.hook_manager
    model = hook_manager.model
    base_name = metadata["base_model"]
    if metadata["head_classes"]:
        if not hasattr(model, "reset_classifier"):
            raise TrainedRegistersError(f"{path}: its head was reset to {metadata['head_classes']} classes, but "
                                        f"{type(model).__name__} has no reset_classifier")
        model.reset_classifier(metadata["head_classes"])
    try:
        registers = LearnableRegisters.for_model(hook_manager, metadata["learned_registers"],
                                                 insert_at=metadata["insert_at"], cls_pos=metadata["cls_pos"])
        classifier = None
        if metadata["classifier"]:
            weight = hook_manager.patch_embedding.weight
            classifier = nn.Linear(metadata["classifier"]["in_features"], metadata["classifier"]["out_features"],
                                   device=weight.device, dtype=weight.dtype)
        registered = RegisteredModel(model, hook_manager, registers, classifier, name=name or f"registers:{path}")
    except (InvalidArgumentError, UnsupportedModelError) as error:
        raise TrainedRegistersError(f"{path}: its metadata does not fit {base_name} ({first_line(error)})") from None
    if registered.hook_manager.layout.num_trained_registers != metadata["registers_in_layout"]:
        _refuse(path, "registers_in_layout", f"{registered.hook_manager.layout.num_trained_registers} on {base_name}",
                metadata["registers_in_layout"])
    targets = dict(registered.named_parameters()) | dict(registered.named_buffers())
    with torch.no_grad():
        for key, value in tensors.items():
            if key not in targets:
                raise TrainedRegistersError(f"{path}: the checkpoint has {key[:80]}, which {base_name} does not")
            if targets[key].shape != value.shape:
                raise TrainedRegistersError(f"{path}: {key} is {list(value.shape)} in the checkpoint but "
                                            f"{list(targets[key].shape)} in {base_name}")
            targets[key].copy_(value)
    return LoadedModel(registered.eval(), base.preprocess, registered.hook_manager, synthetic=base.synthetic,
                       planted=base.planted, generate_images=base.generate_images, tokenizer=base.tokenizer)


def load_trained_registers(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                           precision: str = "fp32") -> LoadedModel:
    """Load a checkpoint's base model (named in its metadata) and put the trained registers on it.

    Raises:
        TrainedRegistersError: the checkpoint is damaged or does not fit its base model.
        ModelLoadError: the base model cannot be loaded.
    """
    metadata, _ = read_trained_registers(path)
    scratch = metadata["from_scratch"]
    if scratch:
        try:
            base = load_model(f"timm:{scratch['timm_model']}:random", device=device, precision=precision,
                              **scratch["kwargs"])
        except (InvalidArgumentError, TypeError, ValueError, KeyError, AssertionError, RuntimeError) as error:
            if isinstance(error, ModelLoadError):
                raise
            raise TrainedRegistersError(f"{path}: from_scratch does not build a timm model "
                                        f"({type(error).__name__}: {first_line(error)[:200]})") from None
    else:
        # A base with random weights (openclip:NAME:random, timm:NAME:random) comes back from the seed, drawn first
        # as test-time-registers-train draws it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(metadata["seed"])
            base = load_model(metadata["base_model"], device=device, precision=precision, seed=metadata["seed"])
    return apply_trained_registers(path, base)
