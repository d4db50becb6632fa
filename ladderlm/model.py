"""The ladder language model over any stateful backbone. With n_step = 1 it is the GPT.

Each ladder position carries S rungs of E = n_embd // S features; slot (p, s) holds token p - s.
The backbone sees the S rungs flattened to n_embd; its output y[p, s] is read per rung, and
lm_head(y[p, s]) predicts token p + 1 - s. With S = 1: one rung, no noise, y[p] -> x_{p+1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ladder
from .backbones import build_backbone
from .config import ModelConfig


class RungNorm(nn.Module):
    """LayerNorm over each rung's E features, with a weight (and bias) of its own per rung."""

    def __init__(self, n_step: int, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_step, dim))
        self.bias = nn.Parameter(torch.zeros(n_step, dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:  # (..., S, E)
        x = F.layer_norm(x, x.shape[-1:]) * self.weight
        return x if self.bias is None else x + self.bias


class LadderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_step = S = cfg.n_step
        self.rung_dim = E = cfg.n_embd // S
        self.wte = nn.Embedding(cfg.vocab_size, E)
        self.in_norm = RungNorm(S, E, cfg.bias)
        self.backbone = build_backbone(cfg, n_positions=cfg.block_size + S - 1)
        self.out_norm = RungNorm(S, E, cfg.bias)
        self.lm_head = nn.Linear(E, cfg.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        # Start the normalised inputs at GPT-2's embedding scale: at gain 1 they would swamp the
        # residual updates (std 0.02) and slow early training (val 1.96 vs 1.85 on the CPU recipe).
        nn.init.constant_(self.in_norm.weight, 0.02)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        if cfg.tie_head:
            self.lm_head.weight = self.wte.weight
        sqrt_a, sqrt_1ma = ladder.slot_signal(ladder.alpha_schedule(S))
        self.register_buffer("sqrt_alpha", sqrt_a, persistent=False)  # (S, 1)
        self.register_buffer("sqrt_one_minus_alpha", sqrt_1ma, persistent=False)

    @property
    def n_positions(self) -> int:
        return self.backbone.n_positions

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def slot_inputs(self, tokens: Tensor, positions: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalised inputs of the slots at `positions` over known `tokens` (B, n).

        Returns x (B, P, S, E) and the (P, S) mask of slots whose token lies beyond the known ones
        (the sampler fills those from the model's own outputs; in training they stay pads).
        """
        j = ladder.slot_tokens(positions, self.n_step)  # (P, S)
        n = tokens.shape[1]
        real = (j >= 0) & (j < n)
        emb = self.wte(tokens[:, j.clamp(0, n - 1)])  # (B, P, S, E)
        raw = self.sqrt_alpha * emb
        if noise is not None:
            raw = raw + self.sqrt_one_minus_alpha * noise
        return self.in_norm(raw * real[..., None]), j >= n

    def run(self, x: Tensor, state):
        """Backbone over ladder inputs (B, P, S, E) -> outputs (B, P, S, E) and the new state."""
        B, P, S, E = x.shape
        h, state = self.backbone(x.reshape(B, P, S * E), state)
        return self.out_norm(h.view(B, P, S, E)), state

    def empty_state(self, batch_size: int, device: torch.device | str | None = None):
        return self.backbone.empty_state(batch_size, device or self.wte.weight.device, self.wte.weight.dtype)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced pass over token windows idx (B, T); targets (B, T) are the next tokens.

        Returns logits (B, L, S, V) for the L = T + S - 1 ladder positions and the mean
        cross-entropy over real slots (slot (p, s) predicts token p + 1 - s).
        """
        B, T = idx.shape
        S, L = self.n_step, T + self.n_step - 1
        positions = torch.arange(L, device=idx.device)
        noise = ladder.window_sum_noise(B, L, S, self.rung_dim, generator, idx.device)
        x, _ = self.slot_inputs(idx, positions, noise)
        y, _ = self.run(x, self.empty_state(B, idx.device))
        logits = self.lm_head(y)
        if targets is None:
            return logits, None
        j = ladder.slot_tokens(positions, S)  # (L, S): slot (p, s) holds x_j and predicts targets[j]
        real = (j >= 0) & (j < T)
        slot_targets = targets[:, j.clamp(0, T - 1)].masked_fill(~real, -100)  # (B, L, S)
        loss = F.cross_entropy(logits.flatten(0, -2), slot_targets.flatten(), ignore_index=-100)
        return logits, loss

    def clean_logits(self, y: Tensor) -> Tensor:
        """Distribution over the next token to emit, from the clean rung of outputs y (..., S, E)."""
        return self.lm_head(y[..., -1, :])
