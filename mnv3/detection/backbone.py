"""MobileNetV3-Large features + a two-input FPN, as used by the Faster R-CNN detectors.

Both FPN inputs (features 13 and 16) are at stride 32; a stride-2 max pool of the last
FPN output adds a third map ("pool"). Module names give torchvision's state_dict keys:
``body.<i>.*`` for the features, ``fpn.inner_blocks.<i>.0.*``, ``fpn.layer_blocks.<i>.0.*``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from mnv3.layers import ConvNormActivation

# Indices in MobileNetV3-Large ``features`` where a new stage starts (plus the last layer).
LARGE_STAGE_INDICES = (0, 2, 4, 7, 13, 16)


class FeaturePyramid(nn.Module):
    """Top-down FPN: 1x1 lateral convs, nearest upsampling + add, 3x3 output convs.

    Returns the maps in input order, followed by ``pool`` (max pool, kernel 1, stride 2).
    """

    def __init__(self, in_channels_list: list[int], out_channels: int) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for in_ch in in_channels_list:
            if in_ch == 0:
                raise ValueError("in_channels=0 is not supported by this FPN")
            self.inner_blocks.append(ConvNormActivation(in_ch, out_channels, 1, padding=0,
                                                        norm_layer=None, activation_layer=None))
            self.layer_blocks.append(ConvNormActivation(out_channels, out_channels, 3,
                                                        norm_layer=None, activation_layer=None))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Old checkpoints name the convs ``inner_blocks.<i>.weight``; today's add ``.0``.
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(len(self.inner_blocks)):
                for kind in ("weight", "bias"):
                    old = f"{prefix}{block}.{i}.{kind}"
                    if old in state_dict:
                        state_dict[f"{prefix}{block}.{i}.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        names.append("pool")
        results.append(F.max_pool2d(results[-1], 1, 2, 0))
        return OrderedDict(zip(names, results))


class BackboneWithFPN(nn.Module):
    """Run ``body`` (an nn.Sequential of feature layers), tap ``return_layers``, apply the FPN."""

    def __init__(self, features: nn.Sequential, return_layers: dict[str, str], in_channels_list: list[int],
                 out_channels: int) -> None:
        super().__init__()
        last = max(int(k) for k in return_layers)
        self.body = nn.Sequential(*list(features.children())[:last + 1])
        self.return_layers = dict(return_layers)
        self.fpn = FeaturePyramid(in_channels_list, out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        taps: OrderedDict[str, Tensor] = OrderedDict()
        for name, layer in self.body.named_children():
            x = layer(x)
            if name in self.return_layers:
                taps[self.return_layers[name]] = x
        return self.fpn(taps)


def mobilenet_fpn_extractor(features: nn.Sequential, trainable_layers: int, out_channels: int = 256,
                            stage_indices: tuple[int, ...] = LARGE_STAGE_INDICES) -> BackboneWithFPN:
    """FPN over the last two stages of a MobileNetV3 ``features``.

    All but the last ``trainable_layers`` stages are frozen (requires_grad False).
    """
    num_stages = len(stage_indices)
    if not 0 <= trainable_layers <= num_stages:
        raise ValueError(f"trainable_layers must be in [0, {num_stages}], got {trainable_layers}")
    freeze_before = len(features) if trainable_layers == 0 else stage_indices[num_stages - trainable_layers]
    for layer in list(features)[:freeze_before]:
        for p in layer.parameters():
            p.requires_grad_(False)
    returned = [num_stages - 2, num_stages - 1]
    return_layers = {str(stage_indices[k]): str(v) for v, k in enumerate(returned)}
    in_channels_list = [features[stage_indices[i]].out_channels for i in returned]
    return BackboneWithFPN(features, return_layers, in_channels_list, out_channels)
