"""The ladder: geometry by hand, noise statistics, no leak, S = 1 is the GPT, and it can learn."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ladderlm import ladder
from ladderlm.config import ModelConfig
from ladderlm.evaluate import free_running_nll, split_rows
from ladderlm.model import LadderLM
from ladderlm.sampling import decode

from .conftest import tiny_model

# S = 3 rungs over t = 4 tokens A B C D: L = 6 positions. Slot (p, s) holds token p - s
# ('.' left pad, '_' right pad). Rows are rungs 0 (noisiest) .. 2 (clean), columns positions.
LADDER_S3_T4 = [
    "ABCD__",
    ".ABCD_",
    "..ABCD",
]


def test_tilt_by_hand():
    # token-major: index q holds token q - (S-1) on every rung, with S-1 pads on both sides
    token_major = torch.tensor([[[q] * 3 for q in range(8)]])  # (1, t + 2(S-1), S)
    tilted = ladder.tilt(token_major)[0]  # (L, S)
    names = ".." + "ABCD" + "__"
    got = ["".join(names[int(tilted[p, s])] for p in range(6)) for s in range(3)]
    assert got == LADDER_S3_T4
    assert tilted[0].tolist() == [2, 1, 0] and tilted[5].tolist() == [7, 6, 5]  # out[p, s] = in[p + S-1-s, s]


def test_untilt_inverts_tilt():
    y = torch.randn(2, 6, 3, 5)
    assert torch.equal(ladder.tilt(ladder.untilt(y)), y)
    x = torch.randn(2, 8, 3, 5)
    kept = ladder.untilt(ladder.tilt(x))
    # every entry survives except the S-1-s leading / s trailing pads of rung s, which tilt drops
    for s in range(3):
        assert torch.equal(kept[:, 2 - s : 8 - s, s], x[:, 2 - s : 8 - s, s])
        assert kept[:, : 2 - s, s].abs().sum() == 0 and kept[:, 8 - s :, s].abs().sum() == 0


def test_masks_by_hand():
    real, given = ladder.slot_masks(torch.arange(6), 4, 3)
    assert ["".join("1" if real[p, s] else "0" for p in range(6)) for s in range(3)] == [
        "111100",
        "011110",
        "001111",
    ]  # training mask: real tokens only
    assert ["".join("1" if given[p, s] else "0" for p in range(6)) for s in range(3)] == [
        "111100",
        "111110",
        "111111",
    ]  # generation mask: prompt tokens and left pads are inputs; the rest await the model
    # the seed's construction: tilt of [zeros(S-1), ones(t), zeros(S-1)] (train) / [ones, ones, zeros] (gen)
    side, main = torch.zeros(1, 2, 3), torch.ones(1, 4, 3)
    assert torch.equal(ladder.tilt(torch.cat([side, main, side], 1))[0].bool(), real)
    assert torch.equal(ladder.tilt(torch.cat([1 - side, main, side], 1))[0].bool(), given)


@pytest.mark.parametrize("n_step", [1, 3])
def test_slot_holds_token_p_minus_s(n_step):
    model = tiny_model(n_step=n_step, vocab_size=50)
    tokens = torch.arange(4)[None] + 10
    L = 4 + n_step - 1
    x, _, _ = model.embed_slots(tokens, torch.arange(L), "zero")
    for p in range(L):
        for s in range(n_step):
            j = p - s
            raw = model.sqrt_alpha[s] * model.wte.weight[10 + j] if 0 <= j < 4 else torch.zeros(model.rung_dim)
            expected = model.in_norm(raw.expand(n_step, -1))[s]  # the rung's own norm
            assert torch.allclose(x[0, p, s], expected, atol=1e-6), (p, s)


def test_alpha_schedule():
    assert torch.allclose(ladder.alpha_schedule(4), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    assert ladder.alpha_schedule(1).tolist() == [1.0]
    shaped = ladder.alpha_schedule(4, gamma=0.5)
    assert torch.allclose(shaped, torch.tensor([0.5, math.sqrt(0.5), math.sqrt(0.75), 1.0]))


def test_window_noise_statistics():
    g = torch.Generator().manual_seed(0)
    eps = ladder.window_sum_noise(4000, 6, 4, 16, g)  # (B, P, S, E)
    var = eps.var(dim=(0, 3))  # (P, S)
    assert torch.allclose(var[:, :3], torch.ones(6, 3), atol=0.05) and var[:, 3].abs().max() == 0
    # climbing one rung drops exactly one increment: corr(eps[p, s], eps[p+1, s+1]) = sqrt((k-1)/k)
    for s, k in ((0, 3), (1, 2)):
        a, b = eps[:, 1, s].flatten(), eps[:, 2, s + 1].flatten()
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1]) - math.sqrt((k - 1) / k)) < 0.03


def test_independent_and_orthogonal_noise():
    g = torch.Generator().manual_seed(0)
    eps = ladder.independent_noise(torch.randn(3000, 5, 2, 16, generator=g))
    assert eps.shape == (3000, 5, 3, 16) and eps[..., 2, :].abs().max() == 0
    assert torch.allclose(eps[..., :2, :].var(dim=(0, 1, 3)), torch.ones(2), atol=0.05)
    emb = torch.randn(8, 5, 3, 16, generator=g)
    orth = ladder.orthogonal_noise(emb, torch.randn(8, 5, 2, 16, generator=g))
    centred = emb - emb.mean(-1, keepdim=True)
    assert orth.mean(-1).abs().max() < 1e-5 and orth[..., 2, :].abs().max() == 0  # the clean rung has none
    assert (orth * centred).sum(-1).abs().max() < 1e-4
    assert torch.allclose(orth.norm(dim=-1)[..., :2], centred.norm(dim=-1)[..., :2], atol=1e-4)
    # so after LayerNorm a slot's cosine with its clean embedding is exactly sqrt(alpha)
    alpha = 0.3
    mixed = F.layer_norm(math.sqrt(alpha) * emb + math.sqrt(1 - alpha) * orth, (16,))
    cos = F.cosine_similarity(mixed, F.layer_norm(emb, (16,)), dim=-1)[..., :2]
    assert torch.allclose(cos, torch.full_like(cos, math.sqrt(alpha)), atol=1e-4)


@pytest.mark.parametrize("noise", ["window", "independent", "orthogonal"])
def test_noised_slots_keep_the_embedding_scale(noise):
    model = LadderLM(ModelConfig(vocab_size=64, n_layer=1, n_head=1, n_embd=4 * 64, block_size=8, n_step=4, noise=noise))
    tokens = torch.randint(64, (512, 8))
    emb = model.wte(tokens[:, :, None].expand(-1, -1, 4))
    eps = model.noise(noise, emb, torch.Generator().manual_seed(0))
    mixed = model.sqrt_alpha * emb + model.sqrt_one_minus_alpha * eps  # (B, T, S, E)
    ratio = mixed.var(dim=(0, 1, 3)) / emb.var()
    assert torch.allclose(ratio, torch.ones(4), atol=0.1), ratio


@pytest.mark.parametrize("noise", ["window", "independent", "orthogonal"])
def test_noise_carries_no_gradient(noise):
    """Every construction is built from values only (orthogonal noise from the embeddings'): the loss
    reaches the embeddings through the signal, never through the noise."""
    model = tiny_model(4, vocab_size=13, noise=noise)
    emb = model.wte(torch.randint(13, (2, 5, 4)))  # (B, P, S, E), requires grad
    assert emb.requires_grad and not model.noise(noise, emb, torch.Generator().manual_seed(0)).requires_grad


@pytest.mark.parametrize("n_step", [1, 2, 4])
@pytest.mark.parametrize("fill", ["raw", "renoise"])
@pytest.mark.parametrize("backbone", ["attention", "ssm"])
def test_free_running_has_no_leak(n_step, fill, backbone):
    """The logits that score token k do not change when any token >= k changes."""
    ssm = {"ssm_state": 4, "ssm_head_dim": 4, "ssm_chunk": 4} if backbone == "ssm" else {}
    model = tiny_model(n_step=n_step, vocab_size=12, block_size=10, sample_fill=fill, backbone=backbone, **ssm)
    text = torch.randint(11, (2, 30))
    k = 17  # past a slide of the 10-token window
    other = text.clone()
    other[:, k:] = (text[:, k:] + 1 + torch.randint(10, text[:, k:].shape)) % 11

    def scores(tokens):
        seen = []

        def pick(logits, i):
            seen.append(logits)
            return tokens[:, i]

        decode(model, torch.full((2, 1), 11), 30, pick, generator=torch.Generator().manual_seed(0))
        return torch.stack(seen, 1)  # (N, 30, V): entry i scores token i

    a, b = scores(text), scores(other)
    assert torch.allclose(a[:, : k + 1], b[:, : k + 1], atol=1e-6)
    assert not torch.allclose(a[:, k + 1 :], b[:, k + 1 :])


def test_s1_ladder_is_the_gpt():
    """A GPT written out by hand from the same weights gives the S = 1 ladder's logits."""
    model = tiny_model(n_step=1, vocab_size=13)
    idx = torch.randint(13, (3, 12))
    bb = model.backbone
    h = F.layer_norm(model.wte(idx), (8,)) * model.in_norm.weight[0] + bb.wpe.weight[:12]
    for block in bb.blocks:
        a = block.attn
        q, k, v = a.qkv(block.ln_1(h)).split(8, -1)
        q, k, v = (z.view(3, 12, 2, 4).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2) / 2.0).masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf"))
        h = h + a.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(3, 12, 8))
        h = h + block.mlp.proj(F.gelu(block.mlp.fc(block.ln_2(h))))
    gpt_logits = F.layer_norm(h, (8,)) * model.out_norm.weight[0] @ model.wte.weight.T
    logits, loss = model(idx, idx)
    assert torch.allclose(logits[:, :, 0], gpt_logits, atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(gpt_logits.flatten(0, 1), idx.flatten()), atol=1e-5)


def test_losses_by_config():
    model = tiny_model(n_step=3, vocab_size=9)
    idx, tgt = torch.randint(9, (2, 6)), torch.randint(9, (2, 6))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    model.cfg.ce_rungs = "all"
    logits, loss_all = model(idx, tgt, generator=g())
    model.cfg.ce_rungs = "clean"
    _, loss_clean = model(idx, tgt, generator=g())
    assert torch.allclose(loss_clean, F.cross_entropy(logits[:, 2:, 2].flatten(0, 1), tgt.flatten()))
    model.cfg.ce_weighting = "alpha"  # the weighted path: one rung's weights normalise away
    assert torch.allclose(model(idx, tgt, generator=g())[1], loss_clean)
    model.cfg.ce_weighting = "uniform"
    model.cfg.ce_rungs = "all"
    model.cfg.latent_loss_scale = 2.0
    _, loss_latent = model(idx, tgt, generator=g())
    assert loss_latent > loss_all


def train_tiny(model, text, steps, lr=3e-3, batch=8):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    x = torch.cat([torch.full((1, 1), model.cfg.vocab_size - 1), text[None, :-1]], 1).expand(batch, -1)
    y = text[None].expand(batch, -1)
    model.train()
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_s2_ladder_overfits_a_string_free_running():
    torch.manual_seed(0)
    text = torch.randint(15, (64,))
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_head=2, n_embd=64, block_size=64, n_step=2, latent_loss_scale=1.0)
    model = train_tiny(LadderLM(cfg), text, steps=250)
    rows, lengths = split_rows(text.numpy(), 1)
    nll = free_running_nll(model, rows, lengths, eot_id=15) / 64
    assert nll < 0.05, nll


def test_eval_reports_for_s1_agree(run_dir, data_dir):
    from ladderlm import checkpoint
    from ladderlm.data import TokenData
    from ladderlm.evaluate import evaluate

    model, _, _ = checkpoint.load(run_dir)
    result = evaluate(model, TokenData.open(data_dir), rows=7)
    assert result["val_loss"] == result["free_running_loss"]
    assert abs(result["free_running_loss"] - result["teacher_forced_loss"]) < 1e-5
    assert [r["denoise_ratio"] for r in result["per_rung"]] == [None] and result["rows"] == 7
    assert np.isfinite(result["per_rung"][0]["latent_mse"])


@pytest.mark.parametrize("emit_head", ["rung", "full"])
@pytest.mark.parametrize("ce", [("clean", "uniform"), ("clean", "alpha"), ("all", "uniform"), ("all", "alpha")])
def test_the_training_loss_reads_only_the_logits_it_scores(emit_head, ce):
    """model.loss (the clean rung's logits alone unless every rung is scored) is forward's loss, gradients included."""
    idx, tgt = (torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(k)) for k in (0, 1))
    for n_step in (1, 4):
        model = tiny_model(n_step, emit_head=emit_head, ce_rungs=ce[0], ce_weighting=ce[1], latent_loss_scale=0.5).train()
        if model.emit_head is not None:
            torch.nn.init.normal_(model.emit_head.weight, std=0.3)
        full = model(idx, tgt, generator=torch.Generator().manual_seed(2))[1]
        scored = model.loss(idx, tgt, torch.Generator().manual_seed(2))
        torch.testing.assert_close(scored, full)
        for a, b in zip(*(torch.autograd.grad(loss, list(model.parameters())) for loss in (full, scored)), strict=True):
            torch.testing.assert_close(a, b)
