"""Configs as data: two dataclasses, TOML presets, and `--set section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import LadderError

CONFIG_VERSION = 1


@dataclass
class ModelConfig:
    vocab_size: int = 0  # set from the prepared data, never by hand
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64  # tokens in the context window, start-of-text token included
    dropout: float = 0.0
    bias: bool = False
    backbone: str = "attention"  # attention (GPT blocks) or ssm (Mamba-2 style blocks, backbones/ssm.py)
    ssm_state: int = 64  # ssm: state size N per head
    ssm_conv: int = 4  # ssm: taps of the causal depthwise conv
    ssm_expand: int = 1  # ssm: inner width = ssm_expand * n_embd
    ssm_head_dim: int = 32  # ssm: channels per head; heads = inner width / ssm_head_dim
    ssm_chunk: int = 64  # ssm: positions per chunk of the training scan (a speed knob, not a model change)
    n_step: int = 1  # ladder rungs S; 1 is the GPT
    tie_head: bool = True
    gamma: float = 0.0  # signal schedule shaping: alpha ** (1 - gamma)
    noise: str = "window"  # training noise: the seed's window sums, independent, or orthogonal (LayerNorm space)
    latent_loss_scale: float = 0.0  # weight of the relative latent MSE y[p, s] -> x[p+1, s]
    ce_rungs: str = "clean"  # cross-entropy on the clean rung only, or on every rung (the seed)
    ce_weighting: str = "uniform"  # per-rung CE weights: uniform, or proportional to the rung's signal alpha
    sample_fill: str = "raw"  # not-yet-emitted rungs at sampling: raw outputs, or re-noised to the rung's level
    prompt_noise: str = "sample"  # known tokens on noisy rungs at sampling: fresh noise at the rung's level, or zero
    prompt_read: str = "parallel"  # a prompt at sampling: on every rung in one pass; clean rung only, in passes or per token
    train_passes: int = 0  # passes per training step (0: n_step); later ones feed slots not emitted yet as the sampler does
    first_pass: str = "blank"  # what the first pass puts in slots not emitted yet: nothing, or the noised truth (the seed)
    grad_passes: int = 0  # backpropagate through the last this many passes (0: all); earlier ones run without a graph
    recompute_passes: bool = False  # passes before the last keep only their outputs and run again in the backward (memory knob)
    emit_head: str = "rung"  # the emitted token's logits: the clean rung's (tied) head, or plus a head over every rung
    embed_in: str = "rung"  # the clean rung's token: its rung's embedding alone, or plus one at the backbone's full width
    train_prompts: float = 0.0  # fraction of training windows that open with a random prompt, fed as the sampler feeds one


@dataclass
class TrainConfig:
    max_iters: int = 2000
    batch_size: int = 12  # per process
    grad_accum: int = 1
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay until max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500
    seed: int = 1337
    device: str = "auto"
    skip_nonfinite: int = 0  # steps with a NaN/inf loss or gradient to skip before stopping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16; master weights stay fp32
    compile: bool = False  # torch.compile the model for training
    early_passes: int = 0  # a ladder's passes per step for the first early_passes_iters steps (0: model.train_passes throughout)
    early_passes_iters: int = 0


@dataclass
class NextLatConfig:
    horizon: int = 0  # rollout steps d of Next-Latent Prediction; 0 turns it off
    lambda_h: float = 1.0  # weight of the next-latent SmoothL1 loss
    lambda_kl: float = 1.0  # weight of the KL term
    width: int = 0  # hidden width of the latent dynamics MLP psi; 0 means 4 * n_embd


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    nextlat: NextLatConfig = field(default_factory=NextLatConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "nextlat": NextLatConfig}
DERIVED_KEYS = {"model.vocab_size"}
CHOICES = {
    "model.backbone": ("attention", "ssm"),
    "model.noise": ("window", "independent", "orthogonal"),
    "model.ce_rungs": ("clean", "all"),
    "model.ce_weighting": ("uniform", "alpha"),
    "model.sample_fill": ("raw", "renoise"),
    "model.prompt_noise": ("sample", "zero"),
    "model.prompt_read": ("parallel", "passes", "stream"),
    "model.first_pass": ("blank", "truth"),
    "model.emit_head": ("rung", "full"),
    "model.embed_in": ("rung", "full"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.precision": ("auto", "fp32", "bf16"),
}


# Keys that change how a trained model samples, not its weights: `sample` and `eval` accept them.
SAMPLING_KEYS = ("model.sample_fill", "model.prompt_noise", "model.prompt_read")


def settable_keys() -> list[str]:
    keys = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return [k for k in keys if k not in DERIVED_KEYS]


def _field_type(section: str, key: str) -> type:
    types = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}
    return {"int": int, "float": float, "bool": bool, "str": str}[types[key]]


def _check_value(dotted: str, value: Any) -> Any:
    section, key = dotted.split(".", 1)
    want = _field_type(section, key)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise LadderError(f"{dotted} is too large, got an integer of {value.bit_length()} bits") from None
    if type(value) is int and not -(2**63) <= value < 2**63:  # sizes, counts and seeds reach torch as 64-bit integers
        raise LadderError(f"{dotted} is too large, got an integer of {value.bit_length()} bits")
    if type(value) is not want:
        raise LadderError(f"{dotted} must be {want.__name__}, got {value!r}")
    if want is float and not math.isfinite(value):
        raise LadderError(f"{dotted} must be a finite number, got {value}")
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise LadderError(f"{dotted} must be one of {', '.join(CHOICES[dotted])}, got {value!r}")
    return value


# What the trained weights are for: a resume may change how the model is trained or sampled, never these.
ARCHITECTURE_KEYS = frozenset(
    f"model.{key}"
    for key in "vocab_size n_layer n_head n_embd block_size bias backbone n_step tie_head emit_head embed_in".split()
    + "ssm_state ssm_conv ssm_expand ssm_head_dim".split()
)


def differing_keys(a: Config, b: Config, sections: tuple[str, ...] = ("model", "nextlat")) -> list[str]:
    """The keys of `sections` whose values differ between two configs."""
    return [f"{s}.{k}" for s in sections for k, v in vars(getattr(b, s)).items() if getattr(getattr(a, s), k) != v]


def get_key(cfg: Config, dotted: str) -> Any:
    """The value of `section.key`."""
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _unknown_key(dotted: str) -> LadderError:
    return LadderError(f"unknown config key {dotted!r}; valid keys: {', '.join(settable_keys())}")


def from_dict(data: dict[str, Any], allow_derived: bool = False) -> Config:
    """Build a Config from nested dicts, refusing unknown sections, keys and ill-typed values."""
    cfg = Config()
    for section, values in data.items():
        if section == "version":
            if type(values) is not int or values != CONFIG_VERSION:
                raise LadderError(f"config version {values!r} is not supported (this ladderlm reads {CONFIG_VERSION})")
            continue
        if section not in SECTIONS:
            raise _unknown_key(section)
        if not isinstance(values, dict):
            raise LadderError(f"{section} must be a table ([{section}]), got {values!r}")
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted not in settable_keys() and not (allow_derived and dotted in DERIVED_KEYS):
                raise _unknown_key(dotted)
            setattr(getattr(cfg, section), key, _check_value(dotted, value))
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `section.key=value` into the key and a value of the field's type."""
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip()
    if not sep:
        raise LadderError(f"--set expects key=value, got {text!r}")
    if dotted not in settable_keys():
        raise _unknown_key(dotted)
    want = _field_type(*dotted.split(".", 1))
    raw = raw.strip()
    try:
        if want is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value: Any = raw.lower() in ("true", "1")
        else:
            value = want(raw)
    except ValueError:
        raise LadderError(f"{dotted} must be {want.__name__}, got {raw!r}") from None
    return dotted, _check_value(dotted, value)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides:
        dotted, value = parse_override(text)
        section, key = dotted.split(".", 1)
        setattr(getattr(cfg, section), key, value)
    return cfg


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("ladderlm.presets").iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: an integer past Python's digit limit
        raise LadderError(f"{where}: invalid TOML: {e}") from None


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A preset or a TOML file (or the defaults), then the overrides, then validation."""
    if preset is not None and path is not None:
        raise LadderError("give either --preset or --config, not both")
    if preset is not None:
        if preset not in preset_names():
            raise LadderError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
        text = resources.files("ladderlm.presets").joinpath(f"{preset}.toml").read_text(encoding="utf-8")
        cfg = from_dict(_read_toml(text, preset))
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise LadderError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
        text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: skip a BOM, as some editors write one
        cfg = from_dict(_read_toml(text, str(path)))
    else:
        cfg = Config()
    return validate(apply_overrides(cfg, list(overrides)))


def validate(cfg: Config) -> Config:
    m, t = cfg.model, cfg.train
    positive = {
        "model.n_layer": m.n_layer,
        "model.n_head": m.n_head,
        "model.n_embd": m.n_embd,
        "model.block_size": m.block_size,
        "model.n_step": m.n_step,
        "model.ssm_state": m.ssm_state,
        "model.ssm_conv": m.ssm_conv,
        "model.ssm_expand": m.ssm_expand,
        "model.ssm_head_dim": m.ssm_head_dim,
        "model.ssm_chunk": m.ssm_chunk,
        "train.max_iters": t.max_iters,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.eval_interval": t.eval_interval,
        "train.eval_iters": t.eval_iters,
        "train.log_interval": t.log_interval,
        "train.checkpoint_interval": t.checkpoint_interval,
    }
    for key, value in positive.items():
        if value < 1:
            raise LadderError(f"{key} must be >= 1, got {value}")
    if m.block_size < 2:
        raise LadderError(f"model.block_size must be >= 2 (the start-of-text token takes one), got {m.block_size}")
    if m.n_embd % m.n_head:
        raise LadderError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.n_embd % m.n_step:
        raise LadderError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_step ({m.n_step})")
    if m.n_embd < 2 * m.n_step:  # a LayerNorm over one feature outputs zeros: nothing could be learnt
        raise LadderError(f"each rung needs at least 2 features: model.n_embd ({m.n_embd}) >= 2 * model.n_step ({m.n_step})")
    if m.n_layer > 1024:
        raise LadderError(f"model.n_layer must be at most 1024, got {m.n_layer}")
    if m.backbone == "ssm" and (m.ssm_expand * m.n_embd) % m.ssm_head_dim:
        inner = m.ssm_expand * m.n_embd
        raise LadderError(f"model.ssm_expand * model.n_embd ({inner}) must be divisible by model.ssm_head_dim ({m.ssm_head_dim})")
    if m.train_passes < 0 or m.grad_passes < 0:
        raise LadderError(
            "model.train_passes and model.grad_passes must be >= 0 (0: n_step passes, all passes), "
            f"got {m.train_passes}, {m.grad_passes}"
        )
    if not 0.0 <= m.train_prompts <= 1.0:
        raise LadderError(f"model.train_prompts must be in [0, 1], got {m.train_prompts}")
    if not 0.0 <= m.gamma < 1.0:
        raise LadderError(f"model.gamma must be in [0, 1), got {m.gamma}")
    if m.latent_loss_scale < 0:
        raise LadderError(f"model.latent_loss_scale must be >= 0, got {m.latent_loss_scale}")
    if not 0.0 <= m.dropout < 1.0:
        raise LadderError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 <= t.min_lr <= t.learning_rate:
        raise LadderError(f"need 0 <= train.min_lr <= train.learning_rate, got {t.min_lr} and {t.learning_rate}")
    for key in ("warmup_iters", "lr_decay_iters", "seed", "skip_nonfinite", "early_passes", "early_passes_iters"):
        if getattr(t, key) < 0:
            raise LadderError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    if t.seed >= 2**63:
        raise LadderError(f"train.seed must be below 2**63, got {t.seed}")
    if t.grad_clip < 0 or t.weight_decay < 0:
        raise LadderError("train.grad_clip and train.weight_decay must be >= 0")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        raise LadderError("train.beta1 and train.beta2 must be in [0, 1)")
    if bool(t.early_passes) != bool(t.early_passes_iters):
        raise LadderError(
            "train.early_passes and train.early_passes_iters go together (passes per step, for that many steps), "
            f"got {t.early_passes} and {t.early_passes_iters}"
        )
    if t.early_passes and m.n_step == 1:
        raise LadderError("train.early_passes needs a ladder (model.n_step > 1): the GPT trains in one pass")
    n = cfg.nextlat
    if t.early_passes and n.horizon:
        raise LadderError("train.early_passes and nextlat.horizon both set how the ladder is rolled out; use one of them")
    if min(n.horizon, n.width, n.lambda_h, n.lambda_kl) < 0:
        raise LadderError("nextlat.horizon, nextlat.width, nextlat.lambda_h and nextlat.lambda_kl must be >= 0")
    if n.horizon >= m.block_size:
        raise LadderError(f"nextlat.horizon ({n.horizon}) must be smaller than model.block_size ({m.block_size})")
    if m.n_step > 1 and n.horizon > m.n_step - 1:
        raise LadderError(f"nextlat.horizon for a ladder must be in [0, n_step - 1] = [0, {m.n_step - 1}], got {n.horizon}")
    if n.horizon and m.train_prompts:  # its rollout treats every window as opened by the start token alone
        raise LadderError("nextlat.horizon does not read training prompts (model.train_prompts); use one of them")
    if n.horizon and m.n_step > 1 and (m.train_passes or m.n_step) > 1:
        raise LadderError(
            "nextlat.horizon and model.train_passes > 1 both roll the ladder out; "
            "use one of them (model.train_passes=1 for NextLat)"
        )
    return cfg


def json_line(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259): a non-finite float, which json writes as NaN or Infinity, becomes null."""

    def strict(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_whole(path: Path, content: str | bytes) -> None:
    """Replace a file's content by a temp file swapped in: a full disk or a kill leaves the old content, never a
    part. An OSError names `path` (a failed write() alone names no file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        tmp.replace(path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def save_json(cfg: Config, path: Path, exclusive: bool = False) -> None:
    """Write the config; `exclusive` fails (FileExistsError) if the file exists."""
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    if not exclusive:
        return write_whole(path, text)
    with open(path, "x") as f:
        f.write(text)


def load_json(path: Path) -> Config:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON, or an integer past 4300 digits
        raise LadderError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise LadderError(f"config {path} is not a JSON object")
    return validate(from_dict(data, allow_derived=True))
