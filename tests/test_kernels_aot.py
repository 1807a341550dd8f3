"""Every Triton kernel compiles for sm_80, sm_86 and sm_90 at every launch configuration its
wrapper can choose, within the target's shared memory and without register spills; no GPU
needed (``refimpl.kernels.aot``: Triton's compiler and the ptxas of the triton wheel).

The compiles run in one subprocess with TRITON_INTERPRET removed: conftest sets it in this
process when CUDA is absent, and kernels decorated under the interpreter cannot be compiled.
Triton's cache (~/.triton/cache, or TRITON_CACHE_DIR) keeps the cubins: the first run compiles
about 200 kernels (a few minutes on two cores), later ones read them back in seconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refimpl.kernels import aot
from refimpl.kernels.attention import flash_attention
from refimpl.kernels.common import MAX_BLOCK
from refimpl.kernels.search import launch_config as search_config
from refimpl.kernels.search import prefix_launch_config

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ["attention", "varlen", "pointer", "search", "speculative", "prefix"]
COMPILED_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def records():
    proc = subprocess.run([sys.executable, "-m", "refimpl.kernels.aot", "--json"], cwd=ROOT,
                          env=COMPILED_ENV, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kernel_records(records, kernel):
    found = [r for r in records if r["kernel"] == kernel and not r["control"]]
    assert {r["cc"] for r in found} == set(aot.SHARED_LIMIT), f"{kernel}: a target is missing"
    return found


def test_representatives_cover_every_configuration_dtype_and_flag():
    every = list(dict.fromkeys(aot.launches()))
    chosen = aot.representatives(every)
    assert set(chosen) <= set(every) and len(chosen) < len(every)
    for kernel in KERNELS:
        mine = [x for x in every if x.kernel == kernel]
        picked = [x for x in chosen if x.kernel == kernel]
        for what in (lambda x: x.config, lambda x: x.dtype):
            assert {what(x) for x in picked} == {what(x) for x in mine}
        assert {f for x in picked for f in x.flags} == {f for x in mine for f in x.flags}


def test_search_default_blocks_are_among_the_compiled_ones():
    compiled = {dict(x.config)["BLOCK_V"] for x in aot.launches() if x.kernel == "search"}
    assert {search_config(V)["BLOCK_V"] for V in range(1, 3 * MAX_BLOCK, 7)} <= compiled


def test_prefix_default_configs_are_among_the_compiled_ones():
    """Every (dtype, configuration) the prefix-attention wrapper picks, for any M and D."""
    compiled = {(x.dtype, x.config) for x in aot.launches() if x.kernel == "prefix"}
    picked = {(dtype, tuple(sorted(prefix_launch_config(M, D, dtype).items())))
              for dtype in (torch.float32, torch.float16, torch.bfloat16)
              for M in range(1, 300, 5) for D in range(1, 129)}
    assert picked <= compiled


def test_the_subprocess_compiled_exactly_the_representatives(records):
    want = {(x.name(), cc) for x in aot.representatives(aot.launches()) for cc in aot.SHARED_LIMIT}
    assert {(r["launch"], r["cc"]) for r in records if not r["control"]} == want


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_to_a_cubin_for_every_target(records, kernel):
    for r in kernel_records(records, kernel):
        assert r["cubin_bytes"] > 1000 and r["ptx_entry"], r


@pytest.mark.parametrize("kernel", KERNELS)
def test_shared_memory_within_the_targets_limit(records, kernel):
    over = [r for r in kernel_records(records, kernel) if r["shared"] > aot.SHARED_LIMIT[r["cc"]]]
    assert not over, over


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_register_spills(records, kernel):
    spilling = [r for r in kernel_records(records, kernel) if r["spill_bytes"] > 0]
    assert not spilling, spilling


def test_configurations_beyond_the_caps_fail_the_checks(records):
    """The controls: what the wrappers chose before the caps would not fit or would spill."""
    controls = [r for r in records if r["control"]]
    assert len(controls) == len(aot.CONTROLS)
    old_fp32, wide_head, old_pointer = controls
    assert old_fp32["BLOCK_D"] == 128 and old_fp32["shared"] > aot.SHARED_LIMIT[80]
    assert wide_head["BLOCK_D"] == 256 and wide_head["shared"] > aot.SHARED_LIMIT[80]
    assert old_pointer["BLOCK_N"] == 1024 and old_pointer["spill_bytes"] > 1000


def test_the_wrapper_refuses_the_head_dim_of_the_control():
    q = torch.zeros(1, 1, 4, 256)
    with pytest.raises(ValueError, match=r"head dim D must be in \[1, 128\], got 256"):
        flash_attention(q, q, q)


COMPILED_CPU_CALLS = """
import torch
from refimpl.kernels import attention, packing, pointer, search, speculative
x = torch.rand(2, 2, 8, 16)
calls = {
    "q": lambda: attention.flash_attention(x, x, x),
    "q ": lambda: packing.varlen_flash_attention(x[0], x[0], x[0], torch.tensor([0, 2], dtype=torch.int32)),
    "keys": lambda: pointer.pointer_log_probs_triton(x[0], x[0, :, 0], torch.rand(16)),
    "logits": lambda: search.group_candidates(x[0], torch.zeros(2, 8)),
    "q  ": lambda: search.prefix_attention(x, x, x, torch.zeros(2, 8)),
    "p": lambda: speculative.verify(torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 1, 5),
                                    torch.rand(2, 2, 5), torch.rand(2, 1), torch.rand(2)),
}
for name, call in calls.items():
    try:
        call()
    except ValueError as e:
        assert str(e).startswith(name.strip() + " is on cpu: the Triton kernel needs CUDA tensors"), e
    else:
        raise AssertionError(name + ": a compiled kernel was launched on CPU tensors")
print("refused", len(calls))
"""


def test_compiled_kernels_refuse_cpu_tensors():
    proc = subprocess.run([sys.executable, "-c", COMPILED_CPU_CALLS], cwd=ROOT, env=COMPILED_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["refused", "6"], proc.stderr[-4000:]
