"""The ring's per-step Triton block against torch oracles, at ragged sizes and global positions,
and the whole ring with the kernel as block backend. On ``kernel_device``: the interpreter on
CPU, the compiled kernel on a GPU (tolerances per device in tests/tolerances.py)."""
import pytest
import torch
import torch.nn.functional as F
from tolerances import attention_tol

from refimpl.kernels.attention import attention_reference
from refimpl.kernels.ring import global_offset, ring_block_attention, ring_step
from refimpl.ring import LAYOUTS, block_attention, ring_attention


def qkv(T, S, D=16, B=1, H=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(device) for n in (T, S, S)]


def oracle(q, k, v, q_pos, k_pos, causal):
    """SDPA on the block with the mask built from global positions (key visible iff its
    position <= the query's), and the logsumexp of the masked scores."""
    mask = k_pos[None, :] <= q_pos[:, None] if causal else \
        torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q.device)
    s = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    rows = mask.any(-1)
    out = torch.zeros_like(q)
    out[..., rows, :] = F.scaled_dot_product_attention(q[..., rows, :], k, v, attn_mask=mask[rows])
    return out, torch.logsumexp(s, -1)


# (T, S, q_start, k_start, stride): ragged sizes; past, diagonal, partly and wholly future blocks
CASES = [(37, 53, 100, 0, 1), (37, 53, 60, 40, 1), (37, 37, 40, 40, 1), (53, 37, 40, 60, 1),
         (17, 200, 0, 150, 1), (200, 17, 3, 1, 4), (50, 50, 1, 3, 4), (1, 64, 70, 0, 1)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T,S,qs,ks,stride", CASES)
def test_ring_step_matches_global_position_oracle(T, S, qs, ks, stride, causal, kernel_device):
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    q, k, v = qkv(T, S, device=kernel_device)
    out, lse = ring_step(q, k, v, qs, ks, causal=causal, stride=stride)
    q_pos = qs + stride * torch.arange(T, device=kernel_device)
    k_pos = ks + stride * torch.arange(S, device=kernel_device)
    ref_out, ref_lse = oracle(q, k, v, q_pos, k_pos, causal)
    torch.testing.assert_close(out, ref_out, atol=out_tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=lse_tol, rtol=lse_tol)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("offset", [None, -40, -3, 0, 7, 100])
def test_ring_block_backend_matches_torch_block(offset, kernel_device):
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    q, k, v = qkv(45, 29, D=24, seed=2, device=kernel_device)
    out, lse = ring_block_attention(q, k, v, sm_scale=0.4, causal_offset=offset)
    ref_out, ref_lse = block_attention(q, k, v, sm_scale=0.4, causal_offset=offset)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=out_tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=lse_tol, rtol=lse_tol)
    ref2, _ = attention_reference(q, k, v, causal=offset is not None, sm_scale=0.4, causal_offset=offset)
    torch.testing.assert_close(out, ref2, atol=out_tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ring_block_writes_fp32_for_the_merge(dtype, kernel_device):
    """Low-precision inputs, fp32 output (the merge's accumulator dtype): the kernel's result
    is not rounded to the input dtype, so it is closer to the fp32 reference than any value of
    that dtype can be."""
    out_tol, lse_tol = attention_tol(kernel_device, dtype)
    q, k, v = (x.to(dtype) for x in qkv(45, 29, D=24, seed=3, device=kernel_device))
    out, lse = ring_block_attention(q, k, v, sm_scale=0.4, causal_offset=-5)
    ref_out, ref_lse = block_attention(q, k, v, sm_scale=0.4, causal_offset=-5)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=out_tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=lse_tol, rtol=lse_tol)
    if kernel_device.type == "cpu":  # exact fp32 dots: no output is an fp16/bf16 value apart
        assert not torch.equal(out, out.to(dtype).float())


def test_ring_block_on_meta_tensors_reports_shapes_only():
    q, k, v = (torch.empty(2, 3, n, 16, device="meta") for n in (40, 24, 24))
    out, lse = ring_block_attention(q, k, v, sm_scale=0.25, causal_offset=0)
    assert out.is_meta and out.shape == (2, 3, 40, 16) and out.dtype == torch.float32
    assert lse.is_meta and lse.shape == (2, 3, 40)
    with pytest.raises(ValueError, match="causal_offset"):
        ring_block_attention(q, k, v, sm_scale=0.25, causal_offset=0.5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [2, 4])
def test_ring_with_kernel_backend_matches_sdpa(P, layout, kernel_device):
    tol = attention_tol(kernel_device, torch.float32)[0]
    q, k, v = qkv(200, 200, D=16, seed=P, device=kernel_device)
    for causal in (False, True):
        out = ring_attention(q, k, v, world_size=P, causal=causal, layout=layout, backend="triton")
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                   atol=tol, rtol=0)


def test_global_offset_and_bad_input():
    assert global_offset(96, 32) == 64 and global_offset(1, 3, stride=4) == -1
    assert global_offset(3, 1, stride=4) == 0
    with pytest.raises(ValueError, match="stride"):
        global_offset(0, 0, stride=0)
    q, k, v = qkv(4, 4)
    with pytest.raises(ValueError, match="k.dtype"):
        ring_step(q, k.double(), v, 0, 0)
