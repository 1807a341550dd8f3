"""The Triton beam-search kernels against their torch references (refimpl.search.group_candidates,
refimpl.search.partial_attention for the shared-prefix attention), on ``kernel_device``: the
interpreter on CPU, the compiled kernel on a GPU."""
import pytest
import torch
from tolerances import attention_tol, fp32_tol

from refimpl.kernels.common import MAX_BLOCK
from refimpl.kernels.search import group_candidates as triton_candidates
from refimpl.kernels.search import prefix_attention, prefix_launch_config
from refimpl.lm import additive_mask
from refimpl.search import group_candidates, partial_attention


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


# ---- shared-prefix attention: all beams' queries of a prompt against its keys, read once ----

def prefix_inputs(N, Hkv, M, S, D, dtype=torch.float32, pads=None, seed=0, device="cpu"):
    """q [N, Hkv, M, D], k, v [N, Hkv, S, D]; with ``pads`` (one per prompt) a left-padding
    key mask [N, S]: 0 for a prompt token, float32's minimum for the pads[n] first keys."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = [torch.randn(N, Hkv, n, D, generator=g).to(device, dtype) for n in (M, S, S)]
    if pads is None:
        return q, k, v, None
    keep = torch.arange(S)[None, :] >= torch.tensor(pads)[:, None]
    return q, k, v, additive_mask(keep).to(device)


def reference(q, k, v, key_mask, sm_scale=None):
    """partial_attention with T = 1 and the key mask broadcast to [N, 1, 1, 1, S]."""
    mask = None if key_mask is None else key_mask[:, None, None, None, :]
    out, lse = partial_attention(q.unsqueeze(3), k, v, mask, sm_scale)
    return out.squeeze(3), lse.squeeze(3)


def check_prefix(q, k, v, key_mask, out_tol, lse_tol, ref_dtype=torch.float32, **kw):
    """The kernel against the reference on the inputs cast to ``ref_dtype``; the max errors."""
    out, lse = prefix_attention(q, k, v, key_mask, **kw)
    N, Hkv, M, D = q.shape
    assert out.shape == (N, Hkv, M, D) and lse.shape == (N, Hkv, M)
    assert out.dtype == lse.dtype == torch.float32 and out.device == q.device
    want_out, want_lse = reference(q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), key_mask,
                                   kw.get("sm_scale"))
    torch.testing.assert_close(out, want_out, atol=out_tol, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=lse_tol, rtol=lse_tol)
    return (out - want_out).abs().max().item(), (lse - want_lse).abs().max().item()


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "leftpad"])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("S", [37, 200])
def test_prefix_attention_matches_partial_attention(S, group, D, masked, kernel_device):
    """8 beams x a GQA group of 1 or 2 queries per (prompt, kv head), ragged S."""
    N, Hkv, M = 2, 2, 8 * group
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    pads = [5, 0] if masked else None  # prompt 0 left-padded by 5, prompt 1 not at all
    q, k, v, key_mask = prefix_inputs(N, Hkv, M, S, D, pads=pads, seed=S + D + group,
                                      device=kernel_device)
    check_prefix(q, k, v, key_mask, out_tol, lse_tol)


@pytest.mark.parametrize("D", [32, 64])
def test_prefix_attention_ragged_tiles(D, kernel_device):
    """M = 24 and S = 200 over 16 x 16 tiles: two query blocks (the second ragged), 13 key
    tiles (the last ragged), a padding run that spans two tiles; then the default blocks."""
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    q, k, v, key_mask = prefix_inputs(3, 1, 24, 200, D, pads=[0, 21, 199], seed=D,
                                      device=kernel_device)
    check_prefix(q, k, v, key_mask, out_tol, lse_tol, block_m=16, block_n=16)
    check_prefix(q, k, v, key_mask, out_tol, lse_tol, sm_scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prefix_attention_low_precision(dtype, kernel_device):
    """fp16/bf16 inputs: against the reference on the same inputs in fp32 at the attention
    kernels' tolerance; fp16 also against the reference in fp16, looser (it rounds the scores
    and the probabilities to fp16 before the products)."""
    out_tol, lse_tol = attention_tol(kernel_device, dtype)
    q, k, v, key_mask = prefix_inputs(2, 2, 16, 200, 64, dtype, pads=[7, 0], device=kernel_device)
    check_prefix(q, k, v, key_mask, out_tol, lse_tol)
    if dtype == torch.float16:
        check_prefix(q, k, v, key_mask, 2e-2, 2e-2, ref_dtype=dtype)


def test_prefix_attention_strided_queries(kernel_device):
    """q as a transposed view ([N, M, Hkv, D] memory): the kernel follows the strides."""
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    q, k, v, key_mask = prefix_inputs(2, 2, 8, 37, 32, pads=[3, 0], device=kernel_device)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    check_prefix(q, k, v, key_mask, out_tol, lse_tol)


def test_prefix_attention_fully_masked_prompt(kernel_device):
    """A prompt whose keys are all -inf: out = 0 and lse = -inf (no NaN); the other prompt
    still matches the reference."""
    out_tol, lse_tol = attention_tol(kernel_device, torch.float32)
    q, k, v, _ = prefix_inputs(2, 1, 8, 37, 32, device=kernel_device)
    key_mask = torch.zeros(2, 37, device=kernel_device)
    key_mask[1] = float("-inf")
    out, lse = prefix_attention(q, k, v, key_mask)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    want_out, want_lse = reference(q[:1], k[:1], v[:1], None)
    torch.testing.assert_close(out[:1], want_out, atol=out_tol, rtol=0)
    torch.testing.assert_close(lse[:1], want_lse, atol=lse_tol, rtol=lse_tol)


def test_prefix_attention_empty(kernel_device):
    q, k, v, _ = prefix_inputs(2, 1, 8, 0, 32, device=kernel_device)
    out, lse = prefix_attention(q, k, v)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out, lse = prefix_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    assert out.shape == (2, 1, 0, 32) and lse.shape == (2, 1, 0)


def test_prefix_launch_config():
    assert prefix_launch_config(8, 64, torch.float16) == {
        "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4}
    assert prefix_launch_config(24, 32, torch.float32)["BLOCK_M"] == 32
    assert prefix_launch_config(1000, 128, torch.float32)["BLOCK_M"] == 32  # fp32 D > 64: 32
    assert prefix_launch_config(1000, 128, torch.float16)["BLOCK_M"] == 64


def test_prefix_attention_bad_input():
    q, k, v, key_mask = prefix_inputs(2, 2, 8, 37, 32, pads=[1, 0])
    cases = [
        ((q[0], k, v), "q must be a 4-D tensor"),
        ((q, k[0], v), "k must be a 4-D tensor"),
        ((q.double(), k, v), "q.dtype must be float32, float16 or bfloat16"),
        ((q, k.half(), v), r"k.dtype \(torch.float16\) must equal q.dtype"),
        ((q, k, v.half()), r"v.dtype \(torch.float16\) must equal q.dtype"),
        ((q, k[:1], v), r"k must be \[N, Hkv, S, D\] = \[2, 2, S, 32\]"),
        ((q, k, v[..., :16]), r"v must be \[N, Hkv, S, D\]"),
        ((q, k, v[:, :, :30]), "k and v must have the same length S, got 37 and 30"),
        ((q, k.to("meta"), v), "k is on meta but q is on cpu"),
        ((q, k, v, key_mask.to("meta")), "key_mask is on meta but q is on cpu"),
        ((q, k, v, key_mask[:, :30]), r"key_mask must be \[N, S\] = \[2, 37\], got \(2, 30\)"),
        ((q, k, v, key_mask[0]), r"key_mask must be \[N, S\]"),
        ((q, k, v, key_mask == 0), "key_mask must be an additive float tensor"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            prefix_attention(*args)
    with pytest.raises(ValueError, match=r"block_m must be a power of two in \[16, "):
        prefix_attention(q, k, v, block_m=8)
    with pytest.raises(ValueError, match=r"block_n must be a power of two in \[16, "):
        prefix_attention(q, k, v, block_n=24)
    with pytest.raises(ValueError, match="sm_scale must be a finite float"):
        prefix_attention(q, k, v, sm_scale=float("nan"))
    wide = torch.zeros(1, 1, 4, 256)
    with pytest.raises(ValueError, match=r"head dim D must be in \[1, 128\], got 256"):
        prefix_attention(wide, wide, wide)


def test_prefix_attention_int32_offsets_are_checked():
    q = torch.empty(1, 1, 8, 128, device="meta")
    k = torch.empty(1, 1, 2**24 + 1, 128, device="meta")
    with pytest.raises(ValueError, match="k spans 2147483776 elements; the kernel indexes in int"):
        prefix_attention(q, k, k)


def test_shared_prefix_cache_with_the_triton_backend_decodes_like_the_math():
    # the workbench model's attn_backend picks how the shared-prefix cache computes its partials
    from refimpl.lm import GPTConfig, TinyGPT
    from refimpl.search import beam_search
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=30, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(1))
    outs = {}
    for backend in ("math", "triton"):
        model.attn_backend = backend
        outs[backend] = beam_search(model, ids, num_beams=4, max_new_tokens=5, num_return_sequences=4)
    assert torch.equal(outs["math"].sequences, outs["triton"].sequences)
    torch.testing.assert_close(outs["math"].sequences_scores, outs["triton"].sequences_scores,
                               atol=1e-5, rtol=0)
