"""Pointer Networks and the Read-Process-Write set encoder, with exact labels for their tasks.

Vinyals, Fortunato, Jaitly, "Pointer Networks" (2015): an LSTM encoder reads the points, an LSTM
decoder emits one input position per step, and the output distribution is the additive
attention itself (eq. 3):  u_j = v^T tanh(W1 e_j + W2 d_i),  p(C_i | C_<i, P) = softmax(u).
Vinyals, Bengio, Kudlur, "Order Matters" (ICLR 2016), section 4: the read-process-write encoder
embeds each element on its own (read), runs P steps of attention with an LSTM that has no input
(process, eq. 3-7), and hands the order-invariant state q*_P to the pointer decoder (write).

Tasks (data generated on the fly from a seed): ``sort`` (N uniform floats), ``hull`` (planar
convex hull, counter-clockwise from the lowest index, then a stop token), ``tsp`` (optimal tour
by Held-Karp, from city 0, direction with tour[1] < tour[-1]).
Train a checkpoint: ``python -m refimpl.pointer train --task tsp --n 10``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from refimpl.lm import check_int

TASKS = ("sort", "hull", "tsp")
INPUT_ORDERS = ("random", "angle")
OUTPUT_ORDERS = ("canonical", "random")
ASSETS = Path(__file__).parent / "assets" / "pointer"
MAX_HELD_KARP_N = 12
TEST_SEED = 20_000  # evaluation instances; training pools use seeds below 10_000


# ----------------------------------------------------------------------------- input checks

def check_points(points, *, dim: int = 2, min_n: int = 3, name: str = "points") -> torch.Tensor:
    """Return ``points`` as a float tensor [B, n, dim], or raise a ValueError naming it."""
    points = torch.as_tensor(points)
    if points.dim() != 3 or points.shape[-1] != dim:
        raise ValueError(f"{name} must be shaped [B, n, {dim}], got {tuple(points.shape)}")
    if not points.is_floating_point():
        points = points.float()
    if points.shape[1] < min_n:
        raise ValueError(f"{name} needs n >= {min_n} points per instance, got n={points.shape[1]}")
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return points


def check_tour(tour, points=None) -> None:
    """ValueError unless ``tour`` [B, n] holds one permutation of 0..n-1 per row (each city once),
    with ``points`` [B, n, d] when given."""
    if not isinstance(tour, torch.Tensor) or tour.dim() != 2 or tour.is_floating_point():
        raise ValueError(f"tour must be an integer tensor [B, n], got {tour!r:.80}")
    if points is not None and (not isinstance(points, torch.Tensor) or points.dim() != 3
                               or points.shape[:2] != tour.shape):
        raise ValueError(f"points must be [B, n, d] with [B, n] = {tuple(tour.shape)} (the tour's "
                         f"shape), got {tuple(getattr(points, 'shape', ()))}")
    n = tour.shape[1]
    if not torch.equal(tour.sort(1).values, torch.arange(n, device=tour.device).expand_as(tour)):
        raise ValueError(f"tour rows must be permutations of 0..{n - 1}: every city exactly once")


def check_indices(points, polygon) -> torch.Tensor:
    """``polygon`` as a LongTensor of indices into ``points`` [n, 2], or a ValueError."""
    n = len(points)
    polygon = torch.as_tensor(polygon)
    if polygon.dim() != 1 or polygon.is_floating_point() or (
            polygon.numel() and not 0 <= int(polygon.min()) <= int(polygon.max()) < n):
        raise ValueError(f"polygon must be a 1-D sequence of point indices in [0, {n}), got "
                         f"{polygon.tolist()!r:.80}")
    return polygon.long()


def check_task_args(task: str, n: int, batch_size: int, input_order: str, output_order: str) -> None:
    """ValueError naming the argument of ``make_batch`` that is out of range or unknown."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_int("n", n, 1 if task == "sort" else 3)
    check_int("batch_size", batch_size, 1)
    if input_order not in INPUT_ORDERS:
        raise ValueError(f"input_order must be one of {INPUT_ORDERS}, got {input_order!r}")
    if output_order not in OUTPUT_ORDERS:
        raise ValueError(f"output_order must be one of {OUTPUT_ORDERS}, got {output_order!r}")


# ----------------------------------------------------------------------------- TSP: exact labels

def tour_length(points: torch.Tensor, tour: torch.Tensor) -> torch.Tensor:
    """Length of each closed tour [B] (the edge back to the start included)."""
    check_tour(tour, points)
    index = tour.long()[..., None].expand(-1, -1, points.shape[-1])
    ordered = points.gather(1, index)
    return (ordered - ordered.roll(-1, dims=1)).norm(dim=-1).sum(-1)


def canonical_tour(tour: torch.Tensor) -> torch.Tensor:
    """Rotate each tour [B, n] to start at city 0 and orient it so that
    tour[1] < tour[-1]."""
    check_tour(tour)
    start = (tour == 0).long().argmax(1, keepdim=True)
    n = tour.shape[1]
    rotated = tour.gather(1, (start + torch.arange(n)) % n)
    flip = rotated[:, 1] > rotated[:, -1]
    rotated[flip, 1:] = rotated[flip, 1:].flip(1)
    return rotated


def check_held_karp_points(points, max_n: int) -> torch.Tensor:
    """``points`` [n, 2] or [B, n, 2] as float64 [B, n, 2], or a ValueError:
    n <= max_n, because the table grows as 2^(n-1) (n-1) entries per
    instance."""
    points = torch.as_tensor(points)
    if points.dim() == 2:
        points = points[None]
    points = check_points(points).double()
    n = points.shape[1]
    if n > max_n:
        raise ValueError(f"points has n={n}; Held-Karp needs 2^(n-1)*(n-1) table entries per "
                         f"instance ({2 ** (n - 1) * (n - 1):,} here) and n-1 times as many "
                         f"operations, so it is limited to n <= max_n={max_n}; pass a larger "
                         f"max_n to run it anyway")
    return points


def held_karp_table(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dp[b, S, j]: shortest path from city 0 through the set S (a bit mask
    of cities 1..n-1), ending at j in S; parent[b, S, j]: the city before
    j on it. d [B, n, n]."""
    B, n, _ = d.shape
    m = n - 1  # cities 1..n-1 are bits 0..m-1
    full = 1 << m
    bit = 1 << torch.arange(m)
    masks = torch.arange(full)
    size = ((masks[:, None] & bit) > 0).sum(1)
    dp = torch.full((B, full, m), math.inf, dtype=torch.float64)
    parent = torch.zeros((B, full, m), dtype=torch.uint8)
    dp[:, bit, torch.arange(m)] = d[:, 0, 1:]
    cost = d[:, 1:, 1:]  # cost[b, i, j] from city i+1 to city j+1
    for k in range(2, m + 1):  # all sets of k cities at once
        S = masks[size == k]
        prev = S[:, None] ^ bit  # S - {j}, meaningful where j is in S
        cand = dp[:, prev, :] + cost.transpose(1, 2)[:, None]  # [B, |S|, j, i]
        best, arg = cand.min(-1)
        inside = (S[:, None] & bit) > 0
        dp[:, S] = best.masked_fill(~inside, math.inf)
        parent[:, S] = arg.to(torch.uint8)
    return dp, parent


def held_karp_tour(dp: torch.Tensor, parent: torch.Tensor,
                   d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Close the cheapest full path back to city 0 and walk the parents back
    to the start: (length [B], canonical tour [B, n])."""
    B, full, m = dp.shape
    length, last = (dp[:, full - 1] + d[:, 1:, 0]).min(-1)
    tour = torch.zeros(B, m + 1, dtype=torch.long)
    S = torch.full((B,), full - 1)
    j = last
    rows = torch.arange(B)
    for pos in range(m, 0, -1):
        tour[:, pos] = j + 1
        i = parent[rows, S, j].long()
        S = S ^ (1 << j)
        j = i
    return length.float(), canonical_tour(tour)


def held_karp(points, max_n: int = MAX_HELD_KARP_N
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal closed tours by the Held-Karp dynamic program (Held and Karp,
    1962), vectorised over the batch.

    dp[S, j] = min_{i in S - j} dp[S - j, i] + d(i, j), filled one subset
    size at a time: 2^(n-1) (n-1) table entries and 2^(n-1) (n-1)^2
    operations per instance, hence ``max_n`` (raise it knowingly; chapter 1
    times n=20). Takes [n, 2] or [B, n, 2]; returns (length [B], tour [B, n])
    in canonical form."""
    points = check_held_karp_points(points, max_n)
    d = torch.cdist(points, points)
    dp, parent = held_karp_table(d)
    return held_karp_tour(dp, parent, d)


# ----------------------------------------------------------------------------- convex hull

def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def convex_hull(points) -> torch.Tensor | list[torch.Tensor]:
    """Hull vertices by Andrew's monotone chain: counter-clockwise, from the
    lowest index.

    Takes [n, 2] (returns a LongTensor) or [B, n, 2] (returns a list of B of
    them). Collinear boundary points are not vertices."""
    points = torch.as_tensor(points)
    single = points.dim() == 2
    pts = check_points(points[None] if single else points).double().numpy()
    hulls = []
    for p in pts:
        order = np.lexsort((p[:, 1], p[:, 0]))
        chain = []
        for sweep in (order, order[::-1]):  # lower hull, then upper hull
            part = []
            for i in sweep:
                while (len(part) >= 2
                       and _cross(p[part[-2]], p[part[-1]], p[i]) <= 0):
                    part.pop()
                part.append(int(i))
            chain += part[:-1]
        start = chain.index(min(chain))
        hulls.append(torch.tensor(chain[start:] + chain[:start]))
    return hulls[0] if single else hulls


def polygon_area(points: torch.Tensor, polygon) -> float:
    """Shoelace area of the polygon visiting ``points[polygon]`` in order (absolute value)."""
    p = points[check_indices(points, polygon)].double()
    return 0.5 * abs(float((p[:, 0] * p[:, 1].roll(-1) - p[:, 1] * p[:, 0].roll(-1)).sum()))


def _segments_cross(a, b, c, d) -> bool:
    """Whether segments ab and cd intersect at a point other than a shared endpoint."""
    d1, d2 = _cross(c, d, a), _cross(c, d, b)
    d3, d4 = _cross(a, b, c), _cross(a, b, d)
    return (d1 > 0) != (d2 > 0) and (d3 > 0) != (d4 > 0)


def edge_crosses(points, path, new) -> bool:
    """Whether the edge path[-1] -> new crosses an earlier, non-adjacent edge of ``path``."""
    a, b = points[path[-1]], points[new]
    for s in range(len(path) - 2):
        if path[s + 1] == new or path[s] == new:
            continue
        if _segments_cross(a, b, points[path[s]], points[path[s + 1]]):
            return True
    return False


def is_simple_polygon(points, polygon) -> bool:
    """A closed polygon is simple: >= 3 distinct vertices and no two non-adjacent edges cross."""
    polygon = check_indices(points, polygon).tolist()
    if len(polygon) < 3 or len(set(polygon)) != len(polygon):
        return False
    points = torch.as_tensor(points).double().tolist()
    m = len(polygon)
    for s in range(m):
        for t in range(s + 2, m):
            if s == 0 and t == m - 1:
                continue  # adjacent through the closing edge
            a, b = points[polygon[s]], points[polygon[(s + 1) % m]]
            c, d = points[polygon[t]], points[polygon[(t + 1) % m]]
            if _segments_cross(a, b, c, d):
                return False
    return True


# ----------------------------------------------------------------------------- datasets

STOP = 0  # hull targets point at slot 0 (a learned stop vector); point j sits at slot j + 1
IGNORE = -100


def angle_order(points: torch.Tensor) -> torch.Tensor:
    """Permutation [B, n] sorting each instance's points by angle around their centroid."""
    points = check_points(points, min_n=1)
    centred = points - points.mean(1, keepdim=True)
    return torch.atan2(centred[..., 1], centred[..., 0]).argsort(1)


def make_batch(task: str, n: int, batch_size: int, generator: torch.Generator,
               input_order: str = "random", output_order: str = "canonical"):
    """One batch of (inputs [B, n, d], targets [B, T]) drawn from ``generator``.

    TSP labels come from Held-Karp here; training uses ``TSPPool`` to pay for them once.
    ``input_order='angle'`` feeds hull points sorted by angle; ``output_order='random'``
    shuffles each hull's vertices (Order Matters, section 5).
    """
    check_task_args(task, n, batch_size, input_order, output_order)
    if task == "sort":
        x = torch.rand(batch_size, n, 1, generator=generator)
        return x, x[..., 0].argsort(1)
    points = torch.rand(batch_size, n, 2, generator=generator)
    if task == "tsp":
        return points, held_karp(points)[1]
    if input_order == "angle":
        points = points.gather(1, angle_order(points)[..., None].expand(-1, -1, 2))
    hulls = convex_hull(points)
    targets = torch.full((batch_size, n + 1), IGNORE)
    for b, h in enumerate(hulls):
        if output_order == "random":
            h = h[torch.randperm(len(h), generator=generator)]
        targets[b, :len(h)] = h + 1
        targets[b, len(h)] = STOP
    return points, targets[:, :max(len(h) for h in hulls) + 1]


class TSPPool:
    """A pool of instances labelled once by Held-Karp, re-used under exact symmetries.

    Relabelling the cities and applying one of the 8 symmetries of the unit square keeps a
    tour optimal, so each draw is a fresh, exactly labelled instance.
    """

    def __init__(self, n: int, size: int, seed: int, chunk: int = 2048, progress: bool = True):
        check_int("size", size, 1)
        check_int("chunk", chunk, 1)
        g = torch.Generator().manual_seed(seed)
        self.points = torch.rand(size, n, 2, generator=g)
        self.tours = torch.cat([held_karp(self.points[i:i + chunk])[1] for i in
                                tqdm(range(0, size, chunk), desc=f"Held-Karp n={n}",
                                     disable=not progress)])

    def sample(self, batch_size: int, generator: torch.Generator):
        check_int("batch_size", batch_size, 1)
        size, n, _ = self.points.shape
        idx = torch.randint(size, (batch_size,), generator=generator)
        points, tours = self.points[idx].clone(), self.tours[idx]
        flip = torch.rand(batch_size, 2, generator=generator) < 0.5
        points = torch.where(flip[:, None], 1 - points, points)
        swap = torch.rand(batch_size, generator=generator) < 0.5
        points[swap] = points[swap].flip(-1)
        perm = torch.rand(batch_size, n, generator=generator).argsort(1)  # new slot -> old city
        inverse = perm.argsort(1)
        return points.gather(1, perm[..., None].expand(-1, -1, 2)), \
            canonical_tour(inverse.gather(1, tours))


# ----------------------------------------------------------------------------- the model

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


# ----------------------------------------------------------------------------- decoding

@torch.no_grad()
def solve(model: PointerNet, points, beam_size: int = 1) -> list[torch.Tensor]:
    """Decode each instance; beam_size=1 is greedy. Returns one LongTensor of
    indices each.

    The beam keeps only valid outputs: with ``mask_chosen`` every input at
    most once (a permutation for sort and TSP); for hulls a simple closed
    polygon of >= 3 vertices (no new edge may cross an earlier one; the stop
    token closes the polygon)."""
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got "
                         f"{beam_size!r}")
    cfg = model.config
    min_n = 1 if cfg.task == "sort" else 3
    x = check_points(points, dim=cfg.input_dim, min_n=min_n)
    model.eval()
    return [_beam_one(model, x[b:b + 1], beam_size) for b in range(x.shape[0])]


def chosen_slots(paths: list[list[int]], slots: int, off: int,
                 mask_chosen: bool) -> torch.Tensor:
    """mask [len(paths), slots]: True at the slot of every input a path has
    already chosen (input i sits at slot i + off); all False for a model
    trained without the mask."""
    chosen = torch.zeros(len(paths), slots, dtype=torch.bool)
    if mask_chosen:
        for r, path in enumerate(paths):
            chosen[r, [i + off for i in path]] = True
    return chosen


def hull_allowed(pts: list, paths: list[list[int]],
                 allowed: torch.Tensor) -> torch.Tensor:
    """Keep every hull hypothesis a simple polygon: no new edge may cross an
    earlier one, and the stop token (closing the polygon) needs >= 3
    vertices and a closing edge that crosses nothing. ``allowed`` [paths,
    1 + n] is updated in place and returned."""
    for r, path in enumerate(paths):
        closes = len(path) >= 3 and not edge_crosses(pts, path, path[0])
        allowed[r, STOP] = closes
        for j in range(len(pts)):
            if path and allowed[r, j + 1] and edge_crosses(pts, path, j):
                allowed[r, j + 1] = False
    return allowed


def beam_select(top, slots: int, paths: list[list[int]], K: int, has_stop: bool,
                finished: list) -> tuple[list, list, list]:
    """From the top-2K (score, flat index) candidates, the K best live
    extensions as (paths, scores, parent rows); a hull closed by the stop
    token goes to ``finished``."""
    off = int(has_stop)
    new_paths, new_scores, rows = [], [], []
    for s, flat in zip(top.values.tolist(), top.indices.tolist()):
        r, slot = divmod(flat, slots)
        if has_stop and slot == STOP:
            finished.append((s, paths[r]))
            continue
        if len(new_paths) < K:
            new_paths.append(paths[r] + [slot - off])
            new_scores.append(s)
            rows.append(r)
    return new_paths, new_scores, rows


def best_path(paths: list, scores: torch.Tensor, finished: list,
              has_stop: bool) -> torch.Tensor:
    """The answer: the best closed hull (or the best live path if none
    closed), else the best full path."""
    if has_stop:
        if not finished:
            return torch.tensor(paths[0])
        return torch.tensor(max(finished, key=lambda f: f[0])[1])
    return torch.tensor(paths[int(scores.argmax())])


def _beam_one(model: PointerNet, x: torch.Tensor, K: int) -> torch.Tensor:
    """Beam search for one instance, hypotheses batched; score = sum of
    log-probs."""
    n, off = x.shape[1], int(model.has_stop)
    keys, inputs, (h, c) = model.encode(x)
    pts = x[0].double().tolist()
    paths, scores, finished = [[]], torch.zeros(1), []
    dec_in = model.start.expand(1, 1, -1)
    for step in range(n + off):
        d, (h, c) = model.decoder(dec_in, (h, c))
        chosen = chosen_slots(paths, keys.shape[1], off,
                              model.config.mask_chosen)
        k = keys.expand(len(paths), -1, -1)
        q = model.query(k, d[:, 0], chosen)
        logp = pointer_log_probs(k, q, model.v, chosen)
        allowed = ~chosen
        if model.has_stop:
            allowed = hull_allowed(pts, paths, allowed)
        total = (scores[:, None] + logp).masked_fill(~allowed, -math.inf)
        top = total.flatten().topk(min(2 * K, int(allowed.sum())))
        new_paths, new_scores, rows = beam_select(top, keys.shape[1], paths, K,
                                                  model.has_stop, finished)
        best_finished = max((f[0] for f in finished), default=-math.inf)
        if not new_paths or max(new_scores) <= best_finished:
            # log-probs are <= 0: no live hypothesis can overtake the best
            # finished one
            break
        paths, scores = new_paths, torch.tensor(new_scores)
        h, c = h[:, rows], c[:, rows]
        dec_in = inputs[0, [p[-1] + off for p in paths]][:, None]
    return best_path(paths, scores, finished, model.has_stop)


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def evaluate(task: str, model: PointerNet, n: int, num_instances: int = 1000, seed: int = TEST_SEED,
             beam_size: int = 1, optimal: torch.Tensor | None = None, **data) -> dict:
    """Decode fresh instances (seed disjoint from training) and score them.

    sort: exact-sequence accuracy. hull: exact accuracy (the true hull up to rotation), area
    coverage (predicted area / hull area, 0 when the polygon is not simple), and vertex-set
    accuracy. tsp: mean tour length (closing edge included), Held-Karp optimum, optimality gap;
    pass ``optimal`` lengths for n > 12. A prediction that is not a permutation is a failure.
    """
    if task != model.config.task:
        raise ValueError(f"task={task!r} but the model was trained for {model.config.task!r}")
    check_int("n", n, 1 if task == "sort" else 3)
    check_int("num_instances", num_instances, 1)
    g = torch.Generator().manual_seed(seed + n)
    if task == "tsp":
        x = torch.rand(num_instances, n, 2, generator=g)
        targets = None
        if optimal is None and n <= MAX_HELD_KARP_N:
            optimal, targets = held_karp(x)
        elif optimal is None:  # one instance at a time: the table is 2^(n-1) (n-1) per instance
            optimal = torch.cat([held_karp(p[None], max_n=n)[0] for p in
                                 tqdm(x, desc=f"Held-Karp n={n}", leave=False)])
    else:
        x, targets = make_batch(task, n, num_instances, g, **data)
    preds = solve(model, x, beam_size)
    out = {"task": task, "n": n, "num_instances": num_instances, "seed": seed + n,
           "beam_size": beam_size}
    if task == "sort":
        out["accuracy"] = float(np.mean([len(p) == n and bool((p == t).all())
                                         for p, t in zip(preds, targets)]))
        return out
    if task == "tsp":
        valid = [sorted(p.tolist()) == list(range(n)) for p in preds]
        lengths = torch.tensor([float(tour_length(x[b:b + 1], p[None])) if ok else math.inf
                                for b, (p, ok) in enumerate(zip(preds, valid))])
        out.update(valid=float(np.mean(valid)), mean_length=float(lengths.mean()),
                   mean_optimal=float(optimal.mean()),
                   gap=float(lengths.mean() / optimal.mean() - 1))
        if targets is not None:
            out["exact_accuracy"] = float(np.mean([ok and bool((canonical_tour(p[None])[0] == t).all())
                                                   for p, t, ok in zip(preds, targets, valid)]))
        return out
    exact, cover, same_set = [], [], []
    for b, p in enumerate(preds):
        true = targets[b][targets[b] > 0] - 1
        same_set.append(sorted(p.tolist()) == sorted(true.tolist()))
        simple = is_simple_polygon(x[b], p)
        cover.append(polygon_area(x[b], p) / polygon_area(x[b], true) if simple else 0.0)
        exact.append(simple and same_set[-1] and _same_cycle(p.tolist(), true.tolist()))
    out.update(accuracy=float(np.mean(exact)), area_coverage=float(np.mean(cover)),
               set_accuracy=float(np.mean(same_set)),
               failures=float(np.mean([c == 0.0 for c in cover])))
    return out


def _same_cycle(a: list, b: list) -> bool:
    """Whether closed polygons a and b are the same cycle, up to rotation and direction."""
    if len(a) != len(b) or not a:
        return False
    k = a.index(b[0]) if b[0] in a else -1
    if k < 0:
        return False
    rot = a[k:] + a[:k]
    return rot == b or [rot[0]] + rot[1:][::-1] == b


# ----------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    task: str = "tsp"
    n: int = 10
    n_max: int | None = None  # train on sizes n..n_max (one size per batch)
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 5e-5
    hidden: int = 128
    encoder: str = "lstm"
    process_steps: int = 5
    mask_chosen: bool = True
    glimpses: int = 0
    input_order: str = "random"  # hull only: "random" or "angle"
    output_order: str = "canonical"  # hull only: "canonical" or "random"
    pool_size: int = 100_000  # TSP: Held-Karp labelled instances per size
    seed: int = 0
    eval_every: int = 500
    eval_instances: int = 500


def check_train_config(cfg: TrainConfig) -> None:
    """ValueError naming the first field of a ``TrainConfig`` that is out of range."""
    check_int("n", cfg.n, 1 if cfg.task == "sort" else 3)
    if cfg.n_max is not None:
        check_int("n_max", cfg.n_max, cfg.n)
    for name in ("steps", "batch_size", "eval_every", "eval_instances", "pool_size"):
        check_int(name, getattr(cfg, name), 1)
    if not 0 < cfg.min_lr <= cfg.lr:
        raise ValueError(f"lr and min_lr must satisfy 0 < min_lr <= lr, got lr={cfg.lr!r}, "
                         f"min_lr={cfg.min_lr!r}")
    check_task_args(cfg.task, cfg.n, cfg.batch_size, cfg.input_order, cfg.output_order)


def _validation(task: str, model: PointerNet, n: int, cfg: TrainConfig) -> dict:
    """Greedy metrics on held-out instances (seed 10_000, disjoint from training and test)."""
    data = {} if task != "hull" else {"input_order": cfg.input_order}
    r = evaluate(task, model, n, cfg.eval_instances, seed=10_000, **data)
    model.train()
    keys = {"tsp": ["gap"], "sort": ["accuracy"], "hull": ["accuracy", "set_accuracy", "area_coverage"]}
    return {k: round(r[k], 4) for k in keys[task]}


def train(cfg: TrainConfig, progress: bool = True) -> tuple[PointerNet, dict]:
    """Teacher-forced NLL with Adam, cosine learning-rate decay and gradient clipping at 2."""
    check_train_config(cfg)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    sizes = list(range(cfg.n, (cfg.n_max or cfg.n) + 1))
    model = PointerNet(PointerConfig(cfg.task, cfg.hidden, cfg.encoder, cfg.process_steps,
                                     cfg.mask_chosen, cfg.glimpses))
    pools = {n: TSPPool(n, cfg.pool_size, seed=cfg.seed * 100 + n, progress=progress)
             for n in sizes} if cfg.task == "tsp" else {}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, start, running = [], time.time(), None
    bar = tqdm(range(1, cfg.steps + 1), desc=f"train {cfg.task}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * step / cfg.steps))
        n = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        if cfg.task == "tsp":
            x, y = pools[n].sample(cfg.batch_size, g)
        else:
            x, y = make_batch(cfg.task, n, cfg.batch_size, g, cfg.input_order, cfg.output_order)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = _validation(cfg.task, model, sizes[-1], cfg)
            history.append({"step": step, "loss": round(running, 4), **val,
                            "seconds": round(time.time() - start, 1)})
            bar.set_postfix(loss=f"{running:.3f}", **val)
    record = {"train": asdict(cfg), "model": asdict(model.config), "history": history,
              "train_seconds": round(time.time() - start, 1),
              "params": sum(p.numel() for p in model.parameters())}
    return model.eval(), record


def save(model: PointerNet, record: dict, name: str, out_dir: Path = ASSETS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state": state}, out_dir / f"{name}.pt")
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return out_dir / f"{name}.pt"


def checkpoint_name(task: str, n, variant: str = "") -> str:
    """``tsp10``, ``tsp5-10``, ``sort10_rpw5_10k``: the file stem in ``refimpl/assets/pointer``."""
    return f"{task}{n}" + (f"_{variant}" if variant else "")


def load(task: str, n, variant: str = "", path: Path | None = None) -> PointerNet:
    """A committed checkpoint, e.g. ``load("tsp", 10)``, ``load("tsp", "5-10")``,
    ``load("sort", 10, "rpw5_10k")``. Weights are stored in half precision, run in float32."""
    name = checkpoint_name(task, n, variant)
    path = path or ASSETS / f"{name}.pt"
    if not Path(path).exists():
        raise ValueError(f"no checkpoint {name!r} (task={task!r}, n={n!r}, variant={variant!r}); "
                         f"committed: {committed('pt')}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = PointerNet(PointerConfig(**blob["config"]))
    model.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return model.eval()


def record_of(task: str, n, variant: str = "") -> dict:
    """The JSON written beside a checkpoint (training command, curve, evaluations)."""
    path = ASSETS / f"{checkpoint_name(task, n, variant)}.json"
    if not path.exists():
        raise ValueError(f"no record {path.stem!r} (task={task!r}, n={n!r}, variant={variant!r}); "
                         f"committed: {committed('json')}")
    return json.loads(path.read_text())


def committed(suffix: str) -> list[str]:
    """Stems of the committed ``refimpl/assets/pointer/*.{suffix}`` files."""
    return sorted(p.stem for p in ASSETS.glob(f"*.{suffix}"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m refimpl.pointer")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a checkpoint, evaluate it, write .pt and .json")
    for field, default in asdict(TrainConfig()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            t.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            t.add_argument(flag, type=int if field in ("n_max",) else type(default), default=default)
    t.add_argument("--name", required=True)
    t.add_argument("--no-save", action="store_true", help="write only the JSON record")
    e = sub.add_parser("evaluate", help="re-run the test evaluation of a committed checkpoint")
    e.add_argument("--name", required=True)
    for a in (t, e):
        a.add_argument("--threads", type=int, default=1)
        a.add_argument("--test-instances", type=int, default=1000)
        a.add_argument("--beam", type=int, default=[1], nargs="+")
        a.add_argument("--test-n", type=int, default=None, nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        model = load("", "", path=ASSETS / f"{args.name}.pt")
        record = json.loads((ASSETS / f"{args.name}.json").read_text())
        cfg = TrainConfig(**record["train"])
    else:
        cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
        model, record = train(cfg)
        record["command"] = "python -m refimpl.pointer " + " ".join(argv or sys.argv[1:])
    record["test"] = []
    data = {"input_order": cfg.input_order} if cfg.task == "hull" else {}
    for n in args.test_n or [cfg.n_max or cfg.n]:
        optimal = None
        for beam in args.beam:
            r = evaluate(cfg.task, model, n, args.test_instances, beam_size=beam,
                         optimal=optimal, **data)
            if cfg.task == "tsp" and n > MAX_HELD_KARP_N:
                optimal = torch.full((args.test_instances,), r["mean_optimal"])  # computed once
            print(json.dumps(r))
            record["test"].append(r)
    if args.command == "evaluate":
        (ASSETS / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    elif args.no_save:
        ASSETS.mkdir(parents=True, exist_ok=True)
        (ASSETS / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    else:
        save(model, record, args.name)


if __name__ == "__main__":
    main()
