"""Image sources (test_time_registers.data.sources): folders read as RGB, seeded samples, hold-outs, skips."""

import numpy as np
import pytest
from PIL import Image

from test_time_registers import ImageFolder, ImageSourceError
from test_time_registers.data.sources import to_rgb


def _write_mixed_folder(root):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(root / "b_grey.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)).save(root / "c_rgba.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert("P").save(root / "d_palette.gif")
    Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)).save(root / "e_16bit.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert("CMYK").save(root / "f_cmyk.jpg")
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "sub" / "g.bmp")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "empty.jpg").write_bytes(b"")
    (root / ".hidden.png").write_bytes(b"ignored")


def test_folder_reads_every_mode_as_rgb_and_skips_the_rest(tmp_path):
    _write_mixed_folder(tmp_path)
    folder = ImageFolder(tmp_path)
    items = list(folder)
    assert [name for name, _ in items] == ["a.png", "b_grey.jpg", "c_rgba.png", "d_palette.gif", "e_16bit.png",
                                           "f_cmyk.jpg", "sub/g.bmp"]
    assert all(image.mode == "RGB" for _, image in items)
    assert folder.skipped == 3


def test_seeded_sample_is_reproducible_and_only_counts_readable_images(tmp_path):
    _write_mixed_folder(tmp_path)
    first = [name for name, _ in ImageFolder(tmp_path, limit=4, seed=3)]
    again = [name for name, _ in ImageFolder(tmp_path, limit=4, seed=3)]
    other = [name for name, _ in ImageFolder(tmp_path, limit=4, seed=4)]
    assert first == again and len(first) == 4 and first != other


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ImageSourceError, match="not found"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="empty"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ImageSourceError, match="not a folder"):
        ImageFolder(tmp_path / "file.png")


def test_16_bit_images_are_rescaled_not_clipped():
    ramp = np.linspace(0, 60000, 64, dtype=np.uint16).reshape(8, 8)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.min() == 0 and rgb.max() == 255


def test_hold_out_splits_a_folder_into_disjoint_seeded_parts(tmp_path):
    for index in range(10):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")
    folder = ImageFolder(tmp_path, limit=3, seed=4)
    rest, held_out = folder.hold_out(4)
    assert len(held_out.files) == 4 and len(rest.files) == 6 and rest.limit == 3
    assert set(rest.files).isdisjoint(held_out.files) and set(rest.files) | set(held_out.files) == set(folder.files)
    again_rest, again_held_out = ImageFolder(tmp_path, seed=4).hold_out(4)
    assert again_held_out.files == held_out.files and again_rest.files == rest.files
    assert ImageFolder(tmp_path, seed=5).hold_out(4)[1].files != held_out.files
    assert len(folder.hold_out(100)[1].files) == 5                       # at most half
    single = tmp_path / "single"
    single.mkdir()
    Image.new("RGB", (8, 8)).save(single / "only.png")
    only = ImageFolder(single)
    assert only.hold_out(4) == (only, None)                              # nothing can be held out


def test_the_first_skipped_files_are_named_then_only_counted(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    for index in range(8):
        (tmp_path / f"bad{index}.txt").write_text("x")
    folder = ImageFolder(tmp_path)
    with caplog.at_level("WARNING", logger="test_time_registers.data.sources"):
        assert len(list(folder)) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert [m.split(":")[0] for m in messages[:5]] == [f"skipped bad{index}.txt" for index in range(5)]
    assert len(messages) == 6 and messages[5].startswith("skipping more unreadable files")
    assert folder.skipped == 8
