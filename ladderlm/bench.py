"""Speed measurements with random weights: matmul peak, training throughput, decoding."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .config import Config, load_config
from .model import LadderLM
from .sampling import decode, sampler
from .train import make_optimizer, resolve_device

BENCH_VOCAB = 65  # tiny Shakespeare's characters


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a large square matmul: the practical peak this machine offers torch."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats)


def train_flops_per_token(model: LadderLM, cfg: Config) -> float:
    """nanoGPT's estimate: 6 N (weights, without position embeddings) plus attention's 12 L C T."""
    m = cfg.model
    n_params = model.num_params() - model.backbone.wpe.weight.numel()
    return 6 * n_params + 12 * m.n_layer * m.n_embd * (m.block_size + m.n_step - 1)


def train_tokens_per_s(model: LadderLM, cfg: Config, device: torch.device, repeats: int, steps: int = 10) -> float:
    """Forward, backward and AdamW step on random batches: the bare loop, no data loading or logging."""
    optimizer = make_optimizer(model, cfg)
    t = cfg.train
    x = torch.randint(cfg.model.vocab_size, (t.batch_size, cfg.model.block_size), device=device)
    model.train()

    def run() -> None:
        for _ in range(steps):
            _, loss = model(x, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return steps * t.batch_size * cfg.model.block_size / median_seconds(run, repeats)


@torch.inference_mode()
def recompute_decode(model: LadderLM, prompt: torch.Tensor, n_new: int, pick) -> torch.Tensor:
    """nanoGPT-style generation: the whole (cropped) window is recomputed for every new token."""
    block, S = model.cfg.block_size, model.n_step
    tokens = prompt
    for i in range(n_new):
        window = torch.cat([tokens[:, :1], tokens[:, 1:][:, max(0, tokens.shape[1] - block) :]], 1)
        logits, _ = model(window)
        tokens = torch.cat([tokens, pick(logits[:, -1, S - 1], i)[:, None]], 1)
    return tokens[:, prompt.shape[1] :]


def run_bench(preset: str, overrides: list[str] = (), repeats: int = 5, prompt_len: int = 64, n_new: int = 256) -> dict:
    cfg = load_config(preset, overrides=overrides)
    cfg.model.vocab_size = BENCH_VOCAB
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    model = LadderLM(cfg.model).to(device)
    tokens_per_s = train_tokens_per_s(model, cfg, device, repeats)
    peak = matmul_peak_flops()
    flops = train_flops_per_token(model, cfg) * tokens_per_s

    model.eval()
    prompt = torch.randint(BENCH_VOCAB, (1, prompt_len + 1), device=device)
    greedy = sampler(0.0, None, None, torch.Generator(device=device))
    cached_s = median_seconds(lambda: decode(model, prompt, n_new, greedy), repeats)
    recompute_s = median_seconds(lambda: recompute_decode(model, prompt, n_new, greedy), repeats)
    return {
        "preset": preset,
        "overrides": list(overrides),
        "prompt_tokens": prompt_len,
        "new_tokens": n_new,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "params": model.num_params(),
        "matmul_peak_gflops": peak / 1e9,
        "train_tokens_per_s": tokens_per_s,
        "train_gflops": flops / 1e9,
        "train_fraction_of_matmul_peak": flops / peak,
        "decode_tokens_per_s": {"cached": n_new / cached_s, "recompute": n_new / recompute_s},
        "cached_speedup": recompute_s / cached_s,
    }
