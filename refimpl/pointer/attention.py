"""The attention model for the TSP: a transformer encoder over the set of cities and a pointer
decoder, trained without labels.

Kool, van Hoof, Welling, "Attention, Learn to Solve Routing Problems!" (ICLR 2019), section 3:
the encoder is N layers of multi-head attention and a feed-forward layer, each with a skip
connection and normalisation (eq. 2-4), and no positional encoding: the input is a set, so the
node embeddings are permutation-equivariant. The decoder builds the tour one city at a time
from the context (graph embedding, first city, last city; eq. 5), one glimpse of multi-head
attention over the unvisited cities (eq. 6-7), then single-head compatibilities clipped with
C tanh (eq. 8-9, C = 10) and a softmax over the cities not yet visited.
Kwon et al., "POMO" (NeurIPS 2020) decode n trajectories per instance, one from each city: the
decoder here always starts from given cities (``starts``), and the first step is that choice.
Instance normalisation as in POMO (over the cities of one instance, per channel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from refimpl.lm import check_int
from refimpl.pointer.geometry import check_points


@dataclass
class AttentionConfig:
    task: str = "tsp"
    dim: int = 128  # d_h, the embedding width
    layers: int = 3  # N encoder layers
    heads: int = 8  # M, in the encoder and the decoder's glimpse
    ff: int = 512  # feed-forward hidden width
    clip: float = 10.0  # C in C tanh(u)
    kind: str = "attention"  # tells load() which model class the checkpoint holds


def check_attention_config(config: AttentionConfig) -> None:
    """ValueError naming the first field of an ``AttentionConfig`` that is out of range."""
    if config.task != "tsp":
        raise ValueError(f"config.task must be 'tsp' (the attention model routes), got {config.task!r}")
    for name in ("dim", "layers", "heads", "ff"):
        check_int(f"config.{name}", getattr(config, name), 1)
    if config.dim % config.heads:
        raise ValueError(f"config.dim={config.dim} must be a multiple of config.heads={config.heads}")
    if not config.clip > 0:
        raise ValueError(f"config.clip must be > 0, got {config.clip!r}")


class InstanceNorm(nn.Module):
    """Normalise each channel over the cities of one instance (POMO), with a learned scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.InstanceNorm1d(dim, affine=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, n, d]
        return self.norm(h.transpose(1, 2)).transpose(1, 2)


class EncoderLayer(nn.Module):
    """h <- Norm(h + MHA(h)); h <- Norm(h + FF(h)) (Kool et al., eq. 3-4)."""

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = InstanceNorm(dim), InstanceNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Linear(ff, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        return self.norm2(h + self.ff(h))


@dataclass
class Encoded:
    """What the decoder reads at every step, computed once per instance: the node embeddings
    [B, n, d], the graph embedding's share of the query [B, 1, d], the glimpse's keys and values
    [B, M, n, d/M] and the pointer's keys [B, n, d]."""
    nodes: torch.Tensor
    graph_query: torch.Tensor
    glimpse_keys: torch.Tensor
    glimpse_values: torch.Tensor
    pointer_keys: torch.Tensor


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, d] -> [B, M, T, d/M]."""
    B, T, d = x.shape
    return x.view(B, T, heads, d // heads).transpose(1, 2)


def visited_mask(tours: torch.Tensor, n: int) -> torch.Tensor:
    """[B, P, n] True at every city the partial tours [B, P, t] have visited."""
    mask = torch.zeros(*tours.shape[:2], n, dtype=torch.bool, device=tours.device)
    return mask.scatter_(2, tours, True)


class AttentionModel(nn.Module):
    """The parameters; ``encode_cities`` and ``next_city_log_probs`` use them, ``rollout``
    builds tours."""

    has_stop = False

    def __init__(self, config: AttentionConfig | None = None):
        super().__init__()
        self.config = config = config or AttentionConfig()
        check_attention_config(config)
        d = config.dim
        self.embed = nn.Linear(2, d)
        self.layers = nn.ModuleList(EncoderLayer(d, config.heads, config.ff)
                                    for _ in range(config.layers))
        self.context = nn.Linear(3 * d, d, bias=False)  # W^Q of [graph, first, last]
        self.project = nn.Linear(d, 3 * d, bias=False)  # glimpse keys, values, pointer keys
        self.out = nn.Linear(d, d, bias=False)  # W^O of the glimpse


def encode_cities(model: AttentionModel, points: torch.Tensor) -> Encoded:
    """Embed each city on its own, run the encoder layers (no positions: a set in, a set out),
    and project once what every decoding step reads (Kool et al., eq. 1-4)."""
    h = model.embed(points)
    for layer in model.layers:
        h = layer(h)
    M = model.config.heads
    gk, gv, pk = model.project(h).chunk(3, dim=-1)
    graph = h.mean(1, keepdim=True) @ model.context.weight[:, :h.shape[-1]].T
    return Encoded(h, graph, split_heads(gk, M), split_heads(gv, M), pk)


def context_query(model: AttentionModel, enc: Encoded, first: torch.Tensor,
                  last: torch.Tensor) -> torch.Tensor:
    """The query [B, P, d] of P partial tours per instance: W^Q [graph; first city; last city]
    (eq. 5), the graph's share computed once in ``encode_cities``."""
    d = model.config.dim
    index = torch.stack([first, last], -1).flatten(1)[..., None]
    index = index.expand(-1, -1, d)
    ends = enc.nodes.gather(1, index).view(*first.shape, 2 * d)  # [B, P, 2d]
    return enc.graph_query + ends @ model.context.weight[:, d:].T


def glimpse(model: AttentionModel, enc: Encoded, q: torch.Tensor,
            visited: torch.Tensor) -> torch.Tensor:
    """One read of multi-head attention over the cities not yet visited (eq. 6-7): [B, P, d]."""
    d, M = model.config.dim, model.config.heads
    u = split_heads(q, M) @ enc.glimpse_keys.transpose(-1, -2) / math.sqrt(d // M)
    u = u.masked_fill(visited[:, None], -math.inf)  # [B, M, P, n]
    read = torch.softmax(u, -1) @ enc.glimpse_values  # [B, M, P, d/M]
    return model.out(read.transpose(1, 2).flatten(2))


def next_city_log_probs(model: AttentionModel, enc: Encoded, first: torch.Tensor,
                        last: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """log p(next city) [B, P, n] for P partial tours per instance that started at ``first``
    [B, P], stand at ``last`` [B, P] and have ``visited`` [B, P, n]: single-head scores of the
    glimpse against every city, clipped to [-C, C] by C tanh (eq. 8), masked, softmax (eq. 9)."""
    g = glimpse(model, enc, context_query(model, enc, first, last), visited)
    u = g @ enc.pointer_keys.transpose(1, 2) / math.sqrt(model.config.dim)
    u = model.config.clip * torch.tanh(u)
    return torch.log_softmax(u.masked_fill(visited, -math.inf), -1)


def check_starts(starts, points: torch.Tensor) -> torch.Tensor:
    """``starts`` as a LongTensor [B, P] of cities, from an int P (cities 0..P-1, POMO's
    multi-start; P <= n) or a tensor [B, P]; else a ValueError naming it."""
    B, n = points.shape[:2]
    if isinstance(starts, int) and not isinstance(starts, bool):
        if not 1 <= starts <= n:
            raise ValueError(f"starts must be between 1 and n={n} (one trajectory per start "
                             f"city), got {starts}")
        return torch.arange(starts, device=points.device).expand(B, -1)
    if (not isinstance(starts, torch.Tensor) or starts.dim() != 2 or starts.shape[0] != B
            or starts.is_floating_point()):
        raise ValueError(f"starts must be an int or an integer tensor [B={B}, P], got "
                         f"{getattr(starts, 'shape', starts)!r:.80}")
    if starts.numel() and not 0 <= int(starts.min()) <= int(starts.max()) < n:
        raise ValueError(f"starts must hold cities in [0, {n}), got {starts.min()}..{starts.max()}")
    return starts.long()


def rollout(model: AttentionModel, points: torch.Tensor, starts, sample: bool = False,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """P tours per instance, each from its start city: greedy (the most likely next city) or
    sampled. Returns (tours [B, P, n], sum of log-probabilities of the choices after the
    start [B, P])."""
    points = check_points(points)
    starts = check_starts(starts, points)
    n = points.shape[1]
    enc = encode_cities(model, points)
    tours = starts[..., None]
    visited = visited_mask(tours, n)
    total = torch.zeros(starts.shape, device=points.device)
    for _ in range(n - 1):
        logp = next_city_log_probs(model, enc, starts, tours[..., -1], visited)
        if sample:
            flat = logp.exp().flatten(0, 1)
            nxt = torch.multinomial(flat, 1, generator=generator)
            nxt = nxt.view(starts.shape)
        else:
            nxt = logp.argmax(-1)
        total = total + logp.gather(2, nxt[..., None])[..., 0]
        tours = torch.cat([tours, nxt[..., None]], -1)
        visited = visited.scatter(2, nxt[..., None], True)
    return tours, total


def tour_log_prob(model: AttentionModel, points: torch.Tensor, tours: torch.Tensor) -> torch.Tensor:
    """Teacher-forced sum of log p over the choices of given tours [B, P, n] (after the start):
    log p(tour | start), differentiable; ``rollout`` returns the same numbers for its own tours."""
    n = points.shape[1]
    enc = encode_cities(model, points)
    total = torch.zeros(tours.shape[:2], device=points.device)
    for t in range(1, n):
        logp = next_city_log_probs(model, enc, tours[..., 0], tours[..., t - 1],
                                    visited_mask(tours[..., :t], n))
        total = total + logp.gather(2, tours[..., t:t + 1])[..., 0]
    return total


SYMMETRIES = 8  # of the unit square: x <-> 1 - x, y <-> 1 - y, x <-> y (POMO's x8 augmentation)


def augment(points: torch.Tensor) -> torch.Tensor:
    """[8, B, n, 2]: the instance under each symmetry of the unit square; tour lengths are the
    same under all eight (Kwon et al. 2020, section 4.3)."""
    x, y = points[..., :1], points[..., 1:]
    views = [(x, y), (1 - x, y), (x, 1 - y), (1 - x, 1 - y)]
    views += [(b, a) for a, b in views]
    return torch.stack([torch.cat(v, -1) for v in views])


def beam_tours(model: AttentionModel, points: torch.Tensor, beam_size: int,
               first: torch.Tensor) -> torch.Tensor:
    """Beam search from the cities ``first`` [B]: the ``beam_size`` most likely partial tours
    are kept at each step (sum of log-probs); returns the most likely complete tour per
    instance [B, n]."""
    B, n = points.shape[:2]
    enc = encode_cities(model, points)
    tours = first.view(B, 1, 1).to(points.device)
    scores = torch.zeros(B, 1, device=points.device)
    for _ in range(n - 1):
        K = tours.shape[1]
        visited = visited_mask(tours, n)
        logp = next_city_log_probs(model, enc, tours[..., 0], tours[..., -1], visited)
        total = (scores[..., None] + logp).flatten(1)  # [B, K * n], -inf at visited cities
        k = min(beam_size, K * (n - tours.shape[2]))
        scores, flat = total.topk(k, dim=1)
        parent, city = flat // n, flat % n
        tours = torch.cat([tours.gather(1, parent[..., None].expand(-1, -1, tours.shape[2])),
                           city[..., None]], -1)
    return tours[:, 0]


def closed_length(points: torch.Tensor, tours: torch.Tensor) -> torch.Tensor:
    """Length [B, P] of the closed tours [B, P, n] of instances points [B, n, 2]."""
    index = tours[..., None].expand(-1, -1, -1, 2)
    ordered = points[:, None].expand(-1, tours.shape[1], -1, -1).gather(2, index)
    return (ordered - ordered.roll(-1, dims=2)).norm(dim=-1).sum(-1)


@torch.no_grad()
def best_tours(model: AttentionModel, points: torch.Tensor, starts: int = 1,
               symmetries: int = 1, beam_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (or beam) decoding from cities 0..starts-1 on each of ``symmetries`` views of
    every instance (1 or 8, POMO's augmentation); the shortest of those tours per instance:
    (tours [B, n], lengths [B])."""
    if symmetries not in (1, SYMMETRIES):
        raise ValueError(f"symmetries must be 1 or {SYMMETRIES}, got {symmetries!r}")
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    B, n = points.shape[:2]
    views = augment(points)[:symmetries].flatten(0, 1)  # [S * B, n, 2]
    if beam_size == 1:
        tours, _ = rollout(model, views, starts)
    else:  # one beam per (view, start), batched
        P = check_starts(starts, views).shape[1]
        first = torch.arange(P).repeat_interleave(len(views))
        tours = beam_tours(model, views.repeat(P, 1, 1), beam_size, first)
        tours = tours.view(P, len(views), n).transpose(0, 1)
    lengths = closed_length(points.repeat(symmetries, 1, 1), tours)  # [S * B, P]
    lengths = lengths.view(symmetries, B, -1).permute(1, 0, 2).flatten(1)
    tours = tours.view(symmetries, B, *tours.shape[1:]).permute(1, 0, 2, 3).flatten(1, 2)
    best = lengths.argmin(1)
    rows = torch.arange(B)
    return tours[rows, best], lengths[rows, best]


def solve_attention(model: AttentionModel, points, beam_size: int = 1, starts: int | None = None,
                    symmetries: int = 1) -> list[torch.Tensor]:
    """``solve`` for the attention model: the shortest tour from ``starts`` start cities
    (default all n, POMO's inference) on ``symmetries`` views, one LongTensor per instance."""
    points = check_points(points)
    model.eval()
    starts = points.shape[1] if starts is None else starts
    return list(best_tours(model, points, starts, symmetries, beam_size)[0])
