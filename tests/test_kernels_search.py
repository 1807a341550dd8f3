"""The Triton beam-step kernel against the torch reference (refimpl.search.group_candidates)."""
import pytest
import torch

from refimpl.kernels.search import group_candidates as triton_candidates
from refimpl.search import group_candidates


def inputs(N, Bg, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, Bg, V, generator=g)).to(dtype)
    running = -5 * torch.rand(N, Bg, generator=g)
    counts = torch.randint(0, 3, (N, V), generator=g).float()
    return logits, running, counts


def check(logits, running, counts, penalty, k, **kw):
    got_v, got_i = triton_candidates(logits, running, counts, penalty, k, **kw)
    want_v, _ = group_candidates(logits.float(), running, counts, penalty, k)
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)
    # the indices must point at candidates with those scores (ties may pick either index)
    N, Bg, V = logits.shape
    full = (torch.log_softmax(logits.float(), -1) - (penalty * counts[:, None] if penalty else 0)
            + running[..., None]).view(N, Bg * V)
    torch.testing.assert_close(full.gather(1, got_i), got_v, atol=1e-5, rtol=1e-5)
    assert all(len(set(row)) == k for row in got_i.tolist())


@pytest.mark.parametrize("V", [65, 200, 1000, 5003])
@pytest.mark.parametrize("N,Bg", [(1, 1), (3, 2), (2, 3)])
def test_matches_reference_ragged_vocab(V, N, Bg):
    logits, running, counts = inputs(N, Bg, V, torch.float32, seed=V + Bg)
    for penalty in (0.0, 0.7):
        check(logits, running, counts, penalty, 2 * Bg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    logits, running, counts = inputs(2, 2, 300, dtype)
    check(logits, running, counts, 0.5, 4)


def test_small_blocks_and_large_k():
    """Several vocabulary blocks, k larger than one block's share, a ragged last block."""
    logits, running, counts = inputs(2, 4, 100, torch.float32, seed=7)
    check(logits, running, counts, 1.3, 8, block_v=16)
    check(logits, running, counts, 0.0, 20, block_v=16)  # k > block: each block keeps all 16


def test_extreme_logits():
    logits, running, counts = inputs(1, 2, 77, torch.float32, seed=3)
    logits[0, 0, 5] = 80.0     # a near one-hot row
    logits[0, 1, :] = -30.0    # a flat row
    check(logits, running, counts, 0.2, 4)


def test_bad_input():
    logits, running, counts = inputs(2, 2, 50, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        triton_candidates(logits, running, counts, 0.5, 101)
    with pytest.raises(ValueError, match="running"):
        triton_candidates(logits, running[:, :1], counts, 0.5, 2)
    with pytest.raises(ValueError, match="counts"):
        triton_candidates(logits, running, counts[:, :10], 0.5, 2)
    with pytest.raises(ValueError, match="diversity_penalty"):
        triton_candidates(logits, running, counts, -1.0, 2)
    with pytest.raises(ValueError, match="block_v"):
        triton_candidates(logits, running, counts, 0.5, 2, block_v=24)
