"""Fuzzing the readers of discovery checkpoints and trained-register metadata (hypothesis): whatever the bytes,
the JSON or the tensors, a load gives a valid object or the library's error, never another exception."""

import json
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from test_time_registers import CheckpointError, DiscoveryStatistics, InvalidArgumentError
from test_time_registers.discovery import CHECKPOINT_KEY, DiscoveryCheckpoint, read_checkpoint, write_checkpoint
from test_time_registers.errors import TrainedRegistersError
from test_time_registers.layout import TokenLayout
from test_time_registers.training import registers as trained

#: 120 fixed examples per test in the suite (a few seconds); FUZZ_EXAMPLES=N runs N random ones instead.
EXAMPLES = os.environ.get("FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(EXAMPLES or 120), deadline=None, derandomize=EXAMPLES is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LAYOUT = TokenLayout(num_cls=1)
WIDTHS = {0: 6, 1: 6, 2: 6}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def valid_checkpoint() -> DiscoveryCheckpoint:
    stats = DiscoveryStatistics(WIDTHS, 2, LAYOUT, threshold=3.0, model="fuzz")
    generator = torch.Generator().manual_seed(0)
    stats.update({layer: torch.randn(2, 5, 6, generator=generator) for layer in WIDTHS},
                 {layer: torch.rand(2, 4, generator=generator) * 5 for layer in range(3)})
    return DiscoveryCheckpoint({"model": "fuzz", "images": 10}, stats.state_dict(), 2, ["bad.txt"], False)


def fresh_statistics() -> DiscoveryStatistics:
    return DiscoveryStatistics(WIDTHS, 2, LAYOUT, model="fuzz")


def load_or_refuse(path: Path) -> None:
    """The contract: a valid checkpoint that restores (or another run's settings), or CheckpointError."""
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        assert "\n" not in str(error) and "weights_only" not in str(error)
        return
    assert isinstance(checkpoint.consumed, int) and checkpoint.consumed >= checkpoint.statistics["counts"][0]
    try:
        fresh_statistics().load_state_dict(checkpoint.statistics, origin=str(path))
    except InvalidArgumentError as error:   # a well-formed state of other settings
        assert "other discovery settings" in str(error)


def test_the_valid_checkpoint_round_trips_byte_identically():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        write_checkpoint(path, valid_checkpoint())
        write_checkpoint(Path(folder) / "again.ckpt", read_checkpoint(path))
        assert (Path(folder) / "again.ckpt").read_bytes() == path.read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 10**6))
def test_checkpoint_bytes_flipped_or_cut(edits, cut):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        write_checkpoint(path, valid_checkpoint())
        data = bytearray(path.read_bytes())
        for position, value in edits:
            data[position % len(data)] = value
        path.write_bytes(bytes(data[:cut % len(data)] if cut is not None else data))
        load_or_refuse(path)


FIELDS = ["format", "settings", "statistics", "consumed", "skipped", "complete"]
STATE = ["detect_layer", "score", "model", "threshold_mode", "sparsity", "threshold", "num_cls",
         "num_trained_registers", "reference_median", "image_size"]


@FUZZ
@given(field=st.sampled_from(FIELDS + [f"statistics.{name}" for name in STATE]), value=json_values,
       drop=st.booleans())
def test_checkpoint_json_fields_replaced_or_dropped(field, value, drop):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        write_checkpoint(path, valid_checkpoint())
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        content = json.loads(header["__metadata__"][CHECKPOINT_KEY])
        target, key = (content["statistics"], field.split(".")[1]) if "." in field else (content, field)
        if drop:
            target.pop(key)
        else:
            target[key] = value
        from safetensors.torch import load_file
        save_file(load_file(path), path, metadata={CHECKPOINT_KEY: json.dumps(content)})
        load_or_refuse(path)


@FUZZ
@given(name=st.sampled_from(["score_sums.0", "score_sums.2", "ratio_sums", "counts", "norm_sums", "norm_max",
                             "score_sums.3", "extra"]),
       shape=st.lists(st.integers(0, 7), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.float64]),
       fill=st.sampled_from([0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), 3e38]), drop=st.booleans())
def test_checkpoint_tensors_replaced_or_dropped(name, shape, dtype, fill, drop):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        write_checkpoint(path, valid_checkpoint())
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(path)
        if drop:
            tensors.pop(name, None)
        else:
            tensors[name] = torch.full(shape, fill).to(dtype)
        save_file(tensors, path, metadata=metadata)
        load_or_refuse(path)


# ---------------------------------------------------------------------------- trained-register metadata


def valid_metadata() -> dict:
    return {"format": 1, "base_model": "demo", "seed": 0, "learned_registers": 1, "registers_in_layout": 1,
            "insert_at": 0, "cls_pos": None, "head_classes": None, "classifier": None, "from_scratch": None,
            "parameters": ["registers.tokens"], "options": {"lr": 0.001}}


def write_folder(folder: Path, metadata: dict, listed: dict | None = None) -> None:
    folder.mkdir(exist_ok=True)
    save_file({"registers.tokens": torch.zeros(1, 1, 8)}, folder / trained.WEIGHTS_FILE,
              metadata={trained.METADATA_KEY: json.dumps(metadata)})
    from test_time_registers.files import sha256
    listed = metadata if listed is None else listed
    (folder / trained.METADATA_FILE).write_text(json.dumps({**listed, trained.DIGEST_KEY: sha256(
        folder / trained.WEIGHTS_FILE)}))


def read_or_refuse(folder: Path) -> None:
    try:
        metadata, tensors = trained.read_trained_registers(folder)
    except TrainedRegistersError as error:
        assert "\n" not in str(error)
        return
    assert trained.check_trained_metadata(metadata, folder) is metadata
    assert set(tensors) == set(metadata["parameters"])


@FUZZ
@given(field=st.sampled_from(list(valid_metadata())), value=json_values, drop=st.booleans(),
       both=st.booleans())
def test_trained_metadata_fields_replaced_or_dropped(field, value, drop, both):
    metadata = valid_metadata()
    if drop:
        metadata.pop(field)
    else:
        metadata[field] = value
    with tempfile.TemporaryDirectory() as folder:
        # both halves alike: the field checks decide; only registers.json changed: the pair disagrees
        write_folder(Path(folder), metadata if both else valid_metadata(), metadata)
        read_or_refuse(Path(folder))


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
       where=st.sampled_from(["json", "inside"]))
def test_trained_metadata_that_is_any_text(text, where):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_folder(folder, valid_metadata())
        if where == "json":
            (folder / trained.METADATA_FILE).write_text(text, encoding="utf-8", errors="surrogateescape")
        else:
            save_file({"registers.tokens": torch.zeros(1, 1, 8)}, folder / trained.WEIGHTS_FILE,
                      metadata={trained.METADATA_KEY: text})
        read_or_refuse(folder)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), min_size=1, max_size=6))
def test_trained_register_weights_with_bytes_flipped(edits):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_folder(folder, valid_metadata())
        data = bytearray((folder / trained.WEIGHTS_FILE).read_bytes())
        for position, value in edits:
            data[position % len(data)] = value
        (folder / trained.WEIGHTS_FILE).write_bytes(bytes(data))
        read_or_refuse(folder)                          # the digest refuses it, unless nothing changed
        try:
            trained.read_trained_registers(folder / trained.WEIGHTS_FILE)   # the file alone: no digest to check
        except TrainedRegistersError as error:
            assert "\n" not in str(error)
