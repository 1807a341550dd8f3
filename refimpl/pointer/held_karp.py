"""Exact TSP tours by the Held-Karp dynamic program (Held and Karp, 1962): the labels of
chapter 1's supervised models and the optimum their gaps are measured against."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from refimpl.pointer.geometry import canonical_tour, check_points

MAX_HELD_KARP_N = 12


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


def held_karp_lengths(points: torch.Tensor) -> torch.Tensor:
    """Optimal lengths [B] of instances [B, n, 2], one instance at a time, for n where a batch's
    table of 2^(n-1) (n-1) entries per instance would not fit (``evaluate`` batches up to
    MAX_HELD_KARP_N); about 3 s an instance at n = 20."""
    n = points.shape[1]
    return torch.cat([held_karp(p[None], max_n=n)[0] for p in
                      tqdm(points, desc=f"Held-Karp n={n}", leave=False)])
