"""Pre-LayerNorm causal transformer with learned positions and an explicit KV cache.

State: per layer a key/value buffer, the cached length, and per row the number of left-pad
slots. The empty state has length 0, so a parallel pass over a block and a one-position decoding
step are the same call. Left padding lets rows of different lengths share one cache: row r's
slot c sits at position c - pad[r], and its pad slots are never attended to.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import LadderError


def dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()  # no dropout call per layer when it is off


def row_pads(batch_size: int, device: torch.device | str, pad: Tensor | None) -> tuple[Tensor, bool]:
    """Left-pad slots per row (B,) on `device` (none by default) and whether any row has some."""
    ragged = pad is not None and bool(pad.any())
    return (torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)), ragged


class KVBuffer:
    """Keys and values (B, H, capacity, D) of one layer, shared by states that extend one another.

    A state of length L reads entries [:L] only. Extending writes [L:L+T] in place when L is the
    buffer's written length and there is room, so decoding copies nothing; extending an older
    state again (a branch) copies its prefix into a fresh buffer, so no state sees another's tokens.
    """

    def __init__(self, keys: Tensor, values: Tensor, written: int):
        self.keys, self.values, self.written = keys, values, written

    def extend(self, past: int, k: Tensor, v: Tensor, room: int) -> KVBuffer:
        """Append k, v (B, H, T, D) after `past` entries; a new buffer gets room for `room` entries."""
        T = k.shape[2]
        buf = self
        if buf.written != past or buf.keys.shape[2] < past + T:
            if past == 0 and room <= T:  # a pass that will not be extended (training): its keys are the buffer
                return KVBuffer(k, v, T)
            B, H, _, D = k.shape
            keys, values = k.new_empty(B, H, max(room, past + T), D), v.new_empty(B, H, max(room, past + T), D)
            keys.narrow(2, 0, past).copy_(buf.keys.narrow(2, 0, past))
            values.narrow(2, 0, past).copy_(buf.values.narrow(2, 0, past))
            buf = KVBuffer(keys, values, past)
        buf.keys.narrow(2, past, T).copy_(k)
        buf.values.narrow(2, past, T).copy_(v)
        buf.written = past + T
        return buf


class KVState(NamedTuple):
    layers: tuple[KVBuffer, ...]
    length: int  # cached positions
    pad: Tensor  # (B,) left-pad slots per row; at least one row has none
    ragged: bool  # whether any row is padded: positions and key masks are then per row
    reserve: int  # positions to make room for at the first pass (decoding follows a prefill)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: KVBuffer, past: int, room: int, key_mask: Tensor | None) -> tuple[Tensor, KVBuffer]:
        """key_mask (B, 1, T, past + T): which keys each query may see, for left-padded rows."""
        B, T, C = x.shape
        q, k, v = (
            z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in self.qkv(x).split(C, dim=2)
        )  # (B, H, T, D)
        cache = cache.extend(past, k, v, room)
        k, v = cache.keys.narrow(2, 0, past + T), cache.values.narrow(2, 0, past + T)
        # New queries sit at positions past..past+T-1: with no past this is the ordinary causal mask;
        # one new query sees everything; otherwise the mask is offset by `past`.
        if key_mask is None:
            mask = None if past == 0 or T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        else:
            mask = key_mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y)), cache


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: KVBuffer, past: int, room: int, key_mask: Tensor | None) -> tuple[Tensor, KVBuffer]:
        a, cache = self.attn(self.ln_1(x), cache, past, room, key_mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class AttentionBackbone(nn.Module):
    """(B, T, n_embd) -> (B, T, n_embd), continuing from a KV cache; no final norm (the LM owns it)."""

    def __init__(self, cfg: ModelConfig, n_positions: int):
        super().__init__()
        self.n_positions = n_positions
        self.n_head = cfg.n_head
        self.wpe = nn.Embedding(n_positions, cfg.n_embd)
        self.drop = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init; residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def empty_state(
        self,
        batch_size: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        pad: Tensor | None = None,
        reserve: int = 0,
    ) -> KVState:
        """A cache of length zero; `pad` (B,) left-pad slots per row (default none), one row with none.

        `reserve` > 0 makes the first pass allocate room for that many positions, so that the
        decoding steps after a prefill write in place; a training pass (0) copies nothing.
        """
        C = self.wpe.embedding_dim
        empty = torch.zeros(batch_size, self.n_head, 0, C // self.n_head, device=device, dtype=dtype)
        pad, ragged = row_pads(batch_size, device, pad)
        return KVState(tuple(KVBuffer(empty, empty, 0) for _ in self.blocks), 0, pad, ragged, reserve)

    def forward(self, x: Tensor, state: KVState) -> tuple[Tensor, KVState]:
        past, T = state.length, x.shape[1]
        if past + T > self.n_positions:
            raise LadderError(f"positions {past}..{past + T - 1} run past the position table ({self.n_positions})")
        key_mask = None
        if state.ragged:
            slots = torch.arange(past, past + T, device=x.device)
            pos = (slots[None] - state.pad[:, None]).clamp(min=0)  # (B, T); pad slots reuse position 0
            keys = torch.arange(past + T, device=x.device)
            # causal, never a pad key; a pad query sees itself so that no softmax row is empty
            key_mask = (keys <= slots[:, None]) & ((keys >= state.pad[:, None, None]) | (keys == slots[:, None]))
            key_mask = key_mask[:, None]  # (B, 1, T, past + T)
            x = self.drop(x + self.wpe(pos))
        else:
            x = self.drop(x + self.wpe.weight.narrow(0, past, T))
        layers = []
        room = state.reserve if past == 0 else self.n_positions
        for block, cache in zip(self.blocks, state.layers):
            x, cache = block(x, cache, past, room, key_mask)
            layers.append(cache)
        return x, state._replace(layers=tuple(layers), length=past + T)
