"""Generated scenes: 1-4 textured objects on a smooth background, with what is in them.

The scenes are data, not a model: the demo model (:mod:`test_time_registers.clip.demo`) was
built to find its register neurons on them, and evaluation and training read them as a labelled
set (:mod:`test_time_registers.data.labelled`) that knows each object's box, class, texture and
pixels. Everything derives from ``(seed, index)`` through local numpy generators: image i is the
same whatever the number of images asked for, and the global RNG states are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["SHAPES", "TEXTURES", "DemoScene", "demo_images", "demo_scenes", "iter_demo_images", "iter_demo_scenes"]


def _colour(rng: np.random.Generator) -> np.ndarray:
    """Random RGB colour in [0, 1], shape [3]."""
    return rng.uniform(0.05, 0.95, 3).astype(np.float32)


def _contrasting(rng: np.random.Generator, c: np.ndarray, min_diff: float = 0.35) -> np.ndarray:
    """A colour whose largest channel difference to ``c`` is at least ``min_diff``."""
    for _ in range(20):
        o = _colour(rng)
        if np.abs(o - c).max() >= min_diff:
            return o
    return 1.0 - c


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Smooth background [H, W, 3]: tilted two-colour gradient, gentle bowl, slow wave.

    xx: [1, W], yy: [H, 1], coordinates in [0, 1).
    """
    c0, c1 = _colour(rng), _colour(rng)
    ang = rng.uniform(0, 2 * np.pi)
    t = (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang) + 0.5
    cx, cy = rng.uniform(0, 1, 2)
    t = t + rng.uniform(-0.4, 0.4) * ((xx - cx) ** 2 + (yy - cy) ** 2)  # gentle curvature
    t = ((t - t.min()) / (t.max() - t.min()))[..., None]  # rescale, no clipping kinks
    img = c0 * (1 - t) + c1 * t
    f = rng.uniform(0.3, 1.0, 2) * rng.choice([-1, 1], 2)  # < 1 cycle per image
    wave = np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 2 * np.pi))
    amp = (rng.uniform(0, 0.06) * rng.uniform(0.5, 1, 3)).astype(np.float32)
    return (img + wave[..., None].astype(np.float32) * amp).astype(np.float32)


def _shape_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[slice, slice], int]:
    """One random shape (ellipse, box, triangle or wobbly blob).

    Returns (mask [h, w] bool, (rows, cols) slices of its bounding box in the image, its kind).
    """
    cx, cy = rng.uniform(0.12, 0.88, 2)
    r = rng.uniform(0.07, 0.22)
    ang = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.55, 1.0)
    kind = rng.integers(4)
    wob_amp = rng.uniform(-0.18, 0.18, 3)
    wob_phase = rng.uniform(0, 2 * np.pi, 3)
    ext = 1.6 * r  # bounding half-size (blobs reach 1.54 r)
    y0, y1 = max(0, int((cy - ext) * size)), min(size, int((cy + ext) * size) + 1)
    x0, x1 = max(0, int((cx - ext) * size)), min(size, int((cx + ext) * size) + 1)
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) / size - cy
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) / size - cx
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    if kind == 0:  # ellipse
        m = (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
    elif kind == 1:  # rotated box
        m = (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
    elif kind == 2:  # triangle
        m = (v >= -r * aspect) & (v <= r * aspect - 2 * aspect * np.abs(u)) & (np.abs(u) <= r)
    else:  # wobbly blob
        phi = np.arctan2(v, u)
        wob = 1 + sum(a * np.cos(k * phi + p) for a, k, p in zip(wob_amp, (2, 3, 5), wob_phase))
        m = np.hypot(u, v) <= r * wob
    return m, (slice(y0, y1), slice(x0, x1)), int(kind)


def _texture(rng: np.random.Generator, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, int]:
    """Textured fill [h, w, 3] (stripes, checkers, colour noise, blobs or dots) and its kind (see TEXTURES).

    px: [1, w], py: [h, 1], pixel coordinates (in 224-px units).
    """
    a = _colour(rng)
    b = _contrasting(rng, a)
    ang = rng.uniform(0, np.pi)
    u = px * np.cos(ang) + py * np.sin(ang)
    w = -px * np.sin(ang) + py * np.cos(ang)
    period = rng.uniform(4, 14)
    kind = rng.integers(5)
    if kind == 0:  # stripes
        m = np.sin(2 * np.pi * u / period) > 0
    elif kind == 1:  # checkers
        m = (np.floor(u / period) + np.floor(w / period)) % 2 == 0
    elif kind == 2:  # colour noise around a base colour
        n = rng.normal(0, 0.18, u.shape + (3,)).astype(np.float32)
        return np.clip(a + n, 0, 1), int(kind)
    elif kind == 3:  # blobs: thresholded sum of high-frequency waves
        f = np.zeros(u.shape, np.float32)
        for _ in range(4):
            th = rng.uniform(0, 2 * np.pi)
            k = 2 * np.pi / rng.uniform(7, 14)
            f = f + np.sin(k * (px * np.cos(th) + py * np.sin(th)) + rng.uniform(0, 2 * np.pi))
        m = f > 0
    else:  # polka dots
        gu = (u / period) % 1 - 0.5
        gw = (w / period) % 1 - 0.5
        m = gu**2 + gw**2 < rng.uniform(0.06, 0.16)
    return np.where(m[..., None], a, b), int(kind)


#: The kinds of :func:`_texture`, in its order.
TEXTURES = ("stripes", "checkers", "colour noise", "blobs", "dots")
#: The object classes of the demo scenes: the kinds of :func:`_shape_mask`, in its order.
SHAPES = ("ellipse", "box", "triangle", "blob")


@dataclass(frozen=True)
class DemoScene:
    """One generated scene and what is in it.

    ``boxes`` is [K, 4] (left, top, right, bottom in pixels, right/bottom exclusive) of the K
    objects still visible, ``labels`` [K] their classes (indices into :data:`SHAPES`), and
    ``object_mask`` [H, W] bool the pixels any object covers, and ``textures`` [K] their fills
    (indices into :data:`TEXTURES`). ``label`` is the class of the largest visible object, a
    one-label-per-image target for linear probes; ``texture_label`` is that object's fill.
    """

    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray
    object_mask: np.ndarray
    textures: np.ndarray

    def _largest(self) -> int:
        areas = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(np.argmax(areas))

    @property
    def label(self) -> int:
        return int(self.labels[self._largest()])

    @property
    def texture_label(self) -> int:
        return int(self.textures[self._largest()])


def _scene(rng: np.random.Generator, size: int) -> DemoScene:
    """One synthetic scene: 1-4 textured objects on a smooth background; later objects cover earlier ones."""
    coords = np.arange(size, dtype=np.float32)
    img = _background(rng, coords[None, :] / size, coords[:, None] / size)
    owner = np.full((size, size), -1, dtype=np.int64)        # which object each pixel shows
    kinds, fills = [], []
    for index in range(int(rng.integers(1, 5))):
        m, (rows, cols), kind = _shape_mask(rng, size)
        px = coords[None, cols] * (224 / size)
        py = coords[rows, None] * (224 / size)
        fill, texture = _texture(rng, px, py)
        img[rows, cols] = np.where(m[..., None], fill, img[rows, cols])
        owner[rows, cols] = np.where(m, index, owner[rows, cols])
        kinds.append(kind)
        fills.append(texture)
    boxes, labels, textures = [], [], []
    for index, (kind, texture) in enumerate(zip(kinds, fills)):
        ys, xs = np.nonzero(owner == index)
        if len(ys):   # an object entirely covered by later ones is not in the scene
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(kind)
            textures.append(texture)
    image = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    return DemoScene(image, np.array(boxes, dtype=np.int64).reshape(-1, 4), np.array(labels, dtype=np.int64),
                     owner >= 0, np.array(textures, dtype=np.int64))


def iter_demo_images(n: int, seed: int = 0, size: int = 224):
    """The scenes of :func:`demo_images`, generated one at a time (for runs over many images)."""
    return (_scene(np.random.default_rng([int(seed), i]), size).image for i in range(n))


def demo_images(n: int, seed: int = 0, size: int = 224) -> list[Image.Image]:
    """``n`` deterministic synthetic RGB scenes (PIL, size x size).

    Each scene has 1-4 textured objects (stripes, checkers, colour noise,
    blobs, dots) on a smooth gradient background. Image i depends only on
    (seed, i), so it is the same whatever ``n`` is.
    """
    return [scene.image for scene in iter_demo_scenes(n, seed, size)]


def iter_demo_scenes(n: int, seed: int = 0, size: int = 224) -> Iterator[DemoScene]:
    """The scenes of :func:`demo_images` with their objects' boxes, classes and mask, one at a time."""
    return (_scene(np.random.default_rng([int(seed), i]), size) for i in range(n))


def demo_scenes(n: int, seed: int = 0, size: int = 224) -> list[DemoScene]:
    """:func:`demo_images` with what is in them: each object's box and class (see :class:`DemoScene`)."""
    return list(iter_demo_scenes(n, seed, size))
