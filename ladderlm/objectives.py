"""The ladder's training objectives: cross-entropy over rungs and the latent loss.

Slot (p, s) holds token j = p - s; its output y[p, s] is asked to classify token j + 1 (that is
targets[j]) and, fed back through the input norm as the sampler feeds it, to equal the next
ladder's slot x[p + 1, s], which holds that same token one rung cleaner than the input slot
x[p, s - 1] it came from. With S = 1 and no latent weight this
is the GPT's next-token cross-entropy, exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ladder
from .config import ModelConfig


def slot_targets(targets: Tensor, n_step: int) -> tuple[Tensor, Tensor]:
    """Per-slot targets (B, L, S), -100 on pads, and the (L, S) mask of real slots."""
    T = targets.shape[1]
    positions = torch.arange(T + n_step - 1, device=targets.device)
    real, _ = ladder.slot_masks(positions, T, n_step)
    j = ladder.slot_tokens(positions, n_step).clamp(0, T - 1)
    return targets[:, j].masked_fill(~real, -100), real


def slot_cross_entropy(logits: Tensor, slot_tgt: Tensor) -> Tensor:
    """(B, L, S, V) logits and (B, L, S) targets -> (B, L, S) cross-entropy, 0 on pads."""
    ce = F.cross_entropy(logits.flatten(0, -2).float(), slot_tgt.flatten(), ignore_index=-100, reduction="none")
    return ce.view(slot_tgt.shape)


def latent_errors(fed: Tensor, x: Tensor, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Squared error of fed[p, s] against the detached next slot x[p+1, s], summed over features.

    fed = in_norm(y): the outputs as the sampler feeds them back into not-yet-emitted slots.
    Returns err (B, L-1, S), the target's squared norm (B, L-1, S) and the (L-1, S) mask of
    pairs whose two slots are real.
    """
    target = x[:, 1:].detach()
    err = (fed[:, :-1] - target).pow(2).sum(-1)
    return err, target.pow(2).sum(-1), real[:-1] & real[1:]


def relative_latent_error(fed: Tensor, x: Tensor, real: Tensor) -> Tensor:
    """sum |fed[p, s] - x[p+1, s]|^2 / sum |x[p+1, s]|^2 over real pairs: independent of the input norm's scale."""
    err, ref, pairs = latent_errors(fed, x, real)
    return (err * pairs).sum() / (ref * pairs).sum().clamp_min(1e-12)


def ladder_loss(
    cfg: ModelConfig, logits: Tensor, y: Tensor, x: Tensor, targets: Tensor, alpha: Tensor, feed: Callable[[Tensor], Tensor]
) -> Tensor:
    """Weighted mean cross-entropy over real slots + latent_loss_scale * relative latent MSE of feed(y).

    logits: (B, L, S, V), or (B, L, 1, V) the clean rung's alone, all that ce_rungs = "clean" scores.
    """
    slot_tgt, real = slot_targets(targets, cfg.n_step)
    if cfg.ce_rungs == "clean" or cfg.n_step == 1:  # the clean rung's plain mean: a weight on one rung cancels
        loss = F.cross_entropy(logits[:, :, -1].flatten(0, -2).float(), slot_tgt[:, :, -1].flatten(), ignore_index=-100)
    elif cfg.ce_weighting == "uniform":  # every rung's plain mean, fused
        loss = F.cross_entropy(logits.flatten(0, -2).float(), slot_tgt.flatten(), ignore_index=-100)
    else:  # weighted by each rung's signal, mean weight 1
        w = alpha / alpha.mean() * (slot_tgt != -100)  # (B, L, S)
        loss = (slot_cross_entropy(logits, slot_tgt) * w).sum() / w.sum()
    if cfg.latent_loss_scale > 0:
        loss = loss + cfg.latent_loss_scale * relative_latent_error(feed(y), x, real)
    return loss


class LatentDynamics(nn.Module):
    """NextLat's psi: h^_{t+1} = h_t + f(LayerNorm([h_t ; e(x_{t+1})])), f a 3-layer GELU MLP."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.f = nn.Sequential(nn.Linear(2 * dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))
        nn.init.zeros_(self.f[-1].weight)  # start as the identity rollout
        nn.init.zeros_(self.f[-1].bias)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + self.f(self.norm(torch.cat([h, e], dim=-1)))


def nextlat_losses(h: Tensor, next_emb: Tensor, head: Tensor, psi: LatentDynamics, horizon: int) -> tuple[Tensor, Tensor]:
    """Next-latent SmoothL1 and KL losses of a `horizon`-step rollout with the true tokens, over all positions.

    h (B, T, C): the model's final latents, h[:, p] after reading input token p; next_emb (B, T, C):
    embeddings of the next tokens (targets), detached; head (V, C): the LM head, detached (frozen).
    Step i rolls every position p forward, h^i[:, p] = psi(h^{i-1}[:, p], next_emb[:, p+i-1]), and
    compares it with sg(h[:, p+i]): SmoothL1 on the latents, KL(p(.|sg h) || p(.|h^)) on the
    head's distributions. Gradients reach psi and, through h^0 = h, the model; never the head.
    """
    T = h.shape[1]
    true_logp = F.log_softmax(F.linear(h.detach(), head).float(), dim=-1)  # (B, T, V)
    rolled, l_h, l_kl = h, 0.0, 0.0
    for i in range(1, horizon + 1):  # one batched MLP call per rollout step, never a loop over positions
        rolled = psi(rolled[:, : T - i], next_emb[:, i - 1 : T - 1])  # (B, T - i, C)
        l_h = l_h + F.smooth_l1_loss(rolled, h[:, i:].detach())
        logq = F.log_softmax(F.linear(rolled, head).float(), dim=-1)
        l_kl = l_kl + F.kl_div(logq, true_logp[:, i:], log_target=True, reduction="none").sum(-1).mean()
    return l_h / horizon, l_kl / horizon


def ladder_rollout_losses(
    model, x: Tensor, clean: Tensor, y: Tensor, targets: Tensor, horizon: int, with_latent: bool
) -> tuple[Tensor, Tensor]:
    """NextLat for a ladder: the KL term (and optional latent regression) on a `horizon`-pass rollout.

    Compared slots: every real slot (p, s) of the window. KL(p(.|sg y[p, s]) || p(.|y^k[p, s]))
    uses the model's per-slot distribution (`model.logits`, emission head included) on the
    teacher-forced outputs (detached) and on the outputs of rollout pass k, the heads frozen
    (detached weights); the latent term is the relative error of in_norm(y^k[p, s]) against the
    true next slot x[p + 1, s]. Gradients flow through the rollout passes into the backbone, the
    norms and (through the inputs) the embeddings; never into the heads through the KL, never into
    the teacher-forced targets.
    """
    true_logp = F.log_softmax(model.logits(y.detach(), frozen=True).float(), dim=-1)  # (B, L, S, V)
    _, real = slot_targets(targets, model.n_step)
    weight = real / (real.sum() * y.shape[0])
    l_h, l_kl = torch.zeros((), device=y.device), torch.zeros((), device=y.device)
    for y_k in model.rollout(x, clean, y, horizon):
        logq = F.log_softmax(model.logits(y_k, frozen=True).float(), dim=-1)
        l_kl = l_kl + (F.kl_div(logq, true_logp, log_target=True, reduction="none").sum(-1) * weight).sum()
        if with_latent:
            l_h = l_h + relative_latent_error(model.in_norm(y_k), x, real)
    return l_h / horizon, l_kl / horizon
