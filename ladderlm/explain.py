"""`ladderlm explain`: the slot diagram of the three sampling phases, drawn from the sampler's masks."""

from __future__ import annotations

import torch

from . import ladder

START = "^"  # the start-of-text token every window begins with
PAD = "."


def _visible(char: str) -> str:
    """A one-cell label for a prompt character: spaces and control characters would break the grid,
    and a prompt's own '^' or '.' would read as the start token or a pad."""
    if char in (START, PAD):
        return "\\" + char
    return "␣" if char == " " else char if char.isprintable() else repr(char)[1:-1]


def _label(j: int, prompt: list[str]) -> str:
    if j < 0:
        return PAD
    return prompt[j] if j < len(prompt) else f"#{j - len(prompt) + 1}"


def explain(n_step: int, prompt_text: str, new_tokens: int = 2) -> str:
    """The ladder of a character prompt phase by phase: which slot holds which token, and why.

    Tokens are the prompt's characters after the start token '^'; '#k' is the k-th generated
    token; '.' a pad (a prompt's own '^' and '.' are drawn '\\^' and '\\.'). Rungs are listed clean
    (S-1) first, as in the seed's drawing.
    """
    S, prompt = n_step, [START, *map(_visible, prompt_text)]
    t = len(prompt)
    rungs = range(S - 1, -1, -1)
    width = max(len(_label(j, prompt)) for j in range(-1, t + S + new_tokens)) + 1
    lines = [f"Ladder with S = {S} rung(s) over {t} prompt token(s) {' '.join(prompt)}  ('^' start, '#k' generated, '.' pad)", ""]

    positions = torch.arange(t)
    tokens = ladder.slot_tokens(positions, S)
    real, _ = ladder.slot_masks(positions, t, S)
    lines.append(f"Phase i, block prefill: positions 0..{t - 1} in one parallel pass (only prompt tokens and pads)")
    lines.append("          " + "".join(f"p{p}".ljust(width) for p in range(t)))
    for s in rungs:
        cells = "".join(_label(int(tokens[p, s]) if real[p, s] else -1, prompt).ljust(width) for p in range(t))
        lines.append(f"rung {s}".ljust(10) + cells)

    def step(p: int, n_known: int) -> list[str]:
        _, given = ladder.slot_masks(torch.tensor([p]), n_known, S)
        out = []
        for s in rungs:
            j = p - s
            if j < 0:
                why = "pad"
            elif given[0, s]:
                why = "input (generated token)" if j >= t else "input (prompt)"
            else:
                why = f"new: the model's output at p{p - 1}, rung {s}"
            out.append(f"  rung {s}: {_label(j, prompt).ljust(width)}<- {why}")
        return out

    lines += ["", f"Phase ii, iterative prefill: {S - 1} single step(s), prompt slots mixed with the model's outputs"]
    for k, p in enumerate(range(t, t + S - 1)):
        lines += [f"Step {k + 1}, position p{p}", *step(p, t)]
    lines += ["", "Phase iii, new tokens: one step per token; the clean rung takes the token just emitted"]
    for k in range(new_tokens):
        p = t + S - 1 + k
        lines += [f"Emit #{k + 1} from the clean rung of p{p - 1}; position p{p}", *step(p, t + k + 1)]
    return "\n".join(lines)
