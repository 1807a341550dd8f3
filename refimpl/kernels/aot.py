"""Compile every Triton kernel ahead of time for real NVIDIA GPUs, on a machine without one.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` runs
Triton's compiler and the ``ptxas`` shipped in the triton wheel with no GPU present. What comes
back is the cubin a GPU would load, with the dynamic shared memory it needs
(``metadata.shared``): over the target's limit, the launch fails with OutOfResources on the
GPU, and nothing on a CPU would have noticed. ``cuobjdump --dump-resource-usage`` (also in the
wheel) reads the registers a thread uses and the stack that ptxas spills registers to.

Which configurations: each wrapper picks its block sizes and warps with a pure function of the
shapes (``launch_config`` in each kernel module) and refuses shapes beyond its caps with a
ValueError. ``launches`` calls those functions over every shape they tell apart, so what
compiles here is what the wrappers can launch; ``representatives`` keeps each launch
configuration once plus every dtype and flag value, not their full product (see there).

    python -m refimpl.kernels.aot [--json]      # TRITON_INTERPRET must be unset
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import triton
from tqdm.auto import tqdm
from triton.backends.compiler import GPUTarget

# Maximum shared memory per block (opt-in), CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability": 163 KiB on sm_80 (A100), 99 KiB on sm_86 (A10, A40, RTX 30xx; sm_89
# L4 and RTX 40xx have the same), 227 KiB on sm_90 (H100).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Launch:
    """One compile: a kernel, the dtype of its float tensors, its flags and launch configuration."""
    kernel: str
    dtype: torch.dtype
    flags: tuple    # ((name, bool), ...): what the call asks for (causal, a mask, a penalty)
    config: tuple   # ((name, int), ...): what the wrapper chooses (block sizes, num_warps)

    def name(self) -> str:
        return " ".join([self.kernel, TRITON_DTYPE[self.dtype]]
                        + [f"{k}={v}" for k, v in self.flags + self.config])


def _pow2(lo, hi):
    return [1 << i for i in range(lo.bit_length() - 1, hi.bit_length())]


def launches():
    """Every (dtype, flags, configuration) each wrapper can launch, over all the shapes that its
    launch-config function tells apart (next_power_of_2 changes only at powers of two)."""
    from refimpl.kernels import attention, common, pointer, search

    def items(d):
        return tuple(sorted(d.items()))

    dtypes = common.FLOAT_DTYPES
    for dtype, causal, D in itertools.product(dtypes, (True, False), range(1, attention.MAX_HEAD_DIM + 1)):
        config = items(attention.launch_config(D, dtype))
        for kernel in ("attention", "varlen"):  # the varlen kernel uses the same configuration
            yield Launch(kernel, dtype, (("CAUSAL", causal),), config)
    for dtype, masked, n in itertools.product(dtypes, (True, False), range(1, pointer.MAX_N + 1)):
        yield Launch("pointer", dtype, (("HAS_MASK", masked),), items(pointer.launch_config(n)))
    # M queries per (prompt, kv head): BLOCK_M changes only at powers of two, capped at 64
    for dtype, masked, M, D in itertools.product(dtypes, (True, False), _pow2(1, 128),
                                                 range(1, attention.MAX_HEAD_DIM + 1)):
        config = items(search.prefix_launch_config(M, D, dtype))
        yield Launch("prefix", dtype, (("HAS_MASK", masked),), config)
    # block_v: any power of two the wrappers accept (search's default for a vocabulary is one)
    for dtype, block in itertools.product(dtypes, _pow2(16, common.MAX_BLOCK)):
        for penalty in (True, False):
            yield Launch("search", dtype, (("HAS_PENALTY", penalty),), (("BLOCK_V", block),))
        yield Launch("speculative", dtype, (), (("BLOCK_V", block),))


def _size(launch):
    return math.prod(v for k, v in launch.config if k.startswith("BLOCK"))


def representatives(all_launches):
    """Each launch configuration once, with the widest dtype that chooses it and every flag on
    (the most shared memory, the most code); then each dtype and flag value not yet compiled,
    once, at the largest configuration that goes with it. fp16 and bf16, or a flag's off branch,
    change which code is generated, not the sizes that the limits are about."""
    by_kernel = {}
    for launch in dict.fromkeys(all_launches):
        by_kernel.setdefault(launch.kernel, []).append(launch)
    chosen = []
    for group in by_kernel.values():
        def widest(candidates):
            return max(candidates, key=lambda x: (x.dtype.itemsize, sum(v for _, v in x.flags), _size(x)))

        def largest(candidates):
            return max(candidates, key=lambda x: (_size(x), x.dtype.itemsize))

        picked = [widest([x for x in group if x.config == c]) for c in dict.fromkeys(x.config for x in group)]
        for dtype in dict.fromkeys(x.dtype for x in group):
            if all(x.dtype != dtype for x in picked):
                picked.append(largest([x for x in group if x.dtype == dtype]))
        for flag in dict.fromkeys(f for x in group for f in x.flags):
            if all(flag not in x.flags for x in picked):
                picked.append(largest([x for x in group if flag in x.flags]))
        chosen += picked
    return chosen


# Beyond the caps, compiled for sm_80 to show that the checks have teeth: fp32 attention at
# D = 128 with the 64 x 64 tiles the wrapper chose before they were capped, and at head dim 256,
# which the wrapper now refuses (both over the shared-memory limit); the pointer kernel with the
# 1024 x 16 tile and 4 warps it once chose for n = 1024 (spills registers).
CONTROLS = [
    Launch("attention", torch.float32, (("CAUSAL", True),),
           (("BLOCK_D", 128), ("BLOCK_M", 64), ("BLOCK_N", 64), ("num_warps", 8))),
    Launch("attention", torch.float32, (("CAUSAL", True),),
           (("BLOCK_D", 256), ("BLOCK_M", 64), ("BLOCK_N", 64), ("num_warps", 8))),
    Launch("pointer", torch.float32, (("HAS_MASK", True),),
           (("BLOCK_H", 16), ("BLOCK_N", 1024), ("num_warps", 4))),
]


def _kernel_spec(name, dtype, flags):
    """(JIT function, pointer types, fp32 scalars, unit strides, fixed constexprs) for a kernel.
    Unit strides are those of contiguous tensors, which the JIT compiles as the constant 1."""
    from refimpl.kernels import attention, packing, pointer, search, speculative
    t = "*" + TRITON_DTYPE[dtype]
    if name in ("attention", "varlen"):
        fn = attention._attn_fwd_kernel if name == "attention" else packing._varlen_fwd_kernel
        extra = {"Lse": "*fp32"} if name == "attention" else {"CuSeqlens": "*i32"}
        units = ("stride_qd", "stride_kd", "stride_vd", "stride_od")
        # IEEE (fp32, exact products) is the interpreter's; on a GPU the wrappers pass False
        return fn, {"Q": t, "K": t, "V": t, "Out": t, **extra}, ("sm_scale",), units, {"IEEE": False}
    if name == "pointer":  # without a mask the wrapper passes the fp32 output as a dummy pointer
        mask = "*u8" if dict(flags)["HAS_MASK"] else "*fp32"
        types = {"Keys": t, "Query": t, "V": t, "Mask": mask, "Out": "*fp32"}
        return pointer._pointer_kernel, types, (), ("skh", "sqh", "sv"), {}
    if name == "prefix":  # the key mask is fp32 (without one, lse is passed as a dummy)
        types = {"Q": t, "K": t, "V": t, "Mask": "*fp32", "Out": "*fp32", "Lse": "*fp32"}
        units = ("stride_qd", "stride_kd", "stride_vd", "stride_od")
        return search._prefix_attention_kernel, types, ("sm_scale",), units, {"IEEE": False}
    if name == "search":
        types = {"Logits": t, "Running": "*fp32", "Counts": "*fp32", "OutVal": "*fp32", "OutIdx": "*i64"}
        return search._group_candidates_kernel, types, ("penalty",), (), {}
    types = {"Tok": "*i32", "Q": t, "P": t, "U": "*fp32", "Vu": "*fp32", "N_out": "*i32", "Next_out": "*i32"}
    return speculative._verify_kernel, types, (), (), {}


def _signature(fn, pointers, floats, units, constexprs):
    """The signature, constants and alignment hints the JIT would make for 16-byte aligned,
    contiguous tensors."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs or arg in units:
            sig[arg] = "constexpr"
            consts.setdefault(arg, 1)
        elif arg in pointers:
            sig[arg] = pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[arg] = "fp32" if arg in floats else "i32"
    return sig, consts, attrs


def _resources(cubin: bytes) -> dict:
    """Registers and stack bytes (where ptxas spills registers) per thread, from the wheel's
    cuobjdump."""
    from triton.backends.nvidia.compiler import get_ptxas
    tool = os.path.join(os.path.dirname(get_ptxas(80).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(w.split(":", 1) for w in text.split("Function", 1)[1].split() if ":" in w)
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"]) + int(fields["LOCAL"])}


def compile_launch(launch: Launch, cc: int) -> dict:
    """Compile one launch for sm_<cc>; a record of what it needs and whether it fits."""
    fn, pointers, floats, units, fixed = _kernel_spec(launch.kernel, launch.dtype, launch.flags)
    config = dict(launch.config)
    options = {"num_warps": config.pop("num_warps", 4)}
    sig, consts, attrs = _signature(fn, pointers, floats, units, {**fixed, **dict(launch.flags), **config})
    start = time.perf_counter()
    compiled = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs),
                              target=GPUTarget("cuda", cc, 32), options=options)
    return {"launch": launch.name(), "kernel": launch.kernel, "function": fn.__name__, "cc": cc,
            "dtype": TRITON_DTYPE[launch.dtype], **dict(launch.flags), **config, **options,
            "shared": compiled.metadata.shared, "shared_limit": SHARED_LIMIT[cc],
            "fits": compiled.metadata.shared <= SHARED_LIMIT[cc],
            "cubin_bytes": len(compiled.asm["cubin"]),
            "ptx_entry": f".entry {fn.__name__}(" in compiled.asm["ptx"],
            **_resources(compiled.asm["cubin"]), "seconds": round(time.perf_counter() - start, 3)}


def compile_all():
    """Records for every representative launch on every target, then the controls (marked)."""
    jobs = [(x, cc, False) for x in representatives(launches()) for cc in SHARED_LIMIT]
    jobs += [(x, 80, True) for x in CONTROLS]
    return [{**compile_launch(x, cc), "control": control}
            for x, cc, control in tqdm(jobs, desc="compiling for sm_80/86/90")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the records as one JSON list")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    records = compile_all()
    if args.json:
        print(json.dumps(records))
        return 0
    for r in records:
        print(f"sm_{r['cc']} {r['launch']:60} shared {r['shared']:6}/{r['shared_limit']}  regs "
              f"{r['registers']:3}  spills {r['spill_bytes']}" + ("  (control)" if r["control"] else ""))
    bad = [r for r in records if not r["control"] and not r["fits"]]
    spills = [r for r in records if not r["control"] and r["spill_bytes"]]
    print(f"{len(records)} compiles: {len(bad)} over the shared-memory limit, {len(spills)} spill registers")
    return 1 if bad or spills else 0


if __name__ == "__main__":
    sys.exit(main())
