"""Speculative decoding: a cheap drafter guesses, the target verifies many tokens in one call.

Implements Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative
Decoding" (2022, Algorithm 1 and Theorem 3.5), which Chen et al., "Accelerating Large Language
Model Decoding with Speculative Sampling" (2023, Algorithm 2) found independently. Drafters:
a small draft model (with the confidence fallback of Kim et al., "Speculative Decoding with Big
Little Decoder", BiLD 2023), prompt lookup / input-guided drafting (Ge et al., "Lossless
Acceleration for Seq2seq Generation with Aggressive Decoding", 2022), an n-gram table built from
the corpus and an adaptive draft length (in the spirit of Liu et al., "Adaptive Draft-Verification
for Efficient LLM Decoding", ADED 2024).

Each round: the drafter proposes ``g`` tokens with distributions ``q``; one target forward over
the last token and the ``g`` drafts gives ``p`` at ``g + 1`` positions; ``speculative_accept``
keeps a prefix of the drafts and adds one token, so every target call yields 1 to g + 1 tokens and
the output law is exactly the target's. Both KV caches roll back with ``crop``.

Batches: rows accept different numbers of tokens. We keep every row right-aligned at one shared
length ``L`` (row b owns slots pad[b] .. L-1 of the token buffer and of every KV cache), so after
each round the rows that accepted fewer tokens are shifted right (``realign``); a 4-D additive
mask hides the pads and ``position_ids`` count from each row's first real token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from refimpl.lm import (KVCache, TinyGPT, additive_mask, causal_mask, check_forward_args, check_ids,
                        check_int, check_real, shape_or_type)


# ---------------------------------------------------------------- argument checks

def check_int_tensor(name, t, ndim):
    """ValueError unless ``t`` is an integer tensor with ``ndim`` dims."""
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.is_floating_point() or t.is_complex() \
            or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor with {ndim} dims, got {shape_or_type(t)}")


def check_distributions(p, q):
    """ValueError unless p and q are float tensors [..., V] of one shape."""
    for name, t in (("p", p), ("q", q)):
        if not isinstance(t, torch.Tensor) or t.ndim < 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [..., V], got {shape_or_type(t)}")
    if p.shape != q.shape:
        raise ValueError(f"p.shape {shape_or_type(p)} must equal q.shape {shape_or_type(q)}")


def check_accept_args(draft_tokens, q, p):
    """ValueError unless draft_tokens [B, g] are ids in [0, V) and q is [B, g, V], p [B, g+1, V]."""
    check_int_tensor("draft_tokens", draft_tokens, 2)
    B, g = draft_tokens.shape
    for name, t in (("q", q), ("p", p)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [B, g{'+1' if name == 'p' else ''}, V], "
                             f"got {shape_or_type(t)}")
    if q.shape[:2] != (B, g) or p.shape[:2] != (B, g + 1) or q.shape[2] != p.shape[2]:
        raise ValueError(f"q must be [B, g, V] and p [B, g+1, V] for draft_tokens [B, g] = [{B}, {g}], "
                         f"got q {tuple(q.shape)} and p {tuple(p.shape)}")
    check_ids("draft_tokens", draft_tokens, p.shape[2])


def check_greedy_args(draft_tokens, logits):
    """ValueError unless draft_tokens [B, g] are ids in [0, V) and logits is [B, g+1, V]."""
    check_int_tensor("draft_tokens", draft_tokens, 2)
    B, g = draft_tokens.shape
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != (B, g + 1):
        raise ValueError(f"logits must be [B, g+1, V] = [{B}, {g + 1}, V] for draft_tokens [B, g], "
                         f"got {shape_or_type(logits)}")
    check_ids("draft_tokens", draft_tokens, logits.shape[2])


def check_batch_inputs(pad, past, T):
    """ValueError unless past >= 0, T >= 1 and pad is None or a 1-D integer tensor in [0, past]."""
    check_int("past", past, 0)
    check_int("T", T, 1)
    if pad is not None:
        check_int_tensor("pad", pad, 1)
        check_ids("pad", pad, past + 1, bound="past + 1", what="offsets")


def check_realign_args(t, dim, batch_dim, rows, shift, length):
    """ValueError unless dim and batch_dim are two dims of t, rows and shift 1-D integer tensors of one
    length and length >= 0 (rows' range is left to ``index_select``: checking it costs a sync)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"t must be a tensor, got {type(t).__name__}")
    check_int("dim", dim, -t.ndim, t.ndim - 1)
    check_int("batch_dim", batch_dim, -t.ndim, t.ndim - 1)
    if dim % t.ndim == batch_dim % t.ndim:
        raise ValueError(f"dim and batch_dim must differ, got {dim} and {batch_dim} for a {t.ndim}-D t")
    check_int_tensor("rows", rows, 1)
    check_int_tensor("shift", shift, 1)
    if shift.shape != rows.shape:
        raise ValueError(f"shift.shape {shape_or_type(shift)} must equal rows.shape {shape_or_type(rows)}")
    check_int("length", length, 0)


def check_rollback_args(cache, end, rows, shift):
    """ValueError unless batch 1 gets an int end >= 0 (no rows, shift) and a batch gets end [B] and
    rows, shift of one length with rows in [0, B)."""
    if (rows is None) != (shift is None):
        raise ValueError("rows and shift must be given together (batch > 1) or both be None (batch 1)")
    if rows is None:
        check_int("end", end, 0)
        return
    check_int_tensor("end", end, 1)
    if len(end) != cache.batch_size:
        raise ValueError(f"end must have one entry per cache row ({cache.batch_size}), got {len(end)}")
    check_int_tensor("rows", rows, 1)
    if shift.shape != rows.shape:
        raise ValueError(f"shift.shape {shape_or_type(shift)} must equal rows.shape {shape_or_type(rows)}")
    check_ids("rows", rows, cache.batch_size, bound="batch_size", what="cache rows")


def check_lookup_args(context, g, max_ngram, min_ngram):
    """ValueError unless context is a 1-D integer tensor, g >= 0 and 1 <= min_ngram <= max_ngram."""
    check_int_tensor("context", context, 1)
    check_int("g", g, 0)
    check_ngram_range(max_ngram, min_ngram)


def check_ngram_range(max_ngram, min_ngram):
    """ValueError unless min_ngram and max_ngram are ints with 1 <= min_ngram <= max_ngram."""
    if isinstance(min_ngram, bool) or isinstance(max_ngram, bool) or not isinstance(min_ngram, int) \
            or not isinstance(max_ngram, int) or not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram!r}, "
                         f"max_ngram={max_ngram!r}")


def check_adaptive_args(drafter, start, min_gamma, max_gamma, grow, shrink):
    """ValueError unless drafter is a Drafter, 1 <= min_gamma <= start <= max_gamma and grow, shrink >= 0."""
    if not all(callable(getattr(drafter, m, None)) for m in ("begin", "propose", "rollback")):
        raise ValueError(f"drafter must be a Drafter (begin, propose, rollback), got {type(drafter).__name__}")
    for name, value in (("start", start), ("min_gamma", min_gamma), ("max_gamma", max_gamma)):
        check_int(name, value, 1)
    if not min_gamma <= start <= max_gamma:
        raise ValueError(f"need 1 <= min_gamma <= start <= max_gamma, got {min_gamma}, {start}, {max_gamma}")
    check_int("grow", grow, 0)
    check_int("shrink", shrink, 0)


# ---------------------------------------------------------------- theory

def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """E[tokens per target call] = (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al., eq. 1).

    Summed as the geometric series 1 + alpha + ... + alpha^gamma, which needs no special case at
    alpha = 1 and loses no digits near it. ``alpha`` outside [0, 1] raises: a rate measured as a
    float sum should come from ``acceptance_rate``, which clamps its rounding.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_int("gamma", gamma, 0)
    return float(sum(alpha ** i for i in range(gamma + 1)))


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Wall-clock gain (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)) (Leviathan et al., Thm 3.8).

    ``c`` is the cost of one drafter call relative to one target call.
    """
    check_real("c", c, 0)
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + 1)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """alpha = E_q[min(1, p/q)] = sum_x min(p(x), q(x)) = 1 - TV(p, q) (Leviathan et al., Def. 3.1).

    A probability by definition, but a float sum: for p == q it can land an ulp above 1, by an
    amount that depends on the CPU's summation order. So the result is clamped to [0, 1].
    """
    check_distributions(p, q)
    return torch.minimum(p, q).sum(-1).clamp(0, 1)


# ---------------------------------------------------------------- one verification step

def speculative_accept(draft_tokens: torch.Tensor, q: torch.Tensor,
                       p: torch.Tensor,
                       generator: torch.Generator | None = None):
    """Modified rejection sampling (Leviathan et al., Algorithm 1; Chen et al., Algorithm 2).

    draft_tokens [B, g] were sampled from q [B, g, V]; p [B, g+1, V] is the target at the same
    positions plus one. Draft i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection the next token comes from norm(max(0, p_i - q_i)); if all g are kept, a bonus token
    comes from p_g. Returns (num_accepted [B], next_token [B]).
    """
    check_accept_args(draft_tokens, q, p)
    B, g = draft_tokens.shape
    px = p[:, :g].gather(2, draft_tokens[..., None]).squeeze(2)
    qx = q.gather(2, draft_tokens[..., None]).squeeze(2)
    u = torch.rand(B, g, generator=generator, dtype=p.dtype, device=p.device)
    accepted = u * qx < px  # u < p/q without dividing by q
    num_accepted = accepted.cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, num_accepted]
    # q = 0 after the last draft: there the residual is p itself
    q_n = F.pad(q, (0, 0, 0, 1))[rows, num_accepted]
    residual = (p_n - q_n).clamp_min(0)
    # p = q makes the residual empty, but then the rejection had probability
    # 0; fall back to p.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_n, residual)
    next_token = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return num_accepted, next_token


def greedy_accept(draft_tokens: torch.Tensor, logits: torch.Tensor):
    """Greedy verification: keep drafts while they equal the target's argmax, then add its argmax.

    The temperature -> 0 limit of ``speculative_accept`` (p and q become one-hot).
    """
    check_greedy_args(draft_tokens, logits)
    target_tokens = logits.argmax(dim=-1)  # [B, g+1]
    g = draft_tokens.shape[1]
    agree = draft_tokens == target_tokens[:, :g]
    num_accepted = agree.cumprod(dim=1).sum(dim=1)
    nxt = target_tokens.gather(1, num_accepted[:, None]).squeeze(1)
    return num_accepted, nxt


# ---------------------------------------------------------------- batched layout

def batch_inputs(pad: torch.Tensor | None, past: int, T: int,
                 dtype=torch.float32):
    """position_ids [B, T] and additive mask [B, 1, T, past+T] for right-aligned rows.

    Row b's real tokens start at slot pad[b]; query t sits at slot past + t. ``pad=None``
    (batch 1, nothing to hide) returns (None, None): the model's default causal path.
    """
    check_batch_inputs(pad, past, T)
    if pad is None:
        return None, None
    slots = torch.arange(past + T, device=pad.device)
    query = past + torch.arange(T, device=pad.device)
    allowed = ((slots[None, None, :] >= pad[:, None, None])
               & (slots[None, None, :] <= query[None, :, None]))
    return query[None, :] - pad[:, None], additive_mask(allowed[:, None], dtype)


def realign(t: torch.Tensor, dim: int, batch_dim: int, rows: torch.Tensor,
            shift: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``rows`` of ``t``, row b moved right by shift[b] slots along ``dim``; ``length`` slots.

    new[b, j] = old[rows[b], j - shift[b]] (shift may be negative); slots read from before 0
    become pads (garbage, later masked).
    """
    check_realign_args(t, dim, batch_dim, rows, shift, length)
    t = t.index_select(batch_dim, rows)
    src = torch.arange(length, device=t.device)[None, :] - shift[:, None]
    src = src.clamp(0, t.shape[dim] - 1)
    view = [1] * t.ndim
    view[batch_dim], view[dim] = len(rows), length
    size = list(t.shape)
    size[dim] = length
    return t.gather(dim, src.reshape(view).expand(size))


def rollback_cache(cache, end, rows=None, shift=None) -> int:
    """Roll a KV cache back after verification; returns its new length.

    Batch 1: keep the first ``end`` slots (``crop``). Batch > 1: row b keeps its slots before
    min(end[b], len(cache)), moved right by shift[b] (rows not in ``rows`` drop out); the
    common length is the shortest row's, so a row may lose a slot that it then recomputes.
    """
    check_rollback_args(cache, end, rows, shift)
    if rows is None:
        cache.crop(min(int(end), len(cache)))
        return len(cache)
    length = int((end.clamp(max=len(cache))[rows] + shift).min())
    if isinstance(cache, KVCache):
        if cache.k is not None:
            for name in ("k", "v"):
                old = getattr(cache, name)
                shape = old.shape[:1] + (len(rows),) + old.shape[2:]
                new = old.new_zeros(shape)
                new[:, :, :, :length] = realign(old, 3, 1, rows, shift, length)
                setattr(cache, name, new)
        cache.shape = (cache.shape[0], len(rows)) + cache.shape[2:]
        cache.length = length
    else:  # refimpl.hf.HFCache: a DynamicLayer per layer, keys [B, H, S, D]
        for layer in cache._layers():
            layer.keys = realign(layer.keys, 2, 0, rows, shift, length)
            layer.values = realign(layer.values, 2, 0, rows, shift, length)
        cache._batch_size = len(rows)
    return length


def model_dtype(model) -> torch.dtype:
    """The floating dtype of a model's weights: an additive mask must match it (torch's CPU SDPA
    silently mis-adds a float32 mask to float64 scores beyond 16 keys)."""
    floating = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floating, torch.float32)


def _distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


# ---------------------------------------------------------------- cheaper model calls

def lean_block(block, x, attn_mask, cache, layer):
    """``lm.Block.forward`` on x [T, C] of one row, as plain tensor ops on the block's weights
    (eval mode: no dropout); the same numbers without a dozen ``nn.Module`` calls."""
    T, C = x.shape
    attn, mlp = block.attn, block.mlp
    h = F.layer_norm(x, (C,), block.ln1.weight, block.ln1.bias, block.ln1.eps)
    q, k, v = (t.view(1, T, attn.n_head, C // attn.n_head).transpose(1, 2)
               for t in F.linear(h, attn.qkv.weight, attn.qkv.bias).split(C, dim=1))
    y = cache.attend(layer, q, k, v, attn_mask, "sdpa")
    x = x + F.linear(y.transpose(1, 2).reshape(T, C), attn.proj.weight, attn.proj.bias)
    h = F.layer_norm(x, (C,), block.ln2.weight, block.ln2.bias, block.ln2.eps)
    h = F.gelu(F.linear(h, mlp[0].weight, mlp[0].bias))
    return x + F.linear(h, mlp[2].weight, mlp[2].bias)


class LeanDecoder:
    """A ``TinyGPT`` whose calls at batch 1 skip ``nn.Module`` dispatch.

    A draft step of a 0.4M-parameter model on a CPU is mostly fixed cost per call: a dozen
    module calls per layer, each some microseconds, around products hardly longer (chapter 5). With
    one row, a ``KVCache``, positions that follow the cache and the ``sdpa`` backend in eval
    mode, a call runs ``lean_block`` per layer, bit for bit the model's numbers; any other call
    goes to the model's own forward.
    """

    def __init__(self, model):
        if not isinstance(model, TinyGPT):
            raise ValueError(f"model must be a refimpl.lm.TinyGPT, got {type(model).__name__}")
        self.model, self.config = model, model.config

    def empty_cache(self, batch_size: int) -> KVCache:
        return self.model.empty_cache(batch_size)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, input_ids, position_ids=None, attn_mask=None, cache=None,
                 last_only=False):
        m = self.model
        if position_ids is not None or type(cache) is not KVCache or m.training \
                or m.attn_backend != "sdpa" or len(input_ids) != 1:
            return m(input_ids, position_ids, attn_mask, cache, last_only)
        _, T, past = check_forward_args(input_ids, None, attn_mask, cache, m.config.block_size)
        check_ids("input_ids", input_ids, m.config.vocab_size)
        x = m.tok_emb.weight[input_ids[0]] + m.pos_emb.weight[past:past + T]
        for layer, block in enumerate(m.blocks):
            x = lean_block(block, x, attn_mask, cache, layer)
        cache.advance(T)
        x = x[-1:] if last_only else x
        return F.linear(F.layer_norm(x, x.shape[1:], m.ln_f.weight, m.ln_f.bias, m.ln_f.eps),
                        m.lm_head.weight)[None]


# ---------------------------------------------------------------- drafters

class Drafter:
    """What ``speculative_generate`` asks of a drafter.

    ``begin(seq, length)`` sees the prompt (token buffer ``seq`` [B, capacity], ``length`` slots
    filled). ``propose(seq, length, pad, g, greedy, temperature, generator)`` returns up to ``g``
    draft tokens [B, g'] and the distributions q [B, g', V] they were sampled from, or ``None`` for
    a deterministic drafter (q is then one-hot). ``rollback(end, rows, shift, num_accepted, drafted)``
    hears the verdict: row b's tokens before slot end[b] stand, then the buffer was realigned
    with ``rows``/``shift`` (both ``None`` at batch 1, see ``rollback_cache``).
    """
    vocab_size: int | None = None
    block_size: int | None = None

    def begin(self, seq, length):
        pass

    def propose(self, seq, length, pad, g, greedy, temperature, generator):
        raise NotImplementedError

    def rollback(self, end, rows, shift, num_accepted, drafted):
        pass


def check_draft_model(model, stop_below):
    """ValueError unless model is a callable language model with a config (vocab_size, block_size)
    and stop_below is None or in [0, 1]."""
    config = getattr(model, "config", None)
    if not callable(model) or not hasattr(config, "vocab_size") or not hasattr(config, "block_size"):
        raise ValueError(f"model must be a language model with config.vocab_size and config.block_size "
                         f"(a Drafter or e.g. refimpl.lm.TinyGPT), got {type(model).__name__}")
    if stop_below is not None:
        check_real("stop_below", stop_below, 0, 1)


class DraftModel(Drafter):
    """A small language model drafts autoregressively with its own KV cache.

    ``stop_below``: the fallback policy of BiLD (Kim et al., 2023, sec. 3.2): stop drafting once
    the draft's top probability for the next position falls below the threshold in every row.
    The decision depends only on the draft's distribution, not on the target, so the output law
    stays exact.
    """

    def __init__(self, model, stop_below: float | None = None):
        check_draft_model(model, stop_below)
        self.model, self.stop_below = model, stop_below
        self.vocab_size = model.config.vocab_size
        self.block_size = model.config.block_size
        self.cache, self.dtype = None, model_dtype(model)

    def begin(self, seq, length):
        self.cache = self.model.empty_cache(seq.shape[0])

    def propose(self, seq, length, pad, g, greedy, temperature, generator):
        # what the draft has not seen: 1 or 2 tokens, or the prompt
        step = seq[:, len(self.cache):length]
        tokens, qs = [], []
        for i in range(g):
            position_ids, mask = batch_inputs(pad, len(self.cache),
                                              step.shape[1], self.dtype)
            logits = self.model(step, position_ids, mask, self.cache,
                                last_only=True)[:, -1]
            q = None if greedy and self.stop_below is None else \
                _distribution(logits, 1.0 if greedy else temperature)
            if i and self.stop_below is not None \
                    and bool((q.amax(-1) < self.stop_below).all()):
                break
            step = logits.argmax(-1, keepdim=True) if greedy else \
                torch.multinomial(q, 1, generator=generator)
            tokens.append(step)
            qs.append(q)
        qs = None if greedy else torch.stack(qs, dim=1)
        return torch.cat(tokens, dim=1), qs

    def rollback(self, end, rows, shift, num_accepted, drafted):
        rollback_cache(self.cache, end, rows, shift)


def lookup_continuation(context: torch.Tensor, g: int, max_ngram: int,
                        min_ngram: int) -> torch.Tensor:
    """Up to ``g`` tokens that followed the latest earlier occurrence of the context's longest
    suffix n-gram (max_ngram >= n >= min_ngram); empty if none occurs (Ge et al., 2022, sec. 3)."""
    check_lookup_args(context, g, max_ngram, min_ngram)
    N = len(context)
    for n in range(min(max_ngram, N - 1), min_ngram - 1, -1):
        windows = context[:N - 1].unfold(0, n, 1)  # ending before the last
        hits = (windows == context[N - n:]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return context[start:start + g]
    return context[:0]


class PromptLookup(Drafter):
    """Input-guided drafting: copy what followed the latest match of the text's last n-gram.

    Aggressive Decoding (Ge et al., 2022) drafts from the input for editing tasks whose output
    mostly repeats it; prompt lookup applies the same idea to any context. No model, no q: the
    draft is deterministic (q one-hot). Rows without a match draft nothing (batch 1) or pad
    their draft with token 0 (batch > 1), which is still exact, only wasted.
    """

    def __init__(self, max_ngram: int = 8, min_ngram: int = 1):
        check_ngram_range(max_ngram, min_ngram)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seq, length, pad, g, greedy, temperature, generator):
        if pad is None:
            found = lookup_continuation(seq[0, :length], g, self.max_ngram,
                                        self.min_ngram)
            return found[None], None
        found = [lookup_continuation(seq[b, int(pad[b]):length], g,
                                     self.max_ngram, self.min_ngram)
                 for b in range(seq.shape[0])]
        width = max(len(f) for f in found)
        out = seq.new_zeros(seq.shape[0], width)
        for b, f in enumerate(found):
            out[b, :len(f)] = f
        return out, None


def check_ngram_args(ids, vocab_size, order, smoothing):
    """ValueError unless ids [N >= order] are ids in [0, vocab_size), order >= 2 with
    vocab_size ** order <= 2**25 and smoothing a finite real >= 0."""
    check_int("vocab_size", vocab_size, 1)
    if isinstance(order, bool) or not isinstance(order, int) or order < 2 or vocab_size ** order > 2 ** 25:
        raise ValueError(f"order must be >= 2 with vocab_size ** order <= 2**25, got order={order!r}, "
                         f"vocab_size={vocab_size}")
    check_int_tensor("ids", ids, 1)
    if len(ids) < order:
        raise ValueError(f"ids must be a 1-D tensor of at least {order} tokens in [0, {vocab_size})")
    check_ids("ids", ids, vocab_size)
    check_real("smoothing", smoothing, 0, math.inf)


def check_table(probs, vocab_size, order):
    """ValueError unless probs is a float tensor [vocab_size ** (order - 1), vocab_size]."""
    check_int("vocab_size", vocab_size, 1)
    check_int("order", order, 2)
    want = (vocab_size ** (order - 1), vocab_size)
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or tuple(probs.shape) != want:
        raise ValueError(f"probs must be a float tensor of shape {want}, got {shape_or_type(probs)}")


def ngram_probs(ids: torch.Tensor, vocab_size: int, order: int = 3,
                smoothing: float = 0.01) -> torch.Tensor:
    """Next-token probabilities [V^(order-1), V] after each (order-1)-token
    context of ``ids`` [N], counted with ``smoothing`` added to every count;
    unseen contexts back off to the shorter context's row."""
    check_ngram_args(ids, vocab_size, order, smoothing)
    ids, V = ids.long(), vocab_size
    probs = torch.full((1, V), 1.0 / V, device=ids.device)
    for k in range(1, order):  # context length k; back off to k - 1 if unseen
        index = sum(ids[i:len(ids) - k + i] * V ** (k - i) for i in range(k))
        index = index + ids[k:]
        counts = torch.bincount(index, minlength=V ** (k + 1))
        counts = counts.view(-1, V).float()
        seen = counts.sum(-1, keepdim=True)
        # row c -> row c mod V^(k-1): drop the oldest token
        backoff = probs.repeat(V, 1)
        smoothed = (counts + smoothing * backoff) / (seen + smoothing)
        probs = torch.where(seen > 0, smoothed, backoff)
    return probs


class NGramTable(Drafter):
    """An n-gram table from a corpus drafts: after the last order-1 tokens, the likeliest next one.

    In the spirit of ADED (Liu et al., 2024), which drafts from a tri-gram table instead of a
    draft model. Greedy: the argmax chain (q one-hot). Sampling: tokens drawn from the table's
    conditional distribution, which is then q. Unseen contexts back off to shorter ones.
    """

    def __init__(self, probs: torch.Tensor, vocab_size: int, order: int):
        check_table(probs, vocab_size, order)
        self.probs, self.vocab_size, self.order = probs, vocab_size, order
        self.best = probs.argmax(dim=-1)
        # context -> row: the tokens as digits base V
        powers = torch.arange(order - 2, -1, -1, device=probs.device)
        self.weights = vocab_size ** powers

    @classmethod
    def from_tokens(cls, ids: torch.Tensor, vocab_size: int, order: int = 3,
                    smoothing: float = 0.01):
        """The table of ``ngram_probs`` over ``ids`` [N]."""
        return cls(ngram_probs(ids, vocab_size, order, smoothing), vocab_size,
                   order)

    def propose(self, seq, length, pad, g, greedy, temperature, generator):
        check_int("length", length, self.order - 1, seq.shape[1])
        context = seq[:, length - self.order + 1:length]
        tokens, qs = [], []
        for _ in range(g):
            row = (context * self.weights).sum(dim=1)
            if greedy:
                nxt = self.best[row][:, None]
            else:
                q = self.probs[row]
                nxt = torch.multinomial(q, 1, generator=generator)
                qs.append(q)
            tokens.append(nxt)
            context = torch.cat([context[:, 1:], nxt], dim=1)
        qs = torch.stack(qs, dim=1) if qs else None
        return torch.cat(tokens, dim=1), qs


class AdaptiveGamma(Drafter):
    """Wraps a drafter and adapts the draft length: +grow after a round where every draft was
    accepted, -shrink otherwise (the schedule of HF's "heuristic" assistant; ADED and BiLD adapt
    the draft length too). ``speculative_generate``'s ``gamma`` stays the ceiling."""

    def __init__(self, drafter: Drafter, start: int = 4, min_gamma: int = 1,
                 max_gamma: int = 16, grow: int = 2, shrink: int = 1):
        check_adaptive_args(drafter, start, min_gamma, max_gamma, grow, shrink)
        self.drafter, self.gamma = drafter, start
        self.min_gamma, self.max_gamma = min_gamma, max_gamma
        self.grow, self.shrink = grow, shrink
        self.vocab_size = drafter.vocab_size
        self.block_size = drafter.block_size
        self.history = []

    def begin(self, seq, length):
        self.drafter.begin(seq, length)

    def propose(self, seq, length, pad, g, greedy, temperature, generator):
        self.history.append(self.gamma)
        return self.drafter.propose(seq, length, pad, min(g, self.gamma),
                                    greedy, temperature, generator)

    def rollback(self, end, rows, shift, num_accepted, drafted):
        self.drafter.rollback(end, rows, shift, num_accepted, drafted)
        all_accepted = bool((num_accepted == drafted).all()) \
            if torch.is_tensor(num_accepted) else num_accepted == drafted
        step = self.grow if all_accepted else -self.shrink
        self.gamma = max(self.min_gamma, min(self.max_gamma, self.gamma + step))


# ---------------------------------------------------------------- generation

@dataclass
class SpecStats:
    """Per target call: draft tokens proposed, accepted (summed over rows) and rows verified."""
    drafted: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    rows: list = field(default_factory=list)

    @property
    def target_calls(self) -> int:
        return len(self.rows)

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / max(1, sum(self.drafted))

    @property
    def tokens_per_call(self) -> float:
        """Mean tokens a row gains per target call: accepted drafts + the target's own token."""
        return (sum(self.accepted) + sum(self.rows)) / max(1, sum(self.rows))


def _check_generate_args(model, input_ids, max_new_tokens, temperature, greedy):
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 1 \
            or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor [B, T] with T >= 1")
    check_ids("input_ids", input_ids, model.config.vocab_size)
    check_int("max_new_tokens", max_new_tokens, 1)
    if not greedy and not check_real("temperature", temperature) > 0:
        raise ValueError(f"temperature must be > 0 when greedy=False, got {temperature}")
    if input_ids.shape[1] + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's block_size={model.config.block_size}")


def _next_token(logits, greedy, temperature, generator):
    if greedy:
        return logits.argmax(dim=-1)
    probs = _distribution(logits, temperature)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def autoregressive_generate(model, input_ids, *, max_new_tokens,
                            temperature=1.0, greedy=False, generator=None):
    """The baseline: one target call per token, with a KV cache. Returns [B, T + max_new_tokens]."""
    _check_generate_args(model, input_ids, max_new_tokens, temperature, greedy)
    B, T = input_ids.shape
    seq = input_ids.new_empty(B, T + max_new_tokens)
    seq[:, :T] = input_ids
    cache = model.empty_cache(B)
    step = input_ids
    for i in range(T, T + max_new_tokens):
        logits = model(step, cache=cache)[:, -1]
        seq[:, i] = _next_token(logits, greedy, temperature, generator)
        step = seq[:, i:i + 1]
    return seq


def check_generate_setup(target, drafter, input_ids, max_new_tokens, gamma,
                         temperature, greedy):
    """ValueError unless the prompt, lengths, gamma and the drafter fit the target."""
    _check_generate_args(target, input_ids, max_new_tokens, temperature, greedy)
    check_int("gamma", gamma, 1)
    V = target.config.vocab_size
    if drafter.vocab_size is not None and drafter.vocab_size != V:
        raise ValueError(f"drafter's vocab_size ({drafter.vocab_size}) must "
                         f"equal the target's ({V})")
    total = input_ids.shape[1] + max_new_tokens
    if drafter.block_size is not None and total > drafter.block_size:
        raise ValueError(f"prompt + max_new_tokens ({total}) exceeds the "
                         f"drafter's block_size ({drafter.block_size})")


def start_decoding(target, drafter, input_ids, max_new_tokens, gamma):
    """The token buffer (room for one round past the end), the target's KV
    cache filled with every prompt token but the last, the pads (None at
    batch 1) and each row's original index."""
    B, T = input_ids.shape
    seq = input_ids.new_zeros(B, T + max_new_tokens + gamma + 1)
    seq[:, :T] = input_ids
    cache = target.empty_cache(B)
    if T > 1:
        target(seq[:, :T - 1], cache=cache)
    drafter.begin(seq, T)
    # row b's first real slot (None at batch 1: no padding)
    pad = torch.zeros(B, dtype=torch.long, device=seq.device) if B > 1 else None
    return seq, cache, pad, torch.arange(B, device=seq.device)


def verify_drafts(target, seq, L, pad, draft, q, cache, greedy, temperature,
                  generator):
    """One target forward over the last token and the g drafts, then the
    acceptance rule; returns (num_accepted [B], next_token [B])."""
    g, dtype = draft.shape[1], model_dtype(target)
    if pad is None:  # one causal mask for the whole forward, not one per layer
        position_ids = None
        mask = None if not g else \
            causal_mask(g + 1, L + g, seq.device, dtype)[None, None]
    else:
        position_ids, mask = batch_inputs(pad, L - 1, g + 1, dtype)
    logits = target(torch.cat([seq[:, L - 1:L], draft], dim=1), position_ids,
                    mask, cache)
    seq[:, L:L + g] = draft  # into the buffer: the kept prefix stays there
    if greedy:
        return greedy_accept(draft, logits)
    p = _distribution(logits, temperature)
    q = F.one_hot(draft, p.shape[-1]) if q is None else q
    q = q.to(p.dtype)
    return speculative_accept(draft, q, p, generator)


def accept_one(seq, L, n, nxt, cache, drafter, g, stats):
    """Batch 1: keep n drafts and the new token, crop both KV caches to the
    accepted prefix; returns the new length."""
    n = int(n)
    seq[0, L + n] = nxt[0]
    stats.drafted.append(g)
    stats.accepted.append(n)
    stats.rows.append(1)
    rollback_cache(cache, L + n)
    drafter.rollback(L + n, None, None, n, g)
    return L + n + 1


def finish_rows(seq, L, pad, origin, n, nxt, out, total, g, stats):
    """Batch > 1: write each row's new token, copy finished rows to ``out``;
    returns the indices of the rows still decoding."""
    rows = seq.shape[0]
    seq[torch.arange(rows, device=seq.device), L + n] = nxt
    stats.drafted.append(g * rows)
    stats.accepted.append(int(n.sum()))
    stats.rows.append(rows)
    done = L + n + 1 - pad >= total
    for b in done.nonzero().flatten().tolist():
        out[origin[b]] = seq[b, pad[b]:pad[b] + total]
    return (~done).nonzero().flatten()


def realign_rows(seq, L, pad, origin, n, active, cache, drafter, g):
    """Batch > 1: shift the rows that accepted fewer tokens right so all end
    at one length, trim all-pad columns, roll both caches back the same way;
    returns (seq, L, pad, origin) of the active rows."""
    m = int(n[active].max())
    shift = m - n[active]
    trim = int((pad[active] + shift).min())  # slots that are pads in every row
    shift -= trim
    end = L + n
    L = L + m + 1 - trim
    seq = torch.cat([realign(seq, 1, 0, active, shift, L),
                     seq.new_zeros(len(active), seq.shape[1] - L)], dim=1)
    rollback_cache(cache, end, active, shift)
    drafter.rollback(end, active, shift, n, g)
    return seq, L, pad[active] + shift, origin[active]


@torch.no_grad()
def speculative_generate(target, drafter, input_ids, *, max_new_tokens, gamma=4,
                         temperature=1.0, greedy=False, generator=None):
    """Speculative decoding (Leviathan et al., Algorithm 1), batched; returns (sequences, stats).

    ``drafter``: a ``Drafter`` or a model (wrapped in ``DraftModel``). Each round drafts up to
    ``gamma`` tokens, verifies them with one target forward over g + 1 positions, and rolls both
    KV caches back to the accepted prefix. ``greedy=True`` returns exactly the target's greedy
    output; otherwise the output law is the target's at ``temperature``.
    """
    drafter = drafter if isinstance(drafter, Drafter) else DraftModel(drafter)
    check_generate_setup(target, drafter, input_ids, max_new_tokens, gamma,
                         temperature, greedy)
    L, total = input_ids.shape[1], input_ids.shape[1] + max_new_tokens
    seq, cache, pad, origin = start_decoding(target, drafter, input_ids,
                                             max_new_tokens, gamma)
    out, stats = input_ids.new_empty(input_ids.shape[0], total), SpecStats()
    while True:
        # as many drafts as the slowest row still needs, within the block
        wanted = total - L + (0 if pad is None else int(pad.max()))
        g = min(gamma, wanted - 1, target.config.block_size - L)
        draft, q = (drafter.propose(seq, L, pad, g, greedy, temperature,
                                    generator) if g > 0 else (seq[:, :0], None))
        n, nxt = verify_drafts(target, seq, L, pad, draft, q, cache, greedy,
                               temperature, generator)
        g = draft.shape[1]
        if pad is None:  # batch 1: no realignment, plain crop
            L = accept_one(seq, L, n, nxt, cache, drafter, g, stats)
            if L >= total:
                out[:] = seq[:, :total]
                return out, stats
            continue
        active = finish_rows(seq, L, pad, origin, n, nxt, out, total, g, stats)
        if not len(active):
            return out, stats
        seq, L, pad, origin = realign_rows(seq, L, pad, origin, n, active,
                                           cache, drafter, g)
