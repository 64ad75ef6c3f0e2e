import json

import h5py
import numpy as np
import pytest
import torch

from test_time_registers import RegisterNeurons
from test_time_registers.analysis.activation_log import log_activations


def test_log_matches_a_capture(tmp_path, clip_hm, pixels):
    neurons = RegisterNeurons.coerce([(2, 5), (0, 9), (2, 1)])
    path = log_activations(clip_hm, pixels, neurons, tmp_path / "log.h5", batch_size=2, progress=False)
    _, cap = clip_hm.run_with_capture(pixels, neurons=[0, 2], residual=[0, 1, 2])
    with h5py.File(path, "r") as log:
        assert log.attrs["complete"] and log.attrs["images_written"] == 5
        norms = torch.from_numpy(log["patch_norms"][:])                       # [5, 3, 4, 4]
        expected = torch.stack([cap.patches("residual", layer).norm(dim=-1) for layer in range(3)], dim=1)
        torch.testing.assert_close(norms, expected.reshape(5, 3, 4, 4))
        torch.testing.assert_close(torch.from_numpy(log["prefix_norms"][:, :, 0]),
                                   torch.stack([cap.residual[layer][:, 0].norm(dim=-1) for layer in range(3)], 1))
        acts = torch.from_numpy(log["neuron_activations"][:])                   # [5, 3, 17], in ranked order
        torch.testing.assert_close(acts[:, 0], cap.neurons[2][:, :, 5])
        torch.testing.assert_close(acts[:, 1], cap.neurons[0][:, :, 9])
        torch.testing.assert_close(acts[:, 2], cap.neurons[2][:, :, 1])
        assert json.loads(log.attrs["neurons"]) == [[2, 5], [0, 9], [2, 1]]


def test_an_interrupted_run_leaves_a_readable_file(tmp_path, clip_hm):
    from PIL import Image

    def images():
        for index in range(10):
            if index == 6:
                raise KeyboardInterrupt
            yield Image.new("RGB", (64, 64), (index * 20, 0, 0))

    preprocess = lambda image: torch.zeros(3, 64, 64) + image.getpixel((0, 0))[0] / 255  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        log_activations(clip_hm, images(), [(1, 3)], tmp_path / "partial.h5", preprocess, batch_size=2,
                        progress=False)
    with h5py.File(tmp_path / "partial.h5", "r") as log:
        assert not log.attrs["complete"]
        assert log.attrs["images_written"] == 6 and log["patch_norms"].shape[0] == 6


def test_no_image_leaves_no_file_and_says_so(tmp_path, clip_hm):
    from test_time_registers import ImageSourceError

    with pytest.raises(ImageSourceError, match="no images were given"):
        log_activations(clip_hm, [], [(1, 3)], tmp_path / "none.h5", lambda image: torch.zeros(3, 64, 64),
                        progress=False)
    assert not (tmp_path / "none.h5").exists()


WRITER = """
import sys, time
import torch
from tests.conftest import tiny_clip
from test_time_registers.clip import ClipHookManager
from test_time_registers.analysis.activation_log import log_activations

def batches():
    generator = torch.Generator().manual_seed(0)
    while True:                      # until killed
        yield torch.randn(2, 3, 64, 64, generator=generator)
        time.sleep(0.02)

log_activations(ClipHookManager(tiny_clip()), batches(), [(1, 3), (2, 7)], sys.argv[1], batch_size=2,
                progress=False)
"""


def test_a_log_killed_by_sigkill_opens_the_documented_way(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_time_registers.analysis.activation_log import open_activation_log

    root = Path(__file__).resolve().parent.parent
    path = tmp_path / "killed.h5"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=root, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    written, deadline = 0, time.monotonic() + 120
    try:
        while written < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
            if process.poll() is not None:
                pytest.fail(f"the writer ended before it was killed: {process.stderr.read().decode()}")
            if path.is_file():
                try:
                    with h5py.File(path, "r", swmr=True) as log:   # a reader while the writer runs
                        written = int(log.attrs["images_written"])
                except (OSError, KeyError):   # between the file's creation and its first flush
                    continue
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL and written >= 8
    with h5py.File(path, "r", swmr=True) as log:                 # the way the README gives
        assert not log.attrs["complete"] and log["patch_norms"].shape[0] >= 8
    with open_activation_log(path) as log:                      # the library's checked reader
        assert not log.complete and log.images >= 8 and log.grid == (4, 4)
        assert log.neurons == [(1, 3), (2, 7)] and log.names()[:2] == ["image_0", "image_1"]
        norms, activations = log.patch_norms(), log.neuron_activations()
        assert norms.shape == (log.images, 3, 4, 4) and activations.shape == (log.images, 2, 17)
        assert bool(torch.isfinite(norms).all()) and bool((norms > 0).all())


def test_the_checked_reader_refuses_what_is_not_a_log(tmp_path, clip_hm, pixels):
    from test_time_registers.analysis.activation_log import open_activation_log
    from test_time_registers.errors import ActivationLogError

    path = log_activations(clip_hm, pixels, [(1, 3)], tmp_path / "log.h5", batch_size=2, progress=False)
    with open_activation_log(path) as log:
        assert log.complete and log.images == 5 and log.patch_norms().shape == (5, 3, 4, 4)
    (tmp_path / "text.h5").write_text("not HDF5")
    cases = {"missing.h5": "no activation log", "text.h5": "not a readable HDF5 activation log"}
    for name, mutate, message in (
            ("neurons.h5", lambda log: log.attrs.__setitem__("neurons", "[[1, -3]]"), "attribute neurons must be"),
            ("nested.h5", lambda log: log.attrs.__setitem__("neurons", "[" * 100), "nests JSON"),
            ("threshold.h5", lambda log: log.attrs.__setitem__("threshold", -1.0), "attribute threshold must be"),
            ("count.h5", lambda log: log.attrs.__setitem__("images_written", 99), "attribute images_written must be"),
            ("lacks.h5", lambda log: log.attrs.__delitem__("model"), "lack model"),
            ("shape.h5", lambda log: (log.__delitem__("prefix_norms"),
                                      log.create_dataset("prefix_norms", data=np.zeros((5, 3, 9), "float32"))),
             "dataset prefix_norms must be"),
            ("dataset.h5", lambda log: log.__delitem__("names"), "the datasets must be")):
        (tmp_path / name).write_bytes(path.read_bytes())
        with h5py.File(tmp_path / name, "a") as log:
            mutate(log)
        cases[name] = message
    for name, message in cases.items():
        with pytest.raises(ActivationLogError, match=message) as raised:
            with open_activation_log(tmp_path / name):
                pass
        assert name in str(raised.value) and "\n" not in str(raised.value)
