"""SGD or AdamW with per-group weight decay, and learning-rate schedules computed from the global step."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig
from ..methods.base import ParamGroup


def param_groups(modules: list[nn.Module], cfg: OptimConfig,
                 special: list[ParamGroup] = ()) -> list[dict[str, object]]:
    """Optimizer groups: first the rest (group 0, whose weight decay is the config's), then the method's own
    groups (their weight decay), then — when BN parameters and biases are excluded from weight decay — those.
    Parameters a method keeps out of the optimizer (``optimized=False``) and frozen ones are left out."""
    seen: set[int] = set()
    groups: list[dict[str, object]] = []
    for g in special:
        params = [p for p in g.params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in g.params)
        if g.optimized and params:
            wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
            groups.append({"params": params, "weight_decay": wd})
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if cfg.no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
    groups.insert(0, {"params": decay, "weight_decay": cfg.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(modules: list[nn.Module], cfg: OptimConfig,
                    special: list[ParamGroup] = ()) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over the modules' trainable parameters."""
    groups = param_groups(modules, cfg, special)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_at(cfg: OptimConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate at a global step: linear warm-up, then cosine / multistep / constant."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.lr * (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        span = max(epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min((epoch - cfg.warmup_epochs) / span, 1.0)))
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
