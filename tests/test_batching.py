"""The input pipeline (test_time_registers.data.batching): batches, shards, resumed positions and picklable readers."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from test_time_registers import ImageFolder
from test_time_registers.data.batching import Shard, batches, ordered_source
from tests.test_discovery import demo_model, scenes  # noqa: F401 - fixtures


def test_batches_stack_and_cast():
    images = [Image.new("RGB", (10, 10), "blue") for _ in range(5)]
    preprocess = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255  # noqa: E731
    sizes = [len(b.names) for b in batches(images, preprocess, 2, "cpu", torch.bfloat16)]
    assert sizes == [2, 2, 1]
    batch = next(iter(batches(torch.zeros(3, 3, 4, 4), None, 8, "cpu", torch.float16)))
    assert batch.pixel_values.dtype == torch.float16 and batch.names == ["image_0", "image_1", "image_2"]
    with pytest.raises(ValueError, match="preprocess"):
        next(iter(batches(images, None, 2, "cpu", torch.float32)))


def test_shards_cover_every_position_once(scenes, demo_model):
    seen = []
    for rank in range(3):
        for batch in batches(scenes[:10], demo_model.preprocess, 2, "cpu", torch.float32, shard=Shard(rank, 3)):
            seen += batch.positions
    assert sorted(seen) == list(range(10))
    resumed = [p for batch in batches(scenes[:10], demo_model.preprocess, 2, "cpu", torch.float32,
                                      shard=Shard(1, 3), start=2) for p in batch.positions]
    assert resumed == [7]


def test_a_stream_of_batches_resumes_inside_a_batch(demo_model, scenes):
    pixels = torch.stack([demo_model.preprocess(scene) for scene in scenes])
    stream = [pixels[start:start + 7] for start in range(0, 40, 7)]     # a list of batches streams too
    positions = [p for batch in batches(stream, None, 8, "cpu", torch.float32, start=24) for p in batch.positions]
    assert positions == list(range(24, 40))


def test_readers_can_be_sent_to_spawned_workers(tmp_path, scenes):
    scenes[0].save(tmp_path / "a.png")
    for source in (ordered_source(ImageFolder(tmp_path)), ordered_source(scenes[:3])):
        assert pickle.loads(pickle.dumps(source.read))(0).size == (224, 224)
