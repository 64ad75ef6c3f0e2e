"""Fuzzing neuron files (hypothesis): generate valid files and their scores, mutate them, and check that every
load either gives neurons that save and load again identically, or raises NeuronFileError - never anything else.

What it found while it was written:

* A scores file in float16, bfloat16 or float64 loaded in its own dtype, and saving wrote float32, so a
  save -> load -> save changed the tensor the object held. Scores are now float32 on load, and checked after the
  conversion (a float64 1e300 becomes inf there and is refused, rather than loading and failing to save).
* ``RegisterNeurons`` loaded from a file with a neuron without a score (``"score": null``, as in presets) was
  not ``==`` to itself, because NaN != NaN; ``RegisterNeuron`` now compares a NaN score equal to a NaN score.
* (While writing the mutations, by hand:) an integer of more than 4,300 digits makes ``json.loads`` raise a plain
  ValueError, which ``files.parse_json`` lets through; the neuron reader turns it into a NeuronFileError, and the
  token mutation here keeps trying it.
"""

import hashlib
import json
import math
import os
import random
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from test_time_registers import NeuronFileError, RegisterNeurons
from test_time_registers.neurons import scores_path_for

#: 120 fixed examples per test in the suite (a few seconds); FUZZ_EXAMPLES=N runs N random ones instead.
EXAMPLES = os.environ.get("FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(EXAMPLES or 120), deadline=2000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=EXAMPLES is None)

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
text = st.text(max_size=12)
json_leaf = st.none() | st.booleans() | st.integers(-10**6, 10**6) | finite | text
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(text, inner, max_size=3), max_leaves=8)


@st.composite
def neuron_files(draw) -> tuple[dict, torch.Tensor | None]:
    """A valid neuron file's JSON (as a dict) and, half the time, candidate scores that fit it."""
    detect = draw(st.none() | st.integers(0, 12))
    highest = draw(st.none() | st.integers(0, 12 if detect is None else detect))
    seen = draw(st.none() | st.integers(0, 10**6))
    top = highest if highest is not None else detect if detect is not None else 12
    pairs = draw(st.lists(st.tuples(st.integers(0, top), st.integers(0, 40)),
                          min_size=1, max_size=6, unique=True))
    data = {
        "format_version": 1,
        "model": draw(text),
        "detect_layer": detect,
        "threshold": draw(st.none() | st.floats(1e-6, 1e6) | st.integers(1, 1000)),
        "highest_layer": highest,
        "images_seen": seen,
        "images_with_outliers": draw(st.none() | st.integers(0, 10**6 if seen is None else seen)),
        "image_size": draw(st.none() | st.lists(st.integers(1, 4096), min_size=2, max_size=2)),
        "score": draw(st.none() | st.sampled_from(["raw", "abs"])),
        "source": draw(st.none() | text),
        "neurons": [{"layer": layer, "neuron": neuron, "score": draw(st.none() | finite)} for layer, neuron in pairs],
    }
    extra = draw(st.dictionaries(text, json_value, max_size=3))
    if extra:
        data["extra"] = extra
    scores = None
    if draw(st.booleans()):
        least = max(max(layer for layer, _ in pairs), -1 if highest is None else highest) + 1
        most = max(least, 13 if detect is None else detect + 1)
        rows = draw(st.integers(least, most))
        columns = draw(st.integers(max(neuron for _, neuron in pairs) + 1, 48))
        scores = torch.randn(rows, columns, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        scores[torch.rand(rows, columns, generator=torch.Generator().manual_seed(1)) < 0.1] = float("nan")
    return data, scores


def write_pair(folder: Path, data: dict, scores: torch.Tensor | None) -> Path:
    path = folder / "n.json"
    if scores is not None:
        blob = safetensors_bytes({"scores": scores})
        scores_path_for(path).write_bytes(blob)
        data = {**data, "candidate_scores_file": scores_path_for(path).name,
                "candidate_scores_sha256": hashlib.sha256(blob).hexdigest()}
    path.write_text(json.dumps(data, indent=2))
    return path


def load_or_refuse(path: Path) -> None:
    """The property: a NeuronFileError, or neurons that save, load and save again byte-identically."""
    try:
        neurons = RegisterNeurons.load(path)
    except NeuronFileError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert isinstance(neurons, RegisterNeurons) and len(neurons) >= 1
    for item in neurons:
        assert type(item.layer) is int and type(item.neuron) is int and item.layer >= 0 and item.neuron >= 0
        assert math.isnan(item.score) or math.isfinite(item.score)
    first = neurons.save(path.parent / "again" / "n.json")
    reloaded = RegisterNeurons.load(first)
    assert reloaded == neurons and reloaded.to_dict() == neurons.to_dict()
    if neurons.candidate_scores is not None:
        torch.testing.assert_close(reloaded.candidate_scores, neurons.candidate_scores, equal_nan=True,
                                   rtol=0, atol=0)
    second = reloaded.save(path.parent / "third" / "n.json")
    for name in (first.name, scores_path_for(first).name):
        if (first.parent / name).exists():
            assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes()


@FUZZ
@given(neuron_files())
def test_valid_files_load_and_round_trip_byte_identically(case):
    data, scores = case
    with tempfile.TemporaryDirectory() as folder:
        path = write_pair(Path(folder), data, scores)
        neurons = RegisterNeurons.load(path)            # valid: must load
        assert neurons.pairs() == [(n["layer"], n["neuron"]) for n in data["neurons"]]
        load_or_refuse(path)


HOSTILE_VALUES = [None, True, False, -1, 0, 1, -0.0, 0.5, 2.0, 10**30, -10**30, 2**63, "", "x", "1", [], [1, 2],
                  [224], [224, 224, 3], {}, {"a": 1}, [[[[[]]]]], "\u0000", "\udcff"]
KEYS = ["format_version", "model", "detect_layer", "threshold", "highest_layer", "images_seen",
        "images_with_outliers", "image_size", "score", "source", "extra", "neurons", "candidate_scores_file",
        "candidate_scores_sha256"]


@FUZZ
@given(neuron_files(), st.data())
def test_fields_of_the_wrong_type_or_range_are_refused_or_harmless(case, data):
    """Replace, delete or add keys at the top level and in the neuron items."""
    content, scores = case
    content = json.loads(json.dumps(content))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "neuron", "delete", "add", "neuron-delete"]))
        value = data.draw(st.sampled_from(HOSTILE_VALUES) | json_value)
        if where == "top":
            content[data.draw(st.sampled_from(KEYS))] = value
        elif where == "delete":
            content.pop(data.draw(st.sampled_from(KEYS)), None)
        elif where == "add":
            content[data.draw(text)] = value
        elif isinstance(content.get("neurons"), list) and content["neurons"] \
                and isinstance(content["neurons"][0], dict):
            item = content["neurons"][data.draw(st.integers(0, len(content["neurons"]) - 1))]
            key = data.draw(st.sampled_from(["layer", "neuron", "score", "other"]))
            if where == "neuron":
                item[key] = value
            else:
                item.pop(key, None)
    with tempfile.TemporaryDirectory() as folder:
        load_or_refuse(write_pair(Path(folder), content, scores))


NUMBER_TOKENS = ["Infinity", "-Infinity", "NaN", "1e400", "-1e400", "1e-400", "-0", "1.5", "7" * 5000, "true",
                 '"7"', "null", "[]", "{}", "[" * 40 + "]" * 40, "[" * 3000]


@FUZZ
@given(neuron_files(), st.data())
def test_mutated_text_is_refused_or_harmless(case, data):
    """Numbers replaced by non-finite, huge or odd tokens; truncation; random bytes; deep nesting."""
    content, scores = case
    with tempfile.TemporaryDirectory() as folder:
        path = write_pair(Path(folder), content, scores)
        raw = path.read_bytes()
        kind = data.draw(st.sampled_from(["token", "truncate", "bytes", "flip", "nest"]))
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        if kind == "token":
            text_ = raw.decode()
            digits = [index for index, char in enumerate(text_) if char.isdigit()]
            if digits:
                start = rng.choice(digits)
                end = start
                while end < len(text_) and (text_[end].isdigit() or text_[end] in ".eE+-"):
                    end += 1
                raw = (text_[:start] + data.draw(st.sampled_from(NUMBER_TOKENS)) + text_[end:]).encode()
        elif kind == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw)))]
        elif kind == "bytes":
            raw = data.draw(st.binary(max_size=200))
        elif kind == "flip":
            for _ in range(data.draw(st.integers(1, 4))):
                index = rng.randrange(len(raw))
                raw = raw[:index] + bytes([rng.randrange(256)]) + raw[index + 1:]
        else:
            depth = data.draw(st.integers(1, 5000))
            raw = b"[" * depth + raw + b"]" * depth
        path.write_bytes(raw)
        load_or_refuse(path)


@FUZZ
@given(neuron_files(), st.data())
def test_mutated_scores_files_are_refused_or_harmless(case, data):
    """The scores file flipped, truncated, replaced or reshaped, with the JSON's digest updated to match half
    the time (a stranger's consistent pair) and left as it was otherwise (a mixed-up pair)."""
    content, scores = case
    if scores is None:
        scores = torch.zeros(13, 41)
        content = {**content, "detect_layer": None, "highest_layer": None}
    with tempfile.TemporaryDirectory() as folder:
        path = write_pair(Path(folder), content, scores)
        scores_path = scores_path_for(path)
        blob = scores_path.read_bytes()
        kind = data.draw(st.sampled_from(["flip", "truncate", "bytes", "shape", "dtype", "huge"]))
        if kind == "flip":
            index = data.draw(st.integers(0, len(blob) - 1))
            blob = blob[:index] + bytes([blob[index] ^ data.draw(st.integers(1, 255))]) + blob[index + 1:]
        elif kind == "truncate":
            blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
        elif kind == "bytes":
            blob = data.draw(st.binary(max_size=300))
        elif kind == "shape":
            shape = data.draw(st.lists(st.integers(0, 50), max_size=3))
            blob = safetensors_bytes({"scores": torch.zeros(shape)})
        elif kind == "huge":
            blob = safetensors_bytes({"scores": scores.double() * data.draw(st.sampled_from([1e39, 1e300, -1e308]))})
        else:
            dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool]))
            blob = safetensors_bytes({"scores": scores.to(dtype)})
        scores_path.write_bytes(blob)
        if data.draw(st.booleans()):
            stored = json.loads(path.read_text())
            stored["candidate_scores_sha256"] = hashlib.sha256(blob).hexdigest()
            path.write_text(json.dumps(stored))
        load_or_refuse(path)
