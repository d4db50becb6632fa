import numpy as np
import pytest
import torch

from ladderlm.errors import LadderError
from ladderlm.evaluate import free_running_nll, sliding_windows, split_rows, teacher_forced_stats
from ladderlm.sampling import decode, filter_logits, sampler

from .conftest import tiny_model


def test_cached_steps_equal_full_recompute():
    model = tiny_model()
    tokens = torch.randint(11, (2, 12))
    positions = torch.arange(12)
    x, _, clean = model.embed_slots(tokens, positions, "zero")
    full, _ = model.run(x, clean, model.empty_state(2))
    state, parts = model.empty_state(2), []
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 10), (10, 12)]:  # a block, single steps, a chunk
        y, state = model.run(x[:, a:b], clean[:, a:b], state)
        parts.append(y)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    logits, _ = model(tokens)
    assert torch.allclose(model.lm_head(full), logits, atol=1e-5)


def test_state_is_returned_not_kept():
    model = tiny_model()
    x, _, clean = model.embed_slots(torch.randint(11, (1, 4)), torch.arange(4), "zero")
    empty = model.empty_state(1)
    _, state = model.run(x, clean, empty)
    assert empty.length == 0 and state.length == 4
    y1, _ = model.run(x[:, :1], clean[:, :1], empty)
    y2, _ = model.run(x[:, :1], clean[:, :1], empty)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("sample_fill", ["raw", "renoise"])
def test_a_loss_with_a_generator_is_fixed_and_leaves_the_global_rng(sample_fill):
    """The in-training eval passes its own generator: every random draw of the passes comes from it."""
    model = tiny_model(4, sample_fill=sample_fill, train_passes=4, train_prompts=0.5)
    idx = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(1))
    before = torch.get_rng_state()
    losses = [model(idx, idx, generator=torch.Generator().manual_seed(0))[1] for _ in range(2)]
    assert torch.equal(losses[0], losses[1]) and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("noise", ["independent", "orthogonal"])
def test_recomputed_renoised_passes_with_a_generator_are_the_same_numbers(noise):
    """Renoised fills draw from the loss's generator, and checkpoint replays only the global RNG in the
    backward: a recomputed pass must get the draws it made. The same loss, gradients and generator after."""
    idx, targets = torch.randint(11, (2, 8)), torch.randint(11, (2, 8))
    runs = []
    for recompute in (False, True):
        model = tiny_model(3, train_passes=4, sample_fill="renoise", noise=noise, recompute_passes=recompute).train()
        g = torch.Generator().manual_seed(1)
        loss = model(idx, targets, generator=g)[1]
        loss.backward()
        runs.append((loss, [p.grad for p in model.parameters()], torch.rand(1, generator=g)))
    (loss, grads, after), (loss_r, grads_r, after_r) = runs
    assert torch.equal(loss, loss_r) and torch.equal(after, after_r)
    assert all(torch.equal(g, g_r) for g, g_r in zip(grads, grads_r, strict=True))


def test_positions_past_the_table_are_refused():
    model = tiny_model(block_size=4)
    x, _, clean = model.embed_slots(torch.randint(11, (1, 5)), torch.arange(5), "zero")
    with pytest.raises(LadderError, match="position table"):
        model.run(x, clean, model.empty_state(1))


def test_loss_is_next_token_cross_entropy():
    model = tiny_model()
    tokens = torch.randint(11, (3, 12))
    targets = torch.randint(11, (3, 12))
    logits, loss = model(tokens, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0].flatten(0, 1), targets.flatten())
    assert logits.shape == (3, 12, 1, 11) and torch.allclose(loss, expected)


def recompute_greedy(model, prompt, n_new):
    tokens = prompt
    for _ in range(n_new):
        logits, _ = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1, -1].argmax(-1, keepdim=True)], 1)
    return tokens[:, prompt.shape[1] :]


@pytest.mark.parametrize("prompt_len", [1, 2, 7])
def test_cached_greedy_decode_equals_recompute(prompt_len):
    model = tiny_model(block_size=12)
    prompt = torch.randint(11, (3, prompt_len))
    n_new = 12 - prompt_len + 1  # up to the full window
    out = decode(model, prompt, n_new, sampler(0.0, None, None, torch.Generator()))
    assert torch.equal(out, recompute_greedy(model, prompt, n_new))


@pytest.mark.parametrize("n_step", [1, 2, 4])
def test_parallel_prefill_equals_position_by_position(n_step):
    model = tiny_model(n_step=n_step, block_size=16)
    prompt = torch.randint(11, (2, 9))
    seen = {True: [], False: []}
    for parallel in (True, False):

        def pick(logits, i, parallel=parallel):
            seen[parallel].append(logits)
            return logits.argmax(-1)

        g = torch.Generator().manual_seed(0)
        decode(model, prompt, 30, pick, parallel_prefill=parallel, generator=g)  # slides past the window too
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(seen[True], seen[False], strict=True))


def test_decode_slides_past_the_window_and_scores_like_eval():
    """For S = 1, scoring text with the sampler (true tokens fed back) equals the windowed eval."""
    model = tiny_model(block_size=8)
    text = torch.randint(10, (1, 45))
    nll = []

    def pick(logits, i):
        nll.append(torch.nn.functional.cross_entropy(logits, text[:, i]))
        return text[:, i]

    out = decode(model, torch.full((1, 1), 10), 45, pick)
    assert torch.equal(out, text)
    rows, lengths = split_rows(text[0].numpy(), 1)
    stats = teacher_forced_stats(model, rows, lengths, eot_id=10, batch_size=3)
    assert stats["ce_count"][0] == 45
    assert abs(float(stats["ce"][0]) - float(sum(nll))) < 1e-4
    assert abs(free_running_nll(model, rows, lengths, eot_id=10) - float(sum(nll))) < 1e-4


def test_split_rows():
    rows, lengths = split_rows(np.arange(10), 4)
    assert rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 0]] and lengths.tolist() == [3, 3, 3, 1]
    rows, lengths = split_rows(np.arange(3), 8)
    assert rows.shape == (3, 1) and lengths.tolist() == [1, 1, 1]


@pytest.mark.parametrize("n, block", [(1, 8), (8, 8), (9, 8), (100, 8), (100, 7), (5, 2)])
def test_sliding_windows_score_every_token_once(n, block):
    starts, first = sliding_windows(n, block)
    scored = np.concatenate([np.arange(s + f, min(s + block, n)) for s, f in zip(starts, first)])
    assert np.array_equal(scored, np.arange(n))


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # 0.09, 0.67, 0.24, 0.03
    assert probs[1] < 0.7
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, False, True]]
    g = torch.Generator().manual_seed(0)
    picks = {int(sampler(1.0, 1, None, g)(logits, 0)) for _ in range(20)}
    assert picks == {1}
    assert torch.allclose(filter_logits(logits, temperature=2.0).softmax(-1), (logits / 2).softmax(-1))  # up to a shift
