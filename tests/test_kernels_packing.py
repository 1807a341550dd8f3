"""refimpl.kernels.packing: the Triton varlen attention, on ``kernel_device`` (the interpreter on
CPU, the compiled kernel on a GPU; tolerances per device in tests/tolerances.py).

Oracles: per-sequence ``F.scaled_dot_product_attention`` (PyTorch core) and the
torch reference ``refimpl.packing.varlen_attention``, on ragged length sets
including length-1 sequences; and TinyGPT run on each prompt alone.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from tolerances import attention_tol

from refimpl import lm
from refimpl.kernels.attention import MAX_HEAD_DIM
from refimpl.kernels.packing import varlen_flash_attention
from refimpl.packing import padding_free_prefill, varlen_attention


def stream(lengths, H=2, D=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), H, D, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)
    return q, k, v, cu


def per_sequence_sdpa(q, k, v, lengths, causal):
    out, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start:start + n].transpose(0, 1).float() for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [5, 1, 37, 2, 70], [100, 1, 17], [16, 32, 1, 33]])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_equals_per_sequence_sdpa_and_torch_reference(lengths, causal, kernel_device):
    tol = attention_tol(kernel_device, torch.float32)[0]
    q, k, v, cu = stream(lengths, D=12, device=kernel_device)  # D not a power of two
    out = varlen_flash_attention(q, k, v, cu, causal)
    torch.testing.assert_close(out, per_sequence_sdpa(q, k, v, lengths, causal), atol=tol, rtol=0)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, causal), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_head_dims_and_half_precision(D, dtype, kernel_device):
    lengths = [40, 1, 75]
    q, k, v, cu = stream(lengths, D=D, seed=D, device=kernel_device, dtype=dtype)
    out = varlen_flash_attention(q, k, v, cu)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), per_sequence_sdpa(q, k, v, lengths, True),
                               atol=attention_tol(kernel_device, dtype)[0], rtol=0)


def test_kernel_on_strided_views(kernel_device):
    lengths = [9, 1, 20]
    q, k, v, cu = stream(lengths, H=3, D=16, seed=1, device=kernel_device)
    qkv = torch.cat([q, k, v], dim=-1)  # views with a row stride of 3 * D
    qs, ks, vs = qkv.split(16, dim=-1)
    torch.testing.assert_close(varlen_flash_attention(qs, ks, vs, cu),
                               per_sequence_sdpa(q, k, v, lengths, True),
                               atol=attention_tol(kernel_device, torch.float32)[0], rtol=0)


def test_padding_free_prefill_with_the_kernel(kernel_device):
    torch.manual_seed(0)
    model = lm.TinyGPT(lm.GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32))
    model = model.eval().to(kernel_device)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=g).to(kernel_device) for n in [1, 13, 4, 40]]
    got = padding_free_prefill(model, prompts, attention=varlen_flash_attention)
    with torch.no_grad():
        want = torch.stack([model(p[None])[0, -1] for p in prompts])
    tol = attention_tol(kernel_device, torch.float32)[0]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# one case per rule of cu_seqlens (offsets into the stream of N = 7 rows: [0, 3, 7] is valid)
BAD_CU_SEQLENS = {
    "int64": torch.tensor([0, 3, 7]),
    "2-D": torch.tensor([[0, 3, 7]], dtype=torch.int32),
    "one offset": torch.tensor([0], dtype=torch.int32),
    "start 1": torch.tensor([1, 3, 7], dtype=torch.int32),
    "empty sequence": torch.tensor([0, 3, 3, 7], dtype=torch.int32),
    "decreasing": torch.tensor([0, 5, 3, 7], dtype=torch.int32),
    "end before N": torch.tensor([0, 3, 6], dtype=torch.int32),
    "end past N": torch.tensor([0, 3, 9], dtype=torch.int32),
}


@pytest.mark.parametrize("case", BAD_CU_SEQLENS)
def test_bad_cu_seqlens_raise_before_launch(case, kernel_device):
    q, k, v, _ = stream([3, 4], device=kernel_device)
    with pytest.raises(ValueError, match="cu_seqlens must"):
        varlen_flash_attention(q, k, v, BAD_CU_SEQLENS[case].to(kernel_device))


def test_launch_bounds_a_gpu_enforces():
    """On meta tensors (no memory): at most 65535 sequences (a grid dimension)."""
    q = torch.empty(70000, 2, 16, device="meta")
    cu = torch.arange(70001, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"the number of sequences = 70000 .* \[1, 65535\]"):
        varlen_flash_attention(q, q, q, cu)


def test_bad_input():
    q, k, v, cu = stream([3, 4])
    with pytest.raises(ValueError, match="dtype"):
        varlen_flash_attention(q.double(), k.double(), v.double(), cu)
    with pytest.raises(ValueError, match="q"):
        varlen_flash_attention(q[0], k, v, cu)
    wide = stream([3, 4], D=MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match=rf"head dim D must be in \[1, {MAX_HEAD_DIM}\]"):
        varlen_flash_attention(*wide)
