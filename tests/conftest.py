import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from test_time_registers.clip import ClipHookManager  # noqa: E402
from tests.tiny_models import clip_config  # noqa: E402
from tests.tiny_models import clip_model as build_clip  # noqa: E402

CLIP_LAYERS = 3


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """The 3-block tiny CLIP most core tests use (64 px, 16 patches, 256 neurons per block)."""
    return build_clip(seed, layers=CLIP_LAYERS)


@pytest.fixture(scope="module")
def one_thread():
    """For tests that train: on a shared 2-core machine one thread is many times faster than two fighting ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clip_model():
    return tiny_clip()


@pytest.fixture
def clip_hm(clip_model):
    return ClipHookManager(clip_model)


@pytest.fixture
def pixels():
    return torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def demo():
    from test_time_registers.clip.demo import build_demo_model, demo_images

    model, preprocess, planted = build_demo_model(seed=0)
    return model, preprocess, planted, demo_images(64, seed=0)


TINY_OPENCLIP = "ttr-test-tiny-vit"


@pytest.fixture(scope="session")
def registered_config(tmp_path_factory):
    """The name of a tiny open_clip config, registered with open_clip's factory."""
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY_OPENCLIP}.json").write_text(json.dumps(clip_config(CLIP_LAYERS)))
    open_clip.add_model_config(folder)
    return TINY_OPENCLIP
