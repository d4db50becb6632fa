"""Pre-LayerNorm causal transformer with learned positions and an explicit KV cache.

State: one (keys, values) pair per layer, each (B, H, T_cached, D). The empty state has
T_cached = 0, so a parallel pass over a block and a one-position decoding step are the same call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import LadderError

KVState = tuple[tuple[Tensor, Tensor], ...]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, C = x.shape
        q, k, v = (
            z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in self.qkv(x).split(C, dim=2)
        )  # (B, H, T, D)
        past = cache[0].shape[2]
        if past:  # skip copying onto an empty cache: a training pass would pay for it every step
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        # New queries sit at positions past..past+T-1: with no past this is the ordinary causal mask;
        # one new query sees everything; otherwise the mask is offset by `past`.
        mask = None if past == 0 or T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=past == 0 and T > 1, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, cache = self.attn(self.ln_1(x), cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class AttentionBackbone(nn.Module):
    """(B, T, n_embd) -> (B, T, n_embd), continuing from a KV cache; no final norm (the LM owns it)."""

    def __init__(self, cfg: ModelConfig, n_positions: int):
        super().__init__()
        self.n_positions = n_positions
        self.n_head = cfg.n_head
        self.wpe = nn.Embedding(n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init; residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def empty_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> KVState:
        C = self.wpe.embedding_dim
        empty = torch.zeros(batch_size, self.n_head, 0, C // self.n_head, device=device, dtype=dtype)
        return tuple((empty, empty) for _ in self.blocks)

    def forward(self, x: Tensor, state: KVState) -> tuple[Tensor, KVState]:
        past, T = state[0][0].shape[2], x.shape[1]
        if past + T > self.n_positions:
            raise LadderError(f"positions {past}..{past + T - 1} run past the position table ({self.n_positions})")
        x = self.drop(x + self.wpe.weight[past : past + T])
        new_state = []
        for block, cache in zip(self.blocks, state):
            x, cache = block(x, cache)
            new_state.append(cache)
        return x, tuple(new_state)
