"""Ladder geometry: which token each slot holds, the signal schedule and the noise.

Slot (p, s) of a ladder over tokens x_0..x_{t-1} holds token p - s at rung s; rung 0 is the
noisiest, rung S-1 the clean one. With S = 1 every function here degenerates to the GPT's view
(slot p holds token p, signal 1, noise 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def slot_tokens(positions: Tensor, n_step: int) -> Tensor:
    """Token index held by each slot: (P,) positions -> (P, S) indices p - s (negative: pad)."""
    return positions[:, None] - torch.arange(n_step, device=positions.device)


def alpha_schedule(n_step: int, gamma: float = 0.0) -> Tensor:
    """Signal variance per rung: linspace(1/S, 1, S), optionally shaped by alpha^(1-gamma); clean top rung."""
    alpha = torch.linspace(1.0 / n_step, 1.0, n_step) ** (1.0 - gamma)
    alpha[-1] = 1.0
    return alpha


def window_sum_noise(
    batch: int, n_positions: int, n_step: int, dim: int, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """The seed's correlated noise: eps[p, s] = (n_p + ... + n_{p+k-1}) / sqrt(k), k = S-1-s.

    A token climbing one rung loses one increment, so its noise shrinks along one trajectory.
    Returns (B, P, S, E) with unit marginal variance; the clean rung is zero and costs nothing
    (for S = 1 no increment is drawn at all).
    """
    k = torch.arange(n_step - 1, 0, -1, device=device)  # increments per noisy rung, (S-1,)
    n_increments = n_positions + n_step - 2 if n_step > 1 else 0
    increments = torch.randn(batch, n_increments, dim, generator=generator, device=device)
    prefix = torch.nn.functional.pad(increments.cumsum(1), (0, 0, 1, 0))  # (B, n_increments + 1, E)
    p = torch.arange(n_positions, device=device)[:, None]  # (P, 1)
    window = prefix[:, p + k] - prefix[:, p.expand(-1, n_step - 1)]  # (B, P, S-1, E)
    return torch.nn.functional.pad(window / k.to(window.dtype).sqrt()[:, None], (0, 0, 0, 1))


def slot_signal(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per-rung (sqrt(alpha), sqrt(1 - alpha)) shaped to broadcast over (B, P, S, E)."""
    return alpha.sqrt()[:, None], (1.0 - alpha).clamp_min(0).sqrt()[:, None]
