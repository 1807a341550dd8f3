"""refimpl.kernels.packing: the Triton varlen attention (run by the interpreter on CPU).

Oracles: per-sequence ``F.scaled_dot_product_attention`` (PyTorch core) and the
torch reference ``refimpl.packing.varlen_attention``, on ragged length sets
including length-1 sequences; and TinyGPT run on each prompt alone.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from refimpl import lm
from refimpl.kernels.packing import varlen_flash_attention
from refimpl.packing import padding_free_prefill, varlen_attention


def stream(lengths, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), H, D, generator=g) for _ in range(3))
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    return q, k, v, cu


def per_sequence_sdpa(q, k, v, lengths, causal):
    out, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [5, 1, 37, 2, 70], [100, 1, 17], [16, 32, 1, 33]])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_equals_per_sequence_sdpa_and_torch_reference(lengths, causal):
    q, k, v, cu = stream(lengths, D=12)  # D not a power of two
    out = varlen_flash_attention(q, k, v, cu, causal)
    torch.testing.assert_close(out, per_sequence_sdpa(q, k, v, lengths, causal), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, causal), atol=1e-5, rtol=0)


def test_kernel_on_strided_views():
    lengths = [9, 1, 20]
    q, k, v, cu = stream(lengths, H=3, D=16, seed=1)
    qkv = torch.cat([q, k, v], dim=-1)  # views with a row stride of 3 * D
    qs, ks, vs = qkv.split(16, dim=-1)
    torch.testing.assert_close(varlen_flash_attention(qs, ks, vs, cu),
                               per_sequence_sdpa(q, k, v, lengths, True), atol=1e-5, rtol=0)


def test_padding_free_prefill_with_the_kernel():
    torch.manual_seed(0)
    model = lm.TinyGPT(lm.GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=g) for n in [1, 13, 4, 40]]
    got = padding_free_prefill(model, prompts, attention=varlen_flash_attention)
    with torch.no_grad():
        want = torch.stack([model(p[None])[0, -1] for p in prompts])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bad_input():
    q, k, v, cu = stream([3, 4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_flash_attention(q, k, v, cu.long())
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_flash_attention(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype"):
        varlen_flash_attention(q.double(), k.double(), v.double(), cu)
    with pytest.raises(ValueError, match="q"):
        varlen_flash_attention(q[0], k, v, cu)
