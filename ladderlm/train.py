"""The training loop: AdamW, warmup + cosine, gradient accumulation, eval, logs, checkpoints, resume."""

from __future__ import annotations

import math
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, distributed, objectives
from .config import ARCHITECTURE_KEYS, Config, differing_keys, get_key, json_line, load_json, save_json, write_whole
from .data import TokenData, check_new_dir
from .errors import LadderError, TrainingInterrupted
from .model import LadderLM, RungNorm
from .plot import plot_losses, read_metrics


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (default max_iters)."""
    t = cfg.train
    decay_iters = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


def make_optimizer(module: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """Weight decay on matrices only: not on norms (the per-rung norm weights are matrices too) or biases."""
    params = [p for p in module.parameters() if p.requires_grad]
    norms = {id(p) for m in module.modules() if isinstance(m, RungNorm) for p in m.parameters()}
    groups = [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in norms], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.dim() < 2 or id(p) in norms], "weight_decay": 0.0},
    ]
    fused = params[0].device.type in ("cpu", "cuda")  # one kernel per step: ~7% of a CPU step saved
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=(cfg.train.beta1, cfg.train.beta2), fused=fused)


class Objective(nn.Module):
    """What training minimises: the model's loss, plus Next-Latent Prediction when `nextlat.horizon` > 0.

    The GPT (n_step = 1) learns a latent dynamics model psi beside it, checkpointed but never used
    to sample; a ladder is its own latent dynamics and rolls itself out (`LadderLM.rollout`).
    """

    def __init__(self, model: LadderLM, cfg: Config):
        super().__init__()
        self.model, self.nextlat = model, cfg.nextlat
        self.psi = None
        if cfg.nextlat.horizon and cfg.model.n_step == 1:
            with torch.random.fork_rng(devices=[]):  # psi is made on the CPU; its init leaves the training RNG alone
                torch.random.default_generator.manual_seed(cfg.train.seed + 3)
                self.psi = objectives.LatentDynamics(cfg.model.n_embd, cfg.nextlat.width or 4 * cfg.model.n_embd)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, passes: int = 0) -> torch.Tensor:
        """The loss over windows idx; `passes` overrides model.train_passes (0: keep it)."""
        n, m = self.nextlat, self.model
        if not (n.horizon and (n.lambda_h or n.lambda_kl)):
            return m.loss(idx, targets, passes=passes)
        x, clean, y, targets = m.window(idx, targets)  # one pass (validated): over the noised truth, or blank slots
        loss = objectives.ladder_loss(m.cfg, m.logits(y), y, x, targets, m.alpha, m.in_norm)
        if self.psi is not None:
            latents = y[:, :, -1]  # (B, T, C): one rung
            head = m.lm_head.weight.detach()
            l_h, l_kl = objectives.nextlat_losses(latents, m.wte(targets).detach(), head, self.psi, n.horizon)
        else:
            l_h, l_kl = objectives.ladder_rollout_losses(m, x, clean, y, targets, n.horizon, with_latent=n.lambda_h > 0)
        return loss + n.lambda_h * l_h + n.lambda_kl * l_kl


@torch.no_grad()
def estimate_loss(
    model: LadderLM, data: TokenData, cfg: Config, ddp: distributed.Dist, stop: Callable[[], bool] = lambda: False
) -> dict[str, float] | None:
    """Mean loss over eval_iters batches per split, drawn from a fixed seed so every eval sees the same ones;
    None if `stop()` (asked before each batch, a collective under DDP) turns true first.

    Under DDP the batches are global, as in training: each rank scores its own rows and the ranks
    average, so N processes with batch b estimate what one process with batch N * b does.
    """
    device = ddp.device
    model.eval()
    means = []
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(cfg.train.seed + 1)
        # Its own stream (leaves the training RNG alone), each rank's different, as its rows are.
        noise = torch.Generator(device=device).manual_seed(rank_seed(cfg.train.seed + 2, ddp.rank))
        losses = []
        for _ in range(cfg.train.eval_iters):
            if stop():  # a long evaluation must not outlast a scheduler's grace period
                model.train()
                return None
            x, y = data.batch(split, cfg.train.batch_size, cfg.model.block_size, g, shard=(ddp.rank, ddp.world))
            losses.append(model.loss(x.to(device), y.to(device), noise))
        means.append(torch.stack(losses).mean())
    train_loss, val_loss = ddp.mean(torch.stack(means)).tolist()  # one sync per eval (and one a batch for `stop` under DDP)
    model.train()
    return {"train_loss": train_loss, "val_loss": val_loss}


@dataclass
class Window:
    """The steps since the last metrics record: sums over them, and their time (less evaluations)."""

    steps: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0  # before clipping
    clipped: int = 0  # steps train.grad_clip scaled down
    seconds: float = 0.0  # the steps' time up to `started` (in an earlier process, for a resumed window)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def add(self, loss: float, grad_norm: float, clipped: bool) -> None:
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.clipped += clipped

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started

    def means(self, tokens_per_step: int) -> dict[str, float]:
        n = self.steps
        return {
            "loss": self.loss / n,
            "tokens_per_s": n * tokens_per_step / self.elapsed(),
            "grad_norm": self.grad_norm / n,
            "clipped": self.clipped / n,
        }

    def state(self) -> dict:
        """What a checkpoint saves (plain numbers); Window(**state) continues it."""
        return {"steps": self.steps, "loss": self.loss, "grad_norm": self.grad_norm, "clipped": self.clipped,
                "seconds": self.elapsed()}  # fmt: skip


def rng_states() -> dict:
    """Python, numpy and torch RNG states, in types a weights-only torch.load reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python_rng": random.getstate(),
        "numpy_rng": [name, keys.tolist(), pos, has_gauss, cached],
        "torch_rng": torch.get_rng_state(),
        **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),  # this process's device
    }


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own random stream (rank 0 keeps `seed`'s)."""
    return seed + 1_000_003 * rank


def set_rng_states(state: dict) -> None:
    random.setstate(state["python_rng"])
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        saved, device = state["cuda_rng"], torch.cuda.current_device()
        if isinstance(saved, list):  # older checkpoints hold every device's state
            saved = saved[device] if device < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(saved)


class StopSignals:
    """Turns SIGINT and SIGTERM into a request to stop after the current step; a second SIGINT aborts.

    A second SIGTERM does not: a scheduler's and torchrun's own can both reach a worker at once."""

    def __init__(self):
        self.received: list[int] = []
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum: int, _frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received.append(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Where a run writes: the out dir and its files."""

    out: Path

    @property
    def ckpt(self) -> Path:
        return self.out / "ckpt"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def log(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json_line(record) + "\n")

    def records(self) -> list[dict]:
        """The records of metrics.jsonl less a torn last line (a crash inside a write); a corrupt line
        elsewhere is an error, as in `plot`."""
        return read_metrics(self.out) if self.metrics.exists() else []

    def rewrite_metrics(self, records: list[dict]) -> None:
        write_whole(self.metrics, "".join(json_line(r) + "\n" for r in records))

    def claim(self, cfg: Config, fresh: bool) -> None:
        """Write config.json, and check that the dir takes the new files every checkpoint needs, before
        any step is spent. A new run creates config.json: a second one starting beside it stops here."""
        try:
            save_json(cfg, self.out / "config.json", exclusive=fresh)
            tempfile.NamedTemporaryFile(dir=self.out).close()
        except FileExistsError:
            raise LadderError(f"another run is starting in {self.out}; choose another --out") from None
        except OSError as e:
            raise LadderError(f"cannot write in {self.out} ({e.strerror or e}); choose a writable --out") from None

    def began(self) -> bool:
        """Whether a run began here: its metrics, or its config.json alone (it failed before its first step)."""
        if self.metrics.exists():
            return True
        try:
            load_json(self.out / "config.json")
        except LadderError:
            return False
        return True

    def check_fresh(self) -> None:
        """A new run needs an out dir that is absent or empty: never write over a run or a user's files."""
        if self.ckpt.exists() or self.ckpt.with_name("ckpt.old").exists():
            raise LadderError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if self.began():
            raise LadderError(
                f"{self.out} holds a run that stopped before its first checkpoint; remove it or choose another --out"
            )
        check_new_dir(self.out)


@dataclass
class Start:
    """Where training starts: step 0, or where a resume restores it to."""

    step: int = 0
    skipped: int = 0  # non-finite steps skipped so far, against train.skip_nonfinite
    window: Window = field(default_factory=Window)  # the steps not logged yet
    kept: list[dict] = field(default_factory=list)  # the records up to the checkpoint, less the evaluation at its step
    reevaluate: int = -1  # the step whose evaluation a resume does (again), with its own settings


def restore(
    run: Run,
    cfg: Config,
    state: dict,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    ddp: distributed.Dist,
) -> Start:
    """Load the checkpoint's weights, optimizer state and this rank's random streams; where to start again."""
    resumed, saved, _ = checkpoint.load(run.ckpt, ddp.device)
    changed = differing_keys(saved, cfg)
    # Some of these load without error (another n_head, an SSM's block_size) yet change what the weights compute.
    if architecture := [key for key in changed if key in ARCHITECTURE_KEYS]:
        values = [f"{key} ({get_key(saved, key)} in the checkpoint, {get_key(cfg, key)} now)" for key in architecture]
        raise LadderError(f"cannot resume with another {', '.join(values)}: the trained weights are for the checkpoint's")
    try:
        objective.model.load_state_dict(resumed.state_dict())
        if objective.psi is not None:
            checkpoint.load_module(run.ckpt, "psi", objective.psi)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, setting in zip(optimizer.param_groups, settings, strict=True):
            group.update(setting)  # the config's weight decay and betas, not the checkpoint's: a resume may change them
    except (KeyError, TypeError, IndexError) as e:  # an optimizer state of another shape than torch saves
        why = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise LadderError(f"{run.ckpt / 'trainer.pt'} is corrupt: its optimizer state is not torch's ({why})") from None
    except (RuntimeError, ValueError, LadderError) as e:
        if not changed:  # the checkpoint's own files disagree
            raise LadderError(f"{run.ckpt} is corrupt: {str(e).splitlines()[0]}") from None
        raise LadderError(f"cannot resume with another {', '.join(changed)}: the trained weights do not fit it") from None
    step = state["step"]
    try:
        ranks = state.get("rank_rng", [state])  # every rank's random streams (older checkpoints: rank 0's, at the top)
        if ddp.rank < len(ranks):
            set_rng_states(ranks[ddp.rank])
        else:  # a rank the checkpoint has no stream for: a fresh one of its own
            set_rng_states(ranks[0])
            torch.manual_seed(rank_seed(cfg.train.seed, ddp.rank) + step)
        data_gen.set_state(state["data_rng"])
        window = Window(**state.get("window", {}))  # checkpoints before it was saved hold none: a new window
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise LadderError(
            f"{run.ckpt / 'trainer.pt'} is corrupt: its random streams or window cannot be restored ({e!r})"
        ) from None
    records = run.records()  # read by every rank before rank 0 rewrites them: all decide alike
    return Start(
        step=step,
        skipped=state.get("skipped", 0),  # checkpoints before the count was saved hold none
        window=window,
        kept=[r for r in records if r["step"] < step or (r["step"] == step and "val_loss" not in r)],
        # Its evaluation logged, or due and not logged (the checkpoint came first, or a signal stopped it).
        reevaluate=step if state.get("evaluation_due") or any(r["step"] == step and "val_loss" in r for r in records) else -1,
    )


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run, in one process or one rank of a torchrun job; returns the final eval losses."""
    data = TokenData.open(data_dir)
    run = Run(Path(out_dir))
    ddp = distributed.init(cfg.train.device)
    try:
        losses = _train(cfg, data, run, ddp, resume, progress)
        ddp.barrier()  # leave together: gloo can abort a rank that tears down while another still works
        return losses
    finally:
        ddp.close()


def _train(cfg: Config, data: TokenData, run: Run, ddp: distributed.Dist, resume: bool, progress: bool) -> dict:
    device = ddp.device
    if resume:
        ddp.on_main(lambda: checkpoint.recover(run.ckpt))  # a crash inside a checkpoint write; the others wait for it
        state = checkpoint.load_trainer_state(run.ckpt)
        trained_on = (state["data_sha256"], state["tokenizer"], cfg.model.vocab_size)
        if trained_on != (data.meta["sha256"], data.tokenizer.kind, data.meta["vocab_size"]):
            raise LadderError(f"{data.path} is not the data this run was trained on (corpus or tokenizer differs)")
        if cfg.train.max_iters < state["step"]:
            raise LadderError(f"the checkpoint is at step {state['step']}; train.max_iters={cfg.train.max_iters} is before it")
    else:
        run.check_fresh()
    cfg.model.vocab_size = data.meta["vocab_size"]
    if len(data.train) < cfg.model.block_size or len(data.val) < cfg.model.block_size:
        raise LadderError(f"{data.path}: each split needs at least block_size={cfg.model.block_size} tokens")

    torch.manual_seed(cfg.train.seed)
    model = LadderLM(cfg.model).to(device)
    objective = Objective(model, cfg).to(device)
    optimizer = make_optimizer(objective, cfg)
    data_gen = torch.Generator().manual_seed(cfg.train.seed)  # the same on every rank: one global batch
    if ddp.rank:  # every rank made the same weights; from here each draws its own noise and dropout
        torch.manual_seed(rank_seed(cfg.train.seed, ddp.rank))
    start = restore(run, cfg, state, objective, optimizer, data_gen, ddp) if resume else Start()
    step, skipped, window = start.step, start.skipped, start.window
    losses: dict[str, float] = {}
    evaluated = -1  # the step last evaluated: a skipped step comes back to the same one

    def evaluation_due() -> bool:
        return (step % t.eval_interval == 0 or step == t.max_iters or step == start.reevaluate) and step != evaluated

    ddp.barrier()  # every rank has checked the out dir before rank 0 writes to it

    def claim() -> None:
        if resume:
            run.rewrite_metrics(start.kept)
        run.out.mkdir(parents=True, exist_ok=True)
        run.claim(cfg, fresh=not resume)

    ddp.on_main(claim)
    # NextLat with both weights 0 keeps psi (and a resume's optimizer state) but trains it with nothing: DDP must not wait for it.
    idle_psi = objective.psi is not None and not (cfg.nextlat.lambda_h or cfg.nextlat.lambda_kl)
    trained = ddp.wrap(torch.compile(objective) if cfg.train.compile else objective, find_unused=idle_psi)

    def save_checkpoint() -> None:
        # A finite loss can still leave non-finite weights (a learning rate past float32's range): never save them.
        # Every rank holds the same weights, so all stop here together.
        if not torch.stack([p.isfinite().all() for p in objective.parameters()]).all():
            raise LadderError(
                f"step {step}: the weights are not finite after the update; training stopped, nothing saved. "
                f"The last good checkpoint is {run.ckpt}"
                + ("" if run.ckpt.exists() else " (none written yet)")
                + "; lower train.learning_rate"
            )
        streams = ddp.gather(rng_states())  # a collective: every rank saves at the same steps

        def save() -> None:
            trainer_state = {
                "step": step,
                "skipped": skipped,  # non-finite steps skipped so far, against train.skip_nonfinite
                "evaluation_due": evaluation_due(),  # a resume at this step evaluates first, as this run would have
                "window": window.state(),  # the steps not logged yet: a resumed run logs them as this one would
                "optimizer": optimizer.state_dict(),
                "rank_rng": streams,
                "data_rng": data_gen.get_state(),
                "data_sha256": data.meta["sha256"],
                "tokenizer": data.tokenizer.kind,
            }
            extras = {} if objective.psi is None else {"psi": objective.psi}
            try:
                checkpoint.save(run.ckpt, model, cfg, data.tokenizer, trainer_state, extras)
            except OSError as e:
                raise LadderError(f"cannot write a checkpoint in {run.out} ({e.strerror or e}); the last one stays") from None

        ddp.on_main(save)

    from torch.utils.tensorboard import SummaryWriter

    # A resume hides the events from its step on and writes again those of metrics.jsonl it kept at that step.
    writer = SummaryWriter(str(run.out / "tb"), purge_step=step if resume else None) if ddp.main else None

    def to_tensorboard(record: dict) -> None:
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(k, v, record["step"])

    for record in [r for r in start.kept if r["step"] == step] if ddp.main else []:
        to_tensorboard(record)
    t = cfg.train
    tokens_per_step = t.batch_size * ddp.world * t.grad_accum * cfg.model.block_size
    bar = tqdm(total=t.max_iters, initial=step, disable=not (progress and ddp.main), unit="it", dynamic_ncols=True)
    precision = distributed.autocast(device, t.precision)
    objective.train()
    window.restart_clock()
    signals = StopSignals()

    def stopped_here() -> TrainingInterrupted:
        save_checkpoint()
        name = signal.Signals(signals.received[0]).name if signals.received else "a signal on another rank"
        return TrainingInterrupted(f"{name}: stopped at step {step}; checkpoint in {run.ckpt}; continue with --resume")

    def say(message: str) -> None:
        if ddp.main:
            bar.write(message)

    def log(record: dict) -> None:
        def write() -> None:
            run.log(record)
            to_tensorboard(record)

        ddp.on_main(write)

    def log_window(lr: float) -> None:
        nonlocal window
        record = {"step": step, **window.means(tokens_per_step), "lr": lr}
        log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        window = Window()

    try:
        if step == t.max_iters and window.steps:  # a resume at the last step: its unlogged steps end the run, as they would have
            log_window(learning_rate(step - 1, cfg))
            save_checkpoint()  # as a finished run's: its window logged
        while True:
            if evaluation_due():
                eval_start = time.perf_counter()
                # Every rank scores its rows; all get the mean, or all stop if any was asked to.
                losses = estimate_loss(model, data, cfg, ddp, stop=lambda: ddp.any(bool(signals.received)))
                window.started += time.perf_counter() - eval_start  # tokens/s of the window's steps, not of this eval
                if losses is None:
                    raise stopped_here()
                log({"step": step, **losses})
                evaluated = step
                say(f"step {step}: train {losses['train_loss']:.4f}, val {losses['val_loss']:.4f}")
            if step >= t.max_iters:
                break
            lr = learning_rate(step, cfg)
            passes = t.early_passes if step < t.early_passes_iters else 0  # 0: model.train_passes
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(t.grad_accum):
                x, y = data.batch("train", t.batch_size, cfg.model.block_size, data_gen, shard=(ddp.rank, ddp.world))
                with ddp.no_sync(trained, micro == t.grad_accum - 1), precision:
                    loss = trained(x.to(device, non_blocking=True), y.to(device, non_blocking=True), passes)
                    (loss / t.grad_accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), t.grad_clip or float("inf"))
            # One reduction a step: the loss averaged over ranks, and whether any rank was asked to stop.
            stop_asked = torch.tensor(float(bool(signals.received)), device=device)
            checked = ddp.mean(torch.stack([loss_sum / t.grad_accum, grad_norm, stop_asked]))
            mean_loss, grad_norm, stop = checked.tolist()  # the step's one host sync guards the weights
            finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
            if not finite:  # the weights stay as they are; a stop asked meanwhile is still acted on below
                optimizer.zero_grad(set_to_none=True)
                what = ", ".join(
                    f"{name} is {v}" for name, v in (("loss", mean_loss), ("gradient norm", grad_norm)) if not math.isfinite(v)
                )
                if skipped >= t.skip_nonfinite:
                    raise LadderError(
                        f"step {step + 1}: {what}; training stopped. The last good checkpoint is {run.ckpt}"
                        + ("" if run.ckpt.exists() else " (none written yet)")
                        + "; lower train.learning_rate or allow skips with train.skip_nonfinite=N"
                    )
                skipped += 1
                say(f"step {step + 1}: {what}; skipped ({skipped} of train.skip_nonfinite={t.skip_nonfinite})")
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.add(mean_loss, grad_norm, clipped=bool(t.grad_clip) and grad_norm > t.grad_clip)
                bar.update(1)
                if step % t.log_interval == 0 or step == t.max_iters:
                    log_window(lr)
            if stop:
                raise stopped_here()
            if finite and (step % t.checkpoint_interval == 0 or step == t.max_iters):
                save_checkpoint()
    finally:
        signals.restore()
        bar.close()
        if writer is not None:
            writer.close()
    ddp.on_main(lambda: plot_losses([run.out], run.out / "loss.png"))
    return losses
