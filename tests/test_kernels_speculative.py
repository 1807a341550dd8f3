"""refimpl.kernels.speculative: the Triton verification kernel equals the torch reference.

Oracles: ``verify_reference`` (plain torch: cumprod for the first rejection, searchsorted for
the inverse CDF), and the law of the emitted token against p (Monte Carlo) for the sampling
wrapper. Ragged vocabulary sizes (not multiples of the block) and the edge cases: every draft
accepted (bonus token from p), p = q (empty residual), one-hot q, disjoint supports. On
``kernel_device``: the interpreter on CPU, the compiled kernel on a GPU.
"""
import pytest
import torch

from refimpl.kernels.common import MAX_BLOCK
from refimpl.kernels.speculative import speculative_accept_triton, verify, verify_reference


def case(B, g, V, seed, kind="random", device="cpu"):
    return [t.to(device) for t in _case(B, g, V, seed, kind)]


def _case(B, g, V, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    p = (3 * torch.randn(B, g + 1, V, generator=gen)).softmax(-1)
    q = (3 * torch.randn(B, g, V, generator=gen)).softmax(-1)
    if kind == "p_equals_q":
        q = p[:, :g].clone()
    elif kind == "one_hot_q":
        q = torch.nn.functional.one_hot(torch.randint(0, V, (B, g), generator=gen), V).float()
    elif kind == "disjoint":
        half = V // 2
        p[..., :half] = 0
        q[..., half:] = 0
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=gen).view(B, g)
    u = torch.rand(B, g, generator=gen)
    v = torch.rand(B, generator=gen)
    if kind == "all_accepted":
        u = torch.zeros(B, g)
    return draft, q, p, u, v


def on_a_cdf_boundary(q, p, n, v, token, rtol=1e-5):
    """Whether the inverse-CDF threshold v * mass lies within float rounding of the boundary after
    ``token``: the one place where two summation orders may rightly pick neighbouring tokens."""
    w = p[n].double() - (q[n].double() if n < len(q) else 0)
    w = w.clamp_min(0) if w.clamp_min(0).sum() > 0 else p[n].double()
    return abs(float(w.cumsum(0)[token]) - v * float(w.sum())) <= rtol * float(w.sum())


def test_the_boundary_allowance_is_narrow():
    p, q = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]), torch.tensor([[0.5, 0.2, 0.3]])
    # rejected at 0: residual [0, 0.4, 0], mass 0.4; with the bonus row (n = 1) the residual is p itself
    assert on_a_cdf_boundary(q, p, 1, 0.2, 0) and on_a_cdf_boundary(q, p, 1, 0.4 + 1e-7, 1)
    assert not on_a_cdf_boundary(q, p, 1, 0.25, 0) and not on_a_cdf_boundary(q, p, 0, 0.5, 1)


@pytest.mark.parametrize("V", [17, 65, 200, 333])
@pytest.mark.parametrize("g", [1, 3, 5])
@pytest.mark.parametrize("kind", ["random", "p_equals_q", "one_hot_q", "disjoint", "all_accepted"])
def test_kernel_equals_reference(V, g, kind, kernel_device):
    draft, q, p, u, v = case(6, g, V, seed=V * 10 + g, kind=kind, device=kernel_device)
    n_ref, next_ref = verify_reference(draft, q, p, u, v)
    n, nxt = verify(draft, q, p, u, v, block_v=64)
    assert torch.equal(n, n_ref)
    for r in (nxt != next_ref).nonzero().flatten().tolist():  # fp32 block sums vs torch's cumsum
        assert on_a_cdf_boundary(q[r], p[r], int(n[r]), float(v[r]), int(min(nxt[r], next_ref[r])))
    if kind == "all_accepted":
        assert (n == g).all()
    if kind == "p_equals_q":
        assert (n == g).all()  # p(x) = q(x): u q < p for every u < 1


def test_reference_samples_from_the_residual():
    # brute force for one row: with v swept over a grid, the frequencies of the inverse CDF are the residual
    p = torch.tensor([[[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]])
    q = torch.tensor([[[0.5, 0.2, 0.3]]])
    draft, u = torch.tensor([[0]]), torch.tensor([[0.99]])  # 0.99 * 0.5 >= 0.1: rejected
    grid = (torch.arange(10_000) + 0.5) / 10_000
    nxt = torch.stack([verify_reference(draft, q, p, u, vv[None])[1] for vv in grid[::50]])
    freq = torch.bincount(nxt.flatten(), minlength=3).float() / len(nxt)
    assert torch.allclose(freq, torch.tensor([0.0, 1.0, 0.0]), atol=0.01)  # max(0, p - q) = [0, 0.4, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_distributions(dtype, kernel_device):
    """fp16/bf16 q and p are read in fp32: the kernel equals the reference on the same values."""
    draft, q, p, u, v = case(6, 3, 200, seed=7, device=kernel_device)
    q, p = q.to(dtype), p.to(dtype)
    n_ref, next_ref = verify_reference(draft, q, p, u, v)
    n, nxt = verify(draft, q, p, u, v)
    assert torch.equal(n, n_ref) and torch.equal(nxt, next_ref)


@pytest.mark.parametrize("block_v", [16, MAX_BLOCK])
def test_block_sizes_at_both_ends(block_v, kernel_device):
    draft, q, p, u, v = case(4, 2, 3000, seed=block_v, device=kernel_device)
    n_ref, next_ref = verify_reference(draft, q, p, u, v)
    n, nxt = verify(draft, q, p, u, v, block_v=block_v)
    assert torch.equal(n, n_ref) and torch.equal(nxt, next_ref)


def test_triton_accept_has_law_p(kernel_device):
    V, N = 5, 800  # every row is one interpreted program: keep N small, V smaller
    gen = torch.Generator().manual_seed(0)
    p1 = (2 * torch.randn(V, generator=gen)).softmax(0)
    q1 = (2 * torch.randn(V, generator=gen)).softmax(0)
    draft = torch.multinomial(q1.expand(N, V), 1, replacement=True, generator=gen)
    p1, q1, draft = p1.to(kernel_device), q1.to(kernel_device), draft.to(kernel_device)
    gen = torch.Generator(device=kernel_device).manual_seed(1)  # the uniforms' generator
    n, nxt = speculative_accept_triton(draft, q1.expand(N, 1, V), p1.expand(N, 2, V), generator=gen)
    first = torch.where(n > 0, draft[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).float() / N
    assert ((freq - p1).abs() <= 5 * (p1 * (1 - p1) / N).sqrt() + 1e-6).all()


# one case per bound on the draft token ids (V = 40); a GPU would read out of bounds at each
BAD_DRAFTS = {"negative": -1, "V": 40, "past V": 1000}


@pytest.mark.parametrize("case_name", BAD_DRAFTS)
@pytest.mark.parametrize("fn", [verify, verify_reference])
def test_draft_tokens_outside_the_vocabulary_raise(case_name, fn, kernel_device):
    draft, q, p, u, v = case(2, 3, 40, seed=0, device=kernel_device)
    draft[1, 2] = BAD_DRAFTS[case_name]
    with pytest.raises(ValueError, match=r"draft_tokens must be token ids in \[0, V = 40\)"):
        fn(draft, q, p, u, v)


@pytest.mark.parametrize("block_v", [8, 48, 2 * MAX_BLOCK])
def test_block_v_outside_the_accepted_range_raises(block_v):
    draft, q, p, u, v = case(2, 3, 40, seed=0)
    with pytest.raises(ValueError, match=rf"block_v must be a power of two in \[16, {MAX_BLOCK}\]"):
        verify(draft, q, p, u, v, block_v=block_v)


def test_int32_offsets_are_checked():
    B, g, V = 2, 1, 2**30
    draft, u, v = torch.zeros(B, g, dtype=torch.long), torch.rand(B, g), torch.rand(B)
    q, p = torch.empty(B, g, V, device="meta"), torch.empty(B, g + 1, V, device="meta")
    with pytest.raises(ValueError, match="p spans 4294967296 elements; the kernel indexes in int32"):
        verify(draft, q, p, u, v)


def test_bad_input():
    draft, q, p, u, v = case(2, 3, 40, seed=0)
    with pytest.raises(ValueError, match="draft_tokens must be int32 or int64"):
        verify(draft.float(), q, p, u, v)
    with pytest.raises(ValueError, match="p.dtype"):
        verify(draft, q, p.double(), u, v)
    with pytest.raises(ValueError, match="u is on meta but p is on cpu"):
        verify(draft, q, p, u.to("meta"), v)
    with pytest.raises(ValueError, match="u must be"):
        verify(draft, q, p, u[:, :2], v)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify(draft, q[:1], p, u, v)
