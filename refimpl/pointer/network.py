"""The Pointer Network and the Read-Process-Write set encoder.

Vinyals, Fortunato, Jaitly, "Pointer Networks" (2015): an LSTM encoder reads the points, an LSTM
decoder emits one input position per step, and the output distribution is the additive
attention itself (eq. 3):  u_j = v^T tanh(W1 e_j + W2 d_i),  p(C_i | C_<i, P) = softmax(u).
Vinyals, Bengio, Kudlur, "Order Matters" (ICLR 2016), section 4: the read-process-write encoder
embeds each element on its own (read), runs P steps of attention with an LSTM that has no input
(process, eq. 3-7), and hands the order-invariant state q*_P to the pointer decoder (write).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl.lm import check_int
from refimpl.pointer.data import IGNORE, STOP, TASKS


@dataclass
class PointerConfig:
    task: str = "tsp"
    hidden: int = 128
    encoder: str = "lstm"  # "lstm" (Pointer Networks) or "rpw" (read-process-write)
    process_steps: int = 5  # P, for the rpw encoder
    mask_chosen: bool = True  # forbid re-pointing at an input already chosen
    glimpses: int = 0  # attention reads of the keys before pointing (Order Matters; Bello et al. 2016)

    @property
    def input_dim(self) -> int:
        return 1 if self.task == "sort" else 2


def check_pointer_config(config: "PointerConfig") -> None:
    """ValueError naming the first field of a ``PointerConfig`` that is out of range."""
    if config.task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {config.task!r}")
    if config.encoder not in ("lstm", "rpw"):
        raise ValueError(f"config.encoder must be 'lstm' or 'rpw', got {config.encoder!r}")
    check_int("config.hidden", config.hidden, 1)
    check_int("config.process_steps", config.process_steps, 0)
    check_int("config.glimpses", config.glimpses, 0)


def check_pointer_args(keys, query, v, mask=None) -> None:
    """TypeError/ValueError for ``pointer_log_probs``: float keys [..., n, H], query [..., H] and
    v [H] that broadcast, a bool mask [..., n] that leaves every row a position to choose."""
    for name, t in (("keys", keys), ("query", query), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if keys.dim() < 2 or v.dim() != 1 or query.dim() < 1 or not keys.shape[-1] == query.shape[-1] == len(v):
        raise ValueError(f"keys [..., n, H], query [..., H] and v [H] must share H; got "
                         f"{tuple(keys.shape)}, {tuple(query.shape)} and {tuple(v.shape)}")
    try:
        rows = torch.broadcast_shapes(keys.shape[:-2], query.shape[:-1]) + keys.shape[-2:-1]
    except RuntimeError:
        raise ValueError(f"query {tuple(query.shape)} does not broadcast with keys "
                         f"{tuple(keys.shape)} (leading dims)") from None
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may not be chosen), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    try:
        mask = mask.expand(rows)
    except RuntimeError:
        raise ValueError(f"mask must broadcast to [..., n] = {tuple(rows)}, got {tuple(mask.shape)}") from None
    if mask.all(-1).any():
        raise ValueError("mask forbids every position of a row: its log-softmax would be NaN")


def check_targets(model: "PointerNet", x, targets) -> None:
    """ValueError for teacher forcing: x [B, n, input_dim] and targets [B, T] of slots in
    [0, slots) or IGNORE (hull: slot 0 is the stop token)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != model.config.input_dim:
        raise ValueError(f"x must be [B, n, {model.config.input_dim}], got {tuple(getattr(x, 'shape', ()))}")
    slots = x.shape[1] + model.has_stop
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.is_floating_point() \
            or targets.shape[0] != x.shape[0] or targets.shape[1] < 1:
        raise ValueError(f"targets must be an integer tensor [B={x.shape[0]}, T >= 1], got "
                         f"{tuple(getattr(targets, 'shape', ()))}")
    if ((targets != IGNORE) & ((targets < 0) | (targets >= slots))).any():
        raise ValueError(f"targets must hold slots in [0, {slots}) or IGNORE={IGNORE}")


def pointer_log_probs(keys: torch.Tensor, query: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax_j(u_j), u_j = v^T tanh(keys_j + query) (Pointer Networks,
    eq. 3).

    keys [..., n, H] (= W1 e_j), query [..., H] (= W2 d_i), v [H]; mask [...,
    n] is True where a position may not be chosen (its log-probability is
    -inf)."""
    check_pointer_args(keys, query, v, mask)
    u = torch.tanh(keys + query[..., None, :]) @ v
    if mask is not None:
        u = u.masked_fill(mask, -math.inf)
    return torch.log_softmax(u, dim=-1)


class PointerLayers(nn.Module):
    """The parameters of a Ptr-Net (Vinyals et al. 2015): read, encode (an
    LSTM, or the read-process-write block of Order Matters), decode, point
    (W1, W2, v), and the glimpse."""

    def __init__(self, config: PointerConfig):
        super().__init__()
        check_pointer_config(config)
        self.config = config
        H = config.hidden
        self.read = nn.Sequential(nn.Linear(config.input_dim, H), nn.ReLU(),
                                  nn.Linear(H, H))
        if config.encoder == "lstm":
            self.encoder = nn.LSTM(H, H, batch_first=True)
        else:
            self.process = nn.LSTMCell(2 * H, H)
            self.init_h = nn.Linear(2 * H, H)
        self.decoder = nn.LSTM(H, H, batch_first=True)
        # first decoder input
        self.start = nn.Parameter(torch.zeros(H).uniform_(-0.1, 0.1))
        # hull's "done" slot
        self.stop = nn.Parameter(torch.zeros(H).uniform_(-0.1, 0.1))
        self.W1 = nn.Linear(H, H, bias=False)
        self.W2 = nn.Linear(H, H)
        bound = 1 / math.sqrt(H)
        self.v = nn.Parameter(torch.zeros(H).uniform_(-bound, bound))
        if config.glimpses:
            self.Wg = nn.Linear(H, H)
            self.vg = nn.Parameter(torch.zeros(H).uniform_(-bound, bound))

    @property
    def has_stop(self) -> bool:
        return self.config.task == "hull"


def process_set(process: nn.LSTMCell, init_h: nn.Linear, m: torch.Tensor,
                steps: int):
    """Order Matters eq. 3-7: q_t = LSTM(q*_{t-1}); a = softmax(m . q_t); r_t
    = sum_j a_j m_j; q*_t = [q_t, r_t]. Returns the decoder's initial
    state (h0, c0), each [1, B, H]."""
    B, _, H = m.shape
    h = c = m.new_zeros(B, H)
    q_star = m.new_zeros(B, 2 * H)
    for _ in range(steps):
        h, c = process(q_star, (h, c))
        a = torch.softmax(m @ h[..., None], dim=1)  # [B, n, 1]
        q_star = torch.cat([h, (a * m).sum(1)], -1)
    return torch.tanh(init_h(q_star))[None], c[None]


def teacher_forcing_mask(targets: torch.Tensor, slots: int,
                         has_stop: bool) -> torch.Tensor:
    """mask [B, T, slots]: True where step i may not point at slot j because
    an earlier step chose it (the stop slot stays open; nothing is masked
    by padding)."""
    B = targets.shape[0]
    prev = targets[:, :-1].clamp(min=0)
    chosen = F.one_hot(prev, slots).cumsum(1).bool()
    # none after padding
    chosen &= (targets[:, :-1] >= 0)[..., None].cummin(1).values
    mask = torch.cat([chosen.new_zeros(B, 1, slots), chosen], 1)
    if has_stop:
        mask[..., STOP] = False
    return mask


class PointerSteps(PointerLayers):
    """The two pieces that teacher forcing and decoding share: encode the inputs
    once, and turn a decoder state into the pointer's query."""

    def encode(self, x: torch.Tensor):
        """Return (keys [B, slots, H], decoder inputs per slot [B, slots, H],
        (h0, c0))."""
        m = self.read(x)  # [B, n, H]
        if self.config.encoder == "lstm":
            memory, state = self.encoder(m)
        else:
            state = process_set(self.process, self.init_h, m,
                                self.config.process_steps)
            memory = m
        if self.has_stop:
            stop = self.stop.expand(x.shape[0], 1, -1)
            memory, m = torch.cat([stop, memory], 1), torch.cat([stop, m], 1)
        return self.W1(memory), m, state

    def query(self, keys: torch.Tensor, d: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """The pointer's query W2 q, q = d_i plus one attention read per
        glimpse: q += sum_j softmax_j(vg^T tanh(keys_j + Wg q)) keys_j.
        Residual, so that the decoder state still reaches the pointer at
        initialisation (a pure glimpse query trained to a uniform pointer
        in our runs)."""
        q = d
        for _ in range(self.config.glimpses):
            a = pointer_log_probs(keys, self.Wg(q), self.vg, mask).exp()
            q = q + (a[..., None] * keys).sum(-2)
        return self.W2(q)


class PointerNet(PointerSteps):
    """Ptr-Net (Vinyals et al. 2015) with an LSTM or a read-process-write
    (Order Matters) encoder: teacher-forced log-probs and loss."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: log-probs [B, T, slots] of every step given the
        true prefix."""
        check_targets(self, x, targets)
        keys, inputs, state = self.encode(x)
        prev = targets[:, :-1, None].clamp(min=0)
        prev = prev.expand(-1, -1, inputs.shape[-1])
        start = self.start.expand(len(x), 1, -1)
        dec_in = torch.cat([start, inputs.gather(1, prev)], 1)
        d, _ = self.decoder(dec_in, state)
        mask = None
        if self.config.mask_chosen:
            mask = teacher_forcing_mask(targets, keys.shape[1], self.has_stop)
        keys = keys[:, None]  # the same keys at every step
        return pointer_log_probs(keys, self.query(keys, d, mask), self.v, mask)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = self(x, targets)
        return F.nll_loss(logp.flatten(0, 1), targets.flatten(),
                          ignore_index=IGNORE)
