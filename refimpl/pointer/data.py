"""The tasks' data, generated on the fly from a seed: ``sort`` (N uniform floats), ``hull``
(planar convex hull, counter-clockwise from the lowest index, then a stop token), ``tsp``
(optimal tour by Held-Karp, from city 0, direction with tour[1] < tour[-1])."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from refimpl.lm import check_int
from refimpl.pointer.geometry import canonical_tour, check_points, convex_hull
from refimpl.pointer.held_karp import held_karp

TASKS = ("sort", "hull", "tsp")
INPUT_ORDERS = ("random", "angle")
OUTPUT_ORDERS = ("canonical", "random")
TEST_SEED = 20_000  # evaluation instances; training pools use seeds below 10_000
VALIDATION_SEED = 10_000  # held-out instances for the curves during training


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


def tsp_instances(n: int, count: int, seed: int = TEST_SEED) -> torch.Tensor:
    """``count`` uniform TSP instances [count, n, 2] drawn from seed + n: the test set
    (``evaluate``) by default, the validation set with ``VALIDATION_SEED``."""
    return torch.rand(count, n, 2, generator=torch.Generator().manual_seed(seed + n))
