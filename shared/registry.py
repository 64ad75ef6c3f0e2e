"""One registry: model specs name architectures, and model classes name their hook managers.

**Model classes.** :func:`register_model` says, next to a hook manager, which model classes it
describes, which wrappers hold such a model and under which attribute (``CLIP.visual``,
``Dinov2ForImageClassification.dinov2``), and which classes cannot be supported and why. Keys
are classes, or class names for transformers, so that nothing imports transformers early; the
most specific class wins, and at the same class a type key beats a name key.
:func:`hook_manager_for` returns the hook manager of any supported model object.

**Model specs.** A model spec is ``PREFIX:REFERENCE``, e.g. ``openclip:ViT-B-16:laion2b_s34b_b88k`` or
``dinov2:facebook/dinov2-large``. Each architecture package registers its prefix, its loader
and its presets when it is imported::

    @register_architecture("timm", spec="timm:NAME[:CHECKPOINT|:random]")
    def load_timm_spec(reference: str, *, device, precision, seed, **options) -> LoadedModel: ...

The command line imports an architecture package when a spec names its prefix: installed
packages say which package serves which prefix under the entry-point group
``test_time_registers.architectures`` (see ``pyproject.toml``), so other packages can add
architectures without touching this one.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import InvalidArgumentError, ModelLoadError, NeuronFileError, UnsupportedModelError
from .loading import LoadedModel
from .neurons import MAX_FILE_BYTES, RegisterNeurons
from .precision import get_precision

if TYPE_CHECKING:
    from .hooks import HookManager

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "test_time_registers.architectures"

#: ``load(reference, *, device, precision, seed) -> LoadedModel``
Loader = Callable[..., LoadedModel]


@dataclass(frozen=True)
class Preset:
    """A published register-neuron list shipped as a JSON neuron file inside a package."""

    name: str
    package: str       # the package holding the file
    file: str
    model: str         # the model spec it belongs to
    description: str = ""

    def load(self) -> RegisterNeurons:
        """The preset's neurons, read and checked like any neuron file.

        Raises:
            NeuronFileError: the file is missing from the package, too large, or not a valid neuron file.
        """
        origin = f"preset {self.name} ({self.package}/{self.file})"
        try:
            with resources.files(self.package).joinpath(self.file).open("rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except (OSError, ModuleNotFoundError) as error:
            raise NeuronFileError(f"cannot read {origin}: {error}") from None
        if len(data) > MAX_FILE_BYTES:
            raise NeuronFileError(f"{origin} has more than the {MAX_FILE_BYTES} bytes a neuron file may have")
        return RegisterNeurons.from_json(data, origin=origin)


@dataclass(frozen=True)
class Architecture:
    """One family of models that specs ``PREFIX:...`` name.

    The hook manager of a loaded model follows its class (:func:`hook_manager_for`).
    """

    prefix: str
    load: Loader
    spec: str                        # the spec's form, shown in help and errors
    description: str = ""
    examples: tuple[str, ...] = ()
    presets: Mapping[str, Preset] = field(default_factory=dict)
    alias_of: str | None = None      # set for an alias prefix (``deit`` for ``timm``)

    def load_spec(self, reference: str, *, device: torch.device | str = "cpu", precision: str = "fp32",
                  seed: int = 0, **options: Any) -> LoadedModel:
        precision = get_precision(precision).name
        try:
            inspect.signature(self.load).bind(reference, device=device, precision=precision, seed=seed, **options)
        except TypeError:
            raise InvalidArgumentError(f"the {self.prefix}: loader takes no option(s) {', '.join(sorted(options))}") \
                from None
        return self.load(reference, device=device, precision=precision, seed=seed, **options)


_ARCHITECTURES: dict[str, Architecture] = {}
_LOADED_ENTRY_POINTS: set[str] = set()


def register_architecture(prefix: str, *, spec: str, description: str = "",
                          examples: tuple[str, ...] = (), presets: tuple[Preset, ...] = (),
                          aliases: tuple[str, ...] = ()) -> Callable[[Loader], Loader]:
    """Decorator: register ``load`` as the loader of specs ``PREFIX:REFERENCE`` (and of each alias).

    ``load(reference, *, device, precision, seed, **options)`` gets the part after the first colon
    (empty for a bare ``PREFIX``) and returns a :class:`LoadedModel`; it raises
    :class:`~test_time_registers.ModelLoadError` for anything it cannot load. ``options`` are
    what :func:`load_model` passes on; options a loader does not take are an ``InvalidArgumentError``.
    """
    def decorate(load: Loader) -> Loader:
        entry = Architecture(prefix, load, spec, description, tuple(examples),
                             {preset.name: preset for preset in presets})
        for name, architecture in ((prefix, entry), *((alias, _alias(entry, alias)) for alias in aliases)):
            existing = _ARCHITECTURES.get(name)
            if existing is not None and existing.load is not load:
                log.warning("model-spec prefix %r was registered twice; the later one wins", name)
            _ARCHITECTURES[name] = architecture
        return load

    return decorate


def _alias(entry: Architecture, alias: str) -> Architecture:
    return Architecture(alias, entry.load, entry.spec.replace(f"{entry.prefix}:", f"{alias}:", 1),
                        entry.description, entry.examples, presets={}, alias_of=entry.prefix)


def _load_entry_points(name: str | None = None) -> None:
    """Import the packages that serve prefix ``name`` (or every prefix), once each."""
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (name is not None and entry_point.name != name) or entry_point.value in _LOADED_ENTRY_POINTS:
            continue
        _LOADED_ENTRY_POINTS.add(entry_point.value)
        try:
            entry_point.load()
        except ImportError as error:   # a plug-in whose dependencies are missing must not break the rest
            log.warning("cannot import %s for model specs %r: %s", entry_point.value, entry_point.name, error)


def architectures() -> dict[str, Architecture]:
    """Every registered architecture by prefix, aliases included, after importing all installed ones."""
    _load_entry_points()
    return dict(sorted(_ARCHITECTURES.items()))


def find_architecture(prefix: str) -> Architecture:
    """The architecture registered for ``prefix``, importing only the package that serves it."""
    if prefix not in _ARCHITECTURES:
        _load_entry_points(prefix)
    if prefix not in _ARCHITECTURES:
        _load_entry_points()
    if prefix not in _ARCHITECTURES:
        raise ModelLoadError(f"unknown model spec prefix {prefix!r}; expected one of: {spec_forms()}")
    return _ARCHITECTURES[prefix]


def installed_prefixes() -> list[str]:
    """The prefixes registered so far and those installed packages serve, without importing any."""
    names = {entry_point.name for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names | set(_ARCHITECTURES))


def spec_forms() -> str:
    """The spec of every registered architecture, for help texts and errors."""
    return " | ".join(architecture.spec for architecture in architectures().values())


def load_model(spec: str, *, device: torch.device | str = "cpu", precision: str = "fp32", seed: int = 0,
               **options: Any) -> LoadedModel:
    """Load the model a spec names, e.g. ``load_model("timm:deit3_base_patch16_224.fb_in1k")``.

    ``options`` go to the architecture's loader, e.g. ``load_model("timm:vit_small_patch16_224:random",
    reg_tokens=4)`` builds that timm ViT with ``timm.create_model(..., reg_tokens=4)``.

    Raises:
        ModelLoadError: unknown prefix, or anything the architecture's loader cannot load.
        InvalidArgumentError: an unknown precision.
    """
    prefix, _, reference = spec.partition(":")
    return find_architecture(prefix).load_spec(reference, device=device, precision=precision, seed=seed, **options)


def presets() -> dict[str, Preset]:
    """Every registered preset by name."""
    return {name: preset for architecture in architectures().values() for name, preset in architecture.presets.items()}


def load_preset(name: str, hook_manager: HookManager | None = None) -> RegisterNeurons:
    """The register neurons of a preset, with their provenance in ``.source``.

    With ``hook_manager``, also check that they fit that model.
    """
    known = presets()
    if name not in known:
        raise NeuronFileError(f"unknown preset {name!r}; known: {', '.join(sorted(known)) or 'none'}")
    neurons = known[name].load()
    if hook_manager is not None:
        neurons.check_fits(hook_manager)
    return neurons


def load_neurons(spec: str | os.PathLike, hook_manager: HookManager | None = None) -> RegisterNeurons:
    """The register neurons ``spec`` names, checked against ``hook_manager`` if given.

    ``spec`` is a neuron file path, ``preset:NAME`` for a shipped list, or ``hf-hub:ORG/REPO[/FILE]``
    for a neuron file on the Hugging Face hub (``register_neurons.json`` by default; read through
    the cache like a model, see :meth:`RegisterNeurons.load`).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise NeuronFileError(f"neurons must be named by a file path, 'preset:NAME' or 'hf-hub:ORG/REPO[/FILE]', "
                              f"got {type(spec).__name__}")
    if isinstance(spec, str) and spec.startswith("preset:"):
        return load_preset(spec.removeprefix("preset:"), hook_manager)
    return RegisterNeurons.load(spec, hook_manager)


# ---- model classes -> hook managers ------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model class: exactly one of ``hook_manager`` (it describes
    the class), ``inside`` (the class wraps a model, at that attribute path, or at the path a function
    of the wrapper finds) or ``unsupported`` (why not).

    For a wrapper, ``run_inside`` says whether ``forward_images`` runs the wrapped model (an
    image tower: ``CLIP.visual``) or the wrapper itself (a classifier: its logits), and
    ``forward_methods`` names the wrapper's methods that run the image tower (``encode_image``).
    ``reads`` (a vision-language model) gives the tower blocks whose outputs the language model
    reads, from the wrapper and the tower's number of blocks.
    """

    key: type | str
    hook_manager: type[HookManager] | None = None
    inside: str | Callable[[nn.Module], str] | None = None
    run_inside: bool = False
    forward_methods: tuple[str, ...] = ()
    unsupported: str | None = None
    reads: Callable[[nn.Module, int], tuple[int, ...]] | None = None


@dataclass(frozen=True)
class Placement:
    """Where a hook manager's declaration applies inside the model it was given: ``root``, the
    described module, and ``image_model``, what ``forward_images`` runs (dotted paths, "" for the model).
    ``reads`` is the outermost wrapper's function giving the blocks a language model reads, if any."""

    root: str = ""
    image_model: str = ""
    forward_methods: tuple[str, ...] = ()
    reads: Callable[[nn.Module, int], tuple[int, ...]] | None = None
    reader: str = ""


_MODEL_TYPES: dict[type, ModelEntry] = {}
_MODEL_NAMES: dict[str, ModelEntry] = {}


def register_model(*keys: type | str, hook_manager: type[HookManager] | None = None,
                   inside: str | Callable[[nn.Module], str] | None = None, run_inside: bool = False,
                   forward_methods: tuple[str, ...] = (), unsupported: str | None = None,
                   reads: Callable[[nn.Module, int], tuple[int, ...]] | None = None) -> None:
    """Say what the library knows about models of these classes (types, or class names for transformers).

    Exactly one of: ``hook_manager`` describes them; they wrap a model at attribute path ``inside``
    (with ``run_inside``, ``forward_methods`` and ``reads`` as in :class:`ModelEntry`); or they are
    ``unsupported``, for the reason given.
    """
    if sum(value is not None for value in (hook_manager, inside, unsupported)) != 1:
        raise InvalidArgumentError("register_model needs exactly one of hook_manager=, inside= or unsupported=")
    for key in keys:
        entry = ModelEntry(key, hook_manager, inside, run_inside, tuple(forward_methods), unsupported, reads)
        (_MODEL_TYPES if isinstance(key, type) else _MODEL_NAMES)[key if isinstance(key, type) else str(key)] = entry


def model_entry(module: nn.Module) -> ModelEntry | None:
    """The entry of ``module``'s most specific registered class (a type key before a name key), or None."""
    for cls in type(module).__mro__:
        entry = _MODEL_TYPES.get(cls) or _MODEL_NAMES.get(cls.__name__)
        if entry is not None:
            return entry
    return None


def placement(model: nn.Module) -> Placement:
    """Follow registered wrappers from ``model`` down to the module a hook manager describes.

    Raises:
        UnsupportedModelError: a module on the way is registered as unsupported.
    """
    root, image_model, methods, module = "", None, None, model
    reads, reader = None, ""
    while True:
        entry = model_entry(module)
        if entry is not None and entry.unsupported is not None:
            raise UnsupportedModelError(f"{type(module).__name__} is not supported: {entry.unsupported}")
        if entry is None or entry.inside is None:
            return Placement(root, root if image_model is None else image_model, methods or (), reads, reader)
        if reads is None and entry.reads is not None:
            reads, reader = entry.reads, root
        path = entry.inside(module) if callable(entry.inside) else entry.inside
        try:
            module = module.get_submodule(path)
        except AttributeError:
            raise UnsupportedModelError(f"{type(module).__name__} should hold its model at {path!r}, "
                                        "but has nothing there") from None
        inner = f"{root}.{path}" if root else path
        if image_model is None:
            image_model = inner if entry.run_inside else root
        methods = entry.forward_methods if methods is None else methods
        root = inner


def check_described_by(module: nn.Module, hook_manager: type) -> None:
    """Raise if the registry says another hook manager than ``hook_manager`` describes ``module``.

    A hook manager class that no registration names (a user's own, or a subclass) is not checked.
    """
    registered = {entry.hook_manager for entry in (*_MODEL_TYPES.values(), *_MODEL_NAMES.values())}
    entry = model_entry(module)
    if hook_manager in registered and entry is not None and entry.hook_manager not in (None, hook_manager):
        raise UnsupportedModelError(f"{hook_manager.__name__} does not describe {type(module).__name__}; "
                                    f"{entry.hook_manager.__name__} does (hook_manager_for(model) picks it)")


def hook_manager_for(model: nn.Module, name: str | None = None, **options: Any) -> HookManager:
    """The hook manager of any supported model object: an open_clip ``CLIP`` or its tower, a timm
    ViT, a transformers model or its classification wrapper, ...

    Every installed architecture package is imported first, so that its classes are registered.
    ``name`` and ``options`` (``autocast_dtype``) go to the hook manager.

    Raises:
        UnsupportedModelError: the class is registered as unsupported (with the reason), or no
            hook manager describes it (with the supported classes).
    """
    architectures()
    place = placement(model)
    described = model.get_submodule(place.root) if place.root else model
    entry = model_entry(described)
    if entry is None or entry.hook_manager is None:
        known = sorted({key.__name__ if isinstance(key, type) else key
                        for key, value in (*_MODEL_TYPES.items(), *_MODEL_NAMES.items()) if value.hook_manager})
        raise UnsupportedModelError(f"no hook manager describes {type(described).__name__}; supported: "
                                    f"{', '.join(known)}; or subclass HookManager (see the README)")
    return entry.hook_manager(model, name, **options)


def supported_models() -> dict[str, ModelEntry]:
    """Every registered model class, after importing all installed architectures: classes by their
    qualified name (``timm.models.eva.Eva``), transformers classes by their name (``Dinov2Model``)."""
    architectures()
    entries = {**{f"{cls.__module__}.{cls.__qualname__}": entry for cls, entry in _MODEL_TYPES.items()}, **_MODEL_NAMES}
    return dict(sorted(entries.items()))
