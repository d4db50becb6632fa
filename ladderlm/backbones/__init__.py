"""Stateful backbones: `forward(x, state) -> (y, state)` over (B, T, n_embd), with `empty_state`."""

from torch import nn

from ..config import ModelConfig
from .attention import AttentionBackbone


def build_backbone(cfg: ModelConfig, n_positions: int) -> nn.Module:
    return {"attention": AttentionBackbone}[cfg.backbone](cfg, n_positions)
