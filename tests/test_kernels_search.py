"""The Triton beam-step kernel against the torch reference (refimpl.search.group_candidates),
on ``kernel_device``: the interpreter on CPU, the compiled kernel on a GPU."""
import pytest
import torch
from tolerances import fp32_tol

from refimpl.kernels.common import MAX_BLOCK
from refimpl.kernels.search import group_candidates as triton_candidates
from refimpl.search import group_candidates


def inputs(N, Bg, V, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, Bg, V, generator=g)).to(device, dtype)
    running = (-5 * torch.rand(N, Bg, generator=g)).to(device)
    counts = torch.randint(0, 3, (N, V), generator=g).float().to(device)
    return logits, running, counts


def check(logits, running, counts, penalty, k, **kw):
    got_v, got_i = triton_candidates(logits, running, counts, penalty, k, **kw)
    want_v, _ = group_candidates(logits.float(), running, counts, penalty, k)
    tol = fp32_tol(logits.device)
    torch.testing.assert_close(got_v, want_v, atol=tol, rtol=tol)
    # the indices must point at candidates with those scores (ties may pick either index)
    N, Bg, V = logits.shape
    full = (torch.log_softmax(logits.float(), -1) - (penalty * counts[:, None] if penalty else 0)
            + running[..., None]).view(N, Bg * V)
    torch.testing.assert_close(full.gather(1, got_i), got_v, atol=tol, rtol=tol)
    assert all(len(set(row)) == k for row in got_i.tolist())


@pytest.mark.parametrize("V", [65, 200, 1000, 5003])
@pytest.mark.parametrize("N,Bg", [(1, 1), (3, 2), (2, 3)])
def test_matches_reference_ragged_vocab(V, N, Bg, kernel_device):
    logits, running, counts = inputs(N, Bg, V, torch.float32, seed=V + Bg, device=kernel_device)
    for penalty in (0.0, 0.7):
        check(logits, running, counts, penalty, 2 * Bg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype, kernel_device):
    logits, running, counts = inputs(2, 2, 300, dtype, device=kernel_device)
    check(logits, running, counts, 0.5, 4)


def test_small_blocks_and_large_k(kernel_device):
    """Several vocabulary blocks, k larger than one block's share, a ragged last block."""
    logits, running, counts = inputs(2, 4, 100, torch.float32, seed=7, device=kernel_device)
    check(logits, running, counts, 1.3, 8, block_v=16)
    check(logits, running, counts, 0.0, 20, block_v=16)  # k > block: each block keeps all 16


def test_beam_width_16(kernel_device):
    """One group of 16 beams keeps k = 32 candidates: 32 rounds of the kernel's loop per block."""
    logits, running, counts = inputs(1, 16, 300, torch.float32, seed=16, device=kernel_device)
    check(logits, running, counts, 0.3, 32)
    check(logits, running, counts, 0.0, 32, block_v=MAX_BLOCK)


def test_extreme_logits(kernel_device):
    logits, running, counts = inputs(1, 2, 77, torch.float32, seed=3, device=kernel_device)
    logits[0, 0, 5] = 80.0     # a near one-hot row
    logits[0, 1, :] = -30.0    # a flat row
    check(logits, running, counts, 0.2, 4)


@pytest.mark.parametrize("block_v", [8, 24, 2 * MAX_BLOCK])
def test_block_v_outside_the_accepted_range_raises(block_v):
    logits, running, counts = inputs(2, 2, 50, torch.float32)
    with pytest.raises(ValueError, match=rf"block_v must be a power of two in \[16, {MAX_BLOCK}\]"):
        triton_candidates(logits, running, counts, 0.5, 2, block_v=block_v)


def test_int32_offsets_are_checked():
    logits, running = torch.empty(1, 2048, 2**20 + 1, device="meta"), torch.empty(1, 2048, device="meta")
    with pytest.raises(ValueError, match="logits spans 2147485696 elements; the kernel indexes in int32"):
        triton_candidates(logits, running)


def test_bad_input():
    logits, running, counts = inputs(2, 2, 50, torch.float32)
    with pytest.raises(ValueError, match="logits.dtype"):
        triton_candidates(logits.double(), running, counts, 0.5, 2)
    with pytest.raises(ValueError, match="counts is on meta but logits is on cpu"):
        triton_candidates(logits, running, counts.to("meta"), 0.5, 2)
    with pytest.raises(ValueError, match="k must be"):
        triton_candidates(logits, running, counts, 0.5, 101)
    with pytest.raises(ValueError, match="running"):
        triton_candidates(logits, running[:, :1], counts, 0.5, 2)
    with pytest.raises(ValueError, match="counts"):
        triton_candidates(logits, running, counts[:, :10], 0.5, 2)
    with pytest.raises(ValueError, match="diversity_penalty"):
        triton_candidates(logits, running, counts, -1.0, 2)
