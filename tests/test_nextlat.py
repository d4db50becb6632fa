"""Next-Latent Prediction for the GPT: the rollout, its losses, where gradients go, and the trainer."""

import pytest
import torch
from safetensors.torch import load_file

from ladderlm.cli import main
from ladderlm.config import load_config
from ladderlm.errors import LadderError
from ladderlm.objectives import LatentDynamics, ladder_rollout_losses, nextlat_losses
from ladderlm.sampling import decode

from .conftest import tiny_model, train_args


class ExactDynamics(LatentDynamics):
    """The true dynamics of latents that are the embedding of the token just read."""

    def forward(self, h, e):
        return e


def test_losses_vanish_when_the_rollout_is_the_truth():
    emb = torch.randn(7, 16)
    idx = torch.randint(7, (2, 10))
    h = emb[idx]  # h[:, p] = e(x_p)
    next_emb = emb[idx[:, 1:]]  # e(x_{p+1})
    next_emb = torch.cat([next_emb, torch.zeros(2, 1, 16)], 1)
    l_h, l_kl = nextlat_losses(h, next_emb, torch.randn(5, 16), ExactDynamics(16, 8), horizon=3)
    assert l_h.abs() < 1e-7 and l_kl.abs() < 1e-6
    l_h, l_kl = nextlat_losses(h, next_emb, torch.randn(5, 16), LatentDynamics(16, 8), horizon=3)
    assert l_h > 0 and l_kl > 0  # psi starts as the identity: h^_{t+1} = h_t


@pytest.mark.parametrize("term", [0, 1])
def test_gradients_reach_psi_and_the_model_never_the_head(term):
    model = tiny_model(vocab_size=11, tie_head=False).train()
    psi = LatentDynamics(8, 16)
    torch.nn.init.normal_(psi.f[-1].weight)
    idx, targets = torch.randint(11, (3, 12)), torch.randint(11, (3, 12))
    _, _, y = model.teacher_forced(idx)
    losses = nextlat_losses(y[:, :, -1], model.wte(targets).detach(), model.lm_head.weight.detach(), psi, horizon=2)
    losses[term].backward()
    assert model.lm_head.weight.grad is None  # the frozen head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in psi.f.parameters())
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through h_t, the rollout's start


def test_rollout_is_one_batched_call_per_step():
    calls = []
    psi = LatentDynamics(8, 16)
    psi.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape))
    nextlat_losses(torch.randn(2, 12, 8), torch.randn(2, 12, 8), torch.randn(5, 8), psi, horizon=4)
    assert calls == [(2, 11, 8), (2, 10, 8), (2, 9, 8), (2, 8, 8)]


def test_zero_weights_reproduce_plain_training_bit_for_bit(tmp_path, data_dir):
    common = ["--set", "train.max_iters=8", "--set", "train.eval_interval=4"]
    assert main(train_args(data_dir, tmp_path / "plain", *common)) == 0
    off = ["--set", "nextlat.horizon=2", "--set", "nextlat.lambda_h=0", "--set", "nextlat.lambda_kl=0"]
    assert main(train_args(data_dir, tmp_path / "zero", *common, *off)) == 0
    plain, zero = (load_file(tmp_path / r / "ckpt" / "model.safetensors") for r in ("plain", "zero"))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert (tmp_path / "zero" / "ckpt" / "psi.safetensors").is_file()


def test_training_with_nextlat_saves_and_resumes_psi(tmp_path, data_dir):
    run = tmp_path / "run"
    nextlat = ["--set", "nextlat.horizon=2", "--set", "train.eval_interval=100"]
    assert main(train_args(data_dir, run, *nextlat, "--set", "train.max_iters=6")) == 0
    psi_6 = load_file(run / "ckpt" / "psi.safetensors")
    assert any(v.abs().sum() > 0 for k, v in psi_6.items() if k.startswith("f.4"))  # psi's last layer has learned
    assert (
        main(["train", "--data", str(data_dir), "--out", str(run), "--resume", "--no-progress", "--set", "train.max_iters=8"])
        == 0
    )
    psi_8 = load_file(run / "ckpt" / "psi.safetensors")
    assert any(not torch.equal(psi_6[k], psi_8[k]) for k in psi_6)


def test_nextlat_config():
    cfg = load_config("shakespeare-char-cpu-nextlat")
    assert (cfg.nextlat.horizon, cfg.model.n_step, cfg.model.n_layer) == (2, 1, 4)
    cfg = load_config("shakespeare-char-cpu-ladder4-kl")
    assert (cfg.nextlat.horizon, cfg.model.n_step) == (3, 4)
    with pytest.raises(LadderError, match=r"\[0, n_step - 1\]"):
        load_config("shakespeare-char-cpu-ladder4", overrides=["nextlat.horizon=4"])
    with pytest.raises(LadderError, match="smaller than model.block_size"):
        load_config("shakespeare-char-cpu", overrides=["nextlat.horizon=64"])


@pytest.mark.parametrize("n_step, steps", [(2, 1), (3, 2), (4, 3), (3, 40)])
@pytest.mark.parametrize("embed_in", ["rung", "full"])
def test_ladder_rollout_equals_the_sampler_on_the_same_inputs(n_step, steps, embed_in):
    """Pass k of the rollout is the free-running sampler (true tokens fed back) at positions 0..k."""
    model = tiny_model(n_step=n_step, vocab_size=13, block_size=24, prompt_noise="zero", embed_in=embed_in)
    idx = torch.cat([torch.full((2, 1), 12), torch.randint(12, (2, 19))], 1)  # start token, then text
    L = 20 + n_step - 1
    x, _, clean = model.embed_slots(idx, torch.arange(L), "zero")
    y, _ = model.run(x, clean, model.empty_state(2))
    rolled = model.rollout(x, clean, y, steps)[-1]
    seen = []

    def pick(logits, i):
        seen.append(logits)
        return idx[:, i + 1]

    decode(model, idx[:, :1], 19, pick)
    sampler_logits = torch.stack(seen, 1)  # entry i comes from position i + S - 1
    upto = min(steps, L - 1) - (n_step - 1) + 1  # positions <= steps
    rolled_logits = model.clean_logits(rolled[:, n_step - 1 :])[:, :19]
    assert upto >= 1
    assert (rolled_logits[:, :upto] - sampler_logits[:, :upto]).abs().max() < 1e-5


@pytest.mark.parametrize("emit_head", ["rung", "full"])
def test_ladder_kl_gradients_and_the_degenerate_gpt(emit_head):
    model = tiny_model(n_step=3, vocab_size=11, tie_head=False, emit_head=emit_head).train()
    if model.emit_head is not None:
        torch.nn.init.normal_(model.emit_head.weight, std=0.1)  # zero at init; make it count
    idx, targets = torch.randint(11, (2, 10)), torch.randint(11, (2, 10))
    x, clean, y = model.teacher_forced(idx)
    assert torch.equal(model.logits(y, frozen=True), model.logits(y))
    l_h, l_kl = ladder_rollout_losses(model, x, clean, y, targets, horizon=2, with_latent=True)
    assert l_kl > 0 and l_h > 0
    l_kl.backward()
    assert model.lm_head.weight.grad is None  # the frozen heads
    assert model.emit_head is None or model.emit_head.weight.grad is None
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    gpt = tiny_model(n_step=1, vocab_size=11)
    x, clean, y = gpt.teacher_forced(idx)
    assert ladder_rollout_losses(gpt, x, clean, y, targets, horizon=2, with_latent=False)[1].abs() < 1e-6  # nothing fed back
