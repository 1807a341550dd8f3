"""Chapter 1: exact labels against brute force, the model against its own step-by-step decode,
beam search against exhaustive enumeration, and the committed checkpoints against the targets."""
import itertools
import math

import pytest
import torch

from refimpl.pointer import (IGNORE, STOP, PointerConfig, PointerNet, TrainConfig, TSPPool, angle_order,
                             canonical_tour, check_held_karp_points, check_points, chosen_slots,
                             convex_hull, evaluate, held_karp, held_karp_table, is_simple_polygon, load,
                             make_batch, pointer_log_probs, polygon_area, record_of, solve,
                             teacher_forcing_mask, tour_length, train)


def brute_force_tour(points):
    n = points.shape[0]
    best = min(itertools.permutations(range(1, n)),
               key=lambda p: float(tour_length(points[None], torch.tensor([[0, *p]]))))
    return float(tour_length(points[None], torch.tensor([[0, *best]]))), [0, *best]


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_held_karp_equals_brute_force(n):
    pts = torch.rand(8, n, 2, generator=torch.Generator().manual_seed(n))
    length, tour = held_karp(pts)
    for b in range(8):
        best, best_tour = brute_force_tour(pts[b])
        assert length[b].item() == pytest.approx(best, abs=1e-5)
        assert tour_length(pts[b:b + 1], tour[b:b + 1]).item() == pytest.approx(best, abs=1e-5)
        assert tour[b, 0] == 0 and tour[b, 1] < tour[b, -1]  # canonical start and direction
        assert sorted(tour[b].tolist()) == list(range(n))


def test_held_karp_refuses_large_n_unless_asked():
    pts = torch.rand(1, 13, 2)
    with pytest.raises(ValueError, match="max_n"):
        held_karp(pts)
    length, tour = held_karp(pts, max_n=13)
    assert sorted(tour[0].tolist()) == list(range(13))
    # Exchanging two cities never shortens an optimal tour (a cheap local optimality check).
    for i, j in itertools.combinations(range(1, 13), 2):
        swapped = tour.clone()
        swapped[0, [i, j]] = swapped[0, [j, i]]
        assert tour_length(pts, swapped) >= length - 1e-5


def test_canonical_tour_is_a_rotation_or_reflection():
    tour = torch.tensor([[3, 1, 0, 4, 2], [2, 0, 1, 3, 4]])
    assert canonical_tour(tour).tolist() == [[0, 1, 3, 2, 4], [0, 1, 3, 4, 2]]


def brute_force_hull(p):
    """A point is a vertex iff no triangle of three other points contains it (general position)."""
    def inside(q, a, b, c):
        s = [(b[0] - a[0]) * (q[1] - a[1]) - (b[1] - a[1]) * (q[0] - a[0]),
             (c[0] - b[0]) * (q[1] - b[1]) - (c[1] - b[1]) * (q[0] - b[0]),
             (a[0] - c[0]) * (q[1] - c[1]) - (a[1] - c[1]) * (q[0] - c[0])]
        return all(x > 0 for x in s) or all(x < 0 for x in s)
    n = len(p)
    return {i for i in range(n) if not any(inside(p[i], p[a], p[b], p[c]) for a, b, c in
                                           itertools.combinations([j for j in range(n) if j != i], 3))}


def test_convex_hull_against_brute_force():
    pts = torch.rand(30, 9, 2, generator=torch.Generator().manual_seed(0))
    for p, hull in zip(pts, convex_hull(pts)):
        assert set(hull.tolist()) == brute_force_hull(p.tolist())
        assert hull[0] == hull.min()  # starts at the lowest index
        q = p[hull].double()
        signed = 0.5 * float((q[:, 0] * q[:, 1].roll(-1) - q[:, 1] * q[:, 0].roll(-1)).sum())
        assert signed > 0  # counter-clockwise
        assert signed == pytest.approx(polygon_area(p, hull))


def test_simple_polygon():
    square = torch.tensor([[0., 0.], [1., 0.], [1., 1.], [0., 1.]])
    assert is_simple_polygon(square, [0, 1, 2, 3])
    assert not is_simple_polygon(square, [0, 2, 1, 3])  # a bow tie
    assert not is_simple_polygon(square, [0, 1])
    assert not is_simple_polygon(square, [0, 1, 1])


def test_tsp_pool_symmetries_keep_labels_optimal():
    pool = TSPPool(6, 64, seed=1, progress=False)
    pts, tours = pool.sample(64, torch.Generator().manual_seed(2))
    assert torch.allclose(tour_length(pts, tours), held_karp(pts)[0], atol=1e-5)
    assert (tours[:, 0] == 0).all() and (tours[:, 1] < tours[:, -1]).all()


def test_hull_targets():
    g = torch.Generator().manual_seed(0)
    pts, targets = make_batch("hull", 8, 16, g)
    for p, t in zip(pts, targets):
        hull = convex_hull(p)
        k = len(hull)
        assert t[:k].tolist() == (hull + 1).tolist() and t[k] == STOP and (t[k + 1:] < 0).all()
    pts, targets = make_batch("hull", 8, 16, g, input_order="angle")
    centred = pts - pts.mean(1, keepdim=True)
    angles = torch.atan2(centred[..., 1], centred[..., 0])
    assert (angles.diff(dim=1) > 0).all()


def model(task, encoder="lstm", mask=True, seed=0, glimpses=0):
    torch.manual_seed(seed)
    return PointerNet(PointerConfig(task, hidden=32, encoder=encoder, mask_chosen=mask,
                                    glimpses=glimpses)).eval()


def scores(keys, query, v, chosen):  # u_j = v^T tanh(keys_j + query), chosen positions excluded
    return (torch.tanh(keys + query[:, None]) @ v).masked_fill(chosen, -math.inf)


@pytest.mark.parametrize("task", ["tsp", "hull", "sort"])
@pytest.mark.parametrize("encoder,glimpses", [("lstm", 0), ("rpw", 0), ("lstm", 1), ("rpw", 2)])
def test_teacher_forcing_equals_step_by_step(task, encoder, glimpses):
    m = model(task, encoder, glimpses=glimpses)
    x, y = make_batch(task, 6, 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(x, y)
        keys, inputs, state = m.encode(x)
        dec_in = m.start.expand(4, 1, -1)
        chosen = torch.zeros(4, keys.shape[1], dtype=torch.bool)
        for t in range(y.shape[1]):
            d, state = m.decoder(dec_in, state)
            q = d[:, 0]
            for _ in range(glimpses):  # read the keys, add what was read to the query
                q = q + (scores(keys, m.Wg(q), m.vg, chosen).softmax(-1)[..., None] * keys).sum(1)
            step = scores(keys, m.W2(q), m.v, chosen).log_softmax(-1)
            live = y[:, t] >= 0
            assert torch.allclose(step[live], full[live, t], atol=1e-5)
            prev = y[:, t].clamp(min=0)
            chosen[torch.arange(4), prev] |= live
            if m.has_stop:
                chosen[:, STOP] = False
            dec_in = inputs[torch.arange(4), prev][:, None]


def sequence_log_prob(m, x, seqs):
    with torch.no_grad():
        logp = m(x.expand(len(seqs), -1, -1), seqs)
    return (logp.gather(2, seqs.clamp(min=0)[..., None])[..., 0] * (seqs >= 0)).sum(1)


@pytest.mark.parametrize("task", ["tsp", "sort"])
@pytest.mark.parametrize("glimpses", [0, 1])
def test_full_width_beam_finds_the_most_likely_permutation(task, glimpses):
    m = model(task, glimpses=glimpses)
    x, _ = make_batch(task, 5, 3, torch.Generator().manual_seed(2))
    perms = torch.tensor(list(itertools.permutations(range(5))))
    for b in range(3):
        scores = sequence_log_prob(m, x[b:b + 1], perms)
        got = solve(m, x[b:b + 1], beam_size=len(perms))[0]
        assert sorted(got.tolist()) == list(range(5))
        # by score, not by index: the untrained model's top two permutations can lie a few ulps apart
        # (2.9e-6 here), closer than a batched and a step-by-step forward may agree on another CPU
        assert float(sequence_log_prob(m, x[b:b + 1], got[None])[0]) >= float(scores.max()) - 1e-5


def test_full_width_beam_finds_the_most_likely_simple_polygon():
    m = model("hull", seed=3)
    x = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(4))
    for b in range(2):
        polys = [list(p) for k in range(3, 6) for p in itertools.permutations(range(5), k)
                 if is_simple_polygon(x[b], p)]
        seqs = torch.tensor([[i + 1 for i in p] + [STOP] + [-100] * (5 - len(p)) for p in polys])
        best = polys[int(sequence_log_prob(m, x[b:b + 1], seqs).argmax())]
        assert solve(m, x[b:b + 1], beam_size=len(polys))[0].tolist() == best


def test_greedy_is_argmax_at_every_step():
    m = model("tsp")
    x = torch.rand(1, 7, 2, generator=torch.Generator().manual_seed(5))
    path = solve(m, x)[0]
    with torch.no_grad():
        logp = m(x, path[None])[0]
    assert (logp.argmax(-1) == path).all()


def test_unmasked_decoder_may_repeat_and_masked_may_not():
    x = torch.rand(20, 6, 1, generator=torch.Generator().manual_seed(6))
    assert all(len(set(p.tolist())) == 6 for p in solve(model("sort"), x))
    repeats = [len(set(p.tolist())) < 6 for p in solve(model("sort", mask=False), x)]
    assert any(repeats)  # an untrained unmasked pointer re-points at inputs


def test_read_process_write_is_order_invariant():
    x = torch.rand(3, 8, 2, generator=torch.Generator().manual_seed(7))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(8))
    m = model("tsp", "rpw")
    with torch.no_grad():
        k1, _, (h1, c1) = m.encode(x)
        k2, _, (h2, c2) = m.encode(x[:, perm])
    assert torch.allclose(h1, h2, atol=1e-6) and torch.allclose(c1, c2, atol=1e-6)
    assert torch.allclose(k1[:, perm], k2, atol=1e-6)
    # the same tours, relabelled: the distribution of each step is permuted, not changed
    y = held_karp(x)[1]
    inv = perm.argsort()
    assert torch.allclose(m(x, y)[:, :, perm], m(x[:, perm], inv[y]), atol=1e-5)
    # negative control: the LSTM encoder reads the points in order
    lstm = model("tsp", "lstm")
    with torch.no_grad():
        assert not torch.allclose(lstm.encode(x)[2][0], lstm.encode(x[:, perm])[2][0], atol=1e-3)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(4, 5), "points must be shaped"),
    (torch.rand(4, 5, 3), "points must be shaped"),
    (torch.rand(4, 2, 2), "n >= 3"),
    (torch.tensor([[[0., 0.], [1., float("nan")], [1., 1.]]]), "NaN"),
])
def test_bad_points(bad, match):
    with pytest.raises(ValueError, match=match):
        solve(model("tsp"), bad)
    with pytest.raises(ValueError, match=match):
        convex_hull(bad)
    with pytest.raises(ValueError, match=match):
        held_karp(bad)


@pytest.mark.parametrize("beam", [0, -1, 1.5])
def test_bad_beam_size(beam):
    with pytest.raises(ValueError, match="beam_size"):
        solve(model("tsp"), torch.rand(1, 5, 2), beam_size=beam)


def test_bad_names():
    with pytest.raises(ValueError, match="committed"):
        load("tsp", 99)
    with pytest.raises(ValueError, match="task"):
        PointerNet(PointerConfig("knapsack"))
    with pytest.raises(ValueError, match="task"):
        evaluate("hull", model("tsp"), 5, 4)
    assert check_points([[[0, 0], [1, 0], [0, 1]]]).dtype == torch.float32


# ------------------------------------------------------------------ the committed checkpoints

def test_committed_tsp5_is_near_optimal():
    r = evaluate("tsp", load("tsp", 5), 5, num_instances=200, seed=30_000)
    assert r["valid"] == 1.0 and r["gap"] < 0.01


def test_committed_hull10_finds_hulls():
    r = evaluate("hull", load("hull", 10), 10, num_instances=100, seed=30_000)
    assert r["accuracy"] > 0.6 and r["area_coverage"] > 0.98


def test_recorded_results_meet_the_reproduction_targets():
    """The committed JSON (written by `make pointer-checkpoints`) against the issue's bars."""
    def test_row(name, n, beam):
        return next(r for r in record_of(*name)["test"] if r["n"] == n and r["beam_size"] == beam)
    tsp5 = test_row(("tsp", 5), 5, 3)
    assert tsp5["gap"] <= 2.13 / 2.12 - 1  # the paper's 2.13 vs 2.12, as a relative gap
    tsp10 = test_row(("tsp", 10), 10, 3)
    assert tsp10["gap"] <= 2.90 / 2.87 - 1
    hull = test_row(("hull", 10), 10, 1)
    assert hull["accuracy"] >= 0.70 and hull["area_coverage"] >= 0.99
    assert math.isfinite(test_row(("tsp", "5-10"), 20, 1)["mean_length"])
    # masking makes sorting nearly trivial (DESIGN.md); the unmasked models stay well below it
    masked = test_row(("sort", 10, "lstm_masked"), 10, 1)["accuracy"]
    assert masked >= 0.98 and masked > test_row(("sort", 10, "rpw5_10k"), 10, 1)["accuracy"]
    # Order Matters, Table 1 with one glimpse: read-process-write beats the LSTM encoder at N=10
    assert test_row(("sort", 10, "rpw5_g1_10k"), 10, 1)["accuracy"] > \
        test_row(("sort", 10, "lstm_g1_10k"), 10, 1)["accuracy"]


def test_committed_glimpse_sorters_rank_as_recorded_on_fresh_sets():
    acc = {v: evaluate("sort", load("sort", 10, v), 10, num_instances=400, seed=30_000)["accuracy"]
           for v in ("lstm_g1_10k", "rpw5_g1_10k")}
    assert acc["rpw5_g1_10k"] > acc["lstm_g1_10k"] > 0.8


# ---- bad input: one rule per case, each error names the argument

@pytest.mark.parametrize("tour, match", [
    (torch.tensor([[0, 1, 1, 2]]), "permutations of 0..3"),   # a city twice
    (torch.tensor([[0, 1, 5, 2]]), "permutations of 0..3"),   # a city that does not exist
    (torch.tensor([[0., 1., 2., 3.]]), "integer tensor"),
    (torch.tensor([0, 1, 2, 3]), "integer tensor"),
])
def test_bad_tours(tour, match):
    with pytest.raises(ValueError, match=match):
        tour_length(torch.rand(1, 4, 2), tour)
    with pytest.raises(ValueError, match=match):
        canonical_tour(tour)


def test_tour_and_points_must_agree():
    with pytest.raises(ValueError, match="points must be"):
        tour_length(torch.rand(2, 4, 2), torch.tensor([[0, 1, 2, 3]]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="hull", input_order="angel"), "input_order"),
    (dict(task="hull", output_order="randm"), "output_order"),
    (dict(task="sort", input_order="angel"), "input_order"),
    (dict(task="sort", n=0), "n must be"),
    (dict(task="hull", n=2), "n must be"),
    (dict(task="sort", batch_size=0), "batch_size"),
])
def test_make_batch_bad_arguments(kwargs, match):
    kwargs = {"n": 6, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_batch(generator=torch.Generator(), **kwargs)


K, Q, VEC = torch.randn(2, 5, 4), torch.randn(2, 4), torch.randn(4)


@pytest.mark.parametrize("args, error, match", [
    ((K, torch.randn(2, 3), VEC), ValueError, "share H"),
    ((K, torch.randn(3, 4), VEC), ValueError, "does not broadcast"),
    ((K, Q, torch.randn(3)), ValueError, "share H"),
    ((K.long(), Q, VEC), TypeError, "keys must be a float tensor"),
    ((K, Q, VEC, torch.zeros(2, 5, dtype=torch.long)), TypeError, "mask must be a bool tensor"),
    ((K, Q, VEC, torch.zeros(2, 4, dtype=torch.bool)), ValueError, "mask must broadcast"),
    ((K, Q, VEC, torch.ones(2, 5, dtype=torch.bool)), ValueError, "mask forbids every position"),
])
def test_pointer_log_probs_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        pointer_log_probs(*args)


@pytest.mark.parametrize("change, match", [
    (dict(hidden=0), "config.hidden"), (dict(glimpses=-1), "config.glimpses"),
    (dict(process_steps=-1), "config.process_steps"),
])
def test_bad_pointer_config(change, match):
    with pytest.raises(ValueError, match=match):
        PointerNet(PointerConfig("sort", **change))


@pytest.mark.parametrize("x, targets, match", [
    (torch.rand(2, 4, 1), torch.tensor([[0, 1, 2, 9]] * 2), "targets must hold slots in \\[0, 4\\)"),
    (torch.rand(2, 4, 1), torch.tensor([[0, 1, 2, -1]] * 2), "targets must hold slots"),
    (torch.rand(2, 4, 1), torch.tensor([[0, 1, 2, 3]]), "targets must be an integer tensor \\[B=2"),
    (torch.rand(2, 4, 2), torch.tensor([[0, 1, 2, 3]] * 2), "x must be"),
])
def test_bad_teacher_forcing_input(x, targets, match):
    with pytest.raises(ValueError, match=match):
        model("sort").loss(x, targets)


def test_bad_records_polygons_and_sizes():
    with pytest.raises(ValueError, match="committed"):
        record_of("tsp", 99)
    with pytest.raises(ValueError, match="polygon must be"):
        polygon_area(torch.rand(4, 2), [0, 1, 7])
    with pytest.raises(ValueError, match="polygon must be"):
        is_simple_polygon(torch.rand(4, 2), [0, 1, 7])
    with pytest.raises(ValueError, match="num_instances"):
        evaluate("sort", model("sort"), 4, 0)
    with pytest.raises(ValueError, match="size"):
        TSPPool(5, 0, seed=0, progress=False)
    with pytest.raises(ValueError, match="points must be shaped"):
        angle_order(torch.rand(4, 2))


@pytest.mark.parametrize("change, match", [
    (dict(steps=0), "steps"), (dict(n_max=4), "n_max"), (dict(input_order="angel"), "input_order"),
    (dict(min_lr=1.0), "min_lr"), (dict(batch_size=0), "batch_size"),
])
def test_bad_train_config(change, match):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(task="sort", n=5, **change), progress=False)


# ----------------------------------------------------------------------------- the named pieces

def test_held_karp_table_holds_shortest_paths_by_brute_force():
    """dp[S, j] is the shortest path 0 -> (all of S) -> j, checked by enumerating the orders of
    S - {j} for every subset S and end city j at n = 6; the table is [B, 2^(n-1), n-1]."""
    n = 6
    pts = torch.rand(1, n, 2, generator=torch.Generator().manual_seed(4)).double()
    d = torch.cdist(pts, pts)
    dp, parent = held_karp_table(d)
    assert dp.shape == (1, 2 ** (n - 1), n - 1) == parent.shape
    for S in range(1, 2 ** (n - 1)):
        cities = [c + 1 for c in range(n - 1) if S >> c & 1]
        for j in range(n - 1):
            if not S >> j & 1:
                assert dp[0, S, j] == math.inf
                continue
            rest = [c for c in cities if c != j + 1]
            best = min(sum(d[0, a, b].item() for a, b in zip((0, *p), (*p, j + 1)))
                       for p in itertools.permutations(rest))
            assert dp[0, S, j].item() == pytest.approx(best, abs=1e-9)


def test_check_held_karp_points_names_the_table_size():
    assert check_held_karp_points(torch.rand(5, 2), 12).shape == (1, 5, 2)
    with pytest.raises(ValueError, match=r"n=14.*table entries.*\(106,496 here\).*max_n=13"):
        check_held_karp_points(torch.rand(2, 14, 2), 13)


@pytest.mark.parametrize("has_stop", [False, True])
def test_teacher_forcing_mask_equals_a_loop(has_stop):
    """Step i masks every slot chosen at steps < i (never the stop slot, nothing after padding),
    built here one step at a time."""
    g = torch.Generator().manual_seed(2)
    slots, B = 6, 5
    targets = torch.stack([torch.randperm(slots, generator=g) for _ in range(B)])
    targets[1, 4:] = IGNORE
    mask = teacher_forcing_mask(targets, slots, has_stop)
    for b in range(B):
        chosen = set()
        for i in range(slots):
            want = [s in chosen and not (has_stop and s == STOP) for s in range(slots)]
            assert mask[b, i].tolist() == want
            if targets[b, i] < 0:
                break
            chosen.add(int(targets[b, i]))


def test_chosen_slots_shifts_by_the_stop_slot_and_respects_mask_chosen():
    got = chosen_slots([[], [2, 0]], 4, 1, True)
    assert got.tolist() == [[False] * 4, [False, True, False, True]]
    assert not chosen_slots([[2, 0]], 4, 1, False).any()


def test_benchmark_rows_put_held_karp_at_zero_gap_and_never_below():
    """The benchmark's decode rows on a tiny set: Held-Karp's gaps are exactly 0 (same float32
    length as the model's tours), every model gap is >= 0, and the ranges bracket the medians."""
    from refimpl.benchmarks.pointer import decode_rows
    rows = decode_rows(sets=({"n": 6, "checkpoint": ("tsp", 5), "instances": 4},), beams=(1, 2),
                       repeats=1)
    assert [r["method"] for r in rows] == ["Held-Karp (exact)", "greedy", "beam 2"]
    assert rows[0]["gap_max"] == 0 == rows[0]["gap_min"]
    for r in rows:
        assert r["gap_min"] >= 0 and r["instances"] == 4
        assert r["gap_min"] <= r["gap_median"] <= r["gap_max"]
        assert r["inst_per_s_min"] <= r["inst_per_s_median"] <= r["inst_per_s_max"]
