"""Greedy search, beam search and diverse beam search on a KV-cached decoder.

Papers: Vijayakumar et al. 2016, "Diverse Beam Search: Decoding Diverse Solutions
from Neural Sequence Models" (Algorithm 1, Hamming diversity, eq. 4); beam search as
implemented by Hugging Face transformers 4.56.2 (``GenerationMixin._beam_search`` and
``_group_beam_search`` with ``BeamSearchScorer``), whose outputs this module reproduces
token for token.

Beam search keeps, per prompt, the ``num_beams`` best partial sequences ranked by
their summed log-probability. Each step scores every (beam, token) continuation,

    s(y_1..t) = s(y_1..t-1) + log p(y_t | y_<t)                          (running score)

keeps the top 2B candidates (so B of them survive even if up to B end in EOS), sets
aside those that end in EOS *and* rank in the top B as finished hypotheses scored

    score = s(y_1..t) / t ** length_penalty                               (t counts EOS)

and continues the best B that did not finish. Diverse beam search splits the B beams
into G groups of B/G; at each step group g is advanced after groups 0..g-1 and
subtracts ``diversity_penalty * (number of beams of earlier groups that picked token v
at this step)`` from log p(v) (Hamming diversity, Vijayakumar et al. eq. 4). The penalty
enters the running score, so it is part of ``sequences_scores``.

transformers 4.56.2 runs *two* implementations, and they differ in corner cases that we
reproduce (``Rules`` below): plain beam search (G = 1) is vectorised; group beam search
(G > 1) uses the older ``BeamSearchScorer``. They differ in (a) which score the stopping
heuristic compares with, (b) which beams are kept as hypotheses when ``max_new_tokens``
runs out, and (c) the filler after a finished hypothesis (``pad_token_id or eos`` vs
``pad_token_id``, so a pad id of 0 becomes EOS in plain beam search).

Decoding never recomputes a prefix: the prompt is encoded once per prompt (not once per
beam), and every step feeds one token per beam and reorders the cache rows to follow the
surviving beams (``cache.reorder``). By default the beams share one copy of their prompt's
keys and values (``SharedPrefixCache``; cascade attention as in Hydragen, Juravsky et al.
2024): each layer attends to the prompt with all beams' queries in one matmul and to each
beam's own generated suffix, and merges the two by their log-sum-exps (chapter 3's
``merge_partials``), so a reorder touches only the suffixes, and copies only those of beams
with several children (``branch_rows``: copy on branch, as vLLM's beam search, Kwon et al.
2023, sec. 4.4). ``shared_prefix=False`` copies the prompt into every beam's row instead, as
HF does.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from refimpl.lm import KVCache, additive_mask, causal_mask, check_ids, check_int, check_real
from refimpl.ring import merge_partials

EARLY_STOPPING = (True, False, "never")


@dataclass
class BeamOutput:
    sequences: torch.Tensor         # [N * num_return_sequences, T], with prompt
    sequences_scores: torch.Tensor  # [N * num_return_sequences], normalised


# ---- argument checks (the lesson imports them and names them in one sentence) ----

def check_common(model, input_ids, max_new_tokens, eos_token_id, pad_token_id, attention_mask):
    """ValueError naming the argument for inputs that greedy and beam search share."""
    if isinstance(input_ids, (list, tuple)) and len({len(p) for p in input_ids}) > 1:
        raise ValueError("input_ids: prompts of different lengths must be left-padded into one tensor "
                         "and come with an attention_mask (0 on padding)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point() \
            or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be an integer tensor [batch >= 1, prompt length >= 1]")
    vocab, block = model.config.vocab_size, model.config.block_size
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if input_ids.shape[1] + max_new_tokens > block:
        raise ValueError(f"prompt length ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) "
                         f"must be <= the model's block_size ({block})")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and (not isinstance(value, int) or not 0 <= value < vocab):
            raise ValueError(f"{name} must be None or an integer in [0, {vocab}), got {value!r}")
    check_ids("input_ids", input_ids, vocab)
    if attention_mask is None:
        if pad_token_id is not None and pad_token_id != eos_token_id and (input_ids[:, 0] == pad_token_id).any():
            raise ValueError("attention_mask is required for left-padded prompts (a row starts with "
                             "pad_token_id); give 0 on padding, 1 on tokens")
        return
    if attention_mask.shape != input_ids.shape or not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError(f"attention_mask must be 0/1 of the shape of input_ids {tuple(input_ids.shape)}")
    if not attention_mask[:, -1].all() or (attention_mask.diff(dim=1) < 0).any():
        raise ValueError("attention_mask must describe left padding: zeros, then ones, last column all ones")


def check_beam_args(num_beams, num_beam_groups, diversity_penalty, num_return_sequences, early_stopping,
                    length_penalty):
    """ValueError naming the beam-search argument that is out of range."""
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not isinstance(num_beam_groups, int) or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beam_groups must be an integer in [1, num_beams={num_beams}] that divides "
                         f"num_beams, got {num_beam_groups!r}")
    if not diversity_penalty >= 0:
        raise ValueError(f"diversity_penalty must be >= 0, got {diversity_penalty!r}")
    if diversity_penalty > 0 and num_beam_groups == 1:
        raise ValueError("diversity_penalty > 0 needs num_beam_groups > 1 (it penalises tokens chosen "
                         "by earlier groups)")
    if not isinstance(num_return_sequences, int) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an integer in [1, num_beams={num_beams}], "
                         f"got {num_return_sequences!r}")
    if not any(early_stopping is e for e in EARLY_STOPPING):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not isinstance(length_penalty, (int, float)) or length_penalty != length_penalty:
        raise ValueError(f"length_penalty must be a real number, got {length_penalty!r}")


def check_candidate_args(logits, running, counts, diversity_penalty, k, rows=None) -> None:
    """ValueError naming the argument of ``group_candidates`` that is out of range."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [N, Bg, V], got {tuple(getattr(logits, 'shape', ()))}")
    N, Bg, V = logits.shape
    if not isinstance(running, torch.Tensor) or running.shape != (N, Bg):
        raise ValueError(f"running must be [N, Bg] = [{N}, {Bg}], got {tuple(getattr(running, 'shape', ()))}")
    if counts is not None and (not isinstance(counts, torch.Tensor) or counts.shape != (N, V)):
        raise ValueError(f"counts must be None or [N, V] = [{N}, {V}], got {tuple(getattr(counts, 'shape', ()))}")
    check_real("diversity_penalty", diversity_penalty, 0.0)
    check_int("k", k, 1, Bg * V)
    if rows is not None and (not isinstance(rows, torch.Tensor) or rows.shape != (N, Bg)
                             or rows.is_floating_point()):
        raise ValueError(f"rows must be None or an integer tensor [N, Bg] = [{N}, {Bg}], "
                         f"got {rows!r:.80}")


def check_prompt_len(sequences, prompt_len, min_generated: int = 0) -> None:
    """ValueError unless ``sequences`` is an integer tensor [N, T] and prompt_len is in
    [1, T - min_generated]."""
    if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2 or sequences.is_floating_point():
        raise ValueError(f"sequences must be an integer tensor [N, T], got {sequences!r:.80}")
    check_int("prompt_len", prompt_len, 1, sequences.shape[1] - min_generated)


def check_sequences(sequences, prompt_len, attention_mask) -> None:
    """``check_prompt_len`` with at least one generated token, and a 0/1 mask [N, prompt_len]."""
    check_prompt_len(sequences, prompt_len, min_generated=1)
    shape = (sequences.shape[0], prompt_len)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != shape
                                       or not ((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"attention_mask must be None or 0/1 of shape [N, prompt_len] = {list(shape)} "
                         f"(the prompt's mask), got {attention_mask!r:.80}")



# ---- the pieces of beam search, in the order chapter 2 builds them ----

def group_candidates(logits, running, counts=None, diversity_penalty=0.0, k=2,
                     rows=None):
    """Top-k continuations of one group: logits [N, Bg, V], running [N, Bg].

    score = running + log_softmax(logits) - diversity_penalty * counts
    (Vijayakumar et al. eq. 4: counts [N, V] = how often earlier groups chose
    each token at this step). Returns (scores [N, k], flat indices [N, k] into
    Bg * V), best first. ``rows`` [N, Bg]: beam j's logits are row rows[:, j]
    (stage 9's cache rows); None: row j.
    """
    check_candidate_args(logits, running, counts, diversity_penalty, k, rows)
    N, Bg, V = logits.shape
    logp = torch.log_softmax(logits, dim=-1)
    if counts is not None and diversity_penalty:
        logp = logp - diversity_penalty * counts[:, None, :]
    # two rounds: each beam's k best, then the best k of those Bg * k (the
    # group's k best hold at most k of one beam); one top-k over Bg * V
    # scores is several times slower on a CPU at GPT-2's vocabulary
    top, token = blockwise_topk(logp, min(k, V))
    if rows is not None:  # each beam's k best, from its row
        index = rows[..., None].expand_as(top)
        top, token = top.gather(1, index), token.gather(1, index)
    scores, pos = (top + running[..., None]).view(N, -1).topk(k, dim=1)
    return scores, (pos // top.shape[2]) * V + token.view(N, -1).gather(1, pos)


def blockwise_topk(x, k, block=128):
    """x.topk(k) over the last dim of x [..., V], in two rounds when V is
    large: each block of ``block`` columns' maximum, then one top-k over the k
    blocks with the largest maxima and the last V % block columns. Every entry
    of the top k lies there: a block left out has k blocks above its maximum.
    Same values, best first; a tie may pick an equal entry elsewhere."""
    V = x.shape[-1]
    if V // block < max(256, 16 * k):  # too few blocks to pay for round one
        return x.topk(k, dim=-1)
    n = V // block
    rows = x.reshape(-1, V)
    blocks = rows[:, :n * block].view(-1, n, block)
    best = blocks.amax(-1).topk(k, dim=-1).indices  # [R, k] block numbers
    picked = blocks.gather(1, best[..., None].expand(-1, -1, block))
    top, pos = torch.cat([picked.flatten(1), rows[:, n * block:]], 1).topk(k)
    block_of = best.gather(1, (pos // block).clamp(max=k - 1))
    column = torch.where(pos < k * block, block_of * block + pos % block,
                         pos + (n - k) * block)
    return top.view(x.shape[:-1] + (k,)), column.view(x.shape[:-1] + (k,))


@dataclass
class Hypotheses:
    """Finished hypotheses: per prompt and group, the best Bg by score."""
    scores: torch.Tensor    # [N, G, Bg], -1e9 where empty
    tokens: torch.Tensor    # [N, G, Bg, max_new] generated tokens, EOS included
    lengths: torch.Tensor   # [N, G, Bg] generated length, EOS included
    full: torch.Tensor      # [N, G, Bg] slot holds a hypothesis

    @classmethod
    def empty(cls, N, G, Bg, max_new, fill, device):
        return cls(torch.full((N, G, Bg), -1e9, device=device),
                   torch.full((N, G, Bg, max_new), fill, dtype=torch.long,
                              device=device),
                   torch.zeros((N, G, Bg), dtype=torch.long, device=device),
                   torch.zeros((N, G, Bg), dtype=torch.bool, device=device))

    def add(self, g, scores, tokens, length, accept):
        """Merge candidates (scores [N, K], tokens [N, K, max_new]) where
        ``accept`` into group g; keep the best Bg."""
        Bg = self.scores.shape[2]
        new = scores.masked_fill(~accept, float("-inf"))
        merged = torch.cat([self.scores[:, g], new], 1)
        best = merged.topk(Bg, dim=1).indices
        self.scores[:, g] = merged.gather(1, best)
        toks = torch.cat([self.tokens[:, g], tokens], 1)
        self.tokens[:, g] = toks.gather(1, best[..., None].expand_as(
            self.tokens[:, g]))
        lengths = torch.full_like(scores, length, dtype=torch.long)
        self.lengths[:, g] = torch.cat([self.lengths[:, g], lengths],
                                       1).gather(1, best)
        full = torch.cat([self.full[:, g], accept], 1)
        self.full[:, g] = full.gather(1, best)


def filler_token(scorer, eos, pad):
    """The token after a finished hypothesis: ``pad``, except that HF's plain
    beam search (not the scorer) fills with ``pad or eos``: a pad id of 0
    becomes EOS."""
    if pad is None or (not scorer and pad == 0 and eos is not None):
        return eos if eos is not None else 0
    return pad


@dataclass
class Rules:
    """When to stop, as HF 4.56.2: BeamSearchScorer if ``scorer`` (G > 1),
    else the vectorised ``_beam_search``."""
    scorer: bool
    early_stopping: bool | str
    length_penalty: float
    max_new_tokens: int

    def best_length(self, length):
        """The length at which a running beam could score best (HF's bound)."""
        if self.early_stopping == "never" and self.length_penalty > 0:
            return self.max_new_tokens
        return length

    def full_and_stopping(self, hyps):
        """Vectorised: with early_stopping=True a full prompt takes no more."""
        return hyps.full[:, 0].all(1) & (self.early_stopping is True)

    def may_improve(self, hyps, best_running, length):
        """Vectorised: could the best running beam beat the worst finished?"""
        bound = best_running / self.best_length(length) ** self.length_penalty
        worst = hyps.scores[:, 0].min(1, keepdim=True).values
        worst = torch.where(hyps.full[:, 0], worst, -1e9)
        return (bound[:, None] > worst).any(1)

    def group_done(self, hyps, g, best_candidate, length):
        """Scorer (BeamHypotheses.is_done): group full and cannot improve."""
        full = hyps.full[:, g].all(1)
        if self.early_stopping is True:
            return full
        bound = best_candidate / self.best_length(length) ** self.length_penalty
        return full & (hyps.scores[:, g].min(1).values >= bound)


def padded_positions_and_masks(attention_mask, max_new_tokens):
    """HF's left padding: positions cumsum(mask) - 1 (padding gets 1), the
    prompt's additive mask [N, 1, T, T] and the decoding mask [N, 1, 1,
    T + max_new_tokens], both hiding the padding keys."""
    keep = attention_mask.bool()
    N, T = keep.shape
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~keep, 1)
    causal = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()
    prompt_mask = additive_mask(causal & keep[:, None, None, :])
    future = torch.ones(N, max_new_tokens, dtype=torch.bool, device=keep.device)
    mask = additive_mask(torch.cat([keep, future], 1))[:, None, None, :]
    return positions, prompt_mask, mask


# ---- stage 9: the prompt's keys once per prompt, the generated suffix per beam ----

def partial_attention(q, k, v, mask=None, scale=None):
    """Attention of queries q [N, Hkv, M, T, D] to keys and values k, v [N, Hkv, S, D]
    alone, as a partial to merge: (out [N, Hkv, M, T, D] in fp32, lse [N, Hkv, M, T]),
    lse the log-sum-exp of the scores (FlashAttention's statistic, chapter 3). The M
    query groups of one key head (GQA heads, beams) share one matmul with k; ``mask``
    is additive, broadcast to [N, 1, 1 or M, T, S]."""
    N, Hkv, M, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    s = q.reshape(N, Hkv, M * T, D) @ k.transpose(-2, -1)
    s = s.view(N, Hkv, M, T, -1).float() * scale
    if mask is not None:
        s = s + mask
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse[..., None]).view(N, Hkv, M * T, -1)
    return (p.to(v.dtype) @ v).view(N, Hkv, M, T, D).float(), lse


def fused_partial_attention(q, k, v, mask=None, scale=None):
    """``partial_attention`` in one call of torch's fused CPU attention kernel,
    which returns the log-sum-exp too (``aten::_scaled_dot_product_flash_
    attention_for_cpu``, an internal op of torch 2.13); elsewhere the math."""
    if q.device.type != "cpu":
        return partial_attention(q, k, v, mask, scale)
    N, Hkv, M, T, D = q.shape
    if mask is not None:
        S = k.shape[2]
        mask = mask.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)  # fp16: not -inf
        mask = mask.expand(N, 1, M, T, S).reshape(N, 1, M * T, S)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(N, Hkv, M * T, D), k, v, attn_mask=mask, scale=scale)[:2]
    return out.reshape(N, Hkv, M, T, D).float(), lse.reshape(N, Hkv, M, T)


def shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v,
                            mask=None, scale=None, partial=partial_attention):
    """Cascade (bifurcated) attention, Hydragen (Juravsky et al. 2024, sec. 3):
    q [N * B, H, T, D], B beams per prompt, against the prompt's keys prefix_k
    [N, Hkv, P, D] (one copy per prompt: all B * H / Hkv query heads of a prompt
    in one matmul) and each beam's own suffix_k [N * B, Hkv, S, D]; the two
    partials merged by their log-sum-exps (chapter 3's merge_partials). ``mask``
    [N * B, 1, T, P + S] additive, or None (causal within the suffix);
    ``partial`` computes each part (``partial_attention`` or a fused one)."""
    NB, H, T, D = q.shape
    N, Hkv, P, _ = prefix_k.shape
    B, g, S = NB // N, H // Hkv, suffix_k.shape[2]
    mask_p = mask_s = None  # no mask: the prompt all visible, causal suffix
    if mask is not None:
        mask_p, mask_s = mask[::B, :, None, :, :P], mask[:, :, None, :, P:]
    elif T > 1:
        mask_s = causal_mask(T, S, q.device)
    # shared part: [N, Hkv, B * g, T, D] queries, prefix mask from the first beam
    qp = q.view(N, B, Hkv, g, T, D).transpose(1, 2)
    qp = qp.reshape(N, Hkv, B * g, T, D)
    out_p, lse_p = partial(qp, prefix_k, prefix_v, mask_p, scale)
    out_p = out_p.view(N, Hkv, B, g, T, D).transpose(1, 2)
    out_p = out_p.reshape(NB, H, T, D)
    lse_p = lse_p.view(N, Hkv, B, g, T).transpose(1, 2).reshape(NB, H, T)
    # per-beam part: [N * B, Hkv, g, T, D] queries against the beam's suffix
    out_s, lse_s = partial(q.view(NB, Hkv, g, T, D), suffix_k, suffix_v,
                           mask_s, scale)
    out, _ = merge_partials(out_p, lse_p, out_s.reshape(NB, H, T, D),
                            lse_s.reshape(NB, H, T))
    return out.to(q.dtype)


def triton_partial_attention(q, k, v, mask=None, scale=None):
    """``partial_attention`` by the kernel of ``refimpl.kernels.search`` when
    each query has one new token and the mask is a key mask (decoding);
    otherwise the math."""
    N, Hkv, M, T, D = q.shape
    if T > 1 or (mask is not None and mask.shape[-2] > 1):
        return partial_attention(q, k, v, mask, scale)
    from refimpl.kernels.search import prefix_attention
    key_mask = None if mask is None else mask.reshape(-1, k.shape[2]).expand(N, -1)
    out, lse = prefix_attention(q.reshape(N, Hkv, M, D), k, v, key_mask, scale)
    return out.view(N, Hkv, M, 1, D), lse.view(N, Hkv, M, 1)


# the attention backends of lm.attention, for the two parts of the cascade
PARTIALS = {"math": partial_attention, "sdpa": fused_partial_attention,
            "triton": triton_partial_attention}


def check_prefix_cache_args(cache, beams, capacity):
    """ValueError for ``share_prefix``: a filled cache of N rows,
    beams >= 1 and capacity >= 1."""
    check_int("beams", beams, 1)
    check_int("capacity", capacity, 1)
    if not len(cache) or not cache.kv():
        raise ValueError("cache must hold the encoded prompts (it is empty)")


def check_beam_rows(index, rows, beams) -> list[int]:
    """ValueError unless ``index`` [rows] sends each row to a beam of its own prompt;
    returns it as a list."""
    src = index.tolist() if index.ndim == 1 else []
    if len(src) != rows or any(s // beams != b // beams for b, s in enumerate(src)):
        raise ValueError(f"index must hold {rows} rows, each a beam of its own prompt (the "
                         f"cache was built for {rows // beams} prompts x {beams} beams)")
    return src


class SharedPrefixCache:
    """Beam search's KV cache: the prompts' keys and values once per prompt
    (``prefix``, per layer [N, Hkv, P, D]) and each beam's generated tokens in
    ``suffix``, an ordinary ``KVCache`` of N * B rows: beam b's in row
    ``rows[b]``, a row of its own prompt. The model runs on rows, so row
    ``rows[b]`` is fed beam b's token (``SharedPrefixStepper``). Reordering the
    beams copies only where a beam has several children; the P prompt
    positions never move."""

    def __init__(self, prefix, suffix):
        self.prefix, self.suffix = prefix, suffix
        N, _, self.prompt_len, _ = prefix[0][0].shape
        self.beams = suffix.batch_size // N
        self.batch_size = suffix.batch_size
        self.rows = list(range(self.batch_size))

    def __len__(self) -> int:
        return self.prompt_len + len(self.suffix)

    def nbytes(self) -> int:
        """Bytes held: the prompts' keys and values, and the suffixes'."""
        prefix = sum(k.nbytes + v.nbytes for k, v in self.prefix)
        return prefix + self.suffix.nbytes()

    def attend(self, layer, q, k, v, attn_mask=None, backend="sdpa",
               scale=None):
        """Append this step's k, v [N * B, Hkv, T, D] to the suffixes of
        ``layer``; attend q [N * B, H, T, D] to prompt and suffix."""
        suffix_k, suffix_v = self.suffix.update(layer, k, v)
        prefix_k, prefix_v = self.prefix[layer]
        return shared_prefix_attention(q, prefix_k, prefix_v, suffix_k,
                                       suffix_v, attn_mask, scale,
                                       PARTIALS[backend])

    def advance(self, num_tokens: int) -> None:
        self.suffix.advance(num_tokens)

    def crop(self, length: int) -> None:
        """Forget the generated tokens after position ``length``."""
        check_int("length", length, self.prompt_len, len(self))
        self.suffix.crop(length - self.prompt_len)

    def reorder(self, index) -> None:
        """Beam b continues beam index[b], a beam of its own prompt; only the
        rows ``branch_rows`` names are copied."""
        index = torch.as_tensor(index, dtype=torch.long,
                                device=self.prefix[0][0].device)
        src = check_beam_rows(index, self.batch_size, self.beams)
        self.rows, copies = branch_rows(self.rows, src, self.beams)
        self.suffix.copy_rows(copies)


def branch_rows(rows, index, beams):
    """Copy on branch (as vLLM's beam search does with its KV blocks): beam b
    continues beam index[b], whose suffix is in row rows[index[b]]. A parent's
    first child takes over its row as it is; each further child takes a row of
    its prompt that no beam continues, and a copy. Returns (the new rows, the
    copies as (to, from) pairs of rows)."""
    parents = [rows[s] for s in index]
    kept, free = set(parents), {}  # free: per prompt, the rows left behind
    for r in range(len(rows)):
        if r not in kept:
            free.setdefault(r // beams, []).append(r)
    new_rows, taken, copies = [], set(), []
    for b, r in enumerate(parents):
        if r in taken:  # a further child of the beam in row r
            copies.append((free[b // beams].pop(), r))
            r = copies[-1][0]
        taken.add(r)
        new_rows.append(r)
    return new_rows, copies


def share_prefix(cache, beams, capacity) -> SharedPrefixCache:
    """The encoded prompts of a model's cache (N rows), shared by ``beams``
    beams each with room for ``capacity`` generated tokens."""
    check_prefix_cache_args(cache, beams, capacity)
    prefix = [(k.contiguous(), v.contiguous()) for k, v in cache.kv()]
    N, Hkv, _, D = prefix[0][0].shape
    suffix = KVCache(len(prefix), N * beams, Hkv, D, capacity,
                     prefix[0][0].device)
    return SharedPrefixCache(prefix, suffix)


class Stepper:
    """Runs left-padded prompts through ``model`` with one KV cache."""

    def __init__(self, model, input_ids, attention_mask=None, max_new=0):
        self.model, self.input_ids, self.max_new = model, input_ids, max_new
        self.cache = model.empty_cache(input_ids.shape[0])
        # None: no padding, and beam b is row b of cache and logits (stage 9)
        self.positions = self.mask = self.prompt_mask = self.beam_rows = None
        if attention_mask is not None and not attention_mask.all():
            self.positions, self.prompt_mask, self.mask = \
                padded_positions_and_masks(attention_mask, max_new)

    def prompt(self, beams: int = 1) -> torch.Tensor:
        """Encode the prompts, ``beams`` cache rows each; logits [NB, V]."""
        logits = self.model(self.input_ids, self.positions, self.prompt_mask,
                            self.cache, last_only=True)[:, -1].float()
        if beams > 1:  # greedy's single rows are in place already: no copy
            self.repeat_cache(beams)
            if self.mask is not None:
                self.positions = self.positions.repeat_interleave(beams, 0)
                self.mask = self.mask.repeat_interleave(beams, 0)
        return logits.repeat_interleave(beams, 0)

    def repeat_cache(self, beams: int) -> None:
        """``beams`` copies of each prompt's cache row."""
        rows = torch.arange(len(self.input_ids), device=self.input_ids.device)
        self.cache.reorder(rows.repeat_interleave(beams))

    def step(self, tokens: torch.Tensor, rows=None) -> torch.Tensor:
        """Continue cache row ``rows[i]`` with ``tokens[i]``; logits [N, V]."""
        if rows is not None:  # rows move only between beams of one prompt
            self.cache.reorder(rows)
        positions = mask = None
        if self.mask is not None:
            past, prompt_len = len(self.cache), self.input_ids.shape[1]
            positions = self.positions[:, -1:] + past - prompt_len + 1
            mask = self.mask[..., :past + 1]
        out = self.model(tokens[:, None], positions, mask, self.cache)
        return out[:, -1].float()


class SharedPrefixStepper(Stepper):
    """A ``Stepper`` whose beams share one copy of their prompt's keys and
    values (stage 9); each beam's generated suffix is its own."""

    def repeat_cache(self, beams: int) -> None:
        self.cache = share_prefix(self.cache, beams, self.max_new)

    def step(self, tokens: torch.Tensor, rows=None) -> torch.Tensor:
        """Beam b continues beam ``rows[b]`` with ``tokens[b]``, in cache row
        ``beam_rows[b]``; logits [N, V] of the cache's rows."""
        if rows is not None:
            self.cache.reorder(rows)
            self.beam_rows = tokens.new_tensor(self.cache.rows)
        if self.beam_rows is not None:  # the model runs on the cache's rows
            tokens = tokens.clone().index_copy_(0, self.beam_rows, tokens)
        return super().step(tokens)


def greedy_decode(model, input_ids, max_new_tokens, eos_token_id, pad_token_id,
                  attention_mask):
    """Greedy search; returns (sequences, summed log-probs [N], generated
    lengths [N], EOS included)."""
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    stepper = Stepper(model, input_ids, attention_mask, max_new_tokens)
    logits = stepper.prompt()
    out, device = [input_ids], input_ids.device
    running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    logp_sum = torch.zeros(input_ids.shape[0], device=device)
    length = torch.zeros(input_ids.shape[0], dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        token = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(1, token[:, None])[:, 0]
        logp_sum += logp * running
        length += running
        if eos_token_id is not None:
            token = torch.where(running, token, pad)
            running &= token != eos_token_id
        out.append(token[:, None])
        if t == max_new_tokens - 1 or not running.any():
            break
        logits = stepper.step(token)
    return torch.cat(out, 1), logp_sum, length


@torch.no_grad()
def greedy_search(model, input_ids, *, max_new_tokens, eos_token_id=None,
                  pad_token_id=None, attention_mask=None) -> torch.Tensor:
    """The argmax token at every step, as HF ``generate(do_sample=False,
    num_beams=1)``: a finished row is filled with ``pad_token_id`` (EOS if
    None); stops when every row has finished. Returns [N, T + steps]."""
    check_common(model, input_ids, max_new_tokens, eos_token_id, pad_token_id,
                 attention_mask)
    return greedy_decode(model, input_ids, max_new_tokens, eos_token_id,
                         pad_token_id, attention_mask)[0]


@torch.no_grad()
def sample_continuations(model, input_ids, *, max_new_tokens, num_return_sequences=1,
           temperature=1.0, attention_mask=None, generator=None,
           shared_prefix=True) -> torch.Tensor:
    """``num_return_sequences`` continuations of each prompt sampled at
    ``temperature`` (rows prompt-major, as HF ``generate(do_sample=True)``);
    they share their prompt's keys and values unless ``shared_prefix`` is
    False. Returns [N * num_return_sequences, T + max_new_tokens]."""
    check_common(model, input_ids, max_new_tokens, None, None, attention_mask)
    n = check_int("num_return_sequences", num_return_sequences, 1)
    check_real("temperature", temperature, 1e-6)
    stepper = (SharedPrefixStepper if shared_prefix else Stepper)(
        model, input_ids, attention_mask, max_new_tokens)
    logits = stepper.prompt(n)
    out = [input_ids.repeat_interleave(n, 0)]
    for t in range(max_new_tokens):
        probs = torch.softmax(logits / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        out.append(token[:, None])
        if t < max_new_tokens - 1:
            logits = stepper.step(token)
    return torch.cat(out, 1)


@dataclass
class BeamState:
    """What beam search carries from step to step."""
    tokens: torch.Tensor    # [N, B, max_new] generated tokens of the live beams
    running: torch.Tensor   # [N, B] running scores, -1e9: slot not yet live
    done: torch.Tensor      # [N, G] group finished (scorer rules, G > 1)
    open: torch.Tensor      # [N] prompt still takes hypotheses (G = 1 rules)
    hyps: Hypotheses

    @classmethod
    def start(cls, N, G, Bg, max_new, fill, device):
        running = torch.full((N, G, Bg), -1e9, device=device)
        running[:, :, 0] = 0  # only the first beam of each group is live
        return cls(torch.full((N, G * Bg, max_new), fill, dtype=torch.long,
                              device=device),
                   running.view(N, G * Bg),
                   torch.zeros(N, G, dtype=torch.bool, device=device),
                   torch.ones(N, dtype=torch.bool, device=device),
                   Hypotheses.empty(N, G, Bg, max_new, fill, device))


def add_finished(state, rules, g, scores, parent, token, ends, t):
    """Candidates that end in EOS and rank in the group's top Bg become
    hypotheses; at the last step plain HF takes its top Bg, EOS or not."""
    Bg = state.hyps.scores.shape[2]
    last = t == rules.max_new_tokens - 1 and not rules.scorer
    rank = torch.arange(2 * Bg, device=scores.device)
    finishing = (ends | last) & (rank < Bg)
    if rules.scorer:
        accept = ~state.done[:, g, None]
    else:
        accept = (state.open & ~rules.full_and_stopping(state.hyps))[:, None]
    if (finishing & accept).any():
        index = parent[..., None].expand(-1, -1, state.tokens.shape[2])
        tokens = state.tokens.gather(1, index)
        tokens[:, :, t] = token
        scores = scores / (t + 1) ** rules.length_penalty
        state.hyps.add(g, scores, tokens, t + 1, finishing & accept)


def advance_group(state, rules, g, logits, counts, t, eos, fill, penalty,
                  rows=None):
    """Group g's step: its candidates, its finished hypotheses, its Bg
    survivors (parents, scores, tokens, each [N, Bg]); adds the survivors'
    tokens to ``counts`` for the next group's penalty."""
    Bg, V = state.hyps.scores.shape[2], logits.shape[2]
    beams = slice(g * Bg, (g + 1) * Bg)
    scores, flat = group_candidates(logits[:, beams], state.running[:, beams],
                                    counts, penalty, 2 * Bg, rows)
    parent, token = flat // V + g * Bg, flat % V
    ends = (token == eos if eos is not None
            else torch.zeros_like(flat, dtype=torch.bool))
    add_finished(state, rules, g, scores, parent, token, ends, t)
    # the Bg best that did not end in EOS go on (a stable sort keeps the rank)
    keep = ends.long().argsort(dim=1, stable=True)[:, :Bg]
    chosen = token.gather(1, keep)
    if rules.scorer:  # a group done earlier is fed padding, still counted
        chosen = chosen.masked_fill(state.done[:, g, None], fill)
        state.done[:, g] |= rules.group_done(state.hyps, g, scores[:, 0], t + 1)
    if counts is not None:
        ones = torch.ones_like(chosen, dtype=counts.dtype)
        counts.scatter_add_(1, chosen, ones)
    return parent.gather(1, keep), scores.gather(1, keep), chosen


def beam_step(state, rules, logits, t, eos, fill, penalty, rows=None):
    """One step of every group in order (logits [N, B, V]; beam j's is row
    rows[:, j], or row j if None, which G > 1 needs); returns each new beam's
    parent slot and token, [N, B]."""
    N, B, V = logits.shape
    G = state.done.shape[1]
    counts = torch.zeros(N, V, device=logits.device) if G > 1 else None
    groups = [advance_group(state, rules, g, logits, counts, t, eos, fill,
                            penalty, rows) for g in range(G)]
    parents, state.running, chosen = (groups[0] if G == 1 else
                                      (torch.cat(x, 1) for x in zip(*groups)))
    index = parents[..., None].expand_as(state.tokens)
    state.tokens = state.tokens.gather(1, index)
    state.tokens[:, :, t] = chosen
    return parents, chosen


def should_stop(state, rules, t):
    """Scorer rules: every group is done. Vectorised rules: no prompt is
    open any more (or all are full with early_stopping=True)."""
    if rules.scorer:
        return bool(state.done.all())
    state.open &= rules.may_improve(state.hyps, state.running[:, 0], t + 1)
    full = rules.full_and_stopping(state.hyps)
    return not state.open.any() or bool(full.all())


def add_running_beams(state, rules, t):
    """BeamSearchScorer.finalize: groups not done add their running beams."""
    N, G, Bg = state.hyps.scores.shape
    for g in range(G):
        beams = slice(g * Bg, (g + 1) * Bg)
        scores = state.running[:, beams] / (t + 1) ** rules.length_penalty
        accept = ~state.done[:, g, None].expand(N, Bg)
        state.hyps.add(g, scores, state.tokens[:, beams], t + 1, accept)


def collect(hyps: Hypotheses, input_ids, num_return_sequences):
    """The best ``num_return_sequences`` hypotheses of each prompt over all
    groups, prompt prepended."""
    N = input_ids.shape[0]
    scores = hyps.scores.view(N, -1)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    best = order[:, :num_return_sequences]
    tokens = hyps.tokens.view(N, scores.shape[1], -1)
    index = best[..., None].expand(-1, -1, tokens.shape[2])
    tokens = tokens.gather(1, index).flatten(0, 1)
    length = int(hyps.lengths.view(N, -1).gather(1, best).max())
    prompt = input_ids.repeat_interleave(num_return_sequences, 0)
    return BeamOutput(torch.cat([prompt, tokens[:, :length]], 1),
                      scores.gather(1, best).flatten())


def beam_decode(model, input_ids, attention_mask, B, G, rules, eos, pad,
                penalty, stepper_class=Stepper):
    """B beams in G groups from each prompt; returns the finished Hypotheses."""
    N, max_new = input_ids.shape[0], rules.max_new_tokens
    fill = filler_token(rules.scorer, eos, pad)
    state = BeamState.start(N, G, B // G, max_new, fill, input_ids.device)
    stepper = stepper_class(model, input_ids, attention_mask, max_new)
    logits = stepper.prompt(B)
    first_row = torch.arange(N, device=input_ids.device)[:, None] * B
    rows = None  # beam j's logits in row j, until the stepper says otherwise
    for t in range(max_new):
        parents, chosen = beam_step(state, rules, logits.view(N, B, -1), t,
                                    eos, fill, penalty, rows)
        if t == max_new - 1 or should_stop(state, rules, t):
            break
        logits = stepper.step(chosen.view(-1), (parents + first_row).view(-1))
        rows = stepper.beam_rows
        if rows is not None and G > 1:  # groups take their beams' rows: a copy
            logits, rows = logits.index_select(0, rows), None
        elif rows is not None:  # within each prompt's block of B rows
            rows = rows.view(N, B) - first_row
    if rules.scorer:
        add_running_beams(state, rules, t)
    return state.hyps


@torch.no_grad()
def beam_search(model, input_ids, *, num_beams, max_new_tokens,
                length_penalty=1.0, early_stopping=False, eos_token_id=None,
                pad_token_id=None, attention_mask=None, num_return_sequences=1,
                num_beam_groups=1, diversity_penalty=0.0,
                shared_prefix=True) -> BeamOutput:
    """Beam search (G = 1) or diverse beam search (G > 1), as HF
    ``generate(do_sample=False)``. ``num_beams=1`` is greedy search; its
    score is the summed log-probability / length ** length_penalty. The
    beams share their prompt's keys and values unless ``shared_prefix`` is
    False (then each beam has a copy, as in HF)."""
    check_common(model, input_ids, max_new_tokens, eos_token_id, pad_token_id,
                 attention_mask)
    check_beam_args(num_beams, num_beam_groups, diversity_penalty,
                    num_return_sequences, early_stopping, length_penalty)
    if num_beams == 1:
        seqs, logp, length = greedy_decode(model, input_ids, max_new_tokens,
                                           eos_token_id, pad_token_id,
                                           attention_mask)
        return BeamOutput(seqs, logp / length.float() ** length_penalty)
    rules = Rules(num_beam_groups > 1, early_stopping, length_penalty,
                  max_new_tokens)
    stepper_class = SharedPrefixStepper if shared_prefix else Stepper
    hyps = beam_decode(model, input_ids, attention_mask, num_beams,
                       num_beam_groups, rules, eos_token_id, pad_token_id,
                       diversity_penalty, stepper_class)
    return collect(hyps, input_ids, num_return_sequences)


@torch.no_grad()
def sequence_logprobs(model, sequences, prompt_len, attention_mask=None):
    """log p(token | prefix) [N, T - prompt_len] of every generated token,
    in one uncached forward pass."""
    check_sequences(sequences, prompt_len, attention_mask)
    N, T = sequences.shape
    mask = positions = None
    if attention_mask is not None and not attention_mask.all():
        generated = torch.ones_like(sequences[:, prompt_len:])
        full = torch.cat([attention_mask.to(generated), generated], 1)
        positions, mask, _ = padded_positions_and_masks(full, 0)
    logits = model(sequences, positions, mask, model.empty_cache(N)).float()
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1], dim=-1)
    return logp.gather(2, sequences[:, prompt_len:, None])[..., 0]


# ---- metrics for a set of hypotheses (Vijayakumar et al. sec. 5: distinct-n, oracle/quality) ----

def distinct_n(hypotheses: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of a list of hypotheses (Li et al.
    2016); 0 if there are none."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    grams = [tuple(h[i:i + n]) for h in hypotheses
             for i in range(len(h) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def edit_distance(a, b) -> int:
    """Levenshtein distance: insertions, deletions and substitutions cost 1."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                       prev + (x != y))
    return row[-1]


def mean_pairwise_edit_distance(hypotheses: list[list[int]]) -> float:
    """Mean Levenshtein distance over all pairs (0 for fewer than 2)."""
    pairs = list(itertools.combinations(hypotheses, 2))
    if not pairs:
        return 0.0
    return sum(edit_distance(a, b) for a, b in pairs) / len(pairs)


def strip_generated(sequences, prompt_len, eos_token_id=None) -> list[list[int]]:
    """Generated tokens of each row, cut after the first EOS (EOS kept)."""
    check_prompt_len(sequences, prompt_len)
    out = []
    for row in sequences[:, prompt_len:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[:row.index(eos_token_id) + 1]
        out.append(row)
    return out


@torch.no_grad()
def mean_logprob_per_token(model, sequences, prompt_len, eos_token_id=None,
                           attention_mask=None) -> torch.Tensor:
    """Quality of each hypothesis: mean log p(token | prefix) over its
    generated tokens, [N]."""
    logp = sequence_logprobs(model, sequences, prompt_len, attention_mask)
    keep = torch.ones_like(logp, dtype=torch.bool)
    if eos_token_id is not None:  # tokens after the first EOS are padding
        ends = (sequences[:, prompt_len:] == eos_token_id).long()
        keep = ends.cumsum(1) - ends == 0
    return (logp * keep).sum(1) / keep.sum(1)
