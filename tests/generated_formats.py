"""Generated datasets written in real formats, for the protocol tests (the demo's scenes, whose objects are known)."""

from pathlib import Path

import numpy as np
from PIL import Image

from test_time_registers.data.scenes import SHAPES, demo_scenes


def write_imagenet_s(root: Path, count: int, *, seed: int = 0, split: str = "validation", size: int = 224,
                     ignore_border: bool = True) -> Path:
    """ImageNet-S's layout: ``split/<class>/<name>.JPEG`` and ``split-segmentation/<class>/<name>.png`` (RGB,
    class = G * 256 + R; the objects' class is their shape's index + 1, ignored pixels (1000) ring the objects)."""
    for index, scene in enumerate(demo_scenes(count, seed, size)):
        folder = SHAPES[scene.label]
        image_path = root / split / folder / f"scene_{index:04d}.JPEG"
        mask_path = root / f"{split}-segmentation" / folder / f"scene_{index:04d}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        scene.image.save(image_path, quality=95)
        classes = np.where(scene.object_mask, scene.label + 1, 0).astype(np.int64)
        if ignore_border:   # a one-pixel ring of "ignore" around the objects, as ImageNet-S marks unsure edges
            grown = np.zeros_like(scene.object_mask)
            grown[1:] |= scene.object_mask[:-1]
            grown[:-1] |= scene.object_mask[1:]
            classes[grown & ~scene.object_mask] = 1000
        rgb = np.stack([classes % 256, classes // 256, np.zeros_like(classes)], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(mask_path)
    return root
