"""TinyGPT: the workbench decoder-only transformer, with a KV cache built for decoding.

A GPT-2 style model (Radford et al. 2019; Vaswani et al. 2017, eq. 1 for attention):
learned absolute positions, pre-LayerNorm blocks, causal multi-head attention,
a GELU MLP and an output head tied to the token embedding.

The interface every decoding chapter uses:

    logits = model(input_ids, position_ids=None, attn_mask=None, cache=None)   # [B, T, V]

``attn_mask`` is an additive float mask [B, 1, T, S] (S = cached + new tokens;
0 where a query may look, a large negative number where it may not). Without it
the model is causal, with the T new tokens placed after the S - T cached ones.
``cache`` comes from ``model.empty_cache(batch_size)`` and grows in place.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINTS = Path(__file__).parent / "assets"
ATTN_BACKENDS = ("sdpa", "math", "triton")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def shape_or_type(t) -> tuple | str:
    """What an error message says a bad argument was: a tensor's shape, else its type's name."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an integer in [low, high] (no upper bound if None); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
            or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return int(value)


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """Return ``value`` if it is a real number in [low, high] (so not NaN); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(f"{name} must be a real number in [{low}, {high}], got {value!r}")
    return float(value)


def check_mask_size(T: int, S: int) -> None:
    """ValueError unless 1 <= T <= S: T new queries cannot follow fewer than T keys."""
    check_int("S", S, 1)
    check_int("T", T, 1, S)


def check_attention_args(q, k, v, backend: str) -> None:
    """ValueError for ``attention``: a known backend, q [B, H, T, D] and k, v [B, H, S, D], T <= S."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:] \
            or q.shape[2] > k.shape[2]:
        raise ValueError(f"q must be [B, H, T, D] and k, v [B, H, S, D] with T <= S, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")


def causal_mask(T: int, S: int, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Additive [T, S] mask for T new queries that follow S - T cached keys."""
    check_mask_size(T, S)
    allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    return additive_mask(allowed, dtype)


def additive_mask(allowed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Turn a boolean "may attend" mask into an additive one (0 or the dtype's
    minimum).

    The minimum, not -inf, so that a fully masked row (a padding query) gives a
    uniform softmax instead of NaN.
    """
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def attention(q, k, v, attn_mask=None, backend="sdpa"):
    """softmax(q k^T / sqrt(d) + mask) v; q [B, H, T, D], k and v [B, H, S, D].

    With ``attn_mask=None`` the mask is causal and bottom-right aligned: query i
    sees keys 0 .. S - T + i (the new tokens come after the cached ones).
    """
    check_attention_args(q, k, v, backend)
    T, S = q.shape[-2], k.shape[-2]
    if backend == "triton":
        if attn_mask is not None:
            raise ValueError(
                "attn_backend='triton' supports only the built-in causal mask; "
                "use 'sdpa' or 'math' with an explicit attn_mask")
        from refimpl.kernels.attention import flash_attention
        return flash_attention(q, k, v, causal=True)[0]
    if attn_mask is None and T > 1:
        attn_mask = causal_mask(T, S, q.device, q.dtype)
    elif attn_mask is not None and attn_mask.dtype != q.dtype:
        # CPU SDPA in torch 2.13 gives wrong results for a mask in another
        # dtype than q; clamp so that a float32 minimum does not become -inf
        # in float16.
        attn_mask = attn_mask.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(dim=-1) @ v


def check_forward_args(input_ids, position_ids, attn_mask, cache, block_size: int):
    """Validate a call ``model(input_ids, position_ids, attn_mask, cache)``; return (B, T, past).

    Shared by ``TinyGPT`` and ``hf.HFCausalLM`` so both refuse the same bad input.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be an integer tensor [B, T], got {type(input_ids).__name__}")
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    past = 0 if cache is None else len(cache)
    S = past + T
    if T < 1 or S > block_size:
        raise ValueError(f"input_ids has {T} new tokens after {past} cached ones; the total "
                         f"must be in [1, block_size={block_size}]")
    if cache is not None and cache.batch_size != B:
        raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {B}")
    if position_ids is not None and (
            position_ids.shape not in ((B, T), (T,)) or position_ids.is_floating_point()
            or position_ids.min() < 0 or position_ids.max() >= block_size):
        raise ValueError(f"position_ids must be integer [B, T] = [{B}, {T}] with values in "
                         f"[0, {block_size})")
    if attn_mask is not None and (attn_mask.ndim != 4 or attn_mask.shape[1:] != (1, T, S)
                                  or attn_mask.shape[0] not in (1, B)):
        raise ValueError(f"attn_mask must be an additive float mask [B, 1, T, S] = "
                         f"[{B}, 1, {T}, {S}], got {tuple(attn_mask.shape)}")
    if attn_mask is not None and not attn_mask.is_floating_point():
        raise ValueError("attn_mask must be additive (float), not boolean; see additive_mask()")
    return B, T, past


def check_ids(name: str, ids: torch.Tensor, high: int | None = None, bound: str = "vocab_size",
              what: str = "token ids") -> None:
    """ValueError unless every entry of the integer tensor ``ids`` is in [0, high) ([0, inf) when
    ``high`` is None); ``bound`` and ``what`` name the limit and the entries in the message.

    One ``aminmax`` pass, so it is cheap enough for every decoding step. An empty tensor (a batch
    whose every sequence has finished) passes.
    """
    if not ids.numel():
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo < 0 or (high is not None and hi >= high):
        limit = "inf" if high is None else f"{bound}={high}"
        raise ValueError(f"{name} must hold {what} in [0, {limit}), got values in [{lo}, {hi}]")


def check_config(config: GPTConfig) -> None:
    """ValueError naming the first field of ``config`` out of range."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        check_int(f"config.{name}", getattr(config, name), 1)
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    check_real("config.dropout", config.dropout, 0.0, 1.0)


class KVCache:
    """Keys and values of every layer, preallocated to the context length.

    ``k`` and ``v`` are [n_layer, B, H, capacity, D]; the first ``len(cache)``
    positions are filled. A forward pass writes its new keys after them and
    then advances the length, so the cache grows in place.
    """

    def __init__(self, n_layer, batch_size, n_head, head_dim, capacity, device=None):
        for name, size in (("n_layer", n_layer), ("batch_size", batch_size), ("n_head", n_head),
                           ("head_dim", head_dim), ("capacity", capacity)):
            check_int(name, size, 1)
        self.shape = (n_layer, batch_size, n_head, capacity, head_dim)
        self.device = device
        self.k = self.v = None  # allocated on first write, in the keys' dtype
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int:
        return self.shape[1]

    @property
    def capacity(self) -> int:
        return self.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v [B, H, T, D] for ``layer``; return all keys and values so far."""
        check_int("layer", layer, 0, self.shape[0] - 1)
        if k.shape != v.shape or k.shape[:2] + k.shape[3:] != self.shape[1:3] + self.shape[4:]:
            raise ValueError(f"k and v must be [B, H, T, D] = [{self.batch_size}, {self.shape[2]}, T, "
                             f"{self.shape[4]}], got {tuple(k.shape)} and {tuple(v.shape)}")
        check_int("T (new positions)", k.shape[2], 0, self.capacity - self.length)
        if self.k is None:
            self.k = k.new_empty(self.shape)
            self.v = v.new_empty(self.shape)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer, q, k, v, attn_mask=None, backend="sdpa"):
        """Write this step's k, v for ``layer`` and attend q [B, H, T, D] to every key so far."""
        k, v = self.update(layer, k, v)
        return attention(q, k, v, attn_mask, backend)

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values so far, [B, H, len, D] views."""
        if self.k is None:
            return []
        return [(self.k[i, :, :, :self.length], self.v[i, :, :, :self.length])
                for i in range(self.shape[0])]

    def advance(self, num_tokens: int) -> None:
        check_int("num_tokens", num_tokens, 0, self.capacity - self.length)
        self.length += num_tokens

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (speculative rollback)."""
        self.length = check_int("length", length, 0, self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Replace row b by row index[b] (beam search); index may repeat rows or change B."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        src = index.tolist() if index.ndim == 1 else []  # checked in Python: one sync, no kernels
        if not src or not 0 <= min(src) <= max(src) < self.batch_size:
            raise ValueError(f"index must be a non-empty 1-D tensor of rows in [0, {self.batch_size})")
        same_rows = len(src) == self.batch_size
        self.shape = (self.shape[0], len(src)) + self.shape[2:]
        if self.k is None:
            return
        if same_rows:
            for t in (self.k, self.v):
                self._move_rows(t[:, :, :, :self.length], src)
        else:
            self.k, self.v = (self._gather(t, index) for t in (self.k, self.v))

    def _gather(self, t, index):
        out = t.new_empty(self.shape)
        out[:, :, :, :self.length] = t[:, :, :, :self.length].index_select(1, index)
        return out

    @staticmethod
    def _move_rows(t, src):
        """In place, row b of t takes row src[b], copying only the rows that change (in a beam
        search step many keep their own): the rows that take a higher row are saved first, then
        from the last row to the first each row that takes a lower one (not overwritten yet in
        this order), then the saved rows."""
        higher = [b for b, s in enumerate(src) if s > b]
        saved = t[:, [src[b] for b in higher]] if higher else None  # advanced indexing: a copy
        for b in reversed(range(len(src))):
            if src[b] < b:
                t[:, b] = t[:, src[b]]
        if higher:
            t[:, higher] = saved

    def copy_rows(self, pairs) -> None:
        """Row d takes a copy of row s for each (d, s) in ``pairs``; no row is both read and
        written, so the order does not matter."""
        if self.k is None:
            return
        for t in (self.k, self.v):
            filled = t[:, :, :, :self.length]
            for d, s in pairs:
                filled[:, d] = filled[:, s]

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (0 before the first write)."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def extract(self, row: int, start: int, length: int) -> "KVCache":
        """A batch-1 cache holding positions start .. start+length-1 of ``row`` (packing)."""
        check_int("row", row, 0, self.batch_size - 1)
        check_int("start", start, 0)
        check_int("length", length, 0)
        if start + length > self.length:
            raise ValueError(f"positions [{start}, {start + length}) are not all in the cache "
                             f"of length {self.length}")
        out = KVCache(self.shape[0], 1, self.shape[2], self.shape[4], self.capacity, self.device)
        out.length = length
        if self.k is not None:
            out.k, out.v = (self._slice(t, row, start, length) for t in (self.k, self.v))
        return out

    def _slice(self, t, row, start, length):
        out = t.new_zeros(self.shape[:1] + (1,) + self.shape[2:])
        out[:, 0, :, :length] = t[:, row, :, start:start + length]
        return out

    def split(self) -> list["KVCache"]:
        """One batch-1 cache per row."""
        return [self.extract(b, 0, self.length) for b in range(self.batch_size)]

    @classmethod
    def stack(cls, caches: list["KVCache"]) -> "KVCache":
        """Concatenate caches of equal length along the batch (inverse of ``split``)."""
        if not caches:
            raise ValueError("caches must not be empty")
        if not all(isinstance(c, KVCache) for c in caches):
            raise TypeError("caches must all be KVCache objects")
        first = caches[0]
        if any(len(c) != len(first) or c.shape[0] != first.shape[0] or c.shape[2:] != first.shape[2:]
               for c in caches):
            raise ValueError("caches must share length, layers, heads, head size and capacity")
        out = cls(first.shape[0], sum(c.batch_size for c in caches), first.shape[2],
                  first.shape[4], first.capacity, first.device)
        out.length = first.length
        written = [c for c in caches if c.k is not None]
        if written:  # a never-written cache (length 0) contributes zeros
            out.k = torch.cat([c.k if c.k is not None else written[0].k.new_zeros(c.shape)
                               for c in caches], dim=1)
            out.v = torch.cat([c.v if c.v is not None else written[0].v.new_zeros(c.shape)
                               for c in caches], dim=1)
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, attn_mask=None, cache=None, layer=0, backend="sdpa"):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        if cache is None:
            y = attention(q, k, v, attn_mask, backend)
        else:  # a KVCache, or beam search's shared-prefix cache
            y = cache.attend(layer, q, k, v, attn_mask, backend)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache=None, layer=0, backend="sdpa"):
        x = x + self.dropout(
            self.attn(self.ln1(x), attn_mask, cache, layer, backend))
        return x + self.dropout(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    def __init__(self, config: GPTConfig, attn_backend: str = "sdpa"):
        super().__init__()
        check_config(config)
        self.config = config
        self.attn_backend = attn_backend
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        if value not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {value!r}")
        self._attn_backend = value

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_cache(self, batch_size: int) -> KVCache:
        check_int("batch_size", batch_size, 1)
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.head_dim, c.block_size,
                       self.tok_emb.weight.device)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, last_only=False):
        """Logits [B, T, V] (or [B, 1, V] for the last position only, with ``last_only``)."""
        if cache is not None and not hasattr(cache, "attend"):
            raise TypeError(f"cache must come from empty_cache() (or be a search.SharedPrefixCache), "
                            f"got {type(cache).__name__}")
        B, T, past = check_forward_args(input_ids, position_ids, attn_mask, cache,
                                        self.config.block_size)
        check_ids("input_ids", input_ids, self.config.vocab_size)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, cache, layer, self.attn_backend)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.ln_f(x[:, -1:] if last_only else x))


def save(model: TinyGPT, path: Path, base: str | None = None, **record) -> None:
    """Write ``path`` (weights and config) and ``path.with_suffix('.json')`` (config + record).

    With ``base`` (a checkpoint name), only the tensors that differ from the base's are written;
    ``load`` takes the rest from the base.
    """
    state = model.state_dict()
    if base is not None:
        base_state = load(base).state_dict()
        state = {k: v for k, v in state.items() if not torch.equal(v, base_state[k])}
    arch = getattr(model, "arch", "gpt")  # "lstm": refimpl.recurrent.LSTMDraft
    torch.save({"config": asdict(model.config), "state_dict": state, "base": base, "arch": arch},
               path)
    info = {"config": asdict(model.config), "arch": arch, "parameters": model.num_parameters(),
            **record}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")


def load(name: str, attn_backend: str = "sdpa") -> nn.Module:
    """Load a committed checkpoint by name ("target", "draft") or by path (a ``draft_lstm``-like
    checkpoint loads as ``refimpl.recurrent.LSTMDraft``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (a checkpoint name or a path ending in .pt), got "
                        f"{type(name).__name__}")
    path = Path(name) if name.endswith(".pt") else CHECKPOINTS / f"{name}.pt"
    if not path.exists():
        raise ValueError(f"no checkpoint {name!r}; known: {known_checkpoints()}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("arch") == "lstm":
        from refimpl.recurrent import LSTMConfig, LSTMDraft  # it imports this module
        model = LSTMDraft(LSTMConfig(**blob["config"]))
    else:
        model = TinyGPT(GPTConfig(**blob["config"]), attn_backend=attn_backend)
    state = blob["state_dict"]
    if blob.get("base") is not None:
        state = {**load(blob["base"]).state_dict(), **state}
    model.load_state_dict(state)
    return model.eval()


def known_checkpoints() -> list[str]:
    """Names of the committed checkpoints (``refimpl/assets/*.pt``)."""
    return sorted(p.stem for p in CHECKPOINTS.glob("*.pt"))


def record(name: str) -> dict:
    """The JSON written beside a checkpoint: config, steps, seconds, losses, curve."""
    path = CHECKPOINTS / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no checkpoint record {name!r}; known: {known_checkpoints()}")
    return json.loads(path.read_text())


def check_generate_args(model, input_ids, max_new_tokens, temperature) -> None:
    """ValueError naming the argument of ``generate`` that is out of range."""
    check_int("max_new_tokens", max_new_tokens, 1)
    check_real("temperature", temperature, 0.0)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids!r:.80}")
    if input_ids.shape[1] + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds block_size={model.config.block_size}")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0,
             use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``max_new_tokens`` after ``input_ids`` [B, T]; temperature 0 is
    greedy.

    With ``use_cache=False`` every step re-runs the whole prefix: the baseline
    that shows what the KV cache saves.
    """
    check_generate_args(model, input_ids, max_new_tokens, temperature)
    cache = model.empty_cache(input_ids.shape[0]) if use_cache else None
    out, step_input = input_ids, input_ids
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache)[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        out = torch.cat([out, nxt], dim=1)
        step_input = nxt if use_cache else out
    return out
