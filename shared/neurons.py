"""Register neurons: a ranked list of (layer, neuron, score), saved as JSON (never pickle).

A neuron file is read from a path or from the Hugging Face hub (``hf-hub:ORG/REPO[/FILE]``,
:data:`HUB_FILE` by default), and a folder ready to upload there is written by
:meth:`RegisterNeurons.save_pretrained`: the neuron file, its candidate scores and a model card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes, save as save_bytes

from .errors import (IncompatibleNeuronsError, InvalidArgumentError, InvalidArgumentTypeError, NeuronFileError,
                     first_line)
from .files import Writer, finite_number, output_folder, parse_json, read_bounded, write_unit
from .hub import hub_file, hub_model_of, is_repo_id, list_files

if TYPE_CHECKING:
    from .hooks import HookManager

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: ``model`` of neurons that name no model (given by hand), never checked against one.
UNKNOWN_MODEL = "unknown"
REQUIRED_KEYS = ("model", "detect_layer", "threshold", "highest_layer", "images_with_outliers", "neurons")
KNOWN_KEYS = ("format_version", *REQUIRED_KEYS, "images_seen", "image_size", "score", "source", "extra",
              "candidate_scores_file", "candidate_scores_sha256")
SCORES_KEY = "scores"

#: What a neuron file may hold: its size, and bounds on its indices and counts.
MAX_FILE_BYTES = 16 * 2**20
MAX_SCORES_BYTES = 256 * 2**20
MAX_LAYERS = 4096              # layer indices 0..MAX_LAYERS - 1
MAX_NEURONS = 2**20            # neuron indices 0..MAX_NEURONS - 1 (MLP widths are thousands)
MAX_IMAGE_SIDE = 2**16
MAX_COUNT = 2**53              # image counts: exact in any JSON reader

#: ``hf-hub:ORG/REPO[/FILE]`` names a neuron file on the Hugging Face hub; FILE is :data:`HUB_FILE` by default.
HUB_PREFIX = "hf-hub:"
HUB_FILE = "register_neurons.json"
#: The model card :meth:`RegisterNeurons.save_pretrained` writes beside the neuron file, and its tags.
CARD_FILE = "README.md"
LIBRARY_NAME = "test-time-registers"
CARD_TAGS = ("test-time-registers", "register-neurons", "vision-transformer")
#: Neurons listed one by one in a model card, at most.
CARD_ROWS = 100


@dataclass(frozen=True, eq=False)
class RegisterNeuron:
    """One register neuron; ``score`` is NaN when none is known. Two are equal when their layer, neuron and
    score are, a NaN score equal to a NaN score (so that a file without scores loads equal to itself)."""

    layer: int
    neuron: int
    score: float = float("nan")

    def _key(self) -> tuple:
        return self.layer, self.neuron, None if self.score != self.score else self.score

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, RegisterNeuron) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())


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
    _scores_file: Path | None = field(default=None, init=False, repr=False, compare=False)   # where read, for messages
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
        self._check_scores_fit(hook_manager)

    def _check_scores_fit(self, hook_manager: "HookManager") -> None:
        """Raise :class:`NeuronFileError` if the candidate scores have rows or columns the model lacks."""
        scores = self.candidate_scores
        if scores is None:
            return
        origin = str(self._scores_file) if self._scores_file is not None else "candidate_scores"
        rows, columns = scores.shape
        if rows > hook_manager.num_layers:
            raise NeuronFileError(f"{origin}: candidate scores of shape {[rows, columns]} have {rows} layer rows, "
                                  f"but {hook_manager.name} has {hook_manager.num_layers} layers")
        widest = max(hook_manager.num_neurons(layer) for layer in range(rows))
        if columns > widest:
            raise NeuronFileError(f"{origin}: candidate scores of shape {[rows, columns]} have {columns} neuron "
                                  f"columns, but the MLPs of {hook_manager.name} in layers 0..{rows - 1} have "
                                  f"at most {widest} neurons")

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
        """Write the JSON file and, with :attr:`candidate_scores`, ``NAME.scores.safetensors`` beside it, as a unit.

        Everything is checked with the reader first, so what is saved loads again; then the scores
        and the JSON go to temporary files and are renamed into place, the JSON last, naming the
        scores file and its SHA-256 digest. A failed save replaces nothing and leaves no temporary.

        Raises:
            NeuronFileError: a value a neuron file cannot hold (an infinite score, a NaN threshold,
                scores that are not [layers, neurons] floats); nothing is written.
        """
        path = Path(path)
        writers = self._writers(path)
        with output_folder(path.parent):
            write_unit(writers)
        return path

    def _writers(self, path: Path) -> dict[Path, Writer]:
        """The writers of the neuron file ``path`` and its scores, the scores first, all checked with the reader."""
        data = self.to_dict()
        writers: dict[Path, Writer] = {}
        origin = f"{path} (not saved)"
        if self.candidate_scores is not None:
            scores = self.candidate_scores
            if not isinstance(scores, torch.Tensor):
                raise NeuronFileError(f"{origin}: candidate_scores must be a tensor [layers, neurons], "
                                      f"got {type(scores).__name__}")
            blob = save_bytes({SCORES_KEY: scores.detach().float().cpu().contiguous()},
                              metadata={"model": str(self.model)})
            scores_path = scores_path_for(path)
            data["candidate_scores_file"] = scores_path.name
            data["candidate_scores_sha256"] = hashlib.sha256(blob).hexdigest()
            writers[scores_path] = lambda temporary: Path(temporary).write_bytes(blob)
        checked = self.from_dict(data, origin=origin)          # what is saved must load
        if self.candidate_scores is not None:
            _check_scores(self.candidate_scores.detach().float().cpu(), checked, f"{origin}: candidate_scores")
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        writers[path] = lambda temporary: Path(temporary).write_text(text, encoding="utf-8")
        return writers

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a folder to publish on the Hugging Face hub (``hf upload ORG/REPO DIR``), and return it.

        It holds :data:`HUB_FILE` (``register_neurons.json``), its candidate scores
        (``register_neurons.scores.safetensors``, with :attr:`candidate_scores`) and a model card
        ``README.md`` (see :func:`model_card`); ``load_neurons("hf-hub:ORG/REPO")`` reads the first
        two back. A new folder is written beside its place under a temporary name and renamed into
        place complete, so it appears whole or not at all; a missing parent folder is made, and
        removed again if the save fails. In a folder that exists (a clone of the repository), the
        three files are written as one unit, the neuron file last, replacing older ones of those
        names (the card included); without :attr:`candidate_scores`, an older save's scores file
        there is removed, so that the folder holds exactly what is published.

        Raises:
            NeuronFileError: a value a neuron file cannot hold, or ``directory`` is a file; nothing is written.
            OSError: the folder cannot be written; nothing new is left behind.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NeuronFileError(f"save_pretrained: {directory} is a file; give the folder to write "
                                  f"{HUB_FILE}, its scores and {CARD_FILE} into")
        writers = self._pretrained_writers(directory)            # everything checked before anything is made
        if directory.is_dir():
            write_unit(writers)
            stale = scores_path_for(directory / HUB_FILE)
            if self.candidate_scores is None and stale.is_file():   # an older save's: not part of what is published
                stale.unlink()
                log.info("removed %s, the scores of an older save that the new %s does not name", stale, HUB_FILE)
        else:
            with output_folder(directory.parent):
                _write_new_folder(directory, writers)
        log.info("wrote %s: %s", directory, ", ".join(path.name for path in writers))
        return directory

    def _pretrained_writers(self, directory: Path) -> dict[Path, Writer]:
        """The writers of :meth:`save_pretrained`'s files in ``directory``: scores, card, then the neuron file."""
        path = directory / HUB_FILE
        writers = self._writers(path)
        card = model_card(self, HUB_FILE)
        neuron_file = writers.pop(path)
        return {**writers, directory / CARD_FILE: lambda temporary: Path(temporary).write_text(card, encoding="utf-8"),
                path: neuron_file}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "neuron data") -> "RegisterNeurons":
        """Neurons from the parsed JSON of a neuron file, every field checked.

        Raises:
            NeuronFileError: a missing or unknown key, or a field of the wrong type or out of range;
                the message names ``origin``, the field and what was expected.
        """
        return cls(**_read_fields(data, origin))

    @classmethod
    def from_json(cls, data: bytes | str, origin: str = "neuron data") -> "RegisterNeurons":
        """Neurons from the text of a neuron file (strict JSON, nesting limited), every field checked."""
        return cls.from_dict(_parse(data, origin), origin)

    @classmethod
    def load(cls, path: str | os.PathLike, hook_manager: "HookManager | None" = None) -> "RegisterNeurons":
        """Read a neuron file and the candidate scores it names; with ``hook_manager``, check both fit that model.

        ``path`` is a file, or a string ``hf-hub:ORG/REPO[/FILE]``: the file FILE (default
        :data:`HUB_FILE`) of that Hugging Face hub repository, read through ``huggingface_hub``'s
        cache like a model (the cache only when the hub cannot be reached or ``HF_HUB_OFFLINE`` is
        set), and its scores from the same commit; nothing else is downloaded, and the scores only
        once the neuron file has been checked: the name it gives them must be a plain ``.safetensors``
        file name beside it (no folder, no ``..``), and, when the hub is asked, each file's size is
        checked before it is downloaded.
        The file is read only if it is a regular file of at most :data:`MAX_FILE_BYTES`; its
        scores only with safetensors, under :data:`MAX_SCORES_BYTES`, and only if their digest is
        the one the JSON names. Scores that are missing are logged and left out.

        Raises:
            NeuronFileError: anything wrong with either file, naming the file, the field and what was
                expected; for the hub, a repository or file that does not exist, or that cannot be
                downloaded and is not cached, with how to name another file or pass a local one.
            IncompatibleNeuronsError: with ``hook_manager``, a neuron the model does not have.
        """
        if isinstance(path, str) and path.startswith(HUB_PREFIX):
            neurons = cls._load_from_hub(path)
        else:
            neurons = cls._load_file(Path(path))
        if hook_manager is not None:
            neurons.check_fits(hook_manager)
        return neurons

    @classmethod
    def _load_file(cls, path: Path) -> "RegisterNeurons":
        if not path.exists() and not path.is_symlink():
            raise NeuronFileError(f"neuron file not found: {path}")
        data = _parse(read_bounded(path, MAX_FILE_BYTES, NeuronFileError, "neuron file"), str(path))
        neurons = cls.from_dict(data, origin=str(path))
        name = data.get("candidate_scores_file")
        if name is not None:
            scores_path = path.parent / name
            neurons.candidate_scores = _read_scores(scores_path, data["candidate_scores_sha256"], str(path), neurons)
            if neurons.candidate_scores is not None:
                neurons._scores_file = scores_path
        return neurons

    @classmethod
    def _load_from_hub(cls, spec: str) -> "RegisterNeurons":
        repo_id, filename = hub_location(spec)
        origin = f"{HUB_PREFIX}{repo_id}/{filename}"
        scores_name = scores_path_for(filename).name
        hint = (f"Download it where the hub can be reached (hf download {repo_id} {filename} "
                f"{posixpath.join(posixpath.dirname(filename), scores_name)} --local-dir DIR), then pass "
                f"DIR/{filename} instead of {spec}.")

        def name_one(files: list[str] | None, where: str) -> str:
            if files is None:     # nothing is known of the repository
                return ""
            listed = [name for name in files if name.endswith(".json")]
            if not listed:
                return f"; {where} holds no JSON file"
            return f"; {where} holds {list_files(listed)}: name one as {HUB_PREFIX}{repo_id}/FILE"

        found = hub_file(repo_id, filename, what=f"neuron file {origin}", local_hint=hint, limit=MAX_FILE_BYTES,
                         error=NeuronFileError, missing=name_one)
        data = _parse(read_bounded(found.path, MAX_FILE_BYTES, NeuronFileError, "neuron file"), origin)
        neurons = cls.from_dict(data, origin=origin)      # the scores' name is a plain file name from here on
        name = data.get("candidate_scores_file")
        if name is not None:
            if not name.endswith(".safetensors"):   # never another file of the repository (its weights, its card)
                _fail(origin, "candidate_scores_file", "the name of a .safetensors file beside the neuron file", name)
            in_repo = posixpath.join(posixpath.dirname(filename), name)
            scores = hub_file(repo_id, in_repo, what=f"candidate-score file {HUB_PREFIX}{repo_id}/{in_repo}",
                              local_hint=hint, limit=MAX_SCORES_BYTES, error=NeuronFileError,
                              revision=found.commit, optional=True)
            if scores is None:
                log.warning("%s names candidate scores in %s, which %s does not hold at that commit (or, offline, "
                            "the local cache does not); figures of them will be skipped", origin, name, repo_id)
            else:
                neurons.candidate_scores = _read_scores(scores.path, data["candidate_scores_sha256"], origin,
                                                        neurons)
                neurons._scores_file = scores.path
        return neurons


def _write_new_folder(directory: Path, writers: dict[Path, Writer]) -> None:
    """Write ``writers``' files (named for ``directory``) into a temporary folder beside it, then rename that
    folder to ``directory``: it appears complete or not at all, and a failure leaves no temporary."""
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)   # mkdtemp makes folders private; keep the usual mode
        write_unit({staging / path.name: write for path, write in writers.items()})
        os.rename(staging, directory)   # fails, rather than mixing, if a non-empty folder appeared there
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def hub_location(spec: str) -> tuple[str, str]:
    """``(repository id, file in it)`` of ``hf-hub:ORG/REPO[/FILE]``; the file is :data:`HUB_FILE` if not named.

    FILE may lie in a folder of the repository (``hf-hub:org/repo/dinov2/neurons.json``); each part
    of it is a plain name (no ``..``, no empty part, no backslash or control character).

    Raises:
        NeuronFileError: ``spec`` is not of that form.
    """
    form = f"{HUB_PREFIX}ORG/REPO or {HUB_PREFIX}ORG/REPO/FILE (FILE defaults to {HUB_FILE})"
    parts = spec.removeprefix(HUB_PREFIX).rstrip("/").split("/")
    repo_id = "/".join(parts[:2])
    if not spec.startswith(HUB_PREFIX) or not is_repo_id(repo_id):
        raise NeuronFileError(f"{spec!r} does not name a hub repository: expected {form}, ORG and REPO made of "
                              "letters, digits, '-', '_' and '.'")
    names = parts[2:]
    if not names:
        return repo_id, HUB_FILE
    for name in names:
        if name in ("", ".", "..") or "\\" in name or any(ord(char) < 32 or ord(char) == 127 for char in name):
            raise NeuronFileError(f"{spec!r}: {name!r} cannot be part of a file name in a hub repository; "
                                  f"expected {form}")
    return repo_id, "/".join(names)


def model_card(neurons: RegisterNeurons, filename: str = HUB_FILE) -> str:
    """The Hugging Face model card (``README.md``) of a folder written by :meth:`RegisterNeurons.save_pretrained`.

    YAML front matter: ``base_model`` when the model spec names a hub repository (see
    :func:`~test_time_registers.hub.hub_model_of`), ``library_name`` and ``tags``; nothing that is
    not known (no ``license``). The body gives the model spec, how to use the neurons, the discovery
    settings and the images discovery used as far as the neuron file records them, the neurons
    (how many, in which layers, each one), the command that found them if recorded
    (``extra["command"]``, which ``find-register-neurons --save-pretrained`` records) and the files.
    """
    from . import __version__

    base_model = hub_model_of(neurons.model) if neurons.model not in (UNKNOWN_MODEL, "") else None
    front = [*([f"base_model: {base_model}"] if base_model else []), f"library_name: {LIBRARY_NAME}", "tags:",
             *(f"- {tag}" for tag in CARD_TAGS)]
    model = _inline(neurons.model)
    layers = neurons.by_layer()
    known_model = neurons.model not in (UNKNOWN_MODEL, "")
    title = f"Register neurons of {model}" if known_model else "Register neurons"
    lines = ["---", *front, "---", "", f"# {title}", "",
             f"{len(neurons)} register neuron{'s' if len(neurons) != 1 else ''} "
             + (f"of `{model}`" if known_model else "given without a model")
             + f", for test-time registers ({LIBRARY_NAME} {__version__}): append a token at inference and move "
             "these MLP neurons' activations onto it, and the model's high-norm outlier patch tokens move "
             "there, with no retraining.", ""]

    hub_name = f"{HUB_PREFIX}ORG/REPO" + ("" if filename == HUB_FILE else f"/{filename}")
    lines += ["## Use", "", "Replace ORG/REPO with this repository's id.", ""]
    if known_model:
        lines += ["```python", "from test_time_registers import ModifiedModel, load_model, load_neurons", "",
                  f"loaded = load_model({_python_text(neurons.model)})",
                  f"neurons = load_neurons({_python_text(hub_name)}, loaded.hook_manager)",
                  "model = ModifiedModel(loaded.model, loaded.hook_manager, neurons, num_registers=1)", "```", "",
                  f"On the command line: `find-register-neurons --model {model} --images DIR --neurons {hub_name}` "
                  "prints the outliers before and after on the images in DIR.", ""]
    else:
        lines += ["```python", "from test_time_registers import load_neurons", "",
                  f"neurons = load_neurons({_python_text(hub_name)})", "```", ""]

    settings = [("model spec", model), ("found by", _inline(neurons.source)),
                ("detection layer", neurons.detect_layer), ("outlier threshold", _threshold(neurons)),
                ("highest candidate layer", neurons.highest_layer), ("score", neurons.score),
                ("images", _inline(neurons.extra.get("images")) if isinstance(neurons.extra.get("images"), str)
                 else None),
                ("images seen", neurons.images_seen), ("images with outliers", neurons.images_with_outliers),
                ("image size", f"{neurons.image_size[0]} x {neurons.image_size[1]}" if neurons.image_size else None)]
    lines += ["## Discovery", "", "| setting | value |", "|---|---|",
              *(f"| {name} | {_cell(value)} |" for name, value in settings if value not in (None, "")), ""]

    per_layer = ", ".join(f"{layer}: {len(items)}" for layer, items in layers.items())
    lines += ["## Neurons", "",
              f"{len(neurons)} neuron{'s' if len(neurons) != 1 else ''} in {len(layers)} "
              f"layer{'s' if len(layers) != 1 else ''} (neurons per layer: {per_layer}), best first:", "",
              "| rank | layer | neuron | score |", "|---|---|---|---|",
              *(f"| {rank} | {item.layer} | {item.neuron} | {_cell(item.score)} |"
                for rank, item in enumerate(neurons.neurons[:CARD_ROWS], start=1))]
    if len(neurons) > CARD_ROWS:
        lines.append(f"\nand {len(neurons) - CARD_ROWS} more, in `{filename}`.")
    lines.append("")

    command = neurons.extra.get("command")
    lines += ["## Reproduce", ""]
    if isinstance(command, str) and command.strip():
        lines += ["These neurons were found with:", "", "```sh", " ".join(command.split()), "```", ""]
    else:
        lines += ["The neuron file does not record the command that found these neurons; the settings above are "
                  "the ones discovery used.", ""]

    scores_name = scores_path_for(filename).name
    lines += ["## Files", "",
              f"- `{filename}`: the neurons, ranked, and how they were found (neuron file format "
              f"{FORMAT_VERSION}, read by `RegisterNeurons.load`)"]
    if neurons.candidate_scores is not None:
        lines.append(f"- `{scores_name}`: every candidate neuron's score, [layers, neurons] (safetensors); "
                     f"`{filename}` names it with its SHA-256 digest")
    lines.append(f"- `{CARD_FILE}`: this card")
    return "\n".join(lines) + "\n"


def _inline(value: Any) -> str:
    """``value`` as one line of Markdown text inside a code span or a table cell."""
    return " ".join(str(value).split()).replace("`", "'").replace("|", "/") if value is not None else ""


def _python_text(value: str) -> str:
    """A Python string literal of ``value`` on one line, for the card's example code."""
    return json.dumps(" ".join(value.split()))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    return _inline(value)


def _threshold(neurons: RegisterNeurons) -> str | None:
    if neurons.threshold is None:
        return None
    mode = neurons.extra.get("threshold_mode")
    return f"{neurons.threshold:.4g}" + (f" ({_inline(mode)})" if isinstance(mode, str) else "")


def scores_path_for(path: str | os.PathLike) -> Path:
    """Where the candidate scores of the neuron file ``path`` are saved: ``NAME.scores.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.scores.safetensors")


def _parse(data: bytes | str, origin: str) -> Any:
    return parse_json(data, NeuronFileError, origin)


def _show(value: Any) -> str:
    """``repr(value)``, shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _fail(origin: str, name: str, expected: str, value: Any) -> NoReturn:
    raise NeuronFileError(f"{origin}: {name!r} must be {expected}, got {_show(value)}")


def _integer(origin: str, name: str, value: Any, limit: int, *, optional: bool = False) -> int | None:
    """``value`` if it is an int (not a bool, not a float) in 0..limit - 1; ``None`` too if ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        _fail(origin, name, f"{'null or ' if optional else ''}an integer in 0..{limit - 1}", value)
    return value


def _text(origin: str, name: str, value: Any, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        _fail(origin, name, f"{'null or ' if optional else ''}a string", value)
    return value


def _check_finite_json(origin: str, name: str, value: Any) -> None:
    """Every number inside ``value`` (parsed JSON) is finite, so that it can be written back as JSON."""
    stack = [(name, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    _fail(origin, where, "an object with string keys", key)
                stack.append((f"{where}.{key}", inner))
        elif isinstance(item, list):
            stack.extend((f"{where}[{index}]", inner) for index, inner in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            _fail(origin, where, "a finite number", item)
        elif item is not None and not isinstance(item, (str, int, float)):
            _fail(origin, where, "a JSON value", item)


def _read_fields(data: Any, origin: str) -> dict[str, Any]:
    """The keyword arguments of :class:`RegisterNeurons` from a neuron file's parsed JSON, every field checked."""
    if not isinstance(data, dict):
        raise NeuronFileError(f"{origin}: expected a JSON object at the top level, got {type(data).__name__}")
    version = data.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise NeuronFileError(f"{origin}: format_version must be a positive integer, got {_show(version)}")
    if version > FORMAT_VERSION:
        raise NeuronFileError(f"{origin} has format_version {version}, newer than the {FORMAT_VERSION} this "
                              "version of test-time-registers reads; upgrade test-time-registers")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise NeuronFileError(f"{origin}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(KNOWN_KEYS))
    if unknown:
        raise NeuronFileError(f"{origin}: unknown key(s) {', '.join(map(_show, unknown))}; a neuron file has "
                              f"{', '.join(KNOWN_KEYS)}")

    model = _text(origin, "model", data["model"], optional=False)
    detect_layer = _integer(origin, "detect_layer", data["detect_layer"], MAX_LAYERS, optional=True)
    highest_layer = _integer(origin, "highest_layer", data["highest_layer"], MAX_LAYERS, optional=True)
    if detect_layer is not None and highest_layer is not None and highest_layer > detect_layer:
        raise NeuronFileError(f"{origin}: 'highest_layer' ({highest_layer}) must not be after 'detect_layer' "
                              f"({detect_layer})")
    threshold = data["threshold"]
    if threshold is not None and not (finite_number(threshold) and threshold > 0):
        _fail(origin, "threshold", "null or a finite positive number", threshold)
    images_seen = _integer(origin, "images_seen", data.get("images_seen"), MAX_COUNT, optional=True)
    with_outliers = _integer(origin, "images_with_outliers", data["images_with_outliers"], MAX_COUNT, optional=True)
    if images_seen is not None and with_outliers is not None and with_outliers > images_seen:
        raise NeuronFileError(f"{origin}: 'images_with_outliers' ({with_outliers}) must not exceed 'images_seen' "
                              f"({images_seen})")
    image_size = data.get("image_size")
    if image_size is not None:
        if (not isinstance(image_size, list) or len(image_size) != 2
                or any(isinstance(side, bool) or not isinstance(side, int) or not 0 < side <= MAX_IMAGE_SIDE
                       for side in image_size)):
            _fail(origin, "image_size", f"null or [height, width], two integers in 1..{MAX_IMAGE_SIDE}", image_size)
        image_size = (image_size[0], image_size[1])
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        _fail(origin, "extra", "an object", extra)
    _check_finite_json(origin, "extra", extra)

    scores_file = data.get("candidate_scores_file")
    digest = data.get("candidate_scores_sha256")
    if (scores_file is None) != (digest is None):
        raise NeuronFileError(f"{origin}: 'candidate_scores_file' and 'candidate_scores_sha256' go together; "
                              "a file naming candidate scores must give their digest (save it again to add it)")
    if scores_file is not None:
        if (not isinstance(scores_file, str) or scores_file in ("", ".", "..") or "/" in scores_file
                or "\\" in scores_file or "\0" in scores_file):
            _fail(origin, "candidate_scores_file", "the name of a file beside the neuron file", scores_file)
        if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
            _fail(origin, "candidate_scores_sha256", "64 lowercase hexadecimal digits", digest)

    items = data["neurons"]
    if not isinstance(items, list) or not items:
        _fail(origin, "neurons", "a non-empty list of {\"layer\", \"neuron\", \"score\"} objects", items)
    neurons = []
    for index, item in enumerate(items):
        where = f"neurons[{index}]"
        if not isinstance(item, dict):
            _fail(origin, where, "an object with integer 'layer' and 'neuron' and a 'score'", item)
        keys = set(item)
        if not {"layer", "neuron"} <= keys or keys - {"layer", "neuron", "score"}:
            _fail(origin, f"{where} keys", "'layer' and 'neuron', and optionally 'score'", sorted(keys))
        layer = _integer(origin, f"{where}.layer", item["layer"], MAX_LAYERS)
        neuron = _integer(origin, f"{where}.neuron", item["neuron"], MAX_NEURONS)
        score = item.get("score")
        if score is not None and not finite_number(score):
            _fail(origin, f"{where}.score", "null or a finite number", score)
        neurons.append(RegisterNeuron(layer, neuron, float("nan") if score is None else float(score)))
    if len({(n.layer, n.neuron) for n in neurons}) != len(neurons):
        raise NeuronFileError(f"{origin}: 'neurons' lists a (layer, neuron) pair twice")
    return dict(neurons=neurons, model=model, detect_layer=detect_layer, threshold=threshold,
                highest_layer=highest_layer, images_seen=images_seen, images_with_outliers=with_outliers,
                image_size=image_size, score=_text(origin, "score", data.get("score")),
                source=_text(origin, "source", data.get("source")), extra=dict(extra))


def _read_scores(path: Path, digest: str, origin: str, neurons: RegisterNeurons) -> torch.Tensor | None:
    """The candidate scores [layers, neurons] (float32) saved beside ``origin``, or ``None`` (logged) if gone.

    Raises:
        NeuronFileError: not the file the JSON names (another digest), not safetensors, or scores that
            do not fit the neuron file.
    """
    if not path.exists() and not path.is_symlink():
        log.warning("%s names candidate scores in %s, which is missing; figures of them will be skipped",
                    origin, path.name)
        return None
    blob = read_bounded(path, MAX_SCORES_BYTES, NeuronFileError, "candidate-score file")
    if hashlib.sha256(blob).hexdigest() != digest:
        raise NeuronFileError(f"{path} is not the candidate-score file {origin} was saved with (its sha256 digest "
                              f"differs from 'candidate_scores_sha256'); the pair was mixed up or one was "
                              "replaced: run discovery again")
    try:
        tensors = load_bytes(blob)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as error:
        raise NeuronFileError(f"{path} is not a readable candidate-score file ({first_line(error)})") from None
    if set(tensors) != {SCORES_KEY}:
        raise NeuronFileError(f"{path}: a candidate-score file holds one tensor 'scores', got "
                              f"{_show(sorted(tensors))}")
    scores = tensors[SCORES_KEY]
    if scores.dtype.is_floating_point:
        scores = scores.float()       # float32, as they are saved (a float64 1e300 becomes inf, and is refused)
    _check_scores(scores, neurons, str(path))
    return scores


def _check_scores(scores: torch.Tensor, neurons: RegisterNeurons, origin: str) -> None:
    """Raise :class:`NeuronFileError` unless ``scores`` are [layers, neurons] floats, finite or NaN, that fit
    ``neurons``: rows for layers 0..highest_layer at least and 0..detect_layer at most, a column for every
    listed neuron."""
    shape = list(scores.shape)
    if scores.ndim != 2 or not scores.dtype.is_floating_point:
        raise NeuronFileError(f"{origin}: candidate scores must be a 2-D float tensor [layers, neurons], got "
                              f"{scores.dtype} of shape {shape}")
    rows, columns = shape
    least = 1 if neurons.highest_layer is None else neurons.highest_layer + 1
    most = MAX_LAYERS if neurons.detect_layer is None else neurons.detect_layer + 1
    if not least <= rows <= most:
        raise NeuronFileError(f"{origin}: candidate scores must have a row for each candidate layer, {least} to "
                              f"{most} rows (highest_layer {neurons.highest_layer}, detect_layer "
                              f"{neurons.detect_layer}), got shape {shape}")
    if not 0 < columns <= MAX_NEURONS:
        raise NeuronFileError(f"{origin}: candidate scores must have 1 to {MAX_NEURONS} columns, got shape {shape}")
    outside = [(n.layer, n.neuron) for n in neurons if n.layer >= rows or n.neuron >= columns]
    if outside:
        raise NeuronFileError(f"{origin}: candidate scores of shape {shape} have no score for register neuron "
                              f"{outside[0]}")
    if scores.isinf().any():
        raise NeuronFileError(f"{origin}: candidate scores must be finite (NaN marks a missing neuron), "
                              "got an infinite score")


def _neuron_dict(item: RegisterNeuron) -> dict[str, Any]:
    entry = asdict(item)
    if entry["score"] != entry["score"]:  # NaN is not valid JSON
        entry["score"] = None
    return entry


def _as_index(value, what: str) -> int:
    """``value`` as a non-negative index: an int (numpy and torch integers too) or an integral float; not a bool."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        if not (isinstance(value, float) and value.is_integer()):
            raise ValueError(f"{what} must be a non-negative integer, got {value!r}") from None
        index = int(value)
    if index < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return index
