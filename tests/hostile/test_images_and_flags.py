"""Hostile images, file names, flags and interrupts: through the command line (exit code 2, or 130 for
Ctrl-C; one line on stderr; nothing new on disk) and through the library (the precise exception).

The images are built here: a real PNG decompression bomb (a valid 1-bit PNG of 20000 x 10000 pixels,
24 KB on disk, above twice PIL's MAX_IMAGE_PIXELS, so PIL raises DecompressionBombError at open), PIL's
warning below that limit (MAX_IMAGE_PIXELS lowered for the test), truncated JPEGs, zero-byte files,
a PNG with an impossible header, and names that are not UTF-8 (bytes names, made with os.fsencode).
"""

import io
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from test_time_registers import ImageFolder, ImageSourceError, find_register_neurons
from test_time_registers.data.batching import ordered_source
from test_time_registers.data.labelled import folder_images
from test_time_registers.data.sources import UnreadableImage, default_transform, printable, read_image
from test_time_registers.scripts import benchmark, evaluate, find_register_neurons as frn, train_registers, visualize
from test_time_registers.scripts.common import UsageError, check_output_paths, new_outputs

ROOT = Path(__file__).resolve().parents[2]
QUIET_DEMO = ["--num-images", "12", "--eval-images", "4", "--quiet"]


# ---------------------------------------------------------------------------- hostile files

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 10000) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels: a few KB that decode to hundreds of MB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)          # filter byte, then the packed row
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


BOMB = bomb_png()


def png(color=(200, 40, 90), size=(72, 72)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()[:len(buffer.getvalue()) * 2 // 3]


def bad_header_png() -> bytes:
    """A PNG whose header declares a bit depth PNG does not have (PIL's plugin raises SyntaxError)."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 7, 2, 0, 0, 0)) + _chunk(b"IEND", b"")


HOSTILE = {"bomb.png": BOMB, "empty.png": b"", "truncated.jpg": truncated_jpeg(), "header.png": bad_header_png(),
           "notes.txt": b"not an image"}


def folder_of(root: Path, files: dict) -> Path:
    """A folder holding ``files`` (name -> bytes; a bytes name is written as those exact bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(os.fsencode(root), name) if isinstance(name, bytes) else root / name
        with open(path, "wb") as handle:
            handle.write(data)
    return root


def good(count: int, prefix: str = "good") -> dict:
    return {f"{prefix}{index}.png": png((40 * index % 256, 120, 200 - 30 * index % 200)) for index in range(count)}


def listing(root: Path) -> set:
    """Every path under ``root``, as bytes (names that are not UTF-8 included)."""
    found = set()
    for folder, folders, files in os.walk(os.fsencode(root)):
        found.update(os.path.join(folder, name) for name in folders + files)
    return found


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# ---------------------------------------------------------------------------- the library

@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_every_way_pil_refuses_a_file_is_an_unreadable_image(tmp_path, name):
    path = folder_of(tmp_path, {name: HOSTILE[name]}) / name
    with pytest.raises(UnreadableImage) as refused:
        read_image(path)
    assert "\n" not in str(refused.value) and str(path) not in str(refused.value)
    if name == "bomb.png":
        assert "decompression bomb" in str(refused.value)


def test_pil_s_bomb_warning_below_twice_the_limit_is_an_unreadable_image_too(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = folder_of(tmp_path, {"warned.png": png(size=(40, 40)), "refused.png": png(size=(60, 60)),
                                  "small.png": png(size=(20, 20))})
    for name in ("warned.png", "refused.png"):   # 1600 pixels: PIL warns; 3600: PIL raises
        with pytest.raises(UnreadableImage, match="decompression bomb"):
            read_image(folder / name)
    assert [name for name, _ in ImageFolder(folder)] == ["small.png"]


def test_a_folder_of_hostile_files_has_no_readable_image(tmp_path, demo):
    model, preprocess, _, _ = demo
    folder = ImageFolder(folder_of(tmp_path / "hostile", HOSTILE))
    assert list(folder) == [] and folder.skipped == len(HOSTILE)
    with pytest.raises(ImageSourceError, match="no readable image among the 5 file"):
        folder.hold_out(4)
    with pytest.raises(ImageSourceError, match="no readable image among the 5 file"):
        folder.readable_sample(4)
    from test_time_registers.clip import ClipHookManager
    with pytest.raises(ImageSourceError, match="no readable image"):
        find_register_neurons(ClipHookManager(model), folder, preprocess, top_k=2, progress=False)


def test_held_out_and_readable_samples_draw_only_images_that_decode(tmp_path):
    files = {**{f"empty{index:03d}.png": b"" for index in range(200)},
             **{f"cut{index}.jpg": truncated_jpeg() for index in range(5)}, **good(6)}
    folder = ImageFolder(folder_of(tmp_path, files), seed=3)
    rest, held_out = folder.hold_out(32)
    assert len(held_out.files) == 3                       # half the readable images
    assert all(read_image(path) for path in held_out.files)
    assert set(rest.files) | set(held_out.files) == set(folder.files) and not set(rest.files) & set(held_out.files)
    sample = folder.readable_sample(4)
    assert len(sample.files) == 4 and all(read_image(path) for path in sample.files)
    assert folder.hold_out(32)[1].files == held_out.files   # seeded


def test_names_that_are_not_utf8_work_everywhere_a_name_is_used(tmp_path, caplog):
    root = folder_of(tmp_path / "odd", {b"\xff.png": png(), b"caf\xe9\n.txt": b"junk", "plain.png": png((1, 2, 3))})
    folder = ImageFolder(root)
    with caplog.at_level(logging.WARNING, logger="test_time_registers.data.sources"):
        names = [name for name, _ in folder]
    assert names == ["plain.png", "\\xff.png"]
    message = caplog.records[0].getMessage()
    assert message == "skipped caf\\xe9\\x0a.txt: cannot identify image file"
    message.encode("utf-8")                                # valid text, printable anywhere
    source = ordered_source(ImageFolder(root))
    assert source.names == ["caf\\xe9\\x0a.txt", "plain.png", "\\xff.png"]
    fingerprint = source.fingerprint
    os.rename(os.path.join(os.fsencode(root), b"\xff.png"), os.path.join(os.fsencode(root), b"\xfe.png"))
    assert ordered_source(ImageFolder(root)).fingerprint != fingerprint   # the exact bytes count
    assert ImageFolder(os.fsencode(root)).files == ImageFolder(root).files  # a bytes root works too
    labelled = folder_images(root)
    assert [item.name for item in labelled.items] == ["plain.png", "\\xfe.png"]
    assert labelled.skipped == ["caf\\xe9\\x0a.txt"]
    assert printable(b"\xff".decode("utf-8", "surrogateescape") + "\t") == "\\xff\\x09"


def test_a_checkpoint_of_a_folder_with_odd_names_resumes(tmp_path, demo):
    model, preprocess, _, _ = demo
    from test_time_registers.clip import ClipHookManager
    root = folder_of(tmp_path / "odd", {**good(6), b"\xff.png": png((9, 9, 9)), b"\xfe.txt": b"junk"})
    hook_manager = ClipHookManager(model)
    settings = dict(top_k=3, batch_size=2, threshold=1.0, progress=False)
    first = find_register_neurons(hook_manager, ImageFolder(root), preprocess, checkpoint=tmp_path / "c.pt",
                                  checkpoint_every=1, **settings)
    again = find_register_neurons(hook_manager, ImageFolder(root), preprocess, checkpoint=tmp_path / "c.pt",
                                  resume=True, **settings)
    assert again.pairs() == first.pairs() and again.extra["files_skipped"] == 1


def test_check_output_paths_creates_nothing(tmp_path):
    check_output_paths(out=tmp_path / "new" / "deeper" / "n.json", log=tmp_path / "l.h5")
    assert listing(tmp_path) == set()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot write there"):
        check_output_paths(out=tmp_path / "file" / "n.json")


def test_new_outputs_leave_nothing_new_after_a_failure_or_ctrl_c(tmp_path):
    (tmp_path / "old.json").write_text("old")
    kept, new, deep = tmp_path / "old.json", tmp_path / "a" / "b" / "n.json", tmp_path / "c" / "f.png"
    before = listing(tmp_path)
    with pytest.raises(KeyboardInterrupt), new_outputs(kept, new, deep, None):
        new.write_text("new")
        deep.write_text("png")
        raise KeyboardInterrupt
    assert listing(tmp_path) == before and kept.read_text() == "old"
    with pytest.raises(RuntimeError), new_outputs(new):   # a file nobody declared keeps its folder (a checkpoint)
        (new.parent / "checkpoint.pt").write_text("resume from me")
        new.write_text("new")
        raise RuntimeError
    assert not new.exists() and (new.parent / "checkpoint.pt").read_text() == "resume from me"


# ---------------------------------------------------------------------------- the command line

def test_a_folder_of_hostile_files_fails_before_any_file_is_written(tmp_path, capsys):
    images = folder_of(tmp_path / "hostile", HOSTILE)
    before = listing(tmp_path)
    out = tmp_path / "new" / "n.json"
    assert frn.main([*QUIET_DEMO, "--images", str(images), "--out", str(out), "--figure", str(out.with_suffix(".png")),
                     "--log", str(tmp_path / "logs" / "a.h5")]) == 2
    assert "no readable image among the 5 file(s) in" in one_error_line(capsys)
    assert listing(tmp_path) == before
    assert visualize.main(["--images", str(images), "--out", str(tmp_path / "figures"), "--quiet"]) == 2
    assert "no readable image among the 5 file(s) in" in one_error_line(capsys)
    assert evaluate.main(["--images", str(images), "--json", str(tmp_path / "new" / "t.json"), "--quiet"]) == 2
    assert "no readable image" in one_error_line(capsys)
    assert listing(tmp_path) == before


def test_a_mostly_broken_folder_succeeds_fully_and_names_what_it_skipped(tmp_path, capsys):
    files = {**{f"empty{index:03d}.png": b"" for index in range(150)}, **HOSTILE, **good(8),
             b"\xff.png": png((250, 10, 10)), b"bad\xfe.txt": b"junk"}
    images = folder_of(tmp_path / "broken", files)
    out = tmp_path / "out" / "n.json"
    assert frn.main(["--quiet", "--images", str(images), "--out", str(out), "--eval-images", "32",
                     "--checkpoint", str(tmp_path / "c.pt"), "--log", str(tmp_path / "a.h5")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and out.is_file() and (tmp_path / "a.h5").is_file()
    assert re.search(r"^skipped 156 unreadable or non-image file\(s\) in ", captured.out, re.MULTILINE)
    assert "before/after on 4 held-out images" in captured.out          # half of the 9 readable images
    assert visualize.main(["--images", str(images), "--neurons", str(out), "--out", str(tmp_path / "figures"),
                           "--quiet", "--num-images", "2", "--layers", "7"]) == 0
    assert "wrote" in capsys.readouterr().out


FLAGS = [
    (evaluate, ["--outlier-ratio", "nan"], "--outlier-ratio: expected a number above 1, got 'nan'"),
    (evaluate, ["--outlier-ratio", "inf"], "--outlier-ratio: expected a number above 1, got 'inf'"),
    (evaluate, ["--outlier-ratio", "1"], "--outlier-ratio: expected a number above 1, got '1'"),
    (frn, ["--top-k", "auto", "--target-ratio", "nan"], "--target-ratio: expected a number of at least 1"),
    (frn, ["--top-k", "auto", "--target-ratio", "Infinity"], "--target-ratio: expected a number of at least 1"),
    (frn, ["--threshold", "nan"], "--threshold: expected a positive number or 'auto', got 'nan'"),
    (frn, ["--threshold=-inf"], "--threshold: expected a positive number or 'auto', got '-inf'"),
    (frn, ["--seed", str(2**64)], "--seed: expected a seed in 0..4294967295"),
    (benchmark, ["--peak-tflops", "nan"], "--peak-tflops: expected a positive number, got 'nan'"),
    (benchmark, ["--threshold", "inf"], "--threshold: expected a positive number or 'auto', got 'inf'"),
    (train_registers, ["--lr", "nan"], "--lr: expected a positive number, got 'nan'"),
    (train_registers, ["--lr", "inf"], "--lr: expected a positive number, got 'inf'"),
    (train_registers, ["--l2-weight", "inf"], "--l2-weight: expected a non-negative number, got 'inf'"),
    (train_registers, ["--weight-decay", "nan"], "--weight-decay: expected a non-negative number, got 'nan'"),
    (train_registers, ["--from-scratch", "--vit", "dropout=nan"], "expected dropout as a rate in [0, 1), got 'nan'"),
    (visualize, ["--seed", "-1"], "--seed: expected a seed in 0..4294967295"),
]


@pytest.mark.parametrize("script, flags, message", FLAGS, ids=lambda value: getattr(value, "__name__", None))
def test_float_flags_refuse_nan_and_infinities(tmp_path, capsys, script, flags, message):
    assert script.main([*flags, "--quiet"] if script is not benchmark else flags) == 2
    assert message in one_error_line(capsys)
    assert listing(tmp_path) == set()


def test_a_failed_training_leaves_no_output_folder(tmp_path, capsys, one_thread):
    out = tmp_path / "new" / "registers"
    assert train_registers.main(["--freeze-layers", "99", "--num-images", "2", "--out", str(out), "--quiet"]) == 2
    assert "--freeze-layers" in one_error_line(capsys)
    assert listing(tmp_path) == set()


def test_outputs_of_a_run_that_fails_late_are_removed(tmp_path, capsys):
    json_file, figure = tmp_path / "new" / "t.json", tmp_path / "figs" / "f.png"
    assert evaluate.main(["--num-images", "4", "--quiet", "--json", str(json_file), "--figure", str(figure),
                          "--detect-layer", "99"]) == 2
    assert "--detect-layer" in one_error_line(capsys)
    assert listing(tmp_path) == set()


# ---------------------------------------------------------------------------- Ctrl-C

LAUNCH = """
import sys
from importlib import import_module
module = import_module("test_time_registers.scripts." + sys.argv[1])
print("main", flush=True)
sys.exit(module.main(sys.argv[2:]))
"""


def interrupted(tmp_path: Path, script: str, flags: list[str], delay: float) -> subprocess.CompletedProcess:
    """Run ``script`` with ``flags`` in a fresh process, send SIGINT ``delay`` seconds after ``main`` is
    entered (0: at once, while it builds its parser and imports), and return how it ended."""
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, script, *flags], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert process.stdout.readline() == "main\n"
    time.sleep(delay)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


RUNS = {
    "find_register_neurons": ["--num-images", "2000", "--batch-size", "4", "--out", "new/n.json",
                              "--figure", "figs/f.png", "--log", "logs/a.h5"],
    "visualize": ["--out", "new/figures", "--layers", "0-7"],
    "train_registers": ["--num-images", "4000", "--batch-size", "4", "--out", "new/registers"],
    "evaluate": ["--num-images", "2000", "--json", "new/t.json", "--figure", "figs/f.png"],
}


@pytest.mark.parametrize("script, delay", [("find_register_neurons", 0.0), ("find_register_neurons", 0.3),
                                           ("find_register_neurons", 2.5), ("visualize", 0.0), ("visualize", 2.0),
                                           ("train_registers", 0.0), ("train_registers", 2.5),
                                           ("evaluate", 0.0), ("evaluate", 2.5)])
def test_ctrl_c_at_any_moment_is_one_line_exit_130_and_leaves_nothing(tmp_path, script, delay):
    result = interrupted(tmp_path, script, [*RUNS[script], "--quiet"], delay)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["error: interrupted"], result.stderr
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("delay", [0.3, 0.7])
def test_ctrl_c_while_the_console_script_imports_torch_is_one_line_exit_130(tmp_path, delay):
    """The installed console script enters through scripts/launch.py; a SIGINT while its modules import
    (torch alone takes over a second here) is caught there, before main runs."""
    script = Path(sys.executable).parent / "find-register-neurons"
    assert script.exists(), script
    process = subprocess.Popen([str(script), "--out", "new/n.json"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    time.sleep(delay)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted"], err
    assert listing(tmp_path) == set()
