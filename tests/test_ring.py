"""Simulated ring attention and Ulysses against PyTorch's scaled_dot_product_attention, brute-force
mask counts, and the papers' facts (load balance, communication volume)."""
import pytest
import torch
import torch.nn.functional as F

from refimpl import ring
from refimpl.ring import (LAYOUTS, RingTrace, block_attention, blockwise_attention, comm_volume,
                          merge_partials, positions_of, ring_attention, shard_segments,
                          ulysses_attention)

ATOL = 1e-5


def make_qkv(B=2, H=2, N=48, D=8, seed=0, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def sdpa_with_grads(q, k, v, dout, causal):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def owned_visible_pairs(N, P, layout, causal):
    """Brute force: count the 1s of the full N x N mask in the rows each rank owns."""
    mask = torch.ones(N, N, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    return [int(mask[positions_of(segs)].sum()) for segs in shard_segments(N, P, layout)]


# -- merging partial results ---------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_merge_of_two_disjoint_key_sets_is_full_attention(causal):
    q, k, v = make_qkv(N=20, grad=False)
    scale = q.shape[-1] ** -0.5
    first = torch.zeros(20, dtype=torch.bool)
    first[torch.randperm(20, generator=torch.Generator().manual_seed(1))[:9]] = True
    allowed = torch.ones(20, 20, dtype=torch.bool).tril() if causal else torch.ones(20, 20, dtype=torch.bool)

    def partial(keys):  # brute force over a key subset, lse from torch.logsumexp
        s = (q @ k.transpose(-2, -1) * scale).masked_fill(~(allowed & keys), float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        return p @ v, lse

    out, lse = merge_partials(*partial(first), *partial(~first))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               atol=ATOL, rtol=0)
    s = (q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=ATOL, rtol=0)
    assert not torch.isnan(out).any()  # causal row 0 sees no key of one subset


def test_merge_is_stable_and_handles_empty_rows():
    out_a, out_b = torch.ones(3, 4), 2 * torch.ones(3, 4)
    ninf = float("-inf")
    lse_a = torch.tensor([ninf, 0.0, 1e4])
    lse_b = torch.tensor([ninf, ninf, 1e4])  # empty/empty, full/empty, equal and huge
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[0] == 0) and lse[0] == ninf
    assert torch.all(out[1] == 1) and lse[1] == 0
    torch.testing.assert_close(out[2], torch.full((4,), 1.5))
    torch.testing.assert_close(lse[2], torch.tensor(1e4 + torch.log(torch.tensor(2.0)).item()))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [1, 7, 16, 50])
def test_blockwise_attention_matches_sdpa(block_size, causal):
    q, k, v = make_qkv(N=50, grad=False)
    out = blockwise_attention(q, k, v, block_size=block_size, causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               atol=ATOL, rtol=0)


def test_block_attention_offset_matches_explicit_mask():
    q, k, v = make_qkv(N=12, grad=False)
    for offset in (-20, -5, 0, 3, 30):
        out, lse = block_attention(q, k, v, sm_scale=0.3, causal_offset=offset)
        mask = torch.arange(12)[None, :] <= torch.arange(12)[:, None] + offset
        rows = mask.any(-1)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        torch.testing.assert_close(out[..., rows, :], ref[..., rows, :], atol=ATOL, rtol=0)
        assert torch.all(out[..., ~rows, :] == 0) and torch.all(lse[..., ~rows] == float("-inf"))


# -- the ring: exactness ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_ring_matches_sdpa_outputs_and_gradients(P, causal, layout):
    q, k, v = make_qkv(N=48, seed=P)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    out = ring_attention(q, k, v, world_size=P, causal=causal, layout=layout)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = sdpa_with_grads(q, k, v, dout, causal)
    for got, want in zip((out, *grads), ref):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_ring_custom_scale_and_bf16():
    q, k, v = make_qkv(N=32)
    out = ring_attention(q, k, v, world_size=4, causal=True, layout="zigzag", sm_scale=0.7)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7),
                               atol=ATOL, rtol=0)
    qb, kb, vb = (x.detach().bfloat16() for x in (q, k, v))
    out = ring_attention(qb, kb, vb, world_size=4, causal=True, layout="striped")
    assert out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(*(x.float() for x in (qb, kb, vb)), is_causal=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def test_ring_backward_goes_through_the_ring_not_autograd():
    q, k, v = make_qkv(N=32)
    trace = RingTrace()
    out = ring_attention(q, k, v, world_size=4, causal=True, trace=trace)
    assert type(out.grad_fn).__name__ == "_RingAttentionBackward"
    assert not [m for m in trace.messages if m.phase == "backward"]
    out.sum().backward()
    backward = [m for m in trace.messages if m.phase == "backward"]
    assert {m.what for m in backward} == {"kv+dkv", "dkv"}
    assert len(backward) == 4 * 4  # P hops of dK, dV per rank, the first P - 1 with K, V


# -- the ring: messages, memory, work --------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_message_log_is_a_ring_and_matches_comm_volume(P, layout):
    B, H, N, D = 2, 3, 32, 8
    q, k, v = make_qkv(B, H, N, D)
    trace = RingTrace()
    ring_attention(q, k, v, world_size=P, causal=True, layout=layout, trace=trace).sum().backward()
    fwd = [m for m in trace.messages if m.phase == "forward"]
    assert len(fwd) == P * (P - 1)
    assert all(m.receiver == (m.sender + 1) % P for m in trace.messages)
    assert sorted({m.step for m in fwd}) == list(range(P - 1))
    kw = dict(seq_len=N, world_size=P, heads=H, head_dim=D, batch=B)
    assert trace.bytes_sent(P, "forward") == [comm_volume("ring", **kw)] * P
    assert [f + b for f, b in zip(trace.bytes_sent(P, "forward"), trace.bytes_sent(P, "backward"))] \
        == [comm_volume("ring", backward=True, **kw)] * P
    # the design doc's rule of thumb: 2 N H D (P - 1) / P elements forward
    assert comm_volume("ring", **kw) == 2 * B * N * H * D * (P - 1) // P * 4
    # at step t rank r holds the K/V of rank r - t
    assert trace.holds["forward"] == [[(r - t) % P for r in range(P)] for t in range(P)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_work_per_device_equals_brute_force_mask_count(P, causal, layout):
    N = 64
    q, k, v = make_qkv(1, 1, N, 4, grad=False)
    trace = RingTrace()
    ring_attention(q, k, v, world_size=P, causal=causal, layout=layout, trace=trace)
    work = [sum(col) for col in zip(*trace.work["forward"])]
    assert work == owned_visible_pairs(N, P, layout, causal)


@pytest.mark.parametrize("P", [2, 4, 8])
def test_load_balance_facts(P):
    """Contiguous causal: busiest rank does (2P-1)/P of the ideal (as chunks grow); zigzag: 1."""
    N = 64 * P
    q, k, v = make_qkv(1, 1, N, 4, grad=False)
    ratio = {}
    for layout in LAYOUTS:
        trace = RingTrace()
        ring_attention(q, k, v, world_size=P, causal=True, layout=layout, trace=trace)
        work = [sum(col) for col in zip(*trace.work["forward"])]
        ratio[layout] = max(work) / (sum(work) / P)
    c = N // P
    assert ratio["zigzag"] == 1.0
    assert abs(ratio["contiguous"] - (2 * P - 1) / P) < 1 / c  # diagonal blocks hold c(c+1)/2
    assert 1.0 < ratio["striped"] < ratio["contiguous"]


def test_peak_memory_per_device_shrinks_with_P():
    B, H, N, D = 1, 2, 256, 8
    q, k, v = make_qkv(B, H, N, D, grad=False)
    peak = {}
    for P in (1, 2, 4, 8):
        trace = RingTrace()
        ring_attention(q, k, v, world_size=P, trace=trace)
        assert len(set(trace.peak_bytes["forward"])) == 1  # every device alike
        peak[P] = trace.peak_bytes["forward"][0]
    full_scores = B * H * N * N * 4
    qkv = 3 * B * H * N * D * 4
    assert full_scores + qkv <= peak[1] < 2 * (full_scores + qkv)  # P = 1 is full attention
    for P in (2, 4, 8):
        # each device holds N/P of Q, K, V (plus visiting blocks) and an (N/P)^2 score block
        assert peak[P] < peak[1] / P
        assert peak[P] >= full_scores / P ** 2 + qkv / P


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_forward_peak_holds_three_kv_blocks_with_flash_blocks(P, layout):
    """With the flash block (no score term, meta tensors: the Triton wrapper only reports shapes),
    a device's peak is exactly q + fp32 out + lse + its own K/V + the visiting K/V + the receive
    buffer: three K/V pairs from P = 3 on (steps 1 .. P-2), two at P = 2 (step 0 visits its own
    block, the last step receives nothing), one at P = 1 (flash attention on one device)."""
    B, H, N, D = 1, 2, 64, 8
    x = torch.empty(B, H, N, D, device="meta")
    trace = RingTrace()
    ring_attention(x, x, x, world_size=P, causal=True, layout=layout, backend="triton",
                   trace=trace)
    block, lse = B * H * (N // P) * D * 4, B * H * (N // P) * 4
    pairs = min(P, 3)
    assert trace.peak_bytes["forward"] == [2 * block + lse + 2 * pairs * block] * P


# -- Ulysses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_ulysses_matches_sdpa_and_comm_volume(P, causal):
    B, H, N, D = 2, 8, 32, 8
    q, k, v = make_qkv(B, H, N, D)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    trace = RingTrace()
    out = ulysses_attention(q, k, v, world_size=P, causal=causal, trace=trace)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for got, want in zip((out, *grads), sdpa_with_grads(q, k, v, dout, causal)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert len(trace.messages) == 4 * P * (P - 1)  # q, k, v, out: every rank to every other
    assert trace.bytes_sent(P) == [comm_volume("ulysses", seq_len=N, world_size=P, heads=H,
                                               head_dim=D, batch=B)] * P


def test_ulysses_volume_is_constant_when_n_and_p_grow_together():
    kw = dict(heads=32, head_dim=64)
    ring = [comm_volume("ring", seq_len=1024 * P, world_size=P, **kw) for P in (2, 4, 8, 16, 32)]
    uly = [comm_volume("ulysses", seq_len=1024 * P, world_size=P, **kw) for P in (2, 4, 8, 16, 32)]
    limit = 4 * 1024 * 32 * 64 * 4  # 4 N H D / P elements, fp32
    assert all(u <= limit for u in uly) and uly[-1] > 0.95 * limit and uly[0] >= limit / 2
    assert ring[-1] / ring[0] > 15  # ring's per-device volume grows with N
    assert comm_volume("allgather", seq_len=4096, world_size=4, **kw) == \
        comm_volume("ring", seq_len=4096, world_size=4, **kw)


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=5), "N = 48 must be a positive multiple of 5"),
    (dict(world_size=0), "world_size"),
    (dict(world_size=True), "world_size"),
    (dict(world_size=2.0), "world_size"),
    (dict(world_size=4, layout="zigzag", n=36), r"multiple of 8 \(2 \* world_size\)"),
    (dict(world_size=2, layout="spiral"), "layout"),
    (dict(world_size=2, backend="cuda"), "backend"),
])
def test_ring_bad_input(kwargs, match):
    q, k, v = make_qkv(N=kwargs.pop("n", 48), grad=False)
    with pytest.raises(ValueError, match=match):
        ring_attention(q, k, v, **kwargs)


def test_mismatched_shapes_and_dtypes():
    q, k, v = make_qkv(N=16, grad=False)
    with pytest.raises(ValueError, match="k.shape"):
        ring_attention(q, k[:, :, :8], v, world_size=2)
    with pytest.raises(ValueError, match="v.dtype"):
        ring_attention(q, k, v.double(), world_size=2)
    with pytest.raises(ValueError, match="q must be a 4-D"):
        ring_attention(q[0], k, v, world_size=2)
    with pytest.raises(ValueError, match="q.dtype"):
        ring_attention(q.long(), k.long(), v.long(), world_size=2)
    with pytest.raises(ValueError, match="heads H = 2 must be divisible by world_size = 4"):
        ulysses_attention(q, k, v, world_size=4)
    with pytest.raises(ValueError, match="world_size"):
        ulysses_attention(q, k, v, world_size=0)
    with pytest.raises(ValueError, match="scheme"):
        comm_volume("tree", seq_len=8, world_size=2, heads=2, head_dim=4)
    with pytest.raises(ValueError, match="heads = 3 must be divisible"):
        comm_volume("ulysses", seq_len=8, world_size=2, heads=3, head_dim=4)
    with pytest.raises(ValueError, match="seq_len"):
        comm_volume("ring", seq_len=9, world_size=2, heads=2, head_dim=4)


# one case per rule of the check_* functions: (call, the argument its error must name)
_q, _k, _v = (torch.randn(1, 2, 8, 4) for _ in range(3))
_lse = torch.zeros(1, 2, 8)
_seg = [ring.Segment(0, 8)]
BAD_CALLS = {
    "blockwise block_size < 1": (lambda: blockwise_attention(_q, _k, _v, block_size=-1), "block_size"),
    "blockwise block_size float": (lambda: blockwise_attention(_q, _k, _v, block_size=2.0), "block_size"),
    "block k head_dim": (lambda: block_attention(_q, _k[..., :3], _v, sm_scale=0.5), "k.shape"),
    "block k batch": (lambda: block_attention(_q, _k[:, :1], _v[:, :1], sm_scale=0.5), "k.shape"),
    "block v rows": (lambda: block_attention(_q, _k, _v[:, :, :4], sm_scale=0.5), "v.shape"),
    "block q 1-D": (lambda: block_attention(_q[0, 0, 0], _k, _v, sm_scale=0.5), "q must be"),
    "block sm_scale NaN": (lambda: block_attention(_q, _k, _v, sm_scale=float("nan")), "sm_scale"),
    "block causal_offset float": (lambda: block_attention(_q, _k, _v, sm_scale=0.5, causal_offset=0.5),
                                  "causal_offset"),
    "backward dout shape": (lambda: ring.block_attention_backward(_q, _k, _v, _q[:, :, :4], _lse, _lse,
                                                                  sm_scale=0.5), "dout"),
    "backward lse shape": (lambda: ring.block_attention_backward(_q, _k, _v, _q, _lse[..., :4], _lse,
                                                                 sm_scale=0.5), "lse"),
    "backward delta shape": (lambda: ring.block_attention_backward(_q, _k, _v, _q, _lse, _lse[0],
                                                                   sm_scale=0.5), "delta"),
    "merge out_b shape": (lambda: ring.merge_partials(_q, _lse, _q[..., :4, :], _lse), "out_b"),
    "merge lse_a shape": (lambda: ring.merge_partials(_q, _lse[..., :4], _q, _lse), "lse_a"),
    "merge lse_b not a tensor": (lambda: ring.merge_partials(_q, _lse, _q, 0.0), "lse_b"),
    "shard seq_len not divisible": (lambda: ring.shard_segments(10, 3, "contiguous"), "seq_len = 10"),
    "shard zigzag not divisible": (lambda: ring.shard_segments(12, 4, "zigzag"), r"2 \* world_size"),
    "shard seq_len 0": (lambda: ring.shard_segments(0, 2, "striped"), "seq_len"),
    "shard world_size 0": (lambda: ring.shard_segments(10, 0, "contiguous"), "world_size"),
    "segment stride 0": (lambda: ring.Segment(0, 4, 0), "stride"),
    "segment length < 1": (lambda: ring.Segment(0, -1), "length"),
    "segment start < 0": (lambda: ring.Segment(-2, 4), "start"),
    "positions_of empty": (lambda: ring.positions_of([]), "segments"),
    "pair_offset strides": (lambda: ring.pair_offset(ring.Segment(0, 4, 1), ring.Segment(1, 4, 2)), "stride"),
    "visible_pairs tq < 0": (lambda: ring.visible_pairs(0, -1, 4), "tq"),
    "visible_pairs offset None": (lambda: ring.visible_pairs(None, 4, 4), "offset"),
    "visible_tiles k_segs": (lambda: list(ring.visible_tiles(_seg, "abc", True)), "k_segs"),
    "attend_shard rows": (lambda: ring.attend_shard(_q, _k, _v, [ring.Segment(0, 4)], _seg, causal=True,
                                                    sm_scale=0.5), "q must be"),
    "attend_shard v rows": (lambda: ring.attend_shard(_q, _k, _v[:, :, :4], _seg, _seg, causal=True,
                                                      sm_scale=0.5), "v must be"),
    "ring sm_scale NaN": (lambda: ring_attention(_q, _k, _v, world_size=2, sm_scale=float("nan")), "sm_scale"),
    "ulysses sm_scale str": (lambda: ulysses_attention(_q, _k, _v, world_size=2, sm_scale="1"), "sm_scale"),
    "bytes_sent world_size": (lambda: _traced().bytes_sent(2), "world_size"),
    "bytes_sent phase": (lambda: _traced().bytes_sent(4, phase="fwd"), "phase"),
    "comm_volume dtype": (lambda: comm_volume("ring", seq_len=8, world_size=2, heads=2, head_dim=4,
                                              dtype="float32"), "dtype"),
    "ring_forward segs": (lambda: ring.ring_forward([(_q, _k, _v)] * 2, [_seg], causal=False, sm_scale=0.5,
                                                    backend="torch", trace=RingTrace()), "segs"),
    "ring_backward douts": (lambda: ring.ring_backward([(_q, _k, _v)], [_q], [_lse], [], [_seg], causal=False,
                                                       sm_scale=0.5, trace=RingTrace()), "douts"),
}


def _traced():
    trace = RingTrace()
    ring_attention(_q, _k, _v, world_size=4, trace=trace)
    return trace


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_check_functions_name_the_argument(case):
    call, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match):
        call()
