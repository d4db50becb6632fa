"""Evaluation over the whole validation split: free-running likelihood, teacher-forced diagnostics.

The split is cut into `rows` contiguous rows, each read as a stream that starts with the start
token and slides like the sampler. Every token is scored exactly once, in both passes:
- free-running: the sampler's own computation, the true token fed back on the clean rung; the
  model's likelihood of the text (`val_loss`). For S = 1 it equals the teacher-forced loss.
- teacher-forced: parallel windows, every rung fed the (noised) truth; per-rung diagnostics.
Sample quality (`sample_quality`): fixed-seed samples scored by another model, distinct-n, repeats.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import objectives
from .data import TokenData
from .model import LadderLM
from .sampling import Pick, context_keep, decode, sampler


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


def split_rows(tokens: np.ndarray, n_rows: int) -> tuple[Tensor, Tensor]:
    """(R, n) rows of consecutive tokens (the last one padded) and their true lengths (R,)."""
    n = max(1, math.ceil(len(tokens) / n_rows))
    R = max(1, math.ceil(len(tokens) / n))
    padded = np.zeros(R * n, dtype=np.int64)
    padded[: len(tokens)] = tokens
    lengths = np.clip(len(tokens) - np.arange(R) * n, 0, n)
    return torch.from_numpy(padded).view(R, n), torch.from_numpy(lengths)


def recording(nll: Tensor, choose: Pick) -> Pick:
    """`choose`, writing the NLL of each chosen token (N,) at its index into nll (N, n)."""

    def pick(logits: Tensor, i: int) -> Tensor:
        token = choose(logits, i)
        nll[:, i] = F.cross_entropy(logits.float(), token, reduction="none")
        return token

    return pick


@torch.inference_mode()
def token_nll(model: LadderLM, rows: Tensor, eot_id: int, seed: int = 0) -> Tensor:
    """NLL (nats) of every token of the rows (R, n) under the sampler's computation, true tokens fed back."""
    device = model.wte.weight.device
    rows = rows.to(device)
    nll = torch.zeros(rows.shape, device=device)
    prompts = torch.full((rows.shape[0], 1), eot_id, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    decode(model, prompts, rows.shape[1], recording(nll, lambda _logits, i: rows[:, i]), generator=generator)
    return nll


def free_running_nll(model: LadderLM, rows: Tensor, lengths: Tensor, eot_id: int, seed: int = 0) -> float:
    """Total NLL (nats) of the rows, each up to its length, under the sampler's computation."""
    nll = token_nll(model, rows, eot_id, seed)
    return (nll * (torch.arange(rows.shape[1], device=nll.device) < lengths.to(nll.device)[:, None])).sum().item()


@torch.inference_mode()
def teacher_forced_stats(
    model: LadderLM, rows: Tensor, lengths: Tensor, eot_id: int, batch_size: int = 32, seed: int = 0
) -> dict[str, Tensor]:
    """Sums over the scored slots of parallel windows, per rung (S,): cross-entropy, latent error,
    latent target energy, and the denoise ratio's numerator and denominator; plus slot counts."""
    device = model.wte.weight.device
    T, S = model.cfg.block_size, model.n_step
    starts, first_scored = sliding_windows(rows.shape[1], T)
    # Every (row, window) pair: token offsets within the row and which targets it scores.
    offsets = torch.from_numpy(starts)[:, None] + torch.arange(T)  # (W, T)
    scored = (offsets[None] < lengths[:, None, None]) & (torch.arange(T) >= torch.from_numpy(first_scored)[:, None])
    windows = rows[:, offsets.clamp(max=rows.shape[1] - 1)].flatten(0, 1)  # (R * W, T)
    scored = scored.flatten(0, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {k: torch.zeros(S, dtype=torch.float64) for k in ("ce", "ce_count", "latent", "latent_ref", "num", "den")}
    for i in range(0, len(windows), batch_size):
        window = windows[i : i + batch_size].to(device)
        targets = window.masked_fill(~scored[i : i + batch_size].to(device), -100)
        inputs = torch.cat([torch.full_like(window[:, :1], eot_id), window[:, :-1]], 1)
        x, _, y = model.teacher_forced(inputs, generator)
        slot_tgt, real = objectives.slot_targets(targets, S)
        counted = slot_tgt != -100  # (b, L, S)
        ce = objectives.slot_cross_entropy(model.logits(y), slot_tgt)
        err, ref, pairs = objectives.latent_errors(model.in_norm(y), x, real)
        pairs = pairs & counted[:, :-1]  # (b, L-1, S)
        # Denoise ratio: output (as fed back) vs the same token's input one rung noisier, x[p, s-1].
        den = (x[:, :-1, :-1] - x[:, 1:, 1:]).pow(2).sum(-1)  # (b, L-1, S-1), rungs 1..S-1
        for key, value, mask in (
            ("ce", ce, counted),
            ("ce_count", torch.ones_like(ce), counted),
            ("latent", err, pairs),
            ("latent_ref", ref, pairs),
            ("num", err[..., 1:], pairs[..., 1:]),
            ("den", den, pairs[..., 1:]),
        ):
            total = (value * mask).sum((0, 1)).double().cpu()
            sums[key][S - total.shape[0] :] += total
    return sums


def evaluate(model: LadderLM, data: TokenData, rows: int = 64, batch_size: int = 32, seed: int = 0) -> dict:
    model.eval()
    token_rows, lengths = split_rows(np.asarray(data.val), rows)
    count = int(lengths.sum())
    eot = data.tokenizer.eot_id
    free = free_running_nll(model, token_rows, lengths, eot, seed) / count
    stats = teacher_forced_stats(model, token_rows, lengths, eot, batch_size, seed)
    S = model.n_step
    per_rung = [
        {
            "rung": s,
            "alpha": float(model.alpha[s]),
            "ce": float(stats["ce"][s] / stats["ce_count"][s]),
            "latent_mse": float(stats["latent"][s] / stats["latent_ref"][s]) if stats["latent_ref"][s] > 0 else None,
            "denoise_ratio": float(stats["num"][s] / stats["den"][s]) if s > 0 and stats["den"][s] > 0 else None,
        }
        for s in range(S)
    ]
    return {
        "val_loss": free,
        "bits_per_char": free * count / math.log(2) / max(1, data.meta["val_chars"]),
        "tokens": count,
        "free_running_loss": free,
        "teacher_forced_loss": per_rung[-1]["ce"],
        "n_step": S,
        "rows": int(token_rows.shape[0]),
        "per_rung": per_rung,
    }


def sample(model: LadderLM, n: int, length: int, eot_id: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n unprompted samples of exactly `length` tokens at temperature 1 (an end-of-text token does not
    stop them), and each token's NLL under the distribution it was drawn from."""
    device = model.wte.weight.device
    nll = torch.zeros(n, length, device=device)
    prompts = torch.full((n, 1), eot_id, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    pick = recording(nll, sampler(1.0, None, None, generator))
    return decode(model.eval(), prompts, length, pick, generator=generator).cpu(), nll.cpu()


def distinct_n(rows: Tensor, n: int) -> float:
    """Mean over rows of (distinct n-grams / n-grams) within the row."""
    grams = rows.unfold(1, n, 1)  # (R, length - n + 1, n)
    return sum(len(set(map(tuple, g.tolist()))) / g.shape[0] for g in grams) / len(rows)


def repeat_rate(rows: Tensor, n: int = 8) -> float:
    """Fraction of n-grams that already occurred earlier in the same row (loops score near 1)."""
    repeats = total = 0
    for g in rows.unfold(1, n, 1).tolist():
        seen: set[tuple[int, ...]] = set()
        for gram in map(tuple, g):
            repeats += gram in seen
            seen.add(gram)
        total += len(g)
    return repeats / total


def text_quality(rows: Tensor, scorer: LadderLM, eot_id: int, seed: int = 0) -> dict[str, float | None]:
    """gen_ppl (perplexity under `scorer`, each row read from the start token; a ladder's noise drawn
    from `seed`) and its standard error over rows (gen_ppl_se, rows taken as independent draws),
    distinct-2/3, repeat rate."""
    row_nll = token_nll(scorer.eval(), rows, eot_id, seed).mean(1).double().cpu()  # (R,)
    gen_ppl = math.exp(row_nll.mean().item())
    return {
        "gen_ppl": gen_ppl,
        "gen_ppl_se": gen_ppl * row_nll.std().item() / math.sqrt(len(row_nll)) if len(row_nll) > 1 else None,
        "distinct_2": distinct_n(rows, 2),
        "distinct_3": distinct_n(rows, 3),
        "repeat_rate": repeat_rate(rows),
    }


def drawn_quality(model: LadderLM, scorer: LadderLM, n: int, length: int, eot_id: int, seed: int) -> dict[str, float | None]:
    """text_quality of the model's samples, plus self_ppl (their perplexity under the model itself, the
    exponential of its entropy rate) and kl = ln(gen_ppl / self_ppl), an estimate of KL(model || scorer)
    in nats per token: gen_ppl = exp(entropy + kl), so samples score well by being sharp or close."""
    rows, nll = sample(model, n, length, eot_id, seed)
    quality = text_quality(rows, scorer, eot_id, seed)  # the draws' noise: a ladder re-reading its own samples gets their NLL
    self_nll = nll.mean().item()
    return quality | {"self_ppl": math.exp(self_nll), "kl": math.log(quality["gen_ppl"]) - self_nll}


def sample_quality(model: LadderLM, scorer: LadderLM, data: TokenData, n: int, length: int, seed: int = 0) -> dict:
    """Quality of n samples of the model and of the scorer's own samples, both scored by the scorer,
    beside the same metrics on n held-out stretches of the validation split (the reference)."""
    eot = data.tokenizer.eot_id
    val = torch.from_numpy(np.asarray(data.val[: (len(data.val) // length) * length], dtype=np.int64)).view(-1, length)
    picks = torch.linspace(0, len(val) - 1, min(n, len(val))).long()  # evenly spread, deterministic
    return {
        "samples": n,
        "length": length,
        "seed": seed,
        "model": drawn_quality(model, scorer, n, length, eot, seed),
        "scorer": drawn_quality(scorer, scorer, n, length, eot, seed),
        "data": text_quality(val[picks], scorer, eot, seed),
    }
