"""A recurrent draft model: an LSTM language model that drafts at a few operations per token.

A one-token step of the two-layer transformer draft on a CPU makes about a hundred torch calls
(four products, attention, two LayerNorms, GELU and the cache writes per layer, and the views
between them), each a few microseconds of fixed cost around products that are hardly longer: the
step costs about a seventh of the target's although the model is a tenth of its size (chapter 5).
An LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000) carries its whole
past in two vectors, so a step is two products, the gates and the head: about thirty calls,
whatever the context length.

``LSTMDraft`` has the workbench model's interface for what a drafter needs
(``model(input_ids, cache=cache, last_only=True)``, ``empty_cache``, ``config.vocab_size`` and
``config.block_size``), so ``speculative.DraftModel`` drafts with it unchanged. Its "cache" is
``StateCache``: the state after every position, so rolling back to an accepted prefix is
``crop``, as for a KV cache. It trains with ``python -m refimpl.train --preset draft_lstm``
(distilled from the target, like ``draft_distilled``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl.lm import check_forward_args, check_ids, check_int


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int
    block_size: int  # the longest sequence it drafts for: the StateCache's capacity
    n_layer: int
    n_embd: int  # the width of the embedding and of every layer's state


def check_lstm_config(config: LSTMConfig) -> None:
    """ValueError naming the first field of ``config`` out of range."""
    for name in ("vocab_size", "block_size", "n_layer", "n_embd"):
        check_int(f"config.{name}", getattr(config, name), 1)


class StateCache:
    """The LSTM's state (h, c) of every layer after each position.

    ``h`` and ``c`` are [capacity + 1, n_layer, B, H]; slot 0 is the zero state before the first
    token and slot p the state after p tokens, so ``crop(length)`` rolls back by forgetting the
    later slots, with nothing recomputed.
    """

    def __init__(self, n_layer, batch_size, hidden, capacity, dtype=torch.float32, device=None):
        for name, size in (("n_layer", n_layer), ("batch_size", batch_size), ("hidden", hidden),
                           ("capacity", capacity)):
            check_int(name, size, 1)
        self.h = torch.zeros(capacity + 1, n_layer, batch_size, hidden, dtype=dtype, device=device)
        self.c = torch.zeros_like(self.h)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int:
        return self.h.shape[2]

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (speculative rollback)."""
        self.length = check_int("length", length, 0, self.length)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step (torch.nn.LSTM's equations and gate order i, f, g, o): returns (h, c)."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def check_lstm_inputs(position_ids, attn_mask, cache) -> None:
    """ValueError for positions or a mask (an LSTM reads every row from its first token, so it
    cannot take a left-padded batch), TypeError for a cache not from ``empty_cache``."""
    for name, value in (("position_ids", position_ids), ("attn_mask", attn_mask)):
        if value is not None:
            raise ValueError(f"{name} must be None: LSTMDraft reads every row from its first "
                             f"token (no left-padded batches; draft for one prompt at a time)")
    if cache is not None and not isinstance(cache, StateCache):
        raise TypeError(f"cache must come from LSTMDraft.empty_cache(), got {type(cache).__name__}")


def lstm_steps(model, x, cache: StateCache) -> torch.Tensor:
    """x [B, T, H] (embedded tokens after ``len(cache)`` positions) token by token through
    every layer's ``lstm_cell``, each new state stored in the next slot; the top layer's h
    [B, T, H]."""
    out = []
    for t in range(x.shape[1]):
        p, h = cache.length, x[:, t]
        for layer in range(model.config.n_layer):
            h, c = lstm_cell(h, cache.h[p, layer], cache.c[p, layer], *model.layer_weights(layer))
            cache.h[p + 1, layer], cache.c[p + 1, layer] = h, c
        cache.length = p + 1
        out.append(h)
    return torch.stack(out, dim=1)


class LSTMDraft(nn.Module):
    """Embedding, ``n_layer`` LSTM layers, a linear head. Without a cache the whole sequence goes
    through ``torch.nn.LSTM`` (training); with one, token by token (``lstm_steps``)."""
    arch = "lstm"  # what refimpl.lm.save records, so that load rebuilds this class

    def __init__(self, config: LSTMConfig):
        super().__init__()
        check_lstm_config(config)
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.lstm = nn.LSTM(config.n_embd, config.n_embd, config.n_layer, batch_first=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_cache(self, batch_size: int) -> StateCache:
        c, w = self.config, self.tok_emb.weight
        return StateCache(c.n_layer, batch_size, c.n_embd, c.block_size, w.dtype, w.device)

    def layer_weights(self, layer: int) -> list[torch.Tensor]:
        return [getattr(self.lstm, f"{name}_l{layer}")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, last_only=False):
        """Logits [B, T, V] (or [B, 1, V] with ``last_only``); position_ids and attn_mask must
        be None (``check_lstm_inputs``)."""
        check_lstm_inputs(position_ids, attn_mask, cache)
        check_forward_args(input_ids, None, None, cache, self.config.block_size)
        check_ids("input_ids", input_ids, self.config.vocab_size)
        x = self.tok_emb(input_ids)
        out = self.lstm(x)[0] if cache is None else lstm_steps(self, x, cache)
        return self.lm_head(out[:, -1:] if last_only else out)
