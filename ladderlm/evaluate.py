"""Evaluation over the whole validation split."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import TokenData
from .model import LadderLM
from .sampling import context_keep


def sliding_windows(n_tokens: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts and, per window, the first target it scores, following the sampler's slide.

    The first window scores its block_size targets; after a slide the sampler keeps
    context_keep(block_size) tokens, so every later window starts stride = block_size - keep on
    and scores only targets it has not scored before. Every token is scored exactly once.
    """
    keep = context_keep(block_size)
    stride = block_size - keep
    n_windows = 1 + max(0, math.ceil((n_tokens - block_size) / stride))
    starts = np.arange(n_windows) * stride
    first_scored = np.where(starts == 0, 0, keep)
    return starts, first_scored


@torch.inference_mode()
def teacher_forced_loss(
    model: LadderLM, tokens: np.ndarray, eot_id: int, batch_size: int = 32, seed: int = 0
) -> tuple[float, int]:
    """Total clean-rung NLL (nats) of `tokens` and the number scored, windows batched.

    Slot (p, S-1) holds token p - S + 1, so logits[:, S-1:, -1] score targets 0..T-1 of a window.
    """
    model.eval()
    device = model.wte.weight.device
    T, S = model.cfg.block_size, model.n_step
    starts, first_scored = sliding_windows(len(tokens), T)
    data = torch.from_numpy(tokens.astype(np.int64))
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        s = torch.from_numpy(starts[i : i + batch_size])[:, None] + torch.arange(T)  # (b, T) target indices
        window = data[s.clamp(max=len(data) - 1)]  # positions past the end repeat the last token: never scored
        scored = (s < len(data)) & (torch.arange(T) >= torch.from_numpy(first_scored[i : i + batch_size])[:, None])
        inputs = torch.cat([torch.full_like(window[:, :1], eot_id), window[:, :-1]], 1).to(device)
        targets = window.masked_fill(~scored, -100).to(device)
        logits, _ = model(inputs, generator=generator)
        nll = F.cross_entropy(logits[:, S - 1 :, -1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int(scored.sum())
    return total, count


def evaluate(model: LadderLM, data: TokenData, batch_size: int = 32) -> dict:
    total, count = teacher_forced_loss(model, np.asarray(data.val), data.tokenizer.eot_id, batch_size)
    val_loss = total / count
    return {
        "val_loss": val_loss,
        "bits_per_char": total / math.log(2) / max(1, data.meta["val_chars"]),
        "tokens": count,
    }
