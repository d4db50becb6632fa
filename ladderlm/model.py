"""The ladder language model over any stateful backbone. With n_step = 1 it is the GPT.

Each ladder position carries S rungs of E = n_embd // S features; slot (p, s) holds token p - s
at signal fraction alpha_s (rung 0 noisiest, rung S-1 clean). The backbone sees the S rungs
flattened to n_embd; its output y[p, s] is read per rung: lm_head(y[p, s]) predicts token
p + 1 - s and y[p, s] itself predicts the next ladder's slot x[p + 1, s]. The clean rung's token is
the newest one known at p; the backbone may read it at its full width too (`embed_in`). With S = 1:
one rung, signal 1, no noise, y[p] -> x_{p+1}: the GPT, by this same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import ladder, objectives
from .backbones import build_backbone
from .config import ModelConfig


class RungNorm(nn.Module):
    """LayerNorm over each rung's E features, with a weight (and bias) of its own per rung."""

    def __init__(self, n_step: int, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_step, dim))
        self.bias = nn.Parameter(torch.zeros(n_step, dim)) if bias else None

    def forward(self, x: Tensor, rungs: slice = slice(None)) -> Tensor:  # (..., S, E), or the given rungs only
        x = F.layer_norm(x, x.shape[-1:]) * self.weight[rungs]
        return x if self.bias is None else x + self.bias[rungs]


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
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        # Start the normalised inputs at GPT-2's embedding scale: at gain 1 they would swamp the
        # residual updates (std 0.02) and slow early training (val 1.96 vs 1.85 on the CPU recipe).
        nn.init.constant_(self.in_norm.weight, 0.02)
        if cfg.tie_head:
            self.lm_head.weight = self.wte.weight
        # The clean rung alone gives the emission a rank-E softmax; "full" adds a head over all S * E features.
        self.emit_head = nn.Linear(S * E, cfg.vocab_size, bias=False) if cfg.emit_head == "full" and S > 1 else None
        if self.emit_head is not None:
            nn.init.zeros_(self.emit_head.weight)
        # The clean rung's E features give the known token a rank-E input; "full" adds an embedding of
        # it at the backbone's width, normalised and scaled as the GPT's input embedding is.
        self.wte_full = nn.Embedding(cfg.vocab_size, S * E) if cfg.embed_in == "full" and S > 1 else None
        if self.wte_full is not None:
            nn.init.normal_(self.wte_full.weight, mean=0.0, std=0.02)
            self.in_norm_full = RungNorm(1, S * E, cfg.bias)
            nn.init.constant_(self.in_norm_full.weight, 0.02)
        alpha = ladder.alpha_schedule(S, cfg.gamma)
        sqrt_a, sqrt_1ma = ladder.slot_signal(alpha)
        self.register_buffer("alpha", alpha, persistent=False)  # (S,)
        self.register_buffer("sqrt_alpha", sqrt_a, persistent=False)  # (S, 1)
        self.register_buffer("sqrt_one_minus_alpha", sqrt_1ma, persistent=False)

    @property
    def n_positions(self) -> int:
        return self.backbone.n_positions

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_state(self, batch_size: int, device: torch.device | str | None = None, pad: Tensor | None = None, reserve: int = 0):
        """The backbone's empty state; `pad` (B,) left-pad slots per row for prompts of different lengths,
        `reserve` positions of room when decoding will follow."""
        return self.backbone.empty_state(batch_size, device or self.wte.weight.device, self.wte.weight.dtype, pad, reserve)

    def noise(
        self, kind: str, emb: Tensor, generator: torch.Generator | None = None, draws: Tensor | None = None
    ) -> Tensor | None:
        """Noise of construction `kind` for slot embeddings emb (B, P, S, E), at their scale; None for "zero".

        `draws` (B, P, S-1, E) fixes the Gaussians of the noisy rungs, so that the sampler gives
        every slot the same noise however the positions are batched; "window" always draws anew.
        """
        if kind == "zero" or self.n_step == 1:  # only rungs below the clean one are noised
            return None
        B, P, S, E = emb.shape
        scale = self.wte.weight.detach().std(0)  # the embeddings' per-feature scale; noise carries no gradient
        if kind == "window":
            return ladder.window_sum_noise(B, P, S, E, generator, emb.device) * scale
        if draws is None:
            draws = torch.randn(B, P, S - 1, E, generator=generator, device=emb.device)
        if kind == "orthogonal":  # built from the embeddings' values: detached, or the noise would carry their gradient
            return ladder.orthogonal_noise(emb.detach(), draws)
        return ladder.independent_noise(draws) * scale

    def embed_slots(
        self,
        tokens: Tensor,
        positions: Tensor,
        noise: str,
        generator: torch.Generator | None = None,
        draws: Tensor | None = None,
        first: Tensor | int = 0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised slot inputs at `positions` over known tokens (B, n), row r's starting at first[r].

        Returns x (B, P, S, E), the (P, S) `given` mask (the other slots hold tokens not emitted
        yet: pads here; the sampler replaces them with the model's own outputs) and the clean
        rungs' tokens (B, P), -1 at pads, for `run`.
        """
        n = tokens.shape[1]
        j = ladder.slot_tokens(positions, self.n_step)  # (P, S)
        real, given = ladder.masks_of(j, n, first)
        ids = tokens[:, j.clamp(0, n - 1)]  # (B, P, S)
        clean = torch.where(real[..., -1], ids[..., -1], -1)  # (B, P)
        emb = self.wte(ids)  # (B, P, S, E)
        keep = real[..., None].to(emb.dtype)  # (P, S, 1), or (B, P, S, 1) per row: zero on pads
        raw = emb * (self.sqrt_alpha * keep)
        eps = self.noise(noise, emb, generator, draws)
        if eps is not None:
            raw = raw + eps * (self.sqrt_one_minus_alpha * keep)
        return self.in_norm(raw), given, clean

    def embed_emitted(self, tokens: Tensor) -> Tensor:
        """Clean-rung inputs (N, 1, E) of tokens (N,), as embed_slots gives them: decoding's one known slot."""
        clean = slice(-1, None)
        return self.in_norm(self.wte(tokens)[:, None] * self.sqrt_alpha[clean], clean)

    @property
    def sampling_noise(self) -> str:
        """The noise drawn per slot at sampling time: the training construction, window sums aside."""
        return "orthogonal" if self.cfg.noise == "orthogonal" else "independent"

    @property
    def prompt_noise(self) -> str:
        """Noise on known tokens at sampling (`model.prompt_noise`)."""
        return "zero" if self.cfg.prompt_noise == "zero" else self.sampling_noise

    def fill(self, y: Tensor, draws: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Inputs for not-yet-emitted slots from the previous outputs y (N, S, E) (`model.sample_fill`).

        raw: the outputs themselves (the seed), through the input norm like every slot input.
        renoise: the head's expected clean embedding, noised afresh to the rung's level, as a
        DDPM step toward the predicted token would.
        """
        if self.cfg.sample_fill == "raw":
            return self.in_norm(y)
        clean = self.lm_head(y).softmax(-1) @ self.wte.weight  # (N, S, E)
        raw = self.sqrt_alpha * clean
        eps = self.noise(self.sampling_noise, clean[:, None], generator, None if draws is None else draws[:, None])
        if eps is not None:
            raw = raw + self.sqrt_one_minus_alpha * eps[:, 0]
        return self.in_norm(raw)

    def run(self, x: Tensor, clean: Tensor, state):
        """Backbone over ladder inputs (B, P, S, E) whose clean rungs hold tokens `clean` (B, P) (-1: a pad)
        -> outputs (B, P, S, E) and the new state."""
        B, P, S, E = x.shape
        h = x.reshape(B, P, S * E)
        if self.wte_full is not None:  # only the rows looked up are normalised: a decoding step reads one per row
            full = self.in_norm_full(self.wte_full(clean.clamp_min(0))[..., None, :])[..., 0, :]  # (B, P, S * E)
            h = h + full * (clean >= 0)[..., None].to(h.dtype)
        h, state = self.backbone(h, state)
        return self.out_norm(h.view(B, P, S, E)), state

    def inputs(self, idx: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced inputs (B, L, S, E) of the L = T + S - 1 positions over windows idx (B, T), and
        their clean rungs' tokens (B, L)."""
        positions = torch.arange(idx.shape[1] + self.n_step - 1, device=idx.device)
        x, _, clean = self.embed_slots(idx, positions, self.cfg.noise, generator)
        return x, clean

    def teacher_forced(self, idx: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs (B, L, S, E), their clean rungs' tokens (B, L) and the outputs (B, L, S, E) of one pass
        over teacher-forced inputs."""
        x, clean = self.inputs(idx, generator)
        return x, clean, self.run(x, clean, self.empty_state(idx.shape[0], idx.device))[0]

    def feed_back(
        self,
        x: Tensor,
        clean: Tensor,
        y: Tensor,
        fed: Tensor,
        state,
        draws: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, object]:
        """One backbone pass over inputs x (B, L, S, E) (clean rungs' tokens `clean`) whose `fed` slots
        ((L, S) or (B, L, S), never at position 0) take fill(y[p - 1, s]) from the previous pass's
        outputs y, as the sampler feeds them (`draws` (B, L, S-1, E): the fills' Gaussians, as the
        sampler draws them; else fresh ones from `generator`).
        Returns the outputs (B, L, S, E) and the backbone state after them."""
        B, L, S, E = x.shape
        noise = None if draws is None else draws[:, 1:].reshape(-1, S - 1, E)
        fills = self.fill(y[:, :-1].reshape(-1, S, E), noise, generator).view(B, L - 1, S, E)
        x = torch.cat([x[:, :1], torch.where(fed[..., 1:, :, None], fills, x[:, 1:])], 1)
        return self.run(x, clean, state)

    def rollout(
        self,
        x: Tensor,
        clean: Tensor,
        y: Tensor,
        steps: int,
        known: Tensor | int = 1,
        generator: torch.Generator | None = None,
        draws: Tensor | None = None,
    ) -> list[Tensor]:
        """The ladder as its own latent dynamics: `steps` passes fed back as the sampler feeds them.

        Each pass keeps the teacher-forced inputs x (B, L, S, E) of the clean rung (its tokens: `clean`
        (B, L)), of the known tokens (the first `known` of each window, (B,): the start token, or a
        prompt) and of pads, and fills every other slot (a token the sampler would not have emitted
        yet) from the previous pass's outputs one position back (`feed_back`). Pass k then equals the
        free-running sampler (true tokens on the clean rung) at positions 0..k, with one batched
        backbone pass per step. `draws` (B, L, S-1, E) fixes the fills' Gaussians (`feed_back`), the
        same for every pass. Returns the outputs (B, L, S, E) of every pass.
        """
        B, L, S, E = x.shape
        j = ladder.slot_tokens(torch.arange(L, device=x.device), S)  # (L, S)
        known = known[:, None, None] if isinstance(known, Tensor) else known
        fed = (j >= known) & (torch.arange(S, device=x.device) < S - 1)  # (L, S) or (B, L, S): not emitted yet there
        outs = []
        for _ in range(steps):
            y, _ = self.feed_back(x, clean, y, fed, self.empty_state(B, x.device), draws, generator)
            outs.append(y)
        return outs

    def pass_counts(self, passes: int = 0) -> tuple[int, int]:
        """Backbone passes per training step (`passes`, 0: `train_passes`), and how many of them
        (the last ones) carry gradients."""
        passes = 1 if self.n_step == 1 else passes or self.cfg.train_passes or self.n_step
        return passes, passes if self.cfg.grad_passes == 0 else min(self.cfg.grad_passes, passes)

    def unrolled(
        self, x: Tensor, clean: Tensor, known: Tensor | int = 1, passes: int = 0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Outputs (B, L, S, E) of the last of `passes` (0: `train_passes`) passes over teacher-forced inputs x
        (clean rungs' tokens `clean` (B, L)).

        The first pass reads x, or with first_pass = "blank" zeros in the slots of tokens not
        emitted yet; every later pass fills those slots from the previous outputs as the sampler
        does (`rollout`; the first `known` tokens of each window are given). A blank start leaks
        no future token into any pass, and after S passes every rung's input has been refined as
        many times as the sampler refines it. Gradients flow through the last `grad_passes`
        passes (0: all); with recompute_passes, every pass but the last keeps only its outputs
        for the backward, which runs it again. With S = 1 nothing is ever fed back: one pass, the GPT's.
        """
        passes, n_graph = self.pass_counts(passes)
        blank = self.cfg.first_pass == "blank" and self.n_step > 1  # one rung holds only known tokens: nothing to blank

        def one_pass(y: Tensor, k: int, draws: Tensor | None) -> Tensor:  # the first one reads x itself unless blank
            return (
                self.rollout(x, clean, y, 1, known, generator, draws)[-1]
                if blank or k
                else self.run(x, clean, self.empty_state(x.shape[0], x.device))[0]
            )

        def fill_draws(k: int) -> Tensor | None:
            """The Gaussians (B, L, S-1, E) of pass k's renoised fills, the numbers the pass would draw itself,
            drawn before it: a recomputed pass then reads them again (checkpoint replays the global RNG, not
            a generator)."""
            if self.cfg.sample_fill != "renoise" or not (blank or k):  # raw fills draw nothing
                return None
            B, L, S, E = x.shape
            draws = torch.randn(B, L - 1, S - 1, E, generator=generator, device=x.device)
            return F.pad(draws, (0, 0, 0, 0, 1, 0))  # position 0 is never filled

        y = torch.zeros_like(x)
        for k in range(passes):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= passes - n_graph):
                # the last pass keeps its activations: the backward starts there and would rerun it at once
                recompute = self.cfg.recompute_passes and torch.is_grad_enabled() and k < passes - 1
                draws = fill_draws(k)
                y = checkpoint(one_pass, y, k, draws, use_reentrant=False) if recompute else one_pass(y, k, draws)
        return y

    def prompt_lengths(self, idx: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Known tokens at the start of each training window (B,): the start token alone, or, for a
        `train_prompts` fraction of the windows, a prompt of 1..T tokens (uniform)."""
        B, T = idx.shape
        if self.cfg.train_prompts == 0:  # draws nothing: recipes without prompts keep their random streams
            return torch.ones(B, dtype=torch.long, device=idx.device)
        prompted = torch.rand(B, generator=generator, device=idx.device) < self.cfg.train_prompts
        return torch.where(prompted, torch.randint(1, T + 1, (B,), generator=generator, device=idx.device), 1)

    def window(
        self, idx: Tensor, targets: Tensor | None = None, generator: torch.Generator | None = None, passes: int = 0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Teacher-forced inputs x, their clean rungs' tokens and trained outputs y (B, L, S, E) over
        windows idx (B, T), and the targets the loss counts: a prompt's own tokens are given, not
        predicted (-100)."""
        x, clean = self.inputs(idx, generator)
        known = self.prompt_lengths(idx, generator)
        y = self.unrolled(x, clean, known, passes, generator)
        if targets is not None:
            targets = targets.masked_fill(torch.arange(idx.shape[1], device=idx.device) < known[:, None] - 1, -100)
        return x, clean, y, targets

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, generator: torch.Generator | None = None, passes: int = 0
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, L, S, V) over windows idx (B, T); with targets (B, T), the next tokens, the loss.
        `passes` overrides `train_passes` (0: keep it)."""
        x, _, y, targets = self.window(idx, targets, generator, passes)
        logits = self.logits(y)
        if targets is None:
            return logits, None
        return logits, objectives.ladder_loss(self.cfg, logits, y, x, targets, self.alpha, self.in_norm)

    def loss(self, idx: Tensor, targets: Tensor, generator: torch.Generator | None = None, passes: int = 0) -> Tensor:
        """forward's loss, computing only the logits it scores: the clean rung's alone unless ce_rungs = "all"
        (the head's cost, S times over with a large vocabulary, and its activations)."""
        x, _, y, targets = self.window(idx, targets, generator, passes)
        logits = self.logits(y) if self.cfg.ce_rungs == "all" else self.clean_logits(y)[..., None, :]
        return objectives.ladder_loss(self.cfg, logits, y, x, targets, self.alpha, self.in_norm)

    def logits(self, y: Tensor, frozen: bool = False) -> Tensor:
        """Per-slot logits (..., S, V) of outputs y (..., S, E); the clean rung's are clean_logits.

        frozen=True detaches the heads' weights, for losses that train what the heads read, not them.
        """
        per_rung = F.linear(y, _weight(self.lm_head, frozen))
        if self.emit_head is None:
            return per_rung
        return torch.cat([per_rung[..., :-1, :], self.clean_logits(y, frozen)[..., None, :]], -2)

    def clean_logits(self, y: Tensor, frozen: bool = False) -> Tensor:
        """Distribution over the next token to emit, from the clean rung of outputs y (..., S, E)."""
        logits = F.linear(y[..., -1, :], _weight(self.lm_head, frozen))
        return logits if self.emit_head is None else logits + F.linear(y.flatten(-2), _weight(self.emit_head, frozen))


def _weight(layer: nn.Linear, frozen: bool) -> Tensor:
    return layer.weight.detach() if frozen else layer.weight
