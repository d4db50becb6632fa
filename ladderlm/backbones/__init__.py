"""Stateful backbones: `forward(x, state) -> (y, state)` over (B, T, n_embd), with `empty_state`."""

from torch import nn

from ..config import ModelConfig
from .attention import AttentionBackbone
from .ssm import SSMBackbone


def build_backbone(cfg: ModelConfig, n_positions: int) -> nn.Module:
    return {"attention": AttentionBackbone, "ssm": SSMBackbone}[cfg.backbone](cfg, n_positions)
