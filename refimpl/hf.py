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

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import DynamicCache

from refimpl.lm import check_forward_args, check_ids, check_int


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


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the workbench interface of ``lm.TinyGPT``."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
            raise TypeError(f"hf_model must be a transformers causal LM (an nn.Module with a config), "
                            f"got {type(hf_model).__name__}")
        self.hf = hf_model
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
        if cache is not None and not isinstance(cache, HFCache):
            raise TypeError(f"cache must come from empty_cache(), got {type(cache).__name__}")
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
        # Always hand HF a cache: without one it turns restarting position_ids into a
        # packed-sequence mask (masking_utils._preprocess_mask_arguments).
        dynamic = DynamicCache() if cache is None else cache.dynamic
        out = self.hf(input_ids=input_ids, position_ids=position_ids, attention_mask=attn_mask,
                      past_key_values=dynamic, use_cache=True, return_dict=True,
                      logits_to_keep=1 if last_only else 0)
        return out.logits

