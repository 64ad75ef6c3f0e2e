"""Plant register neurons in any ViT a :class:`HookManager` describes: a controlled test bed.

A small random ViT has no high-norm outliers. :func:`plant_register_neurons` rewrites a few
MLP neurons of one block so that they act like register neurons:

* their input weights read the linear discriminant that best separates *marker* patches from
  all other patches at that block's MLP input, with a gain and bias set so that they fire only on markers;
* their output weights write one fixed direction, scaled so that marker patches leave the block
  with ``target_ratio`` times the median patch norm. A layer scale is absorbed by the
  calibration.

Marker patches are fine checkerboards aligned to the patch grid, drawn by :func:`marker_images`
into smooth scenes. Only declared sites are touched: the MLP input and output projections,
and the block outputs (read for calibration). Every architecture therefore gets the same
planted circuit, and discovery must find exactly the planted neurons in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError
from .hooks import HookManager
from .data.sources import IMAGENET_MEAN, IMAGENET_STD

MARKER_RGB = (0.95, 0.05, 0.9)        # the marker is a fine checkerboard of these two colours,
MARKER_OTHER_RGB = (0.1, 0.85, 0.2)    # which no smooth background patch resembles
#: Pre-activation of the planted neurons at the least clear marker (and minus it at the most
#: marker-like ordinary patch).
FIRING_MARGIN = 8.0


@dataclass
class MarkedImages:
    pixel_values: torch.Tensor   # [N, 3, H, W], normalised with ImageNet mean and std
    markers: torch.Tensor        # bool [N, rows, cols], the marker patches


def marker_images(count: int, image_size: int, patch_size: int, *, seed: int = 0,
                  max_markers: int = 4) -> MarkedImages:
    """Smooth scenes with 1..max_markers marker patches each, ready for the model.

    Backgrounds are per-channel linear gradients with mild noise and a few soft blobs. A marker
    fills one grid-aligned patch with a fine magenta-green checkerboard, a texture nothing else
    in the scene has.
    """
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    rows = cols = image_size // patch_size
    axis = torch.linspace(0, 1, image_size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    images = torch.empty(count, 3, image_size, image_size)
    markers = torch.zeros(count, rows, cols, dtype=torch.bool)
    checker = (torch.arange(patch_size)[:, None] // 2 + torch.arange(patch_size)[None, :] // 2) % 2   # 2-pixel squares
    marker = torch.where(checker.bool(), torch.tensor(MARKER_RGB)[:, None, None], torch.tensor(MARKER_OTHER_RGB)[:, None, None])
    for index in range(count):
        start, slope_x, slope_y = rand(3, 1, 1), rand(3, 1, 1) - 0.5, rand(3, 1, 1) - 0.5
        scene = start * 0.6 + 0.2 + slope_x * x * 0.4 + slope_y * y * 0.4
        for _ in range(int(rand(1) * 3) + 1):       # soft blobs
            centre, radius, colour = rand(2), 0.08 + rand(1) * 0.2, rand(3, 1, 1)
            weight = torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * radius ** 2))
            scene = scene * (1 - weight) + colour * weight
        scene = scene + 0.02 * torch.randn(3, image_size, image_size, generator=generator)
        cells = torch.randperm(rows * cols, generator=generator)[:1 + int(rand(1) * max_markers)]
        for cell in cells.tolist():
            row, col = divmod(cell, cols)
            markers[index, row, col] = True
            scene[:, row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size] = marker
        images[index] = scene.clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return MarkedImages((images - mean) / std, markers)


def plant_register_neurons(hook_manager: HookManager, images: MarkedImages, layer: int, count: int = 4, *,
                           target_ratio: float = 20.0, seed: int = 0) -> list[tuple[int, int]]:
    """Turn ``count`` neurons of block ``layer`` into register neurons, in place.

    Args:
        hook_manager: describes the model; its sites must declare ``mlp_inputs``. In a gated MLP
            the value and gate rows both read the planted direction, so a neuron is ``act(h) * h``: large on markers, about zero elsewhere.
        images: calibration images from :func:`marker_images`, at the model's input size.
        layer: the block whose MLP gets the planted neurons.
        count: how many neurons to plant.
        target_ratio: marker-patch norm over median patch norm at the block's output.

    Returns:
        The planted (layer, neuron) pairs, sorted.

    Raises:
        ValueError: the markers cannot be told apart from other patches at this layer, or the
            outliers do not reach 10x the median, and 3x every other patch, at the last block.
    """
    hook_manager.check_layer(layer)
    generator = torch.Generator().manual_seed(seed)
    projections, fc_out = hook_manager.mlp_input_rows(layer), hook_manager.mlp_output_projection(layer)
    fc_in = projections[0][0]
    if any(module.bias is None for module, _ in projections):
        raise NotImplementedError("planting sets a threshold through the input projections' biases, which this MLP lacks")
    width = fc_out.weight.shape[1]
    neurons = sorted(torch.randperm(width, generator=generator)[:count].tolist())
    index = torch.tensor(neurons, device=fc_in.weight.device)
    pixels = images.pixel_values.to(hook_manager.device, hook_manager.input_dtype)
    is_marker = images.markers.flatten(1).to(hook_manager.device)                # [N, P]
    layout = hook_manager.layout

    def patches(tensor):                                                        # [N, L, D] -> [N, P, D]
        return tensor[:, layout.patches(tensor.shape[1])].float()

    with torch.no_grad():
        mlp_inputs = {}
        with hook_manager.hooks() as hooks:
            hooks.on(hook_manager.site(fc_in, "input"), lambda t: mlp_inputs.__setitem__("x", t))
            hook_manager.forward_images(pixels)
        inputs = patches(mlp_inputs["x"])                                       # [N, P, D]
        direction = _discriminant(inputs[is_marker], inputs[~is_marker])
        scores = inputs @ direction                                             # [N, P]
        lowest_marker, highest_other = scores[is_marker].min(), scores[~is_marker].max()
        if lowest_marker <= highest_other:
            raise InvalidArgumentError(f"marker patches are not separable at the MLP input of layer {layer}")
        midpoint = (lowest_marker + highest_other) / 2
        gains = FIRING_MARGIN / (lowest_marker - midpoint) * (1 + 0.5 * torch.rand(count, generator=generator))
        gains = gains.to(direction.device)
        for module, offset in projections:
            module.weight[offset + index] = (gains[:, None] * direction[None, :]).to(module.weight.dtype)
            module.bias[offset + index] = (-gains * midpoint).to(module.bias.dtype)

        write = torch.randn(fc_out.weight.shape[0], generator=generator).to(direction.device)
        write = write - write.mean()
        fc_out.weight[:, index] = 0
        base = patches(hook_manager.run_with_capture(pixels, residual=[layer])[1].residual[layer])
        fc_out.weight[:, index] = (write / write.norm())[:, None].to(fc_out.weight.dtype)
        unit = patches(hook_manager.run_with_capture(pixels, residual=[layer])[1].residual[layer])
        per_unit = (unit - base).norm(dim=-1)[is_marker].min()   # the least clear marker sets the scale
        median = base.norm(dim=-1).median()
        fc_out.weight[:, index] *= float(target_ratio * median / per_unit)

        _, captured = hook_manager.run_with_capture(pixels, residual=[hook_manager.num_layers - 1])
        final = patches(captured.residual[hook_manager.num_layers - 1]).norm(dim=-1)          # [N, P]
        ratio = final / final.median(dim=1, keepdim=True).values
        weakest, strongest_other = float(ratio[is_marker].min()), float(ratio[~is_marker].max())
        if weakest < 10 or weakest < 3 * strongest_other:
            raise InvalidArgumentError(f"planted outliers did not survive to the last block (marker ratio {weakest:.1f}, "
                             f"others up to {strongest_other:.1f})")
    return [(layer, neuron) for neuron in neurons]


def _discriminant(markers: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Unit Fisher direction [D] separating two sets of vectors [N, D]: Sigma^-1 (mean difference)."""
    centred = torch.cat([markers - markers.mean(0), others - others.mean(0)])
    covariance = centred.T @ centred / len(centred)
    covariance += 1e-3 * covariance.diagonal().mean() * torch.eye(len(covariance), device=covariance.device)
    direction = torch.linalg.solve(covariance, markers.mean(0) - others.mean(0))
    return direction / direction.norm()
