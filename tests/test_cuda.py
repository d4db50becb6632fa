"""Checks that need a CUDA device (run by scripts/gpu_check.sh); skipped without one."""

import pytest
import torch

from ladderlm.distributed import autocast
from ladderlm.sampling import decode, sampler

from .conftest import tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("n_step", [1, 4])
def test_cached_decoding_matches_the_parallel_pass_on_cuda(n_step):
    model = tiny_model(n_step=n_step, vocab_size=20, block_size=40).cuda()
    prompts = torch.randint(19, (3, 12), device="cuda")
    prompts[:, 0] = 19
    seen = {}
    for parallel in (True, False):
        logits = []

        def pick(x, i, logits=logits):
            logits.append(x)
            return x.argmax(-1)

        g = torch.Generator(device="cuda").manual_seed(0)
        seen[parallel] = (decode(model, prompts, 50, pick, parallel_prefill=parallel, generator=g), torch.stack(logits, 1))
    assert torch.equal(seen[True][0], seen[False][0])
    assert (seen[True][1] - seen[False][1]).abs().max() < 1e-4


def test_bf16_training_steps_on_cuda():
    model = tiny_model(n_step=2, vocab_size=20, block_size=32).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = torch.randint(20, (8, 32), device="cuda")
    first = None
    for _ in range(30):
        with autocast(torch.device("cuda"), "bf16"):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert torch.isfinite(loss) and loss.item() < first


def test_sampling_stays_on_the_device():
    model = tiny_model(n_step=4, vocab_size=20, block_size=64).cuda()
    prompts = torch.full((2, 1), 19, device="cuda")
    out = decode(model, prompts, 80, sampler(1.0, None, None, torch.Generator(device="cuda").manual_seed(0)))
    assert out.device.type == "cuda" and out.shape == (2, 80)
