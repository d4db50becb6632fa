"""Training on the sampler's own inputs (train_passes), sample-quality metrics and the figures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ladderlm.cli import main
from ladderlm.config import load_config
from ladderlm.errors import LadderError
from ladderlm.evaluate import distinct_n, drawn_quality, free_running_nll, repeat_rate, sample
from ladderlm.sampling import decode

from .conftest import tiny_model, train_args
from .test_cli import run_bad


def emitting_model(n_step: int, emit_head: str, **kw):
    """A tiny model whose emission head over every rung (emit_head = "full") is not at its zero init."""
    model = tiny_model(n_step, emit_head=emit_head, **kw)
    if model.emit_head is not None:
        torch.nn.init.normal_(model.emit_head.weight, std=0.3)
    return model


@pytest.mark.parametrize("n_step", [1, 2, 4])
@pytest.mark.parametrize("prompt", [1, 3, 7])
@pytest.mark.parametrize("emit_head, embed_in", [("rung", "rung"), ("full", "rung"), ("full", "full")])
def test_blank_start_passes_over_the_window_are_the_sampler(n_step, prompt, emit_head, embed_in):
    """With a blank first pass and a pass per position, training computes exactly what free-running
    sampling does, after the start token alone or after a prompt of known tokens."""
    T = 10
    L = T + n_step - 1
    model = emitting_model(
        n_step, emit_head, vocab_size=13, block_size=16, prompt_noise="zero", train_passes=L, embed_in=embed_in
    )
    idx = torch.cat([torch.full((2, 1), 12), torch.randint(12, (2, T - 1))], 1)
    x, _, clean = model.embed_slots(idx, torch.arange(L), "zero")  # the sampler's noise-free prompt slots
    unrolled = model.unrolled(x, clean, torch.tensor([prompt, prompt]))[:, n_step - 1 :]
    unrolled = model.clean_logits(unrolled)[:, prompt - 1 :]  # (2, T - prompt + 1, V), entry i predicts idx[prompt + i]
    seen = []

    def pick(logits, i):
        seen.append(logits)
        return idx[:, prompt + i] if prompt + i < T else logits.argmax(-1)

    decode(model, idx[:, :prompt], T - prompt + 1, pick)
    assert (unrolled - torch.stack(seen, 1)).abs().max() < 1e-5


def test_full_emission_head():
    """emit_head = "full" adds a head over all S rungs to the clean rung's: zero at init (training starts
    from the rung head's model), trained by the loss, nothing to add with one rung (the GPT)."""
    rung, full = tiny_model(4, vocab_size=13), tiny_model(4, vocab_size=13, emit_head="full")
    assert full.num_params() == rung.num_params() + 4 * 8 * 13
    assert tiny_model(1, emit_head="full").num_params() == tiny_model(1).num_params()
    idx, targets = torch.randint(13, (2, 10)), torch.randint(13, (2, 10))
    gen = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert torch.equal(rung(idx, generator=gen[0])[0], full(idx, generator=gen[1])[0])
    full = emitting_model(4, "full", vocab_size=13)
    logits, loss = full(idx, targets, torch.Generator().manual_seed(0))  # (2, L, S, V)
    y = full.window(idx, generator=torch.Generator().manual_seed(0))[2]
    assert torch.allclose(logits[:, :, -1], full.clean_logits(y), atol=1e-6)
    assert torch.allclose(logits[:, :, :-1], full.lm_head(y[:, :, :-1]), atol=1e-6)
    assert not torch.allclose(logits[:, :, -1], full.lm_head(y[:, :, -1]), atol=1e-3)
    loss.backward()
    assert full.emit_head.weight.grad.abs().max() > 0
    with pytest.raises(LadderError, match="emit_head must be one of"):
        load_config("shakespeare-char-cpu-ladder4", overrides=["model.emit_head=wide"])


def test_full_input_embedding():
    """embed_in = "full" adds the clean rung's token at the backbone's full width: trained by the loss,
    nothing at pads, nothing to add with one rung (the GPT, whose only embedding is full-width)."""
    rung, full = tiny_model(4, vocab_size=13), tiny_model(4, vocab_size=13, embed_in="full")
    assert full.num_params() == rung.num_params() + 13 * 32 + 32  # the embedding and its norm's gain
    assert tiny_model(1, embed_in="full").num_params() == tiny_model(1).num_params()
    idx, targets = torch.randint(13, (2, 10)), torch.randint(13, (2, 10))
    x, _, clean = full.embed_slots(idx, torch.arange(13), "zero")
    assert (clean[:, :3] == -1).all() and torch.equal(clean[:, 3:], idx)  # position p's clean rung holds token p - 3
    state = full.empty_state(2)
    with_token = full.run(x[:, :1], torch.tensor([[5], [7]]), state)[0]
    assert torch.equal(full.run(x[:, :1], clean[:, :1], state)[0], rung.run(x[:, :1], clean[:, :1], state)[0])
    assert not torch.allclose(with_token, rung.run(x[:, :1], clean[:, :1], state)[0], atol=1e-4)
    full.train()(idx, targets)[1].backward()
    assert full.wte_full.weight.grad.abs().max() > 0 and full.in_norm_full.weight.grad.abs().max() > 0
    with pytest.raises(LadderError, match="embed_in must be one of"):
        load_config("shakespeare-char-cpu-ladder4", overrides=["model.embed_in=wide"])


def test_training_prompts_are_given_not_predicted():
    """train_prompts: some windows open with a prompt; its tokens are fed as known and drop out of the loss."""
    model = tiny_model(4, vocab_size=13, block_size=16, first_pass="blank", train_passes=2, train_prompts=1.0)
    idx, targets = torch.randint(13, (64, 12)), torch.randint(13, (64, 12))
    known = model.prompt_lengths(idx, torch.Generator().manual_seed(0))
    assert known.min() >= 1 and known.max() <= 12 and len(known.unique()) > 6
    *_, counted = model.window(idx, targets, torch.Generator().manual_seed(0))
    given = (counted == -100).sum(1)  # per window: a prefix of its targets, the prompt's tokens after the first
    assert ((counted == -100) == (torch.arange(12) < given[:, None])).all() and len(given.unique()) > 6
    assert (counted[counted != -100] == targets[counted != -100]).all()
    assert (tiny_model(4, train_prompts=0.0).prompt_lengths(idx) == 1).all()  # the default: the start token alone
    with pytest.raises(LadderError, match="train_prompts must be in"):
        load_config("shakespeare-char-cpu-ladder4", overrides=["model.train_prompts=1.5"])


@pytest.mark.parametrize("passes", [1, 2, 4])
def test_blank_start_leaks_no_future_token(passes):
    """Every output at position p reads tokens <= p - S + 1 only (the clean rung's token), for any number of passes."""
    S, T, k = 4, 12, 6
    model = tiny_model(S, vocab_size=13, block_size=16, first_pass="blank", train_passes=passes)
    idx = torch.randint(13, (2, T))
    changed = idx.clone()
    changed[:, k] = (idx[:, k] + 1) % 13
    gen = [torch.Generator().manual_seed(0) for _ in range(2)]
    a, b = model(idx, generator=gen[0])[0], model(changed, generator=gen[1])[0]  # (2, L, S, V)
    assert (a[:, : k + S - 1] - b[:, : k + S - 1]).abs().max() < 1e-6
    assert (a[:, k + S - 1] - b[:, k + S - 1]).abs().max() > 1e-4  # ... and does read the clean rung's token
    # the seed's single teacher-forced pass reads noised future tokens
    seed = tiny_model(S, vocab_size=13, block_size=16, first_pass="truth", train_passes=1)
    gen = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert (seed(idx, generator=gen[0])[0][:, k] - seed(changed, generator=gen[1])[0][:, k]).abs().max() > 1e-4


def test_gradient_through_the_last_pass_only():
    torch.manual_seed(0)
    idx, targets = torch.randint(11, (2, 8)), torch.randint(11, (2, 8))
    grads = {}
    for mode in (0, 1):
        model = tiny_model(3, first_pass="blank", train_passes=3, grad_passes=mode).train()
        loss = model(idx, targets, generator=torch.Generator().manual_seed(1))[1]
        loss.backward()
        grads[mode] = (loss.item(), model.backbone.blocks[0].attn.qkv.weight.grad.clone())
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)  # the same forward
    assert (grads[0][1] - grads[1][1]).abs().max() > 1e-6  # backpropagation through time differs


@pytest.mark.parametrize("backbone", ["attention", "ssm"])
@pytest.mark.parametrize("grad_passes", [0, 2])
def test_recomputed_passes_change_memory_not_numbers(backbone, grad_passes):
    torch.manual_seed(0)
    idx, targets = torch.randint(11, (2, 8)), torch.randint(11, (2, 8))
    runs = []
    for recompute in (False, True):
        model = tiny_model(3, backbone=backbone, ssm_head_dim=8, dropout=0.2, train_passes=4, grad_passes=grad_passes,
                           train_prompts=0.5, recompute_passes=recompute).train()  # fmt: skip
        torch.manual_seed(1)  # dropout masks, replayed by the recomputation
        loss = model(idx, targets, generator=torch.Generator().manual_seed(1))[1]
        loss.backward()
        runs.append((loss, [p.grad for p in model.parameters()], torch.rand(1)))
    (loss, grads, after), (loss_r, grads_r, after_r) = runs
    assert torch.equal(loss, loss_r) and torch.equal(after, after_r)  # the global random stream moves as without
    assert all(torch.equal(g, g_r) for g, g_r in zip(grads, grads_r, strict=True))


def test_pass_config_is_validated():
    with pytest.raises(LadderError, match="train_passes and model.grad_passes must be >= 0"):
        load_config("shakespeare-char-cpu-ladder4", overrides=["model.train_passes=-1"])
    for passes in ("0", "2"):  # 0 means n_step passes
        with pytest.raises(LadderError, match="use one of them"):
            load_config("shakespeare-char-cpu-ladder4", overrides=[f"model.train_passes={passes}", "nextlat.horizon=1"])
    assert load_config("shakespeare-char-cpu", overrides=["model.train_passes=0", "nextlat.horizon=1"])  # GPT: nothing fed
    with pytest.raises(LadderError, match="first_pass must be one of"):
        load_config("shakespeare-char-cpu-ladder4", overrides=["model.first_pass=noise"])


def test_distinct_and_repeats():
    loop = torch.tensor([[1, 2] * 10])
    assert distinct_n(loop, 2) == pytest.approx(2 / 19) and repeat_rate(loop) == pytest.approx(11 / 13)
    fresh = torch.arange(20)[None]
    assert distinct_n(fresh, 3) == 1.0 and repeat_rate(fresh) == 0.0


@pytest.mark.parametrize("n_step", [1, 4])
def test_samples_carry_the_nll_they_were_drawn_with(n_step):
    """Re-read by the model that drew them (same seed, no slide), samples score what drawing them cost."""
    model = emitting_model(n_step, "full")
    rows, nll = sample(model, n=5, length=11, eot_id=10, seed=3)
    assert rows.shape == nll.shape == (5, 11)
    assert nll.sum().item() == free_running_nll(model, rows, torch.full((5,), 11), eot_id=10, seed=3)
    quality = drawn_quality(model, model, n=5, length=11, eot_id=10, seed=3)  # scored with the draws' seed too
    assert abs(quality["kl"]) < 1e-6, quality


def test_eval_samples_scorer_and_plots(tmp_path, run_dir, data_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    argv = ["eval", "--ckpt", str(run), "--data", str(data_dir), "--json", "--rows", "4"]
    assert main([*argv, "--samples", "3", "--sample-length", "24", "--scorer", str(run_dir), "--save"]) == 0
    result = json.loads(capsys.readouterr().out)
    quality = result["sample_quality"]
    assert set(quality) == {"samples", "length", "seed", "model", "scorer", "data"}
    for who in ("model", "scorer", "data"):
        assert quality[who]["gen_ppl"] > 1 and 0 < quality[who]["distinct_3"] <= 1 and 0 <= quality[who]["repeat_rate"] < 1
        assert 0 < quality[who]["gen_ppl_se"] < quality[who]["gen_ppl"]
    assert quality["model"] == quality["scorer"]  # the same weights, the same seeds
    # Scored by the model that drew them, the samples' perplexity is the one met while drawing them.
    assert quality["model"]["self_ppl"] == pytest.approx(quality["model"]["gen_ppl"], rel=1e-5)
    assert abs(quality["model"]["kl"]) < 1e-5 and "self_ppl" not in quality["data"]
    assert result["gen_ppl"] == quality["model"]["gen_ppl"]
    assert json.loads((run / "eval.json").read_text())["sample_quality"] == quality
    for kind in ("losses", "rungs", "free-vs-tf"):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", str(run), "--kind", kind, "--out", str(out)]) == 0
        assert out.read_bytes()[:4] == b"\x89PNG"
    no_eval = ["plot", str(run_dir), "--kind", "rungs", "--out", str(tmp_path / "x.png")]
    run_bad(capsys, no_eval, run_dir, match="has no eval.json")
    run_bad(capsys, [*argv, "--samples", "-1"], run, match="--samples")
    run_bad(capsys, [*argv, "--samples", "2", "--sample-length", "100000"], run, match="exceeds the validation split")


def test_train_with_passes_and_the_measurement_scripts(tmp_path, data_dir):
    passes = ["--set", "model.n_step=2", "--set", "model.train_passes=2", "--set", "model.first_pass=blank"]
    assert main(train_args(data_dir, tmp_path / "r", *passes, "--set", "train.max_iters=4")) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["train_passes"] == 2
    scripts = Path(__file__).parent.parent / "scripts"
    tiny = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.block_size=16"]
    for script, *args in (  # the commands docs/ cites still run against the library
        ("pass_convergence.py", str(tmp_path / "r"), str(data_dir), "--windows", "2", "--max-passes", "3"),
        ("after_slide.py", str(data_dir), str(tmp_path / "r"), "--rows", "64"),
        ("train_memory.py", "shakespeare-char-cpu-ladder4", "--batch", "2", "--steps", "1", *tiny),
    ):
        done = subprocess.run([sys.executable, str(scripts / script), *args], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout and not done.stderr, (script, done.stderr)


@pytest.mark.parametrize("n_step", [1, 2, 4])
def test_stream_prompt_is_the_model_reading_its_own_tokens(n_step):
    """prompt_read=stream: a batch of prompts gives the logits each row gets when the model is
    started from the start token alone and its prompt tokens are emitted as if it had sampled them."""
    model = tiny_model(n_step, vocab_size=13, block_size=16, prompt_noise="zero", prompt_read="stream")
    prompts = [torch.tensor([12, 3, 4, 5, 6, 7, 1]), torch.tensor([12, 2]), torch.tensor([12, 9, 9, 1, 0]), torch.tensor([12])]
    n_new = 5
    batched = []

    def pick(logits, _i):
        batched.append(logits)
        return logits.argmax(-1)

    decode(model, prompts, n_new, pick)
    batched = torch.stack(batched, 1)  # (rows, n_new, V)
    for r, p in enumerate(prompts):
        k, alone = len(p) - 1, []

        def forced(logits, i, p=p, k=k, alone=alone):
            alone.append(logits)
            return p[i + 1 : i + 2] if i < k else logits.argmax(-1)

        decode(model, [p[:1]], k + n_new, forced)
        assert (batched[r] - torch.cat(alone[k:])).abs().max() < 1e-5
    first = {}
    for read, passes in (("parallel", 0), ("passes", 7 + n_step), ("passes", 2)):  # 7 + n_step: a pass per position
        model = tiny_model(n_step, vocab_size=13, block_size=16, prompt_noise="zero", prompt_read=read, train_passes=passes)
        seen = []
        decode(model, prompts, 1, lambda logits, _i, seen=seen: seen.append(logits) or logits.argmax(-1))
        first[read, passes] = (seen[0] - batched[:, 0]).abs().max()
    assert first["passes", 7 + n_step] < 1e-5  # passes over the prompt reach the stream exactly
    for key in (("parallel", 0), ("passes", 2)):  # a ladder reads a prompt differently in one pass or too few
        assert (first[key] > 1e-4) == (n_step > 1)
    # re-noised fills draw their noise from the sampler's generator in every reading: seeded runs repeat
    model = tiny_model(n_step, vocab_size=13, block_size=16, prompt_read="passes", sample_fill="renoise", train_passes=3)
    runs = []
    for _ in range(2):
        seen = []
        record = lambda logits, _i, seen=seen: seen.append(logits) or logits.argmax(-1)  # noqa: E731
        decode(model, prompts, 2, record, generator=torch.Generator().manual_seed(3))
        runs.append(torch.stack(seen))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("n_step", [2, 4])
def test_prompts_read_in_passes_are_the_stream_across_slides(n_step):
    """Every slide re-reads the kept context as a prompt: with a pass per position, the passes read it as the stream does."""
    prompts = [torch.tensor([12, 3, 4, 5]), torch.tensor([12, 7])]
    logits = {}
    for read, passes in (("stream", 0), ("passes", 8 + n_step)):
        model = tiny_model(n_step, vocab_size=13, block_size=8, prompt_noise="zero", prompt_read=read, train_passes=passes)
        seen = []
        tokens = decode(model, prompts, 20, lambda lg, _i, seen=seen: seen.append(lg) or lg.argmax(-1))  # slides twice or more
        logits[read] = torch.stack(seen, 1)
        assert tokens.shape == (2, 20)
    assert (logits["stream"] - logits["passes"]).abs().max() < 1e-5


def test_eval_save_writes_beside_the_checkpoint_it_read(tmp_path, run_dir, data_dir):
    """Two checkpoints copied out of their runs into one folder: each keeps its own eval.json (both wrote models/eval.json)."""
    for name in ("a", "b"):
        shutil.copytree(run_dir / "ckpt", tmp_path / "models" / name)
    for rows, name in ((2, "a"), (4, "b")):
        assert (
            main(["eval", "--ckpt", str(tmp_path / "models" / name), "--data", str(data_dir), "--rows", str(rows), "--save"]) == 0
        )
    assert [json.loads((tmp_path / "models" / n / "eval.json").read_text())["rows"] for n in "ab"] == [2, 4]
    assert not (tmp_path / "models" / "eval.json").exists()
