import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from clip import ClipHookManager  # noqa: E402

TINY_VISION = dict(image_size=64, patch_size=16, width=64, layers=3, head_width=32, mlp_ratio=4)
TINY_TEXT = dict(context_length=8, vocab_size=100, width=32, heads=1, layers=1)


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """A real open_clip CLIP with a 3-block, 64-wide image tower (16 patches at 64 px)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.CLIP(embed_dim=32, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT).eval()


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
    from clip.demo import build_demo_model, demo_images

    model, preprocess, planted = build_demo_model(seed=0)
    return model, preprocess, planted, demo_images(64, seed=0)
