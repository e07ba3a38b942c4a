"""Weight averaging: an exponential moving average of the weights, and the mean of the last K
checkpoints that improved the validation metric (the MobileNetV3 ImageNet recipe averaged 3)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn


class ModelEma:
    """EMA copy of a model: ``ema = decay * ema + (1 - decay) * weights`` after each step.

    Integer buffers (BN ``num_batches_tracked``) are copied, float buffers (BN running stats)
    averaged like the weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        own = self.module.state_dict()
        for key, value in model.state_dict().items():
            target = own[key]
            if target.is_floating_point():
                target.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(sd)


def average_state_dicts(sds: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of float tensors; integer tensors are taken from the last state_dict."""
    if not sds:
        raise ValueError("average_state_dicts needs at least one state_dict")
    out = {}
    for key, last in sds[-1].items():
        if last.is_floating_point():
            out[key] = torch.stack([sd[key].float() for sd in sds]).mean(0).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


class BestCheckpoints:
    """Keeps the state_dicts of the last ``k`` epochs whose metric improved on the best so far."""

    def __init__(self, k: int, higher_is_better: bool = True):
        self.k = k
        self.higher = higher_is_better
        self.best: float | None = None
        self.items: list[tuple[int, float, dict[str, torch.Tensor]]] = []

    def offer(self, epoch: int, score: float | None, sd: Mapping[str, torch.Tensor]) -> bool:
        """Record ``sd`` if ``score`` improves; returns whether it did."""
        if score is None or self.k <= 0:
            return False
        if self.best is not None and (score <= self.best if self.higher else score >= self.best):
            return False
        self.best = score
        self.items.append((epoch, score, {k: v.detach().clone() for k, v in sd.items()}))
        self.items = self.items[-self.k :]
        return True

    def averaged(self) -> dict[str, torch.Tensor] | None:
        return average_state_dicts([sd for _, _, sd in self.items]) if self.items else None

    def state_dict(self) -> dict:
        return {"k": self.k, "best": self.best, "items": self.items}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = state["best"]
        self.items = list(state["items"])
