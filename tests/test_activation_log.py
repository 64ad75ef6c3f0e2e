import json

import h5py
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
