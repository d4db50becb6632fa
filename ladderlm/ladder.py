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


def slot_masks(positions: Tensor, n_known: int, n_step: int, first: Tensor | int = 0) -> tuple[Tensor, Tensor]:
    """Masks over the slots at `positions` when tokens first..n_known-1 are known.

    real:  (P, S) the slot holds a known token (the training mask: first <= p - s < n_known);
           (B, P, S) when `first` is a per-row (B,) tensor, as for left-padded rows.
    given: (P, S) the slot is an input, a known token or a left pad (the generation mask:
           p - s < n_known). The other slots hold tokens not emitted yet: the sampler fills
           them from the model's outputs.
    """
    return masks_of(slot_tokens(positions, n_step), n_known, first)


def masks_of(j: Tensor, n_known: int, first: Tensor | int = 0) -> tuple[Tensor, Tensor]:
    """`slot_masks` from the slots' token indices j (P, S)."""
    first = first[:, None, None] if isinstance(first, Tensor) else first
    return (j >= first) & (j < n_known), j < n_known


def tilt(x: Tensor) -> Tensor:
    """Token-major (B, t + 2(S-1), S, ...) -> ladder (B, t + S - 1, S, ...): out[:, p, s] = x[:, p + S-1-s, s]."""
    S = x.shape[2]
    p = torch.arange(x.shape[1] - (S - 1), device=x.device)[:, None]
    s = torch.arange(S, device=x.device)
    return x[:, p + S - 1 - s, s]


def untilt(y: Tensor) -> Tensor:
    """Inverse of `tilt`: ladder (B, L, S, ...) -> token-major (B, L + S - 1, S, ...), zeros where no slot maps."""
    L, S = y.shape[1], y.shape[2]
    q = torch.arange(L + S - 1, device=y.device)[:, None]
    src = q - (S - 1) + torch.arange(S, device=y.device)  # (L + S - 1, S) ladder position of each entry
    inside = (src >= 0) & (src < L)
    out = y[:, src.clamp(0, L - 1), torch.arange(S, device=y.device)]
    return out * inside.view(1, *inside.shape, *([1] * (y.dim() - 3))).to(y.dtype)


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


def independent_noise(draws: Tensor) -> Tensor:
    """i.i.d. unit Gaussian noise per slot from draws (B, P, S-1, E); zero on the clean rung."""
    return torch.nn.functional.pad(draws, (0, 0, 0, 1))


def orthogonal_noise(emb: Tensor, draws: Tensor) -> Tensor:
    """LayerNorm-space noise: centred, orthogonal to the centred embedding, and of its norm.

    Then sqrt(a) e + sqrt(1 - a) eps has the norm of e after centring, so after the input
    LayerNorm the slot's cosine with its clean token is exactly sqrt(alpha).
    emb: (B, P, S, E); draws: (B, P, S-1, E) unit Gaussians for the noisy rungs.
    """
    e = emb - emb.mean(-1, keepdim=True)
    eps = independent_noise(draws)
    eps = eps - eps.mean(-1, keepdim=True)
    unit_e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    eps = eps - (eps * unit_e).sum(-1, keepdim=True) * unit_e
    return eps * (e.norm(dim=-1, keepdim=True) / eps.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def slot_signal(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per-rung (sqrt(alpha), sqrt(1 - alpha)) shaped to broadcast over (B, P, S, E)."""
    return alpha.sqrt()[:, None], (1.0 - alpha).clamp_min(0).sqrt()[:, None]
