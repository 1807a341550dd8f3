"""refimpl.kernels.speculative: the Triton verification kernel equals the torch reference.

Oracles: ``verify_reference`` (plain torch: cumprod for the first rejection, searchsorted for
the inverse CDF), and the law of the emitted token against p (Monte Carlo) for the sampling
wrapper. Ragged vocabulary sizes (not multiples of the block) and the edge cases: every draft
accepted (bonus token from p), p = q (empty residual), one-hot q, disjoint supports.
"""
import pytest
import torch

from refimpl.kernels.speculative import speculative_accept_triton, verify, verify_reference


def case(B, g, V, seed, kind="random"):
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


@pytest.mark.parametrize("V", [17, 65, 200, 333])
@pytest.mark.parametrize("g", [1, 3, 5])
@pytest.mark.parametrize("kind", ["random", "p_equals_q", "one_hot_q", "disjoint", "all_accepted"])
def test_kernel_equals_reference(V, g, kind):
    draft, q, p, u, v = case(6, g, V, seed=V * 10 + g, kind=kind)
    n_ref, next_ref = verify_reference(draft, q, p, u, v)
    n, nxt = verify(draft, q, p, u, v, block_v=64)
    assert torch.equal(n, n_ref)
    assert torch.equal(nxt, next_ref)
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


def test_triton_accept_has_law_p():
    V, N = 5, 800  # every row is one interpreted program: keep N small, V smaller
    gen = torch.Generator().manual_seed(0)
    p1 = (2 * torch.randn(V, generator=gen)).softmax(0)
    q1 = (2 * torch.randn(V, generator=gen)).softmax(0)
    draft = torch.multinomial(q1.expand(N, V), 1, replacement=True, generator=gen)
    n, nxt = speculative_accept_triton(draft, q1.expand(N, 1, V), p1.expand(N, 2, V), generator=gen)
    first = torch.where(n > 0, draft[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).float() / N
    assert ((freq - p1).abs() <= 5 * (p1 * (1 - p1) / N).sqrt() + 1e-6).all()


def test_bad_input():
    draft, q, p, u, v = case(2, 3, 40, seed=0)
    with pytest.raises(ValueError, match="block_v"):
        verify(draft, q, p, u, v, block_v=48)
    with pytest.raises(ValueError, match="u must be"):
        verify(draft, q, p, u[:, :2], v)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify(draft, q[:1], p, u, v)
