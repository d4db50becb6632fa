"""Decoding: one engine for sampling and for free-running scoring, plus the logit filters.

Every context window starts with the start-of-text token, in training and here. Prefill is one
parallel pass over the prompt positions (they hold only known tokens and pads); every later
position is one backbone step whose not-yet-emitted rungs take the model's previous outputs.
When positions run past the window, it slides: the start token plus the last `context_keep`
known tokens become a new prompt and the state is rebuilt from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from . import ladder
from .model import LadderLM

Pick = Callable[[Tensor, int], Tensor]  # (clean-rung logits (N, V), index of the new token) -> tokens (N,)


@contextmanager
def single_position_kernels() -> Iterator[None]:
    """Run without oneDNN on CPU: its per-call set-up dominates one-position steps (an exact GELU
    of 512 values takes ~9 us through oneDNN, ~1 us natively), ~14% of a decoding step here."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def context_keep(block_size: int) -> int:
    """Known tokens kept (after the start token) when the window slides."""
    return block_size // 2


def left_pad(rows: Sequence[Tensor], fill: int) -> tuple[Tensor, Tensor]:
    """Right-align 1-D token rows into (N, w) with `fill` before them; returns it and the pads (N,)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, width - len(r) :] = r
    return out, torch.tensor([width - len(r) for r in rows], device=rows[0].device)


@torch.inference_mode()
@single_position_kernels()
def decode(
    model: LadderLM,
    prompts: Sequence[Tensor],
    n_new: int,
    pick: Pick,
    parallel_prefill: bool = True,
    generator: torch.Generator | None = None,
    eot_id: int | None = None,
    slide: bool = True,
) -> Tensor:
    """Emit up to n_new tokens after each prompt (1-D, start token first), choosing them with `pick`.

    Prompts of different lengths are left-padded so that every row goes through the phases in
    step: phase i, one parallel pass over the prompt positions (known tokens and pads only);
    phase ii, S - 1 single steps mixing prompt slots with the model's outputs; phase iii, one
    token per step. Known tokens enter their slots noised as `model.prompt_noise` says (those of
    phases i and ii embedded in one call); slots of tokens not emitted yet take `model.fill` of
    the previous outputs. parallel_prefill=False runs the backbone over the prompt positions one
    at a time: the reference path. With `model.prompt_read = "stream"` the prompt is read as the
    model reads its own tokens: each on the clean rung only, the rungs below it filled from the
    model's outputs, one step per prompt token (no parallel phase i); with "passes", phase i
    approaches that reading in parallel: `train_passes` passes over the prompt positions from a
    blank start, each filling the rungs below the clean one from the previous pass's outputs, as
    training does (with a pass per position it is the stream exactly). With `eot_id`, a row that
    emits it is finished (it emits eot_id from then on) and decoding stops once all are.
    With slide=False decoding stops when the window is full instead of sliding it.
    Returns (N, n_emitted) tokens.
    """
    N, S, block = len(prompts), model.n_step, model.cfg.block_size
    device = prompts[0].device
    ctx = torch.empty(N, block + 1, dtype=torch.long, device=device)  # known tokens, rows right-aligned
    out = torch.empty(N, n_new, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    draws, pad = torch.empty(0), torch.empty(0)
    # The known slots of phases i and ii, their mask and their clean rungs' tokens, set by restart.
    prefix, prefix_given, prefix_clean = torch.empty(0), torch.empty(0), torch.empty(0)

    read = model.cfg.prompt_read if S > 1 else "parallel"  # with one rung every prompt slot is a clean one
    stream = read != "parallel"  # prompt tokens on the clean rung only

    def step(c: int, n_known: int, y_last: Tensor, state) -> tuple[Tensor, object]:
        if c < prefix.shape[1]:
            x, given, clean = prefix[:, c : c + 1], prefix_given[..., c : c + 1, :], prefix_clean[:, c : c + 1]
            if stream or c >= n_known:  # slot (c, 0) and maybe more hold tokens not emitted yet: fill them
                x = torch.where(given[..., None], x, model.fill(y_last, draws[:, c])[:, None])  # (N, 1, S, E)
        else:  # phase iii: the clean rung holds the only known token, the rungs below it fills
            clean = ctx[:, c - S + 1 : c - S + 2]  # (N, 1)
            fills = model.fill(y_last, draws[:, c])[:, :-1]  # (N, S - 1, E)
            x = torch.cat([fills, model.embed_emitted(clean[:, 0])], 1)[:, None]  # (N, 1, S, E)
        y, state = model.run(x, clean, state)
        return y[:, -1], state

    def restart(rows: Sequence[Tensor]) -> tuple[int, Tensor, object]:
        nonlocal draws, pad, prefix, prefix_given, prefix_clean
        window, pad = left_pad(rows, fill=0)
        # One Gaussian per noisy slot of the window, drawn up front: a slot gets the same noise
        # whether its position is computed in the parallel prefill or in a single step.
        draws = torch.randn(N, model.n_positions, S - 1, model.rung_dim, generator=generator, device=device)
        w = window.shape[1]
        ctx[:, :w] = window
        # The known slots of the prompt positions (phase i) and of the S - 1 positions after them
        # (phase ii, which mix known tokens with the model's outputs), embedded in one call.
        positions = torch.arange(w + S - 1, device=device)
        prefix, prefix_given, prefix_clean = model.embed_slots(
            window, positions, model.prompt_noise, draws=draws[:, : w + S - 1], first=pad
        )
        if stream:  # the prompt's tokens enter on the clean rung only, as emitted tokens do (the start token and pads stay)
            j = ladder.slot_tokens(positions, S)  # (P, S)
            prefix_given = prefix_given & ((torch.arange(S, device=device) == S - 1) | (j <= pad[:, None, None]))  # (N, P, S)
        if parallel_prefill and read == "passes":  # the stream's fixed point, approached as training does
            y = torch.zeros_like(prefix[:, :w])  # a blank start
            for _ in range(model.pass_counts()[0]):
                state = model.empty_state(N, device, pad, reserve=model.n_positions)
                y, state = model.feed_back(prefix[:, :w], prefix_clean[:, :w], y, ~prefix_given[:, :w], state, draws[:, :w])
            return w, y[:, -1], state
        state = model.empty_state(N, device, pad, reserve=model.n_positions)
        if parallel_prefill and read == "parallel":
            y, state = model.run(prefix[:, :w], prefix_clean[:, :w], state)
            return w, y[:, -1], state
        y_last = torch.zeros(N, S, model.rung_dim, device=device)  # read by no slot: position 0 holds the start token and pads
        for c in range(w):
            y_last, state = step(c, w, y_last, state)
        return w, y_last, state

    # The window holds the start token and at most block_size - 1 tokens after it.
    n_known, y_last, state = restart([torch.cat([p[:1], p[1:][max(0, len(p) - block) :]]) for p in prompts])
    c = n_known  # next cache slot to compute; the longest row's position
    emitted = 0
    while emitted < n_new:
        if c - S + 1 >= n_known:  # the clean rung at c needs a token nobody has: emit it
            token = pick(model.clean_logits(y_last), emitted)
            if eot_id is not None:
                token = token.masked_fill(done, eot_id)
                done |= token == eot_id
            ctx[:, n_known] = token
            out[:, emitted] = token
            n_known += 1
            emitted += 1
            if eot_id is not None and emitted % 16 == 0 and bool(done.all()):  # one sync per 16 tokens
                break
        elif c == model.n_positions:  # slide: each row keeps its start token and its last known tokens
            if not slide:
                break
            keep = context_keep(block)
            firsts = pad.tolist()  # where each row's start token sits; one sync per slide
            rows = [torch.cat([ctx[r, f : f + 1], ctx[r, max(f + 1, n_known - keep) : n_known]]) for r, f in enumerate(firsts)]
            n_known, y_last, state = restart(rows)
            c = n_known
        else:
            y_last, state = step(c, n_known, y_last, state)
            c += 1
    return out[:, :emitted]


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits.float()
    # The best at 0: a tiny temperature cannot overflow. One below float32's range would round to 0
    # and make the best 0 / 0 = NaN; the smallest normal float32 is as greedy.
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p: none past it
        drop_sorted[..., 0] = False  # the best always stays, even for a top_p that rounds to 0 in float32
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
    prompts: list[list[int]],
    eot_id: int,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    on_token: Callable[[Tensor], Tensor | None] | None = None,
    slide: bool = True,
) -> list[list[int]]:
    """num_samples continuations of each prompt (token ids, no start token), in one batch.

    A row stops at <|endoftext|> (not included). `on_token` sees each step's tokens (N,) and may
    return an (N,) bool tensor of rows to stop after this token (e.g. one that ends a stop string).
    """
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [torch.tensor([eot_id, *p], dtype=torch.long, device=device) for p in prompts for _ in range(num_samples)]
    pick = sampler(temperature, top_k, top_p, generator)
    if on_token is not None:
        plain_pick = pick
        stopping = torch.zeros(len(rows), dtype=torch.bool, device=device)

        def pick(logits: Tensor, index: int) -> Tensor:
            token = plain_pick(logits, index).masked_fill(stopping, eot_id)  # rows asked to stop end here
            stop = on_token(token)
            if stop is not None:
                stopping.logical_or_(stop)
            return token

    out = decode(model, rows, max_new_tokens, pick, generator=generator, eot_id=eot_id, slide=slide)
    return [row[: row.index(eot_id)] if eot_id in row else row for row in out.tolist()]
