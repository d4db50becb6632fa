"""The SSM backbone: chunked scan against the recurrence, parallel against stepping, sampling, training."""

import json

import pytest
import torch
import torch.nn.functional as F

from ladderlm import checkpoint
from ladderlm.backbones.ssm import ssd_scan, ssm_step
from ladderlm.cli import main
from ladderlm.config import load_config
from ladderlm.data import TokenData
from ladderlm.distributed import Dist
from ladderlm.errors import LadderError
from ladderlm.model import LadderLM
from ladderlm.train import estimate_loss

from .conftest import tiny_model, train_args
from .test_sampling import EOT, prompts_of, run

CHUNK = 8
SSM = {"backbone": "ssm", "ssm_state": 4, "ssm_head_dim": 4, "ssm_chunk": CHUNK}  # H = 2 heads at n_embd 8


def tiny_ssm(n_step: int = 1, **kw) -> LadderLM:
    return tiny_model(n_step=n_step, **SSM, **kw)


def recurrence(x, dt, A, B, C, h):
    """The SSM one position at a time: the definition the chunked scan must reproduce."""
    ys = []
    for t in range(x.shape[1]):
        y, h = ssm_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y)
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("from_zero", [True, False])
def test_chunked_scan_equals_the_recurrence(T, from_zero):
    g = torch.Generator().manual_seed(T)
    b, H, P, N = 2, 3, 4, 5
    x = torch.randn(b, T, H, P, generator=g)
    dt = F.softplus(torch.randn(b, T, H, generator=g) - 1)
    dt[0, T // 2] = 0.0  # a pad slot: leaves the state alone
    A = -torch.empty(H).uniform_(1, 16, generator=g)
    B, C = torch.randn(b, T, N, generator=g), torch.randn(b, T, N, generator=g)
    h0 = torch.zeros(b, H, P, N) if from_zero else torch.randn(b, H, P, N, generator=g)
    y, h = ssd_scan(x, dt, A, B, C, CHUNK, None if from_zero else h0)
    y_ref, h_ref = recurrence(x, dt, A, B, C, h0)
    assert y.shape == (b, T, H, P) and h.shape == (b, H, P, N)
    assert (y - y_ref).abs().max() < 1e-5 and (h - h_ref).abs().max() < 1e-5


def test_parallel_pass_equals_steps_and_leaves_the_same_state():
    model = tiny_ssm(block_size=40)
    bb = model.backbone
    x = torch.randn(2, 3 * CHUNK + 5, 8)
    full, state = bb(x, bb.empty_state(2, "cpu"))
    stepped, s = [], bb.empty_state(2, "cpu")
    for t in range(x.shape[1]):
        y, s = bb(x[:, t : t + 1], s)
        stepped.append(y)
    assert (torch.cat(stepped, 1) - full).abs().max() < 1e-5
    for a, b in zip(state.conv + state.ssm, s.conv + s.ssm, strict=True):
        assert (a - b).abs().max() < 1e-5
    mixed, s = [], bb.empty_state(2, "cpu")
    for a, b in [(0, 5), (5, 6), (6, 17), (17, 18), (18, x.shape[1])]:  # a block, a step, a block from a state...
        y, s = bb(x[:, a:b], s)
        mixed.append(y)
    assert (torch.cat(mixed, 1) - full).abs().max() < 1e-5


def test_state_is_returned_not_kept():
    model = tiny_ssm()
    bb = model.backbone
    x = torch.randn(1, 4, 8)
    empty = bb.empty_state(1, "cpu")
    _, state = bb(x, empty)
    assert empty.length == 0 and state.length == 4 and all(not t.any() for t in empty.conv + empty.ssm)
    y1, _ = bb(x[:, :1], state)
    y2, _ = bb(x[:, :1], state)
    assert torch.equal(y1, y2)


def test_positions_past_the_window_are_refused():
    model = tiny_ssm(block_size=4)
    with pytest.raises(LadderError, match="run past the window"):
        model.backbone(torch.randn(1, 5, 8), model.backbone.empty_state(1, "cpu"))


@pytest.mark.parametrize("n_step", [1, 4])
@pytest.mark.parametrize("lengths", [[0], ["S"], [100], [0, 1, "S-1", "S", 7, 100]])
def test_phased_equals_naive(n_step, lengths):
    """Phase i as one chunked pass (13 chunks for 100 tokens) + steps == every position stepped.

    In float64: the recurrent state keeps a rounding difference of the prefill and the ladder
    feeds its outputs back, so in float32 the two paths drift apart to ~1e-5 after 40 sampled
    tokens at S = 4 (the same drift, ~1e-10, shows in float64); the test pins the identity itself."""
    model = tiny_ssm(n_step=n_step, vocab_size=EOT + 1, block_size=120).double()
    lengths = [{"S": n_step, "S-1": n_step - 1}.get(n, n) for n in lengths]
    prompts = prompts_of(lengths)
    phased, phased_logits = run(model, prompts, 40, parallel=True)  # 100 + 40 tokens pass the window
    naive, naive_logits = run(model, prompts, 40, parallel=False)
    assert phased_logits.dtype == torch.float64
    assert torch.equal(phased, naive)
    assert (phased_logits - naive_logits).abs().max() < 1e-8


# A row in a mixed batch decodes as it would alone: tests/test_sampling.py, over both backbones
# (pad slots leave the conv and SSM states untouched, so a padded row starts fresh).


@pytest.mark.parametrize("preset", ["shakespeare-char-cpu-ssm", "shakespeare-char-cpu-ssm-ladder4"])
def test_init_is_finite_and_every_parameter_learns(preset):
    """The prototype left dt_bias, A_log and D uninitialised (NaN on CPU); here every one is set."""
    cfg = load_config(preset)
    cfg.model.vocab_size = 65
    torch.manual_seed(0)
    model = LadderLM(cfg.model)
    mixer = model.backbone.blocks[0].mixer
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert (-torch.exp(mixer.A_log) <= -1).all() and (-torch.exp(mixer.A_log) >= -16).all() and (mixer.D == 1).all()
    idx = torch.randint(65, (2, cfg.model.block_size))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and p.grad is not None and torch.isfinite(p.grad).all(), name


def test_s1_ladder_is_a_plain_ssm_lm():
    """An SSM LM written out by hand (sequential recurrence, conv by padding) gives the S = 1 ladder's logits."""
    model = tiny_ssm(vocab_size=13)
    T = 12
    idx = torch.randint(13, (3, T))
    h = F.layer_norm(model.wte(idx), (8,)) * model.in_norm.weight[0]  # embedding, input norm; no positions
    for block in model.backbone.blocks:
        m = block.mixer
        u = F.layer_norm(h, (8,), block.norm_1.weight)
        z, xBC, dt = m.in_proj(u).split([8, 8 + 2 * 4, 2], -1)
        xBC = F.silu(F.conv1d(F.pad(xBC.transpose(1, 2), (3, 0)), m.conv.weight, m.conv.bias, groups=16).transpose(1, 2))
        x, B, C = xBC.split([8, 4, 4], -1)
        dt, A = F.softplus(dt + m.dt_bias), -torch.exp(m.A_log)
        state, ys = torch.zeros(3, 2, 4, 4), []
        for t in range(T):
            xt = x[:, t].view(3, 2, 4)
            decay = torch.exp(dt[:, t] * A)[..., None, None]
            state = state * decay + dt[:, t, :, None, None] * xt[..., None] * B[:, t, None, None]
            ys.append((state @ C[:, t, None, :, None])[..., 0] + m.D[:, None] * xt)
        y = torch.stack(ys, 1).reshape(3, T, 8) * F.silu(z)
        h = h + m.out_proj(F.layer_norm(y, (8,), m.norm.weight))
        h = h + block.mlp.proj(F.gelu(block.mlp.fc(F.layer_norm(h, (8,), block.norm_2.weight))))
    lm_logits = F.layer_norm(h, (8,)) * model.out_norm.weight[0] @ model.wte.weight.T  # tied head
    logits, loss = model(idx, idx)
    assert torch.allclose(logits[:, :, 0], lm_logits, atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(lm_logits.flatten(0, 1), idx.flatten()), atol=1e-5)


def test_bad_ssm_config_is_one_line():
    with pytest.raises(LadderError, match="divisible by model.ssm_head_dim"):
        load_config("shakespeare-char-cpu-ssm", overrides=["model.ssm_head_dim=48"])
    with pytest.raises(LadderError, match="model.ssm_state must be >= 1"):
        load_config("shakespeare-char-cpu-ssm", overrides=["model.ssm_state=0"])
    with pytest.raises(LadderError, match="must be one of attention, ssm"):
        load_config("shakespeare-char-cpu", overrides=["model.backbone=mamba"])


SSM_ARGS = ["--set", "model.backbone=ssm", "--set", "model.ssm_state=8", "--set", "model.ssm_head_dim=8",
            "--set", "model.ssm_chunk=8", "--set", "model.n_step=2"]  # fmt: skip


def test_train_checkpoint_sample_and_eval(tmp_path, data_dir, capsys):
    """A short CLI run of an SSM ladder; the checkpoint reloads to the very model that was trained."""
    out = tmp_path / "ssm"
    assert main(train_args(data_dir, out, *SSM_ARGS, "--set", "train.max_iters=6", "--set", "train.eval_interval=6")) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if "val_loss" in r][-1]
    model, cfg, _ = checkpoint.load(out)
    assert cfg.model.backbone == "ssm" and type(model.backbone).__name__ == "SSMBackbone"
    again = estimate_loss(model, TokenData.open(data_dir), cfg, Dist(0, 1, torch.device("cpu")))  # same seeded batches and noise
    assert final["step"] == 6 and abs(again["val_loss"] - final["val_loss"]) < 1e-6
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(out), "--prompt", "The", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", "--ckpt", str(out), "--data", str(data_dir), "--json", "--rows", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["free_running_loss"] > 0


def test_bench_has_ssm_entries():
    from ladderlm.bench import run_bench

    small = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=2",
             "model.ssm_state=8", "model.ssm_head_dim=8", "model.ssm_chunk=8"]  # fmt: skip
    result = run_bench("bench", small, repeats=1, prompt_len=12, n_new=4)
    prefill = {"ladder_phased", "ladder_naive", "ladder_prompt_passes", "gpt", "ssm_ladder_phased", "ssm_gpt"}
    assert prefill == result["prefill_ms"].keys()
    assert {"ladder", "gpt", "ssm_ladder", "ssm_gpt"} <= result["decode_tokens_per_s"].keys()
    trained = {"ladder", "ladder_train_passes", "ladder_early_passes", "ladder_one_pass", "gpt"}
    trained |= {"ssm_ladder", "ssm_ladder_train_passes", "ssm_ladder_early_passes", "ssm_gpt"}
    assert trained == result["train_tokens_per_s"].keys()
    assert result["ssm_prefill_max_abs_diff"] < 1e-4 and result["params"]["ssm_gpt"] > 0
    assert result["prompt_tokens"] == 8  # half the 16-token window, not the 12 asked for
