"""refimpl.kernels.pointer: the fused pointer kernel equals ``refimpl.pointer.pointer_log_probs``.

Oracle: the torch reference (add, tanh, matrix-vector product, masked_fill, log_softmax) on
ragged sizes (n not a power of two, H not a multiple of the block), in both layouts the model
uses: decoding (keys [B, n, H], query [B, H]) and teacher forcing (keys [B, 1, n, H] against
query [B, T, H]), with and without a mask of chosen positions. On ``kernel_device``: the
interpreter on CPU, the compiled kernel on a GPU (tolerances in tests/tolerances.py).
"""
import math

import pytest
import torch
from tolerances import fp32_tol

from refimpl.kernels.pointer import MAX_N, pointer_log_probs_triton
from refimpl.pointer import pointer_log_probs


def case(layout, n, H, masked, seed, B=3, T=4, device="cpu"):
    return [None if t is None else t.to(device) for t in _case(layout, n, H, masked, seed, B, T)]


def _case(layout, n, H, masked, seed, B, T):
    gen = torch.Generator().manual_seed(seed)
    lead = (B,) if layout == "decoding" else (B, T)
    keys = torch.randn(B, n, H, generator=gen) if layout == "decoding" else torch.randn(B, 1, n, H, generator=gen)
    query = torch.randn(*lead, H, generator=gen)
    v = torch.randn(H, generator=gen) / math.sqrt(H)
    mask = None
    if masked:  # about half the positions chosen, one random position per row left open
        mask = torch.rand(*lead, n, generator=gen) < 0.5
        open_ = torch.randint(0, n, lead, generator=gen)
        mask.scatter_(-1, open_[..., None], False)
    return keys, query, v, mask


@pytest.mark.parametrize("layout", ["decoding", "teacher_forcing"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("H", [16, 40, 128])
@pytest.mark.parametrize("n", [1, 7, 50])
def test_kernel_equals_reference(layout, masked, H, n, kernel_device):
    keys, query, v, mask = case(layout, n, H, masked, seed=100 * n + H + masked, device=kernel_device)
    ref = pointer_log_probs(keys, query, v, mask)
    out = pointer_log_probs_triton(keys, query, v, mask)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.device == keys.device
    tol = fp32_tol(kernel_device)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)  # -inf where the reference has it


@pytest.mark.parametrize("n", [200, 600, MAX_N])
def test_long_rows_up_to_the_cap(n, kernel_device):
    """Rows past 128 and 512 positions, where the block of features shrinks to keep the tile."""
    keys, query, v, mask = case("decoding", n, 40, True, seed=n, B=2, device=kernel_device)
    tol = fp32_tol(kernel_device)
    torch.testing.assert_close(pointer_log_probs_triton(keys, query, v, mask),
                               pointer_log_probs(keys, query, v, mask), rtol=tol, atol=tol)


def test_masked_positions_and_normalisation(kernel_device):
    keys, query, v, mask = case("teacher_forcing", 50, 40, True, seed=0, B=2, T=5, device=kernel_device)
    v = v * 20  # sharp rows: large scores must not overflow the log-sum-exp
    out = pointer_log_probs_triton(keys, query, v, mask)
    assert (out[mask] == -math.inf).all()
    assert torch.isfinite(out[~mask]).all()
    tol = fp32_tol(kernel_device)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 5, device=kernel_device), rtol=0, atol=tol)


def test_broadcast_keys_and_half_inputs(kernel_device):
    # expanded keys (stride 0, as in beam search) and bf16 inputs: fp32 compute, fp32 output
    keys, query, v, mask = case("decoding", 7, 40, True, seed=1, device=kernel_device)
    tol = fp32_tol(kernel_device)
    wide = keys[:1].expand(3, -1, -1)
    torch.testing.assert_close(pointer_log_probs_triton(wide, query, v, mask),
                               pointer_log_probs(wide, query, v, mask), rtol=tol, atol=tol)
    k16, q16, v16 = keys.bfloat16(), query.bfloat16(), v.bfloat16()
    out = pointer_log_probs_triton(k16, q16, v16, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pointer_log_probs(k16.float(), q16.float(), v16.float(), mask),
                               rtol=tol, atol=tol)


def test_bad_input():
    keys, query, v, mask = case("decoding", 7, 16, True, seed=2)
    with pytest.raises(ValueError, match="query"):
        pointer_log_probs_triton(keys, torch.randn(3, 17), v, mask)
    with pytest.raises(ValueError, match="v must be"):
        pointer_log_probs_triton(keys, query, torch.randn(17), mask)
    with pytest.raises(ValueError, match="mask must broadcast"):
        pointer_log_probs_triton(keys, query, v, mask[:, :6])
    with pytest.raises(ValueError, match="keys must be"):
        pointer_log_probs_triton(keys[0, 0], query[0, 0], v)
    with pytest.raises(TypeError, match="mask must be a bool"):
        pointer_log_probs_triton(keys, query, v, mask.int())
    full = mask.clone()
    full[1] = True
    with pytest.raises(ValueError, match="forbids every position"):  # the reference refuses it too
        pointer_log_probs(keys, query, v, full)
    with pytest.raises(ValueError, match="masks every position"):
        pointer_log_probs_triton(keys, query, v, full)


def test_rows_beyond_the_cap_raise():
    keys, query, v, _ = case("decoding", MAX_N + 1, 16, False, seed=3, B=1)
    with pytest.raises(ValueError, match=rf"n must be in \[1, {MAX_N}\]"):
        pointer_log_probs_triton(keys, query, v)


def test_int32_offsets_are_checked():
    B = 2**17 + 1  # rows of 1024 x 16 elements: 2**31 + 16384 in all
    keys, query = torch.empty(B, 1024, 16, device="meta"), torch.empty(B, 16, device="meta")
    with pytest.raises(ValueError, match="keys spans 2147500032 elements; the kernel indexes in int32"):
        pointer_log_probs_triton(keys, query, torch.empty(16, device="meta"))


def test_inputs_on_another_device_raise():
    keys, query, v, mask = case("decoding", 7, 16, True, seed=4)
    with pytest.raises(ValueError, match="query is on meta but keys is on cpu"):
        pointer_log_probs_triton(keys, query.to("meta"), v, mask)
