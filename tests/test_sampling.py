"""The three-phase sampler against the position-by-position reference, batches, stops, explain."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from ladderlm.cli import held_back, main
from ladderlm.explain import explain
from ladderlm.sampling import decode, filter_logits, generate, left_pad, sampler
from ladderlm.tokenizer import BpeTokenizer

from .conftest import tiny_model
from .test_cli import run_bad

EOT = 19


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([EOT]), torch.randint(EOT, (n,), generator=g)]) for n in lengths]


def run(model, prompts, n_new, parallel, temperature=1.0, seed=0):
    """Tokens and the clean-rung logits of every emitted token, sampling with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    seen = []

    def pick(logits, _i):
        seen.append(logits)
        if temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial((logits / temperature).softmax(-1), 1, generator=g)[:, 0]

    out = decode(model, prompts, n_new, pick, parallel_prefill=parallel, generator=torch.Generator().manual_seed(1))
    return out, torch.stack(seen, 1)


@pytest.mark.parametrize("n_step", [1, 2, 4])
@pytest.mark.parametrize("lengths", [[0], [1], ["S-1"], ["S"], [100], [0, 1, "S-1", "S", 7, 100]])
def test_phased_equals_naive(n_step, lengths):
    model = tiny_model(n_step=n_step, vocab_size=EOT + 1, block_size=120)
    lengths = [{"S": n_step, "S-1": n_step - 1}.get(n, n) for n in lengths]
    prompts = prompts_of(lengths)
    phased, phased_logits = run(model, prompts, 40, parallel=True)  # 100 + 40 tokens pass the window
    naive, naive_logits = run(model, prompts, 40, parallel=False)
    assert torch.equal(phased, naive)
    assert (phased_logits - naive_logits).abs().max() < 1e-5


@pytest.mark.parametrize("backbone", ["attention", "ssm"])
@pytest.mark.parametrize("n_step", [1, 3])
def test_a_row_in_a_batch_decodes_as_it_would_alone(n_step, backbone):
    """Left padding is exact: each row of a mixed batch matches its own unbatched run.

    (Until the window slides: in a batch all rows slide when the longest one fills it.)"""
    ssm = {"ssm_state": 8, "ssm_head_dim": 8, "ssm_chunk": 8} if backbone == "ssm" else {}
    model = tiny_model(n_step=n_step, vocab_size=EOT + 1, block_size=24, prompt_noise="zero", backbone=backbone, **ssm)
    prompts = prompts_of([0, 3, 11])
    batch, batch_logits = run(model, prompts, 12, parallel=True, temperature=0)
    for r, prompt in enumerate(prompts):
        alone, alone_logits = run(model, [prompt], 12, parallel=True, temperature=0)
        assert torch.equal(batch[r], alone[0])
        assert (batch_logits[r] - alone_logits[0]).abs().max() < 1e-5


def test_left_pad():
    padded, pad = left_pad([torch.tensor([1, 2, 3]), torch.tensor([4])], fill=0)
    assert padded.tolist() == [[1, 2, 3], [0, 0, 4]] and pad.tolist() == [0, 2]


def test_rows_finish_at_the_end_of_text_token():
    model = tiny_model(n_step=2, vocab_size=EOT + 1, block_size=16)
    scripted = torch.tensor([[1, 2, EOT, 5, 6, 7], [3, EOT, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]])

    def pick(logits, i):
        return scripted[:, i]

    out = decode(model, prompts_of([2, 2, 2]), 6, pick, eot_id=EOT)
    assert out.tolist() == [[1, 2, EOT, EOT, EOT, EOT], [3, EOT, EOT, EOT, EOT, EOT], scripted[2].tolist()]
    rows = generate(model, [[1, 2], [3]], EOT, 40, num_samples=2, seed=3)
    assert len(rows) == 4 and all(EOT not in r and len(r) <= 40 for r in rows)


def test_all_rows_finished_stops_early():
    model = tiny_model(n_step=1, vocab_size=EOT + 1)
    out = decode(model, prompts_of([1, 4]), 1000, lambda logits, i: torch.full((2,), EOT), eot_id=EOT)
    assert out.shape == (2, 16)  # checked every 16 tokens


def test_explain_uses_the_sampler_masks():
    text = explain(4, "ABC")
    assert "rung 0    ^  A  B  C" in text  # phase i: rung 0 holds the newest token of each position
    assert "rung 3    .  .  .  ^" in text  # the clean rung lags S-1 positions behind
    step1 = text.split("Step 1, position p4")[1].split("Step 2")[0]
    assert "rung 3: A  <- input (prompt)" in step1 and "rung 0: #1 <- new" in step1
    assert "Emit #1 from the clean rung of p6; position p7" in text
    assert "rung 3: #1 <- input (generated token)" in text
    assert "Phase ii, iterative prefill: 0 single step(s)" in explain(1, "")


def test_sample_cli_batches_prompts_and_stop_strings(run_dir, capsys):
    argv = ["sample", "--ckpt", str(run_dir), "--max-new-tokens", "60", "--seed", "1"]
    assert main([*argv, "--prompt", "The cat", "--prompt", "a", "--num-samples", "2"]) == 0
    samples = capsys.readouterr().out.split("\n---\n")
    assert len(samples) == 4 and samples[0].startswith("The cat") and samples[2].startswith("a")
    assert main([*argv, "--prompt", "The", "--stop", "e"]) == 0
    assert "e" not in capsys.readouterr().out[len("The") :]
    assert main([*argv, "--prompt", "The"]) == 0
    free = capsys.readouterr().out
    # three tokens: the one that completes it must not be lost with the cut; one far past the prompt
    for stop, stream in itertools.product((free[5:8], free[40:43]), ([], ["--stream"])):
        assert main([*argv, "--prompt", "The", "--stop", stop, *stream]) == 0
        assert capsys.readouterr().out == free[: free.index(stop)] + "\n"
    assert main(["explain", "--n-step", "3", "--prompt", "hi"]) == 0
    assert "Phase iii" in capsys.readouterr().out


def test_temperatures_below_float32_are_greedy():
    """A temperature that rounds to 0 in float32 samples the best token, not 0 / 0 = NaN."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-46, 1e-50, 1e-300):
        assert not filter_logits(logits, temperature).isnan().any()
        assert sampler(temperature, None, None, g)(logits, 0).tolist() == [1, 0]


def test_nucleus_is_the_smallest_prefix_reaching_top_p():
    uniform = torch.zeros(1, 4)  # four tokens of exactly 0.25 each
    for top_p, kept in ((0.25, 1), (0.5, 2), (0.75, 3), (0.8, 4), (1e-46, 1)):  # 1e-46: 0 in float32, still the best
        assert (filter_logits(uniform, top_p=top_p) > float("-inf")).sum().item() == kept, top_p


def test_stop_strings_and_sizes_are_checked_in_one_line(run_dir, data_dir, capsys):
    sample = ["sample", "--ckpt", str(run_dir), "--max-new-tokens", "4"]
    run_bad(capsys, [*sample, "--stop", "a\udcff"], run_dir, match="a --stop string is not valid UTF-8")  # argv's b"a\xff"
    run_bad(capsys, ["sample", "--ckpt", str(run_dir), "--max-new-tokens", str(2**62)], run_dir, match="out of range")
    evaluate = ["eval", "--ckpt", str(run_dir), "--data", str(data_dir), "--rows", "2"]
    run_bad(capsys, [*evaluate, "--samples", str(2**61), "--sample-length", "8"], run_dir, match="out of range")


BYTE_BPE = ["hello world abc " * 50], 300  # é, ö and ☃ get no merges: each character is split across byte tokens


def script_sample(monkeypatch, tok, script: list[int]) -> None:
    """`ladderlm sample` with a stand-in checkpoint and a generate() that emits `script`, token by token."""
    model = SimpleNamespace(cfg=SimpleNamespace(block_size=64))
    monkeypatch.setattr("ladderlm.checkpoint.load", lambda *args, **kwargs: (model, None, tok))

    def generate(model, prompts, eot_id, n, *args, slide=True):
        on_token, out = args[5], []
        for t in script[:n]:
            out.append(t)
            if on_token is not None and on_token(torch.tensor([t]))[0]:
                break
        return [out]

    monkeypatch.setattr("ladderlm.sampling.generate", generate)


def test_stream_holds_back_a_stop_string_before_a_split_character(monkeypatch, capsys):
    """Byte-level BPE: "x" then the first byte of "é" decode to "x\ufffd"; the stop "xé" may still
    follow, so "x" is not printed before the next token decides it."""
    tok = BpeTokenizer.train(*BYTE_BPE)
    script = tok.encode("axé and on")
    assert tok.decode(script[:3]) == "ax\ufffd"
    assert held_back("ax\ufffd", ["xé"]) == 2
    script_sample(monkeypatch, tok, script)
    for stream in ([], ["--stream"]):
        assert main(["sample", "--ckpt", "run", "--device", "cpu", "--stop", "xé", *stream]) == 0
        assert capsys.readouterr().out == "a\n", stream


@pytest.mark.parametrize("stop", [[], ["--stop", "☃ z"]])
def test_a_long_stream_prints_what_a_whole_decode_does(monkeypatch, capsys, stop):
    """--stream decodes only the tokens after the last whole character it settled: the same text."""
    tok = BpeTokenizer.train(*BYTE_BPE)
    script_sample(monkeypatch, tok, tok.encode("héllo wörld ☃ " * 30 + "☃ z tail"))
    outs = []
    for stream in ([], ["--stream"]):
        assert main(["sample", "--ckpt", "run", "--device", "cpu", "--max-new-tokens", "1000", *stop, *stream]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("héllo wörld ☃ ") and ("tail" in outs[0]) == (not stop)
