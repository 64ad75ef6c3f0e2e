"""SYNTHETIC demo model: a small open_clip ViT with a hand-planted register-neuron circuit.

No pretrained weights can be downloaded offline, so this module builds a tiny
``open_clip.CLIP`` (vision: width 192, 8 blocks, 3 heads, patch 16, 224 px,
768 MLP neurons per block; text: width 64, 1 block). Its weights are random
and small, except for a hand-set circuit that reproduces the high-norm
outlier ("register") tokens of Darcet et al. (ICLR 2024), written by a
sparse set of MLP register neurons as in Jiang et al. (NeurIPS 2025). It is
NOT a trained model: nothing in it means anything beyond the circuit below.
The circuit works the same in float32, bfloat16 and float16 (see "Numerics").

Stream layout. Tokens are [B, 197, 192] (CLS + 14 x 14 patches). 58 of the 192
stream channels are reserved for the circuit. Each circuit direction (names in
``_CIRCUIT_DIRS``) lives on its own reserved channel pairs (a, b) as
``sum_k c_k (e[a_k] - e[b_k])``: one pair for most directions, four pairs with
unequal weights for ``pos_pref``, ``max_u`` and ``register``. So every circuit
direction is orthogonal to the all-ones vector, and LayerNorm's mean subtraction
leaves it untouched. Random background weights may read any channel but write
only into the content subspace (zero-mean vectors on the 134 free channels):
their output rows for reserved channels are exactly zero. All LayerNorms have
weight 1 and bias 0. Every token leaves ``ln_pre`` with norm sqrt(192), so
stream values are in "ln_pre units" (about 1 per channel). On a smooth background
patch that norm is dominated by a positional part of equal size at every
position, so later LayerNorms scale all background tokens alike (to within about
1%; ``DRIFT`` holds the typical scale), and circuit values read through any
LayerNorm stay comparable between tokens. Below, one preference step is
``delta = 0.41`` stream units.

The planted circuit, stage by stage:

* ``visual.conv1`` (patch embedding): 12 orthonormal high-pass filters write to
  the ``tex*`` directions. Each filter is orthogonal to every polynomial of
  degree <= 2 in each colour channel, so it gives ~0 on a smooth (gradient,
  gently curved) patch (|tex| < 0.1 in LN units) and a large response on
  textures and edges. The other 133 filters are random, DC-free, and write to
  the content subspace.
* ``visual.positional_embedding``: 24 randomly chosen patch positions get
  distinct preferences ``pos_pref = -0.32 * rank`` (rank 0..23, so the best
  rank has preference 0) and ``veto = -4``, an admission. All other positions,
  and CLS, carry ``veto = 4`` instead (the class embedding adds 6 more).
  ``pos_comp`` = sqrt(10^2 - pos_pref^2 - veto^2) gives every position's
  embedding the same norm. Exclusion is the default (the biases of block 3's
  key and step neurons); only an admission cancels it, so a token without a
  positional embedding (a test-time register) is excluded like CLS.
* block 0 MLP, 24 clamped texture detectors, one per filter and sign. Each is a
  pair of neurons ``GELU(h)`` and ``GELU(h - 16)``, ``h = 60 * (+-tex_i - 0.25)``,
  whose difference is exactly 0 on smooth patches (h <= -9) and saturates at
  16 once |tex_i| > 0.57. ``c_proj`` writes their sum to ``energy``: 0.125 per
  saturated detector.
* block 1 MLP, the texture flag: one more clamped pair, ``GELU(h) - GELU(h - 16)``
  with ``h = 27 * (q - 0.3)``, where q is ``energy`` counted in saturated
  detectors. It is 0 below q = 0.3 and saturated from q = 1 on, however many
  detectors fired, and is written to ``textured`` (0.5 when saturated). A
  patch's uniformity is ``u = pos_pref - 44 * delta * textured / 0.5``: every
  smooth patch scores exactly its positional preference, and textured or edge
  patches score about 44 preference steps lower, more than the whole range of
  preferences plus the selection margin.
* block 3 attention, head 0 (global max): constant query, key
  ``13 * u / delta`` (13 logits per preference step) minus 13 * 34 unless the
  position is admitted (twice that for a vetoed position, more for CLS), value ``u`` spread over all 64 head dimensions and
  scaled back to stream units. The softmax is so sharp that
  every token receives ``max_u``, the largest uniformity among the preferred
  positions. This is the global information, written (times 0.25) to ``max_u``.
* block 3 MLP, two step neurons ``GELU(z)`` and ``GELU(z - 2)``, where
  ``z = 8 * (u - max_u) / delta + 28`` (minus 8 * 32 unless admitted),
  i.e. 8 per preference rank with a margin of 3.5 ranks. Their difference is a
  clamped step, ~2 or ~0 (z is about >= +4 or <= -4; at least +-3 in practice,
  in every dtype), written to ``is_top``. It fires on the
  1-4 smooth preferred patches whose rank is within 3 of the best smooth
  patch's. The discrete ranks leave a clean gap between patches that fire and
  patches that do not.
* block 4 MLP, the PLANTED REGISTER NEURONS (4 of 768, indices spread and
  seed-dependent): ``GELU(G_k * (is_top - 0.9))``, G_k = 125-160, is ~120-160
  where the step fired and 0 elsewhere, CLS included. ``c_proj`` writes
  ``alpha_k * act`` along the fixed direction ``register``, so those patches
  reach norms of ~340 against ~15 for every other token, from block 4 to the
  last block.
* blocks 6 and 7, every head (attention sink): one head dimension has a
  constant query bias and a key that reads ``register``, so CLS and all other
  tokens put almost all their attention on the high-norm tokens. The value
  weights ignore the ``register`` channels, so the sink writes almost nothing.

With the test-time register intervention (an extra zero token appended
before ``ln_pre``; the planted activations moved to it), the patches stay
ordinary, and the extra token takes the high norm and the attention sink.

Numerics. The circuit is built to behave identically in bfloat16 and float16:

* Every vision weight is rounded to a bfloat16 value (exact in float16 as
  well), so ``model.to(torch.bfloat16)`` or ``.to(torch.float16)`` changes no
  weight; only activations are rounded.
* Nothing but the circuit writes to a reserved channel, so a circuit value that
  should be 0 (``energy``, ``textured``, ``is_top`` and ``register`` on ordinary
  tokens) is exactly 0 in every dtype: rounding noise of the background cannot
  leak into it, and the high-gain reads of these directions stay silent.
* Every clamp is a difference of two GELUs whose inputs stay in the hundreds,
  and only the texture clamps, whose exact level does not matter, reach that
  far. Decisions compare quantities whose gaps (one preference step: 13 logits,
  8 units of z) are large against bfloat16 rounding (relative 2^-9). The
  preferred ranks are few and the best rank is 0, so the typical winner has
  u ~ 0 and its comparisons involve no large numbers. Spreading ``u`` over 64
  value dimensions and ``pos_pref``/``max_u`` over 4 channel pairs averages out
  the rounding of single channels.
* Largest magnitudes (any dtype): MLP pre-activations ~600, attention logits
  ~1050, stream channels ~180 (all far inside float16's range of 65504).

Everything derives from ``seed`` through local generators. The global torch
and numpy RNG states are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Callable

import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2

# The scenes the demo model was built for are data, shared with evaluation and training.
from ..data.scenes import SHAPES, TEXTURES, DemoScene, demo_images, demo_scenes, iter_demo_images, iter_demo_scenes

__all__ = ["build_demo_model", "demo_images", "iter_demo_images", "demo_scenes", "iter_demo_scenes", "DemoScene",
           "SHAPES", "TEXTURES", "PLANTED_LAYER", "IMAGE_SIZE"]

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

ENERGY_LAYER = 0  # texture detectors (MLP)
FLAG_LAYER = 1  # texture flag (MLP)
SELECT_LAYER = 3  # global max (attention head 0) + step (MLP)
PLANTED_LAYER = 4  # register neurons (MLP)
OBJECT_LAYER = 5  # objectness (MLP)
SINK_LAYERS = (6, 7)  # attention sinks
OBJECT_ATTENTION_LAYER = 7  # CLS looks at objects (attention)
N_PLANTED = 4

# Circuit magnitudes. Embedding values are pre-ln_pre. After ln_pre every token has norm
# sqrt(WIDTH), so stream values are in "ln_pre units" (~1 per channel); weights that read the
# stream act on LayerNorm outputs, which are the stream divided by the token's std (DRIFT).
POS_RADIUS = 10.0  # norm of (pos_pref, veto, pos_comp) for every position
N_PREFERRED = 24  # positions with a distinct preference; the others carry a veto
PREF_STEP = 0.32  # preference gap between consecutive ranks (rank 0 has preference 0)
VETO = 4.0  # veto of the positions without a preference
CLS_VETO = 6.0  # extra veto in the class embedding
POS_NOISE = 4.0  # norm of the random part of each positional embedding
TEX_GAIN = 3.0  # gain of the high-pass filters
CONTENT_GAIN = 1.0  # gain of the random content filters
TEX_A = 60.0  # texture detector: GELU(TEX_A * (|tex| - TEX_T0)), clamped at TEX_CLAMP
TEX_T0 = 0.25  # smooth patches stay below |tex| ~ 0.1 (LN units)
TEX_CLAMP = 16.0
ENERGY_PER_DETECTOR = 0.125  # energy (stream units) written by one saturated detector
FLAG_Q0 = 0.3  # the flag starts at 0.3 saturated-detector equivalents ...
FLAG_CLAMP = 16.0  # ... and saturates at 1: flag = GELU(h) - GELU(h - FLAG_CLAMP)
FLAG_WRITE = 0.5  # `textured` (stream units) of a saturated flag
PENALTY_STEPS = 44.0  # uniformity penalty of a textured patch, in preference steps
# Typical std of a background token at block 1 ln_2, block 3 ln_1 and block 3 ln_2 (1 after ln_pre).
DRIFT = (1.018, 1.033, 1.037)
KEY_PER_STEP = 13.0  # global-max logit gap per preference step
KEY_VETO_STEPS = N_PREFERRED + 10  # veto, in preference steps, in the key ...
Z_VETO_STEPS = N_PREFERRED + 8  # ... and in the step neurons
MAXU_WRITE = 0.25  # max_u is stored scaled down to keep token norms tame
MARGIN_STEPS = 3.5  # selection margin in preference steps
Z_PER_STEP = 8.0  # step-neuron input per preference step
STEP_CLAMP = 2.0  # is_top = GELU(z) - GELU(z - STEP_CLAMP), in [0, ~2]
PLANTED_GAIN = (140.0, 125.0, 160.0, 135.0)  # slopes of the register neurons
PLANTED_THETA = 0.9  # is_top threshold (LN units)
PLANTED_ALPHA = (0.66, 0.55, 0.6, 0.66)  # their writes along `register`
SINK_QUERY = 2.0  # sink logit = SINK_QUERY * SINK_KEY * (register read, ~14 on outliers)
SINK_KEY = 3.5
# Outliers unlike every other token: each planted write also carries -OUTLIER_POS_COMP pos_comp and
# -OUTLIER_VETO veto per unit of `register` (about -13 and -10 stream units on an outlier).
OUTLIER_POS_COMP = 0.04
OUTLIER_VETO = 0.03
OBJECT_A = 40.0  # objectness: h = OBJECT_A * (textured / FLAG_WRITE - 0.5), clamped at FLAG_CLAMP
OBJECT_SHIFT = 17.0  # pos_comp (stream units) a textured patch loses: ~12 -> ~ -5
OBJECT_LOGIT = 3.0  # block 7: logit advantage of a textured patch over a smooth one, in every head

# random background weight scales
ATTN_IN_STD = WIDTH**-0.5
ATTN_OUT_STD = 0.012
FC_STD = WIDTH**-0.5
PROJ_STD = 0.0064

_CIRCUIT_DIRS = (
    [f"tex{i}" for i in range(N_TEX)]
    + ["energy", "textured", "pos_pref", "veto", "pos_comp", "max_u", "is_top", "register"]
)
_PAIRS = {"pos_pref": 4, "max_u": 4, "register": 4}  # channel pairs per direction (default 1)


def _randn(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    """Float64 normal samples from the local generator ``g``."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


def _stream_basis(g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Circuit directions on reserved channel pairs, and a content basis on the other channels.

    Each circuit direction is ``sum_k c_k (e[a_k] - e[b_k])`` over its own reserved channel
    pairs (a_k, b_k), a unit vector orthogonal to the all-ones vector. The content basis is
    orthonormal, zero on every reserved channel and orthogonal to the all-ones vector.

    Returns ({name: [WIDTH] unit vector}, content basis [WIDTH, n_content]).
    """
    perm = torch.randperm(WIDTH, generator=g)
    dirs, start = {}, 0
    for name in _CIRCUIT_DIRS:
        m = _PAIRS.get(name, 1)
        a, b = perm[start:start + m], perm[start + m:start + 2 * m]
        start += 2 * m
        c = torch.ones(m, dtype=torch.float64)
        if m > 1:  # unequal weights, so that bf16 rounding errors of the channels differ
            c = 0.6 + 0.8 * torch.rand(m, generator=g, dtype=torch.float64)
        c = c / (c.norm() * math.sqrt(2))
        vec = torch.zeros(WIDTH, dtype=torch.float64)
        vec[a], vec[b] = c, -c
        dirs[name] = vec
    free = perm[start:]
    a = _randn(g, len(free), len(free) - 1)
    q, _ = torch.linalg.qr(a - a.mean(0, keepdim=True))  # spans the zero-sum vectors on `free`
    content = torch.zeros(WIDTH, len(free) - 1, dtype=torch.float64)
    content[free] = q
    return dirs, content


def _highpass_filters(g: torch.Generator, n_content: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch filters on the flattened [3, 16, 16] patch (768 values).

    Returns (tex [N_TEX, 768] orthonormal, orthogonal to per-channel polynomials
    of degree <= 2; content [n_content, 768] unit rows without per-channel DC).
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
    dc_q = torch.stack(dc, 1) / PATCH  # [768, 3], orthonormal

    tex = _randn(g, 3 * PATCH * PATCH, N_TEX)
    tex = tex - poly_q @ (poly_q.T @ tex)
    tex, _ = torch.linalg.qr(tex)  # orthonormal columns
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
    d, content = _stream_basis(g)  # d[name]: [192]; content: [192, n_content]
    n_content = content.shape[1]
    keep = content @ content.T  # projector onto the content subspace; zero on reserved channels
    tex_f, content_f = _highpass_filters(g, n_content)
    tex_dirs = torch.stack([d[f"tex{i}"] for i in range(N_TEX)], 1)  # [192, 12]

    # --- patch embedding: high-pass filters -> tex, random DC-free filters -> content
    w = TEX_GAIN * tex_dirs @ tex_f + CONTENT_GAIN * content @ content_f  # [192, 768]
    v.conv1.weight.copy_(w.reshape(WIDTH, 3, PATCH, PATCH))

    # --- positional embedding [197, 192]: preference or veto + complement + random part
    rank = torch.randperm(N_PATCHES, generator=g).double()  # 0 = most preferred
    preferred = rank < N_PREFERRED
    pref = torch.zeros(N_PATCHES + 1, dtype=torch.float64)
    veto = torch.full((N_PATCHES + 1,), VETO, dtype=torch.float64)  # CLS: veto
    pref[1:] = torch.where(preferred, -PREF_STEP * rank, torch.zeros_like(rank))
    veto[1:] = torch.where(preferred, torch.full_like(rank, -VETO), torch.full_like(rank, VETO))   # -VETO: admitted
    comp = torch.sqrt(POS_RADIUS**2 - pref**2 - veto**2)
    noise = _randn(g, N_PATCHES + 1, n_content) @ content.T
    noise = POS_NOISE * noise / noise.norm(dim=1, keepdim=True)
    pos = pref[:, None] * d["pos_pref"] + veto[:, None] * d["veto"] + comp[:, None] * d["pos_comp"] + noise
    v.positional_embedding.copy_(pos)
    v.class_embedding.copy_(CLS_VETO * d["veto"] + content @ _randn(g, n_content, std=n_content**-0.5))

    # one preference step / the veto, in stream units (ln_pre scales a smooth token by ln_gain)
    ln_gain = math.sqrt(WIDTH) / math.sqrt(POS_RADIUS**2 + POS_NOISE**2)
    step, veto_s = ln_gain * PREF_STEP, ln_gain * VETO

    # --- random background blocks; outputs only into the content subspace
    for blk in v.transformer.resblocks:
        blk.attn.in_proj_weight.copy_(_randn(g, 3 * WIDTH, WIDTH, std=ATTN_IN_STD))
        blk.attn.out_proj.weight.copy_(keep @ _randn(g, WIDTH, WIDTH, std=ATTN_OUT_STD))
        blk.mlp.c_fc.weight.copy_(_randn(g, MLP_WIDTH, WIDTH, std=FC_STD))
        blk.mlp.c_proj.weight.copy_(keep @ _randn(g, WIDTH, MLP_WIDTH, std=PROJ_STD))
    v.proj.copy_(_randn(g, WIDTH, EMBED_DIM, std=WIDTH**-0.5))

    blocks = v.transformer.resblocks
    neuron_order = [torch.randperm(MLP_WIDTH, generator=g) for _ in range(LAYERS)]

    def set_neuron(layer: int, idx: int, read: torch.Tensor, bias: float, write: torch.Tensor) -> None:
        blocks[layer].mlp.c_fc.weight[idx] = read
        blocks[layer].mlp.c_fc.bias[idx] = bias
        blocks[layer].mlp.c_proj.weight[:, idx] = write

    def clamped_pair(layer: int, pair: list[int], read: torch.Tensor, bias: float, clamp: float,
                     write: torch.Tensor) -> None:
        """Two neurons writing GELU(h) - GELU(h - clamp), h = read . x + bias: 0 ... clamp."""
        set_neuron(layer, pair[0], read, bias, write)
        set_neuron(layer, pair[1], read, bias - clamp, -write)

    # --- block 0 MLP: clamped texture detectors, energy = sum of their outputs
    order = neuron_order[ENERGY_LAYER].tolist()
    k_energy = ENERGY_PER_DETECTOR / TEX_CLAMP
    for i in range(N_TEX):
        for j, s in enumerate((1.0, -1.0)):
            pair = order[4 * i + 2 * j: 4 * i + 2 * j + 2]
            clamped_pair(ENERGY_LAYER, pair, s * TEX_A * d[f"tex{i}"], -TEX_A * TEX_T0, TEX_CLAMP,
                         k_energy * d["energy"])

    # --- block 1 MLP: texture flag; h = gain * (q - FLAG_Q0), q = energy in saturated detectors
    gain = (FLAG_CLAMP + 3.0) / (1.0 - FLAG_Q0)
    read = gain * DRIFT[0] / ENERGY_PER_DETECTOR * d["energy"]
    clamped_pair(FLAG_LAYER, neuron_order[FLAG_LAYER][:2].tolist(), read, -gain * FLAG_Q0, FLAG_CLAMP,
                 FLAG_WRITE / FLAG_CLAMP * d["textured"])

    # uniformity u = preference - penalty * textured (stream units: -rank * step on smooth patches)
    unif = d["pos_pref"] - PENALTY_STEPS * step / FLAG_WRITE * d["textured"]

    # --- block 3 attention head 0: global max of u over tokens -> max_u
    attn = blocks[SELECT_LAYER].attn
    h = slice(0, HEAD_WIDTH)
    wq, wk, wv = (attn.in_proj_weight[i * WIDTH:(i + 1) * WIDTH] for i in range(3))
    bq = attn.in_proj_bias[:WIDTH]
    for m in (wq, wk, wv):
        m[h] = 0.0
    bq[0] = math.sqrt(HEAD_WIDTH)  # constant query; score = key[0]
    # Exclusion is the default (the key's bias); a preferred position's embedding (veto -VETO) cancels it, so a
    # token without a positional embedding (a test-time register) is excluded like CLS and the other positions.
    wk[0] = KEY_PER_STEP * DRIFT[1] / step * unif - KEY_PER_STEP * KEY_VETO_STEPS * DRIFT[1] / veto_s * d["veto"]
    attn.in_proj_bias[WIDTH] = -KEY_PER_STEP * KEY_VETO_STEPS
    spread = _randn(g, HEAD_WIDTH)
    spread = spread / spread.norm()  # the value is spread over all head dims: rounding errors average out
    wv[h] = DRIFT[1] * torch.outer(spread, unif)  # undo the LN scale: max_u in stream units
    attn.out_proj.weight[:, h] = MAXU_WRITE * torch.outer(d["max_u"], spread)

    # --- block 3 MLP: step neurons; z = S (u - max_u) + z0 - veto, is_top = GELU(z) - GELU(z - 2)
    s_gain = Z_PER_STEP * DRIFT[2] / step
    z_read = (s_gain * (unif - d["max_u"] / MAXU_WRITE)
              - Z_PER_STEP * Z_VETO_STEPS * DRIFT[2] / veto_s * d["veto"])
    clamped_pair(SELECT_LAYER, neuron_order[SELECT_LAYER][:2].tolist(), z_read,
                 Z_PER_STEP * (MARGIN_STEPS - Z_VETO_STEPS), STEP_CLAMP, d["is_top"])   # excluded by default, as above

    # --- block 4 MLP: planted register neurons, spread over the 768 indices
    span = MLP_WIDTH // N_PLANTED
    planted_idx = [k * span + int(torch.randint(16, span - 16, (1,), generator=g))
                   for k in range(N_PLANTED)]
    for k, idx in enumerate(planted_idx):
        gk = PLANTED_GAIN[k]
        set_neuron(PLANTED_LAYER, idx, gk * d["is_top"], -gk * PLANTED_THETA,
                   PLANTED_ALPHA[k] * (d["register"] - OUTLIER_POS_COMP * d["pos_comp"] - OUTLIER_VETO * d["veto"]))

    # --- block 5 MLP: objectness; a textured patch's pos_comp flips sign, so object and
    # background tokens point apart (as the features of trained ViTs do)
    object_read = OBJECT_A * DRIFT[2] / FLAG_WRITE * d["textured"]
    clamped_pair(OBJECT_LAYER, neuron_order[OBJECT_LAYER][:2].tolist(), object_read, -OBJECT_A * 0.5, FLAG_CLAMP,
                 -OBJECT_SHIFT / FLAG_CLAMP * d["pos_comp"])

    # --- blocks 6, 7: attention sink on tokens carrying `register`, in every head
    reg_channels = d["register"] != 0
    for layer in SINK_LAYERS:
        attn = blocks[layer].attn
        wq, wk, wv = (attn.in_proj_weight[i * WIDTH:(i + 1) * WIDTH] for i in range(3))
        bq = attn.in_proj_bias[:WIDTH]
        wv[:, reg_channels] = 0.0  # the values ignore `register`
        for head in range(WIDTH // HEAD_WIDTH):
            r = head * HEAD_WIDTH
            wq[r] = 0.0
            bq[r] = SINK_QUERY * math.sqrt(HEAD_WIDTH)
            wk[r] = SINK_KEY * d["register"]
            if layer == OBJECT_ATTENTION_LAYER:   # one more dimension: a key that prefers low pos_comp
                wq[r + 1] = 0.0
                bq[r + 1] = math.sqrt(HEAD_WIDTH)
                wk[r + 1] = -OBJECT_LOGIT * DRIFT[2] / OBJECT_SHIFT * d["pos_comp"]   # pos_comp ~12 vs ~-5

    # every vision weight is made exactly representable in bfloat16 (hence also in float16),
    # so model.to(torch.bfloat16 / torch.float16) keeps the circuit's weights unchanged
    for p in v.parameters():
        p.copy_(p.bfloat16())

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
