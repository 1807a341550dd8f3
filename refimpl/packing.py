"""Prefix packing (Zhao et al. 2024, "Prepacking") and padding-free attention
(Zhai et al. 2022, "ByteTransformer"; "Boosting Distributed Training Performance
of the Unpadded BERT Model", 2022).

A padded batch spends compute on pad slots: n prompts of lengths l_i padded to
max(l) cost n * max(l) token slots (and n * max(l)^2 attention scores) for
sum(l) real tokens. Prepacking puts several prompts into one row with a bin
packing heuristic (first-fit / best-fit decreasing), restarts the position ids
at 0 for each prompt, and uses a block-diagonal causal mask so that no prompt
sees another. Padding-free attention goes further: all prompts form one token
stream and ``cu_seqlens`` (cumulative lengths, int32, starting at 0) tells the
attention where each sequence begins.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refimpl.lm import KVCache, additive_mask, check_ids, check_int

ALGORITHMS = ("ffd", "bfd")


# ---------------------------------------------------------------- bin packing

def _check_lengths(lengths, capacity):
    lengths = [check_int(f"lengths[{i}]", n, 1) for i, n in enumerate(lengths)]
    if not lengths:
        raise ValueError("lengths must not be empty")
    capacity = check_int("capacity", capacity, 1)
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"lengths[{i}] = {n} must be in [1, capacity={capacity}]")
    return lengths, capacity


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices): longest item first, into the first bin
    it fits (FFD <= 11/9 OPT + 6/9, Dósa 2007)."""
    lengths, capacity = _check_lengths(lengths, capacity)
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, f in enumerate(free) if f >= lengths[i]), None)
        if b is None:
            bins.append([]), free.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins: longest item first, into the fullest bin it still fits in."""
    lengths, capacity = _check_lengths(lengths, capacity)
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b, f in enumerate(free) if f >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: free[b])
        else:
            bins.append([]), free.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def lower_bound(lengths, capacity: int) -> int:
    """No packing can use fewer than ceil(sum(lengths) / capacity) bins."""
    lengths, capacity = _check_lengths(lengths, capacity)
    return math.ceil(sum(lengths) / capacity)


def check_max_items(lengths, max_items):
    """ValueError unless max_items is an int >= 0 and len(lengths) <= max_items."""
    check_int("max_items", max_items, 0)
    if len(lengths) > max_items:
        raise ValueError(f"exhaustive search is for at most max_items={max_items} "
                         f"items, got {len(lengths)}")


def optimal_bins(lengths, capacity: int, max_items: int = 10) -> int:
    """The fewest bins, by exhaustive search (every item into every open bin
    or a new one), pruned by the best count found so far."""
    lengths, capacity = _check_lengths(lengths, capacity)
    check_max_items(lengths, max_items)
    items = sorted(lengths, reverse=True)
    best = len(items)

    def place(k, free):
        nonlocal best
        if len(free) >= best:
            return
        if k == len(items):
            best = len(free)
            return
        tried = set()
        for b, f in enumerate(free):
            if f >= items[k] and f not in tried:  # equal free space: same bin
                tried.add(f)
                free[b] -= items[k]
                place(k + 1, free)
                free[b] += items[k]
        place(k + 1, free + [capacity - items[k]])

    place(0, [])
    return best


# ---------------------------------------------------------------- packing

@dataclass(frozen=True)
class Placement:
    row: int
    start: int
    length: int


@dataclass
class Packed:
    """Prompts packed into rows: tensors [R, L], ``attn_mask`` [R, 1, L, L]."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor   # restart at 0 for every prompt
    segment_ids: torch.Tensor    # the prompt (input order) in a slot; -1: pad
    attn_mask: torch.Tensor      # additive, block-diagonal causal
    cu_seqlens: torch.Tensor     # int32 (n + 1,): boundaries in the stream
    placements: list[Placement]  # per prompt, in input order
    capacity: int

    @property
    def efficiency(self) -> float:
        """Real tokens / computed slots."""
        return sum(p.length for p in self.placements) / self.input_ids.numel()


def _as_prompts(prompts, max_length=None, name="prompts", vocab_size=None):
    if isinstance(prompts, torch.Tensor) or not len(prompts):
        raise ValueError(f"{name} must be a non-empty list of token lists / 1-D integer tensors")
    out = []
    for i, p in enumerate(prompts):
        t = p if torch.is_tensor(p) else torch.as_tensor(p)
        if t.ndim != 1 or t.is_floating_point() or t.numel() < 1:
            raise ValueError(f"{name}[{i}] must be a non-empty 1-D sequence of token ids")
        if max_length is not None and t.numel() > max_length:
            raise ValueError(f"{name}[{i}] has {t.numel()} tokens, more than the model's "
                             f"context block_size={max_length}")
        check_ids(f"{name}[{i}]", t, vocab_size)
        out.append(t.long())
    return out


def check_segment_ids(segment_ids):
    """ValueError unless segment_ids is an integer tensor [..., L] with L >= 1."""
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.ndim < 1 or segment_ids.shape[-1] < 1 \
            or segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor [..., L] with L >= 1, got {segment_ids!r}")


def block_causal_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [..., L, L]: query i sees key j iff same prompt and j <= i
    (a pad slot sees itself, so that no softmax row is empty)."""
    check_segment_ids(segment_ids)
    L, device = segment_ids.shape[-1], segment_ids.device
    same = segment_ids[..., :, None] == segment_ids[..., None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    real = (segment_ids >= 0)[..., :, None]
    pad_self = torch.eye(L, dtype=torch.bool, device=device)
    return (same & causal & real) | pad_self


def check_pack_args(lengths, capacity, algorithm, pad_id):
    """ValueError unless 1 <= max(lengths) <= capacity (an int), algorithm is
    one of ALGORITHMS and pad_id an int >= 0; returns the capacity."""
    if capacity is None:
        capacity = max(lengths)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    if max(lengths) > capacity:
        raise ValueError(f"capacity={capacity} is shorter than the longest "
                         f"prompt ({max(lengths)} tokens)")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    check_int("pad_id", pad_id, 0)
    return capacity


def layout_rows(prompts, bins, pad_id=0):
    """Rows [R, L] of ids, position ids (from 0 per prompt) and segment ids
    (-1 on padding), and each prompt's Placement, in input order."""
    lengths = [len(p) for p in prompts]
    R, L = len(bins), max(sum(lengths[i] for i in b) for b in bins)
    device = prompts[0].device
    input_ids = torch.full((R, L), pad_id, dtype=torch.long, device=device)
    position_ids = torch.zeros(R, L, dtype=torch.long, device=device)
    segment_ids = torch.full((R, L), -1, dtype=torch.long, device=device)
    placements = [None] * len(prompts)
    for row, b in enumerate(bins):
        start = 0
        for i in b:
            n = lengths[i]
            input_ids[row, start:start + n] = prompts[i]
            position_ids[row, start:start + n] = torch.arange(n, device=device)
            segment_ids[row, start:start + n] = i
            placements[i] = Placement(row, start, n)
            start += n
    return input_ids, position_ids, segment_ids, placements


def cumulative_lengths(lengths, device=None) -> torch.Tensor:
    """cu_seqlens: int32 (n + 1,) = [0, l_0, l_0 + l_1, ..., sum(l)]."""
    cu = [0] + list(itertools.accumulate(lengths))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def pack_prompts(prompts, capacity=None, algorithm="ffd", pad_id=0) -> Packed:
    """Pack prompts into rows of at most ``capacity`` tokens (default: the
    longest prompt) with FFD or BFD, as Zhao et al. (2024) prepack them."""
    prompts = _as_prompts(prompts)
    lengths = [len(p) for p in prompts]
    capacity = check_pack_args(lengths, capacity, algorithm, pad_id)
    fit = first_fit_decreasing if algorithm == "ffd" else best_fit_decreasing
    bins = fit(lengths, capacity)
    ids, pos, seg, placements = layout_rows(prompts, bins, pad_id)
    cu_seqlens = cumulative_lengths(lengths, ids.device)
    attn_mask = additive_mask(block_causal_allowed(seg))[:, None]
    return Packed(ids, pos, seg, attn_mask, cu_seqlens, placements, capacity)


def check_unpack(packed, values):
    """ValueError unless packed is a Packed and values a tensor [R, L, ...]
    of its shape."""
    if not all(hasattr(packed, a) for a in ("input_ids", "placements")):  # a Packed
        raise ValueError(f"packed must be a Packed (from pack_prompts), got {type(packed).__name__}")
    if not isinstance(values, torch.Tensor) or values.shape[:2] != packed.input_ids.shape:
        raise ValueError(f"values must be a tensor starting with the packed shape "
                         f"{tuple(packed.input_ids.shape)}, got {getattr(values, 'shape', values)!r}")


def unpack(packed: Packed, values: torch.Tensor | None = None) -> list:
    """Per prompt (input order), its slots of ``values`` [R, L, ...]
    (default: the token ids)."""
    if values is None:
        values = getattr(packed, "input_ids", None)
    check_unpack(packed, values)
    return [values[p.row, p.start:p.start + p.length]
            for p in packed.placements]


# ---------------------------------------------------------------- prefill and decoding

def check_prefill_capacity(capacity, block_size):
    """ValueError if an int capacity exceeds the model's block_size (the
    other rules are check_pack_args')."""
    if capacity is not None and not isinstance(capacity, bool) \
            and isinstance(capacity, int) and capacity > block_size:
        raise ValueError(f"capacity must be in [1, block_size={block_size}], "
                         f"got {capacity}")


@torch.no_grad()
def packed_prefill(model, prompts, capacity=None, algorithm="ffd"):
    """One forward over the packed rows; returns (last_logits [n, V], one
    batch-1 cache per prompt, cut out of the packed cache)."""
    block, vocab = model.config.block_size, model.config.vocab_size
    prompts = _as_prompts(prompts, block, vocab_size=vocab)
    check_prefill_capacity(capacity, block)
    packed = pack_prompts(prompts, capacity, algorithm)
    cache = model.empty_cache(packed.input_ids.shape[0])
    logits = model(packed.input_ids, position_ids=packed.position_ids,
                   attn_mask=packed.attn_mask, cache=cache)
    where = packed.placements
    last = torch.stack([logits[p.row, p.start + p.length - 1] for p in where])
    return last, [cache.extract(p.row, p.start, p.length) for p in where]


def check_pad_cache(cache, length):
    """ValueError unless ``cache`` holds one row and ``length`` is an int >= len(cache)."""
    if getattr(cache, "batch_size", None) != 1:
        raise ValueError(f"cache must be a batch-1 KV cache, got batch_size "
                         f"{getattr(cache, 'batch_size', type(cache).__name__)}")
    check_int("length", length, len(cache))


def pad_cache(cache, length: int):
    """A copy of a batch-1 cache stretched to ``length`` positions with
    zeros (to be masked out)."""
    check_pad_cache(cache, length)
    if isinstance(cache, KVCache):
        out = cache.extract(0, 0, len(cache))  # past the length: zeros
        out.length = length
        return out
    from refimpl.hf import HFCache
    from transformers import DynamicCache
    pad = length - len(cache)
    data = [(F.pad(layer.keys, (0, 0, 0, pad)),
             F.pad(layer.values, (0, 0, 0, pad))) for layer in cache._layers()]
    return HFCache(1, DynamicCache(data))


def check_generate_packed(lengths, max_new_tokens, block_size):
    """ValueError unless max_new_tokens is an int >= 1 and the longest
    prompt plus max_new_tokens fits in block_size."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max(lengths) + max_new_tokens > block_size:
        raise ValueError(f"longest prompt ({max(lengths)}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds block_size={block_size}")


def decode_mask(lengths, P: int, t: int) -> torch.Tensor:
    """Additive mask [n, 1, 1, P + t + 1] of decoding step t: row b sees its
    prompt's slots 0 <= j < l_b and the generated slots P <= j <= P + t."""
    slots = torch.arange(P + t + 1, device=lengths.device)
    allowed = (slots[None] < lengths[:, None]) | (slots[None] >= P)
    return additive_mask(allowed)[:, None, None]


@torch.no_grad()
def generate_packed(model, prompts, max_new_tokens: int, capacity=None) -> list:
    """Greedy continuations: packed prefill, then all prompts decoded as one
    batch. The per-prompt caches are right-padded to the longest prompt P and
    stacked; at step t row b's new token sits at cache slot P + t with
    position id l_b + t and may see slots [0, l_b) and [P, P + t]."""
    block, vocab = model.config.block_size, model.config.vocab_size
    prompts = _as_prompts(prompts, block, vocab_size=vocab)
    lengths = torch.tensor([len(p) for p in prompts], device=prompts[0].device)
    check_generate_packed(lengths.tolist(), max_new_tokens, block)
    P = int(lengths.max())
    last, caches = packed_prefill(model, prompts, capacity)
    cache = type(caches[0]).stack([pad_cache(c, P) for c in caches])
    out = [last.argmax(dim=-1)]
    for t in range(max_new_tokens - 1):
        logits = model(out[-1][:, None], position_ids=(lengths + t)[:, None],
                       attn_mask=decode_mask(lengths, P, t), cache=cache)
        out.append(logits[:, -1].argmax(dim=-1))
    return torch.stack(out, dim=1).tolist()


# ---------------------------------------------------------------- padding-free

def _check_varlen(q, k, v, cu_seqlens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise ValueError(f"{name} must be a 3-D tensor [N, H, D] (all sequences concatenated)")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [N, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 \
            or len(cu_seqlens) < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of n + 1 >= 2 offsets")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or bool((cu_seqlens.diff() < 1).any()):
        raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at N={q.shape[0]}")


def length_groups(cu_seqlens, group_size: int = 4):
    """Sequences sorted by length, longest first, in groups of ``group_size``;
    per group the stream rows [g, n] of its sequences, right-padded to its
    longest n (a pad points at row 0), and which of them are real."""
    check_int("group_size", group_size, 1)
    cu = cu_seqlens.long()
    lengths, starts = cu.diff(), cu[:-1]
    order = torch.argsort(lengths, descending=True, stable=True)
    groups = []
    for chunk in order.split(group_size):
        steps = torch.arange(int(lengths[chunk].max()), device=cu.device)
        real = steps[None] < lengths[chunk][:, None]
        rows = torch.where(real, starts[chunk][:, None] + steps[None], 0)
        groups.append((rows, real))
    return groups


def varlen_attention(q, k, v, cu_seqlens, causal=True, group_size=4,
                     groups=None):
    """Attention over a concatenated stream q, k, v [N, H, D]; sequence i is
    rows cu[i]:cu[i+1]. One SDPA call per group of similar lengths: right
    padding is invisible to real queries under the top-left causal mask, and
    masked as keys otherwise. ``groups``: length_groups(cu_seqlens), if the
    caller has them already (they depend on cu_seqlens only)."""
    _check_varlen(q, k, v, cu_seqlens)
    out = torch.empty_like(q)
    for rows, real in groups or length_groups(cu_seqlens, group_size):
        qg, kg, vg = (t[rows].transpose(1, 2) for t in (q, k, v))  # g,H,n,D
        mask = None if causal else real[:, None, None, :]
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask,
                                            is_causal=causal)
        out[rows[real]] = og.transpose(1, 2)[real]
    return out


def stream_inputs(prompts):
    """The padding-free stream: ids [N], cu_seqlens int32 (n + 1,) and
    position ids [N] that restart at 0 at every cu_seqlens[i]."""
    ids = torch.cat(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=ids.device)
    cu = cumulative_lengths(lengths.tolist(), ids.device)
    first = torch.repeat_interleave(cu[:-1].long(), lengths)
    pos = torch.arange(len(ids), device=ids.device) - first
    return ids, cu, pos


def check_padding_free(model, attention):
    """ValueError unless model is a TinyGPT and attention a callable."""
    from refimpl.lm import TinyGPT
    if not isinstance(model, TinyGPT):
        raise ValueError(f"model must be a refimpl.lm.TinyGPT, got {type(model).__name__}")
    if not callable(attention):
        raise ValueError(f"attention must be a callable (q, k, v, cu_seqlens) -> out, "
                         f"got {attention!r}")


@torch.no_grad()
def padding_free_prefill(model, prompts, attention=varlen_attention,
                         group_size=4):
    """TinyGPT's forward over one token stream without any padding; returns
    last_logits [n, V]. Every op but attention is per token, so it runs on
    [N, C] (ByteTransformer, Zhai et al. 2022); attention is the varlen one,
    in length groups of ``group_size`` (1: one SDPA call per sequence)."""
    check_padding_free(model, attention)
    cfg = model.config
    prompts = _as_prompts(prompts, cfg.block_size, vocab_size=cfg.vocab_size)
    ids, cu, pos = stream_inputs(prompts)
    if attention is varlen_attention:  # its groups: once, not once per layer
        groups = length_groups(cu, group_size)
        attention = functools.partial(attention, groups=groups)
    N, C, H = len(ids), cfg.n_embd, cfg.n_head
    x = model.tok_emb(ids) + model.pos_emb(pos)
    for block in model.blocks:
        qkv = block.attn.qkv(block.ln1(x)).split(C, dim=-1)
        q, k, v = (t.reshape(N, H, C // H) for t in qkv)
        x = x + block.attn.proj(attention(q, k, v, cu).reshape(N, C))
        x = x + block.mlp(block.ln2(x))
    return model.lm_head(model.ln_f(x[cu[1:].long() - 1]))
