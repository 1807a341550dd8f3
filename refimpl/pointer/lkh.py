"""LKH-3 (Helsgaun 2017) through the ``elkai`` package: near-optimal tours as an outside
reference where Held-Karp cannot go (n = 50). Used to measure gaps, never inside a model."""
from __future__ import annotations

import torch

from refimpl.pointer.geometry import check_points, tour_length

SCALE = 10 ** 7  # LKH takes integer distances: coordinates in [0, 1] keep 7 digits


def lkh_tours(points, runs: int = 10) -> torch.Tensor:
    """LKH's tour [B, n] of each instance of ``points`` [B, n, 2], from city 0."""
    import elkai

    points = check_points(points).double()
    tours = []
    for p in points:
        d = (torch.cdist(p, p) * SCALE).round().long().tolist()
        tours.append(elkai.DistanceMatrix(d).solve_tsp(runs=runs)[:-1])  # it repeats city 0
    return torch.tensor(tours)


def lkh_lengths(points, runs: int = 10) -> torch.Tensor:
    """Length [B] of LKH's tour of each instance."""
    points = check_points(points)
    return tour_length(points, lkh_tours(points, runs))
