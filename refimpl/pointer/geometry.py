"""Geometry of the tasks: input checks, tour lengths and their canonical form, the planar
convex hull (Andrew's monotone chain) and simple polygons."""
from __future__ import annotations

import numpy as np
import torch


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
