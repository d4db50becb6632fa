"""Speed with random weights, ladder against the GPT of the same widths and depths.

The `ssm_*` entries are the same two models with the SSM backbone (`model.backbone = "ssm"`).
Every figure is the median of `repeats` timed runs after one warm-up run. Figures that are
compared in a ratio are timed in interleaved rounds (one run of each per round), so that a
drift in the machine's speed during the bench moves both sides of the ratio alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .config import Config, load_config
from .distributed import resolve_device
from .errors import LadderError
from .model import LadderLM
from .sampling import decode, sampler, single_position_kernels
from .train import make_optimizer

BENCH_VOCAB = 65  # tiny Shakespeare's characters


def finish_queued_work() -> None:
    """Wait for queued GPU kernels, so that a clock read after a call times the work, not its launch."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if torch.backends.mps.is_available():
        torch.mps.synchronize()


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn over `repeats` rounds that run every fn once, after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            finish_queued_work()
            start = time.perf_counter()
            fn()
            finish_queued_work()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    return median_times({"fn": fn}, repeats, warmup)["fn"]


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a large square matmul on the device: the practical peak it offers torch."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats)


def train_flops_per_token(model: LadderLM) -> float:
    """nanoGPT's estimate per pass: 6 N (weights, without position embeddings) plus attention's 12 L C T;
    a pass without gradients counts a third (its forward). For the SSM backbone only the 6 N of
    its weights: its scan's own FLOPs are not counted."""
    m = model.cfg
    passes, with_grad = model.pass_counts()
    per_pass = 6 * model.num_params()
    if m.backbone == "attention":
        per_pass = 6 * (model.num_params() - model.backbone.wpe.weight.numel()) + 12 * m.n_layer * m.n_embd * model.n_positions
    return per_pass * (with_grad + (passes - with_grad) / 3)


def train_tokens_per_s(models: dict[str, tuple[LadderLM, int]], cfg: Config, repeats: int, steps: int = 5) -> dict[str, float]:
    """Forward, backward and AdamW step on random batches, the models in alternating rounds: the bare
    loop, no data loading or logging. An entry (model, P) trains with P passes per step (0: train_passes)."""
    t = cfg.train
    tokens = steps * t.batch_size * cfg.model.block_size

    def training(model: LadderLM, passes: int) -> Callable[[], None]:
        optimizer = make_optimizer(model, cfg)
        x = torch.randint(model.cfg.vocab_size, (t.batch_size, model.cfg.block_size), device=model.wte.weight.device)

        def run() -> None:
            for _ in range(steps):
                loss = model.loss(x, x, passes=passes)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))  # 0: no clipping, as in training
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run

    for model, _ in models.values():
        model.train()
    seconds = median_times({name: training(*entry) for name, entry in models.items()}, repeats)
    for model, _ in models.values():
        model.eval()
    return {name: tokens / s for name, s in seconds.items()}


def ladder_training_rates(name: str, ladder: LadderLM, cfg: Config) -> dict[str, tuple[LadderLM, int]]:
    """What to time for a ladder's recipe: a step at `model.train_passes`, and with a
    `train.early_passes` schedule also a step at that many passes."""
    early = cfg.train.early_passes
    return {f"{name}_train_passes": (ladder, 0)} | ({f"{name}_early_passes": (ladder, early)} if early else {})


def recipe_rate(name: str, rates: dict[str, float], cfg: Config) -> float:
    """Tokens/s over a whole run of the recipe: early_passes_iters steps at the early rate, the rest at train_passes."""
    t = cfg.train
    early_steps = min(t.early_passes_iters, t.max_iters) if t.early_passes else 0
    seconds = (t.max_iters - early_steps) / rates[f"{name}_train_passes"]  # per token of every step
    if early_steps:
        seconds += early_steps / rates[f"{name}_early_passes"]
    return t.max_iters / seconds


@torch.inference_mode()
@single_position_kernels()  # the same kernels as `decode`, which is faster here for windows this size too
def recompute_decode(model: LadderLM, prompt: torch.Tensor, n_new: int, pick) -> torch.Tensor:
    """nanoGPT-style generation: the whole (cropped) window is recomputed for every new token."""
    block, S = model.cfg.block_size, model.n_step
    tokens = prompt
    for i in range(n_new):
        window = torch.cat([tokens[:, :1], tokens[:, 1:][:, max(0, tokens.shape[1] - block) :]], 1)
        logits, _ = model(window)
        tokens = torch.cat([tokens, pick(logits[:, -1, S - 1], i)[:, None]], 1)
    return tokens[:, prompt.shape[1] :]


def first_logits(model: LadderLM, prompts: torch.Tensor, n_new: int, parallel: bool) -> torch.Tensor:
    """Clean-rung logits of the first n_new greedy tokens, (N, n_new, V)."""
    seen = []

    def pick(logits: torch.Tensor, _i: int) -> torch.Tensor:
        seen.append(logits)
        return logits.argmax(-1)

    decode(model, prompts, n_new, pick, parallel_prefill=parallel, generator=torch.Generator(prompts.device).manual_seed(0))
    return torch.stack(seen, 1)


def run_bench(
    preset: str = "bench", overrides: list[str] = (), repeats: int = 5, prompt_len: int = 256, n_new: int = 256
) -> dict:
    cfg = load_config(preset, overrides=overrides)
    try:
        load_config(preset, overrides=[*overrides, "model.backbone=ssm"])
    except LadderError as e:
        raise LadderError(f"bench also runs an SSM pair of the same sizes: {e}") from None
    cfg.model.vocab_size = BENCH_VOCAB
    prompt_len = min(prompt_len, cfg.model.block_size // 2)  # a smaller window: the prompt fills half of it
    device = resolve_device(cfg.train.device)

    def build(n_step: int, backbone: str, **keys) -> LadderLM:
        torch.manual_seed(0)
        model_cfg = type(cfg.model)(**{**vars(cfg.model), "n_step": n_step, "backbone": backbone, **keys})
        if n_step == 1:
            model_cfg.latent_loss_scale = 0.0  # the GPT baseline trains on cross-entropy alone
        return LadderLM(model_cfg).to(device).eval()

    models = {"ladder": build(cfg.model.n_step, cfg.model.backbone), "gpt": build(1, cfg.model.backbone)}
    ssm = {"ssm_ladder": build(cfg.model.n_step, "ssm"), "ssm_gpt": build(1, "ssm")}  # the same sizes, recurrent
    ladder, gpt = models["ladder"], models["gpt"]
    g = torch.Generator(device=device).manual_seed(0)
    greedy = sampler(0.0, None, None, g)

    def prompts(batch: int) -> torch.Tensor:
        return torch.randint(BENCH_VOCAB, (batch, prompt_len + 1), generator=g, device=device)

    def prefill_and_decode(model: LadderLM, batch: int, new: int, parallel: bool = True) -> Callable[[], object]:
        p = prompts(batch)
        return lambda: decode(model, p, new, greedy, parallel_prefill=parallel)

    def decode_rates(pair: dict[str, LadderLM], batch: int, rounds: int) -> dict[str, float]:
        """Tokens/s after the first token: (time to n_new tokens - time to the first) per emitted token."""
        fns = {}
        for name, model in pair.items():
            fns[f"{name}:first"] = prefill_and_decode(model, batch, 1)
            fns[f"{name}:all"] = prefill_and_decode(model, batch, n_new)
        t = median_times(fns, rounds)
        return {name: batch * (n_new - 1) / (t[f"{name}:all"] - t[f"{name}:first"]) for name in pair}

    # Prefill is short and the ratio bar is tight: more rounds than the other figures.
    prefill_rounds = 4 * repeats
    prefill = median_times(
        {
            "ladder_phased": prefill_and_decode(ladder, 1, 1),
            "ladder_naive": prefill_and_decode(ladder, 1, 1, parallel=False),
            # the prompt read on the clean rung, in the training recipe's passes (`model.prompt_read`)
            "ladder_prompt_passes": prefill_and_decode(build(cfg.model.n_step, cfg.model.backbone, prompt_read="passes"), 1, 1),
            "gpt": prefill_and_decode(gpt, 1, 1),
        },
        prefill_rounds,
    )
    decode_rate = decode_rates(models, 1, repeats)
    decode_rate |= {f"{name}_batch8": rate for name, rate in decode_rates(models, 8, repeats).items()}
    p = prompts(2)
    diff = (first_logits(ladder, p, 8, True) - first_logits(ladder, p, 8, False)).abs().max().item()
    # The ladder also with the seed's single teacher-forced pass per step, the cost of one pass.
    one_pass = build(cfg.model.n_step, cfg.model.backbone, train_passes=1, first_pass="truth")
    timed = {"gpt": (gpt, 0), **ladder_training_rates("ladder", ladder, cfg), "ladder_one_pass": (one_pass, 0)}
    train_rate = train_tokens_per_s(timed, cfg, repeats)
    train_rate["ladder"] = recipe_rate("ladder", train_rate, cfg)
    peak = matmul_peak_flops(device)
    short = prompts(1)[:, :65]  # the foundation's figure: 64-token prompt, 256 new tokens, the GPT
    cached_s = median_seconds(lambda: decode(gpt, short, n_new, greedy), repeats)
    recompute_s = median_seconds(lambda: recompute_decode(gpt, short, n_new, greedy), repeats)
    # The SSM models last, so that the attention figures above see the same prompts as without them.
    ssm_prefill = median_times({name: prefill_and_decode(model, 1, 1) for name, model in ssm.items()}, prefill_rounds)
    prefill |= {"ssm_ladder_phased": ssm_prefill["ssm_ladder"], "ssm_gpt": ssm_prefill["ssm_gpt"]}
    decode_rate |= decode_rates(ssm, 1, repeats)
    ssm_diff = (first_logits(ssm["ssm_ladder"], p, 8, True) - first_logits(ssm["ssm_ladder"], p, 8, False)).abs().max().item()
    timed = {"ssm_gpt": (ssm["ssm_gpt"], 0), **ladder_training_rates("ssm_ladder", ssm["ssm_ladder"], cfg)}
    ssm_rate = train_tokens_per_s(timed, cfg, repeats)
    train_rate |= ssm_rate | {"ssm_ladder": recipe_rate("ssm_ladder", ssm_rate, cfg)}
    return {
        "preset": preset,
        "overrides": list(overrides),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "params": {name: model.num_params() for name, model in {**models, **ssm}.items()},
        "prompt_tokens": prompt_len,
        "new_tokens": n_new,
        "prefill_ms": {k: v * 1000 for k, v in prefill.items()},
        "decode_tokens_per_s": decode_rate,
        "train_tokens_per_s": train_rate,
        "prefill_max_abs_diff": diff,
        "ssm_prefill_max_abs_diff": ssm_diff,
        "ratios": {
            "prefill_naive_over_phased": prefill["ladder_naive"] / prefill["ladder_phased"],
            "prefill_phased_over_gpt": prefill["ladder_phased"] / prefill["gpt"],
            "prefill_prompt_passes_over_gpt": prefill["ladder_prompt_passes"] / prefill["gpt"],
            "decode_ladder_over_gpt": decode_rate["ladder"] / decode_rate["gpt"],
            "train_ladder_over_gpt": train_rate["ladder"] / train_rate["gpt"],  # the recipe: its schedule of passes
            "train_ladder_train_passes_over_gpt": train_rate["ladder_train_passes"] / train_rate["gpt"],
            "train_ladder_one_pass_over_gpt": train_rate["ladder_one_pass"] / train_rate["gpt"],
        },
        "matmul_peak_gflops": peak / 1e9,
        "train_fraction_of_matmul_peak": {
            name: train_flops_per_token(model) * train_rate[key] / peak
            for name, model, key in (("ladder", ladder, "ladder_train_passes"), ("gpt", gpt, "gpt"))
        },
        "gpt_decode_64_prompt": {
            "cached_tokens_per_s": n_new / cached_s,
            "recompute_tokens_per_s": n_new / recompute_s,
            "cached_speedup": recompute_s / cached_s,
        },
    }
