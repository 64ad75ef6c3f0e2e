"""Hostile neuron files and their scores: through the library (the precise NeuronFileError) and through
``find-register-neurons --neurons FILE`` and ``test-time-registers-visualize --neurons FILE`` (exit code 2,
one line on stderr, nothing new on disk). A save that cannot be completed replaces nothing."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import test_time_registers.neurons as neurons_module
from test_time_registers import IncompatibleNeuronsError, NeuronFileError, RegisterNeuron, RegisterNeurons
from test_time_registers.files import write_unit
from test_time_registers.neurons import MAX_FILE_BYTES, scores_path_for
from test_time_registers.scripts import find_register_neurons, visualize

#: A neuron file that fits the demo model (8 blocks, 768 MLP neurons) and the 3-block tiny CLIP (256 neurons).
VALID = {"format_version": 1, "model": "demo", "detect_layer": 2, "threshold": 10.0, "highest_layer": 1,
         "images_seen": 64, "images_with_outliers": 60, "image_size": [224, 224], "score": "raw",
         "source": "hand", "extra": {"note": "x"},
         "neurons": [{"layer": 1, "neuron": 3, "score": 2.5}, {"layer": 0, "neuron": 200, "score": 1.5}]}
ROWS, COLUMNS = 3, 256          # scores that fit VALID: rows 0..detect_layer, a column for neuron 200


def valid(**changes) -> dict:
    return {**json.loads(json.dumps(VALID)), **changes}


def one_neuron(**fields) -> dict:
    return valid(neurons=[{"layer": 1, "neuron": 3, "score": 2.5, **fields}])


def write(folder: Path, content, name: str = "n.json") -> Path:
    path = folder / name
    if isinstance(content, (dict, list)):
        content = json.dumps(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def pair(folder: Path, blob: bytes, data: dict | None = None, name: str = "n.json") -> Path:
    """A neuron file naming ``blob`` as its scores with the right digest: a pair only a stranger would make."""
    scores = scores_path_for(folder / name)
    scores.write_bytes(blob)
    data = {**(data or valid()), "candidate_scores_file": scores.name,
            "candidate_scores_sha256": hashlib.sha256(blob).hexdigest()}
    return write(folder, data, name)


def scores_blob(*shape, dtype=torch.float32, fill=1.0, key="scores") -> bytes:
    return safetensors_bytes({key: torch.full(shape, fill).to(dtype)})


def fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.json")
    return folder / "pipe.json"


def oversized(folder: Path) -> Path:
    path = folder / "huge.json"
    with open(path, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)     # sparse: nothing is written, and nothing may be read
    return path


def swapped_scores(folder: Path) -> Path:
    """Two valid pairs, and one's scores file copied over the other's."""
    first = sample(torch.zeros(ROWS, COLUMNS)).save(folder / "n.json")
    sample(torch.ones(ROWS, COLUMNS)).save(folder / "other.json")
    scores_path_for(first).write_bytes(scores_path_for(folder / "other.json").read_bytes())
    return first


def old_json_new_scores(folder: Path) -> Path:
    """A save interrupted by hand between the files: the JSON of the first save, the scores of the second."""
    path = sample(torch.zeros(ROWS, COLUMNS)).save(folder / "n.json")
    old = path.read_bytes()
    sample(torch.ones(ROWS, COLUMNS)).save(path)
    path.write_bytes(old)
    return path


def sample(scores: torch.Tensor | None = None) -> RegisterNeurons:
    neurons = RegisterNeurons.from_dict(valid())
    neurons.candidate_scores = scores
    return neurons


def deep(levels: int) -> str:
    return json.dumps(valid()).replace('"extra": {"note": "x"}', '"extra": {"x": ' + "[" * levels + "]" * levels + "}")


#: (id, make(folder) -> path, what the message must say). Every case is a NeuronFileError.
HOSTILE = [
    # indices that would reach int() or an index: infinite, huge, fractional, of another type
    ("neuron-Infinity", lambda t: write(t, json.dumps(one_neuron()).replace('"neuron": 3', '"neuron": Infinity')),
     "holds Infinity, which JSON does not allow"),
    ("layer-1e400", lambda t: write(t, json.dumps(one_neuron()).replace('"layer": 1', '"layer": 1e400')),
     r"'neurons\[0\].layer' must be an integer in 0..4095, got inf"),
    ("layer-float", lambda t: write(t, one_neuron(layer=1.0)), r"'neurons\[0\].layer' must be an integer .*got 1.0"),
    ("layer-bool", lambda t: write(t, one_neuron(layer=True)), r"'neurons\[0\].layer' must be an integer .*got True"),
    ("layer-string", lambda t: write(t, one_neuron(layer="1")), r"'neurons\[0\].layer' must be an integer .*got '1'"),
    ("layer-too-large", lambda t: write(t, one_neuron(layer=4096)), r"in 0..4095, got 4096"),
    ("neuron-negative", lambda t: write(t, one_neuron(neuron=-1)), r"'neurons\[0\].neuron' must be an integer"),
    ("neuron-10**30", lambda t: write(t, one_neuron(neuron=10**30)), r"'neurons\[0\].neuron' must be an integer"),
    ("neuron-5000-digits",
     lambda t: write(t, json.dumps(one_neuron()).replace('"neuron": 3', '"neuron": ' + "7" * 5000)),
     "holds a value JSON cannot give .*Exceeds the limit"),
    ("score-1e400", lambda t: write(t, json.dumps(one_neuron()).replace('"score": 2.5', '"score": 1e400')),
     r"'neurons\[0\].score' must be null or a finite number, got inf"),
    ("score-string", lambda t: write(t, one_neuron(score="high")), r"'neurons\[0\].score' must be null or a finite"),
    ("neuron-not-an-object", lambda t: write(t, valid(neurons=[[1, 3]])), r"'neurons\[0\]' must be an object"),
    ("neuron-missing-index", lambda t: write(t, valid(neurons=[{"layer": 1}])), r"'neurons\[0\] keys' must be"),
    ("neuron-extra-key", lambda t: write(t, one_neuron(weight=2)), r"'neurons\[0\] keys' must be"),
    ("neurons-empty", lambda t: write(t, valid(neurons=[])), "'neurons' must be a non-empty list"),
    ("neurons-not-a-list", lambda t: write(t, valid(neurons={"1": 3})), "'neurons' must be a non-empty list"),
    ("neurons-twice", lambda t: write(t, valid(neurons=[{"layer": 1, "neuron": 3}] * 2)), "lists a .* pair twice"),
    # nesting
    ("nested-2000", lambda t: write(t, deep(2000)), "nests JSON more than 32 levels deep"),
    ("nested-100000", lambda t: write(t, "[" * 100_000), "nests JSON more than 32 levels deep"),
    # optional fields of the wrong type
    ("image_size-224", lambda t: write(t, valid(image_size=224)), r"'image_size' must be null or \[height, width\]"),
    ("image_size-one", lambda t: write(t, valid(image_size=[224])), r"'image_size' must be null or \[height, width\]"),
    ("image_size-zero", lambda t: write(t, valid(image_size=[0, 224])), r"'image_size' must be .* in 1..65536"),
    ("image_size-float", lambda t: write(t, valid(image_size=[224.0, 224])), r"'image_size' must be"),
    ("extra-list", lambda t: write(t, valid(extra=[1, 2])), "'extra' must be an object, got \\[1, 2\\]"),
    ("extra-1e400", lambda t: write(t, json.dumps(valid()).replace('"note": "x"', '"note": [1, -1e400]')),
     r"'extra.note\[1\]' must be a finite number, got -inf"),
    ("model-number", lambda t: write(t, valid(model=5)), "'model' must be a string, got 5"),
    ("source-list", lambda t: write(t, valid(source=["a"])), "'source' must be null or a string"),
    ("score-kind-number", lambda t: write(t, valid(score=1)), "'score' must be null or a string"),
    # numbers that must be finite, positive, or counts
    ("threshold-high", lambda t: write(t, valid(threshold="high")),
     "'threshold' must be null or a finite positive number, got 'high'"),
    ("threshold-NaN", lambda t: write(t, json.dumps(valid()).replace('"threshold": 10.0', '"threshold": NaN')),
     "holds NaN"),
    ("threshold-1e400", lambda t: write(t, json.dumps(valid()).replace('"threshold": 10.0', '"threshold": 1e400')),
     "'threshold' must be null or a finite positive number, got inf"),
    ("threshold-negative", lambda t: write(t, valid(threshold=-3)), "'threshold' must be .* positive number, got -3"),
    ("threshold-bool", lambda t: write(t, valid(threshold=True)), "'threshold' must be .* got True"),
    ("detect_layer-string", lambda t: write(t, valid(detect_layer="2")), "'detect_layer' must be null or an integer"),
    ("detect_layer-float", lambda t: write(t, valid(detect_layer=2.5)), "'detect_layer' must be null or an integer"),
    ("highest-after-detect", lambda t: write(t, valid(highest_layer=5)), "'highest_layer' \\(5\\) must not be after"),
    ("images_seen-negative", lambda t: write(t, valid(images_seen=-5)), "'images_seen' must be null or an integer"),
    ("more-outliers-than-images", lambda t: write(t, valid(images_with_outliers=65)), "must not exceed 'images_seen'"),
    ("format_version-2", lambda t: write(t, valid(format_version=2)), "format_version 2, newer than the 1"),
    ("format_version-text", lambda t: write(t, valid(format_version="1")), "format_version must be a positive"),
    # structure
    ("top-level-list", lambda t: write(t, [VALID]), "expected a JSON object at the top level, got list"),
    ("missing-key", lambda t: write(t, {k: v for k, v in VALID.items() if k != "threshold"}), "missing key.*threshold"),
    ("unknown-key", lambda t: write(t, valid(treshold=3)), "unknown key.*'treshold'"),
    ("repeated-key", lambda t: write(t, json.dumps(valid())[:-1] + ', "model": "other"}'), "repeats the key.*'model'"),
    ("truncated", lambda t: write(t, json.dumps(valid())[:70]), "is not valid JSON"),
    ("empty", lambda t: write(t, b""), "is not valid JSON"),
    ("not-utf8", lambda t: write(t, b'{"model": "\xff\xfe"}'), "is not UTF-8 text"),
    ("random-bytes", lambda t: write(t, bytes(range(256)) * 4), "is not UTF-8 text"),
    # what is not a neuron file at all
    ("dev-zero", lambda t: Path("/dev/zero"), "neuron file /dev/zero is not a regular file"),
    ("fifo", fifo, "pipe.json is not a regular file"),
    ("folder", lambda t: t, "is not a regular file"),
    ("over-16-MiB", oversized, f"has {MAX_FILE_BYTES + 1} bytes, more than the {MAX_FILE_BYTES}"),
    ("missing", lambda t: t / "nope.json", "neuron file not found"),
    # the scores file: shape, type, values, digest, and where it may be
    ("scores-too-few-rows", lambda t: pair(t, scores_blob(1, COLUMNS)), r"2 to 3 rows .*got shape \[1, 256\]"),
    ("scores-too-many-rows", lambda t: pair(t, scores_blob(7, COLUMNS)), r"2 to 3 rows .*got shape \[7, 256\]"),
    ("scores-too-narrow", lambda t: pair(t, scores_blob(ROWS, 100)), r"no score for register neuron \(0, 200\)"),
    ("scores-1-D", lambda t: pair(t, scores_blob(COLUMNS)), r"must be a 2-D float tensor .*shape \[256\]"),
    ("scores-3-D", lambda t: pair(t, scores_blob(ROWS, COLUMNS, 2)), r"must be a 2-D float tensor"),
    ("scores-integers", lambda t: pair(t, scores_blob(ROWS, COLUMNS, dtype=torch.int64)), "torch.int64"),
    ("scores-infinite", lambda t: pair(t, scores_blob(ROWS, COLUMNS, fill=float("inf"))), "must be finite"),
    ("scores-other-key", lambda t: pair(t, scores_blob(ROWS, COLUMNS, key="weights")), "one tensor 'scores'"),
    ("scores-not-safetensors", lambda t: pair(t, b"\xff" * 64), "not a readable candidate-score file"),
    ("scores-header-lies", lambda t: pair(t, (2**40).to_bytes(8, "little") + b"{}"),
     "not a readable candidate-score file"),
    ("scores-swapped", swapped_scores, "not the candidate-score file .* was saved with"),
    ("old-json-new-scores", old_json_new_scores, "not the candidate-score file .* was saved with"),
    ("scores-path-escapes", lambda t: write(t, valid(candidate_scores_file="../n.scores.safetensors",
                                                       candidate_scores_sha256="0" * 64)),
     "'candidate_scores_file' must be the name of a file beside the neuron file"),
    ("scores-absolute-path", lambda t: write(t, valid(candidate_scores_file="/etc/passwd",
                                                        candidate_scores_sha256="0" * 64)),
     "'candidate_scores_file' must be the name of a file beside"),
    ("scores-without-digest", lambda t: write(t, valid(candidate_scores_file="n.scores.safetensors")),
     "must give their digest"),
    ("scores-digest-not-hex", lambda t: write(t, valid(candidate_scores_file="n.scores.safetensors",
                                                         candidate_scores_sha256="z" * 64)),
     "'candidate_scores_sha256' must be 64 lowercase hexadecimal digits"),
    ("scores-dev-zero", lambda t: write(t, valid(candidate_scores_file="zero.safetensors",
                                                   candidate_scores_sha256="0" * 64))
     if (t / "zero.safetensors").symlink_to("/dev/zero") is None else None, "is not a regular file"),
]


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under ``root`` with its size (0 for anything but a regular file)."""
    return sorted((str(path.relative_to(root)), path.stat().st_size if path.is_file() else 0)
                  for path in root.rglob("*") if not path.is_fifo() and not path.is_symlink())


@pytest.mark.parametrize("make, message", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_the_library_refuses_each_hostile_file_with_a_neuron_file_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(NeuronFileError, match=message) as caught:
        RegisterNeurons.load(path)
    assert type(caught.value) is NeuronFileError
    text = str(caught.value)
    assert "\n" not in text and len(text) < 400, text
    assert str(path) in text or str(path.parent) in text, text     # names the file (or its scores beside it)


def test_the_same_fields_are_checked_in_from_dict_and_in_presets():
    with pytest.raises(NeuronFileError, match="my origin: 'threshold' must be null or a finite positive number"):
        RegisterNeurons.from_dict(valid(threshold="high"), origin="my origin")
    with pytest.raises(NeuronFileError, match=r"preset x: 'neurons\[0\].neuron' must be an integer"):
        RegisterNeurons.from_json(json.dumps(one_neuron(neuron="3")), origin="preset x")
    with pytest.raises(NeuronFileError, match="preset x holds Infinity"):
        RegisterNeurons.from_json(json.dumps(one_neuron(neuron=float("inf"))), origin="preset x")


def test_scores_are_checked_against_the_model(tmp_path, clip_hm):
    """The tiny CLIP has 3 layers of 256 neurons: scores wider or deeper than that belong to another model."""
    wide = pair(tmp_path, scores_blob(ROWS, 300))
    assert RegisterNeurons.load(wide).candidate_scores.shape == (3, 300)   # fits the file ...
    with pytest.raises(NeuronFileError, match=r"n.scores.safetensors: .* 300 neuron columns, but the MLPs of .* "
                                              r"have at most 256 neurons"):
        RegisterNeurons.load(wide, clip_hm)                                  # ... not the model
    deep_scores = pair(tmp_path, scores_blob(6, COLUMNS), valid(detect_layer=5), name="deep.json")
    with pytest.raises(NeuronFileError, match=r"deep.scores.safetensors: .* 6 layer rows, but .* has 3 layers"):
        RegisterNeurons.load(deep_scores, clip_hm)
    fits = pair(tmp_path, scores_blob(ROWS, COLUMNS), name="fits.json")
    assert RegisterNeurons.load(fits, clip_hm).candidate_scores.shape == (ROWS, COLUMNS)
    with pytest.raises(IncompatibleNeuronsError, match="neurons 0..255"):
        RegisterNeurons.load(write(tmp_path, one_neuron(neuron=256), "misfit.json"), clip_hm)


# ---- saving: checked first, written as a unit ------------------------------------------------------

def previous_pair(folder: Path) -> tuple[Path, dict[str, bytes]]:
    path = sample(torch.arange(ROWS * COLUMNS, dtype=torch.float32).reshape(ROWS, COLUMNS)).save(folder / "n.json")
    return path, {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("spoil, message", [
    (lambda n: setattr(n, "neurons", [RegisterNeuron(1, 3, float("inf"))]), r"'neurons\[0\].score' must be null or a "
                                                                             "finite number, got inf"),
    (lambda n: setattr(n, "threshold", float("nan")), "'threshold' must be null or a finite positive number, got nan"),
    (lambda n: setattr(n, "extra", {"ratio": float("inf")}), "'extra.ratio' must be a finite number"),
    (lambda n: setattr(n, "image_size", (224,)), "'image_size' must be"),
    (lambda n: setattr(n, "model", None), "'model' must be a string"),
    (lambda n: setattr(n, "candidate_scores", torch.full((ROWS, COLUMNS), float("inf"))), "must be finite"),
    (lambda n: setattr(n, "candidate_scores", torch.zeros(1, COLUMNS)), r"2 to 3 rows"),
    (lambda n: setattr(n, "candidate_scores", [[1.0]]), "must be a tensor"),
], ids=["infinite-score", "NaN-threshold", "infinite-extra", "bad-image-size", "no-model", "infinite-scores",
        "scores-too-few-rows", "scores-not-a-tensor"])
def test_a_value_that_cannot_be_saved_is_refused_before_anything_is_written(tmp_path, spoil, message):
    path, before = previous_pair(tmp_path)
    neurons = RegisterNeurons.load(path)
    spoil(neurons)
    with pytest.raises(NeuronFileError, match=message) as caught:
        neurons.save(path)
    assert "(not saved)" in str(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # the previous pair, no temporary
    with pytest.raises(NeuronFileError):
        neurons.save(tmp_path / "new" / "n.json")
    assert not (tmp_path / "new").exists()


def test_a_save_that_fails_halfway_leaves_the_previous_pair_untouched(tmp_path, monkeypatch):
    """The scores are written, then writing the JSON fails: neither file may change, no temporary stays.
    (A neuron file written straight to its final path, or scores renamed before the JSON is written,
    would fail this.)"""
    path, before = previous_pair(tmp_path)
    written = []

    def json_writer_fails(files):
        files = dict(files)
        last = list(files)[-1]
        assert last.name == "n.json"                   # the JSON, naming the scores, comes last
        original = files[last]

        def fail_after_half(temporary):
            original(temporary)
            written.append(Path(temporary).read_bytes())
            with open(temporary, "r+b") as handle:
                handle.truncate(len(written[-1]) // 2)
            raise OSError(28, "No space left on device")

        files[last] = fail_after_half
        write_unit(files)

    monkeypatch.setattr(neurons_module, "write_unit", json_writer_fails)
    changed = sample(torch.zeros(ROWS, COLUMNS))
    with pytest.raises(OSError, match="No space left"):
        changed.save(path)
    assert written and written[0] != before["n.json"]   # a different pair was on its way
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert RegisterNeurons.load(path).candidate_scores.sum() > 0

    with pytest.raises(OSError):                       # into a new folder: the folder goes too
        changed.save(tmp_path / "new" / "deeper" / "n.json")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    changed.save(path)                                 # and a save that succeeds replaces both
    assert float(RegisterNeurons.load(path).candidate_scores.sum()) == 0.0


def test_save_load_save_is_byte_identical_for_both_files(tmp_path):
    path, before = previous_pair(tmp_path)
    again = RegisterNeurons.load(path).save(tmp_path / "copy" / "n.json")
    assert {p.name: p.read_bytes() for p in again.parent.iterdir()} == before


# ---- the command line: one line, exit code 2, nothing new on disk ------------------------------------

#: One case of each kind (every case passes too, in about a minute; the library test above runs them all).
CLI_CASES = ["neuron-Infinity", "layer-1e400", "neuron-5000-digits", "nested-2000", "image_size-224", "extra-list",
             "threshold-high", "threshold-NaN", "unknown-key", "truncated", "random-bytes", "dev-zero", "fifo",
             "over-16-MiB", "scores-too-few-rows", "scores-not-safetensors", "scores-swapped",
             "old-json-new-scores", "scores-path-escapes"]
VISUALIZE_CASES = ["neuron-Infinity", "threshold-high", "dev-zero", "scores-too-few-rows", "old-json-new-scores"]
BY_ID = {case[0]: case[1:] for case in HOSTILE}


def run_cli(command, path: Path, folder: Path, capsys) -> str:
    flags = ["--quiet", "--num-images", "1", "--neurons", str(path)]
    if command is visualize:
        flags += ["--out", str(folder / "figures")]
    else:
        flags += ["--eval-images", "1"]
    before = listing(folder)
    code = command.main(flags)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    assert listing(folder) == before                     # nothing new left on disk
    return lines[0]


@pytest.mark.parametrize("command, case", [*((find_register_neurons, case) for case in CLI_CASES),
                                           *((visualize, case) for case in VISUALIZE_CASES)],
                         ids=lambda value: value if isinstance(value, str) else value.__name__.rsplit(".", 1)[-1])
def test_each_program_refuses_each_kind_in_one_line(tmp_path, monkeypatch, capsys, command, case):
    monkeypatch.chdir(tmp_path)
    make, message = BY_ID[case]
    line = run_cli(command, make(tmp_path), tmp_path, capsys)
    assert re.search(message, line), line


def test_scores_wider_than_the_model_are_refused_on_the_command_line(tmp_path, monkeypatch, capsys):
    """The demo model has 768 neurons per block; scores with 1000 columns were not found on it."""
    monkeypatch.chdir(tmp_path)
    path = pair(tmp_path, scores_blob(ROWS, 1000))
    line = run_cli(find_register_neurons, path, tmp_path, capsys)
    assert "1000 neuron columns, but the MLPs of demo in layers 0..2 have at most 768 neurons" in line, line


def test_a_field_of_the_file_is_named_as_in_the_file_not_as_a_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = run_cli(find_register_neurons, write(tmp_path, valid(detect_layer="2")), tmp_path, capsys)
    assert "'detect_layer' must be null or an integer" in line, line
