"""How outlier-ridden a model is: patch-norm ratios and CLS attention, before and after."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import measures
from ..data.batching import batches
from ..data.sources import image_source, no_images_message
from ..errors import ImageSourceError
from ..hooks import HookManager


@dataclass
class OutlierReport:
    """Averages over images; norm ratios use each image's median patch norm.

    ``maps`` keeps per-image maps for figures: ``norms`` [N, rows, cols] at the detection
    layer and ``cls_attention`` [N, rows, cols] at the attention layer (head mean).
    """

    images: int
    max_over_median: float              # mean over images of largest / median patch norm
    worst_max_over_median: float        # the largest such ratio of any image
    cls_top_patch_attention: float | None   # CLS attention on its most-attended patch, head mean
    cls_register_attention: float | None    # CLS attention on the test-time registers, head mean
    register_over_median: float | None      # test-time register norm / median patch norm
    maps: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def measure_outliers(hook_manager: HookManager, images, preprocess: Callable | None = None, *,
                     detect_layer: int | None = None, attention_layer: int | None = None,
                     batch_size: int = 32, keep_maps: int = 0, workers: int = 0) -> OutlierReport:
    """Run ``hook_manager``'s model over ``images`` and measure the outliers at the detection layer.

    ``hook_manager`` describes the unmodified model, or is the view of a model with test-time
    registers (``ModifiedModel(...).hook_manager``), whose layout says where they are. The
    attention layer defaults to the last block. ``keep_maps`` keeps that many images' maps.
    ``workers`` DataLoader processes decode and preprocess the images.
    """
    images = image_source(images)
    layout = hook_manager.layout
    detect_layer = hook_manager.default_detect_layer if detect_layer is None else detect_layer
    attention_layer = hook_manager.num_layers - 1 if attention_layer is None else attention_layer
    has_cls = layout.num_cls > 0
    device = hook_manager.device
    # per-image sums: norm ratio, CLS top-patch attention, CLS register attention, register ratio
    sums = torch.zeros(4, dtype=torch.float32, device=device)
    worst = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    norm_maps, attention_maps = [], []
    with torch.no_grad():
        for batch in batches(images, preprocess, batch_size, hook_manager.device, hook_manager.input_dtype,
                             workers=workers):
            if not batch.names:   # every image of it was unreadable
                continue
            sites = {"residual": [detect_layer], "attention": [attention_layer] if has_cls else []}
            with hook_manager.capture(**sites) as captured:
                hook_manager.forward_images(batch.pixel_values)
            residual = captured.residual[detect_layer]                            # [B, L, D]
            patch_norms = measures.patch_norms(residual, layout)                  # [B, P]
            median = patch_norms.median(dim=1).values
            ratio = measures.max_over_median(patch_norms)
            sums[0] += ratio.sum()
            if has_cls:
                cls_row = measures.cls_row(captured.attention[attention_layer], layout).float()   # [B, H, L]
                patch_attention = measures.cls_patch_attention(captured.attention[attention_layer], layout).float()
                sums[1] += patch_attention.amax(dim=-1).mean(dim=1).sum()
                sums[2] += cls_row[:, :, layout.test_time_registers(residual.shape[1])].sum(dim=-1).mean(dim=1).sum()
            if layout.num_test_time_registers:
                sums[3] += (measures.register_norms(residual, layout).amax(dim=1) / median).sum()
            worst = torch.maximum(worst, ratio.max())
            count += len(batch.names)
            if len(norm_maps) * batch_size < keep_maps:
                grid = hook_manager.grid_shape(batch.pixel_values)
                norm_maps.append(patch_norms.reshape(-1, *grid).cpu())
                if has_cls:
                    attention_maps.append(patch_attention.mean(dim=1).reshape(-1, *grid).cpu())
    if count == 0:
        raise ImageSourceError(no_images_message(images))
    means = (sums / count).tolist()
    maps = {}
    if norm_maps:
        maps["norms"] = torch.cat(norm_maps)[:keep_maps]
    if attention_maps:
        maps["cls_attention"] = torch.cat(attention_maps)[:keep_maps]
    return OutlierReport(
        images=count,
        max_over_median=means[0],
        worst_max_over_median=float(worst),
        cls_top_patch_attention=means[1] if has_cls else None,
        cls_register_attention=means[2] if has_cls and layout.num_test_time_registers else None,
        register_over_median=means[3] if layout.num_test_time_registers else None,
        maps=maps,
    )
