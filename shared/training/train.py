"""Training registers: fine-tune a pretrained model with learned registers, or train a ViT with registers from scratch.

* **Fine-tuning** (Darcet et al.'s recipe): a pretrained model gets K learned registers
  (:class:`~test_time_registers.training.registers.LearnableRegisters`); its embedding and its first
  ``freeze_layers`` blocks stay frozen, the later blocks, the final norm, the head and the
  registers train, and an optional L2 penalty pulls the trained weights towards their
  pretrained values.
* **From scratch** (VitRGTS): a timm ``VisionTransformer(reg_tokens=K)``, its registers trained
  with it from random weights (:func:`vitrgts_to_timm` maps VitRGTS's hyper-parameters).

Objectives: ``classify``, cross-entropy with the model's own head (timm) or a new linear head
on its pooled output; ``distill``, for models without labels (CLIP, DINOv2): the registered
model's patch tokens at the last block and its pooled output are pulled, by cosine distance,
towards those of a frozen copy of the original model.

The images are :class:`~test_time_registers.data.labelled.LabelledImages` (a class folder, CIFAR,
generated scenes). Under torchrun, :func:`train` wraps the model in ``DistributedDataParallel`` (gloo on the CPU,
NCCL on CUDA): each rank reads its shard of the images (``DistributedSampler``), and gradients
are averaged over ranks, so every rank ends with the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from .. import measures
from ..data.labelled import LabelledImages
from ..distributed import all_reduce, current_shard, is_distributed
from ..errors import InvalidArgumentError, NonFiniteLossError, check_int
from ..hooks import HookManager, HookSite
from ..loading import LoadedModel
from ..registry import load_model
from .registers import LearnableRegisters, RegisteredModel, pooled_output

log = logging.getLogger(__name__)

OBJECTIVES = ("classify", "distill")



NEEDS_CLASSES = ("classification needs images of at least 2 classes, every one labelled (a folder with one "
                 "sub-folder per class and no images beside them); without labels, distill")

#: VitRGTS's hyper-parameters -> timm ``VisionTransformer`` arguments (``mlp_dim`` becomes ``mlp_ratio = mlp_dim / dim``;
#: ``dropout`` is both timm's projection and attention dropout).
VITRGTS_TO_TIMM = {
    "image_size": ("img_size",),
    "patch_size": ("patch_size",),
    "num_classes": ("num_classes",),
    "dim": ("embed_dim",),
    "depth": ("depth",),
    "heads": ("num_heads",),
    "mlp_dim": ("mlp_ratio",),
    "dropout": ("proj_drop_rate", "attn_drop_rate"),
    "emb_dropout": ("pos_drop_rate",),
}
_INTEGER_KEYS = ("image_size", "patch_size", "num_classes", "dim", "depth", "heads", "mlp_dim")


def vitrgts_to_timm(config: dict) -> dict:
    """timm ``VisionTransformer`` arguments for VitRGTS hyper-parameters (any subset of :data:`VITRGTS_TO_TIMM`).

    Registers and CLS get no position embedding (``no_embed_class=True``), as in Darcet et al.
    and VitRGTS; the registers themselves are ``reg_tokens``, which the caller sets.
    """
    unknown = sorted(set(config) - set(VITRGTS_TO_TIMM))
    if unknown:
        raise InvalidArgumentError(f"unknown VitRGTS hyper-parameter(s) {', '.join(unknown)}; "
                                   f"known: {', '.join(VITRGTS_TO_TIMM)}")
    for key, value in config.items():
        if key in _INTEGER_KEYS:
            check_int(key, value)
        elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
            raise InvalidArgumentError(f"{key} must be a rate in [0, 1), got {value!r}")
    if "mlp_dim" in config and "dim" not in config:
        raise InvalidArgumentError("mlp_dim needs dim too: timm takes the MLP width as mlp_ratio = mlp_dim / dim")
    if "dim" in config and "heads" in config and config["dim"] % config["heads"]:
        raise InvalidArgumentError(f"dim={config['dim']} must be divisible by heads={config['heads']}")
    kwargs: dict = {"no_embed_class": True}
    for key, value in config.items():
        for argument in VITRGTS_TO_TIMM[key]:
            kwargs[argument] = value / config["dim"] if key == "mlp_dim" else value
    return kwargs


# ---------------------------------------------------------------------------- what trains

@dataclass
class ParameterPlan:
    """Which tensors of a :class:`RegisteredModel` train (names in its ``named_parameters()``).

    ``anchored`` are the trainable pretrained weights that the L2 penalty pulls towards their
    starting values (not the registers and new heads, which have none).
    """

    trainable: list[str]
    frozen: list[str]
    anchored: list[str] = field(default_factory=list)

    def apply(self, registered: RegisteredModel) -> None:
        """Set ``requires_grad`` on every parameter to match the plan."""
        trainable = set(self.trainable)
        for name, parameter in registered.named_parameters():
            parameter.requires_grad_(name in trainable)


def image_path_parameters(hook_manager: HookManager, pixels: torch.Tensor) -> tuple[set[str], set[str]]:
    """``(embedding, used)``: the parameters (names in ``hook_manager.model``) that the input of block 0
    depends on, and those that the pooled output or the last block's output depends on.

    Found by autograd on one image of ``pixels`` [B, 3, H, W], so it holds for any architecture:
    the embedding is the patch embedding, position embedding, class and trained-register tokens
    and any pre-norm; parameters used by neither (a CLIP text tower) are in neither set.
    """
    named = dict(hook_manager.model.named_parameters())
    saved = {name: parameter.requires_grad for name, parameter in named.items()}
    kept: dict[str, torch.Tensor] = {}
    try:
        for parameter in named.values():
            parameter.requires_grad_(True)
        with torch.enable_grad(), hook_manager.hooks() as hooks:
            hooks.on(HookSite(hook_manager.blocks[0], "input"), lambda tokens: kept.setdefault("embedding", tokens))
            hooks.on_block_output(hook_manager.num_layers - 1, lambda tokens: kept.setdefault("last", tokens))
            output = pooled_output(hook_manager.forward_images(pixels[:1]), hook_manager.layout)
        tensors = list(named.values())
        used = torch.autograd.grad(output.float().sum() + kept["last"].float().sum(), tensors, allow_unused=True,
                                   retain_graph=True)
        embedding = torch.autograd.grad(kept["embedding"].float().sum(), tensors, allow_unused=True)
    finally:
        for name, parameter in named.items():
            parameter.requires_grad_(saved[name])
    names = list(named)
    return ({name for name, grad in zip(names, embedding) if grad is not None},
            {name for name, grad in zip(names, used) if grad is not None})


def fine_tuning_plan(registered: RegisteredModel, pixels: torch.Tensor, freeze_layers: int, *,
                     new: Sequence[str] = ()) -> ParameterPlan:
    """Freeze the embedding and blocks ``0 .. freeze_layers - 1``; train the later blocks, everything after
    them on the way to the output (final norm, projection, head), the registers and the classifier.

    ``new`` names freshly made parameters of the base model (a reset timm head): they train but
    are not anchored by the L2 penalty.
    """
    base = registered.base_hook_manager
    check_int("freeze_layers", freeze_layers, minimum=0)
    if freeze_layers > base.num_layers:
        raise InvalidArgumentError(f"freeze_layers={freeze_layers} but the model has {base.num_layers} blocks")
    embedding, used = image_path_parameters(base, pixels)
    frozen_blocks = {id(parameter) for block in base.blocks[:freeze_layers] for parameter in block.parameters()}
    named = dict(base.model.named_parameters())
    trainable_base = [name for name in named if name in used and name not in embedding
                      and id(named[name]) not in frozen_blocks]
    trainable = [f"model.{name}" for name in trainable_base]
    trainable += [name for name, parameter in registered.named_parameters()
                  if not name.startswith("model.") and parameter.numel()]
    new = set(new)
    anchored = [f"model.{name}" for name in trainable_base if f"model.{name}" not in new]
    frozen = [name for name, _ in registered.named_parameters() if name not in set(trainable)]
    return ParameterPlan(trainable, frozen, anchored)


@dataclass
class Setup:
    """A model ready to train: the registered model, what trains, and what its checkpoint must say."""

    registered: RegisteredModel
    plan: ParameterPlan
    base_model: str
    teacher: HookManager | None = None
    head_classes: int | None = None
    from_scratch: dict | None = None


def _copy_hook_manager(hook_manager: HookManager) -> HookManager:
    """A frozen copy of the model, described by a hook manager of the same class."""
    teacher = type(hook_manager)(copy.deepcopy(hook_manager.model), hook_manager.name,
                                 autocast_dtype=hook_manager.autocast_dtype)
    teacher.model.eval().requires_grad_(False)
    return teacher


def fine_tuning_setup(loaded: LoadedModel, probe: torch.Tensor, *, num_registers: int, insert_at: int = 0,
                      cls_pos: int | None = None, freeze_layers: int = 0, objective: str = "classify",
                      num_classes: int = 0, seed: int = 0) -> Setup:
    """Add learned registers to a pretrained model and decide what trains.

    Args:
        loaded: the base model, as :func:`~test_time_registers.load_model` gives it (changed in place).
        probe: a few preprocessed images [B, 3, H, W], to find which parameters are on the image path.
        objective: ``classify`` (``num_classes`` classes: timm's own head if it has that many
            outputs, else a new one; a new linear head on the pooled output for other models) or
            ``distill`` (a frozen copy of the model is the teacher).
    """
    if objective not in OBJECTIVES:
        raise InvalidArgumentError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    hook_manager = loaded.hook_manager
    model = hook_manager.model
    teacher = _copy_hook_manager(hook_manager) if objective == "distill" else None
    head_classes, new, classifier = None, [], None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        registers = LearnableRegisters.for_model(hook_manager, num_registers, insert_at=insert_at, cls_pos=cls_pos,
                                                 seed=seed)
        if objective == "classify":
            if num_classes < 2:
                raise InvalidArgumentError(NEEDS_CLASSES)
            if hasattr(model, "reset_classifier") and hasattr(model, "num_classes"):
                if model.num_classes != num_classes:
                    model.reset_classifier(num_classes)
                    head_classes = num_classes
                    new = [f"model.{name}" for name, _ in model.named_parameters() if name.startswith("head.")]
            else:
                with torch.no_grad():
                    width = pooled_output(hook_manager.forward_images(probe[:1]), hook_manager.layout).shape[-1]
                weight = hook_manager.patch_embedding.weight
                classifier = nn.Linear(width, num_classes, device=weight.device, dtype=weight.dtype)
    registered = RegisteredModel(model, hook_manager, registers, classifier)
    plan = fine_tuning_plan(registered, probe, freeze_layers, new=new)
    return Setup(registered, plan, hook_manager.name, teacher, head_classes)


def from_scratch_setup(timm_name: str, vit: dict, *, num_registers: int, num_classes: int, insert_at: int = 0,
                       cls_pos: int | None = None, device: torch.device | str = "cpu", seed: int = 0) -> tuple[LoadedModel, Setup]:
    """A timm ViT with registers from random weights: ``timm.create_model(timm_name, **vitrgts_to_timm(vit))``,
    through the registry (``load_model(f"timm:{timm_name}:random", ...)``).

    With ``insert_at=0`` the registers are timm's own ``reg_tokens=K`` (right after CLS, no
    position embedding); with ``insert_at > 0`` they are learned registers entering at that
    block. Every parameter trains.
    """
    if num_classes < 2:
        raise InvalidArgumentError(f"training from scratch classifies: {NEEDS_CLASSES}")
    if vit.get("num_classes", num_classes) != num_classes:
        raise InvalidArgumentError(f"num_classes={vit['num_classes']} but the images have {num_classes} classes")
    kwargs = {**vitrgts_to_timm(vit), "num_classes": num_classes, "reg_tokens": num_registers if insert_at == 0 else 0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded = load_model(f"timm:{timm_name}:random", device=device, seed=seed, **kwargs)
        if getattr(loaded.model, "num_reg_tokens", None) != kwargs["reg_tokens"]:   # what VisionTransformer(reg_tokens=K) has
            raise InvalidArgumentError(f"{timm_name} is a timm {type(loaded.model).__name__}, not a VisionTransformer")
        learned = 0 if insert_at == 0 else num_registers
        registers = LearnableRegisters.for_model(loaded.hook_manager, learned, insert_at=insert_at, cls_pos=cls_pos,
                                                 seed=seed)
    registered = RegisteredModel(loaded.model, loaded.hook_manager, registers)
    names = [name for name, parameter in registered.named_parameters() if parameter.numel()]
    setup = Setup(registered, ParameterPlan(names, []), loaded.hook_manager.name,
                  from_scratch={"timm_model": timm_name, "kwargs": kwargs})
    return loaded, setup


# ---------------------------------------------------------------------------- the loop

@dataclass
class TrainingOptions:
    """How :func:`train` runs. ``warmup`` is the fraction of steps with a linear learning-rate ramp;
    a cosine decay to zero follows. ``weight_decay`` is AdamW's (decoupled, towards zero)."""

    objective: str = "classify"
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    workers: int = 0
    l2_weight: float = 0.0
    weight_decay: float = 0.0
    warmup: float = 0.05
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise InvalidArgumentError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        check_int("epochs", self.epochs)
        check_int("batch_size", self.batch_size)
        check_int("workers", self.workers, minimum=0)
        for name in ("lr", "l2_weight", "weight_decay", "warmup"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidArgumentError(f"{name} must be a non-negative number, got {value!r}")
        if self.lr <= 0 or self.warmup >= 1:
            raise InvalidArgumentError("lr must be positive and warmup a fraction below 1")


@dataclass
class TrainingHistory:
    """Per epoch, the mean loss and (classification) accuracy over every rank's images; per step, this rank's loss."""

    epoch_losses: list[float] = field(default_factory=list)
    epoch_accuracy: list[float | None] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    images_per_epoch: int = 0
    seconds: float = 0.0


class _Student(nn.Module):
    """What DDP wraps: the registered model on a batch [B, 3, H, W] -> ``(logits or pooled output [B, F],
    patch tokens of the last block [B, P, D] or None)``."""

    def __init__(self, registered: RegisteredModel, want_patches: bool):
        super().__init__()
        self.registered = registered
        self.want_patches = want_patches

    def forward(self, pixels: torch.Tensor):
        hook_manager = self.registered.hook_manager
        kept: dict[str, torch.Tensor] = {}
        with hook_manager.hooks() as hooks:
            if self.want_patches:
                hooks.on_block_output(hook_manager.num_layers - 1, lambda tokens: kept.__setitem__("tokens", tokens))
            output = self.registered.pooled(hook_manager.forward_images(pixels))
        if self.registered.classifier is not None:
            output = self.registered.classifier(output)
        if not self.want_patches:
            return output, None
        tokens = kept["tokens"]
        return output, tokens[:, hook_manager.layout.patches(tokens.shape[1])]


def teacher_targets(teacher: HookManager, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's pooled output [B, F] and last-block patch tokens [B, P, D]."""
    last = teacher.num_layers - 1
    with torch.no_grad(), teacher.capture(residual=[last]) as captured:
        pooled = pooled_output(teacher.forward_images(pixels), teacher.layout)
    tokens = captured.residual[last]
    return pooled, tokens[:, teacher.layout.patches(tokens.shape[1])]


def _cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def _schedule(total_steps: int, warmup: float) -> Callable[[int], float]:
    warmup_steps = max(1, round(warmup * total_steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train(setup: Setup, data: LabelledImages, options: TrainingOptions, *,
          on_epoch: Callable[[int, float, float | None], None] | None = None) -> TrainingHistory:
    """Train ``setup.registered`` on ``data`` (preprocessed by its ``preprocess``) and return the loss curve.

    Only the plan's trainable parameters change. Under torch.distributed the model runs in
    ``DistributedDataParallel`` and each rank reads its shard; every rank returns the same history.
    ``on_epoch(epoch, loss, accuracy)`` is called after each epoch (1-based; accuracy ``None`` when distilling).
    """
    registered, plan = setup.registered, setup.plan
    if options.objective == "distill" and setup.teacher is None:
        raise InvalidArgumentError("the distill objective needs a teacher (fine_tuning_setup(objective='distill'))")
    if options.objective == "classify" and data.num_classes < 2:
        raise InvalidArgumentError(f"{NEEDS_CLASSES} ({data.description})")
    parameters = dict(registered.named_parameters())
    requires_grad = {name: parameter.requires_grad for name, parameter in parameters.items()}
    plan.apply(registered)
    trainable = [parameters[name] for name in plan.trainable]
    anchors = {name: parameters[name].detach().clone() for name in plan.anchored}
    device = registered.base_hook_manager.device

    shard = current_shard()
    generator = torch.Generator().manual_seed(options.seed)
    sampler = (DistributedSampler(data, num_replicas=shard.world, rank=shard.rank, shuffle=True, seed=options.seed)
               if is_distributed() else RandomSampler(data, generator=generator))
    loader = DataLoader(data, batch_size=options.batch_size, sampler=sampler, num_workers=options.workers,
                        persistent_workers=False)
    student = _Student(registered, want_patches=options.objective == "distill")
    runner = nn.parallel.DistributedDataParallel(student) if is_distributed() else student
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(options.epochs * len(loader), options.warmup))

    history = TrainingHistory(images_per_epoch=len(data))
    started = time.perf_counter()
    registered.train()
    try:
        for epoch in range(options.epochs):
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            totals = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, images, correct
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", unit="batch",
                       disable=not options.progress or shard.rank != 0, leave=False)
            for pixels, labels in bar:
                labels = labels.to(device)
                output, patches = runner(pixels)
                if options.objective == "classify":
                    loss = F.cross_entropy(output.float(), labels)
                    totals[2] += (output.argmax(dim=-1) == labels).sum()
                else:
                    target_pooled, target_patches = teacher_targets(setup.teacher, pixels)
                    loss = _cosine_distance(output, target_pooled) + _cosine_distance(patches, target_patches)
                if options.l2_weight and anchors:
                    loss = loss + options.l2_weight * sum((parameters[name] - anchor).float().square().sum()
                                                          for name, anchor in anchors.items())
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"the loss became {loss.item()} at epoch {epoch + 1}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                history.step_losses.append(loss.item())
                totals[0] += loss.detach() * len(pixels)
                totals[1] += len(pixels)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            all_reduce(totals)
            epoch_loss = float(totals[0] / totals[1])
            accuracy = float(totals[2] / totals[1]) if options.objective == "classify" else None
            history.epoch_losses.append(epoch_loss)
            history.epoch_accuracy.append(accuracy)
            log.info("epoch %d: loss %.4f", epoch + 1, epoch_loss)
            if on_epoch is not None:
                on_epoch(epoch + 1, epoch_loss, accuracy)
    finally:
        registered.eval()
        for name, parameter in parameters.items():
            parameter.requires_grad_(requires_grad[name])
    history.seconds = time.perf_counter() - started
    return history


def parameter_digest(registered: RegisteredModel, names: Sequence[str]) -> str:
    """A SHA-256 of the named tensors' values, to check that ranks ended with the same weights."""
    digest = hashlib.sha256()
    state = registered.state_dict()
    for name in names:
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def accuracy(registered: RegisteredModel, data: LabelledImages, *, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``registered.classify`` on labelled images."""
    correct = total = 0
    for pixels, labels in DataLoader(data, batch_size=batch_size):
        predictions = registered.classify(pixels).argmax(dim=-1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    return correct / total


def norm_statistics(hook_manager: HookManager, data: LabelledImages, *, batch_size: int = 64) -> dict:
    """Token norms at every block's output, relative to each image's median patch norm.

    Returns lists over blocks, each a mean over images unless named ``worst_``:

    * ``patch_max_over_median``, ``worst_patch_max_over_median``: the largest patch norm over the
      median one (far above 1 at some block: high-norm outlier tokens);
    * ``register_over_median``: the largest trained-register norm over the median patch norm
      (``None`` without trained registers);
    * ``cls_over_median``: the CLS norm over the median patch norm (``None`` without CLS);
    * ``cls_attention_on_registers``: the CLS token's attention on the trained registers in each
      block, summed over them, mean over heads (``None`` without both).
    """
    layers = list(range(hook_manager.num_layers))
    layout = hook_manager.layout
    keys = ("patch_max_over_median", "register_over_median", "cls_over_median", "cls_attention_on_registers")
    sums = {key: torch.zeros(len(layers), dtype=torch.float64) for key in keys}
    worst = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    attention = layers if layout.num_cls and layout.num_trained_registers else []
    with torch.no_grad():
        for pixels, _ in DataLoader(data, batch_size=batch_size):
            with hook_manager.capture(residual=layers, attention=attention) as captured:
                hook_manager.forward_images(pixels)
            for layer in layers:
                residual = captured.residual[layer]                                                # [B, L, D]
                patch_norms = measures.patch_norms(residual, layout)                               # [B, P]
                median = patch_norms.median(dim=1).values                                          # [B]
                ratios = measures.max_over_median(patch_norms)
                sums["patch_max_over_median"][layer] += ratios.sum().item()
                worst[layer] = max(float(worst[layer]), ratios.max().item())
                if layout.num_trained_registers:
                    registers = measures.register_norms(residual, layout, trained=True).amax(dim=1) / median
                    sums["register_over_median"][layer] += registers.sum().item()
                if layout.num_cls:
                    sums["cls_over_median"][layer] += (measures.cls_norms(residual, layout) / median).sum().item()
                if layer in captured.attention:
                    cls_row = measures.cls_row(captured.attention[layer], layout).float()           # [B, H, L]
                    share = cls_row[:, :, layout.trained_registers()].sum(dim=-1).mean(dim=1)
                    sums["cls_attention_on_registers"][layer] += share.sum().item()
            count += len(pixels)
    present = {"patch_max_over_median": True, "register_over_median": bool(layout.num_trained_registers),
               "cls_over_median": bool(layout.num_cls), "cls_attention_on_registers": bool(attention)}
    result = {key: (sums[key] / count).tolist() if present[key] else None for key in keys}
    result["worst_patch_max_over_median"] = worst.tolist()
    return result
