"""Run the book's decoding algorithms on a Hugging Face causal LM.

Every decoding chapter (beam search, prefix packing, speculative decoding) is
written against the workbench interface of ``refimpl/lm.py``:

    logits = model(input_ids, position_ids=None, attn_mask=None, cache=None)   # [B, T, V]
    cache = model.empty_cache(batch_size)   # grows in place; crop / reorder / extract / split / stack

``HFCausalLM`` gives any decoder-only ``transformers`` model (tested with
GPT-2 and Llama, transformers 4.56.2) that same call shape, so a reader can
swap ``lm.load("target")`` for ``HFCausalLM(AutoModelForCausalLM.from_pretrained(...))``
and run every algorithm unchanged. ``HFCache`` wraps a ``transformers.DynamicCache``
and offers the ``KVCache`` methods by name.

Three things in transformers 4.56.2 shape this adapter:

* A 4-D ``attention_mask`` is returned untouched by ``masking_utils.create_causal_mask``
  ("If the mask is already 4D, simply return as-is"), then *added* to the scores
  (eager) or handed to ``F.scaled_dot_product_attention`` (sdpa). So an additive
  float mask in the model's dtype is applied as given. Exception: GPT-2's eager
  attention always intersects it with its own causal ``bias`` buffer, so there a
  mask that lets a query see a later key would be silently narrowed; we refuse it.
* Called without a cache (``past_key_values=None, use_cache=False``, as in
  training), HF treats ``position_ids`` that restart at 0 as *packed sequences*
  and masks across them on its own (``_preprocess_mask_arguments`` calls
  ``find_packed_sequence_indices``). The workbench does not (position ids alone
  leak across prompts), so we always pass a cache, which switches that off.
* ``DynamicCache`` keeps one ``DynamicLayer`` per layer with ``.keys`` / ``.values``
  of shape [B, H_kv, S, D]; its ``reorder_cache`` skips a zero-length cache
  (whose stale batch size then breaks the next ``torch.cat``), so the batch size
  of an empty cache is kept here.

We build plain ``DynamicCache()`` (full ``DynamicLayer``s, created lazily on the
first forward). For sliding-window models (untested here) the model's own mask
would add the window; an explicit ``attn_mask`` replaces that mask entirely.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AttentionInterface, DynamicCache

from refimpl.lm import causal_mask, check_forward_args, check_ids, check_int

SHARED_PREFIX = "refimpl_shared_prefix"  # the attention function below, by its HF name
_SHARED_CACHE: ContextVar = ContextVar("shared_prefix_cache")
PLAIN_HEAD_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")  # logits = lm_head(hidden)


@dataclass(frozen=True)
class HFConfig:
    """The workbench's view of an HF config (names as in ``lm.GPTConfig``)."""
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    head_dim: int

    @classmethod
    def from_hf(cls, config) -> "HFConfig":
        block = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if block is None:
            raise ValueError("the HF config has neither max_position_embeddings nor n_positions")
        n_embd, n_head = config.hidden_size, config.num_attention_heads
        return cls(vocab_size=config.vocab_size, block_size=block, n_layer=config.num_hidden_layers,
                   n_head=n_head, n_embd=n_embd,
                   head_dim=getattr(config, "head_dim", None) or n_embd // n_head)


class HFCache:
    """A ``transformers.DynamicCache`` with the method names of ``lm.KVCache``.

    ``self.dynamic`` is what the HF model reads and grows; its layer ``l`` holds
    ``layers[l].keys`` and ``.values`` of shape [B, H_kv, len(cache), D].
    """

    def __init__(self, batch_size: int, dynamic: DynamicCache | None = None):
        self._batch_size = check_int("batch_size", batch_size, 1)  # known before the first forward writes any keys
        self.dynamic = DynamicCache() if dynamic is None else dynamic

    def __len__(self) -> int:
        return self.dynamic.get_seq_length()

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def _layers(self):
        return [layer for layer in self.dynamic.layers if layer.keys is not None and layer.keys.ndim == 4]

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values so far, [B, H_kv, len, D]."""
        return [(layer.keys, layer.values) for layer in self._layers()]

    def nbytes(self) -> int:
        """Bytes of the keys and values held."""
        return sum(k.nbytes + v.nbytes for k, v in self.kv())

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (speculative rollback)."""
        self.dynamic.crop(check_int("length", length, 0, len(self)))

    def reorder(self, index) -> None:
        """Replace row b by row index[b] (beam search); index may repeat rows or change B."""
        layers = self._layers()
        index = torch.as_tensor(index, dtype=torch.long, device=layers[0].keys.device if layers else None)
        if index.ndim != 1 or len(index) == 0 or not 0 <= int(index.min()) <= int(index.max()) < self.batch_size:
            raise ValueError(f"index must be a non-empty 1-D tensor of rows in [0, {self.batch_size})")
        if len(self) > 0:
            self.dynamic.reorder_cache(index)  # index_select on dim 0 of every layer
        else:  # reorder_cache skips empty layers, whose stale batch size would break the next cat
            self.dynamic = DynamicCache()
        self._batch_size = len(index)

    def extract(self, row: int, start: int, length: int) -> "HFCache":
        """A batch-1 cache holding positions start .. start+length-1 of ``row`` (packing)."""
        check_int("row", row, 0, self.batch_size - 1)
        check_int("start", start, 0)
        check_int("length", length, 0)
        if start + length > len(self):
            raise ValueError(f"positions [{start}, {start + length}) are not all in the cache "
                             f"of length {len(self)}")
        if length == 0:
            return HFCache(1)
        data = [(layer.keys[row:row + 1, :, start:start + length],
                 layer.values[row:row + 1, :, start:start + length]) for layer in self._layers()]
        return HFCache(1, DynamicCache(data))  # DynamicLayer.update copies (torch.cat)

    def split(self) -> list["HFCache"]:
        """One batch-1 cache per row."""
        return [self.extract(b, 0, len(self)) for b in range(self.batch_size)]

    @classmethod
    def stack(cls, caches: list["HFCache"]) -> "HFCache":
        """Concatenate caches of equal length along the batch (inverse of ``split``)."""
        if not caches:
            raise ValueError("caches must not be empty")
        if not all(isinstance(c, HFCache) for c in caches):
            raise TypeError("caches must all be HFCache objects")
        length, total = len(caches[0]), sum(c.batch_size for c in caches)
        if any(len(c) != length for c in caches):
            raise ValueError(f"caches must share one length, got {[len(c) for c in caches]}")
        if length == 0:
            return cls(total)
        layers = [c._layers() for c in caches]
        if len({len(ls) for ls in layers}) != 1:
            raise ValueError("caches must have the same number of layers")
        data = [(torch.cat([ls[i].keys for ls in layers]), torch.cat([ls[i].values for ls in layers]))
                for i in range(len(layers[0]))]
        return cls(total, DynamicCache(data))


def shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None,
                                   dropout=0.0, **kwargs):
    """An HF attention function (``AttentionInterface``): the layer's queries, and its
    new keys and values (RoPE applied, GQA heads not repeated), go to the shared-prefix
    cache of the running forward call; returns [B, T, H, D]."""
    cache = _SHARED_CACHE.get()
    out = cache.attend(module.layer_idx, query, key, value, attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX, shared_prefix_attention_forward)


class _NewKeysOnly(DynamicCache):
    """What the HF model sees as its cache when beams share a prefix: ``update`` hands the new
    keys and values on unchanged (the attention function stores them), and the length counts
    the cached positions, so HF numbers the new ones after them."""

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return len(self.cache)


@contextmanager
def using_shared_prefix_attention(config, cache):
    """Run the model's attention modules with ``shared_prefix_attention_forward`` on ``cache``
    for a while. (GPT-2's LM head does not pass extra keyword arguments down to its layers,
    so the cache travels in a context variable.)"""
    before, token = config._attn_implementation_internal, _SHARED_CACHE.set(cache)
    config._attn_implementation_internal = SHARED_PREFIX
    try:
        yield
    finally:
        config._attn_implementation_internal = before
        _SHARED_CACHE.reset(token)


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the workbench interface of ``lm.TinyGPT``."""

    def __init__(self, hf_model: nn.Module, vocab_major_head: bool = False):
        super().__init__()
        if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
            raise TypeError(f"hf_model must be a transformers causal LM (an nn.Module with a config), "
                            f"got {type(hf_model).__name__}")
        if vocab_major_head and hf_model.config.model_type not in PLAIN_HEAD_FAMILIES:
            raise ValueError(f"vocab_major_head needs a model whose logits are lm_head(hidden) and "
                             f"nothing else, one of {PLAIN_HEAD_FAMILIES}; got "
                             f"{hf_model.config.model_type!r}")
        self.hf, self.vocab_major_head = hf_model, vocab_major_head
        self.config = HFConfig.from_hf(hf_model.config)

    def empty_cache(self, batch_size: int) -> HFCache:
        return HFCache(batch_size)

    def _check_gpt2_eager(self, attn_mask, T, S):
        hf = self.hf.config
        if hf.model_type == "gpt2" and hf._attn_implementation == "eager":
            # GPT-2 eager attention applies module.bias (causal) before adding our mask.
            allowed = attn_mask > torch.finfo(attn_mask.dtype).min / 2
            future = torch.ones(T, S, dtype=torch.bool, device=attn_mask.device).triu(S - T + 1)
            if (allowed & future).any():
                raise ValueError("attn_mask lets a query see a later key, which GPT-2's eager attention "
                                 "would silently forbid; load the model with attn_implementation='sdpa'")

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, last_only=False):
        """Logits [B, T, V] for ``input_ids`` [B, T] after the tokens already in ``cache``
        ([B, 1, V], the last position only, with ``last_only``: HF's ``logits_to_keep=1``)."""
        if cache is not None and not isinstance(cache, HFCache) and not hasattr(cache, "attend"):
            raise TypeError(f"cache must come from empty_cache() (or be a search.SharedPrefixCache), "
                            f"got {type(cache).__name__}")
        B, T, past = check_forward_args(input_ids, position_ids, attn_mask, cache,
                                        self.config.block_size)
        check_ids("input_ids", input_ids, self.config.vocab_size)
        # Always explicit: OPT derives positions from the attention mask when given none, which
        # fails for a 4-D mask; counting on from the cache is what every family does by default.
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        position_ids = position_ids.long().expand(B, T)
        if attn_mask is not None:
            self._check_gpt2_eager(attn_mask, T, past + T)
            dtype = self.hf.dtype  # sdpa wants the mask in the query's dtype
            if attn_mask.dtype != dtype:  # clamp: fp32's minimum becomes -inf in fp16
                attn_mask = attn_mask.to(dtype).clamp_min(torch.finfo(dtype).min)
        keep = 1 if last_only else 0
        if cache is not None and not isinstance(cache, HFCache):
            return self._shared_prefix_forward(input_ids, position_ids, attn_mask, cache, keep)
        # Always hand HF a cache: without one it turns restarting position_ids into a
        # packed-sequence mask (masking_utils._preprocess_mask_arguments).
        dynamic = DynamicCache() if cache is None else cache.dynamic
        return self._logits(input_ids=input_ids, position_ids=position_ids,
                            attention_mask=attn_mask, past_key_values=dynamic, use_cache=True,
                            return_dict=True, logits_to_keep=keep)

    def _shared_prefix_forward(self, input_ids, position_ids, attn_mask, cache, keep):
        """The forward pass with a ``search.SharedPrefixCache``: HF's modules, our attention."""
        T, S = input_ids.shape[1], len(cache) + input_ids.shape[1]
        if attn_mask is None:  # a 4-D mask keeps HF's mask builder away from the cache
            attn_mask = causal_mask(T, S, input_ids.device)[None, None]
        with using_shared_prefix_attention(self.hf.config, cache):
            logits = self._logits(input_ids=input_ids, position_ids=position_ids,
                                  attention_mask=attn_mask, past_key_values=_NewKeysOnly(cache),
                                  use_cache=True, return_dict=True, logits_to_keep=keep)
        cache.advance(T)
        return logits

    def _logits(self, logits_to_keep, **inputs):
        """The HF model's logits; with ``vocab_major_head``, its body's hidden states times the
        output embedding computed as (W h^T)^T, W [V, C]: the same numbers to float rounding,
        and on a CPU BLAS often faster for a few rows and a large vocabulary (chapter 2)."""
        if not self.vocab_major_head:
            return self.hf(**inputs, logits_to_keep=logits_to_keep).logits
        hidden = self.hf.base_model(**inputs).last_hidden_state
        hidden = hidden[:, -logits_to_keep:]  # -0: every position
        head = self.hf.get_output_embeddings()
        # contiguous: reductions over the vocabulary of the transposed product are slow
        logits = (head.weight @ hidden.flatten(0, 1).T).T.contiguous()
        logits = logits.view(*hidden.shape[:2], -1)
        return logits if head.bias is None else logits + head.bias

