"""SYNTHETIC demo model: a small open_clip ViT with a hand-planted register-neuron circuit.

No pretrained weights can be downloaded offline, so this module builds a tiny
``open_clip.CLIP`` (vision: width 192, 8 blocks, 3 heads, patch 16, 224 px,
768 MLP neurons per block; text: width 64, 1 block). Its weights are random
and small, except for a hand-set circuit that reproduces the high-norm
outlier ("register") tokens of Darcet et al. (ICLR 2024), written by a
sparse set of MLP register neurons as in Jiang et al. (NeurIPS 2025). It is
NOT a trained model: nothing in it means anything beyond the circuit below.

Stream layout. Tokens are [B, 197, 192] (CLS + 14 x 14 patches). A few
orthonormal "circuit directions" of the 192-d stream are reserved (names in
``_CIRCUIT_DIRS``). Each is orthogonal to the all-ones vector, so LayerNorm's
mean subtraction leaves it untouched. Random background weights may read these
directions but never write into them: their outputs are projected onto the
remaining "content" subspace. All LayerNorms have weight 1 and bias 0. Every
token leaves ``ln_pre`` with norm sqrt(192). On a smooth background patch
that norm is dominated by a positional part of equal size at every
position, so later LayerNorms scale all background tokens alike, and circuit
values read through any LayerNorm stay comparable between tokens.

The planted circuit, stage by stage:

* ``visual.conv1`` (patch embedding): 12 orthonormal high-pass filters write
  to the ``tex*`` directions. Each filter is orthogonal to every polynomial of
  degree <= 2 in each colour channel, so it gives ~0 on a smooth (gradient,
  gently curved) patch and a large response on textures and edges. The other
  172 filters are random, DC-free, and write to the content subspace.
* ``visual.positional_embedding``: 64 randomly chosen patch positions get
  distinct preferences ``pos_pref = -0.13 * rank`` (rank 0..63). All other
  positions, and CLS, share a low floor (-9). ``pos_comp`` =
  sqrt(10^2 - pos_pref^2) gives every position's embedding the same norm.
  ``visual.class_embedding`` carries ``cls_flag``.
* block 0 MLP, 24 texture neurons ``GELU(a*tex_i - b)`` and
  ``GELU(-a*tex_i - b)``, steep (a = 400, b = 120): they are exactly 0 while
  ``|tex_i| < 0.3`` (the noise floor of smooth patches) and grow fast beyond
  it (into the thousands on strong textures). ``c_proj`` writes their sum,
  scaled down, to ``energy``. A patch's
  uniformity is ``u = pos_pref - 2000 * energy``: every smooth patch scores
  exactly its positional preference, and textured or edge patches score far
  lower.
* block 3 attention, head 0 (global max): constant query, key
  ``80 * u - 100 * cls_flag``, value ``u``. The softmax is so sharp that every
  token receives ``max_u``, the largest patch uniformity in the image. This
  is the global information, written to ``max_u``.
* block 3 MLP, two step neurons ``GELU(z)`` and ``GELU(z - 2)``, where
  ``z = 8 * (u - max_u) / rank_step + 28 - 100 * cls_flag``, i.e. 8 per
  preference rank with a margin of 3.5 ranks. Their difference is a clamped
  step, ~2 or ~0 (z is >= +4 or <= -4), written to ``is_top``. It fires on the 1-4
  smooth patches whose preference rank is within 3 of the best smooth
  patch's. The discrete ranks leave a clean gap between patches that fire and
  patches that do not.
* block 4 MLP, the PLANTED REGISTER NEURONS (4 of 768, indices spread and
  seed-dependent): ``GELU(G_k * (is_top - 0.9))`` is ~100 where the step
  fired and 0 elsewhere, CLS included. ``c_proj`` writes ``alpha_k * act``
  along the fixed direction ``register``, so those patches reach norms of
  ~300 against ~15 for every other token, from block 4 to the last block.
* blocks 6 and 7, every head (attention sink): one head dimension has a
  constant query bias and a key that reads ``register``, so CLS and all other
  tokens put almost all their attention on the high-norm tokens. The value
  weights ignore ``register``, so the sink writes almost nothing.

With the test-time register intervention (an extra zero token appended
before ``ln_pre``; the planted activations moved to it), the patches stay
ordinary, and the extra token takes the high norm and the attention sink.

Everything derives from ``seed`` through local generators. The global torch
and numpy RNG states are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Callable

import numpy as np
import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

__all__ = ["build_demo_model", "demo_images", "PLANTED_LAYER", "IMAGE_SIZE"]

# ----------------------------------------------------------------------------- config
IMAGE_SIZE = 224
PATCH = 16
WIDTH = 192
LAYERS = 8
HEAD_WIDTH = 64  # -> 3 heads
MLP_WIDTH = 4 * WIDTH  # 768 neurons per block
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 196
EMBED_DIM = 128
N_TEX = 12  # high-pass patch filters

ENERGY_LAYER = 0  # texture energy (MLP)
SELECT_LAYER = 3  # global max (attention head 0) + step (MLP)
PLANTED_LAYER = 4  # register neurons (MLP)
SINK_LAYERS = (6, 7)  # attention sinks
N_PLANTED = 4

# circuit magnitudes. Embedding values are pre-ln_pre; weights that read the stream act on
# LayerNorm outputs ("LN units", ~1 per channel for an ordinary token).
POS_RADIUS = 10.0  # norm of (pos_pref, pos_comp) for every position
N_PREFERRED = 64  # positions with a distinct preference; the rest share the floor
PREF_STEP = 0.13  # preference gap between consecutive ranks
PREF_FLOOR = -9.0  # preference of the other positions (and CLS)
POS_NOISE = 4.0  # norm of the random part of each positional embedding
CLS_FLAG = 6.0  # size of cls_flag in the class embedding
TEX_GAIN = 3.0  # gain of the high-pass filters
CONTENT_GAIN = 1.0  # gain of the random content filters
TEX_A = 400.0  # texture neuron input scale (steep: a sharp threshold)
TEX_DEAD = 120.0  # texture neurons ignore |tex| < TEX_DEAD / TEX_A = 0.3 (noise floor)
ENERGY_K = 5e-4  # energy written per unit of texture-neuron activation
UNIF_LAM = 2000.0  # weight of energy in the uniformity score
LN_DRIFT = 1.05  # typical std of a background token at block 3 (it is 1 after ln_pre)
MAX_BETA = 80.0  # inverse temperature of the global-max head (per LN unit)
MAXU_WRITE = 0.25  # max_u is stored scaled down to keep token norms tame
MARGIN_STEPS = 3.5  # selection margin in preference steps
Z_PER_STEP = 8.0  # step-neuron input per preference step
STEP_CLAMP = 2.0  # is_top = GELU(z) - GELU(z - STEP_CLAMP), in [0, ~2]
PLANTED_GAIN = (110.0, 95.0, 125.0, 105.0)  # slopes of the register neurons
PLANTED_THETA = 0.9  # is_top threshold (LN units)
PLANTED_ALPHA = (0.8, 0.7, 0.75, 0.8)  # their writes along `register`
SINK_QUERY = 2.0  # sink logit = SINK_QUERY * SINK_KEY * (register read, ~14 on outliers)
SINK_KEY = 3.5
GAMMA_CLS = 100.0  # how strongly cls_flag vetoes selection

# random background weight scales
ATTN_IN_STD = WIDTH**-0.5
ATTN_OUT_STD = 0.012
FC_STD = WIDTH**-0.5
PROJ_STD = 0.0064

_CIRCUIT_DIRS = (
    [f"tex{i}" for i in range(N_TEX)]
    + ["energy", "pos_pref", "pos_comp", "cls_flag", "max_u", "is_top", "register"]
)


def _randn(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    """Float64 normal samples from the local generator ``g``."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


def _stream_basis(g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random orthonormal basis of the zero-mean subspace of the stream.

    Returns ({name: [WIDTH] unit vector} for the circuit directions,
    content basis [WIDTH, WIDTH - 1 - n_circuit]).
    """
    a = _randn(g, WIDTH, WIDTH)
    a[:, 0] = 1.0  # QR keeps column 0 = all-ones, the rest become orthogonal to it
    q, _ = torch.linalg.qr(a)
    q = q[:, 1:]
    dirs = {name: q[:, i] for i, name in enumerate(_CIRCUIT_DIRS)}
    return dirs, q[:, len(_CIRCUIT_DIRS):]


def _highpass_filters(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch filters on the flattened [3, 16, 16] patch (768 values).

    Returns (tex [N_TEX, 768] orthonormal, orthogonal to per-channel polynomials
    of degree <= 2; content [n, 768] unit rows without per-channel DC).
    """
    c = torch.linspace(-1, 1, PATCH, dtype=torch.float64)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    monomials = [torch.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy]
    poly, dc = [], []
    for ch in range(3):
        for k, m in enumerate(monomials):
            v = torch.zeros(3, PATCH, PATCH, dtype=torch.float64)
            v[ch] = m
            poly.append(v.flatten())
            if k == 0:
                dc.append(v.flatten())
    poly_q, _ = torch.linalg.qr(torch.stack(poly, 1))  # [768, 18]
    dc_q, _ = torch.linalg.qr(torch.stack(dc, 1))  # [768, 3]

    tex = _randn(g, 3 * PATCH * PATCH, N_TEX)
    tex = tex - poly_q @ (poly_q.T @ tex)
    tex, _ = torch.linalg.qr(tex)  # orthonormal columns
    n_content = WIDTH - 1 - len(_CIRCUIT_DIRS)
    content = _randn(g, n_content, 3 * PATCH * PATCH)
    content = content - (content @ dc_q) @ dc_q.T
    content = content / content.norm(dim=1, keepdim=True)
    return tex.T.contiguous(), content


def _new_clip() -> open_clip.CLIP:
    """Instantiate open_clip.CLIP; the global RNG state is saved and restored around it."""
    vision_cfg = open_clip.CLIPVisionCfg(
        layers=LAYERS, width=WIDTH, head_width=HEAD_WIDTH, mlp_ratio=4.0,
        patch_size=PATCH, image_size=IMAGE_SIZE,
    )
    text_cfg = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    with torch.random.fork_rng(devices=[]):  # the default inits below are all overwritten
        model = open_clip.CLIP(embed_dim=EMBED_DIM, vision_cfg=vision_cfg, text_cfg=text_cfg)
    return model


@torch.no_grad()
def _init_background(model: open_clip.CLIP, g: torch.Generator) -> None:
    """Overwrite every parameter with a seed-determined value.

    Text tower weights: normal, std 0.02. Biases: 0. LayerNorms: weight 1,
    bias 0. logit_scale: log(1 / 0.07). Vision weights: 0 here, all set by
    ``_plant_circuit``.
    """
    for name, p in model.named_parameters():
        if name == "logit_scale":
            p.fill_(math.log(1 / 0.07))
        elif name.endswith("bias") or name.startswith("visual."):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


@torch.no_grad()
def _plant_circuit(model: open_clip.CLIP, g: torch.Generator) -> list[tuple[int, int]]:
    """Set the vision tower's weights: random background + planted circuit.

    Returns the sorted planted (layer, neuron) pairs.
    """
    v = model.visual
    d, content = _stream_basis(g)  # d[name]: [192]; content: [192, 172]
    keep = content @ content.T  # [192, 192] projector onto the content subspace
    tex_f, content_f = _highpass_filters(g)  # [12, 768], [172, 768]
    tex_dirs = torch.stack([d[f"tex{i}"] for i in range(N_TEX)], 1)  # [192, 12]

    # --- patch embedding: high-pass filters -> tex, random DC-free filters -> content
    w = TEX_GAIN * tex_dirs @ tex_f + CONTENT_GAIN * content @ content_f  # [192, 768]
    v.conv1.weight.copy_(w.reshape(WIDTH, 3, PATCH, PATCH).float())

    # --- positional embedding [197, 192]: preference + complement + random part
    rank = torch.randperm(N_PATCHES, generator=g).double()  # 0 = most preferred
    pref = torch.full((N_PATCHES + 1,), PREF_FLOOR, dtype=torch.float64)  # CLS: floor
    pref[1:] = torch.where(rank < N_PREFERRED, -PREF_STEP * rank, torch.full_like(rank, PREF_FLOOR))
    comp = torch.sqrt(POS_RADIUS**2 - pref**2)
    noise = _randn(g, N_PATCHES + 1, content.shape[1]) @ content.T
    noise = POS_NOISE * noise / noise.norm(dim=1, keepdim=True)
    pos = pref[:, None] * d["pos_pref"] + comp[:, None] * d["pos_comp"] + noise
    v.positional_embedding.copy_(pos.float())
    cls = CLS_FLAG * d["cls_flag"] + content @ _randn(g, content.shape[1], std=content.shape[1] ** -0.5)
    v.class_embedding.copy_(cls.float())

    # LN-unit sizes for a background token: ln_pre maps the pre-LN norm to sqrt(WIDTH)
    ln_gain = math.sqrt(WIDTH) / math.sqrt(POS_RADIUS**2 + POS_NOISE**2)
    # one rank, in LN units at block 3 (background tokens have grown ~5% by then)
    pref_step = ln_gain * PREF_STEP / LN_DRIFT

    # --- random background blocks; outputs only into the content subspace
    for blk in v.transformer.resblocks:
        blk.attn.in_proj_weight.copy_(_randn(g, 3 * WIDTH, WIDTH, std=ATTN_IN_STD).float())
        blk.attn.out_proj.weight.copy_((keep @ _randn(g, WIDTH, WIDTH, std=ATTN_OUT_STD)).float())
        blk.mlp.c_fc.weight.copy_(_randn(g, MLP_WIDTH, WIDTH, std=FC_STD).float())
        blk.mlp.c_proj.weight.copy_((keep @ _randn(g, WIDTH, MLP_WIDTH, std=PROJ_STD)).float())
    v.proj.copy_(_randn(g, WIDTH, EMBED_DIM, std=WIDTH**-0.5).float())

    blocks = v.transformer.resblocks
    neuron_order = [torch.randperm(MLP_WIDTH, generator=g) for _ in range(LAYERS)]

    def set_neuron(layer: int, idx: int, read: torch.Tensor, bias: float, write: torch.Tensor) -> None:
        blocks[layer].mlp.c_fc.weight[idx] = read.float()
        blocks[layer].mlp.c_fc.bias[idx] = bias
        blocks[layer].mlp.c_proj.weight[:, idx] = write.float()

    # --- block 0 MLP: texture energy = K * sum_i [GELU(a t_i - b) + GELU(-a t_i - b)]
    tex_neurons = neuron_order[ENERGY_LAYER][: 2 * N_TEX].tolist()
    for i in range(N_TEX):
        for s, idx in zip((1.0, -1.0), tex_neurons[2 * i: 2 * i + 2]):
            set_neuron(ENERGY_LAYER, idx, s * TEX_A * d[f"tex{i}"], -TEX_DEAD, ENERGY_K * d["energy"])

    unif = d["pos_pref"] - UNIF_LAM * d["energy"]  # reads uniformity u (LN units)

    # --- block 3 attention head 0: global max of u over patches -> max_u
    attn = blocks[SELECT_LAYER].attn
    h = slice(0, HEAD_WIDTH)
    wq, wk, wv = (attn.in_proj_weight[i * WIDTH:(i + 1) * WIDTH] for i in range(3))
    bq = attn.in_proj_bias[:WIDTH]
    for m in (wq, wk, wv):
        m[h] = 0.0
    bq[0] = math.sqrt(HEAD_WIDTH)  # constant query; score = key[0]
    wk[0] = (MAX_BETA * unif - GAMMA_CLS * d["cls_flag"]).float()
    wv[0] = (LN_DRIFT * unif).float()  # undo the LN scale, so max_u is in stream units
    attn.out_proj.weight[:, h] = 0.0
    attn.out_proj.weight[:, 0] = (MAXU_WRITE * d["max_u"]).float()

    # --- block 3 MLP: step neurons; z = S (u - max_u + margin), is_top = GELU(z) - GELU(z - 2)
    s_gain = Z_PER_STEP / pref_step
    z_read = s_gain * (unif - d["max_u"] / MAXU_WRITE) - GAMMA_CLS * d["cls_flag"]
    z0 = Z_PER_STEP * MARGIN_STEPS
    n_on, n_clamp = neuron_order[SELECT_LAYER][:2].tolist()
    set_neuron(SELECT_LAYER, n_on, z_read, z0, d["is_top"])
    set_neuron(SELECT_LAYER, n_clamp, z_read, z0 - STEP_CLAMP, -d["is_top"])

    # --- block 4 MLP: planted register neurons, spread over the 768 indices
    span = MLP_WIDTH // N_PLANTED
    planted_idx = [k * span + int(torch.randint(16, span - 16, (1,), generator=g))
                   for k in range(N_PLANTED)]
    for k, idx in enumerate(planted_idx):
        gk = PLANTED_GAIN[k]
        set_neuron(PLANTED_LAYER, idx, gk * d["is_top"], -gk * PLANTED_THETA,
                   PLANTED_ALPHA[k] * d["register"])

    # --- blocks 6, 7: attention sink on tokens carrying `register`, in every head
    no_reg = torch.eye(WIDTH, dtype=torch.float64) - torch.outer(d["register"], d["register"])
    for layer in SINK_LAYERS:
        attn = blocks[layer].attn
        wq, wk, wv = (attn.in_proj_weight[i * WIDTH:(i + 1) * WIDTH] for i in range(3))
        bq = attn.in_proj_bias[:WIDTH]
        wv.copy_((wv.double() @ no_reg).float())
        for head in range(WIDTH // HEAD_WIDTH):
            r = head * HEAD_WIDTH
            wq[r] = 0.0
            bq[r] = SINK_QUERY * math.sqrt(HEAD_WIDTH)
            wk[r] = (SINK_KEY * d["register"]).float()

    return sorted((PLANTED_LAYER, i) for i in planted_idx)


def build_demo_model(seed: int = 0) -> tuple[open_clip.CLIP, Callable, list[tuple[int, int]]]:
    """Build the SYNTHETIC demo CLIP with a planted register-neuron circuit.

    Returns (model, preprocess, planted):
      model: ``open_clip.CLIP`` in eval mode, float32, CPU. ``model.visual``
        maps images [B, 3, 224, 224] to embeddings [B, 128]; its blocks work on
        tokens [B, 197, 192] (CLS + 14x14 patches), MLP hidden [B, 197, 768].
      preprocess: open_clip's eval transform, PIL image -> tensor [3, 224, 224].
      planted: sorted (layer, neuron) pairs of the planted register neurons.
    The same seed gives bit-identical weights.
    """
    g = torch.Generator().manual_seed(int(seed))
    model = _new_clip()
    _init_background(model, g)
    planted = _plant_circuit(model, g)
    pp_cfg = PreprocessCfg(size=IMAGE_SIZE)  # OpenAI mean/std, bicubic, shortest-side resize
    set_model_preprocess_cfg(model, asdict(pp_cfg))  # as open_clip's factory does
    model = model.float().eval()
    preprocess = image_transform_v2(pp_cfg, is_train=False)
    return model, preprocess, planted


# ----------------------------------------------------------------------------- images

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


def _shape_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """One random shape (ellipse, box, triangle or wobbly blob).

    Returns (mask [h, w] bool, (rows, cols) slices of its bounding box in the image).
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
    return m, (slice(y0, y1), slice(x0, x1))


def _texture(rng: np.random.Generator, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Textured fill [h, w, 3] (stripes, checkers, colour noise, blobs or dots).

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
        return np.clip(a + n, 0, 1)
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
    return np.where(m[..., None], a, b)


def _scene(rng: np.random.Generator, size: int) -> Image.Image:
    """One synthetic scene: 1-4 textured objects on a smooth background."""
    coords = np.arange(size, dtype=np.float32)
    img = _background(rng, coords[None, :] / size, coords[:, None] / size)
    for _ in range(int(rng.integers(1, 5))):
        m, (rows, cols) = _shape_mask(rng, size)
        px = coords[None, cols] * (224 / size)
        py = coords[rows, None] * (224 / size)
        img[rows, cols] = np.where(m[..., None], _texture(rng, px, py), img[rows, cols])
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def demo_images(n: int, seed: int = 0, size: int = 224) -> list[Image.Image]:
    """``n`` deterministic synthetic RGB scenes (PIL, size x size).

    Each scene has 1-4 textured objects (stripes, checkers, colour noise,
    blobs, dots) on a smooth gradient background. Image i depends only on
    (seed, i), so it is the same whatever ``n`` is.
    """
    return [_scene(np.random.default_rng([int(seed), i]), size) for i in range(n)]
