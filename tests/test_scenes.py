"""Generated scenes (test_time_registers.data.scenes): each object's box, class, texture and pixels."""

import numpy as np

from test_time_registers.data.scenes import SHAPES, demo_images, demo_scenes


def test_demo_scenes_know_each_objects_box_class_and_pixels():
    scenes = demo_scenes(12, seed=3, size=96)
    assert [np.asarray(s.image).tolist() for s in scenes] == [np.asarray(i).tolist() for i in demo_images(12, 3, 96)]
    for scene in scenes:
        assert scene.boxes.shape == (len(scene.labels), 4) and len(scene.labels) >= 1
        assert ((0 <= scene.labels) & (scene.labels < len(SHAPES))).all()
        inside = np.zeros_like(scene.object_mask)
        for left, top, right, bottom in scene.boxes:
            assert 0 <= left < right <= 96 and 0 <= top < bottom <= 96
            inside[top:bottom, left:right] = True
            assert scene.object_mask[top:bottom, left:right].any()
        assert not (scene.object_mask & ~inside).any()          # every object pixel lies in a box
        assert scene.label in scene.labels.tolist()
        assert scene.textures.shape == scene.labels.shape and ((0 <= scene.textures) & (scene.textures < 5)).all()
        assert scene.texture_label in scene.textures.tolist()
