"""Register neurons: a ranked list of (layer, neuron, score), saved as JSON (never pickle)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import write_atomically
from .errors import IncompatibleNeuronsError, InvalidArgumentError, InvalidArgumentTypeError, NeuronFileError

if TYPE_CHECKING:
    from .hooks import HookManager

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: ``model`` of neurons that name no model (given by hand), never checked against one.
UNKNOWN_MODEL = "unknown"
REQUIRED_KEYS = ("model", "detect_layer", "threshold", "highest_layer", "images_with_outliers", "neurons")


@dataclass(frozen=True)
class RegisterNeuron:
    layer: int
    neuron: int
    score: float = float("nan")


@dataclass
class RegisterNeurons:
    """Register neurons ranked best first, with how they were found.

    Iterating yields :class:`RegisterNeuron` items. ``threshold``, ``detect_layer`` and
    ``highest_layer`` are the values discovery actually used.
    """

    neurons: list[RegisterNeuron]
    model: str = UNKNOWN_MODEL
    detect_layer: int | None = None
    threshold: float | None = None
    highest_layer: int | None = None
    images_seen: int | None = None
    images_with_outliers: int | None = None
    image_size: tuple[int, int] | None = None
    score: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Every candidate neuron's score, [layers 0..highest_layer, max MLP width], NaN where a layer is narrower;
    #: saved beside the JSON file (``NAME.scores.safetensors``) and read back with it.
    candidate_scores: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _warned_for: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __iter__(self) -> Iterator[RegisterNeuron]:
        return iter(self.neurons)

    def __len__(self) -> int:
        return len(self.neurons)

    def __getitem__(self, index):
        return self.neurons[index]

    def pairs(self) -> list[tuple[int, int]]:
        return [(n.layer, n.neuron) for n in self.neurons]

    def by_layer(self) -> dict[int, list[int]]:
        """``{layer: [neurons, best first]}``, layers ascending."""
        grouped: dict[int, list[int]] = {}
        for item in self.neurons:
            grouped.setdefault(item.layer, []).append(item.neuron)
        return dict(sorted(grouped.items()))

    def top(self, k: int) -> "RegisterNeurons":
        """The best ``k`` neurons, with the same provenance."""
        return replace(self, neurons=self.neurons[:k])

    # ---- conversion ------------------------------------------------------------------
    @classmethod
    def coerce(cls, spec) -> "RegisterNeurons":
        """Accept RegisterNeurons, ``[(layer, neuron), ...]`` or ``{layer: [neuron, ...]}``."""
        if isinstance(spec, RegisterNeurons):
            return spec
        if isinstance(spec, Mapping):
            items = [(layer, neuron) for layer, neurons in spec.items() for neuron in neurons]
        elif isinstance(spec, Iterable) and not isinstance(spec, (str, bytes)):
            items = list(spec)
        else:
            raise InvalidArgumentTypeError("neurons must be RegisterNeurons, [(layer, neuron), ...] or "
                            f"{{layer: [neuron, ...]}}, got {type(spec).__name__}")
        parsed = []
        for item in items:
            if isinstance(item, RegisterNeuron):
                parsed.append(item)
                continue
            try:
                layer, neuron = item
                parsed.append(RegisterNeuron(_as_index(layer, "layer"), _as_index(neuron, "neuron")))
            except (TypeError, ValueError) as error:
                raise InvalidArgumentTypeError(f"cannot read {item!r} as a (layer, neuron) pair: {error}") from None
        pairs = [(n.layer, n.neuron) for n in parsed]
        if len(set(pairs)) != len(pairs):
            raise InvalidArgumentError(f"duplicate register neurons in {pairs}")
        return cls(parsed, source="given by hand")

    def model_mismatch(self, hook_manager: "HookManager") -> str | None:
        """Why these neurons may belong to another model than ``hook_manager``'s, or ``None``.

        Neurons found on one model are another model's noise even when their indices fit. The
        check compares the recorded ``model`` with the hook manager's ``name``; neurons given
        by hand name no model and always pass.
        """
        if self.model in (UNKNOWN_MODEL, "", None) or self.model == hook_manager.name:
            return None
        return f"these register neurons were found on {self.model}, not on {hook_manager.name}"

    def check_fits(self, hook_manager: "HookManager", *, warn_other_model: bool = True) -> None:
        """Raise :class:`IncompatibleNeuronsError` if a layer or neuron is out of range.

        Neurons recorded for another model (see :meth:`model_mismatch`) are logged as a warning,
        once per model, unless ``warn_other_model`` is false.
        """
        mismatch = self.model_mismatch(hook_manager) if warn_other_model else None
        if mismatch and hook_manager.name not in self._warned_for:   # once per model, not per use
            self._warned_for.add(hook_manager.name)
            log.warning("%s; their indices fit, so they are applied anyway", mismatch)
        for item in self.neurons:
            if not 0 <= item.layer < hook_manager.num_layers:
                raise IncompatibleNeuronsError(
                    f"register neuron ({item.layer}, {item.neuron}) names layer {item.layer}, but "
                    f"{hook_manager.name} has layers 0..{hook_manager.num_layers - 1}")
            width = hook_manager.num_neurons(item.layer)
            if not 0 <= item.neuron < width:
                raise IncompatibleNeuronsError(
                    f"register neuron ({item.layer}, {item.neuron}) is out of range: layer {item.layer} "
                    f"of {hook_manager.name} has neurons 0..{width - 1}")

    # ---- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "detect_layer": self.detect_layer,
            "threshold": self.threshold,
            "highest_layer": self.highest_layer,
            "images_seen": self.images_seen,
            "images_with_outliers": self.images_with_outliers,
            "image_size": list(self.image_size) if self.image_size else None,
            "score": self.score,
            "source": self.source,
            **({"extra": self.extra} if self.extra else {}),
            "neurons": [_neuron_dict(n) for n in self.neurons],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically: a failed write leaves no partial file behind.

        With :attr:`candidate_scores`, they go first to ``NAME.scores.safetensors`` beside it,
        which the JSON names.
        """
        path = Path(path)
        data = self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        scores_path = None
        if self.candidate_scores is not None:
            scores_path = scores_path_for(path)
            write_atomically(scores_path, lambda temporary: save_file(
                {"scores": self.candidate_scores.detach().float().cpu().contiguous()}, temporary,
                metadata={"model": str(self.model)}))
            data["candidate_scores_file"] = scores_path.name
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        try:
            write_atomically(path, lambda temporary: Path(temporary).write_text(text))
        except BaseException:
            if scores_path is not None:
                scores_path.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_dict(cls, data: Any, origin: str = "neuron data") -> "RegisterNeurons":
        if not isinstance(data, dict):
            raise NeuronFileError(f"{origin}: expected a JSON object at the top level")
        version = data.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise NeuronFileError(f"{origin}: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise NeuronFileError(f"{origin} has format_version {version}, newer than the {FORMAT_VERSION} this "
                                  "version of test-time-registers reads; upgrade test-time-registers")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise NeuronFileError(f"{origin}: missing key(s) {', '.join(missing)}")
        if not isinstance(data["neurons"], list) or not data["neurons"]:
            raise NeuronFileError(f"{origin}: 'neurons' must be a non-empty list")
        try:
            neurons = [RegisterNeuron(_as_index(item["layer"], "layer"), _as_index(item["neuron"], "neuron"),
                                      _as_score(item.get("score")))
                       for item in data["neurons"]]
        except (TypeError, KeyError, ValueError) as error:
            raise NeuronFileError(f"{origin}: each neuron needs integer 'layer' and 'neuron' ({error})") from None
        if len({(n.layer, n.neuron) for n in neurons}) != len(neurons):
            raise NeuronFileError(f"{origin}: a (layer, neuron) pair is listed twice")
        image_size = data.get("image_size")
        return cls(
            neurons=neurons,
            model=str(data["model"]),
            detect_layer=data["detect_layer"],
            threshold=data["threshold"],
            highest_layer=data["highest_layer"],
            images_seen=data.get("images_seen"),
            images_with_outliers=data["images_with_outliers"],
            image_size=tuple(image_size) if image_size else None,
            score=data.get("score"),
            source=data.get("source"),
            extra=dict(data.get("extra") or {}),
        )

    @classmethod
    def load(cls, path: str | os.PathLike, hook_manager: "HookManager | None" = None) -> "RegisterNeurons":
        """Read a neuron file; with ``hook_manager``, also check it fits that model."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NeuronFileError(f"neuron file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise NeuronFileError(f"{path} is not a readable JSON neuron file ({error})") from None
        neurons = cls.from_dict(data, origin=str(path))
        if isinstance(data, dict) and data.get("candidate_scores_file"):
            neurons.candidate_scores = _read_scores(path.parent / str(data["candidate_scores_file"]), path)
        if hook_manager is not None:
            neurons.check_fits(hook_manager)
        return neurons


def scores_path_for(path: str | os.PathLike) -> Path:
    """Where the candidate scores of the neuron file ``path`` are saved: ``NAME.scores.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.scores.safetensors")



def _read_scores(path: Path, origin: Path) -> torch.Tensor | None:
    """The candidate scores [layers, neurons] saved beside ``origin``, or ``None`` (logged) if they are gone."""
    try:
        scores = load_file(path)["scores"]
    except FileNotFoundError:
        log.warning("%s names candidate scores in %s, which is missing; figures of them will be skipped",
                    origin, path.name)
        return None
    except (SafetensorError, KeyError, OSError) as error:
        raise NeuronFileError(f"{path} is not a readable candidate-score file ({error})") from None
    if scores.ndim != 2:
        raise NeuronFileError(f"{path}: candidate scores must be [layers, neurons], got shape {list(scores.shape)}")
    return scores


def _neuron_dict(item: RegisterNeuron) -> dict[str, Any]:
    entry = asdict(item)
    if entry["score"] != entry["score"]:  # NaN is not valid JSON
        entry["score"] = None
    return entry


def _as_score(value) -> float:
    return float("nan") if value is None else float(value)


def _as_index(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)
