"""open_clip's real factory, offline, on a tiny checkpoint the test writes itself."""

import open_clip
import pytest
import torch

from test_time_registers.clip import ClipHookManager, load_openclip
from test_time_registers import ModelLoadError


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_loads_through_the_factory(tmp_path, registered_config, suffix):
    source = open_clip.create_model(registered_config)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model, preprocess, hook_manager = load_openclip(registered_config, path)
    assert isinstance(hook_manager, ClipHookManager) and hook_manager.model is model
    assert not model.training
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    pixels = preprocess(__import__("PIL.Image").Image.new("RGB", (80, 70), "white")).unsqueeze(0)
    assert pixels.shape == (1, 3, 64, 64)
    assert hook_manager.name == f"openclip:{registered_config}:{path}"


def test_missing_corrupt_unknown_and_unreachable(tmp_path, registered_config):
    with pytest.raises(ModelLoadError, match="not found"):
        load_openclip(registered_config, tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_openclip(registered_config, corrupt)
    with pytest.raises(ModelLoadError, match="unknown open_clip model"):
        load_openclip("ViT-Nope-99")
    with pytest.raises(ModelLoadError, match="cannot download open_clip ViT-B-16 .*HF_HUB_OFFLINE is set"):
        load_openclip("ViT-B-16", "laion2b_s34b_b88k")   # a real tag, but nothing can be downloaded
    with pytest.raises(ModelLoadError, match="unknown pretrained tag 'nope'.*laion2b_s34b_b88k"):
        load_openclip("ViT-B-16", "nope")
    with pytest.raises(ModelLoadError, match="no weights named for open_clip ViT-B-16.*'random'"):
        load_openclip("ViT-B-16")


class Payload:
    """Any class that is not a tensor: weights_only loading must refuse to build it."""


def test_pickled_objects_are_refused(tmp_path, registered_config):
    path = tmp_path / "pickle.pt"
    torch.save({"payload": Payload()}, path)
    with pytest.raises(ModelLoadError):
        load_openclip(registered_config, path)
