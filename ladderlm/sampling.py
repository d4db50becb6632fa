"""Decoding: one engine for sampling and for free-running scoring, plus the logit filters.

Every context window starts with the start-of-text token, in training and here. Prefill is one
parallel pass over the prompt positions (they hold only known tokens and pads); every later
position is one backbone step whose not-yet-emitted rungs take the model's previous outputs.
When positions run past the window, it slides: the start token plus the last `context_keep`
known tokens become a new prompt and the state is rebuilt from them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .model import LadderLM

Pick = Callable[[Tensor, int], Tensor]  # (clean-rung logits (N, V), index of the new token) -> tokens (N,)


def context_keep(block_size: int) -> int:
    """Known tokens kept (after the start token) when the window slides."""
    return block_size // 2


@torch.inference_mode()
def decode(
    model: LadderLM,
    prompt: Tensor,
    n_new: int,
    pick: Pick,
    parallel_prefill: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Emit n_new tokens after prompt (N, t) (start token first), choosing each with `pick`.

    Known tokens enter their slots noised as `model.prompt_noise` says; slots of tokens not
    emitted yet take `model.fill` of the previous outputs. parallel_prefill=False computes the
    prompt positions one at a time: the reference path. `generator` drives the sampling noise.
    """
    N, S, block = prompt.shape[0], model.n_step, model.cfg.block_size
    device = prompt.device
    ctx = torch.empty(N, block + 1, dtype=torch.long, device=device)  # known tokens of the window
    out = torch.empty(N, n_new, dtype=torch.long, device=device)

    draws = torch.empty(0)

    def step(p: int, n_known: int, y_last: Tensor, state) -> tuple[Tensor, object]:
        at = torch.arange(p, p + 1, device=device)
        x, given = model.embed_slots(ctx[:, :n_known], at, model.prompt_noise, draws=draws[:, p : p + 1])
        x = torch.where(given[..., None], x, model.fill(y_last, draws[:, p])[:, None])  # (N, 1, S, E)
        y, state = model.run(x, state)
        return y[:, -1], state

    def restart(window: Tensor) -> tuple[int, Tensor, object]:
        nonlocal draws
        # One Gaussian per noisy slot of the window, drawn up front: a slot gets the same noise
        # whether its position is computed in the parallel prefill or in a single step.
        draws = torch.randn(N, model.n_positions, S - 1, model.rung_dim, generator=generator, device=device)
        t = window.shape[1]
        ctx[:, :t] = window
        state = model.empty_state(N, device)
        if parallel_prefill:
            x, _ = model.embed_slots(window, torch.arange(t, device=device), model.prompt_noise, draws=draws[:, :t])
            y, state = model.run(x, state)
            return t, y[:, -1], state
        y_last = torch.zeros(N, S, model.rung_dim, device=device)  # never read: prompt slots are all known
        for p in range(t):
            y_last, state = step(p, t, y_last, state)
        return t, y_last, state

    n_known, y_last, state = restart(torch.cat([prompt[:, :1], prompt[:, 1:][:, max(0, prompt.shape[1] - block) :]], 1))
    p = n_known  # next position to compute
    emitted = 0
    while emitted < n_new:
        if p - S + 1 >= n_known:  # the clean rung at p needs a token nobody has: emit it
            token = pick(model.clean_logits(y_last), emitted)
            ctx[:, n_known] = token
            out[:, emitted] = token
            n_known += 1
            emitted += 1
        elif p == model.n_positions:
            keep = context_keep(block)
            n_known, y_last, state = restart(torch.cat([ctx[:, :1], ctx[:, n_known - keep : n_known]], 1))
            p = n_known
        else:
            y_last, state = step(p, n_known, y_last, state)
            p += 1
    return out


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sampler(temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator) -> Pick:
    def pick(logits: Tensor, _index: int) -> Tensor:
        if temperature == 0.0:
            return logits.argmax(-1)
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return pick


def generate(
    model: LadderLM,
    prompt_ids: list[int],
    eot_id: int,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Sample num_samples continuations of one prompt; returns (num_samples, max_new_tokens)."""
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.tensor([eot_id, *prompt_ids], dtype=torch.long, device=device).expand(num_samples, -1)
    pick = sampler(temperature, top_k, top_p, generator)
    if on_token is not None:
        plain_pick = pick

        def pick(logits: Tensor, index: int) -> Tensor:
            token = plain_pick(logits, index)
            on_token(token)
            return token

    return decode(model, prompt, max_new_tokens, pick, generator=generator)
