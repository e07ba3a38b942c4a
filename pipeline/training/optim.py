"""Optimizers and learning-rate schedules of the torchvision MobileNetV3 recipes.

RMSProp epsilon: TensorFlow adds epsilon *inside* the square root (``g / sqrt(v + eps)``),
PyTorch outside (``g / (sqrt(v) + eps)``). A TF-style value is converted as
``eps_torch = sqrt(eps_tf)``, which matches when ``v`` is small, the regime eps exists for
(the ImageNet recipe's eps 0.0316 is sqrt(0.001)). Schedules are per iteration: a linear
warm-up from ``warmup_factor`` x lr, then step / multistep (in epochs), cosine or poly decay.
Under a time budget, cosine and poly decay follow the larger of the step fraction and the
fraction of the budget spent, so the decay ends when the budget does on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

OPTIMIZERS = ("sgd", "rmsprop")
SCHEDULES = ("step", "multistep", "cosine", "poly", "constant")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def tf_eps_to_torch(eps_tf: float) -> float:
    """RMSProp epsilon given in TensorFlow's convention (inside the sqrt) -> PyTorch's (outside)."""
    if eps_tf < 0:
        raise ValueError(f"RMSProp epsilon must be >= 0, got {eps_tf}")
    return math.sqrt(eps_tf)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__ in ("FrozenBatchNorm2d",)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    norm_weight_decay: float | None = None,
    lr_mult: dict[str, float] | None = None,
) -> list[dict]:
    """Trainable parameters split into groups: norm-layer params get ``norm_weight_decay`` when it
    is set (0.0 = no decay on norm layers); a name prefix in ``lr_mult`` scales that group's lr."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            wd = norm_weight_decay if (norm_weight_decay is not None and _is_norm(module)) else weight_decay
            mult = 1.0
            for prefix, m in (lr_mult or {}).items():
                if full.startswith(prefix) or full.startswith("module." + prefix):
                    mult = m
            groups.setdefault((wd, mult), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_mult": mult} for (wd, mult), ps in groups.items()]


def build_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float | None = None,
    eps_tf: bool = False,
    alpha: float = 0.9,
) -> torch.optim.Optimizer:
    """SGD (momentum) or RMSProp; each group's lr is ``lr * lr_mult``. ``eps_tf``: ``eps`` is TF-style."""
    for g in groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
        g.setdefault("weight_decay", weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "rmsprop":
        e = 0.0316 if eps is None else (tf_eps_to_torch(eps) if eps_tf else eps)
        return torch.optim.RMSprop(
            groups, lr=lr, alpha=alpha, eps=e, momentum=momentum, weight_decay=weight_decay
        )
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def lr_factor(
    step: int,
    *,
    schedule: str,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    step_size: int = 1,
    gamma: float = 0.1,
    milestones: Sequence[int] = (),
    power: float = 0.9,
    progress: float | None = None,
) -> float:
    """Multiplier of the base lr at iteration ``step`` (0-based); epochs are ``step // steps_per_epoch``.

    ``progress``: fraction of a time budget spent; cosine and poly use it when it is ahead of
    the step fraction.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    warm = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        warm = warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    epoch = step // max(steps_per_epoch, 1)
    if schedule == "step":
        main = gamma ** (epoch // max(step_size, 1))
    elif schedule == "multistep":
        main = gamma ** sum(1 for m in milestones if epoch >= m)
    elif schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        t = min(max(step - warmup_steps, 0) / span, 1.0)
        t = max(t, min(progress, 1.0)) if progress is not None else t
        main = 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "poly":
        t = step / max(total_steps, 1)
        t = max(t, progress) if progress is not None else t
        main = max(1.0 - t, 0.0) ** power
    else:
        main = 1.0
    return warm * main


def build_scheduler(
    optimizer: torch.optim.Optimizer, progress_fn: Callable[[], float | None] | None = None, **kwargs
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR using :func:`lr_factor` (call ``.step()`` after every optimizer step).

    ``progress_fn``: returns the fraction of the time budget spent (or None), read at every step.
    """
    def factor(step: int) -> float:
        return lr_factor(step, progress=progress_fn() if progress_fn else None, **kwargs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
