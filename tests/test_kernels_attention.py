"""The Triton flash-attention forward against torch oracles, on ``kernel_device``: the
interpreter on CPU, the compiled kernel on a GPU (tolerances per device: tests/tolerances.py)."""
import pytest
import torch
import torch.nn.functional as F
from tolerances import attention_tol, model_tol

from refimpl.kernels.attention import MAX_HEAD_DIM, attention_reference, flash_attention
from refimpl.lm import GPTConfig, TinyGPT

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZES = [(1, 17), (17, 17), (17, 200), (200, 17), (200, 200), (1, 200)]  # (T, S)


def make_qkv(T, S, D, dtype=torch.float32, B=1, H=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(device, dtype) for n in (T, S, S)]


def visible(T, S, causal, offset=None, device="cpu"):
    """Boolean [T, S]: key j visible to query i iff j <= i + offset (default S - T)."""
    if not causal:
        return torch.ones(T, S, dtype=torch.bool, device=device)
    offset = S - T if offset is None else offset
    j, i = torch.arange(S, device=device), torch.arange(T, device=device)
    return j[None, :] <= i[:, None] + offset


def oracle(q, k, v, mask):
    """SDPA with an explicit boolean mask (its is_causal is top-left aligned) and logsumexp."""
    q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [16, 24, 64, 128])
@pytest.mark.parametrize("T,S", SIZES)
def test_kernel_matches_reference_and_sdpa(T, S, D, causal, dtype, kernel_device):
    out_tol, lse_tol = attention_tol(kernel_device, dtype)
    q, k, v = make_qkv(T, S, D, dtype, device=kernel_device)
    out, lse = flash_attention(q, k, v, causal=causal)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=out_tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=lse_tol, rtol=lse_tol)

    mask = visible(T, S, causal, device=kernel_device)
    rows = mask.any(-1)  # bottom-right causal with T > S leaves the first T - S rows keyless
    sdpa_out, sdpa_lse = oracle(q, k, v, mask)
    torch.testing.assert_close(out.float()[..., rows, :], sdpa_out[..., rows, :],
                               atol=out_tol, rtol=0)
    torch.testing.assert_close(lse[..., rows], sdpa_lse[..., rows], atol=lse_tol, rtol=lse_tol)
    assert torch.all(out[..., ~rows, :] == 0) and torch.all(lse[..., ~rows] == float("-inf"))


@pytest.mark.parametrize("fn", [flash_attention, attention_reference])
def test_reference_and_kernel_match_sdpa_on_strided_bf16_and_scale(fn, kernel_device):
    B, H, T, S, D = 2, 3, 33, 50, 40
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, D, generator=g).to(kernel_device).transpose(1, 2)  # TinyGPT's layout
    kv = torch.randn(2, B, H, S + 7, D, generator=g).to(kernel_device)[:, :, :, :S]  # a cache slice
    k, v = kv[0], kv[1]
    mask = visible(T, S, True, device=kernel_device)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    tol32, tol16 = attention_tol(kernel_device, torch.float32)[0], attention_tol(kernel_device, torch.bfloat16)[0]
    torch.testing.assert_close(fn(q, k, v, causal=True, sm_scale=0.3)[0], want, atol=tol32, rtol=0)
    out16 = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, sm_scale=0.3)[0]
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), want, atol=tol16, rtol=0)


@pytest.mark.parametrize("fn", [flash_attention, attention_reference])
@pytest.mark.parametrize("offset", [-5, -30, -100, 3, 60])
def test_causal_offset_including_keyless_rows(fn, offset, kernel_device):
    T, S, D = 20, 40, 24
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    q, k, v = make_qkv(T, S, D, seed=2, device=kernel_device)
    out, lse = fn(q, k, v, causal=True, causal_offset=offset)
    assert not out.isnan().any() and not lse.isnan().any()
    mask = visible(T, S, True, offset, device=kernel_device)
    rows = mask.any(-1)
    assert torch.all(out[..., ~rows, :] == 0) and torch.all(lse[..., ~rows] == float("-inf"))
    want_out, want_lse = oracle(q, k, v, mask)
    torch.testing.assert_close(out[..., rows, :], want_out[..., rows, :], atol=out_tol, rtol=0)
    torch.testing.assert_close(lse[..., rows], want_lse[..., rows], atol=lse_tol, rtol=lse_tol)
    if offset == -5:  # a partly keyless case, so the test exercises both branches
        assert rows.any() and not rows.all()


def test_lse_merges_two_key_halves(kernel_device):
    """Merging the two key halves' (out, lse) by online softmax gives the whole (ring attention)."""
    T, S, D = 17, 50, 16
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    q, k, v = make_qkv(T, S, D, seed=3, device=kernel_device)
    whole, lse = flash_attention(q, k, v)
    o1, l1 = flash_attention(q, k[:, :, :20], v[:, :, :20])
    o2, l2 = flash_attention(q, k[:, :, 20:], v[:, :, 20:])
    merged_lse = torch.logaddexp(l1, l2)
    merged = torch.exp(l1 - merged_lse)[..., None] * o1 + torch.exp(l2 - merged_lse)[..., None] * o2
    torch.testing.assert_close(merged, whole, atol=out_tol, rtol=0)
    torch.testing.assert_close(merged_lse, lse, atol=lse_tol, rtol=lse_tol)


@pytest.mark.parametrize("D", [MAX_HEAD_DIM + 1, 256])
def test_head_dim_beyond_the_cap_raises(D, kernel_device):
    q, k, v = make_qkv(3, 5, D, device=kernel_device)
    with pytest.raises(ValueError, match=rf"head dim D must be in \[1, {MAX_HEAD_DIM}\], got {D}"):
        flash_attention(q, k, v)
    attention_reference(q, k, v)  # the torch reference has no cap


def test_launch_bounds_a_gpu_enforces():
    """Checked before launch, on meta tensors (shapes without memory): CUDA's 65535 programs
    along the grid's second dimension, and int32 element offsets."""
    many_heads = torch.empty(2, 40000, 1, 16, device="meta")
    with pytest.raises(ValueError, match=r"B \* H = 80000 programs .* must be in \[1, 65535\]"):
        flash_attention(many_heads, many_heads, many_heads)
    long = torch.empty(1, 1, 2**27 + 1, 16, device="meta")
    with pytest.raises(ValueError, match="q spans 2147483664 elements; the kernel indexes in int32"):
        flash_attention(long, long, long)


def test_out_dtype_is_where_the_kernel_stores(kernel_device):
    q, k, v = (t.half() for t in make_qkv(5, 7, 16, device=kernel_device))
    out, _ = flash_attention(q, k, v, causal=True, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    want, _ = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.half(), want, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="out_dtype must be None or a float dtype"):
        flash_attention(q, k, v, out_dtype=torch.int32)


def _bad_inputs():
    q, k, v = make_qkv(5, 7, 16)
    return [
        ((q[0], k, v), "q"),
        ((q, k[0], v), "k"),
        ((q, k, v[..., None]), "v"),
        ((q, k[:1].expand(2, -1, -1, -1), v), "k"),  # batch mismatch
        ((q, k[:, :1], v), "k"),  # heads mismatch
        ((q, k[..., :8], v), "k"),  # head dim mismatch
        ((q, k, v[..., :8]), "v"),
        ((q, k, v[:, :, :6]), "k and v"),  # length mismatch
        ((q, k.half(), v), "k.dtype"),
        ((q.double(), k.double(), v.double()), "q.dtype"),
        ((q.long(), k.long(), v.long()), "q.dtype"),
    ]


@pytest.mark.parametrize("fn", [flash_attention, attention_reference])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_raises(fn, case):
    args, name = _bad_inputs()[case]
    with pytest.raises(ValueError, match=name):
        fn(*args)


def _tiny_gpt():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@torch.no_grad()
def test_tinygpt_triton_backend_matches_sdpa(kernel_device):
    model = _tiny_gpt().to(kernel_device)
    B, T, prefix = 2, 37, 30
    idx = torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(4)).to(kernel_device)
    tol = model_tol(kernel_device)

    model.attn_backend = "sdpa"
    want = model(idx)
    non_causal = model(idx, attn_mask=torch.zeros(1, 1, T, T, device=kernel_device))
    assert (want - non_causal).abs().max() > 10 * tol  # so tol below would catch a masking bug
    model.attn_backend = "triton"
    torch.testing.assert_close(model(idx), want, atol=tol, rtol=tol)

    for backend in ("sdpa", "triton"):
        model.attn_backend = backend
        cache = model.empty_cache(B)
        steps = [model(idx[:, :prefix], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(prefix, T)]
        assert len(cache) == T
        torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=tol, rtol=tol)
