"""Hostile checkpoints and trained-register folders: every kind through the library (the precise error, the
file and the field named) and through the command line (exit code 2, one line on stderr, nothing new on disk)."""

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_time_registers import CheckpointError, gather_statistics, load_model
from test_time_registers.discovery import read_checkpoint, write_checkpoint
from test_time_registers.errors import TrainedRegistersError
from test_time_registers.training import registers as trained
from test_time_registers.training.registers import (LearnableRegisters, RegisteredModel, read_trained_registers,
                                                    save_trained_registers)

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def demo_model():
    return load_model("demo")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_model):
    """A real discovery checkpoint of 6 scenes, and the scenes."""
    folder = tmp_path_factory.mktemp("checkpoint")
    scenes = list(demo_model.generate_images(6, 0))
    gather_statistics(demo_model.hook_manager, scenes, demo_model.preprocess, checkpoint=folder / "run.ckpt",
                      progress=False)
    return folder / "run.ckpt", scenes


def _statistics(original):
    return {**original.statistics, "score_sums": dict(original.statistics["score_sums"])}


def _mutated(original, **changes):
    """The checkpoint ``original`` with fields of its statistics (``statistics__NAME``) or itself replaced."""
    copy = read_checkpoint(original)
    for key, value in changes.items():
        if key.startswith("statistics__"):
            copy.statistics = {**copy.statistics, key.removeprefix("statistics__"): value}
        else:
            setattr(copy, key, value)
    return copy


class Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def hostile_checkpoints(folder: Path, original: Path) -> dict[str, tuple[Path, str]]:
    """{kind: (file, what the message must say)}."""
    made = {}

    def bytes_file(name, data, message):
        (folder / name).write_bytes(data)
        made[name] = (folder / name, message)

    bytes_file("pickle.ckpt", pickle.dumps({"format": 1, "x": Marker(folder / "unpickled")}), "a Python pickle")
    torch.save({"format": 1, "x": Marker(folder / "unpickled")}, folder / "zip.ckpt")
    made["zip.ckpt"] = (folder / "zip.ckpt", "a zip archive")
    bytes_file("random.ckpt", os.urandom(4096), "not a discovery checkpoint")
    bytes_file("empty.ckpt", b"", "not a discovery checkpoint")

    def tensors_file(name, tensors, metadata, message):
        save_file(tensors, folder / name, metadata=metadata)
        made[name] = (folder / name, message)

    plain = {"counts": torch.zeros(4)}
    tensors_file("no-metadata.ckpt", plain, None, "no 'test_time_registers.discovery' metadata")
    tensors_file("list.ckpt", plain, {"test_time_registers.discovery": "[1, 2]"}, "format must be 2")
    tensors_file("deep.ckpt", plain, {"test_time_registers.discovery": "[" * 5000 + "]" * 5000}, "nests JSON")
    tensors_file("nan.ckpt", plain, {"test_time_registers.discovery": '{"format": NaN}'}, "NaN")
    tensors_file("fields.ckpt", plain, {"test_time_registers.discovery": '{"format": 2}'}, "exactly the fields")

    def checkpoint_file(name, message, **changes):
        write_checkpoint(folder / name, _mutated(original, **changes))
        made[name] = (folder / name, message)

    checkpoint_file("consumed.ckpt", "consumed must be an int of at least 0", consumed=-5)
    checkpoint_file("consumed-float.ckpt", "consumed must be an int", consumed=2.5)
    checkpoint_file("counts-shape.ckpt", r"counts must be a float32 tensor of shape \[4\]",
                    statistics__counts=torch.zeros(3))
    checkpoint_file("counts-negative.ckpt", "counts must be whole numbers",
                    statistics__counts=torch.tensor([-1.0, 0, 0, 0]))
    checkpoint_file("more-outliers.ckpt", "counts must be whole numbers",
                    statistics__counts=torch.tensor([2.0, 3, 0, 10]))
    checkpoint_file("ratio-shape.ckpt", "ratio_sums must be a float32 tensor", statistics__ratio_sums=torch.zeros(2))
    checkpoint_file("inf.ckpt", "norm_sums holds NaN or infinite values",
                    statistics__norm_sums=torch.tensor([float("inf"), 0.0]))
    checkpoint_file("nan-scores.ckpt", r"score_sums\[0\] holds NaN",
                    statistics__score_sums={**read_checkpoint(original).statistics["score_sums"],
                                            0: torch.full((768,), float("nan"))})
    checkpoint_file("score.ckpt", "score must be 'raw' or 'abs'", statistics__score="median")
    checkpoint_file("threshold.ckpt", "threshold must be null or a positive number", statistics__threshold="high")
    checkpoint_file("layer.ckpt", "detect_layer must be an int", statistics__detect_layer=10**9)
    checkpoint_file("skipped.ckpt", "skipped must be a list of file names", skipped=[1, 2])
    checkpoint_file("complete.ckpt", "complete must be true or false", complete="yes")
    checkpoint_file("settings.ckpt", "settings must be a JSON object", settings=[1])
    checkpoint_file("more-than-seen.ckpt", "consumed must be at least the images counted", consumed=2)
    return made


def test_every_hostile_checkpoint_is_refused_by_the_library_in_one_line_unrun_and_unwarned(tmp_path, checkpoint,
                                                                                          demo_model):
    original, scenes = checkpoint
    cases = hostile_checkpoints(tmp_path, original)
    cases["missing"] = (tmp_path / "missing.ckpt", "no checkpoint to resume from")
    cases["a folder"] = (tmp_path / "folder.ckpt", "is not a regular file")
    (tmp_path / "folder.ckpt").mkdir()
    cases["/dev/zero"] = (Path("/dev/zero"), "is not a regular file")
    cases["too many"] = (tmp_path / "too-many.ckpt", "consumed must be at most 6")
    write_checkpoint(tmp_path / "too-many.ckpt", _mutated(original, consumed=77))
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    for kind, (path, message) in cases.items():
        with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError, match=message) as raised:
            warnings.simplefilter("always")
            gather_statistics(hm, scenes, preprocess, checkpoint=path, resume=True, progress=False)
        text = str(raised.value)
        assert "\n" not in text and "weights_only" not in text and len(text) < 400, kind
        assert not caught, (kind, [str(warning.message) for warning in caught])
    assert not (tmp_path / "unpickled").exists()
    assert gather_statistics(hm, scenes, preprocess, checkpoint=original, resume=True,
                             progress=False).images_seen == 6        # the original still resumes


def _run(*args, cwd):
    return subprocess.Popen([*map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line_and_nothing_new(process, folder: Path, before: set, message: str):
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert "weights_only" not in stderr and "Warning" not in stderr
    assert set(folder.rglob("*")) == before


def test_the_command_line_refuses_hostile_checkpoints_in_one_line_leaving_nothing(tmp_path, checkpoint):
    original, _ = checkpoint
    cases = hostile_checkpoints(tmp_path, original)
    chosen = {"pickle.ckpt": "never unpickles", "zip.ckpt": "never unpickles", "random.ckpt": "not a discovery",
              "consumed.ckpt": "consumed must be"}
    before = set(tmp_path.rglob("*"))
    running = {name: _run(BIN / "find-register-neurons", "--num-images", 8, "--eval-images", 4, "--quiet",
                          "--out", tmp_path / f"{name}.json", "--checkpoint", cases[name][0], "--resume", cwd=tmp_path)
               for name in chosen}
    for name, process in running.items():
        _one_line_and_nothing_new(process, tmp_path, before, chosen[name])
    assert not (tmp_path / "unpickled").exists()


# ---------------------------------------------------------------------------- trained-register folders


@pytest.fixture(scope="module")
def registers_folder(tmp_path_factory, demo_model):
    """A trained-register folder on the demo model (one learned register)."""
    hook_manager = demo_model.hook_manager
    registers = LearnableRegisters.for_model(hook_manager, 1, seed=3)
    registered = RegisteredModel(hook_manager.model, hook_manager, registers)
    folder = tmp_path_factory.mktemp("trained") / "registers"
    save_trained_registers(folder, registered, base_model="demo", parameters=["registers.tokens"])
    return folder


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for name in (trained.WEIGHTS_FILE, trained.METADATA_FILE):
        (to / name).write_bytes((folder / name).read_bytes())
    return to


def _rewrite_json(folder: Path, change) -> None:
    path = folder / trained.METADATA_FILE
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


def _rewrite_both(folder: Path, change) -> None:
    """Both halves changed alike (the digest kept right): the reader's field checks must refuse it."""
    tensors = {"registers.tokens": torch.zeros(1, 1, 64)}
    metadata = json.loads((folder / trained.METADATA_FILE).read_text())
    metadata.pop(trained.DIGEST_KEY)
    change(metadata)
    text = json.dumps(metadata)
    save_file(tensors, folder / trained.WEIGHTS_FILE, metadata={trained.METADATA_KEY: text})
    from test_time_registers.files import sha256
    (folder / trained.METADATA_FILE).write_text(json.dumps({**metadata, trained.DIGEST_KEY: sha256(
        folder / trained.WEIGHTS_FILE)}))


def hostile_folders(base: Path, original: Path) -> dict[str, tuple[Path, str]]:
    made = {}

    def folder(name, message, change=None):
        path = _copy(original, base / name)
        if change:
            change(path)
        made[name] = (path, message)

    folder("not-json", "registers.json is not valid JSON",
           lambda p: (p / trained.METADATA_FILE).write_text("{not json"))
    folder("no-json", "cannot read trained-register metadata", lambda p: (p / trained.METADATA_FILE).unlink())
    folder("deep-json", "nests JSON", lambda p: (p / trained.METADATA_FILE).write_text("[" * 3000 + "]" * 3000))
    folder("lacks", "lacks base_model", lambda p: _rewrite_json(p, lambda m: m.pop("base_model")))
    folder("json-type", "learned_registers must be", lambda p: _rewrite_json(p, lambda m: m.update(learned_registers="2")))
    folder("disagrees", "disagrees with the metadata inside", lambda p: _rewrite_json(p, lambda m: m.update(seed=5)))
    folder("no-digest", "weights_sha256 must be", lambda p: _rewrite_json(p, lambda m: m.pop(trained.DIGEST_KEY)))
    folder("digest", "weights_sha256 does not match", lambda p: _rewrite_json(
        p, lambda m: m.update(weights_sha256="0" * 64)))
    folder("weights-replaced", "weights_sha256 does not match", lambda p: save_file(
        {"registers.tokens": torch.ones(1, 1, 64)}, p / trained.WEIGHTS_FILE,
        metadata={trained.METADATA_KEY: json.dumps({k: v for k, v in json.loads(
            (p / trained.METADATA_FILE).read_text()).items() if k != trained.DIGEST_KEY}, indent=2)}))
    folder("weights-garbage", "is not a safetensors file",
           lambda p: (p / trained.WEIGHTS_FILE).write_bytes(os.urandom(1000)))
    folder("insert-at", "insert_at must be an int", lambda p: _rewrite_both(p, lambda m: m.update(insert_at=-1)))
    folder("layer-out-of-range", "does not fit demo", lambda p: _rewrite_both(p, lambda m: m.update(insert_at=99)))
    folder("seed", "seed must be an int", lambda p: _rewrite_both(p, lambda m: m.update(seed=2.5)))
    folder("seed-inf", "holds Infinity", lambda p: _rewrite_both(p, lambda m: m.update(seed=1e400)))
    folder("classifier", "classifier must be", lambda p: _rewrite_both(p, lambda m: m.update(classifier=[1, 2])))
    folder("parameters", "parameters must name exactly its tensors",
           lambda p: _rewrite_both(p, lambda m: m.update(parameters=["registers.tokens", "model.head"])))
    folder("format", "newer than the 1", lambda p: _rewrite_both(p, lambda m: m.update(format=7)))
    folder("scratch", "from_scratch must be", lambda p: _rewrite_both(p, lambda m: m.update(from_scratch={"x": 1})))
    return made


def test_every_hostile_trained_register_folder_is_refused_by_the_library(tmp_path, registers_folder):
    cases = hostile_folders(tmp_path, registers_folder)
    cases["missing"] = (tmp_path / "nothing", "no trained registers at")
    for kind, (path, message) in cases.items():
        with pytest.raises(TrainedRegistersError, match=message) as raised:
            trained.load_trained_registers(path)
        assert "\n" not in str(raised.value) and len(str(raised.value)) < 400, kind
    assert read_trained_registers(registers_folder)[0]["learned_registers"] == 1
    assert trained.load_trained_registers(registers_folder).hook_manager.layout.num_trained_registers == 1


def test_evaluate_refuses_hostile_trained_registers_in_one_line_leaving_nothing(tmp_path, registers_folder):
    from test_time_registers import RegisterNeurons

    cases = hostile_folders(tmp_path, registers_folder)
    neurons = RegisterNeurons.coerce([(4, 548), (4, 141)])
    neurons.model = "demo"
    neurons.save(tmp_path / "neurons.json")
    chosen = {"not-json": "is not valid JSON", "digest": "does not match", "layer-out-of-range": "does not fit demo"}
    before = set(tmp_path.rglob("*"))
    running = {name: _run(BIN / "test-time-registers-evaluate", "--model", "demo", "--num-images", 4, "--quiet",
                          "--neurons", tmp_path / "neurons.json", "--json", tmp_path / f"{name}.json",
                          "--trained-model", f"registers:{cases[name][0]}", cwd=tmp_path) for name in chosen}
    for name, process in running.items():
        _one_line_and_nothing_new(process, tmp_path, before, chosen[name])


def test_a_save_that_fails_halfway_leaves_the_old_pair_or_no_folder(tmp_path, registers_folder, demo_model,
                                                                    monkeypatch):
    hook_manager = demo_model.hook_manager
    registered = RegisteredModel(hook_manager.model, hook_manager, LearnableRegisters.for_model(hook_manager, 1))

    def disk_fails(_path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trained, "sha256", disk_fails)   # after the weights' temporary is written
    with pytest.raises(OSError, match="No space"):
        save_trained_registers(tmp_path / "new" / "registers", registered, base_model="demo",
                               parameters=["registers.tokens"])
    assert not (tmp_path / "new").exists()
    old = _copy(registers_folder, tmp_path / "old")
    before = {name: (old / name).read_bytes() for name in (trained.WEIGHTS_FILE, trained.METADATA_FILE)}
    with pytest.raises(OSError, match="No space"):
        save_trained_registers(old, registered, base_model="demo", parameters=["registers.tokens"])
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before     # the old pair, and no temporary
