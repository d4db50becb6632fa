"""Pre-norm residual Mamba-2 style blocks: a selective state-space mixer, then the GPT's MLP.

The mixer (per block, width C = n_embd, inner width D_in = ssm_expand * C, H = D_in / P heads of
P = ssm_head_dim channels, state size N = ssm_state, one group of B and C shared by all heads):

    z, x, B, C, dt = in_proj(u)                      # gate, input, input/output maps, step sizes
    x, B, C = silu(causal depthwise conv(x, B, C))   # ssm_conv taps
    dt = softplus(dt + dt_bias);  A = -exp(A_log)     # one scalar decay per head
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T       # (H, P, N) per row
    y_t = h_t C_t + D x_t
    out = out_proj(norm(y * silu(z)))

Training and prefill run the recurrence in the chunked SSD form (`ssd_scan`: quadratic attention-
like products inside chunks, states passed between chunks, every chunk at once); one-position
decoding runs it exactly (`ssm_step`). State, per layer: the last ssm_conv - 1 conv inputs and h.
Rows left-padded into one batch (`pad`) keep their state untouched on pad slots: the conv input
and dt are zero there, so the first real slot of a row sees the fresh start it would see alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import LadderError
from .attention import MLP, dropout, row_pads


@functools.cache
def cuda_scan() -> Callable | None:
    """mamba-ssm's fused chunked scan where that package is importable, else None (the pure path).

    Imported on first use on a CUDA device, so that importing ladderlm never pays for triton."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or installed without a working triton / CUDA
        return None
    return mamba_chunk_scan_combined


def segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal; a (..., Q).

    Summed directly (a masked cumsum), not as a difference of running sums, which would cancel
    badly once the running sums grow large."""
    Q = a.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    sums = a[..., :, None].expand(*a.shape, Q).masked_fill(~ones.tril(-1), 0.0).cumsum(-2)  # [k, j]: a_k where k > j
    return sums.masked_fill(~ones.tril(), float("-inf"))


def ssd_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The SSM over T positions in chunks of at most `chunk`; returns y (b, T, H, P) (no D term) and h_T.

    x (b, T, H, P), dt (b, T, H) (positive, 0 where a slot must not touch the state), A (H,) < 0,
    B, C (b, T, N), h0 (b, H, P, N) the state before position 0 (zeros if None). Any T: the
    chunks are balanced and the last is filled up with dt = 0 slots, which leave h unchanged.
    """
    b, T, H, P = x.shape
    N = B.shape[-1]
    if T == 0:
        return x, x.new_zeros(b, H, P, N) if h0 is None else h0
    n_chunks = -(-T // chunk)
    Q = -(-T // n_chunks)  # balanced: 67 positions at chunk 64 are 2 chunks of 34, not 64 + 3 padded to 128
    fill = n_chunks * Q - T
    if fill:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, fill)) for t in (x, dt, B, C))
    x, dt = x.view(b, n_chunks, Q, H, P), dt.view(b, n_chunks, Q, H)
    B, C = B.view(b, n_chunks, Q, N), C.view(b, n_chunks, Q, N)
    a = (dt.float() * A.float()).transpose(2, 3)  # (b, c, H, Q) log decay of each slot, in fp32 under autocast
    decay = torch.exp(segsum(a))  # (b, c, H, Q, Q): decay[i, j] from slot j to slot i of a chunk
    xdt = x * dt[..., None]  # (b, c, Q, H, P): what each slot writes, before its B

    # 1. Inside each chunk, from a zero state: y_i = sum_{j<=i} (C_i . B_j) decay[i, j] dt_j x_j.
    scores = (C @ B.transpose(-1, -2))[:, :, None] * decay.to(x.dtype)  # (b, c, H, Q, Q)
    y = torch.einsum("bchij,bcjhp->bcihp", scores, xdt)
    # 2. The state each chunk leaves behind, from a zero state: decay to the chunk's last slot.
    to_end = decay[:, :, :, -1, :].transpose(2, 3).to(x.dtype)  # (b, c, Q, H)
    states = torch.einsum("bcjhp,bcjn->bchpn", xdt * to_end[..., None], B)  # (b, c, H, P, N)
    # 3. Pass states across chunks, all at once: the state entering chunk k is the sum over
    #    earlier chunks' states (and h0) decayed through the chunks in between.
    if h0 is None:
        h0 = x.new_zeros(b, H, P, N)
    states = torch.cat([h0[:, None].to(states.dtype), states], 1)  # (b, c + 1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a.sum(-1).transpose(1, 2), (1, 0))))  # (b, H, c + 1, c + 1)
    states = torch.einsum("bhkl,blhpn->bkhpn", chunk_decay.to(x.dtype), states)
    # 4. What the state entering each chunk adds at slot i: C_i . h decayed through slots 0..i.
    into = torch.exp(a.cumsum(-1)).transpose(2, 3).to(x.dtype)  # (b, c, Q, H)
    y = y + torch.einsum("bcin,bchpn->bcihp", C, states[:, :-1]) * into[..., None]
    return y.reshape(b, n_chunks * Q, H, P)[:, :T], states[:, -1]


def ssm_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """One position of the recurrence, exactly: x (b, H, P), dt (b, H), B, C (b, N), h (b, H, P, N)."""
    decay = torch.exp(dt.float() * A.float()).to(h.dtype)  # (b, H)
    h = h * decay[..., None, None] + (x * dt[..., None])[..., None] * B[:, None, None, :]
    return (h * C[:, None, None, :]).sum(-1), h


class SSMState(NamedTuple):
    conv: tuple[Tensor, ...]  # per layer (B, ssm_conv - 1, conv channels): the last inputs of the conv
    ssm: tuple[Tensor, ...]  # per layer (B, H, P, N): the recurrent state h
    length: int  # slots consumed
    pad: Tensor  # (B,) left-pad slots per row
    ragged: bool  # whether any row is padded: pad slots are then masked per row


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_inner = cfg.ssm_expand * cfg.n_embd
        self.head_dim, self.d_state, self.chunk = cfg.ssm_head_dim, cfg.ssm_state, cfg.ssm_chunk
        self.n_heads = self.d_inner // self.head_dim
        self.conv_dim = self.d_inner + 2 * self.d_state  # x, B and C go through the conv
        self.in_proj = nn.Linear(cfg.n_embd, self.d_inner + self.conv_dim + self.n_heads, bias=cfg.bias)  # z, xBC, dt
        # Depthwise; causal because its left context is the state's last inputs, not padding.
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.ssm_conv, groups=self.conv_dim)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        # LayerNorms here and in the block where Mamba-2 has RMSNorms: on CPU torch's LayerNorm is
        # one fused kernel and its RMSNorm several, 15% of a decoding step; and the GPT blocks use them.
        self.norm = nn.LayerNorm(self.d_inner, bias=cfg.bias)
        self.out_proj = nn.Linear(self.d_inner, cfg.n_embd, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-2's init for what is not a plain projection (the backbone initialises those)."""
        k = self.conv.kernel_size[0]
        nn.init.uniform_(self.conv.weight, -1 / math.sqrt(k), 1 / math.sqrt(k))  # fan-in k per channel
        nn.init.zeros_(self.conv.bias)
        # Step sizes log-uniform in [1e-3, 1e-1]: dt_bias is their inverse softplus, so that
        # softplus(dt_bias) starts there; log(expm1(dt)) = dt + log(1 - exp(-dt)), stable for small dt.
        dt = torch.exp(torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))  # decays A in [-16, -1]
        nn.init.ones_(self.D)
        nn.init.ones_(self.norm.weight)

    def forward(self, u: Tensor, conv_state: Tensor, h: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """u (b, T, C) after conv_state (b, K-1, conv_dim) and h (b, H, P, N); valid (b, T) 0 on pad slots."""
        b, T, _ = u.shape
        H, P, N = self.n_heads, self.head_dim, self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)
        if valid is not None:
            xBC = xBC * valid[..., None]  # a pad slot feeds the conv what a fresh start does: zeros
        xBC = torch.cat([conv_state, xBC], 1)  # (b, K-1+T, conv_dim): the conv's left context first
        conv_state = xBC[:, T:]  # the last K-1 inputs, for the next call
        # The depthwise conv as K shifted products: no transposes, 1.8x faster than conv1d on CPU here.
        w = self.conv.weight[:, 0]  # (conv_dim, K)
        if T == 1:  # one window: a single product and sum
            xBC = (xBC * w.t()).sum(1, keepdim=True)
        else:
            xBC = sum(xBC[:, k : k + T] * w[:, k] for k in range(w.shape[1]))
        xBC = F.silu(xBC + self.conv.bias)  # (b, T, conv_dim)
        x, B, C = xBC.split([self.d_inner, N, N], dim=-1)
        x = x.unflatten(-1, (H, P))  # (b, T, H, P)
        dt = F.softplus(dt + self.dt_bias)  # (b, T, H)
        if valid is not None:
            dt = dt * valid[..., None]  # dt = 0: no decay and no write, h passes a pad slot unchanged
        A = -torch.exp(self.A_log.float())  # (H,)
        if T == 1:
            y, h = ssm_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h)
            y = y[:, None]
        elif u.is_cuda and cuda_scan() is not None:
            y, h = cuda_scan()(x, dt, A, B[:, :, None], C[:, :, None], self.chunk, initial_states=h, return_final_states=True)
        else:
            y, h = ssd_scan(x, dt, A, B, C, self.chunk, h)
        y = y + x * self.D[:, None]  # (b, T, H, P)
        y = self.norm(y.flatten(2) * F.silu(z))  # gated norm, gate before the norm as in Mamba-2
        return self.out_proj(y), conv_state, h


class SSMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mixer = Mamba2Mixer(cfg)
        self.drop = dropout(cfg.dropout)
        self.norm_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, conv_state: Tensor, h: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        a, conv_state, h = self.mixer(self.norm_1(x), conv_state, h, valid)
        x = x + self.drop(a)
        return x + self.mlp(self.norm_2(x)), conv_state, h


class SSMBackbone(nn.Module):
    """(B, T, n_embd) -> (B, T, n_embd), continuing from a recurrent state; no final norm (the LM owns it).

    No position embedding: the recurrence orders the slots. `n_positions` is kept as a window
    all the same, so that sampling slides where the attention backbone does and the model never
    runs longer than it was trained.
    """

    def __init__(self, cfg: ModelConfig, n_positions: int):
        super().__init__()
        self.n_positions = n_positions
        self.drop = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SSMBlock(cfg) for _ in range(cfg.n_layer))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):  # GPT-2 init of the projections
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            for block in self.blocks:  # residual projections scaled down by depth
                for proj in (block.mixer.out_proj, block.mlp.proj):
                    nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def empty_state(
        self,
        batch_size: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        pad: Tensor | None = None,
        reserve: int = 0,
    ) -> SSMState:
        """Zero conv inputs and zero h; `pad` (B,) left-pad slots per row. `reserve` is not needed here
        (the state does not grow) and is accepted for the interface's sake."""
        mixers = [block.mixer for block in self.blocks]
        conv = tuple(torch.zeros(batch_size, m.conv.kernel_size[0] - 1, m.conv_dim, device=device, dtype=dtype) for m in mixers)
        ssm = tuple(torch.zeros(batch_size, m.n_heads, m.head_dim, m.d_state, device=device, dtype=dtype) for m in mixers)
        pad, ragged = row_pads(batch_size, device, pad)
        return SSMState(conv, ssm, 0, pad, ragged)

    def forward(self, x: Tensor, state: SSMState) -> tuple[Tensor, SSMState]:
        past, T = state.length, x.shape[1]
        if past + T > self.n_positions:
            raise LadderError(f"positions {past}..{past + T - 1} run past the window of {self.n_positions} positions")
        valid = None
        if state.ragged:
            slots = torch.arange(past, past + T, device=x.device)
            valid = (slots[None] >= state.pad[:, None]).to(x.dtype)  # (B, T): 0 on row r's first pad[r] slots
        x = self.drop(x)
        conv, ssm = [], []
        for block, conv_state, h in zip(self.blocks, state.conv, state.ssm):
            x, conv_state, h = block(x, conv_state, h, valid)
            conv.append(conv_state)
            ssm.append(h)
        return x, state._replace(conv=tuple(conv), ssm=tuple(ssm), length=past + T)
